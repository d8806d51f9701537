#!/usr/bin/env python
"""Pack an image folder (ImageNet layout) into the official zip layout or into tar shards.

    # train.zip + train_map.txt (the layout of the official SoCo, Swin and PixPro code)
    python datasets/pack_imagenet.py --format zip datasets/imagenet/train datasets/imagenet/train.zip
    # WebDataset tar shards of 5000 images, train-000000.tar ..., each indexed
    python datasets/pack_imagenet.py --format tar --images-per-shard 5000 \\
        datasets/imagenet/train datasets/imagenet/shards/train
    # the map file of a zip that came without one
    python datasets/pack_imagenet.py --write-map datasets/imagenet/train.zip

Members are named by their path relative to the folder (``<wnid>/<image>.JPEG``), the keys of
the folder itself, so a proposals file made from the folder serves the archives and the other
way round. Map-file labels and ``.cls`` members are the index of the class folder among the
sorted folders (labels are never read in pretraining). Pretrain with
``DATASETS.PRETRAIN.IMAGE_ROOT datasets/imagenet/train.zip`` or
``DATASETS.PRETRAIN.IMAGE_ROOT 'datasets/imagenet/shards/train-*.tar'`` (see datasets/README.md).
"""
import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.data.archives import write_tar_shards, write_zip, write_zip_map_of  # noqa: E402
from soco_d2.data.image_list import list_images  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("folder", nargs="?", help="image folder (e.g. datasets/imagenet/train)")
    p.add_argument("output", nargs="?", help="zip: the .zip to write (its _map.txt goes next to it); "
                                             "tar: the shard prefix (PREFIX-000000.tar, ...)")
    p.add_argument("--format", choices=("zip", "tar"), default="zip")
    p.add_argument("--images-per-shard", type=int, default=5000,
                   help="tar: images per shard (default 5000, about 550 MB of ImageNet)")
    p.add_argument("--write-map", metavar="ZIP", help="write ZIP's map file from its image members and exit")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_map:
        print(f"wrote {write_zip_map_of(args.write_map)}")
        return 0
    if not args.folder or not args.output:
        parser.error("FOLDER and OUTPUT are required (or --write-map ZIP)")
    if not os.path.isdir(args.folder):
        parser.error(f"{args.folder!r} is not a folder")
    if args.format == "zip" and not args.output.lower().endswith(".zip"):
        parser.error(f"--format zip: OUTPUT must end in .zip, got {args.output!r}")
    if args.images_per_shard < 1:
        parser.error("--images-per-shard must be >= 1")
    images = list_images(args.folder)
    start = time.perf_counter()
    if args.format == "zip":
        map_path = write_zip(images, args.output)
        print(f"wrote {args.output} and {map_path}: {len(images)} images")
    else:
        shards = write_tar_shards(images, args.output, args.images_per_shard)
        print(f"wrote {len(shards)} shard(s) {shards[0]} ... {shards[-1]} with their .index.json: "
              f"{len(images)} images")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
