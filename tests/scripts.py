"""Repository scripts (``tools/``, ``benchmarks/``) loaded as modules, for tests of their functions."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str):
    """The script at ``relpath`` under the repository (e.g. ``"tools/demo.py"``), executed as a new
    module named after its path."""
    name = os.path.splitext(relpath)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
