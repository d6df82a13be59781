"""Speed against what a user would otherwise run: `transformers` (PyTorch, sdpa attention) on the
same weights, measured side by side in one run on this machine.

    python -m experiments.benchmark_peers [--hidden 256] [--layers 4] [--heads 4] [--vocab 4096]
        [--forward-length 8192] [--window 512] [--prompt 4096] [--positions 4096 16384 65536]
        [--steps 32] [--attention-lengths 8192 16384] [--attention-window 2048] [--repeats 3]
        [--out results/benchmark_peers.json]

Needs the test extra (torch, transformers). A random LLaMA (``--hidden`` wide, ``--layers`` deep,
``--heads`` heads of 64, float32, seeded) is built in `transformers`, saved with
``save_pretrained`` and loaded here through the project's converter, so both run the same weights;
their logits on 128 tokens must agree (max abs difference below 1e-3) before anything is timed.

1. **forward**: the logits of ``--forward-length`` tokens: `transformers` vanilla against this
   project's vanilla (blockwise) and LM-Infinite (G = 10, L = ``--window``).
2. **decode**: greedy decoding after a ``--prompt``-token prompt, ms per token without the prefill:
   `transformers.generate` (its dynamic cache; the time of ``1 + --steps`` new tokens minus that of
   one) against this project's full cache at the prompt length and its Λ-cache at each of
   ``--positions`` (one jitted scan of ``--steps`` tokens from a cache filled as decoding would have
   left it, `experiments.benchmark_decode.measure`).
3. **attention**: one layer's attention, ``--heads`` x 64, no positional encoding: torch's
   `scaled_dot_product_attention` (causal) against the blockwise path, vanilla and LM-Infinite
   (L = ``--attention-window``); FLOP rates count the (query, key) pairs each mask attends, 4 d FLOPs
   per pair per head.

Every figure is the best of ``--repeats`` timed calls after a warm-up. Prints one table per section
with the ratio to `transformers` / torch (higher: this project is faster) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import load_model
from lminf_jax.experiments.options import command_parser, int_option, output_file, run_cli
from lminf_jax.experiments.machine import machine
from lminf_jax.evaluation.resume import write_json_atomic

SINKS = 10
PARITY_TOKENS = 128
PARITY_TOLERANCE = 1e-3


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("benchmark_peers", __doc__)
    p.add_argument("--hidden", type=int_option(64), default=256, help="hidden size, a multiple of 64 (default 256)")
    p.add_argument("--layers", type=int_option(1), default=4, help="layers of the random model")
    p.add_argument("--heads", type=int_option(1), default=4, help="attention heads of 64 (default 4)")
    p.add_argument("--vocab", type=int_option(16), default=4096, help="vocabulary size of the random model")
    p.add_argument("--forward-length", type=int_option(PARITY_TOKENS), default=8192, metavar="T",
                   help="tokens of the timed forward pass")
    p.add_argument("--window", type=int_option(1), default=512, help="LM-Infinite's L in the model (default 512)")
    p.add_argument("--prompt", type=int_option(1), default=4096, help="prompt tokens before decoding (default 4096)")
    p.add_argument("--positions", type=int_option(1), nargs="+", default=[4096, 16384, 65536], metavar="P",
                   help="positions of the Λ-cache decoding (default 4096 16384 65536)")
    p.add_argument("--steps", type=int_option(1), default=32, help="tokens per timed decoding call (default 32)")
    p.add_argument("--attention-lengths", type=int_option(1), nargs="+", default=[8192, 16384], metavar="T",
                   help="sequence lengths of the attention-only section")
    p.add_argument("--attention-window", type=int_option(1), default=2048, metavar="L",
                   help="LM-Infinite's L in the attention-only section")
    p.add_argument("--repeats", type=int_option(1), default=3, help="timed calls (the best is kept)")
    p.add_argument("--out", default="results/benchmark_peers.json", type=output_file, metavar="JSON",
                   help="the result (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def hf_model(args: argparse.Namespace, directory: Path):
    """A seeded random `transformers` LLaMA in float32, saved in ``directory``."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()  # e.g. generating past max_position_embeddings, on purpose
    transformers.utils.logging.disable_progress_bar()

    if args.hidden % 64 or args.hidden // 64 != args.heads:
        raise ValueError(f"--hidden must be --heads x 64 (heads of 64), got {args.hidden} and {args.heads}")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, head_dim=64, max_position_embeddings=args.window,
                         rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def ratio_row(name: str, ms: float, reference_ms: float, **extra) -> dict:
    return {"variant": name, "ms": ms, "speedup": reference_ms / ms, **extra}


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import torch

    from lminf_jax import AttentionCall
    from lminf_jax.spec import LMInfinite, Vanilla

    record = {"settings": {**vars(args), **machine(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "transformers": __import__("transformers").__version__}}
    print(f"{record['settings']['cpu']}, {record['settings']['cpus']} cores: jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)", file=sys.stderr)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        peer = hf_model(args, Path(tmp))
        family, config, params = load_model(tmp)
    ours = {name: family.model(config, AttentionCall(spec), jnp.float32)
            for name, spec in (("vanilla", Vanilla()), ("lm_infinite", LMInfinite(SINKS, args.window)))}

    tokens = rng.integers(0, args.vocab, (1, args.forward_length))
    with torch.no_grad():
        want = peer(torch.from_numpy(tokens[:, :PARITY_TOKENS])).logits.numpy()
    got = np.asarray(ours["vanilla"].forward(params, jnp.asarray(tokens[:, :PARITY_TOKENS], jnp.int32)))
    record["parity_max_abs"] = float(np.max(np.abs(got - want)))
    print(f"same weights: max |logits - transformers'| over {PARITY_TOKENS} tokens = {record['parity_max_abs']:.2e}",
          file=sys.stderr)
    if not record["parity_max_abs"] < PARITY_TOLERANCE:
        raise ValueError(f"the two models disagree ({record['parity_max_abs']:.2e} >= {PARITY_TOLERANCE}): "
                         "timing them would compare different computations")

    record["forward"] = forward_section(args, peer, ours, params, tokens)
    record["decode"] = decode_section(args, peer, ours, params, rng)
    record["attention"] = attention_section(args, rng)
    out = Path(args.out)
    write_json_atomic(out, record)
    print(format_tables(record))
    print(f"wrote {out}")
    return 0


def forward_section(args, peer, ours, params, tokens: np.ndarray) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from lminf_jax.experiments.benchmark import best_of

    t = args.forward_length
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        reference = best_of(lambda: peer(ids).logits, args.repeats)
    rows = [ratio_row("transformers, vanilla (sdpa)", 1e3 * reference, 1e3 * reference, tokens_per_s=t / reference)]
    x = jnp.asarray(tokens, jnp.int32)
    for name, label in (("vanilla", "this project, vanilla (blockwise)"),
                        ("lm_infinite", f"this project, LM-Infinite (G={SINKS}, L={args.window})")):
        forward = jax.jit(ours[name].forward)
        seconds = best_of(lambda: forward(params, x).block_until_ready(), args.repeats)
        rows.append(ratio_row(label, 1e3 * seconds, 1e3 * reference, tokens_per_s=t / seconds))
    _print_rows(f"forward, {t:,} tokens", rows)
    return rows


def decode_section(args, peer, ours, params, rng: np.random.Generator) -> list[dict]:
    import torch

    from lminf_jax.experiments.benchmark import best_of
    from lminf_jax.experiments.benchmark_decode import measure

    prompt = torch.from_numpy(rng.integers(0, args.vocab, (1, args.prompt)))

    def generate(new: int):
        with torch.no_grad():
            return peer.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    one = best_of(lambda: generate(1), args.repeats)
    more = best_of(lambda: generate(1 + args.steps), args.repeats)
    reference = 1e3 * (more - one) / args.steps
    rows = [ratio_row(f"transformers.generate, dynamic cache, after {args.prompt:,}", reference, reference,
                      position=args.prompt)]
    full = measure(ours["vanilla"], params, args.prompt, args.steps, args.repeats)
    rows.append(ratio_row("this project, full cache", full["ms_per_token"], reference, position=args.prompt,
                          cache_bytes=full["cache_bytes"]))
    for position in args.positions:
        bounded = measure(ours["lm_infinite"], params, position, args.steps, args.repeats)
        rows.append(ratio_row(f"this project, Λ-cache (G={SINKS}, L={args.window})", bounded["ms_per_token"],
                              reference, position=position, cache_bytes=bounded["cache_bytes"]))
    _print_rows("greedy decoding, ms per token", rows, key="position")
    return rows


def attention_section(args, rng: np.random.Generator) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from lminf_jax import attention
    from lminf_jax.experiments.benchmark import attended_pairs, best_of
    from lminf_jax.spec import LMInfinite, Vanilla

    h, d = args.heads, 64
    rows = []
    for t in args.attention_lengths:
        q, k, v = (rng.standard_normal((1, t, h, d), np.float32) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, T, d)
        causal_flops = 4 * h * d * attended_pairs(t, None)
        with torch.no_grad():
            reference = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True),
                                args.repeats)
        torch_rate = causal_flops / reference / 1e9
        rows.append({"T": t, "variant": "torch sdpa, causal", "ms": 1e3 * reference, "gflops": torch_rate,
                     "of_torch_rate": 1.0})
        pos = jnp.arange(t, dtype=jnp.int32)
        jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
        for label, spec, flops in (
                ("this project, vanilla (blockwise)", Vanilla(), causal_flops),
                (f"this project, LM-Infinite (blockwise, G={SINKS}, L={args.attention_window})",
                 LMInfinite(SINKS, args.attention_window),
                 4 * h * d * attended_pairs(t, args.attention_window, SINKS))):
            fn = jax.jit(lambda q, k, v, spec=spec: attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec,
                                                              implementation="blockwise"))
            seconds = best_of(lambda: fn(jq, jk, jv).block_until_ready(), args.repeats)
            rate = flops / seconds / 1e9
            rows.append({"T": t, "variant": label, "ms": 1e3 * seconds, "gflops": rate,
                         "of_torch_rate": rate / torch_rate})
        _print_rows(f"attention at {t:,}", rows[-3:], key="T")
    return rows


def _print_rows(title: str, rows: list[dict], key: str | None = None) -> None:
    print(f"{title}: " + "; ".join(
        f"{r['variant']}{'' if key is None else f' @ {r[key]:,}'} {r['ms']:,.2f} ms" for r in rows),
        file=sys.stderr, flush=True)


def format_tables(record: dict) -> str:
    """The three sections as markdown tables."""
    lines = ["| forward | ms | tokens/s | speed-up vs transformers |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']:,.0f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |"
              for r in record["forward"]]
    lines += ["", "| decoding | position | ms/token | speed-up vs transformers |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['position']:,} | {r['ms']:.2f} | {r['speedup']:.2f}x |"
              for r in record["decode"]]
    lines += ["", "| attention | T | ms | GFLOP/s on attended pairs | of torch's rate |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['T']:,} | {r['ms']:,.1f} | {r['gflops']:,.1f} | {r['of_torch_rate']:.0%} |"
              for r in record["attention"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
