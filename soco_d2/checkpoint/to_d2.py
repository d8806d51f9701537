"""Conversion of pretrained weights to detectron2 weights (``.pkl``): every key of the input is
mapped (a short name such as ``res2.0.conv1.weight``), dropped with a reason, or reported as
unmapped (see :mod:`soco_d2.checkpoint.layout` for the layouts read), and the result is checked
(:mod:`soco_d2.checkpoint.validate`).
"""
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from soco_d2.utils.fileio import atomic_write

from .io import load_checkpoint_file, unwrap_state_dict
from .layout import (
    BRANCHES,
    PARTS,
    ConversionError,
    drop_reason,
    explain_unmapped,
    find_components,
    unknown_layout_error,
)
from .validate import validate_backbone, validate_fpn, validate_head

__all__ = ["ConversionReport", "convert_to_d2", "save_d2_pkl"]


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
# Conversion
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

    components = find_components(state, branch, source)
    # Claim every key for the component with the longest matching prefix that maps it.
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
            reason = drop_reason(key, branch)
            if reason is not None:
                report.dropped[key] = reason
            else:
                report.unmapped.append(key)
    report.layout = [c.name for c in sorted(components, key=lambda c: PARTS.index(c.part)) if c.name in used]

    found_parts = {c.part for c in components if c.branch == branch}
    missing_parts = [p for p in parts if not any(_part_of(n) == p for n in out)]
    if missing_parts:
        if not out and not found_parts:
            raise unknown_layout_error(
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
            f"droppable, e.g. {explain_unmapped(report.unmapped[:8], components)}. Check the input "
            "is the intended checkpoint; pass --allow-unmapped (allow_unmapped=True) to ignore them."
        )
    if "backbone" in parts:
        report.depth = validate_backbone(out, depth, source)
    if "fpn" in parts:
        validate_fpn(out, source)
    if "head" in parts:
        validate_head(out, source)
    return out, report


def _part_of(name: str) -> str:
    if name.startswith("fpn_"):
        return "fpn"
    if name.startswith("box_head."):
        return "head"
    return "backbone"


def save_d2_pkl(d2: Mapping[str, Any], path: Union[str, os.PathLike], author: str = "soco_d2") -> None:
    """Write ``{"model": {name: ndarray}, "__author__": author, "matching_heuristics": True}``
    atomically (temp file + rename). ``__author__`` keeps detectron2 from applying Caffe2
    renaming; ``matching_heuristics`` makes it suffix-match the short names."""
    if not os.fspath(path).endswith(".pkl"):
        raise ConversionError(f"detectron2 weights must be written to a .pkl file, got {os.fspath(path)}")
    obj = {"model": {k: _to_numpy(v) for k, v in d2.items()}, "__author__": author, "matching_heuristics": True}
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
