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

``--formats folder,zip,tar`` runs each contestant on the same images read from the folder, from
a zip of them (the official layout, ``soco_d2.data.archives.write_zip``) and from tar shards
(``write_tar_shards``, ``--images-per-shard``), packed into a temporary folder first: rows
``decode/zip``, ``soco/tar``, ... . ``--index-sample N`` also times the first open of an
archive source of N members (the tar-shard index build and the zip's central directory plus
map check) and extrapolates it linearly to ImageNet's 1,281,167.

Each pass runs every contestant over all images (contestant order rotated per pass, so machine
noise hits all of them alike); a pass uses fresh sample seeds. Reported: the median over passes
of images per CPU-second of this process (``time.process_time``: the per-core figure, which other
jobs on a shared machine disturb much less) and of images per wall-clock second.

Example: ``SOCO_DATA_ROOT=/path/to/data python benchmarks/bench_data_pipeline.py --passes 5``
(formats: ``... --contestants decode,soco --formats folder,zip,tar --index-sample 20000``)
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
from soco_d2.data import archives
from soco_d2.data.dataset import PretrainDataset
from soco_d2.data.image_list import ImageList, list_images, read_image
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
            pipelines[name] = lambda i, seed: read_image(images.source(i))
            continue
        cfg = load_config(CONFIGS[name], ["MODEL.DEVICE", "cpu"])
        uses_proposals = cfg.INPUT.MAPPER == "SoCoViewMapper"
        dataset = PretrainDataset(images, store if uses_proposals else None, build_mapper(cfg))
        pipelines[name] = lambda i, seed, d=dataset: d[(i, seed)]
    return pipelines


IMAGENET_TRAIN_IMAGES = 1_281_167


def pack_formats(images, formats, folder, images_per_shard):
    """``{format: image list}`` of the same images from the folder, a zip and tar shards."""
    listed = {}
    for fmt in formats:
        if fmt == "folder":
            listed[fmt] = images
        elif fmt == "zip":
            path = os.path.join(folder, "train.zip")
            archives.write_zip(images, path)
            listed[fmt] = list_images(path)
        elif fmt == "tar":
            archives.write_tar_shards(images, os.path.join(folder, "train"), images_per_shard)
            listed[fmt] = list_images(os.path.join(folder, "train-*.tar"))
        else:
            sys.exit(f"unknown format {fmt!r}; choose from folder, zip, tar")
        assert listed[fmt].keys == images.keys, fmt
    return listed


def time_first_open(n, folder):
    """Seconds to list an archive source of ``n`` 1 KB members for the first time: the tar
    index build (all shards of 10,000 members) and the zip open (central directory + map)."""
    import io
    import tarfile
    import zipfile

    payload = bytes(1024)
    names = [f"n{i // 1300:05d}/img_{i:08d}.JPEG" for i in range(n)]
    per_shard = 10_000
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(folder, f"idx-{s // per_shard:06d}.tar"), "w") as tf:
            for name in names[s:s + per_shard]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    zip_path = os.path.join(folder, "idx.zip")
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name in names:
            zf.writestr(name, payload)
    archives.write_zip_map(names, archives.zip_map_path(zip_path))
    t = time.perf_counter()
    tar_list = list_images(os.path.join(folder, "idx-*.tar"))  # builds and caches the indexes
    tar_build = time.perf_counter() - t
    t = time.perf_counter()
    list_images(os.path.join(folder, "idx-*.tar"))  # from the cached indexes
    tar_cached = time.perf_counter() - t
    t = time.perf_counter()
    zip_list = list_images(zip_path)
    zip_open = time.perf_counter() - t
    assert len(tar_list) == len(zip_list) == n
    return {"tar index build": tar_build, "tar cached index": tar_cached, "zip open + map": zip_open}


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
    ap.add_argument("--formats", default="folder", help="comma-separated subset of folder,zip,tar")
    ap.add_argument("--images-per-shard", type=int, default=64, help="tar shards of this many images")
    ap.add_argument("--index-sample", type=int, default=0,
                    help="also time the first open of archives of N members, extrapolated to ImageNet")
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
        images = ImageList(images.root, images.keys[: args.max_images])
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    work = tempfile.mkdtemp(prefix="bench_pipeline_")
    listed = pack_formats(images, formats, work, args.images_per_shard)

    store = None
    if any(n.startswith("soco") for n in names):
        path = args.proposals
        if not path:
            path = os.path.join(tempfile.mkdtemp(prefix="bench_pipeline_"), "proposals.socoprop")
            summary = run_generation(images, path, workers=1, progress=False)
            print(f"proposals: {summary.format()}")
        store = ProposalStore.open(path)

    pipelines = {}
    for fmt, fmt_images in listed.items():
        for name, run in make_pipelines(fmt_images, store, names).items():
            pipelines[name if formats == ["folder"] else f"{name}/{fmt}"] = run
    names = list(pipelines)
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
    print(f"{'pipeline':14s} {'img/s per core (CPU)':>21s} {'CPU ms/img':>11s} {'img/s (wall)':>13s}"
          f"   CPU img/s min-max")
    for name in names:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:14s} {c:21.1f} {1000 / c:11.2f} {w:13.1f}   {min(cpu[name]):.1f}-{max(cpu[name]):.1f}")

    if args.index_sample:
        seconds = time_first_open(args.index_sample, tempfile.mkdtemp(prefix="bench_index_"))
        scale = IMAGENET_TRAIN_IMAGES / args.index_sample
        print(f"first open of {args.index_sample} members (1 KB each, page cache warm), "
              f"extrapolated linearly to {IMAGENET_TRAIN_IMAGES}:")
        for what, sec in seconds.items():
            print(f"  {what:18s} {sec:8.3f} s  ->  {sec * scale:8.1f} s for ImageNet train")


if __name__ == "__main__":
    main()
