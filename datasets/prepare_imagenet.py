#!/usr/bin/env python
"""Check an ImageNet folder, write its image list and (optionally) its SoCo proposals.

    python datasets/prepare_imagenet.py                     # $SOCO_DATASETS/imagenet/train
    python datasets/prepare_imagenet.py --split val --root /data/datasets
    python datasets/prepare_imagenet.py --proposals --workers 32

Writes ``<root>/imagenet/<split>.txt`` (one image per line, relative to ``<root>/imagenet``) and,
with ``--proposals``, ``<root>/imagenet/<split>.socoprop`` (selective search, as
``tools/generate_proposals.py``; keys match the list). Pretrain on them with
``DATASETS.PRETRAIN.IMAGE_ROOT <root>/imagenet/<split>.txt DATASETS.PRETRAIN.PROPOSALS
<root>/imagenet/<split>.socoprop``. For sharding over machines, pass the list to
``tools/generate_proposals.py --images ... --shard I/N``.
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.data.image_list import list_images  # noqa: E402
from soco_d2.data.selective_search import run_generation  # noqa: E402

IMAGENET_CLASSES = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--root", default=os.environ.get("SOCO_DATASETS", "") or "datasets",
                   help="folder holding imagenet/ (default: $SOCO_DATASETS, else ./datasets)")
    p.add_argument("--split", default="train", help="train (default) or val")
    p.add_argument("--proposals", action="store_true", help="also compute the selective-search proposals")
    p.add_argument("--workers", type=int, default=None, help="proposal processes (default: all cores)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base = os.path.join(args.root, "imagenet")
    folder = os.path.join(base, args.split)
    if not os.path.isdir(folder):
        print(f"error: {folder} does not exist; expected {base}/{args.split}/<wnid>/<image>.JPEG "
              "(see datasets/README.md)", file=sys.stderr)
        return 1
    images = list_images(folder)
    if not images.keys:
        print(f"error: no images under {folder}", file=sys.stderr)
        return 1
    classes = {k.split("/", 1)[0] for k in images.keys if "/" in k}
    print(f"{len(images.keys)} images in {len(classes)} class folders under {folder}")
    if args.split == "train" and len(classes) != IMAGENET_CLASSES:
        print(f"warning: ImageNet-1k train has {IMAGENET_CLASSES} class folders, found {len(classes)}")
    list_file = os.path.join(base, f"{args.split}.txt")
    tmp = list_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{args.split}/{k}\n" for k in images.keys)
    os.replace(tmp, list_file)
    print(f"wrote {list_file}")
    if args.proposals:
        output = os.path.join(base, f"{args.split}.socoprop")
        summary = run_generation(list_images(list_file, check_exists=False), output, workers=args.workers,
                                 resume=True)
        print(f"wrote {output}: {summary.images_done} images computed, {summary.images_skipped} already there, "
              f"{summary.boxes_total} boxes, {len(summary.unreadable)} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
