"""Dependencies point one way (DESIGN.md): each module imports only what its row allows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fashion_func"

# module -> package modules it must not import (DESIGN.md's layout table)
FORBIDDEN = {
    "tree": {"nn", "models", "optim", "losses", "metrics", "data", "state", "step", "callbacks",
             "checkpoint", "loop", "interop", "cli", "config", "predict", "export", "summary"},
    "nn": {"models", "optim", "step", "state", "data", "callbacks", "checkpoint", "loop", "interop"},
    "models": {"optim", "data", "step", "state", "callbacks", "checkpoint", "loop", "interop"},
    "losses": {"step", "callbacks", "checkpoint", "loop", "interop", "data"},
    "metrics": {"step", "callbacks", "checkpoint", "loop", "interop", "data"},
    "optim": {"models", "data", "step", "state", "callbacks", "checkpoint", "loop", "interop"},
    "data": {"models", "optim", "step", "state", "callbacks", "checkpoint", "loop", "interop"},
    "state": {"data", "callbacks", "checkpoint", "loop", "interop"},
    "step": {"data", "callbacks", "checkpoint", "loop", "interop", "ensemble"},
    # ensembles stack states and vmap the step's stages: beside step, below the driver
    "ensemble": {"data", "callbacks", "checkpoint", "loop", "interop", "app", "cli", "config"},
    "callbacks": {"checkpoint", "loop", "interop", "data", "step"},
    "checkpoint": {"models", "data", "loop", "interop", "step"},
    "loop": {"interop", "app", "cli", "config", "data", "models", "step", "ensemble", "distributed",
             "launch"},
    # the data-parallel stage and helpers: torch.distributed only, no driver, no files
    "distributed": {"nn", "models", "optim", "data", "step", "state", "callbacks", "checkpoint",
                    "loop", "interop", "app", "cli", "config", "launch", "ensemble"},
    "launch": {"interop", "app", "cli"},
    "app": {"interop"},
    "cli": {"interop"},
    "config": {"interop", "loop", "app"},
    # the shared file-safety helpers sit below everything that reads or writes a user's file
    "safeio": {"tree", "nn", "models", "optim", "losses", "metrics", "data", "state", "step", "callbacks",
               "checkpoint", "loop", "interop", "cli", "config", "predict", "export", "app"},
}  # fmt: skip


def _imported_package_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fashion_func":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("fashion_func."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fashion_func."))
    return found


def _imports_of(module: str) -> set[str]:
    """Package modules imported by `module` (a file, or every file of a subpackage)."""
    if (PKG / module).is_dir():
        found: set[str] = set()
        for path in (PKG / module).glob("*.py"):
            found |= _imported_package_modules(path)
        return found - {module}
    return _imported_package_modules(PKG / f"{module}.py")


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_imports_only_what_the_design_allows(module):
    imported = _imports_of(module)
    assert not imported & FORBIDDEN[module], f"{module} imports {sorted(imported & FORBIDDEN[module])}"


def test_no_core_module_imports_interop():
    for path in PKG.rglob("*.py"):
        if path.stem not in {"predict", "export"} and path.parent.name != "interop":
            assert "interop" not in _imported_package_modules(path), path.name


def test_torch_func_not_functorch():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "import functorch" not in text and "from functorch" not in text, path.name
