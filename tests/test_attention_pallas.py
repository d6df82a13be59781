"""The fused Pallas Λ-attention kernel (interpreted on CPU, compiled with Triton on a GPU: the
device check runs this module there) against the float64 oracle: every bounded spec, RoPE (half
and interleaved partial), ALiBi and none, GQA, a length that is no multiple of the blocks, float32
and bfloat16; its contract errors; a model run through it."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (POSITIONALS, case_seed, grid, in_turn, make_positional, naive_positional_kwargs,
                      naive_spec_kwargs, product, random_model, random_qkv, rel_err)
from naive_attention import naive_attention

from lminf_jax import AttentionCall, LMInfinite, LambdaMask, SlidingWindow, StreamingLLM, Vanilla, attention
from lminf_jax.attention_pallas import check_triton_shapes, lambda_attention

#: Off GPU the kernel body runs through XLA; on a GPU the same tests compile it.
INTERPRET = jax.default_backend() != "gpu"

SPECS = {
    "lm_infinite": LMInfinite(3, 40),
    "lm_infinite_d_lt_l": LMInfinite(3, 40, 25),
    "sliding_window": SlidingWindow(33),
    "lambda_mask": LambdaMask(2, 20),
    "streaming_llm": StreamingLLM(4, 30),
}


# core: each kind under one encoding, the encodings in turn
@pytest.mark.parametrize("spec_name,positional_name", grid(product(sorted(SPECS), POSITIONALS),
                                                           core=in_turn(sorted(SPECS), POSITIONALS)))
def test_kernel_matches_naive_oracle(spec_name, positional_name):
    b, t, hq, hkv, d = 2, 150, 4, 2, 16
    q, k, v = random_qkv(case_seed(spec_name, positional_name), b, t, t, hq, hkv, d)
    spec, positional = SPECS[spec_name], make_positional(positional_name, d, hq)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    want, want_lse = naive_attention(q, k, v, pos, pos, scale=d**-0.5, **naive_spec_kwargs(spec),
                                     **naive_positional_kwargs(positional), return_lse=True)
    got, lse = lambda_attention(q, k, v, spec=spec, positional=positional, scale=d**-0.5, block_q=32, block_k=16,
                                interpret=INTERPRET)
    assert got.shape == (b, t, hq, d) and rel_err(got, want) < 1e-5
    assert lse.shape == (b, t, hq) and np.max(np.abs(np.asarray(lse) - want_lse)) < 1e-4


@pytest.mark.parametrize("positional_name", ["rope_half", "alibi"])
def test_kernel_lowers_to_triton_for_the_gpu(positional_name):
    """No GPU needed: lowering for CUDA runs the Triton lowering of the whole kernel body, which
    rejects what Triton cannot compile (an op without a rule, a bad block shape)."""
    hq, d = 4, 64
    q = jax.ShapeDtypeStruct((1, 256, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16)
    kernel = functools.partial(lambda_attention, spec=SPECS["lm_infinite"], positional=make_positional(
        positional_name, d, hq), scale=d**-0.5, block_q=64, block_k=64, interpret=False)
    lowered = jax.jit(kernel).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @__gpu$xla.gpu.triton" in lowered
    # float32 tiles multiply in float32, not Triton's default TF32
    f32 = jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(kv.shape, jnp.float32)
    dots = str(jax.make_jaxpr(kernel)(f32[0], f32[1], f32[1])).split("dot_general[")[1:]
    precisions = [re.search(r"precision=([^\n]*)", d).group(1) for d in dots]
    assert len(dots) == 4 and all(p.startswith("(Precision.HIGHEST, Precision.HIGHEST)") for p in precisions), dots


def test_kernel_in_bfloat16_and_through_attention():
    b, t, hq, hkv, d = 1, 200, 4, 1, 32
    q, k, v = random_qkv(5, b, t, t, hq, hkv, d)
    spec, positional = SPECS["lm_infinite"], make_positional("rope_half", d, hq)
    pos = np.arange(t, dtype=np.int32)
    want = naive_attention(q, k, v, pos[None], pos[None], scale=d**-0.5, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(positional))
    low = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_positions=pos, k_positions=pos, spec=spec,
                    positional=positional, implementation="pallas", block_q=64, block_k=32)
    assert low.dtype == jnp.bfloat16 and rel_err(low.astype(jnp.float32), want) < 1e-2


def test_kernel_contract_errors():
    q, k, v = random_qkv(0, 1, 20, 20, 2, 2, 16)
    pos = np.arange(20, dtype=np.int32)
    with pytest.raises(ValueError, match="bounded sinks and no top-k"):
        attention(q, k, v, q_positions=pos, k_positions=pos, spec=Vanilla(), implementation="pallas")
    with pytest.raises(ValueError, match="positions 0..T-1"):
        attention(q, k, v, q_positions=pos + 1, k_positions=pos + 1, spec=SPECS["lm_infinite"], implementation="pallas")
    with pytest.raises(ValueError, match="same length"):
        attention(q[:, :5], k, v, q_positions=pos[:5], k_positions=pos, spec=SPECS["lm_infinite"],
                  implementation="pallas")
    with pytest.raises(ValueError, match="head_dim to be a power of two >= 16, got 24"):
        check_triton_shapes(24, 24, 64, 64)


def test_model_forward_through_the_kernel_equals_blockwise():
    family, cfg, params = random_model("llama_gqa")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 70)), jnp.int32)
    spec = LMInfinite(2, 24)
    want = family.model(cfg, AttentionCall(spec, "blockwise", 16, 16)).forward(params, tokens)
    model = family.model(cfg, AttentionCall(spec, "pallas", 16, 16))
    assert rel_err(model.forward(params, tokens), want) < 1e-5
    with pytest.raises(ValueError, match="positions cannot be given"):
        model.forward(params, tokens, jnp.arange(70))
    cache = model.init_cache(2)  # cached steps run the chunked and single-query paths, not the kernel
    logits, _ = model(params, tokens[:, :30], jnp.broadcast_to(jnp.arange(30), (2, 30)), cache)
    assert rel_err(logits, want[:, :30]) < 1e-5
