"""experiments.perplexity: the main job's code path, the tiled design against direct scoring, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from multidevice import run_on_devices
from tiny_checkpoint import PRETRAIN, make_model_dir, random_text

import lminf_jax.evaluation.perplexity as evaluation
from lminf_jax.converters.store import load_converted, save_converted
from lminf_jax.experiments import perplexity as cli
from lminf_jax.experiments import perplexity_report
from lminf_jax.experiments.loading import load_model, load_tokenizer_from
from lminf_jax.experiments.shipped import SHIPPED_MODEL
from lminf_jax import AttentionSpec, LMInfinite, SelfExtend, SlidingWindow, Vanilla, frequency_method
from lminf_jax import AttentionCall


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("perplexity"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held.txt"
    path.write_text(random_text(5, 160))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_main_job_path_on_the_shipped_model(tmp_path, capsys):
    """The README's main job (shipped model, held-out stdlib, vanilla vs LM-Infinite), at two
    short lengths and one segment so that it runs in seconds."""
    out = tmp_path / "r" / "ppl.json"
    code, stdout, stderr = run(["--multiples", "1", "2", "--sequences", "1", "--out", str(out),
                                "--plot", str(tmp_path / "r" / "ppl.png"), "--no-progress"], capsys)
    assert code == 0, stderr
    record = json.loads(out.read_text())
    s = record["settings"]
    assert Path(s["model"]) == SHIPPED_MODEL and s["family"] == "llama" and s["l_train"] == 512
    assert s["lengths"] == [512, 1024] and s["segments"] == 1 and s["segment_tokens"] == 1023 and s["bos_id"] == 1
    assert s["source"]["source"] == "stdlib" and s["source"]["documents"] > 10 and s["text_tokens"] > 100_000
    assert list(record["methods"]) == ["vanilla", "lm_infinite"]
    for name, res in record["methods"].items():
        short, full = res["lengths"]
        assert (short["length"], short["sequences"], short["tokens"]) == (512, 2, 1022)
        assert (full["length"], full["sequences"], full["tokens"]) == (1024, 1, 1023)
        for point in (short, full):
            assert 1 < point["ppl"] < 4096 and point["ppl"] == pytest.approx(math.exp(point["nll"]))
            assert point["segment_ppl"] == [pytest.approx(point["ppl"])]
        assert res["prefix_ppl"][-1] == pytest.approx(full["ppl"])
        assert sum(b["count"] for b in res["buckets"]) == 1023
        assert res["attention"]["kind"] == name and res["seconds"] > 0
    # within the pretraining length the two masks are the same: equal perplexity
    vanilla, lm_inf = (record["methods"][m]["lengths"][0]["ppl"] for m in ("vanilla", "lm_infinite"))
    assert lm_inf == pytest.approx(vanilla, rel=1e-4)
    lines = stdout.splitlines()
    assert lines[0].split() == ["method", "512", "1,024"] and lines[1].split() == ["(x", "L_train)", "1", "2"]
    assert lines[2].split()[0] == "vanilla" and lines[3].split()[0] == "lm_infinite"
    assert "lm_infinite: perplexity at 2 x L_train (1,024) / at L_train (512)" in stdout
    assert stdout.rstrip().endswith(f"wrote {out} and {tmp_path / 'r' / 'ppl.png'}")
    assert (tmp_path / "r" / "ppl.png").stat().st_size > 0
    assert not (tmp_path / "r" / "ppl.json.parts").exists()


def test_a_forward_pass_holds_no_more_rows_than_the_length_has():
    """--batch-tokens caps the rows per call; a short evaluation is not padded up to the cap (the
    main job's one 1,024-token tile was padded to 16 rows), except to split over the data axis."""
    assert cli.rows_per_call(16384, 1, 1024, None) == 1
    assert cli.rows_per_call(16384, 100, 512, None) == 32
    assert cli.rows_per_call(100, 5, 512, None) == 1
    data4 = SimpleNamespace(size={"data": 4}.__getitem__)
    assert cli.rows_per_call(16384, 5, 512, data4) == 8 and cli.rows_per_call(1024, 5, 512, data4) == 2


def direct_nll(model_dir: Path, tokens: np.ndarray, spec: AttentionSpec, frequencies=None) -> np.ndarray:
    """Scores ``(R, n - 1)`` from one forward pass per row and a float64 log-softmax."""
    family, cfg, params = load_model(model_dir)
    model = family.model(cfg, AttentionCall(spec, frequencies=frequencies))
    logits = np.asarray(model.forward(params, jnp.asarray(tokens, jnp.int32)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def test_every_length_scores_the_same_text(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    # each way a method reaches the forward pass: masks (sinks and global positions, a window, grouped positions,
    # a covering choice), frequencies (per length, combined with a mask, static, following the length), a
    # retrieval method (LongHeads runs as InfLLM does) and a cache policy; lambda_mask, distance_limit,
    # streaming_llm and leaky_rerope take lm_infinite's path with other declarations
    methods = ["vanilla", "lm_infinite", "sliding_window", "self_extend", "infllm", "yarn", "lm_infinite+pi@4", "ntk",
               "dynamic_ntk", "self_extend@cover", "sirllm"]
    code, stdout, stderr = run([str(model_dir), "--text", str(text_file), "--multiples", "1", "4",
                                "--sequences", "2", "--methods", *methods, "-G", "2", "--batch-tokens", "200",
                                "--block", "16", "--out", str(out), "--no-plot", "--no-progress"], capsys)
    assert code == 0, stderr
    record = json.loads(out.read_text())
    tok = load_tokenizer_from(model_dir)
    stream = np.asarray([tok.bos_id, *tok.encode(text_file.read_text())], np.int32)
    longest = 4 * PRETRAIN
    segments = evaluation.text_segments(stream, 2, longest - 1)
    assert record["settings"]["text_tokens"] == stream.size and record["settings"]["segment_tokens"] == longest - 1
    assert list(record["methods"]) == methods
    specs = {"vanilla": (Vanilla(), None), "lm_infinite": (LMInfinite(2, PRETRAIN), None),
             "sliding_window": (SlidingWindow(PRETRAIN), None),
             # the factor each length needs: 4 at the longest length (and 1, the model's own RoPE, at L_train)
             "yarn": (Vanilla(), frequency_method("yarn", 4.0, PRETRAIN)),
             "lm_infinite+pi@4": (LMInfinite(2, PRETRAIN), frequency_method("pi", 4.0, PRETRAIN)),
             # the smallest group size keeping every distance below L_train at the longest length
             "self_extend@cover": (SelfExtend(8, PRETRAIN // 4).covering(longest, PRETRAIN), None)}
    for name, (spec, frequencies) in specs.items():
        res = record["methods"][name]
        assert res["lengths"][1]["attention"] == spec.describe() and res["attention"]["cover"] == name.endswith("@cover")
        assert [point["length"] for point in res["lengths"]] == [PRETRAIN, longest]
        for point, n in zip(res["lengths"], (PRETRAIN, longest)):
            if name != "lm_infinite" and n != longest:
                continue  # every length of one method, every method at one length: each forward compiles anew
            tiles = evaluation.tile_segments(segments, n, tok.bos_id)
            nll = direct_nll(model_dir, tiles, spec, frequencies)
            assert point["length"] == n and point["sequences"] == tiles.shape[0] and point["tokens"] == nll.size
            assert point["nll"] == pytest.approx(nll.mean(), abs=2e-5)
            assert point["segment_ppl"] == pytest.approx([math.exp(v) for v in nll.reshape(2, -1).mean(1)], rel=1e-4)
    # SirLLM: every token's surprisal as its cache streams the tiles, as the library computes it
    from lminf_jax.entropy_cache import SirLLM, sirllm_surprisal
    from lminf_jax.experiments.loading import load_model

    policy = SirLLM.for_model(PRETRAIN)
    family, config, params = load_model(model_dir)
    vanilla = family.model(config)
    tiles = evaluation.tile_segments(segments, longest, tok.bos_id)
    want = sirllm_surprisal(vanilla, params, tiles, policy, positional=vanilla.decoder().positional,
                            cache=vanilla.init_cache(tiles.shape[0], capacity=policy.size))
    sirllm = record["methods"]["sirllm"]
    assert sirllm["lengths"][1]["nll"] == pytest.approx(want.mean(), abs=2e-5)
    assert sirllm["attention"] == dataclasses.asdict(policy) and sirllm["lengths"][1]["farthest_distance"] == 51
    assert record["methods"]["yarn"]["lengths"][0]["rope_scaling"]["factor"] == 1.0
    assert record["methods"]["yarn"]["attention"]["factor"] == "per length"
    assert record["methods"]["lm_infinite+pi@4"]["attention"]["factor"] == 4.0
    # dynamic NTK (factor 1) in one forward over n tokens is static NTK at n / L_train
    assert record["methods"]["dynamic_ntk"]["lengths"][1]["nll"] == record["methods"]["ntk"]["lengths"][1]["nll"]
    # costs at the longest length (4 x 64 = 256 tokens, queries at positions 0..254), counted by hand
    at = {name: res["lengths"][1] for name, res in record["methods"].items()}
    assert at["vanilla"]["attended_keys"] == 128.0  # mean of i + 1
    assert at["lm_infinite"]["attended_keys"] == (sum(range(1, 65)) + 65 + 66 * 190) / 255
    assert at["sliding_window"]["attended_keys"] == (sum(range(1, 65)) + 64 * 191) / 255
    # the farthest distance scored: 255 unbounded, D = 64 for the sinks, (255 // g + W - W / g) grouped
    farthest = {name: p["farthest_distance"] for name, p in at.items()}
    assert (farthest["vanilla"], farthest["lm_infinite"], farthest["self_extend"]) == (255, 64, 255 // 8 + 16 - 2)
    cfg = json.loads((model_dir / "converted.json").read_text())["config"]
    kv_dims = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    per_slot = cfg["num_hidden_layers"] * kv_dims * 2 * 4 + 4  # fp32 keys + values, int32 position
    assert at["vanilla"]["cache_bytes"] == per_slot * longest and at["yarn"]["cache_bytes_per_token"] == per_slot
    assert at["lm_infinite"]["cache_bytes"] == per_slot * (2 + PRETRAIN)
    assert f"{per_slot * (2 + PRETRAIN) / longest:,.0f}" in next(
        line for line in stdout.splitlines()[4 + len(methods):] if line.startswith("lm_infinite "))
    # the table's rows are the JSON's numbers
    row = next(line for line in stdout.splitlines() if line.startswith("lm_infinite"))
    assert [float(v) for v in row.split()[1:]] == pytest.approx(
        [p["ppl"] for p in record["methods"]["lm_infinite"]["lengths"]], abs=6e-3)


def test_an_interrupted_run_resumes_without_recomputing(model_dir, text_file, tmp_path, capsys, monkeypatch):
    argv = [str(model_dir), "--text", str(text_file), "--multiples", "1", "2", "--sequences", "2",
            "--batch-tokens", "64", "--no-plot", "--no-progress"]
    assert run(argv + ["--out", str(tmp_path / "whole.json")], capsys)[0] == 0
    real, calls = evaluation.sequence_nll, []

    def counting(*args):
        calls.append(1)
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(evaluation, "sequence_nll", counting)
    out = tmp_path / "r.json"
    interrupt_after = 5
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--out", str(out)])
    assert len(list((tmp_path / "r.json.parts").glob("*/*.npy"))) == 5 and not out.exists()
    calls.clear()
    interrupt_after = None
    assert run(argv + ["--out", str(out)], capsys)[0] == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads(out.read_text())
    # --batch-tokens 64: one tile per call, so the rerun computes every tile but the 5 saved ones
    assert len(calls) == sum(p["sequences"] for m in whole["methods"].values() for p in m["lengths"]) - 5
    for name in whole["methods"]:
        assert resumed["methods"][name]["lengths"] == whole["methods"][name]["lengths"]
    assert not (tmp_path / "r.json.parts").exists()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "yarn@4", "vanilla+yarn@4.0"], "listed twice"),
    (["--methods", "all", "yarn"], "all stands alone"),
    (["--methods", "vanilla", "vanilla"], "listed twice"),
    (["--sequences", "50"], "50 segment(s) of 255 tokens need"),
    (["--multiples", "1", "1"], "--multiples must be distinct"),
])
def test_bad_options_name_what_is_wrong(model_dir, text_file, tmp_path, capsys, extra, message):
    code, _, stderr = run([str(model_dir), "--text", str(text_file), "--multiples", "1", "4",
                           "--out", str(tmp_path / "x.json"), "--no-plot", "--no-progress", *extra], capsys)
    assert code == 1 and message in stderr


@pytest.mark.parametrize("extra, message", [
    (["--batch-tokens", "0"], "argument --batch-tokens: must lie in [1, 2**31 - 1], got 0"),
    (["-L", "0"], "argument -L/--local-branch: must lie in [1, 2**31 - 1], got 0"),
    (["-D", "4294967808"], "argument -D/--limit-distance: must lie in [1, 2**31 - 1], got 4294967808"),
    (["--out", "/proc/lminf-test/x.json"], "argument --out: cannot write in /proc"),
    (["--plot", "{tmp}"], "argument --plot: {tmp} is a directory, not a file"),
    (["--methods", "vanilla", "nope"], "argument --methods: method 'nope': 'nope' is not a mask method (vanilla, "
                                       "lm_infinite"),
    (["--methods", "lm_infinite+ntk_by_parts"], "argument --methods: method 'lm_infinite+ntk_by_parts': "
                                                "'ntk_by_parts' is not a frequency method (pi, ntk"),
    (["--methods", "windowed+yarn"], "argument --methods: method 'windowed+yarn': 'windowed' is not a mask method"),
    (["--methods", "yarn@0.5"], "argument --methods: method 'yarn@0.5': the factor after '@' must be a number >= 1, "
                                "got '0.5'"),
    (["--methods", "pi@nan"], "argument --methods: method 'pi@nan': the factor after '@' must be a number >= 1"),
    (["--out", "{tmp}/r.png"], "--plot {tmp}/r.png is the result file {tmp}/r.png"),
])
def test_bad_values_fail_while_parsing_before_any_work(tmp_path, capsys, extra, message):
    extra = [a.format(tmp=tmp_path) for a in extra]
    code, _, stderr = run([str(tmp_path / "no-model"), "--multiples", "1", "4", "--no-progress", *extra], capsys)
    assert code == 2 and f"error: {message.format(tmp=tmp_path)}" in stderr, stderr


def test_token_ids_outside_the_vocabulary_are_refused(model_dir, tmp_path, capsys):
    np.save(tmp_path / "t.npy", np.full(300, 5000, np.int32))
    code, _, stderr = run([str(model_dir), "--tokens", str(tmp_path / "t.npy"), "--multiples", "1",
                           "--out", str(tmp_path / "x.json"), "--no-plot"], capsys)
    assert code == 1 and "token ids must lie in [0, " in stderr


def test_a_saved_result_is_shown_and_drawn_again(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    code, first, stderr = run([str(model_dir), "--text", str(text_file), "--multiples", "1", "2",
                               "--out", str(out), "--no-plot", "--no-progress"], capsys)
    assert code == 0, stderr
    code, again, stderr = run(["--from-json", str(out), "--plot", str(tmp_path / "again.png")], capsys)
    assert code == 0, stderr
    assert again.splitlines()[:-1] == first.splitlines()[:-1]  # same table and ratios
    assert (tmp_path / "again.png").stat().st_size > 0
    assert run(["--from-json", str(out)], capsys)[0] == 0  # the plot beside the result, as its run draws it
    assert (tmp_path / "ppl.png").stat().st_size > 0 and not (tmp_path / "perplexity.png").exists()
    (tmp_path / "other.json").write_text(json.dumps({"tokens": 3}))
    code, _, stderr = run(["--from-json", str(tmp_path / "other.json")], capsys)
    assert code == 1 and "is not a result of experiments.perplexity" in stderr


SHARDED_SCRIPT = r"""
import json, sys
from lminf_jax.experiments import perplexity
code = perplexity.main(sys.argv[1:])
print("RESULT " + json.dumps({"code": code}))
"""


def test_context_parallel_run_on_8_devices_gives_the_one_device_numbers(model_dir, text_file, tmp_path, capsys):
    """With several devices every sequence is split over them (default --mesh seq=-1,
    context-parallel LM-Infinite; XLA gathers keys for vanilla) and scores what one device scores."""
    common = [str(model_dir), "--text", str(text_file), "--multiples", "1", "4", "--sequences", "2",
              "-G", "2", "-L", "16", "--block", "16", "--no-plot", "--no-progress"]
    code, _, stderr = run([*common, "--out", str(tmp_path / "one.json")], capsys)
    assert code == 0, stderr
    assert run_on_devices(SHARDED_SCRIPT, *common, "--out", str(tmp_path / "eight.json"))["code"] == 0
    one, eight = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "eight"))
    assert one["settings"]["devices"] == "1 device"
    assert eight["settings"]["devices"].startswith("mesh data=1 x seq=8 x model=1 (8 cpu devices); 0/")
    for name in ("vanilla", "lm_infinite"):
        for a, b in zip(one["methods"][name]["lengths"], eight["methods"][name]["lengths"], strict=True):
            assert a["tokens"] == b["tokens"] and b["nll"] == pytest.approx(a["nll"], rel=1e-5), (name, a, b)


def test_saved_parts_are_verified_and_tied_to_the_params(model_dir, text_file, tmp_path, capsys, monkeypatch):
    """A damaged part is scored again (with a warning); parts of other params at the same path are not used."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    argv = [str(model), "--text", str(text_file), "--multiples", "1", "--sequences", "4", "--methods", "lm_infinite",
            "--batch-tokens", "64", "--no-plot", "--no-progress", "--out", str(tmp_path / "r.json")]
    assert run(argv[:-1] + [str(tmp_path / "whole.json")], capsys)[0] == 0  # 4 tiles, one per call
    real, calls, stop = evaluation.sequence_nll, [], [2]

    def counting(*args):
        calls.append(1)
        if stop and len(calls) > stop[0]:
            raise KeyboardInterrupt
        return real(*args)

    def rerun() -> str:
        calls.clear()
        stop.clear()
        code, _, stderr = run(argv, capsys)
        assert code == 0, stderr
        return stderr

    monkeypatch.setattr(evaluation, "sequence_nll", counting)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    part = sorted((tmp_path / "r.json.parts").glob("*/*.npy"))[1]
    data = bytearray(part.read_bytes())
    data[-3] ^= 0x40  # one float of the scores
    part.write_bytes(bytes(data))
    assert f"warning: {part} is damaged (its bytes do not match the checksum in its name); scoring that batch " \
           "again" in rerun()
    assert len(calls) == 3  # 2 saved, 1 of them damaged
    whole = json.loads((tmp_path / "whole.json").read_text())["methods"]["lm_infinite"]["lengths"]
    assert json.loads((tmp_path / "r.json").read_text())["methods"]["lm_infinite"]["lengths"] == whole

    calls.clear()
    stop.append(2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    params, config, family = load_converted(model)  # retrained: other params at the same path
    shutil.rmtree(model / "params")
    (model / "converted.json").unlink()
    save_converted(model, jax.tree.map(lambda x: x * 1.5, params), config, family)
    rerun()
    assert len(calls) == 4  # nothing of the other params reused


def test_nan_weights_show_nan_and_name_the_tensor(model_dir, text_file, tmp_path, capsys):
    """NaN weights: the table says nan (not inf) and the warning names the tensor that holds them."""
    params, config, family = load_converted(model_dir)
    name = "model.layers.mlp.down_proj.weight"
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(params, sep=".").items()}
    flat[name].flat[7] = np.nan
    model = tmp_path / "nan-model"
    save_converted(model, traverse_util.unflatten_dict(flat, sep="."), config, family)
    shutil.copy(model_dir / "tokenizer.model", model / "tokenizer.model")
    out = tmp_path / "r.json"
    code, stdout, stderr = run([str(model), "--text", str(text_file), "--multiples", "1", "--sequences", "1",
                                "--methods", "vanilla", "--no-plot", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, stderr
    row = next(line for line in stdout.splitlines() if line.startswith("vanilla"))
    assert row.split()[1:] == ["nan"]
    record = json.loads(out.read_text())
    assert record["methods"]["vanilla"]["lengths"][0]["nan_scores"] > 0
    assert f"{name} (1 values)" in record["settings"]["nan_origin"] and record["settings"]["nan_origin"] in stderr
    assert perplexity_report._ppl_text({"ppl": None, "nan_scores": 0}) == "inf"  # an overflow, not a NaN
