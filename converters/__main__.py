"""Convert a Hugging Face checkpoint directory into a `models` checkpoint.

    python -m converters HF_DIR OUT_DIR [--dtype bf16|fp32|fp16] [--no-progress] [--overwrite]

The family is resolved from config.json's ``model_type`` by `models.registry`, and its
checkpoint layout by `converters.families.layout_for`. The tokenizer files of HF_DIR
(`TOKENIZER_FILES`, whichever exist) are copied into OUT_DIR, so that a converted
directory is self-contained (`experiments.generate` reads its tokenizer there). A non-empty
OUT_DIR is refused, unless it is a converted checkpoint (its converted.json has this project's
format) and ``--overwrite`` is given: it is then replaced whole, everything in it included. Both
are checked before anything is read; the output is written beside OUT_DIR and renamed into place
only when complete, so a failed conversion leaves OUT_DIR as it was. Each parameter file is written
as the checkpoint is read, one checkpoint tensor at a time (`converters.convert.write_params`).
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import jax.numpy as jnp

from lminf_jax.converters.convert import write_params
from lminf_jax.converters.reader import CheckpointReader
from lminf_jax.converters.store import ConvertedWriter, staged_output

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}

#: Tokenizer files copied from HF_DIR into OUT_DIR (those that exist).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def copy_tokenizer(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy `TOKENIZER_FILES` present in `hf_dir` into `out_dir`; return the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(hf_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + weights)")
    parser.add_argument("out_dir", help="output directory for the converted checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point params (default: keep)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR whole if it is a converted checkpoint (another non-empty one is refused)")
    args = parser.parse_args(argv)

    from lminf_jax.converters.families import layout_for
    from lminf_jax.models.registry import family_for_config

    start = time.perf_counter()
    try:
        with staged_output(args.out_dir, overwrite=args.overwrite, source=args.hf_dir) as staging:
            reader = CheckpointReader(args.hf_dir)
            family = family_for_config(reader.config)
            layout = layout_for(family, family.config_from_hf(reader.config))
            writer = ConvertedWriter(staging)
            write_params(reader, layout, writer.param, dtype=DTYPES.get(args.dtype), progress=not args.no_progress)
            writer.finish(reader.config, family.name)
            copied = copy_tokenizer(args.hf_dir, staging)
    except (OSError, ValueError, ImportError) as e:  # bad input: the message says what and where
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out_dir).absolute()
    specs = writer.manifest.values()
    dtypes = sorted({spec["dtype"] for spec in specs})
    count = sum(math.prod(spec["shape"]) for spec in specs)
    print(
        f"converted {family.name}: {count:,} parameters in {len(specs)} arrays, "
        f"dtype {'/'.join(dtypes)}, {time.perf_counter() - start:.1f} s, peak host RSS {_peak_rss_mb():.0f} MB\n"
        f"wrote {out}\n"
        + (f"copied tokenizer files: {', '.join(copied)}" if copied
           else f"no tokenizer files in {args.hf_dir} (looked for {', '.join(TOKENIZER_FILES)}): none copied")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
