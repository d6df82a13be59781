"""lminf_jax.method_parameters: each parameter declared once, a method's default rule for it."""

from __future__ import annotations

from lminf_jax.method_parameters import ASSUMED_PRETRAINING_LENGTH, PARAMETERS, Option


def test_a_default_is_the_field_or_the_rule_declared():
    assert Option("window", per_pretraining=4).model_default(64) == 16
    assert Option("window", per_pretraining=4).model_default(3) == 1  # at least 1
    assert Option("window", per_pretraining=2).model_default() == ASSUMED_PRETRAINING_LENGTH // 2
    assert Option("window", per_pretraining=1).describe_default(None) == "L_train"
    assert Option("window", per_pretraining=4).describe_default(None) == "L_train / 4"
    assert Option("distance", same_as="local_branch").describe_default(None) == PARAMETERS["local_branch"].symbol
    assert Option("sinks").describe_default(10) == "10"


def test_every_parameter_is_declared_once():
    assert list(PARAMETERS) == ["global_branch", "local_branch", "limit_distance", "group_size", "leak", "chunk_size",
                                "span", "block_size", "blocks_retrieved", "representatives", "step_size"]
    assert {name: (p.symbol, p.minimum) for name, p in PARAMETERS.items()} == {
        "global_branch": ("G", 0), "local_branch": ("L", 1), "limit_distance": ("D", 1), "group_size": ("g", 1),
        "leak": ("k", 1), "chunk_size": ("w", 1), "span": ("span", 4), "block_size": ("bs", 1),
        "blocks_retrieved": ("topk", 1), "representatives": ("rk", 1), "step_size": ("exc", 1)}
