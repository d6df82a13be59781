"""Model families by Hugging Face ``model_type``."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from lminf_jax import AttentionCall, AttentionSpec
from lminf_jax.sharding import ShardingPlan

from lminf_jax.models import bloom, declaration, gemma, gptj, llama, mpt, neox
from lminf_jax.models.common import Params, init_from_shapes
from lminf_jax.models.declaration import Fused, ModelConfig, Param
from lminf_jax.models.decoder import LanguageModel


@dataclasses.dataclass(frozen=True)
class Family:
    """What converters and experiments need to know about one model family."""

    name: str
    module: types.ModuleType
    config_class: type

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.module.MODEL_TYPES

    @property
    def layer_prefix(self) -> str:
        """HF name prefix of per-layer tensors (followed by the layer index)."""
        return self.module.LAYER_PREFIX

    @property
    def layers_field(self) -> str:
        """The HF config field of the number of layers (named where it is checked against a checkpoint)."""
        return self.module.LAYERS_FIELD

    def config_from_hf(self, config: Mapping):
        return self.config_class.from_hf(config)

    def parameters(self, config) -> tuple[Param, ...]:
        """The family's parameter table for ``config`` (`models.declaration`)."""
        return self.module.parameters(config)

    def fused(self, config) -> tuple[Fused, ...]:
        """Checkpoint tensors that hold several of the family's parameters (none unless it declares
        ``fused(config)``)."""
        declared = getattr(self.module, "fused", None)
        return () if declared is None else declared(config)

    def param_shapes(self, config) -> dict[str, tuple[int, ...]]:
        return declaration.shapes(self.parameters(config))

    def ignored_hf_tensors(self, config) -> tuple[str, ...]:
        return self.module.ignored_hf_tensors(config)

    def num_layers(self, config: ModelConfig) -> int:
        return config.num_layers

    def param_shardings(self, config: ModelConfig, plan: ShardingPlan) -> dict[str, NamedSharding]:
        """Flat parameter name -> its sharding under ``plan`` (by the axes of `parameters`): what
        `init_params` and the converters' loaders take to place parameters."""
        params = self.parameters(config)
        units = {"heads": config.num_heads, "kv_heads": config.num_kv_heads}
        return plan.param_shardings(declaration.shapes(params), declaration.sharding_rules(params), units)

    def init_params(self, config, key: jax.Array, dtype=jnp.float32, plan: ShardingPlan | None = None) -> Params:
        """Random parameters (`models.common.init_from_shapes`); with ``plan``, created directly in
        their shardings."""
        shardings = None if plan is None else self.param_shardings(config, plan)
        return init_from_shapes(self.param_shapes(config), key, dtype, shardings)

    def forward(self, params: Params, tokens: jax.Array, positions: jax.Array | None = None, *, config,
                call: AttentionCall = AttentionCall(), dtype=jnp.float32) -> jax.Array:
        """Logits ``(B, T, vocab)`` in float32, computed in ``dtype`` (norms and softmax in float32).

        ``positions`` (``(T,)`` or ``(B, T)``, default ``0..T-1``) may mark left padding with
        negative values; ``call`` picks the attention spec (vanilla, LM-Infinite, ablations).
        For cached decoding use `model`."""
        return self.model(config, call, dtype).forward(params, tokens, positions)

    def check_spec(self, config, spec: AttentionSpec) -> None:
        """Refuse a spec with an option that can never take effect in this model (a ValueError
        naming it): top-k middle tokens starting at a layer the model does not have."""
        n = self.num_layers(config)
        if spec.top_k is not None and spec.top_k.from_layer >= n:
            raise ValueError(f"top_k.from_layer is {spec.top_k.from_layer}, but the model has {n} layers "
                             f"(0..{n - 1}): the top-k middle tokens would never be used (lower --top-k-from-layer)")

    def model(self, config, call: AttentionCall = AttentionCall(), dtype=jnp.float32,
              sharding: ShardingPlan | None = None) -> LanguageModel:
        """The family's `LanguageModel` (forward pass and cached decoding step), sharded by
        ``sharding`` when given (its params should then be placed by `param_shardings`)."""
        self.check_spec(config, call.spec)
        return LanguageModel(self.module.decoder, config, call, dtype, sharding)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", llama, llama.LlamaConfig),
    "gemma": Family("gemma", gemma, gemma.GemmaConfig),
    "gptj": Family("gptj", gptj, gptj.GPTJConfig),
    "mpt": Family("mpt", mpt, mpt.MPTConfig),
    "bloom": Family("bloom", bloom, bloom.BloomConfig),
    "neox": Family("neox", neox, neox.NeoXConfig),
}


def family_for_config(config: Mapping) -> Family:
    """The family for a parsed HF config.json; unknown ``model_type`` raises naming the field."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {known}")
