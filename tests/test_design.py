"""The rules docs/design.md states, checked on the source: public APIs of our dependencies
only, a model importable without Lightning or Hydra, which package may import which, and no
import cycles."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, script_env

SRC = REPO_ROOT / "src"
PACKAGE = SRC / "gptlab"
# Hydra's config keys (`node._target_`) are public, and so is our own plugin's module.
PUBLIC_UNDERSCORED = re.compile(r"^_\w+_$")
OWN_PRIVATE_MODULES = {"hydra_plugins.gptlab_optuna_sweeper._impl"}
# Plain PyTorch: what a user takes elsewhere must import without the training stack.
PLAIN_TORCH_MODULES = ("model", "inference.generation", "training.sharding")
# The gptlab packages each package may import (gptlab's root modules aside).
ALLOWED_IMPORTS = {
    "model": set(),
    "data": {"model"},
    "training": {"model", "data", "inference"},
    "inference": {"model", "data", "training"},
    "sweeps": {"training"},
    "export": {"model", "data", "training", "inference"},
}


def parsed_sources() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(SRC.rglob("*.py"))]


def is_private(name: str) -> bool:
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and not dunder and not PUBLIC_UNDERSCORED.match(name)


def inherited(cls: ast.ClassDef) -> set[str]:
    """Private attributes a class reads from `self` without defining them: a base class's."""
    own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    read = set()
    for node in ast.walk(cls):
        attribute = isinstance(node, ast.Attribute) and is_private(node.attr)
        if attribute and isinstance(node.value, ast.Name) and node.value.id == "self":
            (own if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    return read - own


def test_no_private_name_of_another_library_is_used() -> None:
    found = []
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner not in ("self", "cls"):
                    found.append(f"{where}: .{node.attr}")
            if isinstance(node, ast.ClassDef):
                found += [f"{where}: self.{name}, a base class's" for name in inherited(node)]
            if isinstance(node, ast.ImportFrom) and node.module not in (None, "__future__"):
                private = [p for p in node.module.split(".") if p.startswith("_")]
                if private and node.module not in OWN_PRIVATE_MODULES:
                    found.append(f"{where}: from {node.module}")
                found += [f"{where}: import {a.name}" for a in node.names if a.name[0] == "_"]
    assert not found, "private names of other libraries:\n" + "\n".join(found)


def test_the_model_imports_without_lightning_or_hydra() -> None:
    modules = ", ".join(f"gptlab.{name}" for name in PLAIN_TORCH_MODULES)
    code = (
        f"import sys; import {modules}; "
        "print(sorted(m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=script_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def module_name(path: Path) -> str:
    """`training.run` for src/gptlab/training/run.py; `model` for its package's __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> set[str]:
    """gptlab modules a source imports, at the top or inside a function (without `gptlab.`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptlab."):
            names.add(node.module.removeprefix("gptlab."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("gptlab.") for a in node.names if a.name[:7] == "gptlab."}
    return names


def import_graph() -> dict[str, set[str]]:
    return {
        module_name(path): imported_modules(tree)
        for path, tree in parsed_sources()
        if PACKAGE in path.parents and module_name(path)
    }


def test_each_package_imports_only_the_packages_below_it() -> None:
    crossings = []
    for module, imported in import_graph().items():
        package = module.split(".")[0]
        if package not in ALLOWED_IMPORTS:
            continue  # a root module: the commands and small shared helpers
        for name in imported:
            target = name.split(".")[0]
            allowed = {package, *ALLOWED_IMPORTS[package]}
            if target in ALLOWED_IMPORTS and target not in allowed:
                crossings.append(f"{module} imports {name}")
    assert not crossings, crossings


def test_no_two_modules_import_each_other_even_through_others() -> None:
    graph = import_graph()
    assert len(graph) > 30

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    cycles = [module for module in graph if reaches(module, module, {module})]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_classes_people_import_come_from_gptlab() -> None:
    import gptlab
    from gptlab.data.datamodule import GPTDataModule
    from gptlab.model.gpt import GPTConfig, GPTModel
    from gptlab.training.module import GPTLightningModule

    assert gptlab.GPTLightningModule is GPTLightningModule
    assert (gptlab.GPTModel, gptlab.GPTConfig) == (GPTModel, GPTConfig)
    assert gptlab.GPTDataModule is GPTDataModule
