"""Argument types that check a command-line value when it is parsed, before any work starts.

argparse calls a ``type=`` function on every given value and on string defaults, and turns its
`argparse.ArgumentTypeError` into ``error: argument --out: ...`` with the usage (exit code 2). So
an option declared with one of these types can never reach the expensive part of a run with a
value that would fail there, or silently wrap:

* `int_option(minimum)`: an integer in ``[minimum, 2**31 - 1]``. Every integer option of the
  experiment CLIs ends up in int32 device arithmetic (positions, counts, sizes) or bounds one.
* `output_file`: a file path that can be written (not a directory; its folder exists or can be
  created); `output_dir`: a folder that exists or can be created, and can be written into;
  `plot_file`: an `output_file` whose extension is a format matplotlib saves (checked before a
  run, not after it has written its JSON).
* `input_path`: a path the command reads (a model or checkpoint directory, a tokens, text,
  prompts or instances file). It checks nothing by itself; it marks the option for
  `parse_checked`, which refuses any output option whose path is an input's or lies inside an
  existing input directory (symlinks and ``..`` resolved), so no run can overwrite what it reads.

Writability is probed by creating (and removing) a temporary file in the nearest existing
folder: permission bits say nothing for root or on a read-only file system.

What every command's parser shares (`command_parser`, `add_output_args`): ``--help`` shows each
option's default (`DefaultsHelpFormatter`); ``--out`` is the result (a JSON file, or a folder for
commands that write several), and a plot is ``--plot`` (default: the result's path with ``.png``,
filled in by `parse_checked` so that it is checked like any output) unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from lminf_jax.evaluation.resume import write_json_atomic
from lminf_jax.int32 import INT32_MAX


def int_option(minimum: int, maximum: int = INT32_MAX) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            upper = "2**31 - 1" if maximum == INT32_MAX else str(maximum)
            raise argparse.ArgumentTypeError(f"must lie in [{minimum}, {upper}], got {value}")
        return value

    return parse


def output_file(text: str) -> str:
    """An argparse type: a file path this process can write (its folders may not exist yet)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} exists and is not writable")
    _check_creatable(path.parent)
    return text


def output_dir(text: str) -> str:
    """An argparse type: a folder that exists or can be created, and can be written into."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    _check_creatable(path)
    return text


def _check_creatable(folder: Path) -> None:
    """Raise unless files can be created in `folder` (or in its nearest existing ancestor, from
    which the missing folders would be made)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {folder}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write in {existing}: {e.strerror or e}") from None


def plot_file(text: str) -> str:
    """An argparse type: a writable file path (`output_file`) whose extension names a format
    matplotlib saves (``FigureCanvasBase.get_supported_filetypes()``: png, pdf, svg, ...); without
    matplotlib, where no plot is drawn (the command says so), only the path is checked."""
    output_file(text)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return text
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = Path(text).suffix[1:].lower()
    if extension not in formats:
        what = f".{extension} files" if extension else "a file without an extension"
        raise argparse.ArgumentTypeError(f"{text}: matplotlib cannot save {what}; use one of "
                                         f"{', '.join(sorted(formats))}")
    return text


def input_path(text: str) -> str:
    """An argparse type marking a path the command reads (see the module docstring); returns it as is."""
    return text


def check_outputs_apart(outputs: Iterable[tuple[str, str]], inputs: Iterable[tuple[str, str]]) -> None:
    """Raise a ValueError naming both options when an output path (``(option, path)`` pairs) is an
    existing input path or lies inside an existing input directory, after resolving symlinks and
    ``..``. Inputs that do not exist hold nothing to lose (e.g. ``--source stdlib``, a keyword)."""
    existing = [(option, path, Path(path).resolve()) for option, path in inputs if Path(path).exists()]
    for out_option, out in outputs:
        target = Path(out).resolve()
        for in_option, path, source in existing:
            if target == source or source in target.parents:
                where = "is" if target == source else "lies inside"
                raise ValueError(f"{out_option} {out} {where} the input {in_option} {path}: a run never writes "
                                 "where it reads; choose an output outside it")


def parsed_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list, list]:
    """``(outputs, inputs)``: the ``(option, path)`` pairs of `args` whose options have type
    `output_file` / `output_dir` / `plot_file`, or `input_path`."""
    outputs, inputs = [], []
    for action in parser._actions:  # argparse keeps every registered action here, groups included
        value = getattr(args, action.dest, None)
        if value is None or action.type not in (output_file, output_dir, plot_file, input_path):
            continue
        option = action.option_strings[-1] if action.option_strings else action.metavar or action.dest.upper()
        pairs = [(option, str(v)) for v in (value if isinstance(value, list) else [value])]
        (inputs if action.type is input_path else outputs).extend(pairs)
    return outputs, inputs


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, the plot's path derived (`derive_plot`), then `check_outputs_apart`
    on its marked paths: a conflict is an argparse error (usage, ``error: ...``, exit code 2) before
    any work."""
    args = parser.parse_args(argv)
    try:
        derive_plot(args)
        check_outputs_apart(*parsed_paths(parser, args))
    except ValueError as e:
        parser.error(str(e))
    return args


# ----- what every command's parser shares -------------------------------------------------------


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default: appended as ``(default: X)`` unless the help says it
    already (an option whose default is None, e.g. one taken from the model, says it in its help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        value = action.default
        if "default" in text or action.required or value is None or value is False or value == argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def command_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.NAME``: its description is `doc`'s first paragraph, its
    help shows every default."""
    return argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0],
                                   formatter_class=DefaultsHelpFormatter)


def add_output_args(parser: argparse.ArgumentParser, default: str | None, what: str, plot: str | None = None,
                    folder: bool = False) -> None:
    """``--out`` (`what` the command writes there: a file, or with ``folder`` a folder; a None `default`:
    nothing is written without it) and, when the command draws `plot`, ``--no-plot`` and (the plot of a
    file result) ``--plot``."""
    parser.add_argument("--out", default=default, type=output_dir if folder else output_file,
                        metavar="DIR" if folder else "JSON",
                        help=what if default is not None else f"{what} (default: none written)")
    if plot is None:
        return
    if not folder:
        parser.add_argument("--plot", type=plot_file, metavar="PNG",
                            help=f"{plot}; the format from the extension: png, pdf, svg, ... (default: --out "
                                 "with .png)")
    parser.add_argument("--no-plot", action="store_true", help=f"do not draw the {plot}")


def derive_plot(args: argparse.Namespace) -> None:
    """Fill in ``--plot`` when it was not given (and not ``--no-plot``): the result's path with ``.png``
    (``--from-json``'s when a command redraws a saved result, else ``--out``'s), so that runs with
    different results never draw over each other's plot. A ValueError when the plot would be the
    result file itself."""
    result = getattr(args, "from_json", None) or getattr(args, "out", None)
    if "plot" not in vars(args) or getattr(args, "no_plot", False) or result is None:
        return
    if args.plot is None:
        args.plot = str(Path(result).with_suffix(".png"))
    if Path(args.plot).resolve() == Path(result).resolve():
        raise ValueError(f"--plot {args.plot} is the result file {result}: give another --plot or --out")


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """`experiments.options.parse_checked` (which also refuses an output where an input is), or the
    exit code when argparse exits (it has printed the usage and ``error: ...`` on stderr, or the
    help), so that ``main(argv)`` returns a code."""
    try:
        return parse_checked(parser, argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def save_result(record: dict, out: str | os.PathLike, draw: Callable[[dict, Path], object] | None = None,
                plot_path: str | os.PathLike | None = None) -> None:
    """Write `record` as JSON at `out` (atomically: `lminf_jax.evaluation.resume.write_json_atomic`), draw it
    with ``draw(record, plot_path)`` when both are given, and print where they went."""
    out = Path(out)
    write_json_atomic(out, record)
    where = [str(out)]
    if draw is not None and plot_path is not None:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        draw(record, Path(plot_path))
        where.append(str(plot_path))
    print(f"wrote {' and '.join(where)}")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """A CLI's ``main``: parse, then ``run(args)``; bad input (OSError, ValueError, ImportError)
    prints ``error: ...`` on stderr and returns 1."""
    args = parse_cli(parser, argv)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except (OSError, ValueError, ImportError) as e:  # bad input: the message says what and where
        print(f"error: {e}", file=sys.stderr)
        return 1
