"""Sharded models on 8 simulated CPU devices (`tests.multidevice`): the forward pass of each family whose
layout or positions no other covers (every family with --extended) under tensor, FSDP, data and context
parallelism equals the single-device one; parameters and
caches are created in their shards; cached decoding keeps its shardings; the context-parallel
model moves only halos and sinks."""

from __future__ import annotations

import pytest
from multidevice import run_on_devices

SCRIPT = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from flax import traverse_util
from lminf_jax import AttentionCall, LMInfinite, Vanilla, frequency_method
from lminf_jax.sharding import ShardingPlan, make_mesh
from lminf_jax.models import registry

CONFIGS = {
 "llama": {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "attention_bias": True},
 "gptj": {"model_type": "gptj", "vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 8, "rotary_dim": 4},
 "mpt": {"model_type": "mpt", "vocab_size": 96, "d_model": 64, "n_layers": 2, "n_heads": 8, "no_bias": False,
         "attn_config": {"alibi": True, "qk_ln": True}},
 "bloom": {"model_type": "bloom", "vocab_size": 96, "hidden_size": 64, "n_layer": 2, "n_head": 8},
 # native windows on layers 0 and 2 (lax.cond per layer, context parallel in both branches), soft-capped scores
 "gemma2": {"model_type": "gemma2", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8, "sliding_window": 12,
            "attn_logit_softcapping": 5.0},
 "neox": {"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 8, "rotary_pct": 0.5},
}
MESHES = {"tp8": (dict(model=8), False), "dp2-tp4-fsdp": (dict(data=2, model=4), True),
          "dp2-cp4": (dict(data=2, seq=4), False), "cp2-tp4": (dict(seq=2, model=4), False), "cp8": (dict(seq=8), False)}
# Every family runs the two meshes that combine all four axes (its own parameter axes under TP,
# FSDP and DP; its positional encoding under CP); llama runs every mesh, and vanilla (under seq, XLA
# gathers the keys: no context parallelism, nothing family-specific) runs on llama only.
FAMILY_MESHES = ("dp2-tp4-fsdp", "cp2-tp4")
# families whose positions another family already runs under CP (BLOOM: MPT's ALiBi; NeoX: half-layout
# partial RoPE as llama's and gptj's) run their parameter axes only
PARAMETER_MESHES = ("dp2-tp4-fsdp",)
VANILLA_MESHES = ("dp2-tp4-fsdp", "cp2-tp4")
# Creating parameters in their shards and cached decoding are family-independent code over each family's
# declared shardings and cache shape: run on the layouts that differ (fused Wqkv: MPT; per-layer native
# windows: Gemma 2; GPT-J's parallel block) and llama; every family's declared q sharding is still checked.
CREATED_IN_SHARDS = ("llama", "gptj", "mpt")
DECODED = ("llama", "mpt", "gemma2")
# The core run (without --extended) runs the forward passes and creates parameters for the families whose layouts
# and positions no other covers (llama, MPT's fused Wqkv and ALiBi, Gemma 2's windows); GPT-J's parallel block,
# BLOOM's and NeoX's forward and GPT-J's creation in shards run with --extended.
EXTENDED = "--extended" in sys.argv[1:]
CORE = ("llama", "mpt", "gemma2")
rng = np.random.default_rng(0)
out = {"forward": [], "init": [], "decode": []}

def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

def collectives(fn, *args):
    hlo = fn.lower(*args).compile().as_text()
    return sorted(set(re.findall(r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\b", hlo)))

for name, hf in CONFIGS.items():
    fam = registry.family_for_config(hf)
    cfg = fam.config_from_hf(hf)
    params = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                          fam.init_params(cfg, jax.random.key(1)))
    tokens = jnp.asarray(rng.integers(0, 96, (2, 50)), jnp.int32)  # 50: not a multiple of the seq axis
    runs = ((LMInfinite(3, 12), MESHES), (Vanilla(), VANILLA_MESHES))
    for spec, meshes in (runs if name == "llama" else runs[:1]) if EXTENDED or name in CORE else ():
        meshes = meshes if name == "llama" else PARAMETER_MESHES if name in ("bloom", "neox") else FAMILY_MESHES
        call = AttentionCall(spec, block_q=8, block_k=8)
        ref = fam.model(cfg, call).forward(params, tokens)
        for mesh_name in meshes:
            sizes, fsdp = MESHES[mesh_name]
            plan = ShardingPlan(make_mesh(**sizes), fsdp)
            shardings = fam.param_shardings(cfg, plan)
            placed = jax.device_put(params, traverse_util.unflatten_dict(shardings, sep="."))
            got = fam.model(cfg, call, jnp.float32, plan).forward(placed, tokens)
            out["forward"].append({"family": name, "spec": spec.kind, "mesh": mesh_name, "rel_err": rel(got, ref),
                                   "split": sum(any(a is not None for a in s.spec) for s in shardings.values())})

    # parameters created in their shards equal the unsharded ones
    plan = ShardingPlan(make_mesh(data=2, model=4), fsdp=True)
    wanted = fam.param_shardings(cfg, plan)
    case = {"family": name,
            "q_split": [list(wanted[n].spec) for n in wanted if re.search(r"(q_proj|Wqkv|query)\.weight", n)]}
    if name in CREATED_IN_SHARDS and (EXTENDED or name in CORE):
        created = traverse_util.flatten_dict(fam.init_params(cfg, jax.random.key(3), plan=plan), sep=".")
        plain = traverse_util.flatten_dict(fam.init_params(cfg, jax.random.key(3)), sep=".")
        case.update(equal=all(np.array_equal(created[n], plain[n]) for n in plain),
                    placed=all(created[n].sharding == wanted[n] for n in plain))
    out["init"].append(case)

    # cached decoding: a sharded cache gives the single-device logits and keeps its shardings
    for spec in (LMInfinite(3, 12), Vanilla())[:2 if name == "llama" else 1 if name in DECODED else 0]:
        plan = ShardingPlan(make_mesh(data=2, model=4))
        plain_model = fam.model(cfg, AttentionCall(spec, block_q=8, block_k=8))
        model = fam.model(cfg, AttentionCall(spec, block_q=8, block_k=8), jnp.float32, plan)
        placed = jax.device_put(params, traverse_util.unflatten_dict(fam.param_shardings(cfg, plan), sep="."))
        caches = [plain_model.init_cache(2, capacity=40), model.init_cache(2, capacity=40)]
        first = caches[1].keys.sharding
        errs, kept = [], True
        for start, length in ((0, 20), (20, 1), (21, 9)):
            toks = tokens[:, start:start + length]
            pos = jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), toks.shape)
            (a, caches[0]), (b, caches[1]) = plain_model(params, toks, pos, caches[0]), model(placed, toks, pos, caches[1])
            errs.append(rel(b, a))
            kept &= caches[1].keys.sharding.is_equivalent_to(first, 5) and caches[1].positions.sharding.spec[0] == "data"
        out["decode"].append({"family": name, "spec": spec.kind, "rel_err": max(errs), "cache_sharding_kept": kept,
                              "cache_spec": list(first.spec)})

# the context-parallel model moves halos (collective-permute) and sinks (all-reduce), never the sequence
fam = registry.family_for_config(CONFIGS["llama"])
cfg = fam.config_from_hf(CONFIGS["llama"])
plan = ShardingPlan(make_mesh(seq=8))
model = fam.model(cfg, AttentionCall(LMInfinite(3, 12), block_q=8, block_k=8), jnp.float32, plan)
params = fam.init_params(cfg, jax.random.key(0), plan=plan)
long_tokens = jnp.asarray(rng.integers(0, 96, (1, 512)), jnp.int32)
out["cp_collectives"] = collectives(jax.jit(model.forward), params, long_tokens)
try:
    model.forward(params, long_tokens, jnp.arange(512))
except ValueError as e:
    out["positions_error"] = str(e)

# dynamic NTK (frequencies follow each call's length through a host callback) under a plan
hf = dict(CONFIGS["llama"], max_position_embeddings=8)
cfg = fam.config_from_hf(hf)
params = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      fam.init_params(cfg, jax.random.key(1)))
call = AttentionCall(LMInfinite(3, 12), block_q=8, block_k=8, frequencies=frequency_method("dynamic_ntk", 2.0, 8))
plain, plan = fam.model(cfg, call), ShardingPlan(make_mesh(data=2, model=4))
model = fam.model(cfg, call, jnp.float32, plan)
placed = jax.device_put(params, traverse_util.unflatten_dict(fam.param_shardings(cfg, plan), sep="."))
tokens = tokens[:, :40]
errs = [rel(model.forward(placed, tokens), plain.forward(params, tokens))]
caches = [plain.init_cache(2), model.init_cache(2)]
for start, length in ((0, 20), (20, 1)):
    toks = tokens[:, start:start + length]
    pos = jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), toks.shape)
    (a, caches[0]), (b, caches[1]) = plain(params, toks, pos, caches[0]), model(placed, toks, pos, caches[1])
    errs.append(rel(b, a))
out["dynamic_ntk"] = errs
try:
    cp = fam.model(cfg, call, jnp.float32, ShardingPlan(make_mesh(seq=8)))
    cp.forward(fam.init_params(cfg, jax.random.key(0), plan=cp.sharding), long_tokens)
except ValueError as e:
    out["dynamic_ntk_cp_error"] = str(e)
out["extended"] = EXTENDED
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result(request) -> dict:
    return run_on_devices(SCRIPT, *(["--extended"] if request.config.getoption("--extended") else []))


def test_sharded_forward_equals_one_device_for_every_family_and_mesh(result):
    assert len(result["forward"]) == (5 + 2) + 2 * 2 + (2 + 2 * 1 if result["extended"] else 0)
    assert {c["mesh"] for c in result["forward"] if c["family"] == "mpt"} == {"dp2-tp4-fsdp", "cp2-tp4"}
    for case in result["forward"]:
        assert case["rel_err"] <= 1e-5, case
    # tensor parallelism really splits weights (heads, MLP, vocab) where the counts divide
    assert all(c["split"] >= 5 for c in result["forward"] if "tp" in c["mesh"]), result["forward"]


def test_params_are_created_in_their_shards(result):
    created = sorted(c["family"] for c in result["init"] if "equal" in c)
    assert created == ["gptj"] * result["extended"] + ["llama", "mpt"]
    for case in result["init"]:
        assert case.get("equal", True) and case.get("placed", True), case
    q = {c["family"]: c["q_split"] for c in result["init"]}
    assert q["llama"] == q["gptj"] == q["bloom"] == q["neox"] == q["gemma2"] == [[None, "model", "data"]]
    assert q["mpt"] == [[None, None, "data"]]  # the fused Wqkv output stays whole


def test_sharded_cache_decoding_equals_one_device(result):
    assert len(result["decode"]) == 2 + 1 * 2
    for case in result["decode"]:
        assert case["rel_err"] <= 1e-5 and case["cache_sharding_kept"], case
        assert case["cache_spec"] == [None, "data", "model", None, None], case  # (layers, B, Hkv, S, d)


def test_context_parallel_model_moves_only_halos_and_sinks(result):
    assert result["cp_collectives"] == ["all-reduce", "collective-permute"], result["cp_collectives"]
    assert "positions cannot be given" in result["positions_error"]


def test_dynamic_ntk_runs_sharded_and_is_refused_context_parallel(result):
    assert len(result["dynamic_ntk"]) == 3 and max(result["dynamic_ntk"]) <= 1e-5, result["dynamic_ntk"]
    assert "does not split RoPE that follows the sequence length" in result["dynamic_ntk_cp_error"]
