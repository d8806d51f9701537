"""Conversion of pretrained weights to detectron2 (``.pkl``) and torchvision detector state dicts.

The input layout is detected from the keys, whatever their prefix. Each recognised *component*
(ResNet, FPN, box head) is found by anchor keys and mapped to detectron2's short names:

============================  ===========================================================
ResNet, torchvision names     ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ... under any
                              prefix: torchvision, MoCo ``module.encoder_q.``, OpenSelfSup /
                              DenseCL ``backbone.``, official SoCo ``module.encoder.``, this
                              project's ``backbone.body.`` / DetCo ``encoder_q.body.``
ResNet, detectron2 names      ``stem.conv1.weight``, ``res2.0.conv1.weight`` (MoCo/DetCo/SoCo .pkl
                              files, ``backbone.bottom_up.`` models; C4 ``roi_heads.res5.``)
FPN, torchvision              ``inner_blocks.{i}.0.weight`` / ``.1.*`` (BN), ``layer_blocks.{i}...``
FPN, mmdetection              ``lateral_convs.{i}.conv.weight`` / ``.bn.*``, ``fpn_convs.{i}...``
                              (official SoCo ``module.neck.``)
FPN, detectron2               ``fpn_lateral{l}.weight`` / ``.norm.*``, ``fpn_output{l}...``
box head, torchvision         ``FastRCNNConvFCHead``: ``{i}.0.weight`` / ``{i}.1.*``, flatten, then
                              ``{n+1}.weight`` (fc)
box head, conv/fc names       ``conv{i}.weight``, ``bn{i}.*`` or ``conv{i}.norm.*``, ``fc1.*``
                              (official SoCo ``module.head.``, detectron2 ``box_head.``)
============================  ===========================================================

Output names follow the MoCo converter's convention, *without* the ``backbone.bottom_up.`` prefix:
``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ``fpn_lateral2.weight``,
``box_head.conv1.weight``, ``box_head.fc1.weight``. detectron2's ``matching_heuristics``
suffix-match them to ``backbone.bottom_up.*`` in FPN / RetinaNet models and to ``backbone.res2-4``
plus ``roi_heads.res5.*`` in C4 models; fully qualified names would only fit one of the two.

Online / target branches are told apart by their prefix: a prefix component such as ``target*``,
``momentum*``, ``teacher``, ``ema``, ``key*`` or ``*_k`` (``encoder_k``, ``neck_k``) marks the
target (key / EMA) network.
"""
import functools
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision

from soco_d2.utils.fileio import atomic_write

from .io import load_checkpoint_file, unwrap_state_dict

__all__ = [
    "ConversionError",
    "ConversionReport",
    "KNOWN_LAYOUTS",
    "PARTS",
    "convert_to_d2",
    "convert_to_torchvision",
    "d2_to_torchvision",
    "expected_backbone_shapes",
    "save_d2_pkl",
    "save_torchvision_state_dict",
]

PARTS = ("backbone", "fpn", "head")
BRANCHES = ("online", "target")
SUPPORTED_DEPTHS = (18, 34, 50, 101, 152)

KNOWN_LAYOUTS = {
    "ResNet, torchvision names": "conv1.weight, bn1.*, layer1.0.conv1.weight ... (any prefix: "
    "'module.encoder_q.', 'backbone.', 'module.encoder.', 'backbone.body.', 'encoder_q.body.')",
    "ResNet, detectron2 names": "stem.conv1.weight, res2.0.conv1.weight ... (any prefix)",
    "FPN, torchvision": "inner_blocks.{i}.0.weight, inner_blocks.{i}.1.* (BN), layer_blocks.{i}...",
    "FPN, mmdetection (official SoCo)": "lateral_convs.{i}.conv.weight, lateral_convs.{i}.bn.*, "
    "fpn_convs.{i}...",
    "FPN, detectron2": "fpn_lateral{l}.weight, fpn_lateral{l}.norm.*, fpn_output{l}...",
    "box head, torchvision FastRCNNConvFCHead": "{i}.0.weight, {i}.1.* (BN), then {n+1}.weight (fc)",
    "box head, conv/fc names (official SoCo, detectron2)": "conv{i}.weight, bn{i}.* or "
    "conv{i}.norm.*, fc1.weight",
}


class ConversionError(ValueError):
    """The input cannot be converted (unknown layout, missing or unexpected keys, wrong depth)."""


# ------------------------------------------------------------------------------------------------
# Local key mappers: key relative to a component's prefix -> detectron2 short name (or None).
# ------------------------------------------------------------------------------------------------
_TV_RESNET_RULES = [
    (re.compile(r"^conv1\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(r"^bn1\.(\w+)$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (
        re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(r"^layer([1-4])\.(\d+)\.bn(\d)\.(\w+)$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        re.compile(r"^layer([1-4])\.(\d+)\.downsample\.1\.(\w+)$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
]
_D2_RESNET = re.compile(
    r"^(stem\.conv1\.(?:weight|bias|norm\.\w+)|res[2-5]\.\d+\.(?:conv\d|shortcut)\.(?:weight|bias|norm\.\w+))$"
)
_D2_FPN = re.compile(r"^fpn_(?:lateral|output)\d\.(?:weight|bias|norm\.\w+)$")
_D2_BOX_HEAD = re.compile(r"^(?:conv\d+\.(?:weight|bias|norm\.\w+)|fc\d+\.(?:weight|bias))$")


def _apply_rules(rules, key: str) -> Optional[str]:
    for pattern, fn in rules:
        m = pattern.match(key)
        if m:
            return fn(m)
    return None


def map_torchvision_resnet_key(key: str) -> Optional[str]:
    """torchvision ResNet name -> detectron2 short name (``layer1.0.bn1.weight`` ->
    ``res2.0.conv1.norm.weight``); None for anything else (``fc.*`` included)."""
    return _apply_rules(_TV_RESNET_RULES, key)


@dataclass
class _Component:
    """One recognised block of weights: keys ``prefix + local`` mapped by ``mapper(local)``."""

    part: str  # backbone | fpn | head
    style: str
    prefix: str
    mapper: Callable[[str], Optional[str]]
    drop: Callable[[str], Optional[str]] = lambda local: None  # local -> reason, for known extras
    branch: str = "online"

    @property
    def name(self) -> str:
        return f"{self.part}: {self.style} at '{self.prefix}'"


# ------------------------------------------------------------------------------------------------
# Component detection
# ------------------------------------------------------------------------------------------------
_TARGET_COMPONENT = re.compile(
    r"^(?:target|momentum|teacher|ema|key|k)(?:_.*)?$|^target|_(?:k|target|momentum|teacher|ema|key)$"
)


def branch_of(prefix: str) -> str:
    """``"target"`` when a component of ``prefix`` names the target / key / EMA network."""
    return "target" if any(_TARGET_COMPONENT.search(c) for c in prefix.split(".") if c) else "online"


def _prefixes(state: Mapping[str, Any], anchor: str) -> List[str]:
    """Prefixes ``p`` ('' or ending in '.') such that ``p + anchor`` is a key."""
    out = []
    for k in state:
        if k.endswith(anchor):
            p = k[: len(k) - len(anchor)]
            if p == "" or p.endswith("."):
                out.append(p)
    return out


def _ndim(state, key) -> int:
    return len(state[key].shape) if key in state else -1


def _stage_channels(state, resnet: Optional[_Component]) -> Dict[int, int]:
    """Output channels of res2..res5 (from the last conv of block 0 of each stage)."""
    out = {}
    if resnet is None:
        return out
    for k, v in state.items():
        if not k.startswith(resnet.prefix):
            continue
        name = resnet.mapper(k[len(resnet.prefix):])
        m = name and re.match(r"^res(\d)\.0\.(?:shortcut|conv\d)\.weight$", name)
        if m:
            stage = int(m[1])
            # shortcut / last conv of block 0 carry the stage width; take the max over convs
            out[stage] = max(out.get(stage, 0), int(v.shape[0]))
    return out


def _find_resnets(state) -> List[_Component]:
    comps = []
    for p in _prefixes(state, "layer1.0.conv1.weight"):
        if _ndim(state, p + "conv1.weight") == 4:
            comps.append(
                _Component(
                    "backbone",
                    "ResNet, torchvision names",
                    p,
                    map_torchvision_resnet_key,
                    drop=lambda local: "classifier (fc)" if local.startswith("fc.") else None,
                )
            )
    d2_prefixes = [p for p in _prefixes(state, "stem.conv1.weight") if p + "res2.0.conv1.weight" in state]
    for p in d2_prefixes:
        comps.append(
            _Component(
                "backbone",
                "ResNet, detectron2 names",
                p,
                lambda local: local if _D2_RESNET.match(local) else None,
                drop=lambda local: "classifier (fc)" if local.startswith("stem.fc.") else None,
            )
        )
    # detectron2 C4 models keep res5 in the ROI heads (``roi_heads.res5.*``).
    for p in _prefixes(state, "res5.0.conv1.weight"):
        if d2_prefixes and p not in d2_prefixes:
            comps.append(
                _Component(
                    "backbone",
                    "ResNet res5 (detectron2 C4 ROI head)",
                    p,
                    lambda local: local if local.startswith("res5.") and _D2_RESNET.match(local) else None,
                )
            )
    return comps


def _fpn_mapper(index_to_level: Dict[int, int], rules) -> Callable[[str], Optional[str]]:
    def mapper(local: str) -> Optional[str]:
        for pattern, kind, fmt in rules:
            m = pattern.match(local)
            if m and int(m[1]) in index_to_level:
                return f"fpn_{kind}{index_to_level[int(m[1])]}" + fmt.format(*m.groups()[1:])
        return None

    return mapper


_TV_FPN_RULES = [
    (re.compile(rf"^{blocks}\.(\d+)\.{suffix}$"), kind, fmt)
    for blocks, kind in (("inner_blocks", "lateral"), ("layer_blocks", "output"))
    for suffix, fmt in (
        (r"0\.(weight|bias)", ".{}"),
        (r"(weight|bias)", ".{}"),  # torchvision < 0.13 FPN (plain conv)
        (r"1\.(\w+)", ".norm.{}"),
    )
]
_MMDET_FPN_RULES = [
    (re.compile(rf"^{blocks}\.(\d+)\.{suffix}$"), kind, fmt)
    for blocks, kind in (("lateral_convs", "lateral"), ("fpn_convs", "output"))
    for suffix, fmt in ((r"conv\.(weight|bias)", ".{}"), (r"(?:bn|gn|norm)\.(\w+)", ".norm.{}"))
]


def _find_fpns(state, stage_channels: Dict[int, int]) -> List[_Component]:
    comps = []
    channel_to_level = {c: s for s, c in stage_channels.items()}
    for style, inner, first_conv, rules in (
        ("FPN, torchvision", "inner_blocks", ("0.0.weight", "0.weight"), _TV_FPN_RULES),
        ("FPN, mmdetection", "lateral_convs", ("0.conv.weight",), _MMDET_FPN_RULES),
    ):
        for anchor in first_conv:
            for p in _prefixes(state, f"{inner}.{anchor}"):
                # index -> pyramid level, from each lateral conv's input channels
                index_to_level = {}
                for k, v in state.items():
                    m = re.match(rf"^{re.escape(p)}{inner}\.(\d+)\.(?:0\.|conv\.)?weight$", k)
                    if m and len(v.shape) == 4:
                        level = channel_to_level.get(int(v.shape[1]))
                        if level is None:
                            raise ConversionError(
                                f"FPN lateral conv '{k}' takes {v.shape[1]} input channels, which "
                                f"match no ResNet stage output ({stage_channels or 'no ResNet found'})"
                            )
                        index_to_level[int(m[1])] = level
                comps.append(_Component("fpn", style, p, _fpn_mapper(index_to_level, rules)))
    for p in sorted(set(_prefixes(state, "fpn_lateral5.weight"))):
        comps.append(_Component("fpn", "FPN, detectron2", p, lambda local: local if _D2_FPN.match(local) else None))
    return comps


def _tv_head_mapper(num_conv: int) -> Callable[[str], Optional[str]]:
    """``FastRCNNConvFCHead``: modules 0..n-1 are [conv, norm, ReLU] blocks, n is Flatten, then
    Linear / ReLU pairs."""

    def mapper(local: str) -> Optional[str]:
        m = re.match(r"^(\d+)\.0\.(weight|bias)$", local)
        if m and int(m[1]) < num_conv:
            return f"box_head.conv{int(m[1]) + 1}.{m[2]}"
        m = re.match(r"^(\d+)\.1\.(\w+)$", local)
        if m and int(m[1]) < num_conv:
            return f"box_head.conv{int(m[1]) + 1}.norm.{m[2]}"
        m = re.match(r"^(\d+)\.(weight|bias)$", local)
        if m and int(m[1]) > num_conv and (int(m[1]) - num_conv - 1) % 2 == 0:
            return f"box_head.fc{(int(m[1]) - num_conv - 1) // 2 + 1}.{m[2]}"
        return None

    return mapper


def _convfc_head_mapper(local: str) -> Optional[str]:
    m = re.match(r"^bn(\d+)\.(\w+)$", local)
    if m:
        return f"box_head.conv{m[1]}.norm.{m[2]}"
    return f"box_head.{local}" if _D2_BOX_HEAD.match(local) else None


def _find_heads(state) -> List[_Component]:
    comps = []
    for p in _prefixes(state, "0.0.weight"):
        if _ndim(state, p + "0.0.weight") != 4:
            continue
        n = 0
        while _ndim(state, f"{p}{n}.0.weight") == 4:
            n += 1
        has_flatten = not any(k.startswith(f"{p}{n}.") for k in state)
        if has_flatten and _ndim(state, f"{p}{n + 1}.weight") == 2:
            comps.append(
                _Component("head", "box head, torchvision FastRCNNConvFCHead", p, _tv_head_mapper(n))
            )
    for p in _prefixes(state, "fc1.weight"):
        if _ndim(state, p + "fc1.weight") == 2 and (
            _ndim(state, p + "conv1.weight") == 4 or p.endswith("box_head.")
        ):
            comps.append(_Component("head", "box head, conv/fc names", p, _convfc_head_mapper))
    return comps


# ------------------------------------------------------------------------------------------------
# Keys outside every component
# ------------------------------------------------------------------------------------------------
_DROP_PATTERNS = [
    (re.compile(r"(?:^|\.)[^.]*queue[^.]*(?:\.|$)"), "queue"),
    (re.compile(r"(?:^|\.)[^.]*(?:projector|projection)[^.]*\."), "projector"),
    (re.compile(r"(?:^|\.)[^.]*(?:predictor|prediction)[^.]*\."), "predictor"),
    (re.compile(r"(?:^|\.)[^.]*(?:head|mlp)[^.]*\."), "head (not transferred)"),
]


def _drop_reason(key: str, branch: str) -> Optional[str]:
    for pattern, reason in _DROP_PATTERNS:
        if pattern.search(key):
            return reason
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    other = branch_of(prefix)
    if other != branch:
        return f"{other} branch"
    return None


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What happened to every input key."""

    layout: List[str]
    branch: str
    parts: Tuple[str, ...]
    depth: Optional[int] = None
    mapped: Dict[str, str] = field(default_factory=dict)  # source key -> output key
    dropped: Dict[str, str] = field(default_factory=dict)  # source key -> reason
    unmapped: List[str] = field(default_factory=list)

    def format(self, limit: int = 5) -> str:
        lines = [
            "layout: " + ("; ".join(self.layout) or "-"),
            f"branch: {self.branch}   parts: {','.join(self.parts)}   ResNet depth: {self.depth}",
            f"{'':10}{'count':>7}  first keys",
        ]
        reasons: Dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        rows = [
            ("mapped", len(self.mapped), [f"{k} -> {v}" for k, v in list(self.mapped.items())[:limit]]),
            ("dropped", len(self.dropped), [f"{k} ({r})" for k, r in list(self.dropped.items())[:limit]]),
            ("unmapped", len(self.unmapped), self.unmapped[:limit]),
        ]
        for title, count, examples in rows:
            lines.append(f"{title:10}{count:>7}  " + (examples[0] if examples else "-"))
            lines += [f"{'':19}{e}" for e in examples[1:]]
        if reasons:
            lines.append("dropped by reason: " + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
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


def _validate_backbone(d2: Dict[str, np.ndarray], depth: Optional[int], source: str) -> int:
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


def _validate_fpn(d2: Dict[str, np.ndarray], source: str) -> None:
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


def _validate_head(d2: Dict[str, np.ndarray], source: str) -> None:
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


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    t = v.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _check_args(parts: Sequence[str], branch: str) -> Tuple[str, ...]:
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConversionError(f"unknown parts {bad or parts!r}; choose from {PARTS}")
    if branch not in BRANCHES:
        raise ConversionError(f"unknown branch {branch!r}; choose from {BRANCHES}")
    return tuple(p for p in PARTS if p in parts)


def _unknown_layout_error(state: Mapping[str, Any], source: str, what: str) -> ConversionError:
    sample = list(state)[:12]
    layouts = "\n".join(f"  - {name}: {desc}" for name, desc in KNOWN_LAYOUTS.items())
    return ConversionError(
        f"{source}: {what}. Keys found ({len(state)} in all), e.g.:\n  "
        + "\n  ".join(sample)
        + f"\nKnown layouts:\n{layouts}"
    )


def convert_to_d2(
    state_or_path: Union[str, os.PathLike, Mapping[str, Any]],
    parts: Sequence[str] = PARTS,
    branch: str = "online",
    depth: Optional[int] = None,
    allow_unmapped: bool = False,
    trust: bool = False,
) -> Tuple[Dict[str, np.ndarray], ConversionReport]:
    """Convert a checkpoint (path, state dict or training checkpoint dict) to detectron2 weights
    ``{short name: ndarray}``.

    ``parts``: which of backbone / fpn / head to export (each must be present in the input);
    ``branch``: the online network or the target (key / EMA) copy; ``depth``: the expected ResNet
    depth (inferred from the keys and checked when given). Raises :class:`ConversionError` on an
    unknown layout, missing parts or keys, a depth mismatch, or keys that are neither mapped nor
    intentionally dropped (unless ``allow_unmapped``).
    """
    parts = _check_args(parts, branch)
    if isinstance(state_or_path, Mapping):
        state, source = unwrap_state_dict(state_or_path), "state dict"
    else:
        state, source = load_checkpoint_file(state_or_path, trust=trust), os.fspath(state_or_path)

    components = _find_resnets(state)
    for c in components:
        c.branch = branch_of(c.prefix)
    selected_resnets = [c for c in components if c.branch == branch and c.style != "ResNet res5 (detectron2 C4 ROI head)"]
    stage_channels = _stage_channels(state, selected_resnets[0] if selected_resnets else None)
    for c in _find_fpns(state, stage_channels) + _find_heads(state):
        c.branch = branch_of(c.prefix)
        components.append(c)
    if not components:
        raise _unknown_layout_error(state, source, "no known weight layout recognised")

    # Claim every key for the component with the longest matching prefix that maps it.
    components.sort(key=lambda c: -len(c.prefix))
    report = ConversionReport(layout=[], branch=branch, parts=parts)
    out: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    used = set()
    for key, value in state.items():
        claimed = False
        for c in components:
            if not key.startswith(c.prefix):
                continue
            local = key[len(c.prefix):]
            name = c.mapper(local)
            if name is None:
                reason = c.drop(local)
                if reason is not None:
                    report.dropped[key] = reason if c.branch == branch else f"{c.branch} branch"
                    claimed = True
                    break
                continue
            claimed = True
            if c.branch != branch:
                report.dropped[key] = f"{c.branch} branch"
            elif c.part not in parts:
                report.dropped[key] = f"part not requested ({c.part})"
            else:
                if name in out:
                    raise ConversionError(
                        f"{source}: ambiguous input: '{origin[name]}' and '{key}' both map to "
                        f"'{name}'; components found: {[x.name for x in components]}"
                    )
                out[name] = _to_numpy(value)
                origin[name] = key
                report.mapped[key] = name
                used.add(c.name)
            break
        if not claimed:
            reason = _drop_reason(key, branch)
            if reason is not None:
                report.dropped[key] = reason
            else:
                report.unmapped.append(key)
    report.layout = [c.name for c in sorted(components, key=lambda c: PARTS.index(c.part)) if c.name in used]

    found_parts = {c.part for c in components if c.branch == branch}
    missing_parts = [p for p in parts if not any(_part_of(n) == p for n in out)]
    if missing_parts:
        if not out and not found_parts:
            raise _unknown_layout_error(
                state, source, f"no {branch}-branch weights of a known layout found for {list(parts)}"
            )
        raise ConversionError(
            f"{source}: requested part(s) {missing_parts} not found in the {branch} branch "
            f"(found: {sorted(found_parts) or 'nothing'}; components: {[c.name for c in components]}). "
            f"Convert only what the checkpoint has, e.g. --parts {','.join(p for p in parts if p in found_parts) or 'backbone'}."
        )
    if report.unmapped and not allow_unmapped:
        raise ConversionError(
            f"{source}: {len(report.unmapped)} key(s) are neither converted nor known to be "
            f"droppable, e.g. {_explain_unmapped(report.unmapped[:8], components)}. Check the input "
            "is the intended checkpoint; pass --allow-unmapped (allow_unmapped=True) to ignore them."
        )
    if "backbone" in parts:
        report.depth = _validate_backbone(out, depth, source)
    if "fpn" in parts:
        _validate_fpn(out, source)
    if "head" in parts:
        _validate_head(out, source)
    return out, report


def _explain_unmapped(keys: Sequence[str], components: Sequence[_Component]) -> str:
    """The keys, each inside a recognised block with what that block's layout expects there."""
    out = []
    for key in keys:
        c = next((c for c in components if c.prefix and key.startswith(c.prefix)), None)
        if c is None:
            out.append(f"'{key}'")
            continue
        layout = next((d for n, d in KNOWN_LAYOUTS.items() if n.startswith(c.style)), c.style)
        out.append(f"'{key}' (inside the {c.style} block at '{c.prefix}', which expects {layout})")
    return "; ".join(out)


def _part_of(name: str) -> str:
    if name.startswith("fpn_"):
        return "fpn"
    if name.startswith("box_head."):
        return "head"
    return "backbone"


# ------------------------------------------------------------------------------------------------
# detectron2 -> torchvision
# ------------------------------------------------------------------------------------------------
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
    parts: Sequence[str] = PARTS,
    branch: str = "online",
    depth: Optional[int] = None,
    allow_unmapped: bool = False,
    trust: bool = False,
    fpn_levels: Sequence[int] = (2, 3, 4, 5),
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Like :func:`convert_to_d2`, but returns torchvision detector names (``backbone.body.*``,
    ``backbone.fpn.*``, ``roi_heads.box_head.*``), for ``maskrcnn_resnet50_fpn_v2`` /
    ``retinanet_resnet50_fpn(_v2)`` fine-tuning (load with ``strict=False``)."""
    d2, report = convert_to_d2(state_or_path, parts, branch, depth, allow_unmapped, trust)
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


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def save_d2_pkl(d2: Mapping[str, Any], path: Union[str, os.PathLike], author: str = "soco_d2") -> None:
    """Write ``{"model": {name: ndarray}, "__author__": author, "matching_heuristics": True}``
    atomically (temp file + rename). ``__author__`` keeps detectron2 from applying Caffe2
    renaming; ``matching_heuristics`` makes it suffix-match the short names."""
    if not os.fspath(path).endswith(".pkl"):
        raise ConversionError(f"detectron2 weights must be written to a .pkl file, got {os.fspath(path)}")
    obj = {"model": {k: _to_numpy(v) for k, v in d2.items()}, "__author__": author, "matching_heuristics": True}
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


def save_torchvision_state_dict(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write ``{"model": state}`` with ``torch.save``, atomically; loadable with
    ``torch.load(weights_only=True)``."""
    atomic_write(path, lambda f: torch.save({"model": dict(state)}, f))
