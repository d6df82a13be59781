"""The LLaMA family (LLaMA-1/2/3, Mistral-style GQA) in Hugging Face's layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lminf_jax import RopeScaling, RopeScheme
from models import common
from models.common import AttentionCall, Params
from models.decoder import Attend, Decoder, LanguageModel

MODEL_TYPES = ("llama", "mistral")
LAYER_PREFIX = "model.layers."

#: Logical axes of every parameter (`lminf_jax.sharding`): heads, MLP width and vocabulary split
#: for tensor parallelism, ``embed`` for FSDP.
PARAM_AXES = (
    (r"model\.embed_tokens\.weight|lm_head\.weight", ("vocab", "embed")),
    (r"model\.layers\.self_attn\.q_proj\.weight", ("layers", "heads", "embed")),
    (r"model\.layers\.self_attn\.q_proj\.bias", ("layers", "heads")),
    (r"model\.layers\.self_attn\.[kv]_proj\.weight", ("layers", "kv_heads", "embed")),
    (r"model\.layers\.self_attn\.[kv]_proj\.bias", ("layers", "kv_heads")),
    (r"model\.layers\.self_attn\.o_proj\.weight", ("layers", "embed", "heads")),
    (r"model\.layers\.mlp\.(gate|up)_proj\.weight", ("layers", "mlp", "embed")),
    (r"model\.layers\.mlp\.(gate|up)_proj\.bias", ("layers", "mlp")),
    (r"model\.layers\.mlp\.down_proj\.weight", ("layers", "embed", "mlp")),
    (r"model\.layers\.[\w.]+\.(weight|bias)", ("layers", "hidden")),  # norms, output biases
    (r"model\.norm\.weight", ("hidden",)),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (field names follow HF's config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        common.activation(self.hidden_act)

    @classmethod
    def from_hf(cls, d: Mapping) -> LlamaConfig:
        """From a parsed HF config.json (``model_type`` llama or mistral)."""
        common.reject(d, "sliding_window", lambda v: v is None, "Mistral's sliding window is not implemented; "
                      "use AttentionSpec.sliding_window at call time instead")
        common.reject(d, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel pretraining slices")
        heads = common.require(d, "num_attention_heads")
        hidden = common.require(d, "hidden_size")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = RopeScaling.from_hf(d.get("rope_scaling") or rope or None)
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=common.require(d, "intermediate_size"),
            num_hidden_layers=common.require(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=common.positive_float("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=common.positive_float("rope_theta", theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
        )

    def rope(self) -> RopeScheme:
        """Half-layout RoPE on every head dim, with the checkpoint's own scaling."""
        return RopeScheme(self.head_dim, self.max_position_embeddings, self.rope_theta, scaling=self.rope_scaling)


def param_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter names (HF names, layer index removed) and shapes."""
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = "model.layers."
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        layer + "input_layernorm.weight": (n, h),
        layer + "post_attention_layernorm.weight": (n, h),
        "model.norm.weight": (h,),
    }
    for name, out, inp, bias in (
        ("self_attn.q_proj", q, h, c.attention_bias),
        ("self_attn.k_proj", kv, h, c.attention_bias),
        ("self_attn.v_proj", kv, h, c.attention_bias),
        ("self_attn.o_proj", h, q, c.attention_bias),
        ("mlp.gate_proj", i, h, c.mlp_bias),
        ("mlp.up_proj", i, h, c.mlp_bias),
        ("mlp.down_proj", h, i, c.mlp_bias),
    ):
        shapes[f"{layer}{name}.weight"] = (n, out, inp)
        if bias:
            shapes[f"{layer}{name}.bias"] = (n, out)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def ignored_hf_tensors(c: LlamaConfig) -> tuple[str, ...]:
    """Regexes of HF tensors that carry no parameters (buffers, tied copies)."""
    tied = (r"lm_head\.weight",) if c.tie_word_embeddings else ()
    return (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", *tied)


def init_params(c: LlamaConfig, key: jax.Array, dtype=jnp.float32, shardings=None) -> Params:
    """Random parameters, optionally created in their shardings (see `models.common.init_from_shapes`)."""
    return common.init_from_shapes(param_shapes(c), key, dtype, shardings)


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    config: LlamaConfig,
    call: AttentionCall = AttentionCall(),
    dtype=jnp.float32,
) -> jax.Array:
    """Logits ``(B, T, vocab)`` in float32; compute in ``dtype`` (norms and softmax in float32).

    ``positions`` (``(T,)`` or ``(B, T)``, default ``0..T-1``) may mark left padding with
    negative values; ``call`` picks the attention spec (vanilla, LM-Infinite, ablations).
    For cached decoding use ``LanguageModel(decoder, config, call, dtype)``.
    """
    return LanguageModel(decoder, config, call, dtype).forward(params, tokens, positions)


def decoder(c: LlamaConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    act = common.activation(c.hidden_act)

    def layer(p: Params, h: jax.Array, attend: Attend):
        x = common.rms_norm(h, p["input_layernorm"], c.rms_norm_eps)
        a = p["self_attn"]
        attn, aux = attend(common.linear(x, a["q_proj"], dtype), common.linear(x, a["k_proj"], dtype),
                           common.linear(x, a["v_proj"], dtype))
        h = h + common.linear(attn, a["o_proj"], dtype)
        x = common.rms_norm(h, p["post_attention_layernorm"], c.rms_norm_eps)
        m = p["mlp"]
        gated = act(common.linear(x, m["gate_proj"], dtype)) * common.linear(x, m["up_proj"], dtype)
        return h + common.linear(gated, m["down_proj"], dtype), aux

    def head(params: Params, h: jax.Array) -> jax.Array:
        h = common.rms_norm(h, params["model"]["norm"], c.rms_norm_eps)
        return common.unembed(h, params["model"]["embed_tokens"] if c.tie_word_embeddings else params["lm_head"])

    return Decoder(
        embed=lambda params, tokens: common.embed(params["model"]["embed_tokens"]["weight"], tokens, dtype),
        layer=layer, head=head, layer_params=lambda params: params["model"]["layers"],
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, positional=c.rope(),
    )
