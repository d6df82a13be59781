"""The window-kernel route (`lminf_jax.attention_vendor`) and the routing of "auto" (`lminf_jax.attention`).

On CPU: the route with jax's XLA attention in cuDNN's place ("window_xla": the very call, but for
``implementation``) and with splash attention interpreted, against the float64 oracle for every
window-plus-sinks spec, RoPE layouts and none, GQA, soft-capping, bfloat16 and non-finite inputs; cuDNN's
call checked against what `jax.nn.dot_product_attention` passes it; the routing table; a model under
"auto" lowered for TPU holding the splash kernel, and the cached step lowering for GPU and TPU. On a GPU
(the device check runs this module there) the real cuDNN route is checked against the oracle too.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (case_seed, grid, in_turn, make_positional, naive_positional_kwargs, naive_spec_kwargs,
                      random_model, random_qkv, rel_err, assert_nan_stays_in_its_rows, attended_slots)
from naive_attention import naive_attention

import lminf_jax.attention_vendor as vendor
from lminf_jax import (Alibi, AttentionCall, DistanceLimit, LambdaMask, LMInfinite, Rotary, Scaling, SlidingWindow,
                       StreamingLLM, TopK, Vanilla, attention)
from lminf_jax.attention import DENSE_MAX_SCORES, attention_route
from lminf_jax.attention_vendor import window_sink_attention

GPU = jax.default_backend() == "gpu"
#: The kernels checked here: cuDNN itself only where there is one.
KERNELS = ("xla", "splash") + (("cudnn",) if GPU else ())

SPECS = {
    "vanilla": Vanilla(),
    "lm_infinite": LMInfinite(3, 40),
    "lm_infinite_d_lt_l": LMInfinite(3, 40, 25),
    "lambda_mask": LambdaMask(2, 20),
    "streaming_llm": StreamingLLM(4, 30),
    "sliding_window": SlidingWindow(33),
}


def oracle(q, k, v, spec, positional, scale, softcap=None):
    t = q.shape[1]
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (q.shape[0], t))
    return naive_attention(q, k, v, pos, pos, scale=scale, softcap=softcap, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(positional), return_lse=True)


def routed(kernel, q, k, v, **kw):
    return window_sink_attention(*(jnp.asarray(x) for x in (q, k, v)), kernel=kernel,
                                 interpret=kernel == "splash" and jax.default_backend() != "tpu", **kw)


ROUTE_POSITIONALS = ("rope_half", "rope_interleaved_partial", "none")
ROUTE_RUNS = [(kernel, name, positional) for kernel in KERNELS if kernel != "cudnn" for name in sorted(SPECS)
              for positional in ROUTE_POSITIONALS]


# core: each kernel with each kind, the encodings in turn
@pytest.mark.parametrize("kernel,spec_name,positional_name", grid(ROUTE_RUNS, core=[
    (kernel, *pair) for j, kernel in enumerate(k for k in KERNELS if k != "cudnn")
    for pair in in_turn(sorted(SPECS), ROUTE_POSITIONALS, shift=j)]))
def test_the_route_matches_the_oracle(kernel, spec_name, positional_name):
    """Float32, GQA, a length that is no multiple of splash's tiles: output and log-sum-exp."""
    b, t, hq, hkv, d = 2, 150, 4, 2, 16
    q, k, v = random_qkv(case_seed(kernel, spec_name, positional_name), b, t, t, hq, hkv, d)
    spec, positional = SPECS[spec_name], make_positional(positional_name, d, hq)
    want, want_lse = oracle(q, k, v, spec, positional, d**-0.5)
    got, lse = routed(kernel, q, k, v, spec=spec, positional=positional, scale=Scaling(d**-0.5))
    assert got.shape == (b, t, hq, d) and got.dtype == jnp.float32 and rel_err(got, want) < 1e-5
    assert lse.shape == (b, t, hq) and np.max(np.abs(np.asarray(lse) - want_lse)) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_inputs_at_bfloat16_tolerance(kernel):
    """16-bit inputs on the kernels' matrix units, float32 statistics and merge."""
    b, t, hq, hkv, d = 1, 300, 8, 2, 64
    q, k, v = random_qkv(case_seed("bf16", kernel), b, t, t, hq, hkv, d)
    spec, positional = LMInfinite(10, 100), Rotary.create(d)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    want, _ = oracle(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), spec, positional, d**-0.5)
    got, _ = routed(kernel, q16, k16, v16, spec=spec, positional=positional, scale=Scaling(d**-0.5))
    assert got.dtype == jnp.bfloat16 and rel_err(got.astype(jnp.float32), want) < 1e-2


def test_splash_soft_caps_the_scores_and_cudnn_refuses():
    """Gemma 2's soft-capped scores: splash caps them (``attn_logits_soft_cap``); jax's cuDNN call has no cap."""
    b, t, hq, hkv, d = 1, 140, 4, 2, 16
    q, k, v = random_qkv(7, b, t, t, hq, hkv, d)
    q = 4 * q  # scores well past the cap
    spec, positional, scale = SlidingWindow(50), Rotary.create(d), Scaling(0.3, softcap=2.0)
    want, _ = oracle(q, k, v, spec, positional, 0.3, softcap=2.0)
    got, _ = routed("splash", q, k, v, spec=spec, positional=positional, scale=scale)
    assert rel_err(got, want) < 1e-5
    for implementation in ("window_xla", "cudnn"):
        with pytest.raises(ValueError, match="soft-capping"):
            attention(*(jnp.asarray(x) for x in (q, k, v)), spec=spec, positional=positional, scale=scale,
                      implementation=implementation)


@pytest.mark.parametrize("implementation", ["window_xla", "splash"])
def test_what_the_kernels_cannot_take_is_refused_by_name(implementation):
    q, k, v = random_qkv(0, 1, 40, 40, 2, 2, 16)
    pos = np.arange(40, dtype=np.int32)
    with pytest.raises(ValueError, match="ALiBi's bias is not in the fused window kernels"):
        attention(q, k, v, spec=LMInfinite(2, 8), positional=Alibi.create(2), implementation=implementation)
    with pytest.raises(ValueError, match="scores every key beyond its window"):
        attention(q, k, v, spec=DistanceLimit(8), implementation=implementation)
    with pytest.raises(ValueError, match="top-k"):
        attention(q, k, v, spec=LMInfinite(2, 8, top_k=TopK(2, 8, 0)), layer=0, implementation=implementation)
    with pytest.raises(ValueError, match="positions 0..T-1"):
        attention(q, k, v, q_positions=pos + 1, k_positions=pos + 1, spec=LMInfinite(2, 8),
                  implementation=implementation)
    with pytest.raises(ValueError, match="traced positions"):
        jax.jit(lambda p: attention(q, k, v, q_positions=p, k_positions=p, spec=LMInfinite(2, 8),
                                    implementation=implementation))(pos)
    with pytest.raises(ValueError, match="give both"):
        attention(q, k, v, q_positions=pos, spec=LMInfinite(2, 8), implementation=implementation)
    given = attention(q, k, v, q_positions=pos, k_positions=pos, spec=LMInfinite(2, 8), implementation=implementation)
    assert rel_err(given, attention(q, k, v, spec=LMInfinite(2, 8), implementation="reference")) < 1e-5


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_a_nan_reaches_only_the_rows_that_attend_it(kernel):
    """A NaN key in the window of some rows, a NaN value among the sinks: the rows attending them are
    NaN, every other row is exactly as without them (a flash tile multiplies masked weights by values)."""
    b, t, hq, hkv, d = 2, 130, 2, 1, 16
    q, k, v = random_qkv(11, b, t, t, hq, hkv, d)
    spec = LMInfinite(3, 40)
    pos = np.broadcast_to(np.arange(t), (b, t))
    run = lambda q, k, v: routed(kernel, q, k, v, spec=spec, positional=Rotary.create(d), scale=Scaling(0.25))[0]  # noqa: E731
    assert_nan_stays_in_its_rows(run, q, k, v, attended_slots(pos, pos, spec), nan_key=[60, 5], nan_value=[1, 100])


def test_gradients_are_the_blockwise_paths():
    """The kernels' forward, the blockwise path's backward (jax's cuDNN backward drops the merge's
    log-sum-exp cotangent): gradients of every input equal the reference's."""
    q, k, v = random_qkv(3, 1, 90, 90, 4, 2, 16)
    spec, positional = LMInfinite(3, 30), Rotary.create(16)

    def loss(implementation, q, k, v):
        out = attention(q, k, v, spec=spec, positional=positional, implementation=implementation)
        return jnp.sum(out * jnp.cos(out))

    for got, want in zip(jax.grad(functools.partial(loss, "window_xla"), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(q, k, v)):
        assert rel_err(got, want) < 1e-5


def test_cudnn_is_called_with_the_arguments_jax_nn_passes_it(monkeypatch):
    """jax.nn's public call rounds cuDNN's log-sum-exp to the output dtype, so the route calls the function
    it wraps: with the same arguments (checked by recording both calls), and its (B, H, T) residual read
    right (the route through a stand-in cuDNN built from the XLA attention equals the oracle)."""
    import jax._src.cudnn.fused_attention_stablehlo as fused
    import jax._src.nn.functions as nn_functions

    calls = []

    def fake(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, *, scale, mask_type,
             sliding_window_length, return_residual):
        calls.append((query.shape, scale, mask_type, sliding_window_length, return_residual, bias, mask, q_seqlen))
        window = None if sliding_window_length is None else (sliding_window_length - 1, 0)
        out, lse = jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=True,
                                                local_window_size=window, implementation="xla", return_residual=True)
        return out, jnp.swapaxes(lse, 1, 2)

    monkeypatch.setattr(fused, "dot_product_attention", fake)
    monkeypatch.setattr(nn_functions, "cudnn_dot_product_attention", fake)
    b, t, hq, hkv, d = 1, 120, 4, 2, 16
    q, k, v = random_qkv(5, b, t, t, hq, hkv, d)
    for spec in (LMInfinite(3, 40), Vanilla()):
        want, _ = oracle(q, k, v, spec, Rotary.create(d), 0.25)
        got, _ = routed("cudnn", q, k, v, spec=spec, positional=Rotary.create(d), scale=Scaling(0.25))
        assert rel_err(got, want) < 1e-5
        window = None if spec.window is None else (spec.window - 1, 0)
        jax.nn.dot_product_attention(*(jnp.asarray(x) for x in (q, k, v)), scale=0.25, is_causal=True,
                                     local_window_size=window, implementation="cudnn", return_residual=True)
        ours, theirs = calls[-2:]
        assert ours == theirs, (ours, theirs)


def _shape(t: int, d: int = 64, dtype=jnp.bfloat16, hq: int = 8, hkv: int = 2) -> tuple:
    return (jax.ShapeDtypeStruct((1, t, hq, d), dtype), *(jax.ShapeDtypeStruct((1, t, hkv, d), dtype),) * 2)


ROUTES = [  # (platform, what, call keywords, t, dtype, head dim, the implementation "auto" picks)
    ("cpu", "no fused kernel on CPU", {}, 4096, jnp.bfloat16, 64, "blockwise"),
    ("tpu", "splash for LM-Infinite", {}, 4096, jnp.bfloat16, 64, "splash"),
    ("tpu", "splash for vanilla", {"spec": Vanilla()}, 4096, jnp.bfloat16, 64, "splash"),
    ("tpu", "splash soft-caps", {"scale": Scaling(0.1, softcap=50.0)}, 4096, jnp.bfloat16, 64, "splash"),
    ("tpu", "float32 keeps full precision", {}, 4096, jnp.float32, 64, "blockwise"),
    ("tpu", "ALiBi", {"positional": Alibi.create(8)}, 4096, jnp.bfloat16, 64, "blockwise"),
    ("tpu", "unbounded global class", {"spec": DistanceLimit(512)}, 4096, jnp.bfloat16, 64, "blockwise"),
    ("tpu", "top-k", {"spec": LMInfinite(4, 512, top_k=TopK())}, 4096, jnp.bfloat16, 64, "blockwise"),
    ("tpu", "positions given", {"q_positions": np.arange(4096), "k_positions": np.arange(4096)}, 4096,
     jnp.bfloat16, 64, "blockwise"),
    ("tpu", "short: dense", {}, 512, jnp.bfloat16, 64, "reference"),
    ("cuda", "cuDNN for LM-Infinite", {}, 4096, jnp.bfloat16, 64, "cudnn"),
    ("cuda", "cuDNN in float16", {}, 4096, jnp.float16, 128, "cudnn"),
    ("cuda", "cuDNN has no soft cap", {"scale": Scaling(0.1, softcap=50.0)}, 4096, jnp.bfloat16, 64, "blockwise"),
    ("cuda", "cuDNN head dims", {}, 4096, jnp.bfloat16, 160, "blockwise"),
    ("cuda", "cuDNN head dims (multiple of 8)", {}, 4096, jnp.bfloat16, 36, "blockwise"),
    ("cuda", "cuDNN takes 16-bit inputs", {}, 4096, jnp.float32, 64, "blockwise"),
]


@pytest.mark.parametrize("platform, what, keywords, t, dtype, head_dim, want", ROUTES, ids=[r[1] for r in ROUTES])
def test_the_routing_table(monkeypatch, platform, what, keywords, t, dtype, head_dim, want):
    monkeypatch.setattr(vendor, "cudnn_head_dim_limit", lambda: 128)  # as on a GPU before Hopper
    keywords = {"spec": LMInfinite(4, 512), "positional": Rotary.create(head_dim), **keywords}
    route = attention_route(*_shape(t, head_dim, dtype), platform=platform, **keywords)
    assert route.implementation == want, route
    assert route.reason


def test_without_cudnn_the_gpu_route_is_blockwise_and_says_why(monkeypatch):
    monkeypatch.setattr(vendor, "cudnn_head_dim_limit", lambda: None)
    route = attention_route(*_shape(4096), spec=LMInfinite(4, 512), platform="cuda")
    assert route == ("blockwise", "no cuDNN where the call is traced")
    assert attention_route(*_shape(1), platform="tpu").implementation == "reference"
    assert attention_route(*_shape(4096), implementation="blockwise").reason == "chosen by the caller"
    assert 512 * 512 <= DENSE_MAX_SCORES < 513 * 513


def test_auto_runs_the_platforms_route_and_lowers_splash_for_tpu():
    """On CPU "auto" runs the blockwise path; the same function lowered for TPU holds the Mosaic kernel."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(2, 1, 600, 600, 4, 2, 32))
    spec, positional = LMInfinite(4, 128), Rotary.create(32)
    run = jax.jit(lambda q, k, v: attention(q, k, v, spec=spec, positional=positional))
    want = attention(q, k, v, spec=spec, positional=positional, implementation="blockwise")
    assert np.array_equal(np.asarray(run(q, k, v), np.float32), np.asarray(want, np.float32))
    assert "tpu_custom_call" not in run.lower(q, k, v).as_text()
    assert "tpu_custom_call" in run.trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()


def test_a_model_under_auto_lowers_splash_for_tpu_and_decodes_on_gpu_and_tpu():
    """The whole forward (no positions given: every row at 0..T-1, known when tracing) lowered for TPU holds
    the splash kernel; a cached step in bfloat16 lowers for GPU and TPU, its products in the cache's dtype."""
    family, cfg, params = random_model("llama_gqa")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model = family.model(cfg, AttentionCall(LMInfinite(4, 128)), dtype=jnp.bfloat16)
    tokens = jnp.zeros((1, 600), jnp.int32)
    forward = jax.jit(model.forward).trace(params, tokens)
    assert "tpu_custom_call" in forward.lower(lowering_platforms=("tpu",)).as_text()
    given = jax.jit(lambda p, x: model.forward(p, x, jnp.arange(600))).trace(params, tokens)
    assert "tpu_custom_call" not in given.lower(lowering_platforms=("tpu",)).as_text()  # positions: blockwise
    for spec in (LMInfinite(4, 996), Vanilla()):  # a Λ-cache and a full cache of 1,000 slots
        model = family.model(cfg, AttentionCall(spec), dtype=jnp.bfloat16)
        cache = model.init_cache(2, capacity=1000)
        assert cache.keys.shape[-2] == 1000 and cache.keys.dtype == jnp.bfloat16
        step = jax.jit(model.__call__).trace(params, jnp.zeros((2, 1), jnp.int32), jnp.full((2, 1), 7, jnp.int32),
                                             cache)
        for platform in ("cuda", "tpu"):
            text = step.lower(lowering_platforms=(platform,)).as_text()
            widened = [line for line in text.splitlines() if "stablehlo.convert" in line
                       and re.search(r"-> tensor<([0-9]+x)*1000x([0-9]+x)*f32>", line)]
            assert not widened, widened  # no float32 copy of cached keys or values (scores are float32 by the dot)


@pytest.mark.parametrize("implementation", ["window_xla", "splash"])
def test_model_forward_through_the_route_equals_blockwise(implementation):
    """Through a whole model: GQA LLaMA, and Gemma 2's mixed stack (native window layers, soft-capped
    scores) where splash caps and the XLA stand-in of cuDNN must refuse."""
    for name in ("llama_gqa", "gemma2_window"):
        family, cfg, params = random_model(name)
        tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 70)), jnp.int32)
        spec = LMInfinite(2, 24)
        want = family.model(cfg, AttentionCall(spec, "blockwise", 16, 16)).forward(params, tokens)
        model = family.model(cfg, AttentionCall(spec, implementation))
        if name == "gemma2_window" and implementation == "window_xla":
            with pytest.raises(ValueError, match="soft-capping"):
                model.forward(params, tokens)
            continue
        assert rel_err(model.forward(params, tokens), want) < 1e-5
        with pytest.raises(ValueError, match="positions cannot be given"):
            model.forward(params, tokens, jnp.arange(70))


@pytest.mark.skipif(not GPU, reason="cuDNN runs on a GPU")
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_cudnn_route_matches_the_oracle_on_the_gpu(spec_name):
    """The device check's oracle test: cuDNN's window plus the sink branch, bfloat16, GQA, head dim 128."""
    b, t, hq, hkv, d = 2, 700, 8, 2, 128
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(case_seed("gpu", spec_name), b, t, t, hq, hkv, d))
    spec = SPECS[spec_name]
    positional = Rotary.create(d)
    want, want_lse = oracle(*(np.asarray(x, np.float32) for x in (q, k, v)), spec, positional, d**-0.5)
    assert attention_route(q, k, v, spec=spec, positional=positional).implementation == "cudnn"
    got, lse = routed("cudnn", q, k, v, spec=spec, positional=positional, scale=Scaling(d**-0.5))
    assert rel_err(got.astype(jnp.float32), want) < 1e-2
    assert np.max(np.abs(np.asarray(lse) - want_lse)) < 5e-2
    auto = jax.jit(lambda q, k, v: attention(q, k, v, spec=spec, positional=positional))(q, k, v)
    assert rel_err(auto.astype(jnp.float32), want) < 1e-2


@pytest.mark.parametrize("length, window", [(1024, 100), (1024, None), (1280, 300), (1024, 1024), (1024, 5000)])
def test_splash_band_mask_is_processed_as_splash_own_masks(length, window):
    """The band mask answers blocks wholly outside or inside the window from their corners; splash's mask
    processing must come out exactly as from its own LocalMask / CausalMask (checked with every jax this
    runs under, the device's included)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

    shape = (length, length)
    own = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), offset=0)
    for blocks in ((128, 128), (256, 128)):
        fast, _ = mask_info.process_mask(masks.MultiHeadMask([vendor._band_mask(length, window)] * 2), blocks)
        slow, _ = mask_info.process_mask(masks.MultiHeadMask([own] * 2), blocks)
        for field in slow._fields:
            a, b = getattr(fast, field), getattr(slow, field)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), field


def test_a_model_under_auto_runs_in_several_traces():
    """Every trace builds its own splash kernel (one kept across traces leaked the first trace's mask
    arrays: an UnexpectedTracerError on the second model run in a process)."""
    family, cfg, params = random_model("llama_gqa")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 520)), jnp.int32)
    models = [family.model(cfg, AttentionCall(LMInfinite(4, 128), block_q=block), dtype=jnp.bfloat16)
              for block in (512, 256)]
    runs = [model.forward(params, tokens) for model in models]
    assert rel_err(runs[0].astype(jnp.float32), runs[1].astype(jnp.float32)) < 1e-2
