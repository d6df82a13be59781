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

Nothing here imports jax before it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The generation tasks' methods that change the prompt or the cache rather than the attention, and what
#: each does (the mask of each is vanilla).
PROMPT_METHODS = {
    "truncation": "vanilla on BOS + the prompt's last L_train - 1 - new tokens",
    "sirllm": "SirLLM: sinks, recent tokens and the most surprising tokens in a cache of 3 L_train / 4 + 4",
    "xl3m": "XL3M: vanilla on BOS + the segments the model is surest about given the prompt's end + that end",
}


def truncated(prompts: Sequence[Sequence[int]], l_train: int, new_tokens: int) -> list[list[int]]:
    """Each prompt cut to its first token and its last ``L_train - 1 - new_tokens`` (shorter ones unchanged)."""
    keep = l_train - 1 - new_tokens
    return [list(t[:1]) + list(t[-keep:]) if len(t) > keep + 1 else list(t) for t in prompts]


def check_prompt_methods(names, l_train: int, new_tokens: int, what: str) -> None:
    """A ValueError, before any work, when a method of `PROMPT_METHODS` among ``names`` cannot fit a prompt and
    ``new_tokens`` (``what`` says whose) inside L_train."""
    if "truncation" in names and l_train - 1 - new_tokens < 1:
        raise ValueError(f"truncation keeps L_train - 1 - new tokens = {l_train - 1 - new_tokens} prompt tokens: "
                         f"L_train {l_train} is too short for {what} ({new_tokens})")
    if "xl3m" in names:
        from lminf_jax.evaluation.xl3m import XL3M

        try:
            XL3M.for_model(l_train, new_tokens)
        except ValueError as e:
            raise ValueError(f"xl3m with {what} ({new_tokens}): {e}") from None
    if "sirllm" in names:
        from lminf_jax.entropy_cache import SirLLM

        SirLLM.for_model(l_train)


def generate_answers(name: str, model, prefill, params: Any, prompts: Sequence[Sequence[int]], *, l_train: int,
                     new_tokens: int, stop_tokens: Sequence[int] = ()):
    """Greedy continuations (`lminf_jax.decoding.Generation`) of ``prompts`` by method ``name`` (see the
    module docstring); ``model`` is the method's model (vanilla for the methods of `PROMPT_METHODS`) and
    ``prefill`` the model for the prompt's chunks but the last (top-k's), or None."""
    from lminf_jax.decoding import generate

    prompts = [list(t) for t in prompts]
    if name == "sirllm":
        from lminf_jax.entropy_cache import SirLLM, sirllm_generate

        policy = SirLLM.for_model(l_train)
        out, _ = sirllm_generate(model, params, prompts, policy, positional=model.decoder().positional,
                                 max_new_tokens=new_tokens, cache=model.init_cache(len(prompts), capacity=policy.size),
                                 stop_tokens=stop_tokens)
        return out
    if name == "truncation":
        prompts = truncated(prompts, l_train, new_tokens)
    elif name == "xl3m":
        from lminf_jax.evaluation.xl3m import XL3M, key_context, model_entropy

        settings = XL3M.for_model(l_train, new_tokens)
        entropy_of = model_entropy(model, params, settings)
        prompts = [key_context(t, entropy_of, settings).tokens for t in prompts]
    longest = max(map(len, prompts))
    cache = model.init_cache(len(prompts), capacity=None if model.spec.bounded else longest + new_tokens)
    return generate(model, params, prompts, cache, max_new_tokens=new_tokens, stop_tokens=stop_tokens,
                    prefill_step=prefill, prefill_chunk=longest if model.spec.retrieves else 512)
