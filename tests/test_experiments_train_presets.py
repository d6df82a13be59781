"""experiments.train_presets: the architectures' sizes and the presets' names."""

from __future__ import annotations

import pytest

from lminf_jax.experiments import train_presets as presets


def test_presets_sizes():
    for name in presets.PRESETS:
        n = presets.parameter_count(presets.make_config(name, 4096, 512))
        if name.endswith("small"):
            assert 3e6 <= n <= 6e6 and 2 * n <= 15e6, (name, n)
        else:
            assert n < 4e5, (name, n)


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        presets.make_config("llama-huge", 300, 32)
