"""experiments.options: argument types that refuse a bad value when it is parsed."""

from __future__ import annotations

import argparse

import pytest

from experiments.options import int_option, output_dir, output_file


def parse(argv: list[str], **types) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    for name, kind in types.items():
        parser.add_argument(f"--{name}", type=kind)
    return parser.parse_args(argv)


@pytest.mark.parametrize("text", ["0", "5", str(2**31 - 1)])
def test_int_option_takes_its_range(text):
    assert parse(["--n", text], n=int_option(0)).n == int(text)


@pytest.mark.parametrize("text, message", [
    ("-1", "must lie in [0, 2**31 - 1], got -1"),
    (str(2**31), f"got {2**31}"),
    ("4294967808", "got 4294967808"),  # 2**32 + 512 would wrap to 512 in int32
    (str(10**30), f"got {10**30}"),
    ("1.5", "expected an integer, got '1.5'"),
])
def test_int_option_refuses_and_names_the_option(text, message):
    with pytest.raises(argparse.ArgumentError, match=r"argument --n") as e:
        parse(["--n", text], n=int_option(0))
    assert message in str(e.value)


def test_int_option_has_its_own_minimum():
    assert parse(["--n", "264"], n=int_option(264)).n == 264
    with pytest.raises(argparse.ArgumentError, match=r"must lie in \[264, 2\*\*31 - 1\], got 263"):
        parse(["--n", "263"], n=int_option(264))


def test_output_file_takes_a_new_file_in_folders_yet_to_be_made_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert parse(["--out", str(target)], out=output_file).out == str(target)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert parse(["--out", str(existing)], out=output_file).out == str(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # the probe file is gone


@pytest.mark.parametrize("where, message", [
    ("{tmp}", "{tmp} is a directory, not a file"),
    ("{tmp}/file/out.json", "cannot create {tmp}/file: {tmp}/file is not a directory"),
    ("/proc/lminf-test/out.json", "cannot write in /proc"),  # no files can be made there, not even by root
])
def test_output_file_refuses_what_cannot_be_written(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentError, match="argument --out") as e:
        parse(["--out", where.format(tmp=tmp_path)], out=output_file)
    assert message.format(tmp=tmp_path) in str(e.value)


def test_output_dir_takes_existing_or_new_folders_and_refuses_a_file(tmp_path):
    assert parse(["--d", str(tmp_path)], d=output_dir).d == str(tmp_path)
    assert parse(["--d", str(tmp_path / "new" / "run")], d=output_dir).d == str(tmp_path / "new" / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentError, match=f"argument --d: {tmp_path}/file exists and is not a directory"):
        parse(["--d", str(tmp_path / "file")], d=output_dir)
    with pytest.raises(argparse.ArgumentError, match="cannot write in /proc"):
        parse(["--d", "/proc/lminf-test"], d=output_dir)
