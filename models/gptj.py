"""GPT-J in Hugging Face's layout: parallel attention + MLP, interleaved partial RoPE."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from lminf_jax import RopeScheme
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Param, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder

MODEL_TYPES = ("gptj",)
LAYER_PREFIX = "transformer.h."
LAYERS_FIELD = "n_layer"

@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Architecture hyper-parameters (HF config.json names: n_embd, n_layer, n_head, ...)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    rotary_dim: int | None
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        common.activation(self.activation_function, "activation_function")
        if self.rotary_dim is not None and not 2 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim must be in [2, head_dim={self.head_dim}], got {self.rotary_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    num_layers = property(lambda self: self.n_layer)
    num_heads = num_kv_heads = property(lambda self: self.n_head)
    pretraining_length = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_hf(cls, d: Mapping) -> GPTJConfig:
        """From a parsed HF config.json (``model_type`` gptj)."""
        n_embd = common.require(d, "n_embd")
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            n_embd=n_embd,
            n_layer=common.require(d, "n_layer"),
            n_head=common.require(d, "n_head"),
            rotary_dim=d.get("rotary_dim"),
            n_inner=d.get("n_inner") or 4 * n_embd,
            layer_norm_epsilon=common.positive_float("layer_norm_epsilon", d.get("layer_norm_epsilon", 1e-5)),
            activation_function=d.get("activation_function", "gelu_new"),
            max_position_embeddings=int(d.get("n_positions", 2048)),
        )

    def rope(self) -> RopeScheme:
        """Interleaved (rotate_every_two) RoPE on the first rotary_dim dims of each head."""
        return RopeScheme(self.head_dim, self.max_position_embeddings, rotary_dim=self.rotary_dim, layout="interleaved")


def parameters(c: GPTJConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`)."""
    n, h, i = c.n_layer, c.n_embd, c.n_inner
    layer = LAYER_PREFIX
    return table(
        Param("transformer.wte.weight", (c.vocab_size, h), ("vocab", "embed")),
        norm(layer + "ln_1", h, bias=True, layers=n),
        (linear(layer + f"attn.{name}", h, h, axes=("heads", "embed"), bias=False, layers=n)[0]
         for name in ("q_proj", "k_proj", "v_proj")),
        linear(layer + "attn.out_proj", h, h, axes=("embed", "heads"), bias=False, layers=n),
        linear(layer + "mlp.fc_in", i, h, axes=("mlp", "embed"), bias=True, layers=n),
        linear(layer + "mlp.fc_out", h, i, axes=("embed", "mlp"), bias=True, layers=n),
        norm("transformer.ln_f", h, bias=True),
        linear("lm_head", c.vocab_size, h, axes=("vocab", "embed"), bias=True),
    )


def ignored_hf_tensors(c: GPTJConfig) -> tuple[str, ...]:
    """Causal-mask buffers that old GPT-J checkpoints carry."""
    return (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)


def decoder(c: GPTJConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    act = common.activation(c.activation_function)

    def layer(p: Params, h: jax.Array, attend: Attend):
        x = common.layer_norm(h, p["ln_1"], c.layer_norm_epsilon)
        a, m = p["attn"], p["mlp"]
        attn, aux = attend(common.linear(x, a["q_proj"], dtype), common.linear(x, a["k_proj"], dtype),
                           common.linear(x, a["v_proj"], dtype))
        mlp = common.linear(act(common.linear(x, m["fc_in"], dtype)), m["fc_out"], dtype)
        return h + common.linear(attn, a["out_proj"], dtype) + mlp, aux

    def head(params: Params, h: jax.Array) -> jax.Array:
        return common.unembed(common.layer_norm(h, params["transformer"]["ln_f"], c.layer_norm_epsilon),
                              params["lm_head"])

    return Decoder(
        embed=lambda params, tokens: common.embed(params["transformer"]["wte"]["weight"], tokens, dtype),
        layer=layer, head=head, layer_params=lambda params: params["transformer"]["h"],
        num_layers=c.n_layer, num_heads=c.n_head, num_kv_heads=c.n_head, head_dim=c.head_dim,
        positional=c.rope(),
    )
