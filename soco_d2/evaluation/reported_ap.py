"""COCO numbers reported by the SoCo and DetCo authors, and the check of a run against them.

Every entry names its source (paper / README and table), the detector and schedule, and the
config of this project that reproduces it. Metric keys are those of ``metrics.json``
(``"bbox/AP"``, ``"bbox/AP50"``, ``"segm/AP"``...), in COCO percentage units.

Recipes differ between the two sources: SoCo fine-tunes Mask R-CNN R50-FPN with the 4conv1fc box
head and SyncBN in backbone, FPN and heads (weight decay 2.5e-5); DetCo (the MoCo recipe) uses the
2fc box head without norm and SyncBN in backbone and FPN only. Compare a run with the rows of the
recipe it used.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = [
    "ReportedResult",
    "REPORTED",
    "MetricsError",
    "get_reference",
    "read_eval_metrics",
    "REFERENCE_TEST_SET",
    "run_test_sets",
    "compare_to_reference",
    "format_comparison",
    "format_references",
]

BOX_MASK_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")

CONFIG_FPN_1X = "configs/finetune/mask_rcnn_R50_FPN_1x.yaml"
CONFIG_FPN_2X = "configs/finetune/mask_rcnn_R50_FPN_2x.yaml"
CONFIG_RETINANET_1X = "configs/finetune/retinanet_R50_FPN_1x.yaml"
CONFIG_C4_1X = "configs/detectron2/mask_rcnn_R50_C4_1x.yaml"

SOCO_TABLE1 = "SoCo paper (Wei et al., NeurIPS 2021), Table 1 (Mask R-CNN R50-FPN, COCO)"
SOCO_README_C4 = "SoCo README (github.com/hologerry/SoCo), 'COCO, R50-C4' table (Mask R-CNN, 1x)"
DETCO_1X = "DetCo README (github.com/xieenze/DetCo), imgs/res_coco.png (COCO 1x, 200-epoch pretraining)"
DETCO_2X = "DetCo paper (Xie et al., ICCV 2021), Table 13 (COCO 2x, 200-epoch pretraining)"


@dataclass(frozen=True)
class ReportedResult:
    name: str
    method: str  # pretraining, e.g. "SoCo 100ep"
    detector: str  # "Mask R-CNN R50-FPN", "Mask R-CNN R50-C4", "RetinaNet R50-FPN"
    schedule: str  # "1x" (90k iterations), "2x" (180k)
    metrics: Mapping[str, float]
    source: str
    config: str  # this project's fine-tuning config
    weights: str  # what MODEL.WEIGHTS should hold
    note: str = ""


def _box_mask(values: Tuple[float, ...]) -> Dict[str, float]:
    return dict(zip(BOX_MASK_KEYS, values))


def _box_mask_ap(box: float, mask: float) -> Dict[str, float]:
    return {"bbox/AP": box, "segm/AP": mask}


_rows: List[ReportedResult] = []


def _add(name, method, detector, schedule, metrics, source, config, weights, note=""):
    _rows.append(ReportedResult(name, method, detector, schedule, metrics, source, config, weights, note))


# --- SoCo paper, Table 1: Mask R-CNN R50-FPN, 1x and 2x (APbb, APbb50, APbb75, APmk, APmk50, APmk75)
_SOCO_TABLE1 = [
    # key, method, weights, 1x, 2x
    ("soco_table1_scratch", "scratch", "none (MODEL.WEIGHTS \"\")",
     (31.0, 49.5, 33.2, 28.5, 46.8, 30.4), (38.4, 57.5, 42.0, 34.7, 54.8, 37.2)),
    ("soco_table1_supervised", "supervised ImageNet 90ep", "torchvision ResNet-50 ImageNet weights",
     (38.9, 59.6, 42.7, 35.4, 56.5, 38.1), (41.3, 61.3, 45.0, 37.3, 58.3, 40.3)),
    ("soco_table1_mocov2_200ep", "MoCo v2 200ep", "MoCo v2 200ep backbone (tools/convert_to_d2.py --parts backbone)",
     (40.4, 60.2, 44.2, 36.4, 57.2, 38.9), (41.7, 61.6, 45.6, 37.6, 58.7, 40.5)),
    ("soco_table1_byol_300ep", "BYOL 300ep", "BYOL 300ep backbone (tools/convert_to_d2.py --parts backbone)",
     (40.4, 61.6, 44.1, 37.2, 58.8, 39.8), (42.3, 62.6, 46.2, 38.3, 59.6, 41.1)),
    ("soco_fpn_100ep", "SoCo 100ep", "configs/soco/soco_fpn_r50_100ep.yaml, converted (backbone, FPN, head)",
     (42.3, 62.5, 46.5, 37.6, 59.1, 40.5), (43.2, 63.3, 47.3, 38.8, 60.6, 41.9)),
    ("soco_fpn_400ep", "SoCo 400ep", "configs/soco/soco_fpn_r50_400ep.yaml, converted (backbone, FPN, head)",
     (43.0, 63.3, 47.1, 38.2, 60.2, 41.0), (44.0, 64.0, 48.4, 39.0, 61.3, 41.7)),
    ("soco_star_fpn_400ep", "SoCo* 400ep", "configs/soco/soco_star_fpn_r50_400ep.yaml, converted (backbone, FPN, head)",
     (43.2, 63.5, 47.4, 38.4, 60.2, 41.4), (44.3, 64.6, 48.9, 39.6, 61.8, 42.5)),
]
for _key, _method, _weights, _1x, _2x in _SOCO_TABLE1:
    for _sched, _vals, _cfg in (("1x", _1x, CONFIG_FPN_1X), ("2x", _2x, CONFIG_FPN_2X)):
        _name = f"{_key}_mask_rcnn_fpn_{_sched}" if _key.startswith("soco_table1") else f"{_key}_mask_rcnn_{_sched}"
        _add(_name, _method, "Mask R-CNN R50-FPN", _sched, _box_mask(_vals),
             SOCO_TABLE1 + ("; the 1x row also in the SoCo README" if _sched == "1x" and "mocov2" not in _key
                            and "byol" not in _key else ""),
             _cfg, _weights, "SoCo recipe: 4conv1fc box head, SyncBN everywhere, weight decay 2.5e-5")

# --- SoCo README, R50-C4 (1x)
for _key, _method, _weights, _vals in (
    ("soco_readme_scratch", "scratch", "none (MODEL.WEIGHTS \"\")", (26.4, 44.0, 27.8, 29.3, 46.9, 30.8)),
    ("soco_readme_supervised", "supervised ImageNet 90ep", "torchvision ResNet-50 ImageNet weights",
     (38.2, 58.2, 41.2, 33.3, 54.7, 35.2)),
    ("soco_c4_100ep", "SoCo C4 100ep", "SoCo C4 100ep backbone (tools/convert_to_d2.py --parts backbone)",
     (40.4, 60.4, 43.7, 34.9, 56.8, 37.0)),
    ("soco_c4_400ep", "SoCo C4 400ep", "SoCo C4 400ep backbone (tools/convert_to_d2.py --parts backbone)",
     (40.9, 60.9, 44.3, 35.3, 57.5, 37.3)),
):
    _add(f"{_key}_mask_rcnn_c4_1x" if "readme" in _key else f"{_key}_mask_rcnn_1x", _method,
         "Mask R-CNN R50-C4", "1x", _box_mask(_vals), SOCO_README_C4, CONFIG_C4_1X, _weights,
         "detectron2 Res5ROIHeadsExtraNorm, SyncBN, weight decay 2.5e-5"
         + ("; as printed (scratch mask AP above box AP)" if "scratch" in _key else ""))

# --- DetCo README / paper: 1x (Mask R-CNN FPN, C4; RetinaNet) and 2x (Mask R-CNN FPN)
_DETCO_NOTE = (
    "MoCo/DetCo recipe: SyncBN in backbone and FPN, 2fc box head and mask head without norm, weight "
    "decay 1e-4; with this project's config: MODEL.ROI_BOX_HEAD.NUM_CONV 0 MODEL.ROI_BOX_HEAD.NUM_FC 2 "
    "MODEL.ROI_BOX_HEAD.NORM '' MODEL.ROI_MASK_HEAD.NORM '' SOLVER.WEIGHT_DECAY 0.0001"
)
_DETCO_WEIGHTS = {
    "supervised": ("supervised ImageNet", "torchvision ResNet-50 ImageNet weights"),
    "mocov2_200ep": ("MoCo v2 200ep", "MoCo v2 200ep backbone (tools/convert_to_d2.py --parts backbone)"),
    "detco_200ep": ("DetCo 200ep", "configs/detco/detco_r50_200ep.yaml, converted (--parts backbone)"),
    "detco_aa_200ep": ("DetCo 200ep + AutoAugment", "configs/detco/detco_r50_200ep_aa.yaml, converted (--parts backbone)"),
}
_DETCO = [
    # detector tag, detector, schedule, config, source, {key: metrics}
    ("mask_rcnn_fpn", "Mask R-CNN R50-FPN", "1x", CONFIG_FPN_1X, DETCO_1X, {
        "supervised": _box_mask_ap(38.9, 35.4),
        "mocov2_200ep": _box_mask_ap(38.9, 35.5),
        "detco_200ep": {"bbox/AP": 39.5, "bbox/AP50": 60.3, "bbox/AP75": 43.1, "segm/AP": 35.9},
        "detco_aa_200ep": _box_mask_ap(40.1, 36.4),
    }),
    ("mask_rcnn_c4", "Mask R-CNN R50-C4", "1x", CONFIG_C4_1X, DETCO_1X, {
        "supervised": _box_mask_ap(38.2, 33.3),
        "mocov2_200ep": _box_mask_ap(38.9, 34.2),
        "detco_200ep": {"bbox/AP": 39.4, "bbox/AP50": 59.2, "bbox/AP75": 42.3, "segm/AP": 34.4},
        "detco_aa_200ep": _box_mask_ap(39.8, 34.7),
    }),
    ("retinanet", "RetinaNet R50-FPN", "1x", CONFIG_RETINANET_1X, DETCO_1X, {
        "supervised": {"bbox/AP": 37.4},
        "mocov2_200ep": {"bbox/AP": 37.2},
        "detco_200ep": {"bbox/AP": 38.0},
        "detco_aa_200ep": {"bbox/AP": 38.4},
    }),
    ("mask_rcnn_fpn", "Mask R-CNN R50-FPN", "2x", CONFIG_FPN_2X, DETCO_2X, {
        "supervised": _box_mask_ap(40.6, 36.8),
        "mocov2_200ep": _box_mask_ap(40.9, 37.0),
        "detco_200ep": _box_mask_ap(41.5, 37.6),
        "detco_aa_200ep": _box_mask_ap(41.5, 37.7),
    }),
]
for _tag, _detector, _sched, _cfg, _source, _by_method in _DETCO:
    for _key, _metrics in _by_method.items():
        _method, _weights = _DETCO_WEIGHTS[_key]
        _name = f"{_key}_{_tag}_{_sched}" if _key.startswith("detco") else f"detco_table_{_key}_{_tag}_{_sched}"
        _note = {"mask_rcnn_fpn": _DETCO_NOTE, "mask_rcnn_c4": "MoCo recipe: Res5ROIHeadsExtraNorm, SyncBN",
                 "retinanet": "MoCo/DetCo recipe: SyncBN in backbone and FPN, lr 0.01"}[_tag]
        _add(_name, _method, _detector, _sched, _metrics, _source, _cfg, _weights, _note)

REPORTED: Dict[str, ReportedResult] = {r.name: r for r in _rows}


# ------------------------------------------------------------------------------------------------
# Checking a run
# ------------------------------------------------------------------------------------------------
class MetricsError(ValueError):
    """metrics.json missing, unreadable, or without evaluation results."""


def get_reference(name: str) -> ReportedResult:
    if name not in REPORTED:
        raise KeyError(f"unknown reference {name!r}; known references:\n  " + "\n  ".join(REPORTED))
    return REPORTED[name]


_EVAL_KEY = re.compile(r"^(?:(?P<dataset>.+)/)?(?P<metric>(?:bbox|segm)/AP\w*)$")


def read_eval_metrics(path: str, dataset: Optional[str] = None) -> Tuple[Dict[str, float], int]:
    """The last evaluation results in a ``metrics.json`` (one JSON object per line).

    Lines holding ``bbox/...`` or ``segm/...`` keys are evaluation results; those of the last
    evaluated iteration are merged. With several test sets (keys ``<set>/bbox/AP``), ``dataset``
    picks one (required when there is more than one). Returns ``(metrics, iteration)``.
    """
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise MetricsError(f"metrics file not found: {path} (is it the OUTPUT_DIR of a fine-tuning run?)")
    groups: List[Tuple[Optional[int], Dict[str, Dict[str, float]]]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{path}:{lineno}: not a JSON object")
            found: Dict[str, Dict[str, float]] = {}
            for k, v in record.items():
                m = _EVAL_KEY.match(k)
                if m and isinstance(v, (int, float)):
                    found.setdefault(m["dataset"] or "", {})[m["metric"]] = float(v)
            if not found:
                continue
            it = record.get("iteration")
            if not groups or groups[-1][0] != it:
                groups.append((it, {}))
            for ds, metrics in found.items():
                groups[-1][1].setdefault(ds, {}).update(metrics)
    if not groups:
        raise MetricsError(
            f"{path}: no evaluation results (no 'bbox/AP' or 'segm/AP' entries); did the run "
            "reach its evaluation?"
        )
    iteration, by_dataset = groups[-1]
    if dataset is None:
        if len(by_dataset) > 1:
            raise MetricsError(f"{path}: results of several test sets {sorted(by_dataset)}; choose one")
        dataset = next(iter(by_dataset))
    if dataset not in by_dataset:
        raise MetricsError(f"{path}: no results for test set {dataset!r}; found {sorted(by_dataset)}")
    return by_dataset[dataset], iteration


# Every reported number is COCO val2017 (5,000 images); the name of that set in our catalog.
REFERENCE_TEST_SET = "coco_2017_val"


def run_test_sets(path: str) -> Optional[List[str]]:
    """The test sets (``DATASETS.TEST``) in the run's ``config.yaml`` beside its ``metrics.json``;
    None when the run folder has no ``config.yaml`` (e.g. a bare metrics file) or it names none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        return None
    import yaml

    with open(config) as f:
        data = yaml.safe_load(f) or {}
    test = (data.get("DATASETS") or {}).get("TEST")
    if test is None:
        return None
    return [test] if isinstance(test, str) else [str(t) for t in test]


@dataclass
class Comparison:
    reference: ReportedResult
    tolerance: float
    rows: List[Tuple[str, float, Optional[float], Optional[float], bool]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for *_, ok in self.rows)

    @property
    def missing(self) -> List[str]:
        return [k for k, _, measured, _, _ in self.rows if measured is None]


def compare_to_reference(measured: Mapping[str, float], name: str, tolerance: float = 0.3) -> Comparison:
    """Compare measured metrics with reference ``name``: a metric passes when it is at most
    ``tolerance`` AP below the reported value; a metric missing from ``measured`` (or NaN) fails."""
    ref = get_reference(name)
    cmp = Comparison(ref, tolerance)
    for key, reported in ref.metrics.items():
        value = measured.get(key)
        if value is None or math.isnan(value):
            cmp.rows.append((key, reported, None, None, False))
        else:
            delta = value - reported
            cmp.rows.append((key, reported, value, delta, delta >= -tolerance - 1e-9))
    return cmp


def format_comparison(cmp: Comparison) -> str:
    ref = cmp.reference
    lines = [
        f"reference: {ref.name}  ({ref.method}, {ref.detector} {ref.schedule})",
        f"source:    {ref.source}",
        f"config:    {ref.config}",
        f"weights:   {ref.weights}",
    ] + ([f"recipe:    {ref.note}"] if ref.note else []) + [
        f"{'metric':<10} {'reported':>9} {'measured':>9} {'delta':>7}  result",
    ]
    for key, reported, value, delta, ok in cmp.rows:
        if value is None:
            lines.append(f"{key:<10} {reported:>9.1f} {'missing':>9} {'':>7}  FAIL")
        else:
            lines.append(f"{key:<10} {reported:>9.1f} {value:>9.2f} {delta:>+7.2f}  {'pass' if ok else 'FAIL'}")
    lines.append(
        f"PASS: no metric more than {cmp.tolerance:g} AP below the reported value"
        if cmp.passed
        else f"FAIL: {sum(not ok for *_, ok in cmp.rows)} metric(s) more than {cmp.tolerance:g} AP below "
        "the reported value or missing"
    )
    return "\n".join(lines)


def format_references() -> str:
    lines = [f"{'name':<48} {'detector':<20} {'sched':<5} {'bbox/AP':>7} {'segm/AP':>7}  config"]
    for r in REPORTED.values():
        box = f"{r.metrics['bbox/AP']:.1f}"
        mask = f"{r.metrics['segm/AP']:.1f}" if "segm/AP" in r.metrics else "-"
        lines.append(f"{r.name:<48} {r.detector:<20} {r.schedule:<5} {box:>7} {mask:>7}  {r.config}")
    return "\n".join(lines)
