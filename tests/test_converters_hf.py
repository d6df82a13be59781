"""End to end on a tiny random transformers LlamaForCausalLM: every checkpoint format, the CLI."""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lminf_jax.converters.__main__ import main
from lminf_jax.converters.convert import load_params
from lminf_jax.converters.layout import CheckpointLayout
from lminf_jax.converters.store import load_converted

torch = pytest.importorskip("torch")  # the Hugging Face models that write the checkpoints
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

NUM_LAYERS = 2
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at ones: make every tensor random
            p.copy_(torch.randn_like(p))
    return model


def save(model: LlamaForCausalLM, d, fmt: str) -> dict[str, torch.Tensor]:
    """Write `model` in format `fmt`; returns the state dict that was written."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        model.save_pretrained(d)
    elif fmt == "safetensors_sharded":
        model.save_pretrained(d, max_shard_size="20KB")
        assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) == len(state)
    else:  # transformers 5 always writes safetensors: write the legacy PyTorch files by hand
        model.config.save_pretrained(d)
        if fmt == "bin":
            torch.save(state, d / "pytorch_model.bin")
        else:
            names = list(state)
            shards = {f"pytorch_model-0000{k + 1}-of-00003.bin": names[k::3] for k in range(3)}
            for shard, members in shards.items():
                torch.save({n: state[n] for n in members}, d / shard)
            weight_map = {n: s for s, members in shards.items() for n in members}
            (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def layout_from_state(state: dict[str, torch.Tensor]) -> CheckpointLayout:
    template = {}
    for name, t in state.items():
        m = LAYER.fullmatch(name)
        shape = (NUM_LAYERS, *t.shape) if m else tuple(t.shape)
        template["model.layers." + m[2] if m else name] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return CheckpointLayout("model.layers.", NUM_LAYERS, template)


def assert_matches_state(params: dict, state: dict[str, torch.Tensor], dtype) -> None:
    flat = traverse_util.flatten_dict(params, sep=".")
    checked = set()
    for name, t in state.items():
        m = LAYER.fullmatch(name)
        key = "model.layers." + m[2] if m else name
        got = flat[key][int(m[1])] if m else flat[key]
        assert got.dtype == dtype, name
        want = t.to(torch.float32).numpy()
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=name)
        checked.add(key)
    assert checked == set(flat)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors_sharded", "bin", "bin_sharded"])
def test_every_format_converts_exactly(tmp_path, llama, fmt):
    state = save(llama, tmp_path, fmt)
    params = load_params(tmp_path, layout_from_state(state), progress=False)
    assert_matches_state(params, state, jnp.float32)


def test_bf16_checkpoint_stays_bf16(tmp_path, llama):
    model = LlamaForCausalLM(llama.config)
    model.load_state_dict(llama.state_dict())
    state = save(model.to(torch.bfloat16), tmp_path, "safetensors_sharded")
    params = load_params(tmp_path, layout_from_state(state), progress=False)
    assert_matches_state(params, state, jnp.bfloat16)


def test_cli_converts_through_the_registry(tmp_path, llama, capsys):
    state = save(llama, tmp_path / "hf", "safetensors_sharded")
    assert main([str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "converting: " in captured.err
    count = sum(t.numel() for t in state.values())
    assert f"converted llama: {count:,} parameters" in captured.out
    assert "dtype bfloat16" in captured.out and "peak host RSS" in captured.out
    assert f"wrote {tmp_path / 'out'}" in captured.out
    params, config, family = load_converted(tmp_path / "out")
    assert family == "llama"
    assert config == json.loads((tmp_path / "hf" / "config.json").read_text())
    assert_matches_state(params, {k: v.to(torch.bfloat16) for k, v in state.items()}, jnp.bfloat16)

    assert main([str(tmp_path / "hf"), str(tmp_path / "out32"), "--dtype", "fp32", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert_matches_state(load_converted(tmp_path / "out32")[0], state, jnp.float32)


def test_cli_reports_bad_input_without_traceback(tmp_path, llama, capsys):
    hf, out = tmp_path / "hf", tmp_path / "out"
    save(llama, hf, "safetensors_sharded")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    capsys.readouterr()
    start = time.perf_counter()
    assert main([str(hf), str(out), "--no-progress"]) == 1
    assert time.perf_counter() - start < 5  # refused before anything is built per layer (10**9 of them: minutes)
    assert capsys.readouterr().err == (
        f"error: config field 'num_hidden_layers' is 1,000,000,000, but checkpoint {hf} holds 2 layers "
        "(tensors named 'model.layers.<i>.*'): correct the config, or load the checkpoint it was written for\n")
    assert not out.exists()
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert main([str(hf), str(out), "--no-progress"]) == 1
    assert "unsupported model_type 'bert'" in capsys.readouterr().err


def test_cli_copies_the_tokenizer_files(tmp_path, llama, capsys):
    save(llama, tmp_path / "hf", "safetensors")
    files = {"tokenizer.model": b"\x00sentencepiece\xff bytes", "tokenizer_config.json": b'{"bos_token": "<s>"}',
             "special_tokens_map.json": b"{}"}
    for name, data in files.items():
        (tmp_path / "hf" / name).write_bytes(data)
    assert main([str(tmp_path / "hf"), str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "copied tokenizer files: tokenizer.model, tokenizer_config.json, special_tokens_map.json" in out
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert not (tmp_path / "out" / "tokenizer.json").exists()

    for name in files:  # no tokenizer: converted all the same, and the summary says so
        (tmp_path / "hf" / name).unlink()
    assert main([str(tmp_path / "hf"), str(tmp_path / "bare"), "--no-progress"]) == 0
    assert f"no tokenizer files in {tmp_path / 'hf'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["converted.json", "params"]


def test_cli_refuses_a_config_no_model_can_be_built(tmp_path, llama, capsys):
    hf, out = tmp_path / "hf", tmp_path / "out"
    save(llama, hf, "safetensors")
    config = json.loads((hf / "config.json").read_text())
    rope = {**config["rope_parameters"], "rope_theta": float("nan")}
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    capsys.readouterr()
    assert main([str(hf), str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err == "error: config field 'rope_theta' must be a finite number > 0, got nan\n"
    assert not out.exists()


def test_cli_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path, llama, capsys):
    save(llama, tmp_path / "hf", "safetensors")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"new tokenizer")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"old tokenizer")
    (out / "tokenizer_config.json").write_text('{"bos_token": "<old>"}')
    (out / "converted.json").write_text('{"format": "lminf_jax-converted"}')  # an earlier conversion
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([str(tmp_path / "hf"), str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"error: {out} is not empty: pass --overwrite to replace it\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert main([str(tmp_path / "hf"), str(tmp_path / "hf"), "--no-progress", "--overwrite"]) == 1
    assert "is the checkpoint directory or holds it" in capsys.readouterr().err
    assert main([str(tmp_path / "hf"), str(tmp_path / "hf" / "converted"), "--no-progress"]) == 1
    assert "lies inside the checkpoint directory" in capsys.readouterr().err
    assert main([str(tmp_path / "hf"), str(out), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["converted.json", "params", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == b"new tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no staging directory left


def test_cli_overwrite_keeps_the_old_out_dir_when_conversion_fails(tmp_path, llama, capsys):
    save(llama, tmp_path / "hf", "safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"old tokenizer")
    (out / "converted.json").write_text('{"format": "lminf_jax-converted"}')  # an earlier conversion
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert main([str(tmp_path / "hf"), str(out), "--no-progress", "--overwrite"]) == 1
    assert "config field 'num_hidden_layers' is 3, but checkpoint " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["converted.json", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == b"old tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]
