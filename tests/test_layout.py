"""The project's rooms: one installed name, and dependencies that point one way (the core below the models
and the evaluation harness, converters above the models, the commands on top), read from every module's
imports."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Each room and the rooms it must not import (the core knows nothing of model families, and so on up).
ROOMS = {"lminf_jax": ("models", "converters", "evaluation", "tasks", "experiments"),
         "models": ("converters", "evaluation", "tasks", "experiments"),
         "evaluation": ("models", "converters", "tasks", "experiments"),
         "converters": ("evaluation", "tasks", "experiments"),
         "tasks": ("models", "converters", "evaluation", "experiments"), "experiments": ()}


def imported(path: Path) -> set[str]:
    """The modules a file imports (absolute imports only; the project has no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_dependencies_point_one_way(room):
    for path in sorted((ROOT / room).glob("*.py")):
        for name in imported(path):
            assert name.split(".")[0] not in set(ROOMS) - {"lminf_jax"}, (
                f"{path.relative_to(ROOT)} imports {name}: the rooms are lminf_jax.{name}")
            parts = name.split(".")
            if parts[0] == "lminf_jax" and len(parts) > 1:
                assert parts[1] not in ROOMS[room], f"{path.relative_to(ROOT)} imports {name}, a room above it"


def test_the_install_exposes_only_the_projects_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(name == "lminf_jax" or name.startswith("lminf_jax.") for name in config["packages"])
    assert {config["package-dir"][f"lminf_jax.{room}"] for room in ROOMS if room != "lminf_jax"} == {
        "models", "converters", "evaluation", "tasks", "experiments"}
