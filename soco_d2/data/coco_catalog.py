"""The COCO detection catalog: dataset names bound to ``(json_file, image_root)``, and the
datasets root.

* :func:`register_coco_instances` binds any name;
* builtin names resolve under :func:`datasets_root` when looked up:

  ===================  ====================================================  =====================
  name                 json                                                  images
  ===================  ====================================================  =====================
  coco_2017_train      ``coco/annotations/instances_train2017.json``         ``coco/train2017``
  coco_2017_val        ``coco/annotations/instances_val2017.json``           ``coco/val2017``
  coco_mini_train      ``coco_mini/annotations/instances_train2017.json``    ``coco_mini/train2017``
  coco_mini_val        ``coco_mini/annotations/instances_val2017.json``      ``coco_mini/val2017``
  pennfudan_train      ``pennfudan/annotations/instances_train.json``        ``pennfudan/PNGImages``
  pennfudan_val        ``pennfudan/annotations/instances_val.json``          ``pennfudan/PNGImages``
  ===================  ====================================================  =====================

* a name that is the path of a COCO ``.json`` file stands for itself; its images are found by
  :func:`~soco_d2.data.image_list.default_coco_image_root` (the split-named folder beside the
  json's folder, ``annotations/instances_train2017.json`` -> ``train2017/``; else the one sibling
  folder holding its images, Penn-Fudan's ``PNGImages/``; else the json's folder).

Fine-tuning (:mod:`soco_d2.finetune.coco_data`) and the evaluation read it; the pretraining
dataset names (:mod:`soco_d2.data.dataset`) resolve under the same :func:`datasets_root`.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from pycocotools.coco import COCO

from .image_list import default_coco_image_root

__all__ = ["datasets_root", "register_coco_instances", "registered_datasets", "get_dataset_paths",
           "validate_coco_instances", "load_coco_json"]

logger = logging.getLogger(__name__)
_reported = set()  # json files whose dropped annotations were reported (per process)

_REGISTERED: Dict[str, Tuple[str, str]] = {}

# name -> (json, image folder), relative to $SOCO_DATASETS.
_BUILTIN = {
    "coco_2017_train": ("coco/annotations/instances_train2017.json", "coco/train2017"),
    "coco_2017_val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
    "coco_mini_train": ("coco_mini/annotations/instances_train2017.json", "coco_mini/train2017"),
    "coco_mini_val": ("coco_mini/annotations/instances_val2017.json", "coco_mini/val2017"),
    "pennfudan_train": ("pennfudan/annotations/instances_train.json", "pennfudan/PNGImages"),
    "pennfudan_val": ("pennfudan/annotations/instances_val.json", "pennfudan/PNGImages"),
}


def register_coco_instances(name: str, json_file: str, image_root: str) -> None:
    """Bind ``name`` to a COCO instances json and the folder its ``file_name`` entries are in."""
    if name in _REGISTERED and _REGISTERED[name] != (json_file, image_root):
        raise ValueError(
            f"Dataset {name!r} is already registered as {_REGISTERED[name]}; choose another name."
        )
    _REGISTERED[name] = (os.fspath(json_file), os.fspath(image_root))


def registered_datasets() -> List[str]:
    """Every name :func:`get_dataset_paths` accepts."""
    return sorted(set(_REGISTERED) | set(_BUILTIN))


def datasets_root() -> str:
    """``$SOCO_DATASETS``, or ``datasets`` (relative to the working directory) when it is unset or
    empty (an empty value is taken as unset, not as the working directory)."""
    return os.environ.get("SOCO_DATASETS", "") or "datasets"


def get_dataset_paths(name: str) -> Tuple[str, str]:
    """``(json_file, image_root)`` of a registered or builtin dataset name."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        root = datasets_root()
        json_rel, images_rel = _BUILTIN[name]
        return os.path.join(root, json_rel), os.path.join(root, images_rel)
    if name.lower().endswith(".json") and os.path.isfile(name):
        return name, default_coco_image_root(name)
    raise KeyError(
        f"Dataset {name!r} is not registered; known: {registered_datasets()}. Give the path of "
        "a COCO json instead, or register it with "
        "soco_d2.finetune.register_coco_instances(name, json_file, image_root)."
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _segmentation_problem(segm, height: int, width: int) -> Optional[str]:
    """What is wrong with a COCO segmentation, or ``None`` when it is well formed."""
    if isinstance(segm, list):
        if not segm:
            return "an empty polygon list"
        for poly in segm:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return "a polygon that is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"a polygon of {len(poly)} numbers (needs x, y pairs, at least 3 points)"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
            return f"an RLE whose size {size!r} is not the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                return "an uncompressed RLE whose counts do not cover the image"
            return None
        if isinstance(counts, (str, bytes)) and counts:
            return None
        return "an RLE without counts"
    return f"a segmentation of type {type(segm).__name__}"


def validate_coco_instances(data, json_file: str) -> dict:
    """Check a COCO instances json up front, by kind of problem; returns it with the malformed
    annotations dropped.

    Refused (``ValueError`` naming each id and the fix): a file that is not an instances json,
    duplicate image, annotation or category ids (pycocotools would silently keep one of each
    and move boxes between images), an image without a positive ``height`` / ``width``, an
    annotation of an unknown category. Dropped and counted (one warning naming each
    annotation id): an annotation of an unknown image, a ``bbox`` that is not four finite
    numbers with non-negative width and height, a malformed polygon or RLE.
    """
    def ids_of(items, what):
        ids = [x.get("id") if isinstance(x, dict) else None for x in items]
        if any(i is None for i in ids):
            raise ValueError(f"{json_file!r}: every entry of '{what}' needs an 'id'.")
        dup = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        if dup:
            raise ValueError(f"{json_file!r}: {len(dup)} duplicate {what} id(s): "
                             f"{', '.join(map(str, dup[:10]))}{' ...' if len(dup) > 10 else ''}. "
                             f"Each of the {what} needs its own id; renumber them.")
        return ids

    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "categories")):
        raise ValueError(f"{json_file!r} is not a COCO instances json (it needs 'images' and "
                         "'categories' lists).")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{json_file!r}: 'annotations' is not a list.")
    image_ids, cat_ids = ids_of(data["images"], "images"), ids_of(data["categories"], "categories")
    ids_of(anns, "annotations")
    sizes = {}
    for img in data["images"]:
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise ValueError(f"{json_file!r}: image {img['id']} ({img.get('file_name')!r}) has "
                             f"height {h!r} and width {w!r}; both must be positive integers.")
        sizes[img["id"]] = (h, w)
    cats = set(cat_ids)
    unknown = sorted({a.get("category_id") for a in anns if a.get("category_id") not in cats},
                     key=str)
    if unknown:
        raise ValueError(f"{json_file!r}: annotations use category id(s) {unknown[:10]} that are "
                         f"not in 'categories' (ids {sorted(cats)[:20]}); fix the ids or add the "
                         "categories.")
    problems: Dict[str, List] = {}
    kept = []
    for a in anns:
        why = None
        if a.get("image_id") not in sizes:
            why = "of an image id that is not in 'images'"
        else:
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                    and bbox[2] >= 0 and bbox[3] >= 0):
                why = "with a bbox that is not [x, y, width >= 0, height >= 0]"
            elif "segmentation" in a:
                why = _segmentation_problem(a["segmentation"], *sizes[a["image_id"]])
                why = f"with {why}" if why else None
        if why:
            problems.setdefault(why, []).append(a["id"])
        else:
            kept.append(a)
    if problems and json_file not in _reported:
        _reported.add(json_file)
        logger.warning("%s: dropped %d of %d annotations: %s.", json_file, len(anns) - len(kept),
                       len(anns), "; ".join(
                           f"{len(ids)} {why} (ids {', '.join(map(str, ids[:10]))}"
                           f"{' ...' if len(ids) > 10 else ''})" for why, ids in problems.items()))
    return {**data, "annotations": kept}


def load_coco_json(json_file: str) -> COCO:
    """A pycocotools ``COCO`` object of a json checked by :func:`validate_coco_instances`."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Annotation file {json_file!r} does not exist. Builtin datasets live under "
            f"$SOCO_DATASETS (now {datasets_root()!r}); see docs/FINETUNE.md for the layout."
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file!r} is not valid JSON: {e}") from None
    coco = COCO()
    coco.dataset = validate_coco_instances(data, json_file)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco.createIndex()
    logger.debug(out.getvalue().strip())
    return coco
