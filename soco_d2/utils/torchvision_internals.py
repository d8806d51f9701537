"""The non-public torchvision helpers this package uses, imported in one place.

torchvision does not promise to keep these names (they are not in any ``__all__``). Importing
them here, with the versions they were checked against, turns a torchvision that renamed or
dropped one into one clear error at import time that names the installed version, the missing
symbols and the fix, instead of an ``ImportError`` deep inside a detector.

Used by :mod:`soco_d2.finetune.detectors` (``AlignedMultiScaleRoIAlign``) and
:mod:`soco_d2.modeling.pooler`.
"""
import importlib

import torchvision

__all__ = ["LevelMapper", "convert_to_roi_format", "filter_input", "setup_scales",
           "TorchvisionInternalsError", "REQUIRED"]

# (module, name) of every helper used; present in torchvision 0.19 to 0.29 at least.
REQUIRED = (
    ("torchvision.ops.poolers", "_setup_scales"),
    ("torchvision.ops.poolers", "_filter_input"),
    ("torchvision.ops.poolers", "_convert_to_roi_format"),
    ("torchvision.ops.poolers", "LevelMapper"),
)


class TorchvisionInternalsError(ImportError):
    """The installed torchvision lacks a helper this package relies on."""


def _load():
    found, missing = {}, []
    for module_name, name in REQUIRED:
        try:
            found[name] = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{name}")
    if missing:
        raise TorchvisionInternalsError(
            f"torchvision {torchvision.__version__} lacks {', '.join(missing)}, non-public helpers "
            f"that soco_d2's detectors and RoI pooler use (checked with torchvision 0.19 to 0.29). "
            f"Install a torchvision of that range matching your torch, e.g. "
            f"pip install 'torchvision>=0.19,<0.30'.")
    return found


_found = _load()
setup_scales = _found["_setup_scales"]
filter_input = _found["_filter_input"]
convert_to_roi_format = _found["_convert_to_roi_format"]
LevelMapper = _found["LevelMapper"]
