"""What the retrieval and eviction methods cost beside LM-Infinite: prefill and decoding time, keys per
query and bytes, side by side at each length, on one model shape.

    python -m experiments.benchmark_retrieval [--lengths 4096 16384 65536] [--steps 16]
        [--measure lm_infinite longheads infllm sirllm xl3m] [--out results/benchmark_retrieval.json]

The model is the shipped small LLaMA's shape (4 layers, 4 heads of 64, L_train 512) with random float32
weights (timing does not depend on their values); each method has its defaults for L_train 512 (those
passkey and RULER use). One prompt of n random tokens per length.

* keys per query: what the last prompt token attends (LM-Infinite G + L; LongHeads, InfLLM: their
  `attended_keys`; SirLLM: its cache; XL3M: its key context);
* device bytes: the cache with the method's state, as allocated for the prompt plus the new tokens
  (XL3M: the scoring pass's batch and the key context's cache); nothing is held in host memory.

Timing: the prompt taken in (512-token calls; a retrieval method's in one call, as the tasks run it; SirLLM in
its turns; XL3M: its scoring pass, which chooses the key context), then ``--steps`` greedy tokens in one
jitted loop with the cache as its carry (as `lminf_jax.decoding.generate` decodes; SirLLM: its own step per
token), each timed after a warm-up run that compiles it. XL3M's tokens decode over its key context.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np

from lminf_jax.experiments.benchmark_decode import decoder_loop
from lminf_jax.experiments.machine import machine
from lminf_jax.experiments.options import command_parser, int_option, output_file, parse_checked, save_result

#: The model shape: the shipped LLaMA-style model's (`experiments/shipped/llama-small-stdlib`).
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=512)
METHODS = ("lm_infinite", "longheads", "infllm", "sirllm", "xl3m")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("benchmark_retrieval", __doc__)
    parser.add_argument("--lengths", type=int_option(1024), nargs="+", default=[4096, 16384, 65536], metavar="N",
                        help="prompt lengths")
    parser.add_argument("--steps", type=int_option(1), default=16, help="decoded tokens timed per length")
    parser.add_argument("--measure", nargs="+", choices=METHODS, default=list(METHODS), metavar="M",
                        help=f"the methods measured, of {', '.join(METHODS)} (each at its defaults)")
    parser.add_argument("--out", default="results/benchmark_retrieval.json", type=output_file, metavar="JSON",
                        help="the result (JSON)")
    return parser


def keys_and_bytes(name: str, model, spec, n: int, new: int) -> tuple[int, int]:
    """Keys the prompt's last token attends and the device bytes of the method's cache (and state)."""
    from lminf_jax.entropy_cache import SirLLM
    from lminf_jax.evaluation.xl3m import XL3M

    l_train = SHAPE["max_position_embeddings"]
    if name == "sirllm":
        policy = SirLLM.for_model(l_train)
        return policy.size, model.cache_bytes(capacity=policy.size) + policy.score_bytes
    if name == "xl3m":
        settings = XL3M.for_model(l_train, new)
        scoring = 8 * (1 + settings.segment_length + settings.question_length)
        return settings.budget, max(model.cache_bytes(capacity=settings.budget), model.cache_bytes(capacity=scoring))
    keys = int(spec.attended_keys(np.asarray([n - 1]))[0])
    return keys, model.cache_bytes(capacity=None if spec.bounded else n + new)


def measure(name: str, model, params, n: int, steps: int) -> dict:
    """Seconds to take in the n-token prompt (``prefill_s``) and ms per token decoded after it, each timed
    after a warm-up run that compiles it (the prompt's programs, then the decoding step's)."""
    import jax
    import jax.numpy as jnp

    from lminf_jax.entropy_cache import SirLLM, sirllm_generate
    from lminf_jax.evaluation.xl3m import XL3M, key_context, model_entropy

    prompt = [1, *np.random.default_rng(n).integers(3, SHAPE["vocab_size"], n - 1).tolist()]
    l_train = SHAPE["max_position_embeddings"]

    def timed(run):
        run()  # compiles
        start = time.perf_counter()
        result = jax.block_until_ready(run())
        return time.perf_counter() - start, result

    if name == "sirllm":
        policy = SirLLM.for_model(l_train)
        positional = model.decoder().positional

        def feed():
            cache = model.init_cache(1, capacity=policy.size)
            return sirllm_generate(model, params, [prompt], policy, positional=positional, max_new_tokens=0,
                                   cache=cache)[1]

        prefill, state = timed(feed)
        decode, _ = timed(lambda: sirllm_generate(model, params, [[]], policy, positional=positional,
                                                  max_new_tokens=steps, cache=state)[1].scores)
        return {"prefill_s": prefill, "ms_per_token": 1e3 * decode / steps}
    if name == "xl3m":
        settings = XL3M.for_model(l_train, steps)
        entropy_of = model_entropy(model, params, settings)
        prefill, context = timed(lambda: jnp.asarray(key_context(prompt, entropy_of, settings).tokens))
        prompt = np.asarray(context).tolist()  # then vanilla on the key context
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    fresh = lambda: model.init_cache(1, capacity=None if model.spec.bounded else len(prompt) + steps)  # noqa: E731
    chunk = len(prompt) if model.spec.retrieves else min(512, len(prompt))

    def take_in():
        cache = fresh()
        for first in range(0, len(prompt), chunk):
            logits, cache = model.last_logits(params, tokens[:, first:first + chunk], positions[:, first:first + chunk],
                                              cache)
        return cache

    took, cache = timed(take_in)
    if name != "xl3m":
        prefill = took

    loop = functools.partial(decoder_loop(), model, params, tokens[:, :1], jnp.full((1, 1), len(prompt), jnp.int32),
                             cache, steps=steps)
    decoding, _ = timed(lambda: loop()[0])
    return {"prefill_s": prefill, "ms_per_token": 1e3 * decoding / steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    import jax
    import jax.numpy as jnp

    from lminf_jax import AttentionCall
    from lminf_jax.experiments.methods import method_spec
    from lminf_jax.models import llama
    from lminf_jax.models.registry import FAMILIES

    config = llama.LlamaConfig(**SHAPE)
    params = FAMILIES["llama"].init_params(config, jax.random.key(0), jnp.float32)
    print(f"retrieval benchmark: the shipped LLaMA's shape, float32, {machine()['device']}, {args.steps} tokens decoded")
    header = f"{'method':<12} {'length':>7} {'prefill s':>10} {'ms/token':>9} {'keys/query':>11} {'device MiB':>11}"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for name in args.measure:
        spec = method_spec("vanilla" if name in ("sirllm", "xl3m") else name, config)
        model = FAMILIES["llama"].model(config, AttentionCall(spec))
        for n in sorted(args.lengths):
            keys, nbytes = keys_and_bytes(name, model, spec, n, 1 + args.steps)
            row = {"method": name, "attention": spec.describe(), "length": n, **measure(name, model, params, n, args.steps),
                   "keys_per_query": keys, "device_bytes": nbytes, "host_bytes": 0}
            rows.append(row)
            print(f"{name:<12} {n:>7,} {row['prefill_s']:>10.2f} {row['ms_per_token']:>9.2f} {keys:>11,} "
                  f"{nbytes / 2**20:>11.1f}", flush=True)
    save_result({"shape": SHAPE, "dtype": "float32", **machine(), "steps": args.steps, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
