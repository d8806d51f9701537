"""Every third-party package the installed code imports is declared in pyproject.toml."""
import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", n, 1)[0].lower().replace("_", "-") for n in names}


def _top_level_imports():
    """Top-level module names imported at module level (not inside functions) by soco_d2."""
    found = set()
    for path in (ROOT / "soco_d2").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"soco_d2", "detectron2"}


def test_module_level_imports_are_declared_dependencies():
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {}
    for module in _top_level_imports():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
