"""What ``python -m experiments.perplexity`` shows of a result record (its ``--out`` JSON): the table
of perplexity per method and length (`format_table`, `headline`), the plot (`plot`), and both again
for a saved result (``--from-json``: `show_saved`)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path


def format_table(record: dict) -> str:
    """Perplexity per method (rows) and length (columns, with their multiple of L_train)."""
    lengths, l_train = record["settings"]["lengths"], record["settings"]["l_train"]
    width = max(9, *(len(f"{n:,}") + 1 for n in lengths))
    lines = [f"{'method':<16}" + "".join(f"{n:>{width},}" for n in lengths),
             f"{'(x L_train)':<16}" + "".join(f"{n / l_train:>{width}g}" for n in lengths)]
    name_width = max(16, *(len(name) + 2 for name in record["methods"]))
    lines = [f"{line[:16]:<{name_width}}{line[16:]}" for line in lines]
    for name, res in record["methods"].items():
        lines.append(f"{name:<{name_width}}" + "".join(f"{_ppl_text(p):>{width}}" for p in res["lengths"]))
    costs = [(name, res["lengths"][-1]) for name, res in record["methods"].items()
             if "attended_keys" in res["lengths"][-1]]
    if costs:
        lines += ["", f"{f'at {lengths[-1]:,} tokens':<{name_width}}{'keys/query':>12}{'cache bytes/token':>19}"
                      f"{'KV cache':>12}"]
        lines += [f"{name:<{name_width}}{p['attended_keys']:>12,.0f}{p['cache_bytes_per_token']:>19,.0f}"
                  f"{_bytes(p['cache_bytes']):>12}" for name, p in costs]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ppl_text(point: dict) -> str:
    """A length point's perplexity for the table: ``nan`` when a score was NaN, ``inf`` when it
    overflowed (JSON holds None for both; ``nan_scores`` tells them apart)."""
    value = point["ppl"]
    if value is None:
        return "nan" if point.get("nan_scores") else "inf"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.2f}"


def headline(record: dict) -> list[str]:
    """The paper's two claims as ratios to the perplexity at L_train, where measured."""
    lengths, l_train = record["settings"]["lengths"], record["settings"]["l_train"]
    lines = []
    for name, multiple in (("lm_infinite", max(lengths) // l_train), ("vanilla", 16)):
        n = multiple * l_train
        if name in record["methods"] and l_train in lengths and n in lengths and n != l_train:
            ppl = {p["length"]: p["ppl"] for p in record["methods"][name]["lengths"]}
            if ppl[n] is not None and ppl[l_train] is not None:
                lines.append(f"{name}: perplexity at {multiple} x L_train ({n:,}) / at L_train ({l_train:,}) = "
                             f"{ppl[n]:.4g} / {ppl[l_train]:.4g} = {ppl[n] / ppl[l_train]:.3f}")
    return lines


def plot(record: dict, path: Path) -> bool:
    """Draw a result record (the ``--out`` JSON): left, perplexity vs length (log-log), one line
    per method with ``exp(NLL +- 2 standard errors)`` shaded; right, mean NLL by query position of
    the longest sequences. False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    settings, methods = record["settings"], record["methods"]
    fig = Figure(figsize=(12, 4.4) if len(methods) <= 6 else (14, 5.2))
    left, right = fig.subplots(1, 2)
    for i, (name, res) in enumerate(methods.items()):
        color, points = _color(i, len(methods)), [p for p in res["lengths"] if p["ppl"] is not None]
        style = _line_style(res["attention"])
        lengths = [p["length"] for p in points]
        left.plot(lengths, [p["ppl"] for p in points], marker="o", markersize=3, color=color, linestyle=style,
                  label=name)
        sem = [p["nll_sem"] or 0.0 for p in points]
        left.fill_between(lengths, [math.exp(p["nll"] - 2 * e) for p, e in zip(points, sem)],
                          [math.exp(p["nll"] + 2 * e) for p, e in zip(points, sem)], color=color,
                          alpha=0.15 if len(methods) <= 6 else 0.05)
        rows = [r for r in res["buckets"] if r["nll"] is not None]
        right.plot([math.sqrt((r["lo"] + 1) * r["hi"]) for r in rows], [r["nll"] for r in rows], color=color,
                   linestyle=style, label=name, linewidth=1.2)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.axvline(settings["l_train"], color="gray", linestyle="--", linewidth=0.8)
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_xlabel("sequence length (tokens); shaded: exp(NLL +- 2 s.e.)")
    left.set_ylabel("perplexity (log scale)")
    left.legend(fontsize=7, ncol=1 if len(methods) <= 8 else 2)
    right.set_xlabel("tokens seen by the query (position + 1), longest sequences")
    right.set_ylabel("mean NLL (nats / token)")
    fig.suptitle(f"{settings['family']} ({Path(settings['model']).name}), L_train {settings['l_train']:,}: "
                 f"{settings['segments']} segment(s) x {settings['segment_tokens']:,} tokens, every length on "
                 "the same tokens", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def _color(i: int, count: int):
    if count <= 10:
        return f"C{i}"
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _line_style(attention: dict) -> str:
    """Solid: a mask method; dashed: a frequency method at each length's factor; dotted: at a fixed one."""
    if attention.get("frequency") is None:
        return "-"
    return "--" if attention.get("factor") == "per length" else ":"


def print_table(record: dict) -> None:
    """Print a result's table (`format_table`) and its `headline` lines on stdout."""
    print(format_table(record))
    for line in headline(record):
        print(line)


def plotting_available() -> bool:
    """Whether matplotlib can draw (`plot`)."""
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError:
        return False
    return True


def show_saved(path: str, png: str | None) -> int:
    """Table (and plot at `png`) of a saved result."""
    from lminf_jax.converters.reader import read_json_object

    record = read_json_object(Path(path))
    if not isinstance(record.get("settings"), dict) or not isinstance(record.get("methods"), dict):
        raise ValueError(f"{path} is not a result of experiments.perplexity (no settings / methods)")
    print_table(record)
    if png is not None:
        if not plot(record, Path(png)):
            raise ImportError("matplotlib is not installed: no plot (pip install matplotlib)")
        print(f"wrote {png}")
    return 0
