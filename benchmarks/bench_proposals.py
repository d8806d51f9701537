#!/usr/bin/env python
"""Selective-search proposals: speed per core vs. recall, for several input sizes and modes.

On the COCO val images of ``$SOCO_DATA_ROOT/coco_mini`` (or ``--data``), single process with
``cv2.setNumThreads(1)``, for each (mode, max-size) setting: images/s per core (image read +
selective search + filter, as ``tools/generate_proposals.py`` does it; measured in process CPU
time, which other jobs on a shared machine disturb far less than wall time, also shown), proposals per image, and
recall@IoU0.5 of the non-crowd ground-truth boxes that pass SoCo's own size/ratio filter.
The full-size fast mode is the reference for the speed-up. Finally the proposals of the default
setting are written to a proposals file to measure its bytes per box.

  SOCO_DATA_ROOT=/path/to/data python benchmarks/bench_proposals.py
"""
import argparse
import json
import os
import tempfile
import time

import cv2
import numpy as np

from soco_d2.data.image_list import list_images, read_image, read_image_reduced
from soco_d2.data.proposals import ProposalStore, write_proposals
from soco_d2.data.selective_search import DEFAULT_MAX_SIZE, filter_mask, generate_proposals

DEFAULT_SETTINGS = "fast:full,fast:96,fast:128,fast:160,fast:192,fast:256,single:128,single:256,quality:128"


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def eligible_gt(ann_file: str, min_side: float):
    """{file_name: (G, 4) x1y1x2y2} of non-crowd GT boxes passing SoCo's filter."""
    with open(ann_file) as f:
        data = json.load(f)
    images = {im["id"]: im for im in data["images"]}
    boxes = {im["file_name"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[images[ann["image_id"]]["file_name"]].append([x, y, x + w, y + h])
    out = {}
    for im in data["images"]:
        b = np.array(boxes[im["file_name"]], np.float64).reshape(-1, 4)
        out[im["file_name"]] = b[filter_mask(b, (im["height"], im["width"]), min_side=min_side)]
    return out


def run_setting(paths, keys, gt, mode, max_size, min_side):
    proposals, seconds, cpu = {}, 0.0, 0.0
    covered = total = 0
    for key, path in zip(keys, paths):
        t, c = time.perf_counter(), time.process_time()
        image, hw = read_image_reduced(path, 2 * max_size if max_size else None)  # as the tool
        boxes = generate_proposals(image, max_size=max_size, mode=mode, min_side=min_side,
                                   image_hw=hw)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        proposals[key] = (boxes, hw)
        g = gt.get(key, np.zeros((0, 4)))
        total += len(g)
        if len(g) and len(boxes):
            covered += int((iou_matrix(g, boxes.astype(np.float64)).max(axis=1) >= 0.5).sum())
    counts = np.array([len(b) for b, _ in proposals.values()])
    return {
        "seconds": seconds,
        "cpu": cpu,
        "images_per_s": len(keys) / seconds,
        "images_per_cpu_s": len(keys) / cpu,
        "recall": covered / max(total, 1),
        "gt": total,
        "mean_boxes": counts.mean(),
        "min_boxes": counts.min(),
        "zero": int((counts == 0).sum()),
        "proposals": proposals,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(os.environ.get("SOCO_DATA_ROOT", ""), "coco_mini"))
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help="comma-separated mode:max_size ('full' = no downscaling)")
    parser.add_argument("--min-side", type=float, default=32)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    ann_file = os.path.join(args.data, "annotations", f"instances_{args.split}.json")
    if not os.path.isfile(ann_file):
        raise SystemExit(f"{ann_file!r} not found: set SOCO_DATA_ROOT or pass --data")
    images = list_images(ann_file)
    n = args.limit or len(images)
    keys, paths = images.keys[:n], [images.path(i) for i in range(n)]
    gt = eligible_gt(ann_file, args.min_side)
    for p in paths:  # warm the page cache so the first setting is not charged for disk reads
        read_image(p)
    for mode in {s.split(":")[0] for s in args.settings.split(",")}:  # OpenCV's one-time set-up
        generate_proposals(read_image(paths[0]), max_size=128, mode=mode)

    print(f"{n} images of {ann_file}; {sum(len(gt[k]) for k in keys)} eligible GT boxes; "
          f"1 process, cv2.setNumThreads(1); load average at start {os.getloadavg()[0]:.2f}")
    results = {}
    for setting in args.settings.split(","):
        mode, size = setting.split(":")
        max_size = None if size == "full" else int(size)
        results[setting] = r = run_setting(paths, keys, gt, mode, max_size, args.min_side)
        print(f"  {setting:14s} {r['images_per_cpu_s']:7.2f} img/CPU-s {r['images_per_s']:7.2f} img/wall-s  recall@0.5 {r['recall']:.3f}  "
              f"boxes/img {r['mean_boxes']:.1f} (min {r['min_boxes']})", flush=True)

    ref = results.get("fast:full")
    print(f"\n| mode | max side | images/s per core (CPU time) | images/s (wall) | CPU ms / image | "
          f"speed-up vs full-size fast | recall@0.5 | boxes / image (mean, min) | images with 0 boxes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, r in results.items():
        mode, size = setting.split(":")
        speed = f"{ref['cpu'] / r['cpu']:.1f}x" if ref else "-"
        print(f"| {mode} | {size} | {r['images_per_cpu_s']:.1f} | {r['images_per_s']:.1f} | "
              f"{1000 * r['cpu'] / n:.1f} | {speed} | "
              f"{r['recall']:.3f} | {r['mean_boxes']:.1f}, {r['min_boxes']} | {r['zero']} |")

    default = f"fast:{DEFAULT_MAX_SIZE}"
    if default in results:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "p.socoprop")
            write_proposals(path, results[default]["proposals"])
            store = ProposalStore.open(path)
            size = os.path.getsize(path)
            print(f"\nstored file ({default}): {store.num_boxes} boxes, {len(store)} images, {size} bytes: "
                  f"{size / store.num_boxes:.2f} bytes/box in all, "
                  f"{store._boxes.nbytes / store.num_boxes:.2f} bytes/box for the box array "
                  f"(the rest: keys, sizes, offsets, header)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
