import json
import math

import pytest

from soco_d2.evaluation.reported_ap import (
    REPORTED,
    MetricsError,
    compare_to_reference,
    format_comparison,
    get_reference,
    read_eval_metrics,
)

# Spot checks against the published tables (SoCo Table 1, SoCo README C4 table, DetCo README).
SPOT = {
    ("soco_fpn_100ep_mask_rcnn_1x", "bbox/AP75"): 46.5,
    ("soco_fpn_400ep_mask_rcnn_2x", "segm/AP75"): 41.7,
    ("soco_star_fpn_400ep_mask_rcnn_2x", "bbox/AP50"): 64.6,
    ("soco_star_fpn_400ep_mask_rcnn_1x", "segm/AP75"): 41.4,
    ("soco_table1_byol_300ep_mask_rcnn_fpn_1x", "bbox/AP50"): 61.6,
    ("soco_table1_mocov2_200ep_mask_rcnn_fpn_2x", "segm/AP"): 37.6,
    ("soco_table1_scratch_mask_rcnn_fpn_2x", "bbox/AP"): 38.4,
    ("soco_table1_supervised_mask_rcnn_fpn_1x", "segm/AP50"): 56.5,
    ("soco_c4_400ep_mask_rcnn_1x", "segm/AP50"): 57.5,
    ("soco_readme_scratch_mask_rcnn_c4_1x", "segm/AP"): 29.3,
    ("detco_200ep_mask_rcnn_c4_1x", "bbox/AP50"): 59.2,
    ("detco_200ep_mask_rcnn_fpn_1x", "bbox/AP75"): 43.1,
    ("detco_aa_200ep_retinanet_1x", "bbox/AP"): 38.4,
    ("detco_200ep_mask_rcnn_fpn_2x", "segm/AP"): 37.6,
    ("detco_table_mocov2_200ep_mask_rcnn_c4_1x", "segm/AP"): 34.2,
}


@pytest.mark.parametrize("name,key", list(SPOT))
def test_spot_values(name, key):
    assert REPORTED[name].metrics[key] == SPOT[(name, key)]


def test_table_is_complete_and_consistent():
    soco_fpn = [r for r in REPORTED.values() if r.detector == "Mask R-CNN R50-FPN" and "SoCo paper" in r.source]
    assert len(soco_fpn) == 14  # 7 methods x (1x, 2x)
    assert all(len(r.metrics) == 6 for r in soco_fpn)
    for r in REPORTED.values():
        assert r.schedule in ("1x", "2x") and r.source and r.weights
        assert r.config.startswith(("configs/finetune/", "configs/detectron2/")) and r.config.endswith(".yaml")
        assert ("C4" in r.detector) == ("C4" in r.config)
        assert r.schedule in r.config
        assert all(0 < v < 100 for v in r.metrics.values())
        assert all(k.split("/")[0] in ("bbox", "segm") for k in r.metrics)
    assert not any("segm/AP" in r.metrics for r in REPORTED.values() if "RetinaNet" in r.detector)
    # AP50 >= AP75 >= ... where both are reported
    for r in REPORTED.values():
        for task in ("bbox", "segm"):
            if f"{task}/AP50" in r.metrics:
                assert r.metrics[f"{task}/AP50"] > r.metrics[f"{task}/AP"] > 0


def test_unknown_reference_lists_known_names():
    with pytest.raises(KeyError) as e:
        get_reference("soco_fpn_1000ep")
    assert "soco_fpn_100ep_mask_rcnn_1x" in e.value.args[0]


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_read_last_evaluation(tmp_path):
    path = _write(tmp_path / "metrics.json", [
        {"iteration": 20, "total_loss": 1.0, "lr": 0.02},
        {"iteration": 50, "bbox/AP": 10.0, "segm/AP": 9.0},
        {"iteration": 90, "total_loss": 0.5},
        {"iteration": 100, "bbox/AP": 42.5, "bbox/AP50": 62.0, "bbox/APs": float("nan")},
        {"iteration": 100, "segm/AP": 37.9},
        "",
    ])
    metrics, it = read_eval_metrics(str(tmp_path))  # a directory or the file itself
    assert it == 100 and metrics["bbox/AP"] == 42.5 and metrics["segm/AP"] == 37.9
    assert math.isnan(metrics["bbox/APs"]) and "total_loss" not in metrics
    assert read_eval_metrics(str(path))[0] == metrics


def test_read_several_test_sets(tmp_path):
    _write(tmp_path / "metrics.json", [{"iteration": 5, "coco_val/bbox/AP": 40.0, "minival/bbox/AP": 41.0}])
    with pytest.raises(MetricsError, match=r"several test sets \['coco_val', 'minival'\]"):
        read_eval_metrics(str(tmp_path))
    assert read_eval_metrics(str(tmp_path), dataset="minival")[0] == {"bbox/AP": 41.0}
    with pytest.raises(MetricsError, match="no results for test set 'test'"):
        read_eval_metrics(str(tmp_path), dataset="test")


def test_read_errors(tmp_path):
    with pytest.raises(MetricsError, match="metrics file not found"):
        read_eval_metrics(str(tmp_path))
    _write(tmp_path / "metrics.json", [{"iteration": 1, "total_loss": 3.0}])
    with pytest.raises(MetricsError, match="no evaluation results"):
        read_eval_metrics(str(tmp_path))
    _write(tmp_path / "metrics.json", [{"iteration": 1}, "{broken"])
    with pytest.raises(MetricsError, match=r"metrics.json:2"):
        read_eval_metrics(str(tmp_path))


def test_compare_tolerance_and_missing():
    ref = REPORTED["soco_fpn_100ep_mask_rcnn_1x"].metrics
    measured = dict(ref)
    measured["bbox/AP"] = ref["bbox/AP"] - 0.3  # exactly at the tolerance: passes
    measured["segm/AP"] = ref["segm/AP"] + 1.0
    cmp = compare_to_reference(measured, "soco_fpn_100ep_mask_rcnn_1x", tolerance=0.3)
    assert cmp.passed
    row = next(r for r in cmp.rows if r[0] == "bbox/AP")
    assert row[2] == pytest.approx(42.0) and row[3] == pytest.approx(-0.3)

    measured["bbox/AP75"] = ref["bbox/AP75"] - 0.31
    cmp = compare_to_reference(measured, "soco_fpn_100ep_mask_rcnn_1x", tolerance=0.3)
    assert not cmp.passed
    assert [r[0] for r in cmp.rows if not r[4]] == ["bbox/AP75"]
    assert "FAIL: 1 metric(s)" in format_comparison(cmp)

    del measured["segm/AP50"]
    measured["segm/AP75"] = float("nan")
    cmp = compare_to_reference(measured, "soco_fpn_100ep_mask_rcnn_1x", tolerance=1.0)
    assert cmp.missing == ["segm/AP50", "segm/AP75"] and not cmp.passed
    assert "missing" in format_comparison(cmp)


def test_docs_table_matches():
    """docs/TRANSFER.md lists every reference with the same numbers."""
    import os

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "TRANSFER.md")
    rows = {}
    with open(doc) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and cells[0].startswith("`"):
                rows[cells[0].strip("`")] = cells
    assert set(rows) == set(REPORTED)
    keys = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")
    for name, cells in rows.items():
        r = REPORTED[name]
        assert cells[1:3] == [r.detector, r.schedule]
        assert cells[3:9] == [f"{r.metrics[k]:.1f}" if k in r.metrics else "-" for k in keys], name
        assert r.config.endswith(cells[9].strip("`"))
