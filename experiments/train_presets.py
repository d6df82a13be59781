"""The model architectures ``python -m experiments.train`` builds: ``{llama,gptj,mpt}-{tiny,small}``
(`PRESETS`), as Hugging Face-style config dicts (`make_config`), so `models.registry.family_for_config`
and `converters.store` work unchanged. ``max_position_embeddings`` / ``n_positions`` / ``max_seq_len``
are set to the training length, which is what the experiment CLIs read as the pretraining length L_train.
"""

from __future__ import annotations

from lminf_jax.tasks.corpus import BOS_ID, EOS_ID

#: Architecture sizes; the vocabulary and the training length come from the data and ``--seq-len``.
PRESETS: dict[str, dict] = {
    "llama-tiny": {"family": "llama", "width": 32, "layers": 2, "heads": 2, "ffn": 88},
    "llama-small": {"family": "llama", "width": 256, "layers": 4, "heads": 4, "ffn": 688},
    "gptj-tiny": {"family": "gptj", "width": 32, "layers": 2, "heads": 2, "ffn": 128, "rotary_dim": 8},
    "gptj-small": {"family": "gptj", "width": 256, "layers": 4, "heads": 4, "ffn": 1024, "rotary_dim": 32},
    "mpt-tiny": {"family": "mpt", "width": 32, "layers": 2, "heads": 2, "ffn": 128},
    "mpt-small": {"family": "mpt", "width": 256, "layers": 4, "heads": 4, "ffn": 1024},
}


def make_config(preset: str, vocab_size: int, seq_len: int) -> dict:
    """The HF-style config dict of `preset` for a vocabulary and a training length."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    w, n, h, f = p["width"], p["layers"], p["heads"], p["ffn"]
    special = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if p["family"] == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
                "hidden_size": w, "intermediate_size": f, "num_hidden_layers": n, "num_attention_heads": h,
                "num_key_value_heads": h, "max_position_embeddings": seq_len, "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, **special}
    if p["family"] == "gptj":
        return {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "vocab_size": vocab_size,
                "n_embd": w, "n_layer": n, "n_head": h, "n_inner": f, "rotary_dim": p["rotary_dim"],
                "n_positions": seq_len, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, **special}
    return {"model_type": "mpt", "architectures": ["MPTForCausalLM"], "vocab_size": vocab_size, "d_model": w,
            "n_layers": n, "n_heads": h, "expansion_ratio": f // w, "max_seq_len": seq_len, "no_bias": True,
            "attn_config": {"alibi": True, "alibi_bias_max": 8}, "layer_norm_epsilon": 1e-5, **special}


def parameter_count(config: dict) -> int:
    """The number of parameters of a model of `config`."""
    from lminf_jax.models import registry
    from lminf_jax.models.common import count_params

    family = registry.family_for_config(config)
    return count_params(family.param_shapes(family.config_from_hf(config)))
