"""experiments.train on a tiny repetitive corpus: loss goes down, resume is bit-exact, the output loads."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.converters.store import load_converted
from lminf_jax.converters.tokenizer import load_tokenizer
from lminf_jax.experiments import train as tr
from lminf_jax.experiments import train_presets as presets
from lminf_jax.models import registry
from lminf_jax.tasks import corpus

SEQ = 32
STEPS = 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    src = root / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.txt").write_text("the cat sat on the mat. " * 20 + f"file {i}\n")
    corpus.prepare(root / "data", str(src), vocab_size=300, held_out_percent=20, log=lambda m: None)
    return root / "data"


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset="llama-tiny", steps=STEPS, batch=8, seq_len=SEQ, lr=3e-3,
                warmup=3, checkpoint_every=10, eval_every=10, eval_windows=4, final_eval_windows=4, log_every=1)
    base.update(kw)
    return tr.TrainConfig(**base)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    model_dir = tr.train(_cfg(data, out), log=lambda m: None, progress=False)
    return out, model_dir


def test_windows_start_with_bos(data):
    stream = corpus.load_tokens(data, "train")
    w = tr.sample_windows(stream, 6, SEQ, seed=0, step=3)
    assert w.shape == (6, SEQ) and w.dtype == np.int32 and np.all(w[:, 0] == corpus.BOS_ID)
    np.testing.assert_array_equal(w, tr.sample_windows(stream, 6, SEQ, seed=0, step=3))
    assert not np.array_equal(w, tr.sample_windows(stream, 6, SEQ, seed=0, step=4))
    e = tr.eval_windows(corpus.load_tokens(data, "heldout"), 3, SEQ)
    assert np.all(e[:, 0] == corpus.BOS_ID)


def test_loss_decreases_and_outputs(full_run):
    out, model_dir = full_run
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS
    assert losses[-1] < 0.7 * losses[0], losses
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert held and held[-1] < losses[0]
    card = (model_dir / "model_card.md").read_text()
    assert "Parameters" in card and "Held-out loss" in card and f"{STEPS * 8 * SEQ:,} tokens seen" in card


def test_output_loads_and_runs(full_run, data):
    _, model_dir = full_run
    params, config, family_name = load_converted(model_dir)
    family = registry.family_for_config(config)
    assert family.name == family_name == "llama" and config["max_position_embeddings"] == SEQ
    model = family.model(family.config_from_hf(config))
    tok = load_tokenizer(model_dir)
    ids = [corpus.BOS_ID, *tok.encode("the cat sat on the mat. " * 6)][:SEQ]
    logits = model.forward(params, jnp.asarray([ids]))
    assert logits.shape == (1, len(ids), 300) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    accuracy = np.mean(np.asarray(jnp.argmax(logits[0, :-1], -1)) == np.asarray(ids[1:]))
    assert accuracy > 0.5  # it learned the repetitive text


def test_resume_is_bit_exact(full_run, data, tmp_path):
    out_full, model_dir = full_run
    out = tmp_path / "resumed"
    assert tr.train(_cfg(data, out), stop_after=13, log=lambda m: None, progress=False) is None
    assert not (out / "model").exists()
    logs = []
    resumed_dir = tr.train(_cfg(data, out), log=logs.append, progress=False)
    assert any("resumed" in m and "step 13" in m for m in logs)
    a, _, _ = load_converted(model_dir)
    b, _, _ = load_converted(resumed_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [json.loads(l)["loss"] for l in (out / "loss.jsonl").read_text().splitlines() if '"loss"' in l] == \
        [json.loads(l)["loss"] for l in (out_full / "loss.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.parametrize("preset", ["gptj-tiny", "mpt-tiny"])
def test_other_families_train_step_and_store(preset, tmp_path):
    config = presets.make_config(preset, 300, 16)
    family = registry.family_for_config(config)
    assert family.name == preset.split("-")[0]
    cfg = tr.TrainConfig("", "", preset=preset, steps=10, dtype="bf16", warmup=0)
    model, opt, train_step, _ = tr._compiled(json.dumps(config, sort_keys=True), cfg)
    params = family.init_params(model.config, jax.random.PRNGKey(0))
    state = opt.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 16)), jnp.int32).at[:, 0].set(1)
    new, state, loss, gnorm = train_step(params, state, tokens)
    assert np.isfinite(float(loss)) and float(gnorm) > 0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new))  # master params stay float32
    save = jax.tree.map(lambda a: a.astype(jnp.bfloat16), new)
    from lminf_jax.converters.store import save_converted
    save_converted(tmp_path / "m", save, config, family.name)
    loaded, config2, name = load_converted(tmp_path / "m")
    assert name == family.name and config2 == config
    logits = registry.family_for_config(config2).model(family.config_from_hf(config2)).forward(
        loaded, jnp.asarray([[1, 5, 7]]))
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bad_arguments(data, tmp_path, full_run, capsys):
    with pytest.raises(ValueError, match="steps"):
        tr.train(_cfg(data, tmp_path / "a", steps=0))
    with pytest.raises(ValueError, match="warmup"):
        tr.train(_cfg(data, tmp_path / "a", warmup=STEPS))
    with pytest.raises(ValueError, match="dtype"):
        tr.train(_cfg(data, tmp_path / "a", dtype="fp8"))
    with pytest.raises(FileNotFoundError, match="experiments.corpus"):
        tr.train(_cfg(tmp_path / "nodata", tmp_path / "a"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        tr.sample_windows(np.zeros(10, np.uint16), 2, 64, 0, 0)
    out_full, _ = full_run
    with pytest.raises(FileExistsError, match="already holds"):
        tr.train(_cfg(data, out_full))
    # A half-finished run refuses to continue with other settings.
    tr.train(_cfg(data, tmp_path / "b", steps=4, warmup=0), stop_after=1, log=lambda m: None, progress=False)
    with pytest.raises(ValueError, match=r"checkpoints/1 does not match this run: lr: checkpoint has 0.003, run "
                                         r"asks 0.01$"):
        tr.train(_cfg(data, tmp_path / "b", steps=4, warmup=0, lr=1e-2), log=lambda m: None, progress=False)
    with pytest.raises(SystemExit):
        tr.main(["--data", str(data), "--out", str(tmp_path / "c"), "--steps", "-1"])
    assert "steps must be >= 1" in capsys.readouterr().err


def test_fine_tuning_starts_from_a_model_and_mixes_in_passkey_and_ruler_windows(data, tmp_path, monkeypatch):
    quick = dict(steps=2, batch=2, seq_len=512, warmup=0, checkpoint_every=2, eval_every=2)
    base = tr.train(_cfg(data, tmp_path / "base", **quick), log=lambda m: None, progress=False)
    batches, ruler_batches = [], []
    real_windows, real_ruler = tr.training_windows, tr.TrainingMix.windows

    def spy(builder, rows, seq_len, rng, stream, bos_id):
        batches.append(real_windows(builder, rows, seq_len, rng, stream, bos_id))
        return batches[-1]

    def ruler_spy(mix, rows, rng, bos_id):
        ruler_batches.append(real_ruler(mix, rows, rng, bos_id))
        return ruler_batches[-1]

    monkeypatch.setattr(tr, "training_windows", spy)
    monkeypatch.setattr(tr.TrainingMix, "windows", ruler_spy)
    tuned = tr.train(_cfg(data, tmp_path / "tuned", init=str(base), passkey_fraction=0.5, ruler_fraction=0.5, **quick),
                     log=lambda m: None, progress=False)
    assert len(batches) == 2 and all(b.shape == (1, 512) for b in batches)  # one row of each batch of 2
    assert len(ruler_batches) == 2 and all(b.shape == (1, 512) for b in ruler_batches)
    assert all(corpus.EOS_ID in b[0] for b in ruler_batches)
    card = (tuned / "model_card.md").read_text()
    assert (f"Fine-tuning: started from `{base}`; 1 of 2 rows of each batch are passkey windows (tasks.passkey); "
            "1 of 2 rows are RULER instances with their answers (tasks.training_mix.TrainingMix) of niah_single_1, ") in card
    assert "; not cwe: its shortest instance with its answer needs more than 512 tokens" in card
    with pytest.raises(ValueError, match="is not a llama-tiny model"):
        tr.train(_cfg(data, tmp_path / "bad", init=str(base), **{**quick, "seq_len": 256}), log=lambda m: None,
                 progress=False)
    with pytest.raises(ValueError, match="passkey_fraction"):
        tr.train(_cfg(data, tmp_path / "bad2", passkey_fraction=1.5), log=lambda m: None, progress=False)
    with pytest.raises(ValueError, match="passkey_fraction 0.5 and ruler_fraction 0.75 together take more than the "
                                         "batch of 8 rows"):
        tr.train(_cfg(data, tmp_path / "bad3", passkey_fraction=0.5, ruler_fraction=0.75), log=lambda m: None,
                 progress=False)


def _same_params(a_dir, b_dir) -> bool:
    a, _, _ = load_converted(a_dir)
    b, _, _ = load_converted(b_dir)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _logged(out) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("heldout_loss"))
            for r in map(json.loads, (out / "loss.jsonl").read_text().splitlines())]


def test_a_kill_between_checkpoints_repeats_no_step_in_the_log(full_run, data, tmp_path, monkeypatch):
    out_full, model_dir = full_run
    real = tr.sample_windows

    def killed_at_step_13(stream, batch, seq_len, seed, step):
        if step == 13:
            raise KeyboardInterrupt("killed")
        return real(stream, batch, seq_len, seed, step)

    monkeypatch.setattr(tr, "sample_windows", killed_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        tr.train(_cfg(data, tmp_path), log=lambda m: None, progress=False)
    assert [s for s, loss, _ in _logged(tmp_path) if loss is not None][-1] == 13  # the last checkpoint is step 10
    monkeypatch.setattr(tr, "sample_windows", real)
    resumed = tr.train(_cfg(data, tmp_path), log=lambda m: None, progress=False)
    assert _logged(tmp_path) == _logged(out_full)  # steps 11-13 logged once, with the same numbers
    assert _same_params(resumed, model_dir)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(full_run, data, tmp_path, capsys):
    _, model_dir = full_run
    tr.train(_cfg(data, tmp_path), stop_after=13, log=lambda m: None, progress=False)  # checkpoints 10 and 13
    latest = tmp_path / "checkpoints" / "13"
    for path in (latest / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            data_bytes = bytearray(path.read_bytes())
            data_bytes[len(data_bytes) // 2] ^= 0x10
            path.write_bytes(bytes(data_bytes))
    logs = []
    resumed = tr.train(_cfg(data, tmp_path), log=logs.append, progress=False)
    assert f"warning: {latest} is damaged (" in capsys.readouterr().err
    assert any(m.endswith("at step 10") for m in logs)
    assert _same_params(resumed, model_dir)


def test_resume_with_other_data_is_refused_naming_the_field(data, tmp_path):
    tr.train(_cfg(data, tmp_path / "run", steps=4, warmup=0), stop_after=1, log=lambda m: None, progress=False)
    other = tmp_path / "other-data"  # the same files elsewhere, but other training tokens
    shutil.copytree(data, other)
    np.save(other / "train.npy", np.load(other / "train.npy")[::-1].copy())
    with pytest.raises(ValueError, match=r"checkpoints/1 does not match this run: data: checkpoint has sha256:\w+, "
                                         r"run asks sha256:\w+$"):  # data is its content: only that differs
        tr.train(_cfg(other, tmp_path / "run", steps=4, warmup=0), log=lambda m: None, progress=False)
