"""How each method of the generation tasks (passkey, RULER) continues a batch of prompts: one function,
`generate_answers`, that both commands call with the method's name and models.

* a mask or retrieval method (`lminf_jax.spec.METHODS`, with or without a frequency method): greedy
  `lminf_jax.decoding.generate` from the smallest cache that serves it (a Λ-cache when bounded, else a full
  cache); a retrieval method's prompt runs in one call, so that InfLLM's query steps fall at multiples of
  its step size in every row whatever the padding (its steps are also cut at each call's ends);
* ``truncation``: vanilla on the prompt's first token and its last ``L_train - 1 - new tokens``;
* ``sirllm``: SirLLM's token-entropy cache (`lminf_jax.entropy_cache`, `SirLLM.for_model`'s settings);
* ``xl3m``: XL3M's key context (`lminf_jax.evaluation.xl3m`, `XL3M.for_model`'s settings: the segments
  the model is most certain about given the prompt's last tokens), then vanilla on it.

SirLLM's and XL3M's fields can be set over those defaults (`PromptSettings`: ``--sirllm FIELD=VALUE ...``,
``--xl3m FIELD=VALUE ...``).

Nothing here imports jax before it is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

#: The generation tasks' methods that change the prompt or the cache rather than the attention, and what
#: each does (the mask of each is vanilla).
PROMPT_METHODS = {
    "truncation": "vanilla on BOS + the prompt's last L_train - 1 - new tokens",
    "sirllm": "SirLLM: sinks, recent tokens and the most surprising tokens in a cache of 3 L_train / 4 + 4",
    "xl3m": "XL3M: vanilla on BOS + the segments the model is surest about given the prompt's end + that end",
}


#: The methods of `PROMPT_METHODS` whose settings a command can change, with the dataclass that holds them.
SETTABLE = {"sirllm": ("lminf_jax.entropy_cache", "SirLLM"), "xl3m": ("lminf_jax.evaluation.xl3m", "XL3M")}
_TYPES = {"int": int, "float": float, "str": str}


def _settings_class(method: str) -> type:
    import importlib

    module, name = SETTABLE[method]
    return getattr(importlib.import_module(module), name)


def _value(text: str, kind: str, where: str) -> Any:
    """``text`` as a field of type ``kind`` ("int", "float", "str" or "bool"); a ValueError naming ``where``."""
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{where} must be true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return _TYPES[kind](text)
    except ValueError:
        raise ValueError(f"{where} must be {'an' if kind == 'int' else 'a'} {kind}, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """Fields of SirLLM's and XL3M's settings set over their `for_model` defaults (``--sirllm``/``--xl3m``
    ``FIELD=VALUE ...``), as ``(field, value)`` pairs; the defaults where none are given."""

    sirllm: tuple[tuple[str, Any], ...] = ()
    xl3m: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, given: dict[str, Sequence[str] | None], methods: Sequence[str]) -> PromptSettings:
        """The settings from each method's ``FIELD=VALUE`` texts (None: none given); a ValueError naming the
        flag and the field for an unknown field, a bad value, or settings of a method not among ``methods``."""
        out = {}
        for method, texts in given.items():
            if not texts:
                continue
            if method not in methods:
                raise ValueError(f"--{method} sets {method}'s fields, but {method} is not among --methods")
            fields = {f.name: f.type for f in dataclasses.fields(_settings_class(method))}
            pairs = {}
            for text in texts:
                name, eq, value = text.partition("=")
                if not eq or name not in fields:
                    raise ValueError(f"--{method} takes FIELD=VALUE with FIELD one of {', '.join(fields)}; got {text!r}")
                pairs[name] = _value(value, fields[name], f"--{method} {name}")
            out[method] = tuple(pairs.items())
        return cls(**out)

    def sirllm_policy(self, l_train: int):
        """SirLLM's policy for a model pretrained on ``l_train`` tokens (`SirLLM.for_model`, these fields over it)."""
        return _settings_class("sirllm").for_model(l_train, **dict(self.sirllm))

    def xl3m_settings(self, l_train: int, new_tokens: int):
        """XL3M's settings for ``new_tokens`` new tokens (`XL3M.for_model`, these fields over it)."""
        return _settings_class("xl3m").for_model(l_train, new_tokens, **dict(self.xl3m))

    def describe(self, method: str, l_train: int, new_tokens: int) -> dict | None:
        """The settings ``method`` runs with (a dict for the result file), None for a method without any."""
        if method == "sirllm":
            return dataclasses.asdict(self.sirllm_policy(l_train))
        if method == "xl3m":
            return dataclasses.asdict(self.xl3m_settings(l_train, new_tokens))
        return None


def truncated(prompts: Sequence[Sequence[int]], l_train: int, new_tokens: int) -> list[list[int]]:
    """Each prompt cut to its first token and its last ``L_train - 1 - new_tokens`` (shorter ones unchanged)."""
    keep = l_train - 1 - new_tokens
    return [list(t[:1]) + list(t[-keep:]) if len(t) > keep + 1 else list(t) for t in prompts]


def check_prompt_methods(names, l_train: int, new_tokens: int, what: str,
                         settings: PromptSettings = PromptSettings()) -> None:
    """A ValueError, before any work, when a method of `PROMPT_METHODS` among ``names`` cannot fit a prompt and
    ``new_tokens`` (``what`` says whose) inside L_train, or its ``settings`` are not legal."""
    if "truncation" in names and l_train - 1 - new_tokens < 1:
        raise ValueError(f"truncation keeps L_train - 1 - new tokens = {l_train - 1 - new_tokens} prompt tokens: "
                         f"L_train {l_train} is too short for {what} ({new_tokens})")
    for method in SETTABLE:
        if method in names:
            try:
                settings.describe(method, l_train, new_tokens)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{method} with {what} ({new_tokens}): {e}") from None


def generate_answers(name: str, model, prefill, params: Any, prompts: Sequence[Sequence[int]], *, l_train: int,
                     new_tokens: int, stop_tokens: Sequence[int] = (), settings: PromptSettings = PromptSettings()):
    """Greedy continuations (`lminf_jax.decoding.Generation`) of ``prompts`` by method ``name`` (see the
    module docstring); ``model`` is the method's model (vanilla for the methods of `PROMPT_METHODS`) and
    ``prefill`` the model for the prompt's chunks but the last (top-k's), or None; ``settings``: SirLLM's and
    XL3M's."""
    from lminf_jax.decoding import generate

    prompts = [list(t) for t in prompts]
    if name == "sirllm":
        from lminf_jax.entropy_cache import sirllm_generate

        policy = settings.sirllm_policy(l_train)
        out, _ = sirllm_generate(model, params, prompts, policy, positional=model.decoder().positional,
                                 max_new_tokens=new_tokens, cache=model.init_cache(len(prompts), capacity=policy.size),
                                 stop_tokens=stop_tokens)
        return out
    if name == "truncation":
        prompts = truncated(prompts, l_train, new_tokens)
    elif name == "xl3m":
        from lminf_jax.evaluation.xl3m import key_context, model_entropy

        xl3m = settings.xl3m_settings(l_train, new_tokens)
        entropy_of = model_entropy(model, params, xl3m)
        prompts = [key_context(t, entropy_of, xl3m).tokens for t in prompts]
    longest = max(map(len, prompts))
    cache = model.init_cache(len(prompts), capacity=None if model.spec.bounded else longest + new_tokens)
    return generate(model, params, prompts, cache, max_new_tokens=new_tokens, stop_tokens=stop_tokens,
                    prefill_step=prefill, prefill_chunk=longest if model.spec.retrieves else 512)
