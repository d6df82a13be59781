"""MPT in Hugging Face's layout: ALiBi, fused Wqkv, optional biases, clip_qkv, qk_ln."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lminf_jax import Alibi
from models import common
from models.common import AttentionCall, Params
from models.decoder import Attend, Decoder, LanguageModel

MODEL_TYPES = ("mpt",)
LAYER_PREFIX = "transformer.blocks."

#: Logical axes of every parameter (`lminf_jax.sharding`): heads, MLP width and vocabulary split
#: for tensor parallelism, ``embed`` for FSDP. The fused ``Wqkv`` output (q, k and v side by
#: side) is not split: a contiguous split would cut across q, k and v.
PARAM_AXES = (
    (r"transformer\.wte\.weight", ("vocab", "embed")),
    (r"transformer\.blocks\.attn\.Wqkv\.weight", ("layers", None, "embed")),
    (r"transformer\.blocks\.attn\.Wqkv\.bias", ("layers", None)),
    (r"transformer\.blocks\.attn\.out_proj\.weight", ("layers", "embed", "heads")),
    (r"transformer\.blocks\.ffn\.up_proj\.weight", ("layers", "mlp", "embed")),
    (r"transformer\.blocks\.ffn\.up_proj\.bias", ("layers", "mlp")),
    (r"transformer\.blocks\.ffn\.down_proj\.weight", ("layers", "embed", "mlp")),
    (r"transformer\.blocks\.[\w.]+\.(weight|bias)", ("layers", "hidden")),  # norms, output biases
    (r"transformer\.norm_f\.(weight|bias)", ("hidden",)),
)


@dataclasses.dataclass(frozen=True)
class MPTConfig:
    """Architecture hyper-parameters (HF config.json names; attention fields from attn_config)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    expansion_ratio: int = 4
    layer_norm_epsilon: float = 1e-5
    no_bias: bool = True
    alibi_bias_max: float = 8.0
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")

    @classmethod
    def from_hf(cls, d: Mapping) -> MPTConfig:
        """From a parsed HF config.json (``model_type`` mpt)."""
        attn = d.get("attn_config") or {}
        if not isinstance(attn, Mapping):
            raise ValueError(f"config field 'attn_config' must be a mapping, got {type(attn).__name__}")
        common.reject(attn, "alibi", lambda v: v is True, "only ALiBi MPT models are supported")
        common.reject(attn, "prefix_lm", lambda v: not v, "prefix-LM attention is not implemented")
        common.reject(attn, "attn_uses_sequence_id", lambda v: not v, "sequence-id masking is not implemented")
        common.reject(d, "logit_scale", lambda v: v is None, "logit scaling is not implemented")
        common.reject(d, "norm_type", lambda v: v in (None, "low_precision_layernorm", "layernorm"),
                      "only LayerNorm is implemented")
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            d_model=common.require(d, "d_model"),
            n_layers=common.require(d, "n_layers"),
            n_heads=common.require(d, "n_heads"),
            expansion_ratio=int(d.get("expansion_ratio", 4)),
            layer_norm_epsilon=common.positive_float("layer_norm_epsilon", d.get("layer_norm_epsilon", 1e-5)),
            no_bias=bool(d.get("no_bias", True)),
            alibi_bias_max=common.positive_float("attn_config.alibi_bias_max", attn.get("alibi_bias_max", 8)),
            clip_qkv=attn.get("clip_qkv"),
            qk_ln=bool(attn.get("qk_ln", False)),
            softmax_scale=attn.get("softmax_scale"),
            max_seq_len=int(d.get("max_seq_len", 2048)),
        )

    def alibi(self) -> Alibi:
        """ALiBi slopes for the heads (MPT's rule)."""
        return Alibi.create(self.n_heads, self.alibi_bias_max)


def param_shapes(c: MPTConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter names (HF names, layer index removed) and shapes."""
    n, h, e = c.n_layers, c.d_model, c.expansion_ratio * c.d_model
    layer = "transformer.blocks."
    weights = {
        "norm_1": (h,), "norm_2": (h,), "attn.Wqkv": (3 * h, h), "attn.out_proj": (h, h),
        "ffn.up_proj": (e, h), "ffn.down_proj": (h, e),
    }
    if c.qk_ln:
        weights.update({"attn.q_ln": (h,), "attn.k_ln": (h,)})
    shapes = {"transformer.wte.weight": (c.vocab_size, h), "transformer.norm_f.weight": (h,)}
    if not c.no_bias:
        shapes["transformer.norm_f.bias"] = (h,)
    for name, shape in weights.items():
        shapes[f"{layer}{name}.weight"] = (n, *shape)
        if not c.no_bias:
            shapes[f"{layer}{name}.bias"] = (n, shape[0])
    return shapes


def ignored_hf_tensors(c: MPTConfig) -> tuple[str, ...]:
    """The output head is tied to the embedding; a saved copy is skipped."""
    return (r"lm_head\.weight",)


def init_params(c: MPTConfig, key: jax.Array, dtype=jnp.float32, shardings=None) -> Params:
    """Random parameters, optionally created in their shardings (see `models.common.init_from_shapes`)."""
    return common.init_from_shapes(param_shapes(c), key, dtype, shardings)


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    config: MPTConfig,
    call: AttentionCall = AttentionCall(),
    dtype=jnp.float32,
) -> jax.Array:
    """Logits ``(B, T, vocab)`` in float32; see `models.llama.forward` for the arguments."""
    return LanguageModel(decoder, config, call, dtype).forward(params, tokens, positions)


def decoder(c: MPTConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    eps = c.layer_norm_epsilon

    def layer(p: Params, h: jax.Array, attend: Attend):
        a, f = p["attn"], p["ffn"]
        qkv = common.linear(common.layer_norm(h, p["norm_1"], eps), a["Wqkv"], dtype)
        if c.clip_qkv is not None:
            qkv = jnp.clip(qkv, -c.clip_qkv, c.clip_qkv)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if c.qk_ln:
            q, k = common.layer_norm(q, a["q_ln"], eps), common.layer_norm(k, a["k_ln"], eps)
        attn, aux = attend(q, k, v)
        h = h + common.linear(attn, a["out_proj"], dtype)
        x = common.layer_norm(h, p["norm_2"], eps)
        up = jax.nn.gelu(common.linear(x, f["up_proj"], dtype), approximate=False)
        return h + common.linear(up, f["down_proj"], dtype), aux

    def head(params: Params, h: jax.Array) -> jax.Array:
        model = params["transformer"]
        return common.unembed(common.layer_norm(h, model["norm_f"], eps), model["wte"])

    return Decoder(
        embed=lambda params, tokens: common.embed(params["transformer"]["wte"]["weight"], tokens, dtype),
        layer=layer, head=head, layer_params=lambda params: params["transformer"]["blocks"],
        num_layers=c.n_layers, num_heads=c.n_heads, num_kv_heads=c.n_heads, head_dim=c.d_model // c.n_heads,
        positional=c.alibi(), scale=c.softmax_scale,
    )
