"""Checks of converted weights (detectron2 short names): a complete standard ResNet of the
expected depth, an FPN whose levels run to 5 without gaps and fit the ResNet, a complete box head.
"""
import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torchvision

from .layout import ConversionError, map_torchvision_resnet_key

__all__ = [
    "SUPPORTED_DEPTHS",
    "expected_backbone_shapes",
    "infer_depth",
    "validate_backbone",
    "validate_fpn",
    "validate_head",
]

SUPPORTED_DEPTHS = (18, 34, 50, 101, 152)

_DEPTH_OF_BLOCKS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


@functools.lru_cache(maxsize=None)
def expected_backbone_shapes(depth: int) -> Dict[str, Tuple[int, ...]]:
    """Every detectron2 backbone key (short names) of a ResNet-``depth`` and its shape, generated
    from torchvision's ``resnet{depth}`` through the same mapping (``num_batches_tracked``
    included, ``fc`` excluded)."""
    if depth not in SUPPORTED_DEPTHS:
        raise ConversionError(f"ResNet depth {depth} is not supported; use one of {SUPPORTED_DEPTHS}")
    with torch.device("meta"):
        model = getattr(torchvision.models, f"resnet{depth}")()
    out = {}
    for k, v in model.state_dict().items():
        name = map_torchvision_resnet_key(k)
        if name is not None:
            out[name] = tuple(v.shape)
    return out


def infer_depth(d2: Mapping[str, Any]) -> Tuple[Optional[int], str]:
    """ResNet depth from the number of blocks per stage (None if no standard depth fits), and a
    description of what was found."""
    blocks = {s: set() for s in range(2, 6)}
    for k in d2:
        m = re.match(r"^res([2-5])\.(\d+)\.", k)
        if m:
            blocks[int(m[1])].add(int(m[2]))
    counts = tuple(max(b) + 1 if b else 0 for b in blocks.values())
    bottleneck = "res2.0.conv3.weight" in d2
    desc = f"blocks per stage res2..res5 = {counts}, {'bottleneck' if bottleneck else 'basic'} blocks"
    return _DEPTH_OF_BLOCKS.get((counts, bottleneck)), desc


def validate_backbone(d2: Dict[str, np.ndarray], depth: Optional[int], source: str) -> int:
    found, desc = infer_depth(d2)
    if depth is not None and found is not None and found != depth:
        raise ConversionError(
            f"{source}: expected a ResNet-{depth} but the checkpoint holds a ResNet-{found} ({desc})"
        )
    depth = depth if depth is not None else found
    if depth is None:
        raise ConversionError(
            f"{source}: cannot infer the ResNet depth ({desc}); a complete ResNet-"
            f"{'/'.join(map(str, SUPPORTED_DEPTHS))} backbone is expected"
        )
    expected = expected_backbone_shapes(depth)
    # num_batches_tracked is optional: old torchvision checkpoints do not have it and detectron2
    # does not need it.
    missing = [k for k in expected if k not in d2 and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConversionError(
            f"{source}: the backbone is incomplete for a ResNet-{depth}: {len(missing)} keys missing, "
            f"e.g. {missing[:5]}"
        )
    extra = [k for k in d2 if re.match(r"^(stem|res\d)\.", k) and k not in expected]
    bad = [
        f"{k}: {tuple(d2[k].shape)} instead of {expected[k]}"
        for k in d2
        if k in expected and tuple(d2[k].shape) != expected[k]
    ]
    if extra or bad:
        raise ConversionError(
            f"{source}: the backbone is not a standard ResNet-{depth}: "
            + (f"unexpected keys {extra[:5]} " if extra else "")
            + (f"wrong shapes {bad[:5]}" if bad else "")
        )
    return depth


def validate_fpn(d2: Dict[str, np.ndarray], source: str) -> None:
    levels = sorted({int(m[1]) for k in d2 for m in [re.match(r"^fpn_lateral(\d)\.weight$", k)] if m})
    if not levels or levels != list(range(levels[0], 6)):
        raise ConversionError(f"{source}: FPN levels must run up to 5 without gaps; found laterals {levels}")
    normed = any(".norm." in k for k in d2 if k.startswith("fpn_"))
    need = ("weight",) + (("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var") if normed else ())
    missing = [
        f"fpn_{kind}{lv}.{s}" for lv in levels for kind in ("lateral", "output") for s in need
        if f"fpn_{kind}{lv}.{s}" not in d2
    ]
    if missing:
        raise ConversionError(f"{source}: the FPN is incomplete: missing {missing[:6]}")
    for lv in levels:
        stage = f"res{lv}.0.conv3.weight" if f"res{lv}.0.conv3.weight" in d2 else f"res{lv}.0.conv2.weight"
        if stage in d2 and d2[f"fpn_lateral{lv}.weight"].shape[1] != d2[stage].shape[0]:
            raise ConversionError(
                f"{source}: fpn_lateral{lv} takes {d2[f'fpn_lateral{lv}.weight'].shape[1]} channels "
                f"but res{lv} outputs {d2[stage].shape[0]}"
            )


def validate_head(d2: Dict[str, np.ndarray], source: str) -> None:
    convs = sorted({int(m[1]) for k in d2 for m in [re.match(r"^box_head\.conv(\d+)\.weight$", k)] if m})
    if convs != list(range(1, len(convs) + 1)) or "box_head.fc1.weight" not in d2:
        raise ConversionError(
            f"{source}: the box head must have conv1..convN and fc1; found convs {convs}, "
            f"fc1 {'present' if 'box_head.fc1.weight' in d2 else 'missing'}"
        )
    normed = any(k.startswith("box_head.conv") and ".norm." in k for k in d2)
    if normed:
        missing = [f"box_head.conv{i}.norm.{s}" for i in convs for s in ("weight", "bias", "running_mean", "running_var")
                   if f"box_head.conv{i}.norm.{s}" not in d2]
        if missing:
            raise ConversionError(f"{source}: the box head is incomplete: missing {missing[:6]}")
