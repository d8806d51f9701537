"""The package's layers (docs/ARCHITECTURE.md, "Layers"): a module imports only from its own
subpackage and the layers below it, lazy imports inside functions included (read with ast)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_graph import imports_of, package_modules  # noqa: E402

# Lowest first; a subpackage may import from those before it.
LAYERS = ["utils", "config", "checkpoint", "data", "modeling", "evaluation", "engine", "finetune",
          "detectron2"]

# Upward imports not yet removed, each named: the test fails once one is gone, so the list
# only shrinks (it is empty: every module imports only from its layer and those below).
KNOWN_UPWARD = set()


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (its version)


ALL = list(package_modules())


def test_every_subpackage_has_a_layer():
    assert {_layer(m) for m, _, _ in ALL} - {None} == set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = set()
    for module, is_package, path in ALL:
        own = _layer(module)
        for target in imports_of(module, is_package, path):
            other = _layer(target)
            if own is None or other is None or other == own:
                continue
            if LAYERS.index(other) > LAYERS.index(own):
                upward.add((module, target))
    assert upward == KNOWN_UPWARD


def test_the_training_loop_knows_neither_trainer():
    """engine/train_loop.py is below both trainers (pretraining's, fine-tuning's) and their
    hooks' providers (the monitors): it imports none of them."""
    module, is_package, path = next(m for m in ALL if m[0] == "soco_d2.engine.train_loop")
    above = {"soco_d2.engine.trainer", "soco_d2.engine.monitors", "soco_d2.finetune"}
    assert not {t for t in imports_of(module, is_package, path)
                if any(t == a or t.startswith(a + ".") for a in above)}


def test_fine_tuning_does_not_import_the_pretraining_trainer():
    """Both trainers start a run with engine/run_setup.py; fine-tuning needs nothing of
    pretraining's trainer (nor its model, data and monitors)."""
    importers = {m for m, is_package, path in ALL if m.startswith("soco_d2.finetune")
                 and "soco_d2.engine.trainer" in imports_of(m, is_package, path)}
    assert not importers


@pytest.mark.parametrize("code, expected", [
    ("from soco_d2.engine import trainer", {"soco_d2.engine"}),
    ("def f():\n    from ..engine.preemption import Preempted", {"soco_d2.engine.preemption"}),
    ("import soco_d2.detectron2 as d", {"soco_d2.detectron2"}),
    ("from . import soco_views", {"soco_d2.data"}),
])
def test_imports_are_read_at_any_depth(tmp_path, code, expected):
    path = tmp_path / "m.py"
    path.write_text(code)
    assert imports_of("soco_d2.data.m", False, str(path)) == expected
