"""streaming_nll: exactness against a direct computation, chunking, checkpoint/resume, buckets."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.evaluation import streaming
from lminf_jax.evaluation.buckets import PositionBuckets
from lminf_jax.logprobs import token_scores
from lminf_jax.evaluation.streaming import StreamResult, streaming_nll

V, D, F = 13, 6, 3
DECAY = 0.9
FREQS = np.array([0.05, 0.31, 1.7])


@dataclasses.dataclass(frozen=True)
class ToyStep:
    """logits[p] = h[p] @ out + sin(p * FREQS) @ pos + (n[p] mod 5) * bias, where
    h[p] = DECAY * h[p-1] + emb[token[p]] and n counts the tokens seen: both live in the cache
    (float32 and int32 leaves), so a wrong restore or position offset changes every score.
    Position -1 (padding) leaves the cache untouched."""

    decay: float = DECAY

    def __call__(self, params, tokens, positions, cache):
        def one(carry, xs):
            h, n = carry
            tok, pos = xs
            live = pos >= 0
            h = jnp.where(live[:, None], self.decay * h + params["emb"][tok], h)
            n = n + live.astype(jnp.int32)
            angles = pos.astype(jnp.float32)[:, None] * jnp.asarray(FREQS, jnp.float32)
            count_term = (n % 5).astype(jnp.float32)[:, None] * params["bias"]
            logits = h @ params["out"] + jnp.sin(angles) @ params["pos"] + count_term
            return (h, n), logits

        (h, n), logits = jax.lax.scan(one, (cache["h"], cache["n"]), (tokens.T, positions.T))
        return jnp.transpose(logits, (1, 0, 2)), {"h": h, "n": n}


STEP = ToyStep()


def toy_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "out": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
        "pos": jnp.asarray(rng.normal(size=(F, V)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(V,)) * 0.3, jnp.float32),
    }


def empty_cache(batch):
    return {"h": jnp.zeros((batch, D), jnp.float32), "n": jnp.zeros((batch,), jnp.int32)}


def stream(n, batch=None, seed=1):
    shape = (n,) if batch is None else (batch, n)
    return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int64)


def direct_nll(params, tokens):
    """Per-token NLL (N-1,) of one stream, token by token in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h, out = np.zeros(D), []
    for i in range(len(tokens) - 1):
        h = DECAY * h + p["emb"][tokens[i]]
        logits = h @ p["out"] + np.sin(i * FREQS) @ p["pos"] + ((i + 1) % 5) * p["bias"]
        lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        out.append(lse - logits[tokens[i + 1]])
    return np.array(out)


def run(tokens, chunk, **kw):
    batch = 1 if tokens.ndim == 1 else tokens.shape[0]
    kw.setdefault("progress", False)
    return streaming_nll(STEP, toy_params(), tokens, empty_cache(batch), chunk=chunk, **kw)


def same_science(a: StreamResult, b: StreamResult):
    """Exact (==) equality of everything measured (not the timings)."""
    assert a.tokens == b.tokens and a.positions == b.positions and a.complete == b.complete
    assert a.nll == b.nll and a.ppl == b.ppl
    assert a.buckets == b.buckets
    assert a.stream_nll == b.stream_nll
    for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----- exactness ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [None, 2])
def test_matches_direct_computation_with_partial_last_chunk(batch):
    n, chunk = 301, 32  # 300 scores: 9 full chunks and one of 12
    tokens = stream(n, batch)
    res = run(tokens, chunk)
    rows = tokens[None] if batch is None else tokens
    want = np.stack([direct_nll(toy_params(), r) for r in rows])  # (B, N-1)
    assert res.complete and res.tokens == want.size and res.positions == n - 1 and res.length == n
    np.testing.assert_allclose(res.nll, want.mean(), rtol=1e-5)
    np.testing.assert_allclose(res.ppl, math.exp(want.mean()), rtol=1e-5)
    np.testing.assert_allclose(res.stream_nll, want.mean(axis=1), rtol=1e-5)
    ids = PositionBuckets().index(np.arange(n - 1))
    assert [(r.lo, r.hi) for r in res.buckets] == [tuple(map(int, PositionBuckets().bounds(i))) for i in np.unique(ids)]
    for row, i in zip(res.buckets, np.unique(ids)):
        sel = want[:, ids == i]
        assert row.count == sel.size
        np.testing.assert_allclose(row.nll, sel.mean(), rtol=1e-5)
    assert sum(r.count for r in res.buckets) == res.tokens


@dataclasses.dataclass(frozen=True)
class ScoringToyStep(ToyStep):
    """`ToyStep` offering ``score_step``, and a logits step that must not run."""

    def __call__(self, params, tokens, positions, cache):
        raise AssertionError("streaming_nll ran the logits step of a step that scores")

    def score_step(self, params, tokens, positions, cache, targets):
        logits, cache = ToyStep.__call__(self, params, tokens, positions, cache)
        return token_scores(logits, targets), cache


def test_a_step_offering_score_step_is_scored_through_it_exactly():
    tokens = stream(301, 2, seed=5)
    scored = streaming_nll(ScoringToyStep(), toy_params(), tokens, empty_cache(2), chunk=32, progress=False)
    same_science(scored, run(tokens, 32))


def test_independent_of_chunk_size_and_memmap_input(tmp_path):
    tokens = stream(200, 2, seed=3)
    base = run(tokens, 64)
    for chunk in (1, 7, 199, 500):  # 500: a single chunk, mostly padding
        other = run(tokens, chunk)
        assert other.tokens == base.tokens and [r.count for r in other.buckets] == [r.count for r in base.buckets]
        np.testing.assert_allclose(other.nll, base.nll, rtol=1e-6)
        np.testing.assert_allclose([r.nll for r in other.buckets], [r.nll for r in base.buckets], rtol=1e-5)
        np.testing.assert_allclose(other.stream_nll, base.stream_nll, rtol=1e-6)
    np.save(tmp_path / "tokens.npy", tokens.astype(np.uint16))
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    same_science(run(mapped, 64), base)


def test_cache_shapes_and_dtypes_are_constant():
    cache = empty_cache(2)
    res = streaming_nll(STEP, toy_params(), stream(150, 2), cache, chunk=16, progress=False)
    assert jax.tree.structure(res.cache) == jax.tree.structure(cache)
    def shapes(tree):
        return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

    assert shapes(res.cache) == shapes(cache)
    assert not any(x.is_deleted() for x in jax.tree.leaves(cache))  # the caller's cache is not donated
    np.testing.assert_array_equal(np.asarray(res.cache["n"]), [149, 149])  # padding slots were not counted


# ----- checkpoints --------------------------------------------------------------------------


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    tokens = stream(301, 2, seed=4)  # 19 chunks of 16
    whole = run(tokens, 16)
    part = run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=3, max_chunks=7)
    assert not part.complete and part.positions == 7 * 16 and part.tokens == 2 * 7 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000000000006", "state-000000000007"]  # two kept
    rest = run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert rest.complete and rest.resumed_tokens == part.tokens
    same_science(rest, whole)
    again = run(tokens, 16, checkpoint_dir=tmp_path)  # resuming a finished run recomputes nothing
    assert again.resumed_tokens == whole.tokens
    same_science(again, whole)


def test_kill_between_checkpoints_redoes_the_lost_work(tmp_path, monkeypatch):
    tokens = stream(301, seed=5)  # 19 chunks of 16
    whole = run(tokens, 16)
    reads = {"n": 0}
    real_read = streaming._read_window

    def dying_read(*args):
        reads["n"] += 1
        if reads["n"] > 11:
            raise KeyboardInterrupt("killed")
        return real_read(*args)

    monkeypatch.setattr(streaming, "_read_window", dying_read)
    with pytest.raises(KeyboardInterrupt):
        run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=4)
    monkeypatch.setattr(streaming, "_read_window", real_read)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000000000004", "state-000000000008"]  # 11 ran
    kill_a_save_half_way(tmp_path)
    rest = run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert rest.resumed_tokens == 8 * 16
    same_science(rest, whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000000000016", "state-000000000019"]


def kill_a_save_half_way(directory) -> None:
    """The debris of saves killed half way: orbax still writing one, and one written but not renamed."""
    orbax_tmp = directory / "tmp-000000000012-1.orbax-checkpoint-tmp" / "meta.orbax-checkpoint-tmp"
    orbax_tmp.mkdir(parents=True)
    (orbax_tmp / "metadata").write_text("partial")
    shutil.copytree(directory / "state-000000000008", directory / "tmp-000000000012-2")


def test_the_store_deletes_nothing_but_its_own_folders(tmp_path):
    tokens = stream(120, seed=6)  # 8 chunks of 16
    theirs = ["tmp-mydata", "state-foo", "state-5", "state-0000000000010", "tmp-000000000001-x"]
    for name in theirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("precious")
    run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=1, max_chunks=3)
    shutil.copytree(tmp_path / "state-000000000003", tmp_path / "state-000000000008")
    damage(tmp_path / "state-000000000008", "delete stats")  # a damaged state of the store's own
    kill_a_save_half_way(tmp_path)
    rest = run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert rest.complete and rest.resumed_tokens == 3 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + ["state-000000000007", "state-000000000008"])
    assert all((tmp_path / name / "notes.txt").read_text() == "precious" for name in theirs)


@pytest.mark.parametrize("name", ["state-000000000009", "tmp-000000000002-7",
                                  "tmp-000000000002-7.orbax-checkpoint-tmp"])
def test_a_folder_named_like_the_stores_but_not_its_own_is_refused_untouched(tmp_path, name):
    tokens = stream(120, seed=6)
    run(tokens, 16, checkpoint_dir=tmp_path, max_chunks=2)
    (tmp_path / name).mkdir()
    (tmp_path / name / "meta").mkdir()
    (tmp_path / name / "notes.txt").write_text("precious")
    where = re.escape(f"checkpoint_dir {tmp_path}: {name}")
    with pytest.raises(ValueError, match=rf"^{where} is named like an entry of the checkpoint store but is not its own "
                                         r"\(it holds notes.txt, which the store never writes\); move it out of \S+ "
                                         r"or choose another checkpoint_dir$"):
        run(tokens, 16, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "state-000000000002"])
    assert (tmp_path / name / "notes.txt").read_text() == "precious"
    (tmp_path / name / "notes.txt").unlink()
    (tmp_path / name / "meta").rmdir()
    (tmp_path / name).rmdir()
    (tmp_path / name).write_text("a file")
    with pytest.raises(ValueError, match=rf"{re.escape(name)} is named like an entry of the checkpoint store but is "
                                         r"not its own \(it is not a directory\)"):
        run(tokens, 16, checkpoint_dir=tmp_path)
    assert (tmp_path / name).read_text() == "a file"


def test_resume_with_different_settings_names_what_differs(tmp_path):
    tokens = stream(120, seed=6)
    run(tokens, 16, checkpoint_dir=tmp_path, max_chunks=2)
    with pytest.raises(ValueError, match="chunk: checkpoint has 16, run asks 8"):
        run(tokens, 8, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"stream \(its first 33 tokens\): checkpoint has sha256:"):
        run(stream(120, seed=7), 16, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="length: checkpoint has 120, run asks 121") as info:
        run(stream(121, seed=6), 16, checkpoint_dir=tmp_path)
    assert "chunk" not in str(info.value)
    with pytest.raises(ValueError, match=r"buckets.per_octave: checkpoint has 4, run asks 2"):
        run(tokens, 16, checkpoint_dir=tmp_path, buckets=PositionBuckets(2))
    with pytest.raises(ValueError, match="streams: checkpoint has 1, run asks 2"):
        run(np.stack([tokens, tokens]), 16, checkpoint_dir=tmp_path)


def test_resume_with_other_params_or_identity_is_refused(tmp_path):
    tokens = stream(120, seed=6)
    run(tokens, 16, checkpoint_dir=tmp_path, max_chunks=2, identity={"attention": {"limit_distance": 16}})
    other = toy_params(seed=1)  # same shapes, other values
    with pytest.raises(ValueError, match=r"does not match this run: model\.params: checkpoint has sha256:\w+, run "
                                         r"asks sha256:\w+$"):
        streaming_nll(STEP, other, tokens, empty_cache(1), chunk=16, checkpoint_dir=tmp_path, progress=False,
                      identity={"attention": {"limit_distance": 16}})
    with pytest.raises(ValueError, match=r"model\.attention\.limit_distance: checkpoint has 16, run asks 8$"):
        run(tokens, 16, checkpoint_dir=tmp_path, identity={"attention": {"limit_distance": 8}})
    rest = run(tokens, 16, checkpoint_dir=tmp_path, identity={"attention": {"limit_distance": 16}})
    assert rest.resumed_tokens == 32 and rest.complete


def test_a_stream_changed_in_its_scored_part_is_refused(tmp_path):
    """The whole scored prefix is checked, not a sample: one token changed anywhere in it is found,
    and a change after it (not scored yet) resumes to the uninterrupted result on the new stream."""
    tokens = stream(2000, seed=8)
    run(tokens, 64, checkpoint_dir=tmp_path, max_chunks=3)  # scored positions 0..191: tokens 0..192
    changed = tokens.copy()
    changed[100] = (changed[100] + 1) % V
    with pytest.raises(ValueError, match=r"stream \(its first 193 tokens\): checkpoint has sha256:\w+, run asks"):
        run(changed, 64, checkpoint_dir=tmp_path)
    later = tokens.copy()
    later[193] = (later[193] + 1) % V
    rest = run(later, 64, checkpoint_dir=tmp_path)
    assert rest.resumed_tokens == 192
    same_science(rest, run(later, 64))


def damage(state, how: str) -> None:
    """Flip the middle byte of every cache data file of a saved state, or delete its stats file."""
    if how == "flip cache":
        files = [p for p in (state / "cache").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for path in files:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))
    else:
        (state / "stats" / "metadata").unlink()


def test_a_damaged_state_falls_back_to_the_previous_one(tmp_path, capsys):
    tokens = stream(120, 2, seed=6)  # 8 chunks of 16
    whole = run(tokens, 16)
    run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=2, max_chunks=5)
    newest = tmp_path / "state-000000000005"
    damage(newest, "flip cache")
    rest = run(tokens, 16, checkpoint_dir=tmp_path, checkpoint_every=2)
    warning = capsys.readouterr().err
    assert warning == f"warning: {newest} is damaged ({warning.split('(', 1)[1].split(')')[0]}); removed it and " \
                      f"resumed from {tmp_path / 'state-000000000004'}\n"
    assert rest.resumed_tokens == 2 * 4 * 16
    same_science(rest, whole)
    # a stats file whose numbers no longer match the checksum
    stats = tmp_path / "state-000000000008" / "stats" / "metadata"
    record = json.loads(stats.read_text())
    record["total"] += 1.0
    stats.write_text(json.dumps(record))
    again = run(tokens, 16, checkpoint_dir=tmp_path)
    assert "(ValueError: meta/stats do not match their checksum)" in capsys.readouterr().err
    assert again.resumed_tokens == 2 * 6 * 16
    same_science(again, whole)


def test_no_intact_state_is_one_clear_error(tmp_path, capsys):
    tokens = stream(120, seed=6)
    ckpt = tmp_path / "new" / "dir"  # missing: a fresh start
    run(tokens, 16, checkpoint_dir=ckpt, checkpoint_every=2, max_chunks=5)
    damage(ckpt / "state-000000000005", "delete stats")
    damage(ckpt / "state-000000000004", "flip cache")
    with pytest.raises(ValueError, match=r"^no intact saved state: \S+/state-000000000005: FileNotFoundError: .*; "
                                         r"\S+/state-000000000004: \w+: .*\(remove the damaged state\(s\) to start "
                                         r"afresh\)$"):
        run(tokens, 16, checkpoint_dir=ckpt)
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in ckpt.iterdir()) == ["state-000000000004", "state-000000000005"]  # kept


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Box:
    """A cache as a registered dataclass with a static field, like `lminf_jax.cache.KVCache`."""

    h: jax.Array
    n: jax.Array
    tag: str = dataclasses.field(default="toy", metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class BoxStep:
    def __call__(self, params, tokens, positions, cache):
        logits, new = STEP(params, tokens, positions, {"h": cache.h, "n": cache.n})
        return logits, Box(new["h"], new["n"], cache.tag)


def test_resume_restores_the_cache_pytree_structure(tmp_path):
    tokens = stream(100, 2, seed=9)
    box = Box(jnp.zeros((2, D), jnp.float32), jnp.zeros((2,), jnp.int32), "mine")
    whole = streaming_nll(BoxStep(), toy_params(), tokens, box, chunk=16, progress=False)
    streaming_nll(BoxStep(), toy_params(), tokens, box, chunk=16, progress=False, checkpoint_dir=tmp_path, max_chunks=2)
    rest = streaming_nll(BoxStep(), toy_params(), tokens, box, chunk=16, progress=False, checkpoint_dir=tmp_path)
    assert type(rest.cache) is Box and rest.cache.tag == "mine"
    assert jax.tree.structure(rest.cache) == jax.tree.structure(box)
    same_science(rest, whole)
    wider = Box(jnp.zeros((2, D + 1), jnp.float32), jnp.zeros((2,), jnp.int32), "mine")
    with pytest.raises(ValueError, match=r"cache: checkpoint has \[.*float32\[2, 6\].*run asks .*float32\[2, 7\]"):
        streaming_nll(BoxStep(), toy_params(), tokens, wider, chunk=16, progress=False, checkpoint_dir=tmp_path)


# ----- results, validation, progress --------------------------------------------------------


def test_result_json_round_trip():
    res = run(stream(90, 2, seed=8), 16, max_chunks=3)
    data = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert data == res.to_json()
    assert data["complete"] is False and data["tokens"] == 2 * 48 and len(data["stream_nll"]) == 2
    assert set(data["buckets"][0]) == {"lo", "hi", "count", "nll", "ppl"}
    back = StreamResult.from_json(data)
    assert back == res and back.cache is None


def test_validation_errors_name_the_parameter():
    tokens = stream(50)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        run(tokens, 0)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        run(tokens, 8, checkpoint_every=0)
    with pytest.raises(ValueError, match="max_chunks must be an integer >= 0"):
        run(tokens, 8, max_chunks=-1)
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        run(tokens.astype(np.float32), 8)
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        run(tokens.reshape(1, 5, 10), 8)
    with pytest.raises(ValueError, match="at least 2 tokens per stream"):
        run(tokens[:1], 8)
    with pytest.raises(ValueError, match="ids must lie in"):
        run(np.array([1, 2, -3, 4]), 8)
    too_long = np.broadcast_to(np.zeros(1, np.int32), (2**31,))  # no memory behind it
    with pytest.raises(ValueError, match=r"longer than 2\*\*31 - 1"):
        run(too_long, 8)
    with pytest.raises(ValueError, match="per_octave must be an integer >= 1"):
        PositionBuckets(0)


def test_progress_line_reports_tokens_rate_and_mean_nll(capsys):
    res = run(stream(65), 16, progress=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("streaming NLL: 64/64 tokens, ") and " tokens/s, " in last
    assert last.endswith(f"mean NLL {res.nll:.4f}")
    run(stream(65), 16, progress=False)
    assert capsys.readouterr().err == ""
