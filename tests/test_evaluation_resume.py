"""lminf_jax.evaluation.resume: atomic writes, identity checks, the newest intact state, resumable results,
checked pieces of work and folders of a run's own."""

from __future__ import annotations

import json
import os
import re

import pytest

from lminf_jax.evaluation import resume
from lminf_jax.evaluation.resume import (
    TEMP, Mismatch, OwnFolder, ResultFile, atomic_file, check_identity, newest_intact, read_checked, write_atomic,
    write_checked, write_json_atomic,
)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = tmp_path / "new" / "r.json"  # its folder is created
    write_json_atomic(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as f:
            f.write(b'{"half": ')
            raise KeyboardInterrupt
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    assert os.listdir(path.parent) == ["r.json"]
    write_atomic(tmp_path / "t.txt", "text")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_a_failed_replace_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")
    names = []

    def failing_replace(src, dst):
        names.append(os.path.basename(src))
        raise OSError("disk full")

    monkeypatch.setattr(resume.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    assert names == [f".r.json.tmp-{os.getpid()}"] and TEMP.fullmatch(names[0])


def test_check_identity_names_each_field_that_differs():
    saved = {"chunk": 16, "model": {"params": "sha256:a", "attention": {"limit_distance": 16}}}
    check_identity(saved, {"chunk": 16, "model": {"params": "sha256:a", "attention": {"limit_distance": 16}}}, "x")
    with pytest.raises(Mismatch, match=r"^ckpt does not match this run: model\.params: checkpoint has sha256:a, run "
                                       r"asks sha256:b; model\.attention\.limit_distance: checkpoint has 16, run "
                                       r"asks 8; extra: checkpoint has nothing, run asks 1$"):
        check_identity(saved, {"chunk": 16, "model": {"params": "sha256:b", "attention": {"limit_distance": 8}},
                               "extra": 1}, "ckpt")


def test_newest_intact_falls_back_and_says_so(capsys):
    states = {3: "damaged", 2: "good", 1: "good"}
    discarded = []

    def read(n):
        if states[n] == "damaged":
            raise OSError(f"state {n} unreadable\nsecond line")
        if states[n] == "other run":
            raise Mismatch(f"state {n} is another run's")
        return f"value {n}"

    assert newest_intact([3, 2, 1], read, discarded.append, name=lambda n: f"s{n}") == (2, "value 2")
    assert discarded == [3]
    assert capsys.readouterr().err == "warning: s3 is damaged (OSError: state 3 unreadable); removed it and " \
                                      "resumed from s2\n"
    assert newest_intact([], read, discarded.append) is None
    states[2] = "other run"
    with pytest.raises(Mismatch, match="state 2 is another run's"):
        newest_intact([3, 2, 1], read, discarded.append)
    assert discarded == [3] and capsys.readouterr().err == ""  # nothing touched
    states[2] = "damaged"
    with pytest.raises(ValueError, match=r"^no intact saved state: s3: OSError: state 3 unreadable; s2: OSError: "
                                         r"state 2 unreadable \(remove"):
        newest_intact([3, 2], read, discarded.append, name=lambda n: f"s{n}")
    assert discarded == [3] and capsys.readouterr().err == ""


def test_a_result_file_resumes_only_the_same_settings_and_params(tmp_path, capsys):
    results = ResultFile(tmp_path / "r.json", "RULER", ("methods",))
    settings = {"tasks": ["qa"], "lengths": [512], "batch": 2}
    assert results.earlier(settings) is None and results.resume(None, "sha256:a") is None
    record = {"settings": {**settings, "params": "sha256:a"}, "methods": {"vanilla": {"cells": {}}}}
    results.write(record)
    assert (tmp_path / "r.json").read_text() == json.dumps(record, indent=1)
    earlier = results.earlier(settings)  # the params are not known yet: not compared
    assert earlier == record
    assert results.resume(earlier, "sha256:a") == record
    assert capsys.readouterr().err == f"resuming {tmp_path / 'r.json'}\n"
    with pytest.raises(ValueError, match=re.escape(
            f"--out {tmp_path / 'r.json'} holds a RULER run of other weights (settings.params: sha256:a there, "
            "sha256:b here): pass another --out or remove it")):
        results.resume(earlier, "sha256:b")
    with pytest.raises(ValueError, match=re.escape(
            f"--out {tmp_path / 'r.json'} holds a RULER run with other settings (lengths, extra differ): pass "
            "another --out or remove it")):
        results.earlier({**settings, "lengths": [1024], "extra": 1})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["[1, 2]", '{"settings": {}}', '{"settings": [], "methods": {}}', "{half"])
def test_a_result_file_of_something_else_is_refused(tmp_path, text):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"--out {tmp_path / 'r.json'} exists and is not a RULER result: "
                                                   "pass another --out or remove it")):
        ResultFile(tmp_path / "r.json", "RULER", ("methods",)).earlier({})
    assert (tmp_path / "r.json").read_text() == text


def test_checked_pieces_come_back_only_intact(tmp_path, capsys):
    path = write_checked(tmp_path, "m-512-000000", b"scores")
    assert re.fullmatch(r"m-512-000000\.[0-9a-f]{16}\.npy", path.name)
    assert read_checked(tmp_path, "m-512-000000") == b"scores" and read_checked(tmp_path, "m-512-000001") is None
    path.write_bytes(b"scorez")
    assert read_checked(tmp_path, "m-512-000000", redo="scoring that batch again") is None
    assert capsys.readouterr().err == (f"warning: {path} is damaged (its bytes do not match the checksum in its name); "
                                       "scoring that batch again\n")
    assert not path.exists()


FOLDER = OwnFolder("--out", "parts store", re.compile(r"[0-9a-f]{4}"), re.compile(r".*\.npy"))


def test_an_own_folder_refuses_what_is_named_like_its_own_and_is_not(tmp_path):
    assert FOLDER.entries(tmp_path / "missing") == []
    (tmp_path / "abcd").mkdir()
    (tmp_path / "abcd" / "x.npy").write_bytes(b"")
    (tmp_path / "notes").mkdir()  # another name: none of its business
    (tmp_path / "notes" / "a.txt").write_text("precious")
    assert FOLDER.entries(tmp_path) == [tmp_path.absolute() / "abcd"]
    (tmp_path / "0123").mkdir()
    (tmp_path / "0123" / "a.txt").write_text("precious")
    with pytest.raises(ValueError, match=re.escape(
            f"--out {tmp_path}: 0123 is named like an entry of the parts store but is not its own (it holds a.txt, "
            f"which the store never writes); move it out of {tmp_path} or choose another --out")):
        FOLDER.entries(tmp_path)
    with pytest.raises(ValueError, match=r"0123 is named like an entry of the parts store but is not its own"):
        FOLDER.discard(tmp_path / "0123")
    (tmp_path / "4567").write_text("a file")
    with pytest.raises(ValueError, match=r"4567 is named like .* \(it is not a directory\)"):
        FOLDER.check(tmp_path / "4567")
    (tmp_path / "89ab").symlink_to(tmp_path / "abcd")
    with pytest.raises(ValueError, match=r"89ab is named like .* \(it is not a directory\)"):
        FOLDER.check(tmp_path / "89ab")
    FOLDER.discard(tmp_path / "abcd")
    assert sorted(os.listdir(tmp_path)) == ["0123", "4567", "89ab", "notes"]
    assert (tmp_path / "0123" / "a.txt").read_text() == "precious" and (tmp_path / "notes" / "a.txt").exists()
