#!/usr/bin/env python
"""Check a custom COCO-format dataset and make it usable by name, without code.

    python datasets/prepare_coco_json.py my/annotations/train.json --image-root my/images
    python datasets/prepare_coco_json.py my/train.json --image-root my/images --link mydata

Checks that pycocotools reads the json, that every image it names exists under the image root
(default: ``<json folder>/../<split>`` for ``*_<split>.json``, else the json's folder), and
reports images, annotations, categories, crowd regions and images without annotations.

With ``--link NAME`` it adds ``$SOCO_DATASETS/NAME/annotations/instances_<split>.json`` and
``$SOCO_DATASETS/NAME/<split>`` (symbolic links to the json and the image root; ``<split>`` from
``--split``, default ``train``), the layout in which a json path finds its images by itself. Then
either backend takes the json path as a dataset name, e.g. ``DATASETS.TRAIN
"('$SOCO_DATASETS/NAME/annotations/instances_train.json',)"`` for ``tools/train_net.py`` (soco_d2
configs and detectron2-format configs alike) and ``DATASETS.PRETRAIN.IMAGE_ROOT`` for
pretraining. In Python, ``soco_d2.finetune.register_coco_instances(name, json, image_root)`` binds
any name instead.
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.data.image_list import default_coco_image_root, list_images  # noqa: E402
from soco_d2.data.coco_catalog import datasets_root, load_coco_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("json", help="COCO instances json")
    p.add_argument("--image-root", default=None, help="folder the json's file_name entries are in")
    p.add_argument("--link", metavar="NAME", default=None,
                   help="add $SOCO_DATASETS/NAME/{annotations/instances_<split>.json,<split>} links")
    p.add_argument("--split", default="train", help="split name of the links (default: train)")
    return p


def _link(target: str, path: str) -> None:
    target = os.path.abspath(target)
    if os.path.lexists(path):
        if os.path.realpath(path) == os.path.realpath(target):
            return
        raise FileExistsError(f"{path} exists and is not a link to {target}; choose another --link NAME")
    os.symlink(target, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.json):
        print(f"error: {args.json} does not exist", file=sys.stderr)
        return 1
    image_root = args.image_root or default_coco_image_root(args.json)
    try:
        coco = load_coco_json(args.json)
        images = list_images(args.json, image_root=image_root)  # checks every file_name exists
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    anns = coco.dataset.get("annotations", [])
    crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    empty = sum(1 for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i))
    cats = coco.loadCats(coco.getCatIds())
    print(f"{args.json}: {len(images.keys)} images under {os.path.abspath(image_root)}, {len(anns)} annotations "
          f"({crowd} crowd), {len(cats)} categories, {empty} images without annotations")
    print("categories: " + ", ".join(f"{c['id']}:{c['name']}" for c in cats))
    if not args.link:
        return 0
    folder = os.path.join(datasets_root(), args.link)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    json_link = os.path.join(folder, "annotations", f"instances_{args.split}.json")
    try:
        _link(args.json, json_link)
        _link(image_root, os.path.join(folder, args.split))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"linked {json_link}\nuse: DATASETS.TRAIN \"('{json_link}',)\"  (tools/train_net.py, either backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
