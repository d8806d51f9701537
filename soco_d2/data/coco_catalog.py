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

* a name that is the path of a COCO ``.json`` file stands for itself; its images are in the
  folder named after the json's split next to the json's folder (``annotations/
  instances_train2017.json`` -> ``train2017/``) if that exists, else in the json's folder.

Fine-tuning (:mod:`soco_d2.finetune.coco_data`) and the evaluation read it; the pretraining
dataset names (:mod:`soco_d2.data.dataset`) resolve under the same :func:`datasets_root`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Dict, List, Tuple

from pycocotools.coco import COCO

from .image_list import default_coco_image_root

__all__ = ["datasets_root", "register_coco_instances", "registered_datasets", "get_dataset_paths",
           "load_coco_json"]

logger = logging.getLogger(__name__)

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


def load_coco_json(json_file: str) -> COCO:
    """A pycocotools ``COCO`` object (its loading chatter goes to the debug log)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Annotation file {json_file!r} does not exist. Builtin datasets live under "
            f"$SOCO_DATASETS (now {datasets_root()!r}); see docs/FINETUNE.md for the layout."
        )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco = COCO(json_file)
    logger.debug(out.getvalue().strip())
    return coco
