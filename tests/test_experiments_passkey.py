"""experiments.passkey: the evaluation end to end, its options and its checks before the weights are read."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tiny_checkpoint import PRETRAIN, make_model_dir

from lminf_jax.experiments import passkey as cli
from lminf_jax.experiments.loading import load_tokenizer_from
from lminf_jax.experiments.methods import ALL_TASK_METHODS, TASK_METHODS, task_method_names
from lminf_jax.experiments.shipped import SHIPPED_PASSKEY_MODEL
from lminf_jax.tasks.passkey import PasskeyBuilder
from lminf_jax import SelfExtend


def test_the_evaluation_runs_every_method_and_writes_answers(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m")
    tok = load_tokenizer_from(model_dir)
    b = PasskeyBuilder(tok)
    multiples = [m for m in (1, 2, 4) if m * PRETRAIN >= b.minimum_length][:2]
    assert multiples, "the tiny tokenizer makes prompts longer than the tiny model's window"
    out = tmp_path / "pk.json"
    methods = [*TASK_METHODS, "yarn", "self_extend@cover+pi@2", "xl3m"]  # the others: test_experiments_task_generation
    code = cli.main([str(model_dir), "--multiples", *map(str, multiples), "--depths", "0", "1", "--samples", "2",
                     "-G", "2", "--top-k-middle", "2", "--top-k-from-layer", "1", "--top-k-to-layer", "2",
                     "--methods", *methods,
                     "--out", str(out), "--plot", str(tmp_path / "pk.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out.read_text())
    lengths = [m * PRETRAIN for m in multiples]
    assert record["settings"]["lengths"] == lengths and list(record["methods"]) == methods
    for name, res in record["methods"].items():
        for n in lengths:
            rows = res["cells"][str(n)]
            assert len(rows) == 4 and {r["depth"] for r in rows} == {0.0, 1.0}
            for r in rows:
                assert len(r["key"]) == 5 and r["correct"] == (r["answer"] == r["key"])
                assert r["answer"] is None or r["answer"].isdigit()
            acc = record["accuracy"][name][str(n)]
            assert acc["all"] == np.mean([r["correct"] for r in rows]) and set(acc) == {"all", "0", "1"}
    attention = {name: res["attention"] for name, res in record["methods"].items()}
    assert all(a.endswith(f"top_k=2@{PRETRAIN // 2} layers[1,2))") for a in attention["lm_infinite_top_k"].values())
    assert {a for name in ("truncation", "vanilla", "xl3m") for a in attention[name].values()} == {"vanilla()"}
    assert [record["methods"]["yarn"]["rope_scaling"][str(n)]["factor"] for n in lengths] == multiples
    assert {s["factor"] for s in record["methods"]["self_extend@cover+pi@2"]["rope_scaling"].values()} == {2.0}
    # the group size each length needs (the neighbour window its default, L_train / 4)
    assert attention["self_extend@cover+pi@2"] == {
        str(n): SelfExtend(8, PRETRAIN // 4).covering(n, PRETRAIN).describe() for n in lengths}
    assert captured.out.splitlines()[0].split()[0] == "method" and (tmp_path / "pk.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["-G", "-1"], "argument -G/--global-branch: must lie in [0, 2**31 - 1], got -1"),
    (["--top-k-middle", "0"], "argument --top-k-middle: must lie in [1, 2**31 - 1], got 0"),
    (["--methods", "vanilla", "nope"], "argument --methods: method 'nope': 'nope' is not a mask method"),
    (["--methods", "dynamic_ntk@0.5"], "argument --methods: method 'dynamic_ntk@0.5': the factor after '@' must be "
                                       "a number >= 1"),
    (["--top-k-insert-at", str(2**31)], f"argument --top-k-insert-at: must lie in [0, 2**31 - 1], got {2**31}"),
    (["--out", "/proc/lminf-test/pk.json"], "argument --out: cannot write in /proc"),
])
def test_bad_options_fail_while_parsing(tmp_path, capsys, argv, message):
    assert cli.main([str(tmp_path / "no-model"), *argv]) == 2  # before the model directory is looked at
    assert f"error: {message}" in capsys.readouterr().err


def test_methods_are_checked_before_the_weights_are_read(tmp_path, capsys, monkeypatch):
    from lminf_jax.experiments.shipped import SHIPPED_MODEL

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the weights were read"))
    for methods, message in ((["yarn", "yarn"], "listed twice"), (["yarn@4", "vanilla+yarn@4.0"], "listed twice"),
                             (["all", "yarn"], "all stands alone")):
        assert cli.main([str(SHIPPED_MODEL), "--methods", *methods, "--out", str(tmp_path / "pk.json")]) == 1
        assert message in capsys.readouterr().err
    assert task_method_names(["all"]) == list(ALL_TASK_METHODS)


def test_top_k_from_a_layer_the_model_lacks_fails_before_the_weights_are_read(tmp_path, capsys, monkeypatch):
    from lminf_jax.experiments.shipped import SHIPPED_MODEL

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the options were checked")

    monkeypatch.setattr(cli, "load_model", no_weights)
    code = cli.main([str(SHIPPED_MODEL), "--top-k-from-layer", "99", "--out", str(tmp_path / "pk.json")])
    assert code == 1
    assert "error: top_k.from_layer is 99, but the model has 4 layers (0..3)" in capsys.readouterr().err


def test_the_shipped_passkey_model_is_the_shipped_model_fine_tuned():
    from lminf_jax.experiments.loading import load_config
    from lminf_jax.experiments.shipped import SHIPPED_MODEL

    tuned, base = SHIPPED_PASSKEY_MODEL, SHIPPED_MODEL
    assert load_config(tuned)[1] == load_config(base)[1]
    assert (tuned / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    run = json.loads((tuned / "training" / "run.json").read_text())["identity"]
    assert run["passkey_fraction"] == 0.5 and run["steps"] == 200
    assert "Fine-tuning: started from `experiments/shipped/llama-small-stdlib`" in (tuned / "model_card.md").read_text()
    assert cli.build_parser().parse_args([]).model_dir == str(tuned)


def test_a_length_too_large_for_memory_is_refused_before_prompts_or_weights(tmp_path, capsys, monkeypatch):
    import lminf_jax.cache
    from lminf_jax.experiments.shipped import SHIPPED_MODEL

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the weights were read"))
    monkeypatch.setattr(PasskeyBuilder, "prompt", lambda *a, **k: pytest.fail("a prompt was built"))
    out = ["--out", str(tmp_path / "pk.json"), "--top-k-from-layer", "1"]  # the shipped model has 4 layers
    # the run: the prompts alone would need ~5e17 bytes
    assert cli.main([str(SHIPPED_MODEL), "--multiples", "1", str(2**31 - 1), *out]) == 1
    assert re.search(r"^error: --multiples 2147483647 \(prompts of 1,099,511,627,264 tokens\): the prompts' token ids "
                     r"need at least [\d,]+ bytes \(20 prompts per length, .*\), more than the [\d,]+ bytes of host "
                     r"memory; lower --multiples, --samples or the number of --depths$", capsys.readouterr().err)
    # prompts that fit, but not vanilla's full cache (4 layers x 4 kv heads x 128 key + value dims x 2 bytes at least)
    monkeypatch.setattr(lminf_jax.cache, "host_memory", lambda: 10**9)
    monkeypatch.setattr(lminf_jax.cache, "available_memory", lambda: (10**9, "host memory"))
    assert cli.main([str(SHIPPED_MODEL), "--multiples", "1000", "--samples", "1", "--depths", "0", *out]) == 1
    assert capsys.readouterr().err == (
        "error: --multiples 1000 (prompts of 512,000 tokens): method vanilla: a full cache of capacity = 512008 slots "
        "needs 2,099,232,800 bytes (4 layers x batch 1 x 512008 slots x 4 kv heads x 128 key + value dims x 2 bytes, "
        "+ positions), more than the 1,000,000,000 bytes of host memory; lower capacity (the longest sequence it must "
        "hold) or the batch\n")
