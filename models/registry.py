"""Model families by Hugging Face ``model_type``."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping

import jax.numpy as jnp

from models import gptj, llama, mpt
from models.common import AttentionCall
from models.decoder import LanguageModel


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

    def config_from_hf(self, config: Mapping):
        return self.config_class.from_hf(config)

    def param_shapes(self, config) -> dict[str, tuple[int, ...]]:
        return self.module.param_shapes(config)

    def ignored_hf_tensors(self, config) -> tuple[str, ...]:
        return self.module.ignored_hf_tensors(config)

    def num_layers(self, config) -> int:
        return next(s[0] for n, s in self.param_shapes(config).items() if n.startswith(self.layer_prefix))

    @property
    def forward(self) -> Callable:
        return self.module.forward

    @property
    def init_params(self) -> Callable:
        return self.module.init_params

    def model(self, config, call: AttentionCall = AttentionCall(), dtype=jnp.float32) -> LanguageModel:
        """The family's `LanguageModel` (forward pass and cached decoding step)."""
        return LanguageModel(self.module.decoder, config, call, dtype)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", llama, llama.LlamaConfig),
    "gptj": Family("gptj", gptj, gptj.GPTJConfig),
    "mpt": Family("mpt", mpt, mpt.MPTConfig),
}


def family_for_config(config: Mapping) -> Family:
    """The family for a parsed HF config.json; unknown ``model_type`` raises naming the field."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {known}")
