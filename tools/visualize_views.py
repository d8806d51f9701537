#!/usr/bin/env python
"""See what pretraining trains on: PNG sheets of the views a config's mapper makes of a few images.

  # SoCo: proposals (kept green / filtered red), V1..V4 with the K boxes, colour = proposal id
  python tools/visualize_views.py --config-file configs/soco/soco_fpn_r50_100ep.yaml \\
      --images datasets/coco/train2017 --num-images 4 --output-dir output/views

  # DetCo: global views and both jigsaw patch sets (as fed, shuffled, and in cell order)
  python tools/visualize_views.py --config-file configs/detco/detco_r50_200ep.yaml \\
      --images datasets/coco/train2017 --random 6 --seed 1 --output-dir output/views_detco

--images: a folder, a .txt list or a COCO json (default: the config's pretraining images).
SoCo proposals come from --proposals (default: the config's DATASETS.PRETRAIN.PROPOSALS) when
it holds the image, else from selective search with the generator's settings. Trailing KEY VALUE
pairs override the config (e.g. INPUT.SOCO.VIEW4_SIZE 96).
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.config import ConfigError, load_config  # noqa: E402
from soco_d2.data.visualize import write_view_sheets  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--images", help="image folder, .txt list or COCO json (default: "
                   "DATASETS.PRETRAIN.IMAGE_ROOT of the config)")
    p.add_argument("--proposals", help="proposals file (default: DATASETS.PRETRAIN.PROPOSALS)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--num-images", type=int, default=4, help="the first N images (sorted)")
    which.add_argument("--random", type=int, metavar="N", help="a random sample of N images")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of the views")
    p.add_argument("--panel-size", type=int, default=224, help="pixels per panel (views are "
                   "enlarged by whole factors)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = args.images or cfg.DATASETS.PRETRAIN.IMAGE_ROOT
    if not images or not os.path.exists(images):
        print(f"error: --images {images!r} does not exist: give an image folder, a .txt list or a "
              "COCO json.", file=sys.stderr)
        return 2
    try:
        paths = write_view_sheets(cfg, images, args.output_dir,
                                  num_images=args.random or args.num_images,
                                  random_sample=args.random is not None, seed=args.seed,
                                  proposals_file=args.proposals or cfg.DATASETS.PRETRAIN.PROPOSALS or None,
                                  panel=args.panel_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
