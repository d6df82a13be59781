"""experiments.task_generation: each generation-task method continues prompts as its definition says, on a tiny
model (prompts of two lengths in one batch), and RULER runs every new method end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from tiny_checkpoint import PRETRAIN, make_model_dir

from lminf_jax import AttentionCall, InfLLM, Vanilla
from lminf_jax.decoding import generate
from lminf_jax.entropy_cache import SirLLM, sirllm_generate
from lminf_jax.evaluation.xl3m import XL3M, key_context, model_entropy
from lminf_jax.experiments import ruler
from lminf_jax.experiments.loading import load_model
from lminf_jax.experiments.task_generation import PromptSettings, check_prompt_methods, generate_answers, truncated

NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("tasks") / "m")
    family, config, params = load_model(model_dir)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 97, n - 1).tolist()] for n in (3 * PRETRAIN + 5, 2 * PRETRAIN)]
    return model_dir, family, config, params, prompts


def _vanilla(family, config):
    return family.model(config, AttentionCall(Vanilla()))


def _rows(out) -> list[list[int]]:
    return [out.row(b) for b in range(len(out.lengths))]


def test_prompt_methods_are_their_definitions(tiny):
    _, family, config, params, prompts = tiny
    model = _vanilla(family, config)

    def plain(ids):
        longest = max(map(len, ids))
        return _rows(generate(model, params, ids, model.init_cache(len(ids), capacity=longest + NEW),
                              max_new_tokens=NEW))

    got = _rows(generate_answers("truncation", model, None, params, prompts, l_train=PRETRAIN, new_tokens=NEW))
    assert got == plain(truncated(prompts, PRETRAIN, NEW))
    assert [len(t) for t in truncated(prompts, PRETRAIN, NEW)] == [PRETRAIN - 1 - NEW + 1] * 2
    settings = XL3M.for_model(PRETRAIN, NEW)
    contexts = [key_context(t, model_entropy(model, params, settings), settings).tokens for t in prompts]
    assert all(len(c) <= PRETRAIN - NEW for c in contexts)
    got = _rows(generate_answers("xl3m", model, None, params, prompts, l_train=PRETRAIN, new_tokens=NEW))
    assert got == plain(contexts)
    # SirLLM with a field set over its defaults (--sirllm entropy=20): the policy the command builds
    policy = SirLLM.for_model(PRETRAIN, entropy=20)
    want, state = sirllm_generate(model, params, prompts, policy, positional=model.decoder().positional,
                                  max_new_tokens=NEW)
    settings = PromptSettings.parse({"sirllm": ["entropy=20"]}, ["sirllm"])
    got = generate_answers("sirllm", model, None, params, prompts, l_train=PRETRAIN, new_tokens=NEW, settings=settings)
    assert _rows(got) == _rows(want) and state.cache.slots == policy.size < len(prompts[0])
    assert settings.describe("sirllm", PRETRAIN, NEW) == dataclasses.asdict(policy) and policy.entropy == 20


def test_prompt_settings_are_checked_fields_over_the_defaults():
    settings = PromptSettings.parse({"sirllm": ["decay=0.5", "code_scores=true"], "xl3m": ["segment_length=12"]},
                                    ["sirllm", "xl3m"])
    assert settings.sirllm_policy(PRETRAIN) == SirLLM.for_model(PRETRAIN, decay=0.5, code_scores=True)
    xl3m = settings.xl3m_settings(PRETRAIN, NEW)
    assert (xl3m.segment_length, xl3m.overlap, xl3m.budget) == (12, 1, PRETRAIN - NEW)  # the overlap follows Ls
    assert PromptSettings.parse({"sirllm": None, "xl3m": None}, []) == PromptSettings()
    for given, methods, message in [
        ({"sirllm": ["window=3"]}, ["sirllm"], "FIELD one of sinks, recent"),
        ({"sirllm": ["entropy"]}, ["sirllm"], "takes FIELD=VALUE"),
        ({"sirllm": ["entropy=many"]}, ["sirllm"], "--sirllm entropy must be an int"),
        ({"sirllm": ["code_scores=yes"]}, ["sirllm"], "true or false"),
        ({"xl3m": ["segment_length=12"]}, ["sirllm"], "xl3m is not among --methods"),
    ]:
        with pytest.raises(ValueError, match=message):
            PromptSettings.parse(given, methods)
    with pytest.raises(ValueError, match="sirllm with the answer .*turn"):  # legal fields, illegal together
        check_prompt_methods(["sirllm"], PRETRAIN, NEW, "the answer",
                             PromptSettings.parse({"sirllm": ["turn=1000"]}, ["sirllm"]))


def test_a_retrieval_method_answers_each_row_as_alone(tiny):
    """InfLLM's steps are cut at each call's ends: its prompt runs in one call, so a row's answer does not
    depend on the other rows' lengths (the padding)."""
    _, family, config, params, prompts = tiny
    spec = InfLLM(global_branch=2, local_branch=16, block_size=4, blocks_retrieved=2, step_size=8)
    model = family.model(config, AttentionCall(spec))
    both = _rows(generate_answers("infllm", model, None, params, prompts, l_train=PRETRAIN, new_tokens=NEW))
    alone = [_rows(generate_answers("infllm", model, None, params, [p], l_train=PRETRAIN, new_tokens=NEW))[0]
             for p in prompts]
    assert both == alone


def test_prompt_methods_that_cannot_fit_are_refused(tiny):
    with pytest.raises(ValueError, match="truncation keeps"):
        check_prompt_methods(["truncation"], 8, 7, "the answer")
    with pytest.raises(ValueError, match="xl3m with the answer"):
        check_prompt_methods(["xl3m"], PRETRAIN, PRETRAIN - 8, "the answer")
    check_prompt_methods(["vanilla", "truncation", "xl3m", "sirllm"], PRETRAIN, NEW, "the answer")


def test_ruler_runs_the_new_methods(tiny, tmp_path, capsys):
    model_dir = tiny[0]
    methods = ["infllm", "xl3m"]  # a retrieval method and a prompt method (sirllm's answers: above)
    out = tmp_path / "r.json"
    assert ruler.main([str(model_dir), "--methods", *methods, "--tasks", "vt", "--lengths", "800",
                       "--depths", "0.5", "--samples", "1", "--xl3m", "segment_length=12", "--out", str(out),
                       "--no-plot"]) == 0
    record = json.loads(out.read_text())
    assert record["settings"]["prompt_settings"] == {"sirllm": {}, "xl3m": {"segment_length": 12}}
    assert record["methods"]["xl3m"]["cells"]["vt@800"]["settings"]["segment_length"] == 12
    assert list(record["methods"]) == methods
    for name in methods:
        (cell,) = record["methods"][name]["cells"].values()
        assert cell["predictions"][0]["needles_visible"] is None  # chosen when the method runs
    assert "infllm(" in record["methods"]["infllm"]["cells"]["vt@800"]["attention"]
    assert "average" in capsys.readouterr().out
