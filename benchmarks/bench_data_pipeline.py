"""Images/s per core of the pretraining data pipelines, as one DataLoader worker runs them.

A sample is ``PretrainDataset.__getitem__((index, seed))``: read the image file (OpenCV decode),
look up its proposals in the memory-mapped proposals file, and run the view mapper, all in one
process with torch and OpenCV limited to one thread (what a DataLoader worker does). Contestants:

* ``decode``    — ``read_image`` alone (the part every pipeline shares).
* ``soco``      — ``SoCoViewMapper``, ``configs/soco/soco_fpn_r50_100ep.yaml`` (V1/V2 224, V3 112,
  K 4, cutout), with selective-search proposals generated for the images before timing.
* ``soco_star`` — SoCo*, ``configs/soco/soco_star_fpn_r50_400ep.yaml`` (V3 192, V4 112).
* ``detco``     — ``DetCoViewMapper``, ``configs/detco/detco_r50_200ep.yaml`` (2 x 224 global views,
  2 x 9 jigsaw patches of 64 px).
* ``detco_aa``  — the same with RandAugment on the global views (``detco_r50_200ep_aa.yaml``).

Each pass runs every contestant over all images (contestant order rotated per pass, so machine
noise hits all of them alike); a pass uses fresh sample seeds. Reported: the median over passes
of images per CPU-second of this process (``time.process_time``: the per-core figure, which other
jobs on a shared machine disturb much less) and of images per wall-clock second.

Example: ``SOCO_DATA_ROOT=/path/to/data python benchmarks/bench_data_pipeline.py --passes 5``
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import cv2
import torch

from soco_d2.config import load_config
from soco_d2.data import build_mapper
from soco_d2.data.dataset import PretrainDataset
from soco_d2.data.image_list import list_images, read_image
from soco_d2.data.proposals import ProposalStore
from soco_d2.data.selective_search import run_generation

CONFIGS = {
    "soco": "configs/soco/soco_fpn_r50_100ep.yaml",
    "soco_star": "configs/soco/soco_star_fpn_r50_400ep.yaml",
    "detco": "configs/detco/detco_r50_200ep.yaml",
    "detco_aa": "configs/detco/detco_r50_200ep_aa.yaml",
}


def default_images() -> str:
    root = os.environ.get("SOCO_DATA_ROOT", "")
    return os.path.join(root, "coco_mini", "val2017") if root else ""


def make_pipelines(images, store, names):
    """``{name: sample(index, seed)}``: the per-sample work of a loader worker for each contestant."""
    pipelines = {}
    for name in names:
        if name == "decode":
            pipelines[name] = lambda i, seed: read_image(images.path(i))
            continue
        cfg = load_config(CONFIGS[name], ["MODEL.DEVICE", "cpu"])
        uses_proposals = cfg.INPUT.MAPPER == "SoCoViewMapper"
        dataset = PretrainDataset(images, store if uses_proposals else None, build_mapper(cfg))
        pipelines[name] = lambda i, seed, d=dataset: d[(i, seed)]
    return pipelines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=default_images(),
                    help="folder of images (default: $SOCO_DATA_ROOT/coco_mini/val2017)")
    ap.add_argument("--max-images", type=int, default=0, help="use the first N images (0 = all)")
    ap.add_argument("--passes", type=int, default=5, help="timed passes over the images")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--contestants", default="decode," + ",".join(CONFIGS),
                    help="comma-separated subset of: decode," + ",".join(CONFIGS))
    ap.add_argument("--proposals", default="", help="proposals file of the images (default: generate)")
    args = ap.parse_args()
    if not args.images or not os.path.isdir(args.images):
        sys.exit(f"--images {args.images!r} is not a folder; pass --images or set SOCO_DATA_ROOT")
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = [n for n in names if n != "decode" and n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown contestants {unknown}; choose from decode," + ",".join(CONFIGS))

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = list_images(args.images)
    if args.max_images:
        images.keys = images.keys[: args.max_images]

    store = None
    if any(n.startswith("soco") for n in names):
        path = args.proposals
        if not path:
            path = os.path.join(tempfile.mkdtemp(prefix="bench_pipeline_"), "proposals.socoprop")
            summary = run_generation(images, path, workers=1, progress=False)
            print(f"proposals: {summary.format()}")
        store = ProposalStore.open(path)

    pipelines = make_pipelines(images, store, names)
    n = len(images)
    cpu = {name: [] for name in names}
    wall = {name: [] for name in names}
    load = []
    for p in range(args.warmup + args.passes):
        order = names[p % len(names):] + names[: p % len(names)]
        for name in order:
            run = pipelines[name]
            t_cpu, t_wall = time.process_time(), time.perf_counter()
            for i in range(n):
                run(i, p * n + i)
            if p >= args.warmup:
                cpu[name].append(n / (time.process_time() - t_cpu))
                wall[name].append(n / (time.perf_counter() - t_wall))
        if p >= args.warmup:
            load.append(os.getloadavg()[0])

    sizes = [read_image(images.path(i)).shape[:2] for i in range(n)]
    mean_h = statistics.mean(h for h, _ in sizes)
    mean_w = statistics.mean(w for _, w in sizes)
    print(f"{n} images from {args.images} (mean {mean_w:.0f} x {mean_h:.0f} px), 1 torch / 1 OpenCV "
          f"thread, {args.passes} round-robin passes (median); load average {min(load):.1f}-{max(load):.1f}")
    print(f"{'pipeline':10s} {'img/s per core (CPU)':>21s} {'CPU ms/img':>11s} {'img/s (wall)':>13s}"
          f"   CPU img/s min-max")
    for name in names:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:10s} {c:21.1f} {1000 / c:11.2f} {w:13.1f}   {min(cpu[name]):.1f}-{max(cpu[name]):.1f}")


if __name__ == "__main__":
    main()
