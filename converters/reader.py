"""`CheckpointReader`: one tensor at a time from a Hugging Face checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lminf_jax.converters.json_object import read_json_object
from lminf_jax.converters.safetensors_file import SafetensorsFile
from lminf_jax.converters.torch_file import TorchFile

# In Hugging Face's order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

TensorFile = SafetensorsFile | TorchFile


class CheckpointReader:
    """A checkpoint directory: `config` (config.json as a dict) and its weights, by name.

    Weights come from the first of `WEIGHT_FILES` present; sharded checkpoints are read
    through their index. Every file is opened (and safetensors headers validated) here;
    tensor data is read only by `read`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
        self.config: dict = read_json_object(self.path / "config.json")
        self._files = _open_weights(self.path)

    def names(self) -> list[str]:
        """Every tensor name, in checkpoint order."""
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`."""
        return self._file(name).tensors[name].shape

    def dtype(self, name: str) -> str:
        """The stored dtype in safetensors spelling ("F32", "BF16", ...)."""
        return self._file(name).tensors[name].dtype

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` (memory-mapped for safetensors; bf16 as ``ml_dtypes.bfloat16``)."""
        return self._file(name).read(name)

    def _file(self, name: str) -> TensorFile:
        try:
            return self._files[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None


def _open_weights(root: Path) -> dict[str, TensorFile]:
    found = next((root / name for name in WEIGHT_FILES if (root / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no weights in {root}: expected one of {', '.join(WEIGHT_FILES)}")
    opener = SafetensorsFile if ".safetensors" in found.name else TorchFile
    if not found.name.endswith(".index.json"):
        single = opener(found)
        return {name: single for name in single.tensors}
    weight_map = read_json_object(found).get("weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{found}: no valid weight_map")
    shards = {}
    for shard in dict.fromkeys(weight_map.values()):
        _check_inside(shard, found, weight_map)
        if not (root / shard).is_file():
            raise FileNotFoundError(f"shard {shard} listed in {found} is missing")
        shards[shard] = opener(root / shard)
    for name, shard in weight_map.items():
        if name not in shards[shard].tensors:
            raise ValueError(f"{found} maps {name!r} to {shard}, which does not contain it")
    return {name: shards[shard] for name, shard in weight_map.items()}


def _check_inside(shard: str, index: Path, weight_map: dict[str, str]) -> None:
    """Refuse a shard path of `index` that is absolute or climbs out of the checkpoint directory
    (lexically: files inside may still be links, as in the Hugging Face cache)."""
    path = Path(shard)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        name = next(name for name, target in weight_map.items() if target == shard)
        raise ValueError(f"{index} maps {name!r} to {shard!r}, which is not a path inside {index.parent}")
