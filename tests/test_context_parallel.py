"""lminf_jax.context_parallel on 8 simulated CPU devices (a subprocess: the device count is fixed
when jax starts): equal to the single-device blockwise path at T = 4K, and its compiled HLO moves
only halos (collective-permute) and the sinks (a small all-reduce), never the whole sequence; a NaN
reaches only the rows that attend it; nothing is sized by G or L beyond the sequence."""

from __future__ import annotations

from multidevice import run_on_devices

SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from lminf_jax import Alibi, LMInfinite, Rotary, SlidingWindow, StreamingLLM, Vanilla, attention
from lminf_jax.context_parallel import context_parallel_attention

mesh = Mesh(np.array(jax.devices()), ("seq",))
rng = np.random.default_rng(0)
out = {"devices": len(jax.devices()), "cases": []}
cases = [(4096, LMInfinite(10, 512), Rotary.create(16), "rope"),
         (4099, LMInfinite(10, 512), Alibi.create(2), "alibi"),
         (1003, LMInfinite(12, 300), Rotary.create(16), "rope, halo of 3 chunks"),
         (64, LMInfinite(10, 30), Rotary.create(16), "halo of 4 chunks, sinks on 2 devices"),
         (999, StreamingLLM(4, 200), Rotary.create(16), "streaming_llm"),
         (1000, SlidingWindow(100), Rotary.create(16), "sliding window")]
for t, spec, positional, name in cases:
    q = jnp.asarray(rng.standard_normal((1, t, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, t, 1, 16)), jnp.float32) for _ in range(2))
    p = jnp.arange(t)
    ref = attention(q, k, v, q_positions=p, k_positions=p, spec=spec, positional=positional,
                    implementation="blockwise", block_q=256, block_k=256)
    fn = jax.jit(lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, axis="seq", spec=spec,
                                                            positional=positional, block_q=256, block_k=256,
                                                            keep_padding=True))
    got = fn(q, k, v)[:, :t]  # trimmed outside: inside, XLA would gather the whole output to trim it
    hlo = fn.lower(q, k, v).compile().as_text()
    out["cases"].append({"name": name, "t": t, "rel_err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                         "shape_ok": got.shape == ref.shape and fn(q, k, v).shape[1] == -(-t // 8) * 8,
                         "permuted_lengths": sorted({max(map(int, m.group(1).split(","))) for m in re.finditer(
                             r"= \w+\[([\d,]+)\][^=]*collective-permute\(", hlo)}),
                         "collectives": sorted(set(re.findall(
                             r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)", hlo)))})
trimmed = context_parallel_attention(q, k, v, mesh=mesh, axis="seq", spec=spec, positional=positional)
out["trimmed_ok"] = trimmed.shape == (1, 1000, 2, 16)
try:
    context_parallel_attention(q, k, v, mesh=mesh, axis="seq", spec=Vanilla())
except ValueError as e:
    out["vanilla_error"] = str(e)
# a NaN key and value (in another device's chunk, in a sink) reach only the rows that attend them
t, spec = 64, LMInfinite(2, 12)
q = jnp.asarray(rng.standard_normal((2, t, 2, 16)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((2, t, 1, 16)), jnp.float32) for _ in range(2))
cp = jax.jit(lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, axis="seq", spec=spec,
                                                        positional=Rotary.create(16), block_q=4, block_k=4))
clean = np.asarray(cp(q, k, v))
got = np.asarray(cp(q, k.at[0, 30].set(jnp.nan), v.at[0, 20].set(jnp.nan).at[1, 1].set(jnp.nan)))
r = np.arange(t)
sees = np.stack([(r >= 20) & (r < 32) | (r >= 30) & (r < 42), r >= 1])  # per row: attends a NaN slot
out["nan_ok"] = bool(np.array_equal(got[~sees], clean[~sees]) and np.isnan(got[sees]).all()
                     and not np.isnan(clean).any())
# sinks and a window far beyond the sequence: nothing is sized by G or L
huge = jax.jit(lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, axis="seq",
                                                          spec=LMInfinite(10**8, 10**9)))
out["huge_temp_bytes"] = huge.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
p = jnp.arange(t)
vanilla = attention(q, k, v, q_positions=p, k_positions=p, spec=Vanilla(), implementation="reference")
out["huge_rel_err"] = float(jnp.linalg.norm(huge(q, k, v) - vanilla) / jnp.linalg.norm(vanilla))
print("RESULT " + json.dumps(out))
"""


def test_context_parallel_equals_one_device_and_moves_only_halos_and_sinks():
    result = run_on_devices(SCRIPT)
    assert result["devices"] == 8
    for case in result["cases"]:
        assert case["shape_ok"] and case["rel_err"] < 1e-5, case
        assert case["collectives"] == (["all-reduce", "collective-permute"] if "sliding" not in case["name"]
                                       else ["collective-permute"]), case
    assert "attends unboundedly many keys" in result["vanilla_error"] and result["trimmed_ok"]
    # halo traffic: the L - 1 = 511 keys before each 2,048-token chunk, not the chunk itself
    assert result["cases"][0]["permuted_lengths"] == [511], result["cases"][0]
    assert result["nan_ok"] and result["huge_temp_bytes"] < 2**20 and result["huge_rel_err"] < 1e-5
