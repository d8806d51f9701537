"""Initial weights of a detector: ``MODEL.WEIGHTS`` (detectron2 ``.pkl``, torchvision or soco_d2
``.pth``, a bare ResNet state dict) loaded by name and shape, with a per-module report."""
import logging
import os
from collections import defaultdict
from typing import Dict, List

import torch
from torch import nn

from soco_d2.checkpoint.io import load_checkpoint_file

from .detectors import backbone_prefix

__all__ = ["WeightsLoadingError", "load_detector_weights"]

logger = logging.getLogger(__name__)


class WeightsLoadingError(RuntimeError):
    """``MODEL.WEIGHTS`` that cannot initialise the detector (missing file, nothing matching)."""


def _is_detectron2_names(keys) -> bool:
    return any(k.startswith(("stem.", "res2.", "backbone.bottom_up.", "backbone.res2."))
               for k in keys)


def _is_bare_resnet_names(keys) -> bool:
    return any(k.startswith(("conv1.", "layer1.")) for k in keys)


def _to_detector_names(state: Dict, path: str, fpn_levels) -> Dict[str, torch.Tensor]:
    """Rename a loaded state dict to the detector's (torchvision) names."""
    if _is_detectron2_names(state):
        from soco_d2.checkpoint import d2_to_torchvision

        state, skipped = d2_to_torchvision(state, fpn_levels)
        logger.info("%s: detectron2 names converted to torchvision's (%d entries have no "
                    "counterpart in the detector).", path, len(skipped))
    elif _is_bare_resnet_names(state):
        state = {backbone_prefix() + k: v for k, v in state.items()}
        logger.info("%s: a bare ResNet state dict; loaded into %s*.", path, backbone_prefix())
    return {k: torch.as_tensor(v) for k, v in state.items()}


def _fpn_levels(model: nn.Module):
    """Pyramid levels of the detector's FPN inputs: (2, 3, 4, 5) Mask R-CNN, (3, 4, 5) RetinaNet."""
    n = len(model.backbone.fpn.inner_blocks)
    return tuple(range(6 - n, 6))


def _group(name: str) -> str:
    return ".".join(name.split(".")[:2])  # backbone.body, backbone.fpn, rpn.head, roi_heads.box_head


def load_detector_weights(model: nn.Module, path: str, trust: bool = False) -> Dict[str, List[str]]:
    """Initialise ``model`` from ``path`` (detectron2 ``.pkl``, torchvision / soco_d2 ``.pth``).

    Every detector tensor whose name and shape are in the file is loaded; the others stay at
    their random init. A summary (loaded / left at init per module, unused file entries) is
    logged. Raises :class:`WeightsLoadingError` if the file does not exist or no backbone tensor
    matched (a wrong or mis-converted file would otherwise train silently from scratch).
    Returns ``{"loaded", "missing", "unused", "shape_mismatch"}`` name lists.
    """
    if not os.path.isfile(path):
        raise WeightsLoadingError(
            f"MODEL.WEIGHTS {path!r} does not exist. Give a detectron2 .pkl (tools/convert_to_d2.py),"
            " a torchvision / soco_d2 .pth, or \"\" to train from random init."
        )
    state = _to_detector_names(load_checkpoint_file(path, trust=trust), path, _fpn_levels(model))
    own = model.state_dict()
    loaded, mismatch = [], []
    for k, v in state.items():
        if k not in own:
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            mismatch.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            continue
        own[k] = v.to(own[k].dtype)
        loaded.append(k)
    model.load_state_dict(own)
    missing = sorted(set(own) - set(loaded) - {m.split(":")[0] for m in mismatch})
    unused = sorted(set(state) - set(own))
    report = {"loaded": loaded, "missing": missing, "unused": unused, "shape_mismatch": mismatch}
    _log_weights_report(path, report)
    prefix = backbone_prefix()
    if not any(k.startswith(prefix) and not k.endswith("num_batches_tracked") for k in loaded):
        raise WeightsLoadingError(
            f"No backbone weight of MODEL.WEIGHTS {path!r} matches the detector ({len(state)} "
            f"entries in the file, e.g. {sorted(state)[:3]}; the detector's backbone keys look like "
            f"{prefix}layer1.0.conv1.weight). Convert the checkpoint with tools/convert_to_d2.py "
            "first, or check MODEL.RESNETS.DEPTH."
        )
    # The backbone must load completely: a partial match means another architecture or depth.
    partial = [k for k in report["missing"]
               if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    partial += [k for k in report["unused"] if k.startswith(prefix) and not k.startswith(prefix + "fc.")]
    partial += [m for m in mismatch if m.startswith(prefix)]
    if partial:
        raise WeightsLoadingError(
            f"The backbone in MODEL.WEIGHTS {path!r} matches the detector's only in part "
            f"({len(partial)} tensors missing, extra or of another shape, e.g. {partial[:3]}): "
            f"check MODEL.RESNETS.DEPTH (now {_depth_hint(model)})."
        )
    return report


def _depth_hint(model: nn.Module) -> str:
    body = model.backbone.body
    blocks = [len(getattr(body, f"layer{i}", [])) for i in (1, 2, 3, 4)]
    return f"blocks per stage {blocks}"


def _log_weights_report(path: str, report: Dict[str, List[str]]) -> None:
    def per_group(names):
        counts = defaultdict(int)
        for n in names:
            if not n.endswith("num_batches_tracked"):
                counts[_group(n.split(":")[0])] += 1
        return ", ".join(f"{g} ({c})" for g, c in sorted(counts.items())) or "none"

    logger.info("Loaded from %s: %s", path, per_group(report["loaded"]))
    logger.info("Left at initialisation: %s", per_group(report["missing"]))
    if report["shape_mismatch"]:
        logger.warning("Not loaded (shape differs):\n  %s", "\n  ".join(report["shape_mismatch"]))
    if report["unused"]:
        shown = report["unused"][:20]
        logger.info("Entries of the file not used (%d): %s%s", len(report["unused"]),
                    ", ".join(shown), " ..." if len(report["unused"]) > 20 else "")
