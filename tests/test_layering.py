"""Dependencies point one way (DESIGN.md): each module imports only modules in lower layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fashion_func"

# Every module of the package, in layers, lowest first: the order of DESIGN.md's layout table
# ("a module never imports one listed after it"), with the modules it does not name put where
# their imports place them. A module may import modules of lower layers only; within its own
# layer only what SAME_LAYER allows (DESIGN.md's "state, step" row, optim with its schedules).
# This list is the one source of the rule: when a row of the table moves, move it here, and a
# new module fails `test_every_module_has_a_layer` until it is given a layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("tree", "safeio", "distributed"),  # nothing from the package: helpers, torch.distributed only
    ("atomic", "safetensors_io"),  # writing files whole, reading safetensors defensively
    ("nn",),
    ("models", "augment"),
    ("losses", "metrics"),
    ("schedules", "optim"),
    # data and the step are siblings: neither imports the other (DESIGN.md: nothing about
    # Fashion-MNIST is hard-wired below data; state and step must not import it)
    ("data", "state", "step"),
    ("ensemble",),  # stacks states and vmaps the step's stages: beside step, below the driver
    ("callbacks",),
    ("checkpoint",),
    ("loop",),  # the only impure driver
    ("__init__",),  # the library's face: the core re-exported, not the command line
    ("launch", "summary"),
    ("config",),
    ("app",),
    ("cli",),
    ("interop", "images", "report"),  # nothing in the core or the command line imports these
    ("predict", "export"),
    ("__main__",),
)
SAME_LAYER: dict[str, set[str]] = {"step": {"state"}, "optim": {"schedules"}}

LAYER_OF = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _package_modules() -> set[str]:
    """The package's modules: each .py file at the top, each subpackage (a folder with __init__.py)."""
    files = {p.stem for p in PKG.glob("*.py")}
    return files | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}


def forbidden(module: str) -> set[str]:
    """The package modules `module` must not import: its own layer's (unless allowed) and higher."""
    level = LAYER_OF[module]
    above = {m for m, i in LAYER_OF.items() if i >= level}
    return above - {module} - SAME_LAYER.get(module, set())


def _top_module(parts: list[str], names: list[str]) -> set[str]:
    """The package modules an import names: `parts` is the absolute module path imported from."""
    if parts[:1] != ["fashion_func"]:
        return set()
    return {parts[1]} if len(parts) > 1 else set(names)


def _imports_in(source: str, package: list[str]) -> set[str]:
    """The package's top-level names that `source`, a file of `package` (["fashion_func"],
    ["fashion_func", "loop"]), imports at any depth, relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            found |= _top_module(parts, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found |= _top_module(alias.name.split("."), [])
    return found


def _imported_package_modules(path: Path) -> set[str]:
    """The package modules a file imports (`from fashion_func import __version__`, a name of the
    package itself rather than a module, does not count)."""
    package = list(path.relative_to(PKG.parent).parent.parts)
    return _imports_in(path.read_text(), package) & _package_modules()


def _imports_of(module: str) -> set[str]:
    """Package modules imported by `module` (a file, or every file of a subpackage)."""
    if (PKG / module).is_dir():
        found: set[str] = set()
        for path in (PKG / module).rglob("*.py"):
            found |= _imported_package_modules(path)
        return found - {module}
    return _imported_package_modules(PKG / f"{module}.py")


def test_every_module_has_a_layer():
    listed = [m for layer in LAYERS for m in layer]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    gone = sorted(set(listed) - _package_modules())
    assert not gone, f"listed in LAYERS but not in the package: {gone}"
    missing = sorted(_package_modules() - set(listed))
    assert not missing, f"modules without a layer in LAYERS (give each one): {missing}"
    for module, allowed in SAME_LAYER.items():
        assert all(LAYER_OF[a] == LAYER_OF[module] for a in allowed), module


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_module_imports_only_lower_layers(module):
    imported = _imports_of(module)
    bad = sorted(imported & forbidden(module))
    assert not bad, f"{module} (layer {LAYER_OF[module]}) imports {bad} of its own layer or above"


def test_imports_are_found_in_subpackages_and_relative_forms():
    assert {"callbacks", "checkpoint", "state"} <= _imports_of("loop")  # every file of the subpackage
    source = "from .. import data\nfrom . import rundir\nfrom ..step import f\nimport fashion_func.nn\n"
    assert _imports_in(source, ["fashion_func", "loop"]) == {"data", "loop", "step", "nn"}
    source = "from . import tree\nfrom fashion_func import models as m\n"
    assert _imports_in(source, ["fashion_func"]) == {"tree", "models"}


def test_torch_func_not_functorch():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "import functorch" not in text and "from functorch" not in text, path.name
