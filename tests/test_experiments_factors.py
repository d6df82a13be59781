"""experiments.factors: the three factors end to end on a tiny random LLaMA, outputs checked."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny_checkpoint import PRETRAIN, make_model_dir, random_text

from lminf_jax.experiments import factors as cli


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("factors")
    model_dir = make_model_dir(root / "model")
    (root / "held.txt").write_text(random_text(9, 120))
    code = cli.main([str(model_dir), "--text", str(root / "held.txt"), "--multiple", "4", "--sequences", "2",
                     "--block", "16", "--out", str(root / "out")])
    assert code == 0
    return root / "out"


def load(outputs, stem):
    assert (outputs / f"{stem}.png").stat().st_size > 0
    return json.loads((outputs / f"{stem}.json").read_text())


def test_logits_by_distance(outputs):
    r = load(outputs, "factor1_logits")
    t = 4 * PRETRAIN
    assert r["settings"]["segment_length"] == t and r["settings"]["segments"] == 2
    assert r["rows"][-1] == t - 1 and len(r["rows"]) == cli.PROBED_QUERIES
    bounds = r["bucket_bounds"]
    assert bounds[0] == [0, 1] and bounds[-1][0] <= t - 1 < bounds[-1][1]
    vanilla, lm_inf = r["methods"]["vanilla"], r["methods"]["lm_infinite"]
    assert all(v is not None for v in vanilla["max_over_layers"])  # vanilla sees every distance
    sink_distances = {row - j for row in r["rows"] for j in range(10)}  # beyond the window only sinks j < G
    for (lo, hi), v in zip(bounds, lm_inf["max_over_layers"]):
        if hi <= PRETRAIN:
            assert v is not None, (lo, hi)
        elif lo >= PRETRAIN:
            assert (v is not None) == any(lo <= d < hi for d in sink_distances), (lo, hi)
    assert len(vanilla["per_layer"]) == 2 and all(len(x) == len(bounds) for x in vanilla["per_layer"])


def test_entropy_by_length(outputs):
    r = load(outputs, "factor2_entropy")
    lengths = r["lengths"]
    assert lengths[0] == PRETRAIN // 8 and lengths[-1] == 4 * PRETRAIN
    for name, res in r["methods"].items():
        for n, e, attended in zip(lengths, res["entropy"], res["attended"]):
            assert 0 <= e <= math.log(attended) + 1e-6
        assert len(res["per_layer"]) == 2
    assert r["methods"]["vanilla"]["attended"] == lengths  # the query at n - 1 attends n keys
    g = 10
    assert r["methods"]["lm_infinite"]["attended"] == [min(n, PRETRAIN) + max(0, min(g, n - PRETRAIN)) for n in lengths]


def test_starting_tokens(outputs):
    r = load(outputs, "factor3_sinks")
    assert r["positions"] == PRETRAIN and r["first_tokens"] == 10
    assert len(r["layers"]) == 3  # entering 2 layers + after the last
    for layer in r["layers"]:
        assert np.asarray(layer["pca"]).shape == (PRETRAIN, 2)
        assert 0 <= sum(layer["explained"]) <= 1 + 1e-9 and len(layer["first_distance"]) == 10
    assert list(r["ablation"]) == [f"G={g}" for g in cli.SINK_COUNTS] + ["vanilla"]
    for row in r["ablation"].values():
        assert row["nll"] > 0 and row["nll_beyond_l_train"] > 0
    assert r["ablation"]["G=0"]["nll"] != r["ablation"]["G=10"]["nll"]


def test_factors_under_other_methods(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    (tmp_path / "held.txt").write_text(random_text(9, 120))
    argv = [str(model_dir), "--text", str(tmp_path / "held.txt"), "--multiple", "4", "--sequences", "1",
            "--block", "16", "--no-plot", "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--factors", "logits", "entropy", "--methods", "vanilla", "pi@4", "yarn",
                            "self_extend"]) == 0
    logits = json.loads((tmp_path / "out" / "factor1_logits.json").read_text())["methods"]
    entropy = json.loads((tmp_path / "out" / "factor2_entropy.json").read_text())
    assert list(logits) == list(entropy["methods"]) == ["vanilla", "pi@4", "yarn", "self_extend"]
    assert logits["yarn"]["attention"] == "vanilla() + RoPE yarn x4"  # the factor T / L_train needs
    assert logits["pi@4"]["max_over_layers"] != logits["vanilla"]["max_over_layers"]
    for name in ("pi@4", "yarn", "self_extend"):  # no mask hides a key: every method attends all n
        assert entropy["methods"][name]["attended"] == entropy["lengths"]
    assert cli.main(argv + ["--factors", "sinks", "--methods", "yarn"]) == 1
    assert cli.main(argv + ["--factors", "logits", "--methods", "yarn@0"]) == 2  # refused while parsing
    assert cli.main(argv + ["--factors", "logits", "--methods", "yarn", "vanilla+yarn"]) == 1  # listed twice
