"""lminf_jax: LM-Infinite attention (Λ-shaped mask + distance limit) in JAX.

Model-family agnostic pieces: positional encodings, attention methods (`METHODS`), the attention
entry point (dense reference, jitted blockwise implementation, the vendors' fused kernels).

The project's other rooms are its subpackages by name: `lminf_jax.models` (the families),
`lminf_jax.converters` (Hugging Face checkpoints), `lminf_jax.evaluation` (the evaluation harness:
streaming NLL, perplexity by length, fingerprints, metrics, resumable runs), `lminf_jax.tasks` (corpora,
passkey, RULER, training mixes) and `lminf_jax.experiments` (the commands). Their folders sit beside
this one (``models/``, ``converters/``, ``evaluation/``, ``tasks/``, ``experiments/``); an install maps them
here (pyproject's ``package-dir``), and in a source tree run in place (``PYTHONPATH=.``) this
package's search path reaches them. The core imports none of them.
"""

import sys as _sys
from pathlib import Path as _Path
from types import ModuleType as _ModuleType

_TREE = _Path(__file__).resolve().parent.parent
if (_TREE / "pyproject.toml").is_file() and not (_Path(__file__).parent / "models").exists():
    __path__.append(str(_TREE))  # noqa: F821 - a package's own __path__: lminf_jax.models is ../models

#: Each public name's submodule, imported on first use (PEP 562), so that reading a declaration (e.g.
#: `lminf_jax.spec.METHODS` for a command's --help) does not import jax.
_EXPORTS = {
    **dict.fromkeys(("Alibi", "alibi_bias", "alibi_slopes"), "alibi"),
    **dict.fromkeys(("attention", "attention_probe", "attention_route"), "attention"),
    "AttentionCall": "attention_call",
    "AttentionProbe": "attention_reference",
    **dict.fromkeys(("FREQUENCY_METHODS", "LengthRule", "RopeScaling", "RopeScheme", "Rotary", "apply_rope",
                     "frequency_method", "rope_angles", "rope_frequencies"), "rope"),
    **dict.fromkeys(("Sampling", "filter_logits", "sample"), "sampling"),
    "Scaling": "scores",
    "Selection": "selection",
    **dict.fromkeys(("METHODS", "AttentionSpec", "DistanceLimit", "InfLLM", "LambdaMask", "LeakyReRoPE", "LMInfinite",
                     "LongHeads", "RetrievalSpec", "SelfExtend", "SlidingWindow", "StreamingLLM", "TopK", "Vanilla"),
                    "spec"),
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lminf_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"lminf_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(_ModuleType):
    """This package: a name it exports from the submodule of the same name (`attention`) stays the exported
    function when that submodule is loaded, whatever imports it first (the import system then sets the
    package's attribute to the submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if _EXPORTS.get(name) == name and isinstance(value, _ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


__all__ = [
    "Alibi",
    "AttentionCall",
    "AttentionProbe",
    "AttentionSpec",
    "DistanceLimit",
    "InfLLM",
    "LMInfinite",
    "LongHeads",
    "LambdaMask",
    "LeakyReRoPE",
    "METHODS",
    "FREQUENCY_METHODS",
    "RetrievalSpec",
    "RopeScaling",
    "RopeScheme",
    "LengthRule",
    "SelfExtend",
    "SlidingWindow",
    "StreamingLLM",
    "Rotary",
    "Sampling",
    "Scaling",
    "Selection",
    "TopK",
    "Vanilla",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "frequency_method",
    "attention",
    "attention_probe",
    "attention_route",
    "filter_logits",
    "rope_angles",
    "rope_frequencies",
    "sample",
]
