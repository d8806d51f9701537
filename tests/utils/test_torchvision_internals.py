import importlib
import sys
import types

import pytest
import torchvision


def _reimport(monkeypatch, name):
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delitem(sys.modules, "soco_d2.utils.torchvision_internals", raising=False)
    return importlib.import_module(name)


def test_helpers_are_torchvisions_own():
    from torchvision.ops import poolers

    from soco_d2.utils import torchvision_internals as tvi

    assert tvi.setup_scales is poolers._setup_scales
    assert tvi.LevelMapper is poolers.LevelMapper


def test_a_torchvision_without_the_helpers_fails_at_import_naming_version_and_symbols(monkeypatch):
    bare = types.ModuleType("torchvision.ops.poolers")  # a future torchvision: helpers gone
    bare.LevelMapper = object
    monkeypatch.setitem(sys.modules, "torchvision.ops.poolers", bare)
    with pytest.raises(ImportError) as e:
        _reimport(monkeypatch, "soco_d2.finetune.detectors")
    msg = str(e.value)
    assert torchvision.__version__ in msg
    for name in ("_setup_scales", "_filter_input", "_convert_to_roi_format"):
        assert f"torchvision.ops.poolers.{name}" in msg
    assert "LevelMapper" not in msg  # present: not reported
    assert "pip install" in msg
