"""experiments.loading: the method grammar of comparisons (mask + frequency method + factor); a config
checked against its weights."""

from __future__ import annotations

import json
import time

import pytest
from conftest import TINY_MODELS, random_model
from test_converters_convert import write_hf_checkpoint

from lminf_jax.converters.store import save_converted
from lminf_jax.experiments.methods import MethodChoice
from lminf_jax.experiments.loading import load_config
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


def test_load_config_refuses_a_converted_config_its_params_contradict(tmp_path):
    """converted.json holds the config beside its params manifest: every size is compared, the layer count
    first, before anything is built from the config."""
    family, cfg, params = random_model("llama_gqa")
    out = save_converted(tmp_path / "converted", params, TINY_MODELS["llama_gqa"], family.name)
    assert load_config(out) == (family, cfg)
    meta_path = out / "converted.json"
    meta = json.loads(meta_path.read_text())
    for field, value, message in [
        ("num_hidden_layers", 10**9, f"config field 'num_hidden_layers' is 1,000,000,000, but {meta_path}'s params "
                                     "manifest holds 2 layers"),
        ("vocab_size", 10**9, f"{meta_path}'s params manifest does not hold the parameters of its config:\n"
                              "  mis-shaped (2):\n    model.embed_tokens.weight: the config gives (1000000000, 48), "
                              "the manifest (97, 48)\n"),
    ]:
        meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], field: value}}))
        with pytest.raises(ValueError) as info:
            load_config(out)
        assert str(info.value).startswith(message)


@pytest.mark.parametrize("name,layers", [("llama_gqa", 10**9), ("gemma2_window", 10**8)])
def test_load_config_refuses_a_hugging_face_config_its_weights_contradict(tmp_path, name, layers):
    write_hf_checkpoint(tmp_path, name)
    family, cfg = load_config(tmp_path)
    assert cfg.num_layers == TINY_MODELS[name]["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps({**TINY_MODELS[name], "num_hidden_layers": layers}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"config field 'num_hidden_layers' is {layers:,}, but checkpoint {tmp_path} "
                                         f"holds {cfg.num_layers} layers"):
        load_config(tmp_path)
    assert time.perf_counter() - start < 5  # 10**8+ layers built one by one would take minutes
