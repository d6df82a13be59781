"""The LLaMA architecture in Hugging Face's layout: LLaMA-1/2/3, Mistral (with its native sliding window
when the config sets one, as v0.1's does), Qwen2/2.5 (biases on q, k and v but not o) and Qwen3 (RMSNorm
of each query and key head before RoPE); both Qwens with their sliding-window layers as configured; Phi-3
/ Phi-3.5 (q/k/v and gate/up fused in the checkpoint, split by the converters; partial rotary)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from lminf_jax import RopeScaling, RopeScheme
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Fused, Param, fused_linear, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder, NativeWindow

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
LAYER_PREFIX = "model.layers."
LAYERS_FIELD = "num_hidden_layers"

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
    qkv_bias: bool = False  # Qwen2: biases on q, k, v only
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's dims of q and k, before RoPE
    sliding_window: int | None = None  # the native window of the layers window_rule marks
    window_rule: common.WindowLayers = common.WindowLayers()
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of each head (None: all)
    fused_projections: bool = False  # Phi-3: checkpoints hold qkv_proj and gate_up_proj

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        common.activation(self.hidden_act)

    @classmethod
    def from_hf(cls, d: Mapping) -> LlamaConfig:
        """From a parsed HF config.json (``model_type`` llama, mistral, qwen2 or qwen3)."""
        model_type = d.get("model_type")
        if model_type == "llama":
            common.reject(d, "sliding_window", lambda v: v is None, "LLaMA has no sliding window (Mistral's does)")
        common.reject(d, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel pretraining slices")
        heads = common.require(d, "num_attention_heads")
        hidden = common.require(d, "hidden_size")
        layers = common.require(d, "num_hidden_layers")
        window, rule = _native_window(d, model_type, layers)
        field, rope = common.rope_settings(d)
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
            raise ValueError(f"unsupported config field {field!r} (rope_type 'longrope'): Phi-3's LongRoPE (its 128k "
                             "variants) is not implemented; the 4k models (no rope_scaling) are")
        scaling = RopeScaling.from_hf({k: v for k, v in rope.items() if k != "partial_rotary_factor"} or None)
        head_dim = d.get("head_dim") or hidden // heads
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ValueError(f"config field 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=common.require(d, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=common.positive_float("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=common.positive_float("rope_theta", theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            window_rule=rule,
            rotary_dim=None if partial == 1 else int(head_dim * partial),
            fused_projections=model_type == "phi3",
        )

    num_layers = property(lambda self: self.num_hidden_layers)
    num_heads = property(lambda self: self.num_attention_heads)
    num_kv_heads = property(lambda self: self.num_key_value_heads)
    pretraining_length = property(lambda self: self.max_position_embeddings)
    window_layers = property(common.window_flags)

    def rope(self) -> RopeScheme:
        """Half-layout RoPE on every head dim, with the checkpoint's own scaling."""
        return RopeScheme(self.head_dim, self.max_position_embeddings, self.rope_theta, rotary_dim=self.rotary_dim,
                          scaling=self.rope_scaling)


def parameters(c: LlamaConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`)."""
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    qkv_bias = c.attention_bias or c.qkv_bias
    layer = LAYER_PREFIX
    return table(
        Param("model.embed_tokens.weight", (c.vocab_size, h), ("vocab", "embed")),
        norm(layer + "input_layernorm", h, bias=False, layers=n),
        norm(layer + "post_attention_layernorm", h, bias=False, layers=n),
        linear(layer + "self_attn.q_proj", q, h, axes=("heads", "embed"), bias=qkv_bias, layers=n),
        linear(layer + "self_attn.k_proj", kv, h, axes=("kv_heads", "embed"), bias=qkv_bias, layers=n),
        linear(layer + "self_attn.v_proj", kv, h, axes=("kv_heads", "embed"), bias=qkv_bias, layers=n),
        linear(layer + "self_attn.o_proj", h, q, axes=("embed", "heads"), bias=c.attention_bias, layers=n),
        (p for name in ("q_norm", "k_norm") if c.qk_norm
         for p in norm(layer + f"self_attn.{name}", c.head_dim, bias=False, layers=n)),
        linear(layer + "mlp.gate_proj", i, h, axes=("mlp", "embed"), bias=c.mlp_bias, layers=n),
        linear(layer + "mlp.up_proj", i, h, axes=("mlp", "embed"), bias=c.mlp_bias, layers=n),
        linear(layer + "mlp.down_proj", h, i, axes=("embed", "mlp"), bias=c.mlp_bias, layers=n),
        norm("model.norm", h, bias=False),
        () if c.tie_word_embeddings else Param("lm_head.weight", (c.vocab_size, h), ("vocab", "embed")),
    )


def fused(c: LlamaConfig) -> tuple[Fused, ...]:
    """Phi-3's fused checkpoint tensors: ``qkv_proj`` (q, k, v rows one after another) and ``gate_up_proj``."""
    if not c.fused_projections:
        return ()
    return (*fused_linear(LAYER_PREFIX + "self_attn.", "qkv_proj", ("q_proj", "k_proj", "v_proj"), bias=False),
            *fused_linear(LAYER_PREFIX + "mlp.", "gate_up_proj", ("gate_proj", "up_proj"), bias=False))


def _native_window(d: Mapping, model_type: str, layers: int) -> tuple[int | None, common.WindowLayers]:
    """The native window and the layers that use it, as Hugging Face reads them: Mistral's ``sliding_window``
    on every layer; Qwen2/3's ``sliding_window`` only with ``use_sliding_window``, on ``layer_types``'
    sliding layers (default: from ``max_window_layers`` on)."""
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, common.WindowLayers()
    window = common.require(d, "sliding_window")
    if window < 1:
        raise ValueError(f"config field 'sliding_window' must be >= 1, got {window}")
    if model_type in ("qwen2", "qwen3"):
        start = common.require(d, "max_window_layers") if d.get("max_window_layers") is not None else 28
        return window, common.window_layers(d, layers, first=start)
    return window, common.WindowLayers()


def _head_norm(x: jax.Array, p: Params, c: LlamaConfig) -> jax.Array:
    """RMSNorm over each head's dims of a projected ``(B, T, heads * head_dim)`` tensor."""
    heads = x.reshape(*x.shape[:-1], -1, c.head_dim)
    return common.rms_norm(heads, p, c.rms_norm_eps).reshape(x.shape)


def ignored_hf_tensors(c: LlamaConfig) -> tuple[str, ...]:
    """Regexes of HF tensors that carry no parameters (buffers, tied copies)."""
    tied = (r"lm_head\.weight",) if c.tie_word_embeddings else ()
    return (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", *tied)


def decoder(c: LlamaConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    act = common.activation(c.hidden_act)

    def layer(p: Params, h: jax.Array, attend: Attend):
        x = common.rms_norm(h, p["input_layernorm"], c.rms_norm_eps)
        a = p["self_attn"]
        q, k = common.linear(x, a["q_proj"], dtype), common.linear(x, a["k_proj"], dtype)
        if c.qk_norm:
            q, k = _head_norm(q, a["q_norm"], c), _head_norm(k, a["k_norm"], c)
        attn, aux = attend(q, k, common.linear(x, a["v_proj"], dtype))
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
        head_dim=c.head_dim, positional=c.rope(), native_window=NativeWindow.of(c.sliding_window, c.window_layers),
    )
