"""Every command of experiments/: ``--help`` without jax, and one vocabulary of the options they share."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lminf_jax.experiments.methods import TOP_K_DEFAULTS, TOP_K_OPTIONS, top_k_from_args
from lminf_jax.experiments.loading import NoTokenizer, open_tokenizer
from lminf_jax.experiments.options import DefaultsHelpFormatter, parse_checked
from lminf_jax.method_parameters import PARAMETERS
from lminf_jax.spec import TopK

ROOT = Path(__file__).resolve().parents[1]
#: Every command: a module of experiments/ with a ``main``.
COMMANDS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if "\ndef main(" in p.read_text())
#: Commands not yet in line, and why: --help without jax, and the shared vocabulary.
NOT_YET = {"benchmark": "experiments/benchmark.py imports jax first (its --preset default asks jax for the backend)"}
NOT_YET_VOCABULARY = {**NOT_YET, "benchmark_scale": "its --plot has a fixed default and --sections no help"}
#: Modules that are lm-eval's command line, present only with lm-eval installed.
NEEDS = {"lm_eval_model": "lm_eval"}

HELP_SCRIPT = """
import runpy, sys
sys.argv = ["python -m experiments.{name}", "--help"]
try:
    runpy.run_module("experiments.{name}", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = "no exit"
print("RESULT", code, sorted(m for m in ("jax", "flax", "orbax", "optax") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """The last line of ``python -m experiments.NAME --help`` run in a fresh interpreter for every
    command at once (``RESULT <exit code> <heavy modules it imported>``), or its stderr when it failed."""
    running = {name: subprocess.Popen([sys.executable, "-c", HELP_SCRIPT.format(name=name)], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name in COMMANDS if importlib.util.find_spec(NEEDS.get(name, "argparse"))}
    out = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        lines = stdout.strip().splitlines()
        out[name] = lines[-1] if lines and lines[-1].startswith("RESULT") else stderr
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NOT_YET[n], strict=True))
                                  if n in NOT_YET else n for n in COMMANDS])
def test_help_parses_before_jax_is_imported(name, helps):
    if name not in helps:
        pytest.skip(f"needs {NEEDS[name]}")
    assert helps[name] == "RESULT 0 []", helps[name]


def test_every_command_is_checked():
    assert {"perplexity", "passkey", "ruler", "continuation", "factors", "generate", "stream_nll", "train",
            "corpus", "lm_eval_model"} <= set(COMMANDS)


# ----- the vocabulary the parsers share ----------------------------------------------------------


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (lm-eval's command line and `NOT_YET_VOCABULARY` aside)."""
    modules = {name: importlib.import_module(f"lminf_jax.experiments.{name}")
               for name in COMMANDS if name not in NOT_YET_VOCABULARY and name not in NEEDS}
    return {name: module.build_parser() for name, module in modules.items()}


PARSERS = _parsers()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _having(flag: str) -> dict[str, argparse.Action]:
    """``{command: its action}`` of every parser that has `flag`."""
    return {name: _options(p)[flag] for name, p in PARSERS.items() if flag in _options(p)}


def _signature(action: argparse.Action) -> tuple:
    """What makes two registrations of an option the same: flags, dest, default, nargs, metavar, choices and
    the type's behaviour on a few values."""
    probes = ("0", "1", "7", str(2**31), "x", "lm_infinite", "vanilla+yarn@4", "lm_infinite+ntk@2", "nope")

    def typed(text: str):
        try:
            return action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            return f"refused: {e}"

    return (tuple(action.option_strings), action.dest, action.default, action.nargs, action.metavar, action.choices,
            tuple(typed(p) for p in probes) if action.type is not None else None)


def _argv(parser: argparse.ArgumentParser, tmp_path: Path) -> list[str]:
    """The least a parser takes: its required positionals and one option of each required group."""
    argv = [str(tmp_path) for a in parser._actions if not a.option_strings and a.nargs is None]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[-1], str(tmp_path / "input")]
    return argv


def test_method_commands_share_the_method_parameters_top_k_and_tokenizer():
    choosers = {name for name, p in PARSERS.items() if {"--method", "--methods"} & set(_options(p))}
    assert {"perplexity", "passkey", "ruler", "continuation", "factors", "generate", "stream_nll"} <= choosers
    parameters = [a.option_strings[-1] for a in PARSERS["generate"]._actions if a.dest in PARAMETERS]
    assert len(parameters) == len(PARAMETERS)
    for flag in [*parameters, "--tokenizer"]:
        having = _having(flag)
        assert choosers <= set(having), (flag, choosers - set(having))
        assert len({_signature(a) for a in having.values()}) == 1, flag
        assert len({a.help for a in having.values()}) == 1, flag
    for flag in ("-G", "-L", "-D", "--group-size", "--leak"):
        assert flag in _options(PARSERS["generate"])


def test_the_method_grammar_is_one():
    for flag in ("--method", "--methods"):
        having = _having(flag)
        for name, action in having.items():
            for text in ("lm_infinite", "vanilla+yarn@4", "lm_infinite+ntk@2", "self_extend@cover"):
                assert action.type(text) == text, (name, text)
            for text in ("nope", "yarn@0.5", "lm_infinite@cover", "vanilla+"):
                with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"method '{text}'")):
                    action.type(text)
    assert _options(PARSERS["generate"])["--method"].default == "lm_infinite"
    for name, parser in PARSERS.items():
        assert "--rope-scaling" not in _options(parser), name


def test_top_k_options_have_one_set_of_names_and_defaults():
    flags = ["--" + name.replace("_", "-") for name in TOP_K_OPTIONS]
    having = {name for name, p in PARSERS.items() if set(flags) & set(_options(p))}
    assert {"generate", "stream_nll", "passkey", "ruler"} <= having
    for flag in flags:
        actions = _having(flag)
        assert set(actions) == having, flag  # all four wherever one is
        assert len({_signature(a) for a in actions.values()}) == 1 and {a.default for a in actions.values()} == {None}
    declared = {field.name: field.default for field in dataclasses.fields(TopK)}
    for name in having:  # the first layer's default, as help shows it, is TopK's
        assert f"default: {declared['from_layer']}" in _options(PARSERS[name])["--top-k-from-layer"].help
    assert "--top-k" in _options(PARSERS["generate"]) and _options(PARSERS["generate"])["--top-k"].dest == "top_k"
    assert not [name for name, p in PARSERS.items() if "--top-k" in _options(p) and name != "generate"]
    none = argparse.Namespace(**dict.fromkeys(TOP_K_OPTIONS))
    assert top_k_from_args(none, 512, 32) is None
    assert top_k_from_args(argparse.Namespace(**{**vars(none), "top_k_middle": 3}), 512, 32) == TopK(3, 256)
    assert top_k_from_args(none, 512, 32, k=TOP_K_DEFAULTS["k"]) == TopK(declared["k"], 256, declared["from_layer"])
    # a model with no layer from the declared one on: its last layer (the shipped passkey models have 4)
    assert top_k_from_args(none, 512, 4, k=5) == TopK(5, 256, 3)
    assert top_k_from_args(argparse.Namespace(**{**vars(none), "top_k_from_layer": 1}), 512, 4, k=5) == TopK(5, 256, 1)
    with pytest.raises(ValueError, match="--top-k-to-layer needs --top-k-middle"):
        top_k_from_args(argparse.Namespace(**{**vars(none), "top_k_to_layer": 2}), 512, 32)


def test_the_plot_defaults_to_the_result_with_png(tmp_path):
    plotting = {name: p for name, p in PARSERS.items() if "--plot" in _options(p)}
    assert {"perplexity", "passkey", "ruler", "continuation", "stream_nll"} <= set(plotting)
    for name, parser in PARSERS.items():
        assert "--json" not in _options(parser) and "--out-dir" not in _options(parser), name
        assert "--out" in _options(parser), name  # every command writes its result at --out
    for name, parser in plotting.items():
        options = _options(parser)
        assert options["--plot"].default is None and "--no-plot" in options, name
        argv = _argv(parser, tmp_path / "in")
        args = parse_checked(parser, [*argv, "--out", str(tmp_path / name / "r1.json")])
        assert args.plot == str(tmp_path / name / "r1.png"), name
        assert parse_checked(parser, [*argv, "--out", str(tmp_path / "x.json"), "--no-plot"]).plot is None
        assert parse_checked(parser, [*argv, "--plot", str(tmp_path / "p.svg")]).plot == str(tmp_path / "p.svg")


def test_a_derived_plot_is_checked_like_any_output(tmp_path, capsys):
    from lminf_jax.experiments import perplexity

    (tmp_path / "r.png").write_bytes(b"read, not written")
    assert perplexity.main(["--tokens", str(tmp_path / "r.png"), "--out", str(tmp_path / "r.json")]) == 2
    assert f"--plot {tmp_path}/r.png is the input --tokens" in capsys.readouterr().err
    assert (tmp_path / "r.png").read_bytes() == b"read, not written"


def test_every_option_has_help_and_shows_its_default():
    for name, parser in PARSERS.items():
        formatter = DefaultsHelpFormatter(parser.prog)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (name, action.option_strings or action.dest)
            if action.default not in (None, False) and not action.required:
                assert "default" in formatter._get_help_string(action), (name, action.option_strings)


def test_a_missing_tokenizer_says_where_and_what_to_do(tmp_path):
    with pytest.raises(NoTokenizer) as e:
        open_tokenizer(tmp_path, alternative="score token ids with --tokens F.npy")
    assert str(e.value) == (f"model directory {tmp_path} has no tokenizer files (tokenizer.model / tokenizer.json): "
                            "give --tokenizer DIR, a directory with the model's tokenizer, or score token ids with "
                            "--tokens F.npy")
    (tmp_path / "other").mkdir()
    with pytest.raises(NoTokenizer, match=f"^tokenizer directory {tmp_path}/other has no tokenizer files"):
        open_tokenizer(tmp_path, tmp_path / "other")
