"""MPT in Hugging Face's layout: ALiBi, fused Wqkv, optional biases, clip_qkv, qk_ln. ``attn_config.alibi_bias_max``
scales the slopes as MosaicML's own code does; transformers ignores it, so a value other than 8 is warned about."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lminf_jax import Alibi
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Param, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder

MODEL_TYPES = ("mpt",)
LAYER_PREFIX = "transformer.blocks."
LAYERS_FIELD = "n_layers"

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
        bias_max = common.positive_float("attn_config.alibi_bias_max", attn.get("alibi_bias_max", 8))
        if bias_max != 8:
            warnings.warn(f"config field 'attn_config.alibi_bias_max' is {attn['alibi_bias_max']!r}, not 8: "
                          "transformers ignores it (its MPT always uses 8); this library follows MosaicML's own code, "
                          "which scales the ALiBi slopes by it, so its logits differ from transformers'", stacklevel=2)
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            d_model=common.require(d, "d_model"),
            n_layers=common.require(d, "n_layers"),
            n_heads=common.require(d, "n_heads"),
            expansion_ratio=int(d.get("expansion_ratio", 4)),
            layer_norm_epsilon=common.positive_float("layer_norm_epsilon", d.get("layer_norm_epsilon", 1e-5)),
            no_bias=bool(d.get("no_bias", True)),
            alibi_bias_max=bias_max,
            clip_qkv=attn.get("clip_qkv"),
            qk_ln=bool(attn.get("qk_ln", False)),
            softmax_scale=attn.get("softmax_scale"),
            max_seq_len=int(d.get("max_seq_len", 2048)),
        )

    num_layers = property(lambda self: self.n_layers)
    num_heads = num_kv_heads = property(lambda self: self.n_heads)
    head_dim = property(lambda self: self.d_model // self.n_heads)
    pretraining_length = property(lambda self: self.max_seq_len)

    def alibi(self) -> Alibi:
        """ALiBi slopes for the heads (MPT's rule)."""
        return Alibi.create(self.n_heads, self.alibi_bias_max)


def parameters(c: MPTConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`).
    The fused ``Wqkv`` output (q, k and v side by side) is not split: a contiguous split would cut
    across q, k and v."""
    n, h, e, bias = c.n_layers, c.d_model, c.expansion_ratio * c.d_model, not c.no_bias
    layer = LAYER_PREFIX
    return table(
        Param("transformer.wte.weight", (c.vocab_size, h), ("vocab", "embed")),
        norm(layer + "norm_1", h, bias=bias, layers=n),
        linear(layer + "attn.Wqkv", 3 * h, h, axes=(None, "embed"), bias=bias, layers=n),
        (p for name in ("q_ln", "k_ln") if c.qk_ln for p in norm(layer + f"attn.{name}", h, bias=bias, layers=n)),
        linear(layer + "attn.out_proj", h, h, axes=("embed", "heads"), bias=bias, layers=n),
        norm(layer + "norm_2", h, bias=bias, layers=n),
        linear(layer + "ffn.up_proj", e, h, axes=("mlp", "embed"), bias=bias, layers=n),
        linear(layer + "ffn.down_proj", h, e, axes=("embed", "mlp"), bias=bias, layers=n),
        norm("transformer.norm_f", h, bias=bias),
    )


def ignored_hf_tensors(c: MPTConfig) -> tuple[str, ...]:
    """The output head is tied to the embedding; a saved copy is skipped."""
    return (r"lm_head\.weight",)


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
