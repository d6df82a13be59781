"""RULER's scoring: its string-match metrics (``scripts/eval/synthetic/constants.py``), the score of
one prediction and the mean per task, length and depth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lminf_jax.tasks.ruler import Instance


def string_match_all(prediction: str, outputs: Sequence[str]) -> float:
    """RULER's metric for all synthetic tasks: the fraction of `outputs` found in `prediction`
    (substring, case-insensitive)."""
    pred = prediction.lower()
    return sum(o.lower() in pred for o in outputs) / len(outputs)


def string_match_part(prediction: str, outputs: Sequence[str]) -> float:
    """RULER's metric for its QA tasks: 1 when any of `outputs` is found in `prediction`."""
    pred = prediction.lower()
    return float(any(o.lower() in pred for o in outputs))


def score(instance: Instance, prediction: str) -> float:
    """`string_match_all` of a prediction (the continuation after the answer prefix)."""
    return string_match_all(prediction, instance.outputs)


def aggregate(instances: Sequence[Instance], predictions: Sequence[str]) -> dict[tuple[str, int, float | None], dict]:
    """``{(task, length, depth): {"score": mean in [0, 1], "n": instances}}`` (RULER reports x 100)."""
    if len(instances) != len(predictions):
        raise ValueError(f"{len(instances)} instances but {len(predictions)} predictions")
    cells: dict[tuple[str, int, float | None], list[float]] = {}
    for inst, pred in zip(instances, predictions):
        cells.setdefault((inst.task, inst.length, inst.depth), []).append(score(inst, pred))
    return {k: {"score": float(np.mean(v)), "n": len(v)} for k, v in cells.items()}
