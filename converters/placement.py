"""Checks for the per-parameter shardings that `load_params` and `load_converted` place params in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax


def check_shardings(names: Iterable[str], shardings: Mapping[str, jax.sharding.Sharding], where: str) -> None:
    """Raise a ValueError naming every parameter of `names` without a sharding and every
    sharding for a parameter not in `names` (`where`: the checkpoint, for the message)."""
    names = set(names)
    missing = sorted(names - shardings.keys())
    unknown = sorted(shardings.keys() - names)
    if missing or unknown:
        problems = [f"no sharding for parameter {name}" for name in missing]
        problems += [f"sharding for unknown parameter {name}" for name in unknown]
        raise ValueError(f"shardings do not match the parameters of {where}: " + "; ".join(problems))
