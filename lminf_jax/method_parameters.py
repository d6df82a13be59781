"""The attention methods' parameters, each declared once: its symbol, smallest legal value and whether
the command line takes it by a short flag (`PARAMETERS`), and, per method, what it means there and
where its default comes from (`Option`, a method's ``OPTIONS``). `lminf_jax.spec`'s methods check and
build themselves from these; the commands derive their options and help from them
(`experiments.methods`). Nothing here imports jax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Parameter(NamedTuple):
    """A method parameter, an int field of every method that takes it and one command-line option
    (``--its-name``): its symbol (in `AttentionSpec.describe`), its smallest legal value, and whether
    the command line also takes it as ``-SYMBOL`` (the paper's G, L and D)."""

    symbol: str
    minimum: int
    short_flag: bool = False


#: Every method parameter by name, in the command line's order.
PARAMETERS: dict[str, Parameter] = {
    "global_branch": Parameter("G", 0, short_flag=True),
    "local_branch": Parameter("L", 1, short_flag=True),
    "limit_distance": Parameter("D", 1, short_flag=True),
    "group_size": Parameter("g", 1),
    "leak": Parameter("k", 1),
    "chunk_size": Parameter("w", 1),
    "span": Parameter("span", 4),
    "block_size": Parameter("bs", 1),
    "blocks_retrieved": Parameter("topk", 1),
    "representatives": Parameter("rk", 1),
    "step_size": Parameter("exc", 1),
}

#: The pretraining length the defaults taken from the model assume when a method is built directly,
#: without a model (Llama-2's): ``LMInfinite()`` is ``LMInfinite(10, 4096)``.
ASSUMED_PRETRAINING_LENGTH = 4096

#: ``from_options``' source of the defaults taken from the model: ``pretraining_length(parameter)`` is the
#: model's pretraining length, asked for when the named parameter's default needs it.
PretrainingLength = Callable[[str], int]


class Option(NamedTuple):
    """What one of `PARAMETERS` means to a method (an entry of its ``OPTIONS``), and its default there:
    the method's field default, unless ``per_pretraining`` (the model's pretraining length divided by
    it, at least 1) or ``same_as`` (the value of that other parameter of the method) declares it."""

    meaning: str
    per_pretraining: int | None = None
    same_as: str | None = None
    #: How help states a default the method resolves itself (its field default None), e.g. ``min(4, bs)``.
    default_text: str | None = None

    def model_default(self, pretraining_length: int = ASSUMED_PRETRAINING_LENGTH) -> int:
        """The default ``per_pretraining`` declares, for a model pretrained on ``pretraining_length`` tokens."""
        return max(1, pretraining_length // self.per_pretraining)

    def describe_default(self, field_default: object) -> str:
        """The default as help shows it, e.g. ``10``, ``L_train / 4`` or ``L``; ``field_default``: the
        method's field default (what applies unless this option declares another)."""
        if self.default_text is not None:
            return self.default_text
        if self.per_pretraining is not None:
            return "L_train" if self.per_pretraining == 1 else f"L_train / {self.per_pretraining}"
        if self.same_as is not None:
            return PARAMETERS[self.same_as].symbol
        return str(field_default)
