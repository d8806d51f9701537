"""The layout of a checkpoint's keys, for conversion (:mod:`soco_d2.checkpoint.to_d2`).

The layout is detected from the keys, whatever their prefix. Each recognised *component*
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
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "BRANCHES",
    "Component",
    "ConversionError",
    "KNOWN_LAYOUTS",
    "PARTS",
    "branch_of",
    "drop_reason",
    "explain_unmapped",
    "find_components",
    "map_torchvision_resnet_key",
    "unknown_layout_error",
]

PARTS = ("backbone", "fpn", "head")
BRANCHES = ("online", "target")

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
class Component:
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


def _stage_channels(state, resnet: Optional[Component]) -> Dict[int, int]:
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


def _find_resnets(state) -> List[Component]:
    comps = []
    for p in _prefixes(state, "layer1.0.conv1.weight"):
        if _ndim(state, p + "conv1.weight") == 4:
            comps.append(
                Component(
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
            Component(
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
                Component(
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


def _find_fpns(state, stage_channels: Dict[int, int]) -> List[Component]:
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
                comps.append(Component("fpn", style, p, _fpn_mapper(index_to_level, rules)))
    for p in sorted(set(_prefixes(state, "fpn_lateral5.weight"))):
        comps.append(Component("fpn", "FPN, detectron2", p, lambda local: local if _D2_FPN.match(local) else None))
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


def _find_heads(state) -> List[Component]:
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
                Component("head", "box head, torchvision FastRCNNConvFCHead", p, _tv_head_mapper(n))
            )
    for p in _prefixes(state, "fc1.weight"):
        if _ndim(state, p + "fc1.weight") == 2 and (
            _ndim(state, p + "conv1.weight") == 4 or p.endswith("box_head.")
        ):
            comps.append(Component("head", "box head, conv/fc names", p, _convfc_head_mapper))
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


def drop_reason(key: str, branch: str) -> Optional[str]:
    for pattern, reason in _DROP_PATTERNS:
        if pattern.search(key):
            return reason
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    other = branch_of(prefix)
    if other != branch:
        return f"{other} branch"
    return None


# ------------------------------------------------------------------------------------------------
# All components, and what the messages say of them
# ------------------------------------------------------------------------------------------------
def find_components(state: Mapping[str, Any], branch: str, source: str) -> List[Component]:
    """Every recognised block of ``state`` (ResNets, FPNs, box heads, each with its branch),
    longest prefix first; the FPN levels are read against the ResNet of ``branch``. Raises
    :class:`ConversionError` when none is recognised."""
    components = _find_resnets(state)
    for c in components:
        c.branch = branch_of(c.prefix)
    selected_resnets = [c for c in components if c.branch == branch and c.style != "ResNet res5 (detectron2 C4 ROI head)"]
    stage_channels = _stage_channels(state, selected_resnets[0] if selected_resnets else None)
    for c in _find_fpns(state, stage_channels) + _find_heads(state):
        c.branch = branch_of(c.prefix)
        components.append(c)
    if not components:
        raise unknown_layout_error(state, source, "no known weight layout recognised")
    return sorted(components, key=lambda c: -len(c.prefix))


def unknown_layout_error(state: Mapping[str, Any], source: str, what: str) -> ConversionError:
    """The error for ``state`` read from ``source``: ``what`` went wrong, a sample of its keys
    and every known layout."""
    sample = list(state)[:12]
    layouts = "\n".join(f"  - {name}: {desc}" for name, desc in KNOWN_LAYOUTS.items())
    return ConversionError(
        f"{source}: {what}. Keys found ({len(state)} in all), e.g.:\n  "
        + "\n  ".join(sample)
        + f"\nKnown layouts:\n{layouts}"
    )


def explain_unmapped(keys: Sequence[str], components: Sequence[Component]) -> str:
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
