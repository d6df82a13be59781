"""experiments.loading: a config checked against its weights."""

from __future__ import annotations

import json
import time

import pytest
from conftest import TINY_MODELS, random_model
from test_converters_convert import write_hf_checkpoint

from lminf_jax.converters.store import save_converted
from lminf_jax.experiments.loading import load_config


def test_load_config_refuses_a_converted_config_its_params_contradict(tmp_path):
    """converted.json holds the config beside its params manifest: every size is compared, the layer count
    first, before anything is built from the config."""
    family, cfg, params = random_model("llama_gqa")
    out = save_converted(tmp_path / "converted", params, TINY_MODELS["llama_gqa"], family.name)
    assert load_config(out) == (family, cfg)
    meta_path = out / "converted.json"
    meta = json.loads(meta_path.read_text())
    for field, value, message in [
        ("num_hidden_layers", 10**9, f"config field 'num_hidden_layers' is 1,000,000,000, but {meta_path}'s params "
                                     "manifest holds 2 layers"),
        ("vocab_size", 10**9, f"{meta_path}'s params manifest does not hold the parameters of its config:\n"
                              "  mis-shaped (2):\n    model.embed_tokens.weight: the config gives (1000000000, 48), "
                              "the manifest (97, 48)\n"),
    ]:
        meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], field: value}}))
        with pytest.raises(ValueError) as info:
            load_config(out)
        assert str(info.value).startswith(message)


@pytest.mark.parametrize("name,layers", [("llama_gqa", 10**9), ("gemma2_window", 10**8)])
def test_load_config_refuses_a_hugging_face_config_its_weights_contradict(tmp_path, name, layers):
    write_hf_checkpoint(tmp_path, name)
    family, cfg = load_config(tmp_path)
    assert cfg.num_layers == TINY_MODELS[name]["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps({**TINY_MODELS[name], "num_hidden_layers": layers}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"config field 'num_hidden_layers' is {layers:,}, but checkpoint {tmp_path} "
                                         f"holds {cfg.num_layers} layers"):
        load_config(tmp_path)
    assert time.perf_counter() - start < 5  # 10**8+ layers built one by one would take minutes
