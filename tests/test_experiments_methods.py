"""experiments.methods: the method grammar of comparisons (mask + frequency method + factor), and the
method options derived from the methods' declarations."""

from __future__ import annotations

import argparse

import pytest

from lminf_jax import LeakyReRoPE, LMInfinite, SelfExtend, StreamingLLM, TopK, frequency_method
from lminf_jax.experiments.methods import (
    MethodChoice, add_attention_args, method_spec, spec_from_args, spec_from_options,
)
from lminf_jax.method_parameters import PARAMETERS
from lminf_jax.spec import KINDS, METHODS


@pytest.mark.parametrize("text,choice,name", [
    ("lm_infinite", MethodChoice("lm_infinite"), "lm_infinite"),
    ("yarn", MethodChoice("vanilla", "yarn"), "yarn"),
    ("vanilla+yarn", MethodChoice("vanilla", "yarn"), "yarn"),
    ("pi@32", MethodChoice("vanilla", "pi", 32.0), "pi@32"),
    ("self_extend+ntk@2.5", MethodChoice("self_extend", "ntk", 2.5), "self_extend+ntk@2.5"),
    ("streaming_llm+dynamic_ntk", MethodChoice("streaming_llm", "dynamic_ntk"), "streaming_llm+dynamic_ntk"),
    ("self_extend@cover", MethodChoice("self_extend", cover=True), "self_extend@cover"),
    ("leaky_rerope@cover+yarn@4", MethodChoice("leaky_rerope", "yarn", 4.0, cover=True), "leaky_rerope@cover+yarn@4"),
])
def test_method_grammar_round_trips(text, choice, name):
    assert MethodChoice.parse(text) == choice and choice.name == name
    assert MethodChoice.parse(name) == choice


def test_every_mask_method_parses_alone():
    assert [MethodChoice.parse(kind) for kind in KINDS] == [MethodChoice(kind) for kind in KINDS]


def test_cover_chooses_the_mask_parameter_per_length():
    base = SelfExtend(8, 128)
    assert MethodChoice.parse("self_extend@cover").spec(base, 4096, 512) == base.covering(4096, 512) == SelfExtend(11, 128)
    assert MethodChoice.parse("self_extend+pi").spec(base, 4096, 512) == base


def test_factor_per_length_and_fixed():
    auto, fixed = MethodChoice.parse("yarn"), MethodChoice.parse("yarn@8")
    assert auto.frequencies(512, 512) == frequency_method("yarn", 1.0, 512)
    assert auto.frequencies(256, 512) == frequency_method("yarn", 1.0, 512)  # never below 1
    assert auto.frequencies(3000, 512) == frequency_method("yarn", 3000 / 512, 512)
    assert fixed.frequencies(1024, 512) == frequency_method("yarn", 8.0, 512)
    assert MethodChoice.parse("dynamic_ntk").frequencies(8192, 512) == frequency_method("dynamic_ntk", 1.0, 512)
    assert MethodChoice.parse("lm_infinite").frequencies(8192, 512) is None


@pytest.mark.parametrize("text,message", [
    ("nope", "'nope' is not a mask method (vanilla, lm_infinite"),
    ("nope@2", "'nope' is not a frequency method"),
    ("lm_infinite+", "nothing after '+'"),
    ("lm_infinite+vanilla", "'vanilla' is not a frequency method"),
    ("wide+yarn", "'wide' is not a mask method"),
    ("a+b+yarn", "'a+b' is not a mask method"),
    ("yarn@", "the factor after '@' must be a number >= 1, got ''"),
    ("yarn@0.9", "got '0.9'"),
    ("pi@inf", "got 'inf'"),
    ("pi@x2", "got 'x2'"),
    ("self_extend@4", "a mask method takes only '@cover'"),
    ("lm_infinite@cover", "lm_infinite has no parameter to choose per length (@cover applies to self_extend, "
                          "leaky_rerope)"),
    ("nope@cover+pi", "'nope' is not a mask method"),
])
def test_bad_methods_name_the_bad_part(text, message):
    with pytest.raises(ValueError) as e:
        MethodChoice.parse(text)
    assert str(e.value).startswith(f"method {text!r}: ") and message in str(e.value)


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_attention_args(parser)
    return parser.parse_args(argv)


def test_one_function_builds_the_spec_of_a_command_line_and_of_a_comparison():
    config = argparse.Namespace(pretraining_length=64, num_layers=2)
    assert spec_from_options("self_extend", {"group_size": 4}, config) == SelfExtend(4, 16)
    assert spec_from_options("leaky_rerope", {}, config) == LeakyReRoPE(32, LeakyReRoPE().leak)
    assert spec_from_args(_parsed(["--method", "self_extend", "--group-size", "4"]), config) == SelfExtend(4, 16)
    # a comparison applies each option to the methods that take it
    assert method_spec("self_extend", config, group_size=4, global_branch=3, leak=None) == SelfExtend(4, 16)
    assert method_spec("lm_infinite", config, group_size=4, global_branch=3) == LMInfinite(3, 64, 64)
    top_k = {"top_k_middle": 2}  # inserted at half the window, from TopK's first layer or the model's last
    assert spec_from_options("streaming_llm", {"local_branch": 32}, None, top_k) == \
        StreamingLLM(4, 32, top_k=TopK(2, 16, TopK().from_layer))
    assert spec_from_options("lm_infinite", {}, config, top_k) == LMInfinite(10, 64, top_k=TopK(2, 32, 1))
    assert spec_from_args(_parsed(["--top-k-middle", "2"]), config) == LMInfinite(10, 64, top_k=TopK(2, 32, 1))
    for make, message in [
        (lambda: spec_from_options("vanilla", {"local_branch": 2}), "-L/--local-branch is not used by --method vanilla"),
        (lambda: spec_from_options("self_extend", {}, None, method="self_extend+yarn@2"),
         "--method self_extend\\+yarn@2 needs -L/--local-branch"),
        (lambda: spec_from_options("sliding_window", {"local_branch": 8}, None, {"top_k_from_layer": 1}),
         "--top-k-from-layer needs --top-k-middle"),
        (lambda: method_spec("yarn"), "unknown method 'yarn'"),
        (lambda: method_spec("vanilla", wide=2), "unknown method parameter 'wide'"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()


def test_the_parameter_options_are_derived_from_the_declarations():
    parser = argparse.ArgumentParser()
    add_attention_args(parser)
    actions = {action.dest: action for action in parser._actions}
    for name, declared in PARAMETERS.items():
        long = "--" + name.replace("_", "-")
        assert actions[name].option_strings == ([f"-{declared.symbol}", long] if declared.short_flag else [long])
        assert actions[name].metavar == declared.symbol
        assert all(name in METHODS[method].OPTIONS for method in actions[name].help.split(":")[0].split(", "))
    assert [p for p, declared in PARAMETERS.items() if declared.short_flag] == [
        "global_branch", "local_branch", "limit_distance"]
    # each method's default as declared: its field's, or the rule it declares
    assert actions["global_branch"].help == (
        f"lm_infinite, lambda_mask, streaming_llm: sink tokens at the start (default: {LMInfinite().global_branch}; "
        f"streaming_llm: {StreamingLLM().global_branch}); infllm: InfLLM's initial tokens n_init (default: L_train / 32)")
    assert actions["local_branch"].help.endswith("self_extend: Self-Extend's neighbour window W (default: L_train / 4); "
                                                  "infllm: InfLLM's local window n_local (default: L_train / 2)")
    assert actions["limit_distance"].help.startswith("lm_infinite: distance the sinks are scored at (default: L); ")
    assert actions["group_size"].help == f"self_extend: Self-Extend's group size g (default: {SelfExtend().group_size})"
    assert actions["leak"].help.endswith(f"(default: {LeakyReRoPE().leak})")
