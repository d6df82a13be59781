"""Decoding cost per token at far positions: the bounded Λ-cache against a full cache.

    python -m experiments.benchmark_decode [--preset tiny|llama2-7b] [--positions 1024 8192 65536]
                                           [--steps 32] [--out results/benchmark_decode.json]

For each position P the cache is put in the state it would have after P tokens (random
keys/values in exactly the slots real decoding would fill: for the Λ-cache the G sinks and
the last L positions, for the full cache all P), then ``--steps`` tokens are decoded in
one jitted `lax.scan` (greedy, feeding each token back) and timed after a warm-up call.
Memory: the cache's bytes and XLA's plan for the decoding call (arguments + outputs +
temporaries; weights included). Random weights: timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from lminf_jax.experiments.machine import machine
from lminf_jax.experiments.options import command_parser, int_option, output_file, parse_checked

if TYPE_CHECKING:
    import jax

    from lminf_jax.cache import KVCache
    from lminf_jax.models.decoder import LanguageModel

#: The presets as plain data (`PRESETS` builds them): a LLaMA config's fields, the dtype and G.
PRESET_SHAPES = {
    # a small LLaMA for CPUs: 4 layers, 4 heads of 64, L = 2048
    "tiny": (dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=2048), "float32", 10),
    # Llama-2-7B's shape (random bf16 weights), L = 4096 as the paper uses it
    "llama2-7b": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=4096), "bfloat16", 10),
}


@functools.cache
def _presets() -> dict[str, dict]:
    import jax.numpy as jnp

    from lminf_jax.models import llama

    return {name: dict(config=llama.LlamaConfig(**fields), dtype=getattr(jnp, dtype), global_branch=g)
            for name, (fields, dtype, g) in PRESET_SHAPES.items()}


def __getattr__(name: str):
    """``PRESETS``: each preset's ``config`` (a `LlamaConfig`), ``dtype`` and ``global_branch``, built on
    first use (they need jax)."""
    if name == "PRESETS":
        return _presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cache_at(model: LanguageModel, position: int, capacity: int, key: jax.Array, batch: int = 1) -> KVCache:
    """The model's empty cache for ``batch`` rows filled with random keys/values for positions
    ``0..position-1`` (only the slots decoding would have kept)."""
    import jax
    import jax.numpy as jnp

    cache = model.init_cache(batch, capacity=capacity)
    if cache.bounded:
        held = np.concatenate([np.arange(min(cache.sinks, position)),
                               np.arange(max(cache.sinks, position - cache.ring), position)])
    else:
        held = np.arange(position)
    update = cache.update_for(jnp.broadcast_to(jnp.asarray(held, jnp.int32), (batch, len(held))))
    k1, k2 = jax.random.split(key)
    random = lambda k, x: jax.random.normal(  # noqa: E731  (layers, batch, tokens, kv_heads, d)
        k, (x.shape[0], batch, len(held), x.shape[2], x.shape[4]), x.dtype)
    return cache.written(random(k1, cache.keys), random(k2, cache.values), update)


@functools.cache
def decoder_loop():
    """The jitted greedy decoding of ``steps`` tokens from ``token`` at ``position`` (one scan, the cache its
    carry, as `lminf_jax.decoding.generate` decodes), built on first use."""
    import jax
    import jax.numpy as jnp

    def decode(model: LanguageModel, params, token, position, cache, *, steps: int):
        def body(carry, _):
            token, position, cache = carry
            logits, cache = model(params, token, position, cache)
            return (jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32), position + 1, cache), token[:, 0]

        (_, _, cache), tokens = jax.lax.scan(body, (token, position, cache), None, length=steps)
        return tokens, cache

    return jax.jit(decode, static_argnames=("model", "steps"))


def measure(model, params, position: int, steps: int, repeats: int, batch: int = 1) -> dict:
    """ms per decoded token from ``position`` (``batch`` rows): a warm-up call, then ``repeats``
    timed calls, each continuing from the cache the previous one left."""
    import jax
    import jax.numpy as jnp

    cache = cache_at(model, position, position + steps * (repeats + 1), jax.random.key(position), batch)
    described, nbytes = cache.describe(), cache.nbytes
    token = jnp.ones((batch, 1), jnp.int32)
    compiled = decoder_loop().lower(model, params, token, jnp.full((batch, 1), position, jnp.int32), cache,
                            steps=steps).compile()
    mem = compiled.memory_analysis()
    planned = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    times = []
    for call in range(repeats + 1):
        pos = jnp.full((batch, 1), position + call * steps, jnp.int32)
        start = time.perf_counter()
        _, cache = jax.block_until_ready(compiled(params, token, pos, cache))
        if call:  # the first call warms up
            times.append(time.perf_counter() - start)
    best = min(times)
    return {"position": position, "batch": batch, "cache": described, "cache_bytes": nbytes,
            "ms_per_token": 1e3 * best / steps, "ms_per_token_median": 1e3 * float(np.median(times)) / steps,
            "planned_bytes": planned}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("benchmark_decode", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESET_SHAPES), default="tiny", help="model shape")
    parser.add_argument("--positions", type=int_option(0), nargs="+", default=[1024, 8192, 65536], metavar="P",
                        help="positions decoding starts from")
    parser.add_argument("--steps", type=int_option(1), default=32, help="tokens decoded per timed call")
    parser.add_argument("--repeats", type=int_option(1), default=3, help="timed calls (the best is kept)")
    parser.add_argument("--out", default="results/benchmark_decode.json", type=output_file, metavar="JSON",
                        help="the result (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    import jax
    import jax.numpy as jnp

    from lminf_jax.models import llama
    from lminf_jax import AttentionCall
    from lminf_jax.models.decoder import LanguageModel
    from lminf_jax.models.registry import FAMILIES
    from lminf_jax.spec import LMInfinite, Vanilla

    preset = _presets()[args.preset]
    cfg, dtype = preset["config"], preset["dtype"]
    window = cfg.max_position_embeddings
    params = FAMILIES["llama"].init_params(cfg, jax.random.key(0), dtype)
    methods = {
        f"LM-Infinite, Λ-cache (G={preset['global_branch']}, L={window})":
            LMInfinite(preset["global_branch"], window),
        "vanilla, full cache": Vanilla(),
    }
    device = jax.devices()[0]
    print(f"decoding benchmark: preset {args.preset}, {dtype.__name__ if hasattr(dtype, '__name__') else dtype}, "
          f"{device.platform} ({device.device_kind}), {args.steps} tokens per call, best of {args.repeats}")
    rows = []
    header = f"{'method':<40} {'position':>9} {'ms/token':>9} {'cache MiB':>10} {'plan MiB':>9}"
    print(header + "\n" + "-" * len(header))
    for name, spec in methods.items():
        model = LanguageModel(llama.decoder, cfg, AttentionCall(spec), dtype)
        for position in args.positions:
            r = dict(method=name, **measure(model, params, position, args.steps, args.repeats))
            rows.append(r)
            plan = "-" if r["planned_bytes"] is None else f"{r['planned_bytes'] / 2**20:.0f}"
            print(f"{name:<40} {position:>9} {r['ms_per_token']:>9.2f} {r['cache_bytes'] / 2**20:>10.1f} {plan:>9}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "preset": args.preset, "config": dataclasses.asdict(cfg), "dtype": jnp.dtype(dtype).name,
        **machine(), "steps": args.steps, "repeats": args.repeats, "rows": rows,
    }, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
