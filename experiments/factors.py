"""The paper's three out-of-distribution factors, measured on a model's attention and hidden states.

    python -m experiments.factors [MODEL_DIR] [--factors logits entropy sinks] [--sequences S]
        [--multiple M] [--source stdlib|FOLDER|FILE.jsonl | --tokens F.npy | --text FILE ...] [--tokenizer DIR]
        [--methods M [M ...]] [-G G] [-L L] [-D D] [--group-size g] [--leak k] [--dtype fp32] [--block N]
        [--out results/factors] [--no-plot]

MODEL_DIR defaults to the shipped LLaMA-style model; L is its pretraining length. The text is S
held-out segments of ``T = M x L`` tokens (default 2 x 16 L), each BOS + tokens, as in
`experiments.perplexity` (same options). Attention statistics come from `LanguageModel.probe`:
per layer, head and probed query, computed blockwise over the keys (no T x T array).

1. ``logits`` -- unseen distances: the largest attention logit at each relative distance (half-
   octave buckets, max over heads, mean over the probed queries), for the 8 queries nearest the
   end of each segment (they see every distance up to T), under vanilla attention and LM-Infinite.
   The paper's factor 1: logits grow at distances never seen in training.
2. ``entropy`` -- unseen numbers of tokens: the attention entropy (nats, mean over layers and
   heads) of the query at position n - 1, for n = L/8 ... T, under vanilla, the Λ-mask alone and
   LM-Infinite; by causality one pass per segment gives every n. Factor 2: vanilla entropy keeps
   rising with the number of attended tokens.
3. ``sinks`` -- the starting tokens: a 2-D PCA of each layer's hidden states over the first L
   positions of the first segment (are the first tokens in a region of their own?), their
   distance from the other tokens' centroid, and the mean NLL of the segments under LM-Infinite
   with G = 0, 1, 4, 10, 100 sink tokens (the paper's starting-token ablation; G = 0 is the sliding
   window) and vanilla.

``--methods`` measures factors 1 and 2 under other methods instead (any method of the grammar
``MASK[@cover][+FREQ[@FACTOR]]``, e.g. ``pi yarn self_extend``; a frequency method without ``@`` at
factor T / L), to see what each length-extension method shows the model at unseen distances and
lengths. The method parameters (-G, -L, -D, --group-size, --leak) apply to every method that takes
them (the sink ablation of factor 3 sets G itself).

Each factor writes ``OUT/factorK_NAME.json`` and ``.png`` (``--out``, a folder) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import (
    DTYPES, load_config, load_model, params_dtype, pretraining_length, resolve_dtype,
)
from lminf_jax.experiments.methods import add_methods_arg, checked_methods, method_options, method_spec, MethodChoice
from lminf_jax.experiments.options import add_output_args, command_parser, int_option, run_cli
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import add_text_args, bos_id, check_ids, token_stream
from lminf_jax.evaluation.resume import write_json_atomic

FACTORS = ("logits", "entropy", "sinks")
SINK_COUNTS = (0, 1, 4, 10, 100)
PROBED_QUERIES = 8


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("factors", __doc__)
    add_model_arg(p)
    p.add_argument("--factors", nargs="+", choices=FACTORS, default=list(FACTORS), metavar="FACTOR",
                   help=f"which to measure, of {', '.join(FACTORS)}")
    add_text_args(p)
    p.add_argument("--sequences", type=int_option(1), default=2, metavar="S", help="held-out segments")
    p.add_argument("--multiple", type=int_option(1), default=16, metavar="M", help="segment length T = M x L")
    add_methods_arg(p, None, unset="for logits vanilla lm_infinite, for entropy vanilla lambda_mask lm_infinite")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the stored weights' dtype)")
    p.add_argument("--block", type=int_option(1), default=512, metavar="N", help="blockwise attention block size")
    add_output_args(p, "results/factors", "the folder of each factor's JSON and plot", plot="plots", folder=True)
    return p


# ----- measurements -----------------------------------------------------------------------------


class Setup:
    """The model, its pretraining length and the held-out segments shared by the factors."""

    def __init__(self, args: argparse.Namespace):
        import jax.numpy as jnp

        from lminf_jax.evaluation.perplexity import bos_sequences

        family, config = load_config(args.model_dir)
        self.l_train = pretraining_length(config)
        self.length = args.multiple * self.l_train
        self.block = args.block
        self.options = method_options(args)
        self.methods = None
        if args.methods is not None:
            if not {"logits", "entropy"} & set(args.factors):
                raise ValueError("--methods applies to the factors logits and entropy, and none of them is measured")
            self.methods = [MethodChoice.parse(m) for m in checked_methods(args.methods, everything=None)]
            for choice in self.methods:  # a method that cannot apply fails before any work
                self._build(family, config, choice, jnp.float32)
        stream, self.source = token_stream(args)
        check_ids(stream, config.vocab_size)
        self.bos = bos_id(args.model_dir, args.tokenizer)
        self.tokens = bos_sequences(stream, args.sequences, self.length, self.bos)
        self.family, self.config, self.params = load_model(args.model_dir, args.dtype)
        self.dtype = resolve_dtype(args.dtype) or params_dtype(self.params)

    def model(self, method: str | MethodChoice, **options):
        """The model under ``method`` (a mask method's name, or a `MethodChoice`), with the method
        parameters given on the command line, and ``options`` over them."""
        choice = method if isinstance(method, MethodChoice) else MethodChoice(method)
        return self._build(self.family, self.config, choice, self.dtype, **options)

    def _build(self, family, config, choice: MethodChoice, dtype, **options):
        from lminf_jax import AttentionCall

        spec = method_spec(choice.mask, config, **{**self.options, **options})
        call = AttentionCall(spec, block_q=self.block, block_k=self.block,
                             frequencies=choice.frequencies(self.length, self.l_train))
        return family.model(config, call, dtype)

    def compared(self, default: tuple[str, ...]) -> list[MethodChoice]:
        """``--methods``, else the factor's own ``default`` methods."""
        return self.methods or [MethodChoice(m) for m in default]

    def settings(self) -> dict:
        return {"family": self.family.name, "l_train": self.l_train, "segments": int(self.tokens.shape[0]),
                "segment_length": self.length, "bos_id": self.bos, "source": self.source,
                "compute_dtype": self.dtype.name, "method_options": self.options}


def max_logit_by_distance(setup: Setup) -> dict:
    """Factor 1: per method, the max logit per distance bucket (max over heads; per layer and
    the max over layers), mean over the probed queries of every segment."""
    import jax.numpy as jnp

    from lminf_jax.probes import bucket_table

    t = setup.length
    rows = np.unique(np.linspace(t - 1 - setup.l_train // 2, t - 1, PROBED_QUERIES).astype(int))
    bounds = bucket_table(t - 1)
    out = {"rows": rows.tolist(), "bucket_bounds": bounds.tolist(), "methods": {}}
    for choice in setup.compared(("vanilla", "lm_infinite")):
        model, method = setup.model(choice), choice.name
        per_layer = []
        for seq in setup.tokens:
            probe = model.probe(setup.params, jnp.asarray(seq[None]), rows)
            per_layer.append(np.asarray(probe.attention.bucket_max)[:, 0].max(axis=1))  # (layers, R, nb)
        x = np.concatenate(per_layer, axis=1)  # (layers, S*R, nb); -inf where a bucket has no key
        out["methods"][method] = {
            "attention": _describe(model),
            "max_over_layers": _finite_mean(x.max(axis=0)),
            "per_layer": [_finite_mean(layer) for layer in x],
        }
    return out


def entropy_by_length(setup: Setup) -> dict:
    """Factor 2: attention entropy of the query at n - 1, mean over layers and heads (and per
    layer), mean over segments, for n = L/8 ... T (doubling)."""
    import jax.numpy as jnp

    lengths = []
    n = max(2, setup.l_train // 8)
    while n <= setup.length:
        lengths.append(n)
        n *= 2
    rows = np.asarray(lengths) - 1
    out = {"lengths": lengths, "methods": {}}
    for choice in setup.compared(("vanilla", "lambda_mask", "lm_infinite")):
        model, method = setup.model(choice), choice.name
        entropy, attended = [], []
        for seq in setup.tokens:
            probe = model.probe(setup.params, jnp.asarray(seq[None]), rows)
            entropy.append(np.asarray(probe.attention.entropy)[:, 0])  # (layers, H, R)
            attended.append(np.asarray(probe.attention.attended)[:, 0, 0, :])  # (layers, R)
        e = np.stack(entropy)  # (S, layers, H, R)
        out["methods"][method] = {
            "attention": _describe(model),
            "entropy": e.mean(axis=(0, 1, 2)).tolist(),
            "per_layer": e.mean(axis=(0, 2)).tolist(),
            "max_head": e.mean(axis=0).max(axis=1).max(axis=0).tolist(),
            "attended": np.stack(attended)[0, 0].tolist(),
        }
    return out


def starting_tokens(setup: Setup) -> dict:
    """Factor 3: PCA of the hidden states of the first L positions per layer, the distance of the
    first tokens from the rest, and NLL with G = 0, 1, 4, 10, 100 sinks (and vanilla)."""
    import jax.numpy as jnp

    from lminf_jax.evaluation.perplexity import sequence_nll

    n = min(setup.l_train, setup.length)
    first = min(10, n // 4)
    model = setup.model("vanilla")
    probe = model.probe(setup.params, jnp.asarray(setup.tokens[:1, :n]), np.arange(n))
    layers = []
    for h in np.asarray(probe.hidden, np.float64)[:, 0]:  # (n, width) per layer
        centred = h - h.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        rest = coords[first:]
        spread = float(np.sqrt(((rest - rest.mean(0)) ** 2).sum(1).mean()))
        gap = np.linalg.norm(coords[:first] - rest.mean(0), axis=1) / max(spread, 1e-12)
        layers.append({"pca": coords.tolist(), "explained": (s[:2] ** 2 / max((s**2).sum(), 1e-30)).tolist(),
                       "first_distance": gap.tolist(), "position0_distance": float(gap[0])})
    ablation = {}
    for g in SINK_COUNTS:
        nll = sequence_nll(setup.model("lm_infinite", global_branch=g).forward, setup.params, setup.tokens)
        ablation[f"G={g}"] = _nll_summary(nll, setup.l_train)
    ablation["vanilla"] = _nll_summary(sequence_nll(model.forward, setup.params, setup.tokens), setup.l_train)
    return {"positions": n, "first_tokens": first, "layers": layers, "ablation": ablation}


def _describe(model) -> str:
    scaling = model.call.frequencies
    return model.spec.describe() + ("" if scaling is None else f" + RoPE {scaling.kind} x{scaling.factor:g}")


def _nll_summary(nll: np.ndarray, l_train: int) -> dict:
    x = np.asarray(nll, np.float64)
    return {"nll": float(x.mean()), "nll_beyond_l_train": float(x[:, l_train:].mean()) if x.shape[1] > l_train
            else None}


def _finite_mean(x: np.ndarray) -> list:
    """Mean over axis 0 of the finite entries (None where there is none)."""
    count = np.isfinite(x).sum(axis=0)
    total = np.where(np.isfinite(x), x, 0.0).sum(axis=0)
    return [float(v) if c else None for v, c in zip(total / np.maximum(count, 1), count)]


# ----- tables and plots -------------------------------------------------------------------------


def logits_table(result: dict) -> str:
    w = _column_width(result)
    lines = [f"{'distance':>15}" + "".join(f"{m:>{w}}" for m in result["methods"])]
    for i, (lo, hi) in enumerate(result["bucket_bounds"]):
        values = [result["methods"][m]["max_over_layers"][i] for m in result["methods"]]
        if all(v is None for v in values):
            continue
        span = f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"
        lines.append(f"{span:>15}" + "".join(f"{'-' if v is None else f'{v:.2f}':>{w}}" for v in values))
    return "\n".join(lines)


def _column_width(result: dict) -> int:
    return max(14, *(len(m) + 2 for m in result["methods"]))


def entropy_table(result: dict) -> str:
    w = _column_width(result)
    lines = [f"{'length':>8}" + "".join(f"{m:>{w}}" for m in result["methods"]) + f"{'log(n)':>10}"]
    for i, n in enumerate(result["lengths"]):
        lines.append(f"{n:>8,}" + "".join(f"{result['methods'][m]['entropy'][i]:>{w}.3f}" for m in result["methods"])
                     + f"{math.log(n):>10.3f}")
    return "\n".join(lines)


def sinks_table(result: dict) -> str:
    lines = [f"{'layer':>6} {'PC1+PC2 var':>12} {'position 0 / spread':>20}"]
    for i, layer in enumerate(result["layers"]):
        lines.append(f"{i:>6} {sum(layer['explained']):>12.3f} {layer['position0_distance']:>20.2f}")
    lines.append(f"{'sinks':>6} {'mean NLL':>12} {'NLL beyond L':>20}")
    for name, row in result["ablation"].items():
        beyond = "-" if row["nll_beyond_l_train"] is None else f"{row['nll_beyond_l_train']:.4f}"
        lines.append(f"{name:>6} {row['nll']:>12.4f} {beyond:>20}")
    return "\n".join(lines)


def _figure(ncols: int, width: float = 6.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, ncols))


def _line_plot(curves: dict, l_train: int, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """One line per entry of ``curves`` (label -> (x, y)), log2 x axis, L_train marked."""
    fig, (ax,) = _figure(1)
    for i, (label, (x, y)) in enumerate(curves.items()):
        ax.plot(x, y, marker="o", markersize=4, color=f"C{i}", label=label)
    ax.axvline(l_train, color="gray", linestyle="--", linewidth=0.8, label=f"L_train = {l_train}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_logits(result: dict, l_train: int, path: Path) -> None:
    centres = [math.sqrt(max(lo, 0.5) * hi) for lo, hi in result["bucket_bounds"]]
    curves = {}
    for method, res in result["methods"].items():
        pts = [(c, v) for c, v in zip(centres, res["max_over_layers"]) if v is not None]
        curves[f"{method}: max over layers and heads"] = tuple(zip(*pts))
    _line_plot(curves, l_train, path, "relative distance i - j", "largest attention logit",
               "Factor 1: attention logits vs distance")


def plot_entropy(result: dict, l_train: int, path: Path) -> None:
    curves = {method: (result["lengths"], res["entropy"]) for method, res in result["methods"].items()}
    _line_plot(curves, l_train, path, "sequence length n (query at position n - 1)",
               "attention entropy, mean over layers and heads (nats)", "Factor 2: attention entropy vs length")


def plot_sinks(result: dict, path: Path) -> None:
    layers = result["layers"]
    fig, axes = _figure(len(layers) + 1, width=3.6)
    first = result["first_tokens"]
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        xy = np.asarray(layer["pca"])
        ax.scatter(xy[first:, 0], xy[first:, 1], s=4, c=np.log2(np.arange(first, len(xy)) + 1), cmap="viridis")
        ax.scatter(xy[:first, 0], xy[:first, 1], s=18, color="red", label=f"positions 0-{first - 1}")
        ax.scatter(xy[:1, 0], xy[:1, 1], s=40, marker="x", color="black", label="position 0")
        ax.set_title(f"hidden states entering layer {i}" if i < len(layers) - 1 else "after the last layer",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    names = list(result["ablation"])
    values = [result["ablation"][n]["nll_beyond_l_train"] or result["ablation"][n]["nll"] for n in names]
    ax.bar(range(len(names)), values, color=["C0"] * (len(names) - 1) + ["C3"])
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("mean NLL beyond L_train (nats)")
    ax.set_title("sink-token ablation (LM-Infinite)", fontsize=8)
    fig.suptitle("Factor 3: the starting tokens", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ----- the command ------------------------------------------------------------------------------


MEASURES = {
    "logits": ("factor1_logits", max_logit_by_distance, logits_table, plot_logits),
    "entropy": ("factor2_entropy", entropy_by_length, entropy_table, plot_entropy),
    "sinks": ("factor3_sinks", starting_tokens, sinks_table, plot_sinks),
}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    setup = Setup(args)
    from lminf_jax.evaluation.streaming import finite_or_none

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{setup.family.name} from {args.model_dir} (L_train {setup.l_train:,}): {setup.tokens.shape[0]} "
          f"segment(s) x {setup.length:,} tokens", file=sys.stderr)
    for factor in args.factors:
        stem, measure, table, draw = MEASURES[factor]
        result = measure(setup)
        record = finite_or_none({"settings": {**setup.settings(), "model": str(args.model_dir)}, **result})
        print(f"\n{stem}\n{table(record)}")
        path = out_dir / f"{stem}.json"
        write_json_atomic(path, record)
        written = [str(path)]
        if not args.no_plot:
            png = out_dir / f"{stem}.png"
            if factor == "sinks":
                draw(record, png)
            else:
                draw(record, setup.l_train, png)
            written.append(str(png))
        print(f"wrote {' and '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
