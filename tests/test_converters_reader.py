"""CheckpointReader: safetensors (single, sharded, corrupt), PyTorch .bin, errors."""

from __future__ import annotations

import json
import re
import sys

import ml_dtypes
import numpy as np
import pytest

from lminf_jax.converters.reader import CheckpointReader
from lminf_jax.converters.safetensors_file import SafetensorsFile

torch = pytest.importorskip("torch")  # writes the fixtures and is the oracle for their values
from safetensors.torch import save_file  # noqa: E402


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(4, generator=g).to(torch.float16),
        "c.bf16": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        "d.i64": torch.randint(-100, 100, (6,), generator=g),
    }


def expected_numpy(t: torch.Tensor) -> np.ndarray:
    """Independent oracle: bf16 through its bits, the rest through torch's own numpy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same(got: np.ndarray, t: torch.Tensor) -> None:
    want = expected_numpy(t)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def write_config(d, **extra) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": "fake", **extra}))


def write_raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


CODES = {"a.f32": "F32", "b.f16": "F16", "c.bf16": "BF16", "d.i64": "I64"}


def test_single_file_reads_every_dtype_exactly(tmp_path):
    tensors = random_tensors(0)
    save_file(tensors, tmp_path / "model.safetensors")
    write_config(tmp_path, hidden_size=7)
    reader = CheckpointReader(tmp_path)
    assert reader.config == {"model_type": "fake", "hidden_size": 7}
    assert sorted(reader.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert reader.shape(name) == tuple(t.shape)
        assert reader.dtype(name) == CODES[name]
        got = reader.read(name)
        assert isinstance(got, np.memmap) and not got.flags.writeable
        assert_same(got, t)
    assert reader.read("c.bf16").dtype == ml_dtypes.bfloat16
    with pytest.raises(KeyError, match="nope"):
        reader.read("nope")


def test_sharded_safetensors_and_its_errors(tmp_path):
    tensors = random_tensors(1)
    names = list(tensors)
    shards = {"s-1.safetensors": names[:2], "s-2.safetensors": names[2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_config(tmp_path)
    reader = CheckpointReader(tmp_path)
    assert reader.names() == list(weight_map)
    for name, t in tensors.items():
        assert_same(reader.read(name), t)

    index.write_text(json.dumps({"weight_map": {**weight_map, "a.f32": "s-2.safetensors"}}))
    with pytest.raises(ValueError, match=r"'a\.f32' to s-2\.safetensors"):
        CheckpointReader(tmp_path)
    index.write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "s-2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard s-2\.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("where", ["../outside.safetensors", "sub/../../outside.safetensors", "absolute"])
def test_shard_paths_must_stay_inside_the_checkpoint(tmp_path, where):
    tensors = random_tensors(8)
    save_file(tensors, tmp_path / "outside.safetensors")
    root = tmp_path / "checkpoint"
    (root / "sub").mkdir(parents=True)
    write_config(root)
    shard = str(tmp_path / "outside.safetensors") if where == "absolute" else where
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(tensors, shard)}))
    with pytest.raises(ValueError, match=rf"maps 'a\.f32' to '{re.escape(shard)}', which is not a path inside"):
        CheckpointReader(root)


def test_missing_config_or_weights(tmp_path):
    save_file(random_tensors(2), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CheckpointReader(tmp_path)
    write_config(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        CheckpointReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        CheckpointReader(tmp_path / "absent")


@pytest.mark.parametrize("text, error", [
    ("{x", "Expecting property name"),
    ("[" * 100_000, "recursion"),
    ('{"hidden_size": ' + "1" * 5000 + "}", "digits"),
    (b"\xff{}", "decode"),
], ids=["syntax", "deep", "integer", "encoding"])
def test_malformed_config_json_is_a_value_error_naming_the_file(tmp_path, text, error):
    config = tmp_path / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(config))}: not valid JSON .*{error}"):
        CheckpointReader(tmp_path)


def corruptions(raw: bytes) -> dict[str, tuple[bytes, str, str | None]]:
    """Broken variants of a valid file: name -> (bytes, message regex, tensor named or None)."""
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def with_header(h: object, body: bytes = data, text: str | None = None) -> bytes:
        blob = (json.dumps(h) if text is None else text).encode()
        return len(blob).to_bytes(8, "little") + blob + body

    def edited(name: str, **fields) -> bytes:
        return with_header({**header, name: {**header[name], **fields}})

    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    last = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])
    begin = tensors["a.f32"]["data_offsets"][0]
    shifted = {**header, last: {**header[last], "data_offsets": [o + 8 for o in header[last]["data_offsets"]]}}
    cut = header[last]["data_offsets"][0]
    twice = json.dumps(header)[:-1] + ', "a.f32": ' + json.dumps(header["a.f32"]) + "}"
    huge = json.dumps({**header, "b.f16": {**header["b.f16"], "data_offsets": [0, "N"]}}).replace('"N"', "1" * 5000)
    return {
        "overlap": (edited("b.f16", data_offsets=[begin, begin + 8]), "'b.f16' and 'a.f32' overlap", "b.f16"),
        "gap": (with_header(shifted, data[:cut] + bytes(range(1, 9)) + data[cut:]), "belong to no tensor", last),
        "tail": (raw + bytes(range(1, 9)), rf"data bytes \[{len(data)}, {len(data) + 8}\) at the end", None),
        "metadata": (with_header({**header, "__metadata__": {"format": 1}}), "__metadata__ is not a map", None),
        "duplicate": (with_header(None, text=twice), "names 'a.f32' twice", None),
        "short": (raw[:5], "no header length", None),
        "header_length": ((len(raw) * 2).to_bytes(8, "little") + raw[8:], "bad header length", None),
        "header_json": (raw[:8] + b"x" + raw[9:], "not valid JSON", None),
        "header_list": (with_header([]), "not a JSON object", None),
        "header_deep": (with_header(None, text="[" * 100_000), "not valid JSON .*recursion", None),
        "header_integer": (with_header(None, text=huge), "not valid JSON .*digits", None),
        "truncated": (raw[:-3], "past the end", last),
        "shape": (edited("a.f32", shape=[5, 4]), "needs 80 bytes but data_offsets span 60", "a.f32"),
        "offsets": (edited("b.f16", data_offsets=[8, 0]), "invalid data_offsets", "b.f16"),
        "dtype": (edited("b.f16", dtype=7), "invalid dtype", "b.f16"),
    }


CORRUPTIONS = ["short", "header_length", "header_json", "header_list", "header_deep", "header_integer", "truncated",
               "shape", "offsets", "dtype", "overlap", "gap", "tail", "metadata", "duplicate"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_safetensors_raise_naming_file_and_tensor(tmp_path, case):
    good = tmp_path / "good.safetensors"
    save_file(random_tensors(3), good)
    content, pattern, tensor = corruptions(good.read_bytes())[case]
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    write_config(tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        CheckpointReader(tmp_path)
    assert str(bad) in str(info.value)
    if tensor is not None:
        assert repr(tensor) in str(info.value)


def test_unsupported_dtype_fails_on_read_naming_tensor_and_dtype(tmp_path):
    rng = np.random.default_rng(4)
    payload = rng.standard_normal(4).astype(np.float32)
    header = {
        "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "odd": {"dtype": "C64", "shape": [1], "data_offsets": [8, 16]},
    }
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, header, payload.tobytes())
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.read("ok"), payload[:2])
    with pytest.raises(ValueError, match=r"'odd' has unsupported dtype C64"):
        f.read("odd")


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin(tmp_path, sharded):
    tensors = random_tensors(5)
    write_config(tmp_path)
    if sharded:
        names = list(tensors)
        parts = {"pytorch_model-00001-of-00002.bin": names[:1], "pytorch_model-00002-of-00002.bin": names[1:]}
        for shard, members in parts.items():
            torch.save({n: tensors[n] for n in members}, tmp_path / shard)
        weight_map = {n: s for s, members in parts.items() for n in members}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert reader.dtype(name) == CODES[name]
        assert reader.shape(name) == tuple(t.shape)
        assert_same(reader.read(name), t)


def test_pytorch_bin_needs_torch_but_safetensors_do_not(tmp_path, monkeypatch):
    tensors = random_tensors(6)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    write_config(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch is needed"):
        CheckpointReader(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same(CheckpointReader(tmp_path).read("c.bf16"), tensors["c.bf16"])


@pytest.mark.parametrize("elements", [16, 1100])  # torch's reader fails otherwise past 4 KiB (an OSError)
def test_corrupt_pytorch_bin(tmp_path, elements):
    g = torch.Generator().manual_seed(7)
    torch.save({"w": torch.randn(elements, generator=g)}, tmp_path / "pytorch_model.bin")
    raw = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(raw[: len(raw) - 100])
    write_config(tmp_path)
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        CheckpointReader(tmp_path)
