"""COCO evaluation time: pycocotools' ``COCOeval`` against faster-coco-eval's ``COCOeval_faster``.

Both evaluate the same simulated detections of a COCO-format json (its ground truth with
jittered boxes and masks, random scores, some objects missed and some false positives;
:func:`noisy_detections`) through :func:`soco_d2.evaluation.coco_evaluation.evaluate_coco_results`
(``loadRes`` + evaluate + accumulate + summarize), alternately (``paired_timing``). The AP of
both is printed side by side: they must agree.

Example::

    python benchmarks/bench_coco_eval.py --json $SOCO_DATA_ROOT/coco_mini/annotations/instances_val2017.json \\
        --copies 8 --rounds 5

``--copies N`` repeats the detections of every image N times with other jitter (more
detections per image, as a detector's 100).
"""
import argparse
import importlib.util
import math
import os
import sys
from typing import Dict, List

import numpy as np
from pycocotools import mask as mask_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.evaluation.coco_evaluation import METRIC_NAMES, evaluate_coco_results  # noqa: E402
from soco_d2.finetune.coco_data import load_coco_json  # noqa: E402


def noisy_detections(coco_gt, seed: int = 0, copies: int = 1, masks: bool = True) -> Dict[str, List[dict]]:
    """``{"bbox": [...], "segm": [...]}`` result lists made from the ground truth of ``coco_gt``:
    per object and copy, a box jittered by up to 15% of its size (20% of objects missed) with a
    random score, its mask shifted by the same offset, and one false positive per image."""
    rng = np.random.default_rng(seed)
    out = {"bbox": [], "segm": []}
    cats = sorted(coco_gt.getCatIds())
    for image_id in sorted(coco_gt.getImgIds()):
        info = coco_gt.imgs[image_id]
        h, w = info["height"], info["width"]
        for _ in range(copies):
            for ann in coco_gt.imgToAnns[image_id]:
                if ann.get("iscrowd", 0) or rng.random() < 0.2:
                    continue
                x, y, bw, bh = ann["bbox"]
                dx, dy = rng.uniform(-0.15, 0.15) * bw, rng.uniform(-0.15, 0.15) * bh
                box = [x + dx, y + dy, bw * rng.uniform(0.85, 1.15), bh * rng.uniform(0.85, 1.15)]
                score = float(rng.random())
                out["bbox"].append({"image_id": image_id, "category_id": ann["category_id"],
                                    "bbox": box, "score": score})
                if masks and ann.get("segmentation"):
                    m = coco_gt.annToMask(ann)
                    m = np.roll(m, (int(round(dy)), int(round(dx))), axis=(0, 1))
                    rle = mask_util.encode(np.asfortranarray(m))
                    rle["counts"] = rle["counts"].decode("ascii")
                    out["segm"].append({"image_id": image_id, "category_id": ann["category_id"],
                                        "segmentation": rle, "score": score})
            fx, fy = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            out["bbox"].append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                                "bbox": [fx, fy, w * 0.2, h * 0.2], "score": float(rng.random())})
    return out


def evaluate_both(json_file: str, seed: int = 0, copies: int = 1):
    """``{backend: {task: metrics}}`` of the same detections of ``json_file``."""
    coco_gt = load_coco_json(json_file)
    dets = noisy_detections(coco_gt, seed, copies)
    ids = sorted(coco_gt.getImgIds())
    return {backend: {task: evaluate_coco_results(load_coco_json(json_file), [dict(r) for r in rs],
                                                  task, ids, backend)
                      for task, rs in dets.items() if rs}
            for backend in ("pycocotools", "faster_coco_eval")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="COCO instances json")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(
        "paired_timing", os.path.join(os.path.dirname(os.path.abspath(__file__)), "paired_timing.py"))
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)

    coco_gt = load_coco_json(args.json)
    dets = noisy_detections(coco_gt, 0, args.copies)
    ids = sorted(coco_gt.getImgIds())
    print(f"{args.json}: {len(ids)} images, {len(dets['bbox'])} box and {len(dets['segm'])} mask detections")
    results = {}

    def step(backend):
        def run(_round):
            gt = load_coco_json(args.json)  # a fresh index each time, as an evaluation does
            results[backend] = {t: evaluate_coco_results(gt, [dict(r) for r in rs], t, ids, backend)
                                for t, rs in dets.items() if rs}
        return run

    times, cpu = timing.run_alternating([("pycocotools", step("pycocotools")),
                                         ("faster_coco_eval", step("faster_coco_eval"))],
                                        args.warmup, args.rounds)
    timing.report(times, cpu)
    for task in results["pycocotools"]:
        a, b = results["pycocotools"][task], results["faster_coco_eval"][task]
        same = all((math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) < 1e-9 for k in METRIC_NAMES)
        print(f"{task}: " + "  ".join(f"{k} {a[k]:.3f}/{b[k]:.3f}" for k in METRIC_NAMES)
              + ("  (identical)" if same else "  (DIFFERENT)"))


if __name__ == "__main__":
    main()
