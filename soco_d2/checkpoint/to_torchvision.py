"""detectron2 weights to torchvision detector names (``backbone.body.*``, ``backbone.fpn.*``,
``roi_heads.box_head.*``), for ``maskrcnn_resnet50_fpn_v2`` / ``retinanet_resnet50_fpn(_v2)``
fine-tuning; any input :func:`~soco_d2.checkpoint.to_d2.convert_to_d2` reads goes through it.
"""
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from soco_d2.utils.fileio import atomic_write

from .layout import ConversionError
from .to_d2 import ConversionReport, convert_to_d2

__all__ = ["TORCHVISION_FPN_LEVELS", "convert_to_torchvision", "d2_to_torchvision",
           "save_torchvision_state_dict"]

_D2_SHORT = re.compile(
    r"(?:^|\.)((?:stem|res[2-5])\.[\w.]+|fpn_(?:lateral|output)\d\.[\w.]+|box_head\.[\w.]+)$"
)

# FPN levels of torchvision's detectors, in the order of their ``inner_blocks``.
TORCHVISION_FPN_LEVELS = {
    "maskrcnn_resnet50_fpn_v2": (2, 3, 4, 5),
    "maskrcnn_resnet50_fpn": (2, 3, 4, 5),
    "fasterrcnn_resnet50_fpn_v2": (2, 3, 4, 5),
    "retinanet_resnet50_fpn": (3, 4, 5),
    "retinanet_resnet50_fpn_v2": (3, 4, 5),
}


def _d2_short_to_torchvision(name: str, fpn_levels: Sequence[int], num_conv: int) -> Optional[str]:
    m = re.match(r"^stem\.conv1\.(weight|bias)$", name)
    if m:
        return f"backbone.body.conv1.{m[1]}"
    m = re.match(r"^stem\.conv1\.norm\.(\w+)$", name)
    if m:
        return f"backbone.body.bn1.{m[1]}"
    m = re.match(r"^res([2-5])\.(\d+)\.(conv\d|shortcut)\.(weight|norm\.\w+)$", name)
    if m:
        stage, block, conv, rest = int(m[1]) - 1, m[2], m[3], m[4]
        if conv == "shortcut":
            tv = "downsample.0.weight" if rest == "weight" else f"downsample.1.{rest[5:]}"
        else:
            tv = f"{conv}.weight" if rest == "weight" else f"bn{conv[4:]}.{rest[5:]}"
        return f"backbone.body.layer{stage}.{block}.{tv}"
    m = re.match(r"^fpn_(lateral|output)(\d)\.(weight|bias|norm\.\w+)$", name)
    if m:
        level = int(m[2])
        if level not in fpn_levels:
            return None
        blocks = "inner_blocks" if m[1] == "lateral" else "layer_blocks"
        rest = m[3]
        tv = f"0.{rest}" if rest in ("weight", "bias") else f"1.{rest[5:]}"
        return f"backbone.fpn.{blocks}.{list(fpn_levels).index(level)}.{tv}"
    m = re.match(r"^box_head\.conv(\d+)\.(weight|bias|norm\.\w+)$", name)
    if m:
        rest = m[2]
        tv = f"0.{rest}" if rest in ("weight", "bias") else f"1.{rest[5:]}"
        return f"roi_heads.box_head.{int(m[1]) - 1}.{tv}"
    m = re.match(r"^box_head\.fc(\d+)\.(weight|bias)$", name)
    if m:
        # FastRCNNConvFCHead: convs, Flatten, then (Linear, ReLU) pairs; also for a 2fc head
        # (NUM_CONV 0), which this project builds with the same class.
        return f"roi_heads.box_head.{num_conv + 1 + 2 * (int(m[1]) - 1)}.{m[2]}"
    return None


def d2_to_torchvision(
    d2: Mapping[str, Any], fpn_levels: Sequence[int] = (2, 3, 4, 5)
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Map detectron2 weights (short names such as ``res2.0.conv1.weight`` or fully qualified
    ``backbone.bottom_up.*`` / ``roi_heads.res5.*`` / ``roi_heads.box_head.*``) to torchvision
    detector names (``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*``).

    ``fpn_levels``: the pyramid levels of the target detector's ``inner_blocks``, in order
    ((2, 3, 4, 5) for Mask R-CNN, (3, 4, 5) for RetinaNet; see ``TORCHVISION_FPN_LEVELS``).
    Returns ``(state_dict, skipped)`` where ``skipped`` maps each unused key to the reason.
    """
    short: Dict[str, str] = {}
    skipped: Dict[str, str] = {}
    for key in d2:
        m = _D2_SHORT.search(key)
        if m is None:
            skipped[key] = "not a backbone / FPN / box-head weight"
            continue
        if m[1] in short:
            raise ConversionError(f"ambiguous detectron2 weights: '{short[m[1]]}' and '{key}' are both {m[1]}")
        short[m[1]] = key
    num_conv = len({m[1] for n in short for m in [re.match(r"^box_head\.conv(\d+)\.weight$", n)] if m})
    out: Dict[str, torch.Tensor] = {}
    for name, key in short.items():
        tv = _d2_short_to_torchvision(name, fpn_levels, num_conv)
        if tv is None:
            skipped[key] = (
                f"FPN level not in the target detector {tuple(fpn_levels)}"
                if name.startswith("fpn_")
                else "no torchvision counterpart"
            )
            continue
        value = d2[key]
        out[tv] = torch.tensor(value) if isinstance(value, np.ndarray) else value.detach().cpu()
    if not out:
        raise ConversionError(
            f"no detectron2 backbone / FPN / box-head weights found; keys e.g. {list(d2)[:8]}"
        )
    return out, skipped


def convert_to_torchvision(
    state_or_path: Union[str, os.PathLike, Mapping[str, Any]],
    fpn_levels: Sequence[int] = (2, 3, 4, 5),
    **options,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Like :func:`convert_to_d2` (``options``: its ``parts``, ``branch``, ``depth``,
    ``allow_unmapped``, ``trust``), but returns torchvision detector names (``backbone.body.*``,
    ``backbone.fpn.*``, ``roi_heads.box_head.*``), for ``maskrcnn_resnet50_fpn_v2`` /
    ``retinanet_resnet50_fpn(_v2)`` fine-tuning (load with ``strict=False``); ``fpn_levels`` as
    for :func:`d2_to_torchvision`."""
    d2, report = convert_to_d2(state_or_path, **options)
    tv, skipped = d2_to_torchvision(d2, fpn_levels)
    inverse = {v: k for k, v in report.mapped.items()}
    for d2_key, reason in skipped.items():
        src = inverse[d2_key]
        del report.mapped[src]
        report.dropped[src] = reason
    num_conv = sum(1 for k in d2 if re.match(r"^box_head\.conv\d+\.weight$", k))
    for src, d2_key in report.mapped.items():
        report.mapped[src] = _d2_short_to_torchvision(d2_key, fpn_levels, num_conv)
    return tv, report


def save_torchvision_state_dict(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write ``{"model": state}`` with ``torch.save``, atomically; loadable with
    ``torch.load(weights_only=True)``."""
    atomic_write(path, lambda f: torch.save({"model": dict(state)}, f))
