import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from soco_d2.evaluation.coco_evaluation import (
    COCOEvaluator,
    flatten_results,
    format_results_table,
    inference_on_dataset,
    instances_to_coco_results,
)
from soco_d2.finetune.coco_data import COCODetection, build_test_loader

# Two images of different sizes (the fake model below recognises them by size).
# Image 1: two cat-5 objects (a 40x40 and a 30x20 box). Image 2: one cat-9 object (a 100x100
# box) and a crowd region of cat 5.
H1, W1, H2, W2 = 100, 120, 160, 140
GT = {
    1: [(5, [10, 10, 40, 40]), (5, [60, 50, 30, 20])],
    2: [(9, [20, 30, 100, 100])],
}
CROWD = (2, 5, [0, 140, 50, 20])  # image, category, xywh


def _box_poly(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


@pytest.fixture
def gt_dataset(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    images, anns = [], []
    for image_id, (h, w) in ((1, (H1, W1)), (2, (H2, W2))):
        cv2.imwrite(str(root / f"{image_id}.png"), np.zeros((h, w, 3), np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for cat, box in GT[image_id]:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": float(box[2] * box[3]), "segmentation": [_box_poly(*box)],
                         "iscrowd": 0})
    crowd = np.zeros((H2, W2), np.uint8)
    x, y, w, h = CROWD[2]
    crowd[y:y + h, x:x + w] = 1
    rle = mask_util.encode(np.asfortranarray(crowd))
    rle["counts"] = rle["counts"].decode("ascii")
    anns.append({"id": 99, "image_id": 2, "category_id": 5, "bbox": CROWD[2], "area": float(w * h),
                 "segmentation": rle, "iscrowd": 1})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}))
    return COCODetection(str(path), str(root), is_train=False)


def _output(dets, h, w):
    """Detections [(category label, xywh, score)] -> torchvision output with box masks."""
    boxes = torch.tensor([[x, y, x + bw, y + bh] for _, (x, y, bw, bh), _ in dets],
                         dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(dets), 1, h, w)
    for i, (_, (x, y, bw, bh), _) in enumerate(dets):
        masks[i, 0, y:y + bh, x:x + bw] = 0.9
    return {"boxes": boxes, "scores": torch.tensor([s for _, _, s in dets]),
            "labels": torch.tensor([lab for lab, _, _ in dets], dtype=torch.int64), "masks": masks}


LABEL = {5: 1, 9: 2}  # first_label 1


def _evaluate(ds, dets_per_image):
    ev = COCOEvaluator(ds)
    sizes = {1: (H1, W1), 2: (H2, W2)}
    for image_id, dets in dets_per_image.items():
        ev.process([{"image_id": image_id}], [_output(dets, *sizes[image_id])])
    return ev.evaluate()


def _perfect():
    return {i: [(LABEL[c], box, 0.9) for c, box in GT[i]] for i in GT}


def test_perfect_predictions_give_100(gt_dataset):
    res = _evaluate(gt_dataset, _perfect())
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == pytest.approx(100.0)
        for k in ("AP50", "AP75", "APs", "APm", "APl"):  # 600, 1600, 10000 px objects
            assert res[task][k] == pytest.approx(100.0)
    flat = flatten_results(res)
    assert set(flat) == {f"{t}/{k}" for t in ("bbox", "segm")
                         for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_area_range_without_ground_truth_is_nan(gt_dataset):
    from soco_d2.evaluation.coco_evaluation import evaluate_coco_results
    from soco_d2.finetune.coco_data import load_coco_json

    results = [{"image_id": 2, "category_id": 9, "bbox": [20, 30, 100, 100], "score": 0.9}]
    res = evaluate_coco_results(load_coco_json(gt_dataset.json_file), results, "bbox", [2])
    assert res["AP"] == pytest.approx(100.0) and res["APl"] == pytest.approx(100.0)
    assert math.isnan(res["APs"]) and math.isnan(res["APm"])  # image 2 has only a large object


def test_detection_on_a_crowd_region_is_ignored(gt_dataset):
    dets = _perfect()
    dets[2].append((LABEL[5], CROWD[2], 0.99))
    assert _evaluate(gt_dataset, dets)["bbox"]["AP"] == pytest.approx(100.0)


def test_no_predictions_give_0(gt_dataset):
    res = _evaluate(gt_dataset, {1: [], 2: []})
    assert res["bbox"] == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_known_mix(gt_dataset):
    # Category 9: perfect. Category 5: one of its two objects found (score 0.9), one false
    # positive scored higher (0.95): precision 0 at recall 0, then 1/2 at recall 1/2, so the
    # interpolated precision is 1/2 on the 51 recall points 0..0.5 of 101: AP = 25.5 / 101.
    dets = {1: [(LABEL[5], [10, 10, 40, 40], 0.9), (LABEL[5], [80, 5, 20, 20], 0.95)],
            2: [(LABEL[9], [20, 30, 100, 100], 0.9)]}
    res = _evaluate(gt_dataset, dets)
    expected = (100.0 + 100.0 * 25.5 / 101) / 2
    assert res["bbox"]["AP"] == pytest.approx(expected)
    assert res["bbox"]["AP50"] == pytest.approx(expected)


def test_localisation_quality(gt_dataset):
    # The 100x100 object found with IoU 0.62 (matched at IoU 0.50, 0.55, 0.60 of the ten
    # thresholds); category 5 perfect. AP = (100 + 30) / 2, AP50 = 100, AP75 = 50.
    dets = _perfect()
    dets[2] = [(LABEL[9], [20, 30, 100, 62], 0.9)]
    res = _evaluate(gt_dataset, dets)["bbox"]
    assert res["AP"] == pytest.approx(65.0)
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(50.0)


def test_instances_to_coco_results():
    out = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]), "scores": torch.tensor([0.7]),
           "labels": torch.tensor([1]), "masks": torch.zeros(1, 1, 90, 60)}
    out["masks"][0, 0, 20:80, 10:50] = 0.6
    out["masks"][0, 0, 0:5, 0:5] = 0.4  # below the 0.5 threshold
    boxes, masks = instances_to_coco_results(7, out, np.array([3, 11]), first_label=0)
    assert boxes == [{"image_id": 7, "category_id": 11, "bbox": [10.0, 20.0, 40.0, 60.0],
                      "score": pytest.approx(0.7)}]
    assert masks[0]["category_id"] == 11 and masks[0]["segmentation"]["size"] == [90, 60]
    assert mask_util.area(dict(masks[0]["segmentation"], counts=masks[0]["segmentation"]["counts"].encode())) == 2400
    json.dumps(masks)  # serialisable
    assert instances_to_coco_results(7, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                         "labels": torch.zeros(0, dtype=torch.int64)},
                                     np.array([3]), 1) == ([], [])


class _SizeLookupModel(torch.nn.Module):
    """Returns the perfect detections of an image, recognised by its size."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.sizes = {(H1, W1): 1, (H2, W2): 2}

    def forward(self, images):
        assert not self.training and all(im.dtype == torch.float32 for im in images)
        outs = []
        for im in images:
            h, w = im.shape[-2:]
            outs.append(_output(_perfect()[self.sizes[(h, w)]], h, w))
        return outs


def test_inference_on_dataset_skips_unreadable_images(gt_dataset, tmp_path):
    from soco_d2.config import load_config

    cfg = load_config("", ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0])
    model = _SizeLookupModel().train()
    res = inference_on_dataset(model, build_test_loader(cfg, gt_dataset), COCOEvaluator(gt_dataset))
    assert model.training  # mode restored
    assert res["segm"]["AP"] == pytest.approx(100.0)
    with open(os.path.join(gt_dataset.image_root, "2.png"), "wb") as f:
        f.write(b"garbage")
    ev = COCOEvaluator(gt_dataset)
    res = inference_on_dataset(model, build_test_loader(cfg, gt_dataset), ev)
    assert ev.num_skipped == 1
    assert res["bbox"]["AP"] == pytest.approx(100.0)  # image 1 alone, evaluated on its own


def test_table_lists_every_metric():
    table = format_results_table({"bbox": {k: 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}})
    assert "| bbox |" in table and "APl" in table


def _bench_coco_eval():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_coco_eval.py")
    spec = importlib.util.spec_from_file_location("bench_coco_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_metrics(results):
    ref, fast = results["pycocotools"], results["faster_coco_eval"]
    assert ref.keys() == fast.keys()
    for task in ref:
        for k in ref[task]:
            a, b = ref[task][k], fast[task][k]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (task, k, a, b)


def test_faster_coco_eval_gives_pycocotools_ap_on_a_synthetic_json(tmp_path):
    pytest.importorskip("faster_coco_eval")
    from soco_d2.data.synthetic import make_synthetic_coco

    json_file, _ = make_synthetic_coco(str(tmp_path), num_images=12, image_size=96, seed=1)
    results = _bench_coco_eval().evaluate_both(json_file, seed=2, copies=2)
    _assert_same_metrics(results)
    assert 5 < results["pycocotools"]["bbox"]["AP"] < 95  # a mix, not a trivial 0 or 100
    assert "segm" in results["pycocotools"]


@pytest.mark.parametrize("json_name", ["pennfudan/annotations/instances_val.json",
                                       "coco_mini/annotations/instances_val2017.json"])
def test_faster_coco_eval_gives_pycocotools_ap_on_real_jsons(data_root, json_name):
    pytest.importorskip("faster_coco_eval")
    _assert_same_metrics(_bench_coco_eval().evaluate_both(os.path.join(data_root, json_name)))


def test_unknown_or_missing_backend_named_at_construction(gt_dataset, monkeypatch):
    import sys

    with pytest.raises(ValueError, match="TEST.COCO_EVAL_BACKEND 'fast'"):
        COCOEvaluator(gt_dataset, backend="fast")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[faster-coco-eval\]"'):
        COCOEvaluator(gt_dataset, backend="faster_coco_eval")
