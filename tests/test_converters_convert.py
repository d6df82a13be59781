"""CheckpointLayout, plan_params validation, load_params stacking/casting/memory/sharding, Progress."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
from itertools import zip_longest
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import TINY_MODELS, random_model
from multidevice import run_on_devices
from flax import traverse_util
from safetensors.numpy import save_file

from lminf_jax.converters.convert import load_params, plan_params, write_params
from lminf_jax.converters.families import layout_for
from lminf_jax.converters.layout import CheckpointLayout, Split, layout_from_checkpoint
from lminf_jax.converters.reader import CheckpointReader
from lminf_jax.converters.store import ConvertedWriter, load_converted
from lminf_jax.progress import Progress
from lminf_jax.models import registry

V, H, OUT, L = 11, 6, 5, 2
PREFIX = "model.layers."
IGNORED = (r"model\.layers\.\d+\.rotary_emb\.inv_freq",)


def fake_tensors(seed: int, num_layers: int = L) -> dict[str, np.ndarray]:
    """A tiny two-layer "model.layers." family in HF naming, random values, mixed dtypes."""
    rng = np.random.default_rng(seed)
    t = {
        "model.embed_tokens.weight": rng.standard_normal((V, H)).astype(ml_dtypes.bfloat16),
        "model.norm.weight": rng.standard_normal(H).astype(np.float32),
        "model.position_ids": rng.integers(0, 100, (1, 4)).astype(np.int32),
    }
    for i in range(num_layers):
        t[f"model.layers.{i}.attn.proj.weight"] = rng.standard_normal((OUT, H)).astype(np.float32)
        t[f"model.layers.{i}.norm.weight"] = rng.standard_normal(H).astype(np.float16)
        t[f"model.layers.{i}.rotary_emb.inv_freq"] = rng.standard_normal(3).astype(np.float32)
    return t


def fake_layout(**overrides) -> CheckpointLayout:
    template = {
        "model.embed_tokens.weight": (V, H),
        "model.norm.weight": (H,),
        "model.position_ids": (1, 4),
        "model.layers.attn.proj.weight": (L, OUT, H),
        "model.layers.norm.weight": (L, H),
    }
    fields = dict(
        layer_prefix=PREFIX,
        num_layers=L,
        template={
            k: jax.ShapeDtypeStruct(s, jnp.int32 if k == "model.position_ids" else jnp.float32)
            for k, s in template.items()
        },
        ignored=IGNORED,
    )
    return CheckpointLayout(**{**fields, **overrides})


def write_checkpoint(d, tensors: dict[str, np.ndarray]):
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "fake"}))
    save_file(tensors, d / "model.safetensors")
    return d


def expected_flat(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "model.embed_tokens.weight": t["model.embed_tokens.weight"],
        "model.norm.weight": t["model.norm.weight"],
        "model.position_ids": t["model.position_ids"],
        "model.layers.attn.proj.weight": np.stack([t[f"model.layers.{i}.attn.proj.weight"] for i in range(L)]),
        "model.layers.norm.weight": np.stack([t[f"model.layers.{i}.norm.weight"] for i in range(L)]),
    }


def leaf(params: dict, flat_name: str):
    for key in flat_name.split("."):
        params = params[key]
    return params


def test_locate_ignores_aliases_and_strips_layer_index():
    layout = fake_layout(aliases={"old.norm": "model.norm.weight", "model.layers.1.old": "model.layers.1.norm.weight"})
    assert layout.locate("model.layers.7.attn.proj.weight") == ("model.layers.attn.proj.weight", 7)
    assert layout.locate("model.layers.12.norm.weight") == ("model.layers.norm.weight", 12)
    assert layout.locate("model.embed_tokens.weight") == ("model.embed_tokens.weight", None)
    assert layout.locate("model.layers.0.rotary_emb.inv_freq") is None
    assert layout.locate("old.norm") == ("model.norm.weight", None)
    assert layout.locate("model.layers.1.old") == ("model.layers.norm.weight", 1)
    assert layout.locate("model.layersX.1.a") == ("model.layersX.1.a", None)
    assert layout.layer_name("model.layers.attn.proj.weight", 3) == "model.layers.3.attn.proj.weight"


def test_layout_rejects_stacked_template_without_layer_axis():
    with pytest.raises(ValueError, match=r"model\.layers\.norm\.weight.*num_layers=2"):
        fake_layout(template={"model.layers.norm.weight": jax.ShapeDtypeStruct((3, H), jnp.float32)})


def test_split_separates_per_head_interleaved_qkv():
    layers, heads, d = 2, 3, 2  # rows per head: q, k, v in turn (GPT-NeoX's query_key_value)
    q, k, v = (np.random.default_rng(i).standard_normal((layers, heads * d, H)) for i in range(3))
    fused = np.concatenate([x[:, h * d:(h + 1) * d] for h in range(heads) for x in (q, k, v)], axis=1)
    parts = Split(("q", "k", "v"), (heads * d,) * 3, groups=heads)(fused, stacked=True)
    for name, want in zip("qkv", (q, k, v)):
        np.testing.assert_array_equal(parts[name], want)
        assert parts[name].flags.c_contiguous


def test_split_one_group_of_unequal_parts():
    bias = np.arange(12.0)  # q 8 rows, k and v 2 each, one after another
    parts = Split(("q", "k", "v"), (8, 2, 2))(bias, stacked=False)
    for name, want in zip("qkv", (bias[:8], bias[8:10], bias[10:])):
        np.testing.assert_array_equal(parts[name], want)


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16])
def test_load_params_stacks_every_layer_and_casts_floats(tmp_path, dtype):
    tensors = fake_tensors(0)
    params = load_params(write_checkpoint(tmp_path, tensors), fake_layout(), dtype=dtype, progress=False)
    for name, want in expected_flat(tensors).items():
        got = leaf(params, name)
        assert isinstance(got, jax.Array)
        if dtype is None or not np.issubdtype(want.dtype, np.floating) and want.dtype != ml_dtypes.bfloat16:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(np.asarray(got), want)
        else:
            assert got.dtype == dtype, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want).astype(dtype)))
    assert jax.tree.structure(params) == jax.tree.structure(
        {
            "model": {
                "embed_tokens": {"weight": 0},
                "norm": {"weight": 0},
                "position_ids": 0,
                "layers": {"attn": {"proj": {"weight": 0}}, "norm": {"weight": 0}},
            }
        }
    )


def test_aliases_rename_before_stacking(tmp_path):
    tensors = fake_tensors(1)
    renamed = {k.replace(".attn.proj.", ".attention.dense."): v for k, v in tensors.items()}
    aliases = {f"model.layers.{i}.attention.dense.weight": f"model.layers.{i}.attn.proj.weight" for i in range(L)}
    params = load_params(write_checkpoint(tmp_path, renamed), fake_layout(aliases=aliases), progress=False)
    np.testing.assert_array_equal(
        np.asarray(params["model"]["layers"]["attn"]["proj"]["weight"]),
        expected_flat(tensors)["model.layers.attn.proj.weight"],
    )


def test_one_error_lists_every_problem_before_reading(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    tensors = fake_tensors(2)
    del tensors["model.layers.1.attn.proj.weight"], tensors["model.layers.1.norm.weight"]  # two layers still: 0 and 5
    del tensors["model.norm.weight"]
    tensors["model.layers.0.norm.weight"] = rng.standard_normal(H + 1).astype(np.float16)
    tensors["model.layers.5.norm.weight"] = rng.standard_normal(H).astype(np.float16)
    tensors["model.layers.extra"] = rng.standard_normal(2).astype(np.float32)
    tensors["lm_head.weight"] = rng.standard_normal((V, H)).astype(np.float32)
    tensors["old.norm"] = rng.standard_normal(H).astype(np.float32)
    tensors["dup.norm"] = rng.standard_normal(H).astype(np.float32)
    reader = CheckpointReader(write_checkpoint(tmp_path, tensors))
    monkeypatch.setattr(reader, "read", lambda name: pytest.fail(f"read {name} before validating"))
    layout = fake_layout(aliases={"old.norm": "model.norm.weight", "dup.norm": "model.norm.weight"})
    with pytest.raises(ValueError) as info:
        load_params(reader, layout, progress=False)
    msg = str(info.value)
    assert str(tmp_path) in msg
    sections = {}
    for line in msg.splitlines()[1:]:
        if not line.startswith("    "):
            sections[line.strip().split(" (")[0]] = current = []
        else:
            current.append(line.strip())
    assert sections["missing"] == ["model.layers.1.attn.proj.weight", "model.layers.1.norm.weight"]
    assert sorted(sections["unexpected"]) == ["lm_head.weight", "model.layers.5.norm.weight", "model.layers.extra"]
    assert sections["duplicated"] == ["old.norm and dup.norm both fill model.norm.weight"] or sections[
        "duplicated"
    ] == ["dup.norm and old.norm both fill model.norm.weight"]
    assert sections["mis-shaped"] == [f"model.layers.0.norm.weight: expected ({H},), got ({H + 1},)"]
    assert "unsupported dtype" not in sections


def test_unsupported_dtype_is_reported_up_front(tmp_path, monkeypatch):
    tensors = fake_tensors(3)
    write_checkpoint(tmp_path, tensors)
    reader = CheckpointReader(tmp_path)
    real_dtype = reader.dtype
    monkeypatch.setattr(reader, "dtype", lambda n: "C64" if n == "model.norm.weight" else real_dtype(n))
    pattern = r"unsupported dtype \(1\):\n.*'model\.norm\.weight' has unsupported dtype C64"
    with pytest.raises(ValueError, match=pattern):
        plan_params(reader, fake_layout())


def test_float_parameters_refuse_integer_data_and_integer_ones_float_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    tensors = fake_tensors(8)
    tensors["model.norm.weight"] = rng.integers(-2**20, 2**20, H).astype(np.int32)  # a float relabelled I32
    tensors["model.layers.1.norm.weight"] = rng.standard_normal(H) > 0
    tensors["model.position_ids"] = rng.standard_normal((1, 4)).astype(np.float32)
    reader = CheckpointReader(write_checkpoint(tmp_path, tensors))
    monkeypatch.setattr(reader, "read", lambda name: pytest.fail(f"read {name} before validating"))
    with pytest.raises(ValueError) as info:
        load_params(reader, fake_layout(), progress=False)
    lines = str(info.value).splitlines()
    assert lines[1] == "  wrong kind of dtype (3):" and sorted(lines[2:]) == [
        "    model.layers.1.norm.weight: BOOL data for float parameter model.layers.norm.weight",
        "    model.norm.weight: I32 data for float parameter model.norm.weight",
        "    model.position_ids: F32 data for integer parameter model.position_ids",
    ]


def test_layout_from_checkpoint_matches_hand_layout(tmp_path):
    reader = CheckpointReader(write_checkpoint(tmp_path, fake_tensors(4, num_layers=3)))
    layout = layout_from_checkpoint(reader, PREFIX, IGNORED)
    assert layout.num_layers == 3
    assert {k: s.shape for k, s in layout.template.items()} == {
        "model.embed_tokens.weight": (V, H),
        "model.norm.weight": (H,),
        "model.position_ids": (1, 4),
        "model.layers.attn.proj.weight": (3, OUT, H),
        "model.layers.norm.weight": (3, H),
    }
    assert layout.template["model.embed_tokens.weight"].dtype == jnp.bfloat16
    assert plan_params(reader, layout)["model.layers.norm.weight"] == [
        f"model.layers.{i}.norm.weight" for i in range(3)
    ]


def test_parameters_are_assembled_and_placed_one_at_a_time(tmp_path, monkeypatch):
    reader = CheckpointReader(write_checkpoint(tmp_path, fake_tensors(5)))
    log = []
    read, put = reader.read, jax.device_put
    monkeypatch.setattr(reader, "read", lambda name: log.append(name) or read(name))
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: log.append(None) or put(x, *a, **k))
    layout = fake_layout()
    load_params(reader, layout, dtype=jnp.bfloat16, progress=False)
    groups, current = [], []
    for event in log:
        if event is None:
            groups.append(current)
            current = []
        else:
            current.append(event)
    assert current == [] and len(groups) == len(layout.template)
    assert sorted({layout.locate(name)[0] for name in group}.pop() for group in groups) == sorted(layout.template)
    assert all(len({layout.locate(name)[0] for name in group}) == 1 for group in groups)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_host_memory_is_the_params_plus_little(tmp_path, dtype):
    rng = np.random.default_rng(6)
    rows, cols, layers = 128, 256, 4  # each stacked parameter: 4 x 128 KiB = 512 KiB in fp32
    tensors = {
        f"model.layers.{i}.w{j}": rng.standard_normal((rows, cols)).astype(np.float32)
        for i in range(layers)
        for j in range(6)
    }
    template = {f"model.layers.w{j}": jax.ShapeDtypeStruct((layers, rows, cols), jnp.float32) for j in range(6)}
    path = write_checkpoint(tmp_path, tensors)
    param_bytes = layers * rows * cols * 4
    # On CPU jax adopts each host buffer as the parameter, so numpy's allocations (which
    # tracemalloc sees) that are still alive at the end are the params themselves; beyond
    # them nothing as large as a parameter may ever have existed.
    with jax.default_device(jax.devices("cpu")[0]):
        load_params(path, CheckpointLayout(PREFIX, layers, template), dtype=dtype, progress=False)  # warm up
        tracemalloc.start()
        try:
            params = load_params(path, CheckpointLayout(PREFIX, layers, template), dtype=dtype, progress=False)
            retained, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    itemsize = 4 if dtype is None else 2
    assert retained > 0.9 * 6 * param_bytes * itemsize / 4
    assert peak - retained < 0.5 * param_bytes
    want = tensors["model.layers.2.w5"].astype(dtype or np.float32)
    np.testing.assert_array_equal(np.asarray(params["model"]["layers"]["w5"][2]), want)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_write_params_writes_what_load_params_loads(tmp_path, dtype):
    """Floats cast, integers kept, a fused tensor split (row by row): the converter's files hold exactly
    the params `load_params` gives."""
    checkpoint = write_checkpoint(tmp_path / "hf", fake_tensors(10))
    layout = fake_layout(splits={"model.layers.attn.proj.weight": Split(("model.layers.attn.q.weight",
                                                                         "model.layers.attn.kv.weight"), (3, 2))})
    (tmp_path / "out").mkdir()
    writer = ConvertedWriter(tmp_path / "out")
    write_params(checkpoint, layout, writer.param, dtype=dtype, progress=False)
    writer.finish({}, "fake")
    written = traverse_util.flatten_dict(load_converted(tmp_path / "out")[0], sep=".")
    loaded = traverse_util.flatten_dict(load_params(checkpoint, layout, dtype=dtype, progress=False), sep=".")
    assert sorted(written) == sorted(loaded) == sorted(layout.param_names)
    for name, want in loaded.items():
        assert written[name].dtype == want.dtype and written[name].shape == want.shape, name
        np.testing.assert_array_equal(np.asarray(written[name]).view(np.uint8), np.asarray(want).view(np.uint8))


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_the_converter_holds_one_checkpoint_tensor_at_a_time(tmp_path, dtype):
    """Each checkpoint tensor (one layer's row) is appended to its parameter's file before the next is
    read: numpy never holds a whole stacked parameter (tracemalloc sees numpy's allocations)."""
    rng = np.random.default_rng(11)
    layers, rows, cols = 4, 128, 256  # a row 128 KiB in fp32, a stacked parameter 512 KiB
    tensors = {f"model.layers.{i}.w{j}": rng.standard_normal((rows, cols)).astype(np.float32)
               for i in range(layers) for j in range(3)}
    template = {f"model.layers.w{j}": jax.ShapeDtypeStruct((layers, rows, cols), jnp.float32) for j in range(3)}
    checkpoint = write_checkpoint(tmp_path / "hf", tensors)
    (tmp_path / "out").mkdir()
    writer = ConvertedWriter(tmp_path / "out")
    tracemalloc.start()
    try:
        write_params(checkpoint, CheckpointLayout(PREFIX, layers, template), writer.param, dtype=dtype, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * layers * rows * cols * 4
    writer.finish({}, "fake")
    np.testing.assert_array_equal(np.asarray(load_converted(tmp_path / "out")[0]["model"]["layers"]["w2"][3]),
                                  tensors["model.layers.3.w2"].astype(dtype or np.float32))


def test_load_params_reports_progress_on_stderr(tmp_path, capsys):
    load_params(write_checkpoint(tmp_path, fake_tensors(6)), fake_layout(), progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"converting: {3 + 2 * L}/{3 + 2 * L} tensors, ")
    assert " MB, " in lines[-1] and " MB/s, " in lines[-1]
    load_params(write_checkpoint(tmp_path, fake_tensors(6)), fake_layout(), progress=False)
    assert capsys.readouterr().err == ""


def test_progress_is_rate_limited_and_silent_when_disabled():
    out = io.StringIO()
    with Progress(10_000, "steps", "work", stream=out, interval=60.0) as bar:
        for _ in range(10_000):
            bar.update(1, nbytes=2_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update and the final line
    assert lines[0].startswith("work: 1/10000 steps, 2.0 MB, ")
    assert lines[1].startswith("work: 10000/10000 steps, 20000.0 MB, ")
    quiet = io.StringIO()
    with Progress(3, enabled=False, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_shardings_must_name_every_parameter_before_reading(tmp_path, monkeypatch):
    reader = CheckpointReader(write_checkpoint(tmp_path, fake_tensors(7)))
    layout = fake_layout()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = dict.fromkeys(layout.template, device)
    params = load_params(reader, layout, progress=False, shardings=shardings)
    assert all(a.sharding == device for a in jax.tree.leaves(params))
    del shardings["model.norm.weight"]
    shardings["model.layers.nope.weight"] = device
    monkeypatch.setattr(reader, "read", lambda name: pytest.fail(f"read {name} before checking the shardings"))
    with pytest.raises(ValueError) as info:
        load_params(reader, layout, progress=False, shardings=shardings)
    assert "no sharding for parameter model.norm.weight" in str(info.value)
    assert "sharding for unknown parameter model.layers.nope.weight" in str(info.value)


MESH_AXES = {"data": 2, "model": 4}

SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lminf_jax.converters.convert import load_params
from lminf_jax.converters.families import layout_for
from lminf_jax.converters.reader import CheckpointReader
from lminf_jax.converters.store import load_converted, save_converted
from lminf_jax.models import registry

checkpoint, out_dir = sys.argv[1:]
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
reader = CheckpointReader(checkpoint)
family = registry.family_for_config(reader.config)
layout = layout_for(family, family.config_from_hf(reader.config))

def spec(shape):
    if len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 2 == 0:
        return P(None, "model", "data")
    return P(None, "model") if len(shape) == 2 and shape[1] % 4 == 0 else P()

shardings = {name: NamedSharding(mesh, spec(s.shape)) for name, s in layout.template.items()}
reference = traverse_util.flatten_dict(load_params(reader, layout, progress=False), sep=".")

def report(params):
    return {name: {"spec": list(shardings[name].spec), "shape": a.shape, "sharding_ok": a.sharding == shardings[name],
                   "equal": a.dtype == reference[name].dtype and np.array_equal(np.asarray(a), reference[name]),
                   "shard_shapes": sorted({s.data.shape for s in a.addressable_shards}),
                   "shard_devices": len({s.device for s in a.addressable_shards})}
            for name, a in traverse_util.flatten_dict(params, sep=".").items()}

params = load_params(reader, layout, progress=False, shardings=shardings)
save_converted(out_dir, params, reader.config, family.name)
result = {"devices": len(jax.devices()), "load_params": report(params),
          "load_converted": report(load_converted(out_dir, shardings=shardings)[0])}
print("RESULT " + json.dumps(result))
"""


def hf_tensors(name: str) -> dict[str, np.ndarray]:
    """The tensors of a tiny random `TINY_MODELS` model in Hugging Face naming (one per layer)."""
    family, cfg, params = random_model(name)
    layout = layout_for(family, cfg)
    tensors = {}
    for flat, array in traverse_util.flatten_dict(params, sep=".").items():
        rows = enumerate(np.asarray(array)) if layout.is_stacked(flat) else [(None, np.asarray(array))]
        tensors.update({flat if i is None else layout.layer_name(flat, i): row for i, row in rows})
    return tensors


def write_hf_checkpoint(d: Path, name: str = "llama_gqa", tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A Hugging Face checkpoint directory of `TINY_MODELS` model ``name``: its config and ``tensors``
    (default: `hf_tensors`)."""
    write_checkpoint(d, hf_tensors(name) if tensors is None else tensors)
    (d / "config.json").write_text(json.dumps(TINY_MODELS[name]))
    return d


def test_load_params_and_load_converted_place_each_device_only_its_shard(tmp_path):
    write_hf_checkpoint(tmp_path / "hf")
    result = run_on_devices(SHARDED_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "converted"), timeout=300)
    assert result["devices"] == 8
    for loader in ("load_params", "load_converted"):
        params = result[loader]
        specs = {tuple(p["spec"]) for p in params.values()}
        assert {(None, "model", "data"), (None, "model"), ()} <= specs, specs  # every kind of placement is tried
        for name, p in params.items():
            shard = tuple(d // MESH_AXES.get(axis, 1) for d, axis in zip_longest(p["shape"], p["spec"]))
            assert p["sharding_ok"] and p["equal"], (loader, name, p)
            assert p["shard_shapes"] == [list(shard)] and p["shard_devices"] == 8, (loader, name, p)


@pytest.mark.parametrize("name,layers", [("llama_gqa", 10**5), ("gemma2_window", 10**8), ("llama_gqa", 10**9)])
def test_a_config_of_another_layer_count_is_refused_before_anything_per_layer(tmp_path, name, layers):
    """Checked against the layers the checkpoint's names hold, before any per-layer name is listed: fast,
    and one short line however many layers the config claims."""
    write_hf_checkpoint(tmp_path, name)
    config = {**TINY_MODELS[name], "num_hidden_layers": layers}
    family = registry.family_for_config(config)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_params(tmp_path, layout_for(family, family.config_from_hf(config)), progress=False)
    assert time.perf_counter() - start < 5  # 10**8+ layers built one by one would take minutes
    assert str(info.value) == (
        f"config field 'num_hidden_layers' is {layers:,}, but checkpoint {tmp_path} holds "
        f"{TINY_MODELS[name]['num_hidden_layers']} layers (tensors named 'model.layers.<i>.*'): correct the config, "
        "or load the checkpoint it was written for")


def test_layers_are_counted_not_read_off_the_highest_index(tmp_path):
    """A stray layer index as large as the config's count does not make a 2-layer checkpoint one of 10^9 layers."""
    tensors = hf_tensors("llama_gqa")
    tensors[f"model.layers.{10**9 - 1}.input_layernorm.weight"] = tensors["model.layers.0.input_layernorm.weight"]
    config = {**TINY_MODELS["llama_gqa"], "num_hidden_layers": 10**9}
    family = registry.family_for_config(config)
    layout = layout_for(family, family.config_from_hf(config))
    with pytest.raises(ValueError, match="'num_hidden_layers' is 1,000,000,000, but checkpoint .* holds 3 layers"):
        plan_params(CheckpointReader(write_hf_checkpoint(tmp_path, tensors=tensors)), layout)


def test_long_problem_lists_show_their_first_items_and_a_count(tmp_path):
    full = fake_tensors(9, num_layers=30)
    layout = layout_from_checkpoint(CheckpointReader(write_checkpoint(tmp_path / "full", full)), PREFIX, IGNORED)
    gappy = {k: v for k, v in full.items() if ".attn.proj." not in k or k.startswith("model.layers.0.")}
    with pytest.raises(ValueError) as info:
        plan_params(CheckpointReader(write_checkpoint(tmp_path / "gappy", gappy)), layout)
    assert str(info.value).splitlines()[1:] == [
        "  missing (29):", *[f"    model.layers.{i}.attn.proj.weight" for i in range(1, 11)], "    ... and 19 more"]
