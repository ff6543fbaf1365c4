"""Dependencies point one way (README, Architecture): each module imports only lower layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fashion_func"

# Every module of the package, in layers, lowest first; the README's Architecture section is
# written from this list. A module may import modules of lower layers only; within its own
# layer only what SAME_LAYER allows (state beside step, optim with its schedules). This list is
# the one source of the rule: a new module fails `test_every_module_has_a_layer` until it is
# given a layer, and the core (up to `__init__`) never imports the app (`cli.*`).
LAYERS: tuple[tuple[str, ...], ...] = (
    # -- the library core: knows no command-line flag ------------------------------------------
    ("tree", "safeio"),  # nothing from the package: helpers
    ("env",),  # environment values parsed like flags
    ("distributed",),  # torch.distributed; its torchrun environment through env
    ("atomic", "safetensors_io"),  # writing files whole, reading safetensors defensively
    ("nn",),
    ("models", "augment", "preprocess", "scattering"),  # the one normalisation; ScatterNet features
    ("losses", "metrics", "privacy"),  # privacy: DP-SGD's clip-and-noise, the accountants
    ("schedules", "optim"),
    # data and the step are siblings: neither imports the other (nothing about Fashion-MNIST
    # is hard-wired below data; state and step must not import it)
    ("data", "state", "step"),
    ("ensemble",),  # stacks states and vmaps the step's stages: beside step, below the driver
    ("callbacks",),
    ("checkpoint",),
    ("loop",),  # the only impure driver
    ("interop",),  # the weights' other ecosystems (torch modules, Flax, numpy, ONNX, JAX)
    ("__init__",),  # the library's face: the core re-exported, not the command line
    # -- the command-line app (fashion_func/cli/): composes the core, owns every flag -----------
    ("cli.__init__", "cli.args", "cli.device", "cli.summary", "cli.words"),
    ("cli.config", "cli.launch", "cli.images", "cli.report"),
    ("cli.budget", "cli.private"),  # caps and the memory estimate; private training's plan
    ("cli.app", "cli.export"),
    ("cli.train", "cli.predict"),
    ("cli.speedrun",),
    ("__main__",),
)
CORE_TOP = LAYERS.index(("__init__",))  # layers up to this one are the library core
SAME_LAYER: dict[str, set[str]] = {"step": {"state"}, "optim": {"schedules"}, "models": {"scattering"}}
APP = "cli"  # the one subpackage whose modules are layered one by one

LAYER_OF = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _package_modules() -> set[str]:
    """The package's modules: each .py file at the top, each subpackage (a folder with
    __init__.py) as one module, except the app's, whose files are `cli.<name>` each."""
    files = {p.stem for p in PKG.glob("*.py")}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()} - {APP}
    return files | packages | {f"{APP}.{p.stem}" for p in (PKG / APP).glob("*.py")}


def forbidden(module: str) -> set[str]:
    """The package modules `module` must not import: its own layer's (unless allowed) and higher."""
    level = LAYER_OF[module]
    above = {m for m, i in LAYER_OF.items() if i >= level}
    return above - {module} - SAME_LAYER.get(module, set())


def _top_module(parts: list[str], names: list[str]) -> set[str]:
    """The package modules an import names: `parts` is the absolute module path imported from."""
    if parts[:1] != ["fashion_func"]:
        return set()
    if parts[1:2] == [APP]:  # the app's modules count one by one
        return {f"{APP}.{parts[2]}"} if len(parts) > 2 else {f"{APP}.{n}" for n in names}
    return {parts[1]} if len(parts) > 1 else set(names)


def _imports_in(source: str, package: list[str]) -> set[str]:
    """The package's modules that `source`, a file of `package` (["fashion_func"],
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
    if module.startswith(f"{APP}."):
        return _imported_package_modules(PKG / APP / f"{module.split('.', 1)[1]}.py") - {module}
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
    source = "from fashion_func.cli import app\nfrom fashion_func.cli.config import Config\n"
    source += "from . import args\n"
    assert _imports_in(source, ["fashion_func", "cli"]) == {"cli.app", "cli.config", "cli.args"}


def test_the_core_imports_nothing_of_the_app():
    core = [m for layer in LAYERS[: CORE_TOP + 1] for m in layer]
    for module in core:
        app = sorted(m for m in _imports_of(module) if m.startswith(f"{APP}."))
        assert not app, f"core module {module} imports the command line's {app}"


def test_no_module_cites_a_document_the_repository_lacks():
    root = PKG.parent
    for path in PKG.rglob("*.py"):
        for doc in ("DESIGN.md", "EXAMPLES.md", "ANCHORS.md"):
            if doc in path.read_text():
                assert (root / doc).is_file(), f"{path.relative_to(root)} cites {doc}, not in the repository"


def test_torch_func_not_functorch():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "import functorch" not in text and "from functorch" not in text, path.name


def test_readme_architecture_matches_the_layers():
    """The README's Architecture table is this file's LAYERS, row by row."""
    text = (PKG.parent / "README.md").read_text()
    table = text.split("<!-- layers: begin -->", 1)[1].split("<!-- layers: end -->", 1)[0]
    rows = [line.split("|") for line in table.strip().splitlines()[2:]]
    documented = [tuple(m.strip().strip("`") for m in row[2].split(",")) for row in rows]
    assert documented == list(LAYERS), "README's Architecture table differs from LAYERS"
    assert [int(row[1]) for row in rows] == list(range(1, len(LAYERS) + 1))
