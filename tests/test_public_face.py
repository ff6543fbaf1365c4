"""The public face: every `__all__` is the documented API and nothing else (DESIGN.md, equinox).

(a) Each name the README's ```python blocks import or use (`ff.X`, `ff.mod.X`, `from fashion_func
import mod`, `from fashion_func.mod import X`, `mod.X` for a module bound so) is in the matching
`__all__`.

(b) Each name of every `__all__` in the package exists and is documented. The rule: a module, a
class or a function (a `functools` wrapper too) has a docstring of its own; a class's docstring
is written, not the one `dataclass` or `NamedTuple` generate (`Name(field, ...)`). Anything else
(a constant, a type alias, a ready-made instance) cannot carry a docstring of its own, so the
docstring of the module that exports it names it.

(c) The leaks issue 33 found stay out: test hooks and the step's internals are in no `__all__`.

(d) The command line keeps copies of a few core facts so that `cli.config` imports no torch (a
usage error exits before torch loads); each copy is checked here against the core it copies.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fashion_func"


def _module_names() -> list[str]:
    """Every module of the package whose source assigns `__all__` (found without importing)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Assign | ast.AnnAssign) and "__all__" in ast.unparse(n).split("=")[0]
               for n in tree.body):  # fmt: skip
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _module_names()


def _all(module: str) -> list[str]:
    return list(importlib.import_module(module).__all__)


# -- (a) the README's Python blocks ----------------------------------------------------------------


def _readme_uses() -> list[tuple[str, str]]:
    """(module, name) for each name the README's Python blocks take from a fashion_func module."""
    text = (ROOT / "README.md").read_text()
    bound: dict[str, str] = {"ff": "fashion_func"}  # the README's convention, kept across blocks
    uses: list[tuple[str, str]] = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("fashion_func"):
                        bound[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashion_func"):
                for a in node.names:
                    uses.append((node.module, a.name))  # type: ignore[arg-type]
                    full = f"{node.module}.{a.name}"
                    if (PACKAGE.parent / full.replace(".", "/")).is_dir() or \
                            (PACKAGE.parent / (full.replace(".", "/") + ".py")).is_file():  # fmt: skip
                        bound[a.asname or a.name] = full
        for node in ast.walk(tree):  # attribute chains rooted at a bound module: ff.optim.adam
            if not isinstance(node, ast.Attribute):
                continue
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in bound:
                module = bound[inner.id]
                for attr in reversed(chain):
                    uses.append((module, attr))
                    sub = f"{module}.{attr}"
                    if importlib.util.find_spec(module) and isinstance(
                        getattr(importlib.import_module(module), attr, None), ModuleType
                    ):
                        module = sub
                    else:
                        break
    return sorted(set(uses))


def test_the_readme_parser_sees_the_documented_names():
    # the parser itself: if it found nothing, (a) would pass vacuously
    uses = _readme_uses()
    for expected in [
        ("fashion_func", "make_train_step"),
        ("fashion_func.data", "PoissonBatches"),
        ("fashion_func.optim", "adam"),
        ("fashion_func", "interop"),
        ("fashion_func.interop", "flax_train_state"),
        ("fashion_func.ensemble", "member"),
    ]:
        assert expected in uses, expected
    assert len(uses) > 40


def test_each_name_the_readme_uses_is_in_its_modules_all():
    missing = [f"{module}.{name}" for module, name in _readme_uses() if name not in _all(module)]
    assert not missing, f"used by the README but not in __all__: {missing}"


# -- (b) every name of every __all__ exists and is documented --------------------------------------


def _generated_doc(obj: type, doc: str) -> bool:
    return doc.startswith(f"{obj.__name__}(")  # what dataclass and NamedTuple write when none is given


def _undocumented(module: ModuleType, name: str) -> str | None:
    """Why `module.name` breaks the docstring rule (module docstring), or None when it keeps it."""
    if not hasattr(module, name):
        return "missing"
    obj = getattr(module, name)
    if inspect.ismodule(obj) or inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
        return None if (obj.__doc__ or "").strip() else "no docstring"
    if inspect.isclass(obj):
        doc = (obj.__dict__.get("__doc__") or "").strip()
        return None if doc and not _generated_doc(obj, doc) else "no docstring of its own"
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", module.__doc__ or ""))
    return None if name in words else "a constant the module docstring does not name"


@pytest.mark.parametrize("module", MODULES)
def test_each_exported_name_exists_and_is_documented(module):
    mod = importlib.import_module(module)
    assert (mod.__doc__ or "").strip(), f"{module} has no docstring"
    assert len(mod.__all__) == len(set(mod.__all__)), f"{module}.__all__ repeats a name"
    bad = {name: why for name in mod.__all__ if (why := _undocumented(mod, name))}
    assert not bad, f"{module}: {bad}"


# -- (c) the known leaks stay out -------------------------------------------------------------------

LEAKS = {"DEBIAN_DIR", "DOWNLOAD_ROOT", "fetch", "CoreIn", "CoreOut"}  # test hooks; the step's core


def test_the_known_leaks_are_in_no_all_and_stay_importable():
    found = {f"{m}.{n}" for m in MODULES for n in _all(m) if n in LEAKS}
    assert not found, f"test hooks or internals in an __all__: {sorted(found)}"
    from fashion_func import data, step

    for name in ("DEBIAN_DIR", "DOWNLOAD_ROOT", "fetch"):  # private to the face, still there for tests
        assert hasattr(data, name), name
    assert hasattr(step, "CoreIn") and hasattr(step, "CoreOut")
    assert "PoissonBatches" in data.__all__  # the README's private training uses it


# -- (d) the command line's copies of core facts -----------------------------------------------------


def test_the_cli_copies_of_core_facts_equal_the_core():
    from fashion_func import models, optim, privacy, step
    from fashion_func.cli import config

    assert set(config.MODELS) == set(models.MODELS)
    assert set(config.WIDE_MODELS) == {n for n, f in models.MODELS.items()
                                       if "width" in inspect.signature(f).parameters}  # fmt: skip
    assert {n for n, f in models.MODELS.items() if "groups" in inspect.signature(f).parameters} == {"dpcnn"}
    assert set(config.ACCOUNTANTS) == set(privacy.ACCOUNTANTS)
    assert set(config.PRECISIONS) == set(step.PRECISIONS)
    assert set(config.OPTIMIZERS) <= set(optim.__all__)
    assert config.DP_MAX_GRAD_NORM > 0


def test_batch_norm_models_are_the_cores_stateful_models():
    from fashion_func import models
    from fashion_func.cli import config

    stateful = {name for name in models.MODELS if models.get(name).stateful}
    assert stateful == {"simplenet_bn", "resnet"}
    assert {name for name in models.MODELS if config.has_batch_norm(name)} == stateful
