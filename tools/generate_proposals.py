#!/usr/bin/env python
"""Compute SoCo's selective-search proposals for a set of images into one proposals file.

Examples:

  # all images of an ImageNet-style folder tree, all cores
  python tools/generate_proposals.py --images datasets/imagenet/train --output imagenet_train.socoprop

  # 4 machines, each one shard; then merge
  python tools/generate_proposals.py --images train_map.txt --output shard0.socoprop --shard 0/4
  python tools/generate_proposals.py --merge imagenet_train.socoprop shard0.socoprop ... shard3.socoprop

  # continue a killed run (images already written are skipped)
  python tools/generate_proposals.py --images ... --output imagenet_train.socoprop --resume

Image keys in the file are paths relative to the image root (see soco_d2.data.image_list), so
the file can move with the dataset; for a zip or tar shards they are the member names, the same
keys as the folder the archive was packed from (see soco_d2.data.archives).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.data.image_list import DEFAULT_MAX_IMAGE_PIXELS, list_images
from soco_d2.data.proposals import ProposalStore, merge_proposals
from soco_d2.data.selective_search import (
    DEFAULT_MAX_SIZE,
    SS_MODES,
    check_selective_search_available,
    run_generation,
)
from soco_d2.utils.env import log_environment
from soco_d2.engine.writers import LOG_FORMAT

logger = logging.getLogger("generate_proposals")


def _shard(text: str):
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Either --images and --output (generate) or --merge OUTPUT SHARD... (merge shard files).",
    )
    p.add_argument("--images", help="image folder (tree), .txt list file, COCO .json, a .zip with its "
                                    "_map.txt, tar shards ('shards/train-*.tar'), or a builtin name "
                                    "such as imagenet_train (under $SOCO_DATASETS)")
    p.add_argument("--image-root", default=None, help="image folder for a COCO json (default: next to the json)")
    p.add_argument("--output", help="proposals file to write (partial results go to OUTPUT.parts/)")
    p.add_argument("--merge", nargs="+", metavar=("OUTPUT", "SHARD"),
                   help="merge proposals files SHARD... into OUTPUT and exit")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="process images I, I+N, I+2N, ... of the sorted list (default 0/1)")
    p.add_argument("--resume", action="store_true", help="skip images already in OUTPUT or OUTPUT.parts/")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                   help=f"longest side of the copy selective search runs on, 0 = full size (default {DEFAULT_MAX_SIZE})")
    p.add_argument("--mode", choices=SS_MODES, default="fast", help="OpenCV selective-search strategy (default fast)")
    p.add_argument("--min-side", type=float, default=32, help="minimum box side in original pixels (default 32)")
    p.add_argument("--max-boxes", type=int, default=None, help="keep at most this many boxes per image")
    p.add_argument("--chunk-size", type=int, default=1000, help="images per atomically written chunk")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images whose header declares more pixels are recorded as unreadable "
                        f"without decoding, 0 = no limit (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--watchdog-timeout", type=float, default=1800.0,
                   help="seconds without a finished image after which the run dumps every "
                        "thread's stack and ends with exit code 3, 0 = never (default 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%m/%d %H:%M:%S")
    if args.merge:
        if len(args.merge) < 2:
            parser.error("--merge needs OUTPUT and at least one SHARD file")
        merge_proposals(args.merge[1:], args.merge[0])
        store = ProposalStore.open(args.merge[0])
        logger.info("merged %d files into %s: %d images, %d boxes", len(args.merge) - 1, args.merge[0],
                    len(store), store.num_boxes)
        return 0
    if not args.images or not args.output:
        parser.error("--images and --output are required (or use --merge)")
    try:
        check_selective_search_available()  # before listing a million images
    except RuntimeError as e:
        parser.error(str(e))
    log_environment(argv if argv is not None else sys.argv[1:])
    if args.max_boxes is not None and args.max_boxes < 1:
        parser.error("--max-boxes must be >= 1")
    images = list_images(args.images, image_root=args.image_root)
    logger.info("%d images under %s", len(images), images.root)
    summary = run_generation(
        images,
        args.output,
        workers=args.workers,
        shard=args.shard,
        resume=args.resume,
        max_size=args.max_size,
        mode=args.mode,
        min_side=args.min_side,
        max_boxes=args.max_boxes,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
        watchdog_timeout=args.watchdog_timeout,
    )
    logger.info("wrote %s; %s", args.output, summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
