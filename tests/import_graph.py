"""The soco_d2 imports of every module of the package, read with ast (lazy imports inside
functions included); used by tests/test_layering.py and tests/detectron2/test_import_isolation.py."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "soco_d2")


def package_modules():
    """``(module name, is a package __init__, path)`` of every module of soco_d2."""
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                is_package = rel[-1] == "__init__"
                yield ".".join(rel[:-1] if is_package else rel), is_package, path


def imports_of(module: str, is_package: bool, path: str):
    """Every soco_d2 module that ``module`` imports, at any depth of its code (absolute names)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module.split(".") if is_package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
        else:
            continue
        out.update(n for n in names if n == "soco_d2" or n.startswith("soco_d2."))
    return out
