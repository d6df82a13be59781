"""Shared test helpers: fresh random inputs (never zeros), error measures, the NaN-isolation check."""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import zlib

# Most tests run tiny programs, so XLA's compile time, not their run time, dominates the suite.
# Two compile-time settings (the HLO each test checks is unchanged; only the machine code differs):
# LLVM optimisation level 1 instead of 2 (a cached-decoding test 19.4 s -> 15.0 s; level 0 made the
# shipped model's perplexity test 2.2x slower), and XLA:CPU's older elemental emitters instead of its
# fusion emitters (a blockwise attention program compiles in 1.1 s instead of 1.8 s; test_models.py
# plus the main-job test 111 s -> 90 s, measured on 2 cores). Set before jax starts its backend;
# subprocesses inherit them (tests/multidevice.py).
COMPILE_FAST_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib knows ``flags`` (XLA aborts the process on an unknown flag, so ask a
    child process; the answer is kept in the environment for xdist workers and subprocesses)."""
    key = "LMINF_TEST_XLA_FLAGS_OK"
    if key not in os.environ:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                               env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
        os.environ[key] = "1" if probe.returncode == 0 else ""
    return bool(os.environ[key])


if _xla_accepts(COMPILE_FAST_XLA_FLAGS):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FAST_XLA_FLAGS}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax  # noqa: E402
from naive_attention import allowed_keys

from lminf_jax import (
    Alibi,
    AttentionSpec,
    DistanceLimit,
    LambdaMask,
    LeakyReRoPE,
    LMInfinite,
    Rotary,
    SelfExtend,
    SlidingWindow,
    StreamingLLM,
    Vanilla,
)
from lminf_jax.models import registry


#: The modules that take longest (seconds on 2 cores, measured with --durations and a JUnit report),
#: longest first. `pytest -n 2 --dist loadfile --no-loadscope-reorder` hands modules to the two
#: workers in collection order; starting the long ones first keeps one worker from running a long
#: module alone at the end (xdist's own reorder, by test count, puts few-test long modules last).
#: A stale entry costs only time.
LONGEST_MODULES = ("test_attention_blockwise", "test_experiments_perplexity", "test_models_sharding",
                   "test_models_decoder", "test_experiments_train", "test_decoding", "test_cache",
                   "test_attention_pallas", "test_models", "test_experiments_stream_nll", "test_probes",
                   "test_context_parallel", "test_models_parity", "test_attention_decode",
                   "test_experiments_benchmark_peers", "test_multihost", "test_experiments_continuation",
                   "test_experiments_factors")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the extended cases (marked `extended`): the rest of each combinatorial grid")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "extended: a case that repeats code paths its grid's core cases reach, "
                                       "in another combination; runs only with --extended (docs/install.md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `extended` cases unless --extended; run the `LONGEST_MODULES` first, in that order (the
    rest keep their order after them)."""
    if not config.getoption("--extended"):
        extended = [item for item in items if item.get_closest_marker("extended")]
        if extended:
            config.hook.pytest_deselected(items=extended)
            items[:] = [item for item in items if not item.get_closest_marker("extended")]
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def in_turn(names, others, shift: int = 0) -> list[tuple]:
    """``[(names[i], others[(i + shift) % len(others)])]``: each name once, the others in turn (a core)."""
    return [(name, others[(i + shift) % len(others)]) for i, name in enumerate(names)]


def product(names, others) -> list[tuple]:
    """Every ``(name, other)`` pair (a whole grid)."""
    return [(name, other) for name in names for other in others]


def grid(cases, core) -> list:
    """``cases`` for ``pytest.mark.parametrize``, those not in ``core`` marked `extended`: the core cases run
    always and reach each code path the grid varies (each family's layout, each method, each implementation),
    the rest repeat a path in another combination and run with --extended."""
    core = list(core)
    missing = [case for case in core if case not in cases]
    if missing:
        raise ValueError(f"core cases {missing} are not in the grid")
    return [case if case in core else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                   marks=pytest.mark.extended) for case in cases]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's compiled programs. XLA's CPU backend maps memory for
    every program it compiles; the whole suite in one process would otherwise reach the kernel's
    vm.max_map_count (65,530 mappings) and crash inside the compiler."""
    yield
    jax.clear_caches()
    gc.collect()


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def case_seed(*parts: object) -> int:
    """A seed derived from a test case's parameters, the same in every run (Python's ``hash`` of a
    string changes with each process, so a failure seeded by it could not be reproduced)."""
    return zlib.crc32(repr(parts).encode())


def random_qkv(seed: int, b: int, tq: int, tk: int, hq: int, hkv: int, d: int, dv: int | None = None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, hq, d)).astype(dtype)
    k = rng.standard_normal((b, tk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, tk, hkv, dv or d)).astype(dtype)
    return q, k, v


#: The positional encodings `make_positional` builds.
POSITIONALS = ("rope_half", "rope_interleaved_partial", "alibi", "none")


def make_positional(name: str, head_dim: int, num_heads: int):
    """'rope_half' | 'rope_interleaved_partial' | 'alibi' | 'none'."""
    if name == "rope_half":
        return Rotary.create(head_dim, theta=100.0)
    if name == "rope_interleaved_partial":
        return Rotary.create(head_dim, theta=100.0, rotary_dim=head_dim // 2, layout="interleaved")
    if name == "alibi":
        return Alibi.create(num_heads)
    if name == "none":
        return None
    raise KeyError(name)


def naive_positional_kwargs(positional) -> dict:
    if isinstance(positional, Rotary):
        return {"rope": (positional.inv_freq, positional.layout, positional.attention_scaling)}
    if isinstance(positional, Alibi):
        return {"slopes": positional.slopes}
    return {}


SPEC_FACTORIES = {
    "vanilla": lambda G, L: Vanilla(),
    "lm_infinite": lambda G, L: LMInfinite(G, L),
    "lm_infinite_d_lt_l": lambda G, L: LMInfinite(G, L, max(1, L // 2)),
    "lambda_mask": lambda G, L: LambdaMask(G, L),
    "distance_limit": lambda G, L: DistanceLimit(L),
    "sliding_window": lambda G, L: SlidingWindow(L),
    "streaming_llm": lambda G, L: StreamingLLM(G, L),
    "self_extend": lambda G, L: SelfExtend(3, L),  # g = 3 divides no power of two: fractional positions
    "self_extend_g_divides_w": lambda G, L: SelfExtend(2, L),
    "leaky_rerope": lambda G, L: LeakyReRoPE(L, 3),
}


def naive_spec_kwargs(spec: AttentionSpec) -> dict:
    """The oracle's description of ``spec``: its kind and parameters (names from the papers)."""
    names = {"global_branch": "G", "local_branch": "L", "limit_distance": "D", "group_size": "group", "leak": "leak"}
    return {"kind": spec.kind, **{short: getattr(spec, name) for name, short in names.items() if hasattr(spec, name)}}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Tiny random models of each family (HF config dicts), for model-level tests.
TINY_MODELS = {
    "llama_gqa": {"model_type": "llama", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80,
                  "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                  "attention_bias": True, "rope_theta": 500.0},
    "gptj": {"model_type": "gptj", "vocab_size": 97, "n_embd": 48, "n_layer": 2, "n_head": 4, "rotary_dim": 6},
    "mpt_biases_qk_ln": {"model_type": "mpt", "vocab_size": 97, "d_model": 48, "n_layers": 2, "n_heads": 3,
                         "no_bias": False, "attn_config": {"alibi": True, "qk_ln": True, "clip_qkv": 4.0}},
    # old field names (n_embed, num_attention_heads); width 36, not 48: `_perturbed` adds the same noise to the
    # same-sized q, k and v weights, so q ~ k, and at 48 a probed self logit beat another attended key's by ~96,
    # underflowing that key's probability to 0
    "bloom": {"model_type": "bloom", "vocab_size": 97, "n_embed": 36, "n_layer": 2, "num_attention_heads": 6},
    # three layers: 0 and 2 windowed (window 12, shorter than the tests' sequences), soft-capped scores
    "gemma2_window": {"model_type": "gemma2", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80,
                      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                      "sliding_window": 12, "query_pre_attn_scalar": 20, "attn_logit_softcapping": 3.0,
                      "final_logit_softcapping": 10.0, "rope_theta": 500.0},
    "neox": {"model_type": "gpt_neox", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80,
             "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5, "rotary_emb_base": 500},
}


@functools.cache
def random_model(name: str, seed: int = 0):
    """A tiny random model of one of `TINY_MODELS`: (family, config, params), no zero biases (made once per
    process: its programs would compile again in every module)."""
    family = registry.family_for_config(TINY_MODELS[name])
    cfg = family.config_from_hf(TINY_MODELS[name])
    key = jax.random.key(seed)
    return family, cfg, _perturbed(family.init_params(cfg, key), key)


@jax.jit
def _perturbed(params, key):
    """``params`` plus N(0, 0.3^2) noise (no zero biases), as one compiled program per tree."""
    return jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape),
                                  params)


def attended_slots(q_pos: np.ndarray, k_pos: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """``(B, Tq, Tk)``: the key slots each query row attends (the naive oracle's mask, no top-k)."""
    kw = naive_spec_kwargs(spec)
    return np.stack([[allowed_keys(int(i), kp, **kw) if i >= 0 else np.zeros(len(kp), bool) for i in qp]
                     for qp, kp in zip(q_pos, k_pos)])


def assert_nan_stays_in_its_rows(run, q, k, v, sees, *, nan_key=None, nan_value=None, unsure=None):
    """Poison key slot ``nan_key[b]`` and value slot ``nan_value[b]`` of batch row b (every head; -1 or
    None: none) with NaN and call ``run(q, k, v) -> (B, Tq, ...)``. ``sees (B, Tq, Tk)``: the key
    slots each query row attends. Rows that attend neither poisoned slot must equal the clean result;
    rows that attend one must hold a NaN (not silently drop it); rows in ``unsure (B, Tq)`` are skipped."""
    k_bad, v_bad = np.array(k), np.array(v)
    touched = np.zeros(sees.shape[:2], bool)
    for bad, slots in ((k_bad, nan_key), (v_bad, nan_value)):
        for b, s in enumerate(slots if slots is not None else []):
            if s >= 0:
                bad[b, s] = np.nan
                touched[b] |= sees[b, :, s]
    clean, poisoned = (np.asarray(run(q, k_, v_), np.float64) for k_, v_ in ((k, v), (k_bad, v_bad)))
    skip = np.zeros_like(touched) if unsure is None else unsure
    keep = ~touched & ~skip
    assert not np.isnan(clean).any()
    np.testing.assert_allclose(poisoned[keep], clean[keep], rtol=1e-6, atol=1e-7)
    hit = touched & ~skip
    assert np.isnan(poisoned[hit].reshape(hit.sum(), -1)).any(axis=1).all(), "a row attending a NaN lost it"
