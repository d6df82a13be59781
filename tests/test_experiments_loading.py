"""experiments.loading: the method grammar of comparisons (mask + frequency method + factor)."""

from __future__ import annotations

import pytest

from experiments.loading import MethodChoice
from lminf_jax import SelfExtend, frequency_method
from lminf_jax.spec import KINDS


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
