"""save_converted / load_converted: round trip, format version 1 (orbax), damaged files, no copies."""

from __future__ import annotations

import json
import re
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lminf_jax.converters.store as store_module
from lminf_jax.converters.__main__ import main
from lminf_jax.converters.safetensors_file import TensorWriter
from lminf_jax.converters.store import FORMAT, META_FILE, PARAMS_DIR, load_converted, read_manifest, save_converted, staged_output


def random_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "embed_tokens": {"weight": jnp.asarray(rng.standard_normal((7, 4)), jnp.bfloat16)},
            "layers": {"mlp": {"up_proj": {"weight": jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)}}},
            "norm": {"weight": jnp.asarray(rng.standard_normal(4), jnp.float16)},
        },
        "lm_head": {"weight": jnp.asarray(rng.standard_normal((7, 4)), jnp.bfloat16)},
    }


def test_round_trip_keeps_values_dtypes_config_and_family(tmp_path):
    params = random_params(0)
    config = {"model_type": "llama", "hidden_size": 4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    out = save_converted(tmp_path / "conv", params, config, "llama")
    assert out == (tmp_path / "conv").absolute()
    loaded, loaded_config, family = load_converted(tmp_path / "conv")
    assert loaded_config == config and family == "llama"
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype and got.shape == want.shape
        assert got.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    meta = json.loads((tmp_path / "conv" / META_FILE).read_text())
    assert meta["params"]["model.embed_tokens.weight"] == {"shape": [7, 4], "dtype": "bfloat16"}
    assert meta["library_version"] and meta["format_version"] == 2
    files = sorted(p.name for p in (tmp_path / "conv" / PARAMS_DIR).iterdir())
    assert files == sorted(f"{name}.safetensors" for name in meta["params"])


def save_version_1(out, params: dict, config: dict, family: str) -> None:
    """`out` as the converters before format version 2 wrote it: the params as one orbax tree."""
    import orbax.checkpoint as ocp

    out.mkdir()
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(out / PARAMS_DIR, args=ocp.args.StandardSave(params))
    manifest = {name: {"shape": list(a.shape), "dtype": jnp.dtype(a.dtype).name}
                for name, a in traverse_util.flatten_dict(params, sep=".").items()}
    (out / META_FILE).write_text(json.dumps({"format": FORMAT, "format_version": 1, "library_version": "0.1.0",
                                             "family": family, "config": config, "params": manifest}))


@pytest.mark.parametrize("version", [1, 2])
def test_both_format_versions_load_cast_and_placed(tmp_path, version):
    params = random_params(7)
    (save_version_1 if version == 1 else save_converted)(tmp_path / "conv", params, {"a": 1}, "gptj")
    names = json.loads((tmp_path / "conv" / META_FILE).read_text())["params"]
    first, last = (jax.sharding.SingleDeviceSharding(d) for d in (jax.devices()[0], jax.devices()[-1]))
    for dtype, shardings in ((None, None), (jnp.float32, dict.fromkeys(names, last))):
        loaded, config, family = load_converted(tmp_path / "conv", dtype=dtype, shardings=shardings)
        assert (config, family) == ({"a": 1}, "gptj")
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
            assert got.dtype == (dtype or want.dtype) and got.sharding == (last if shardings else first)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(got.dtype))


def replace_with_other_tensor(path) -> None:
    path.unlink()
    with TensorWriter(path, "model.norm.weight", (5,), np.float16) as file:
        file.write(np.zeros(5, np.float16))


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), "is missing: .* lists parameter model.norm.weight"),
    (lambda path: path.write_bytes(path.read_bytes()[:-1]), "run past the end of the file"),
    (lambda path: path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:]), "bad header length"),
    (replace_with_other_tensor, "should hold just tensor 'model.norm.weight', float16 \\[4\\] as converted.json "
                                "lists, but holds 'model.norm.weight' F16 \\[5\\]"),
])
def test_a_damaged_parameter_file_is_named_before_anything_is_loaded(tmp_path, monkeypatch, damage, message):
    out = save_converted(tmp_path / "conv", random_params(8), {}, "llama")
    path = out / PARAMS_DIR / "model.norm.weight.safetensors"
    damage(path)
    monkeypatch.setattr(store_module, "place", lambda *a: pytest.fail("placed a parameter"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{message}"):
        load_converted(out)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_parameters_are_the_mapped_files_or_cast_one_at_a_time(tmp_path, dtype):
    """On CPU jax adopts each file's mapping as the parameter: numpy allocates nothing (tracemalloc sees
    numpy's allocations). Cast, each parameter is one host buffer that jax adopts, so beyond the params
    nothing as large as one may ever have existed."""
    rng = np.random.default_rng(9)
    params = {f"w{j}": rng.standard_normal((4, 128, 256)).astype(np.float32) for j in range(4)}  # 512 KiB each
    out = save_converted(tmp_path / "conv", params, {}, "llama")
    with jax.default_device(jax.devices("cpu")[0]):
        load_converted(out, dtype=dtype)  # warm up
        tracemalloc.start()
        try:
            loaded = load_converted(out, dtype=dtype)[0]
            retained, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    cast_bytes = 0 if dtype is None else 4 * 4 * 128 * 256 * 2
    assert 0.9 * cast_bytes <= retained <= cast_bytes + 64 * 1024
    assert peak - retained < 0.25 * 4 * 128 * 256 * 4
    for name, array in params.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), array.astype(dtype or np.float32))


def test_refuses_to_overwrite(tmp_path):
    save_converted(tmp_path, random_params(1), {}, "gptj")
    with pytest.raises(FileExistsError, match="already holds"):
        save_converted(tmp_path, random_params(2), {}, "gptj")


def test_not_a_converted_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=f"not a converted checkpoint.*{META_FILE} is missing"):
        load_converted(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        load_converted(tmp_path)
    (tmp_path / META_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="valid JSON"):
        load_converted(tmp_path)


def test_shardings_must_name_every_parameter(tmp_path):
    save_converted(tmp_path, random_params(3), {}, "llama")
    names = json.loads((tmp_path / META_FILE).read_text())["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    loaded, _, _ = load_converted(tmp_path, shardings=dict.fromkeys(names, device))
    assert all(a.sharding == device for a in jax.tree.leaves(loaded))
    shardings = dict.fromkeys(names, device)
    del shardings["model.norm.weight"]
    shardings["model.nope.weight"] = device
    with pytest.raises(ValueError) as info:
        load_converted(tmp_path, shardings=shardings)
    assert "no sharding for parameter model.norm.weight" in str(info.value)
    assert "sharding for unknown parameter model.nope.weight" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_staged_output_replaces_whole_only_on_success_with_the_usual_permissions(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / META_FILE).write_text(json.dumps({"format": FORMAT}))  # what --overwrite may replace
    (tmp_path / "out" / "stale.json").write_text("{}")
    with pytest.raises(KeyError), staged_output(tmp_path / "out", overwrite=True) as staging:
        (staging / "half.json").write_text("{}")
        raise KeyError("failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [META_FILE, "stale.json"]
    with staged_output(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.json").write_text("{}")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("meta, lacks", [
    (None, f"{META_FILE} is missing"),
    ('{"format": "something-else"}', f"{META_FILE} has no format 'lminf_jax-converted'"),
    ("{broken", "valid JSON"),
])
def test_overwrite_refuses_a_directory_that_is_not_a_converted_checkpoint(tmp_path, capsys, meta, lacks):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "precious.txt").write_text("precious")
    if meta is not None:
        (out / META_FILE).write_text(meta)
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    where, lacks = re.escape(str(out)), re.escape(lacks)
    with pytest.raises(FileExistsError, match=rf"^{where} is not a converted checkpoint \(.*{lacks}.*\), and it is "
                                              r"not empty: --overwrite replaces only a converted checkpoint; choose "
                                              r"another output directory$"):
        with staged_output(out, overwrite=True):
            pytest.fail("the block ran")
    capsys.readouterr()
    assert main([str(tmp_path / "no-such-hf-dir"), str(out), "--no-progress", "--overwrite"]) == 1  # nothing read
    assert capsys.readouterr().err.startswith(f"error: {out} is not a converted checkpoint (")
    assert main([str(tmp_path / "no-such-hf-dir"), str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {out} is not a converted checkpoint (")
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_overwrite_replaces_a_converted_checkpoint_of_any_version(tmp_path):
    out = save_converted(tmp_path / "out", random_params(4), {}, "llama")
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "format_version": 0}))  # an older converter's output
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(out))} is not empty: pass --overwrite to replace it$"):
        with staged_output(out):
            pytest.fail("the block ran")
    with staged_output(out, overwrite=True) as staging:
        save_converted(staging, random_params(5), {}, "gptj")
    assert load_converted(out)[2] == "gptj"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("spec, message", [
    ({"shape": ["4"], "dtype": "float32"}, "must be a list of sizes"),
    ({"shape": [-1], "dtype": "float32"}, "must be a list of sizes"),
    ({"dtype": "float32"}, "holds no valid params manifest"),
])
def test_a_malformed_manifest_is_refused_naming_the_file(tmp_path, spec, message):
    out = tmp_path / "conv"
    save_converted(out, random_params(3), {"a": 1}, "gptj")
    meta = json.loads((out / META_FILE).read_text())
    meta["params"][next(iter(meta["params"]))] = spec
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(out)
    assert str(out / META_FILE) in str(info.value)
