"""Detection datasets in COCO format for fine-tuning and evaluation.

A dataset is a name bound to ``(json_file, image_root)`` in the catalog
(:mod:`soco_d2.data.coco_catalog`, re-exported here): builtin names under ``$SOCO_DATASETS``,
names registered with :func:`register_coco_instances`, or the path of a json.

:class:`COCODetection` turns a json into training targets in torchvision's detection format:
category ids become contiguous labels ``first_label .. first_label + C - 1`` (1..C for Mask
R-CNN, whose label 0 is the background; 0..C-1 for RetinaNet), boxes go from ``xywh`` to
``xyxy`` (clipped to the image), crowd regions are left out of training targets (the evaluation
reads them from the json), boxes with no area are dropped (and counted), masks are decoded from
polygons / RLE with ``pycocotools.mask``. Images stay at their stored size: the detector resizes
them (multi-scale training happens in torchvision's ``GeneralizedRCNNTransform``).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from soco_d2.data.coco_catalog import (  # noqa: F401  (the catalog, re-exported)
    get_dataset_paths,
    load_coco_json,
    register_coco_instances,
    registered_datasets,
    validate_coco_instances,
)
from soco_d2.data.image_list import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageError, read_image
from soco_d2.data.loader import loader_worker_init, per_process_batch_size, usable_num_workers
from soco_d2.data.samplers import ResumableInfiniteSampler
from soco_d2.utils import comm

__all__ = [
    "register_coco_instances",
    "registered_datasets",
    "get_dataset_paths",
    "load_coco_json",
    "validate_coco_instances",
    "COCODetection",
    "list_collate",
    "build_dataset",
    "build_train_loader",
    "build_test_loader",
]

logger = logging.getLogger(__name__)

# Retries with another image when a training image cannot be read.
_MAX_READ_RETRIES = 10


def _segmentation_to_rle(segm, height: int, width: int):
    """One RLE for a COCO segmentation (polygon list, uncompressed RLE or compressed RLE)."""
    if isinstance(segm, list):  # polygons: merge the parts of one object
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions)
        return mask_util.frPyObjects(segm, height, width)
    return segm


class COCODetection(torch.utils.data.Dataset):
    """Images and targets of a COCO instances json.

    ``dataset[i]`` (evaluation) or ``dataset[(i, sample_seed)]`` (training; the seed drives the
    random flip, so a resumed run sees the same stream) returns ``(image, target)``: ``image``
    a ``uint8`` CHW tensor in RGB, ``target`` a dict with ``image_id`` and, for training,
    ``boxes`` (float32 Nx4 xyxy), ``labels`` (int64 N) and ``masks`` (uint8 NxHxW, when
    ``mask_on``). At evaluation an unreadable image gives ``(None, target)`` (logged, counted).

    Args:
        is_train: build training targets (flip, no crowd, no degenerate boxes).
        first_label: the label of the first category (1 for Mask R-CNN, 0 for RetinaNet).
        filter_empty: drop training images left without annotations.
        skip_missing: drop images absent on disk (else raise naming them).
        flip_prob: probability of a horizontal flip (training only).
        max_image_pixels: images declaring more pixels are unreadable (``INPUT.MAX_IMAGE_PIXELS``).
    """

    def __init__(
        self,
        json_file: str,
        image_root: str,
        is_train: bool,
        mask_on: bool = True,
        first_label: int = 1,
        filter_empty: bool = True,
        skip_missing: bool = False,
        flip_prob: float = 0.5,
        name: Optional[str] = None,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.name = name or json_file
        self.max_image_pixels = max_image_pixels
        self.json_file = json_file
        self.image_root = image_root
        self.is_train = is_train
        self.mask_on = mask_on
        self.first_label = first_label
        self.flip_prob = flip_prob if is_train else 0.0
        self.num_unreadable = 0

        coco = load_coco_json(json_file)
        cat_ids = sorted(coco.getCatIds())
        if not cat_ids:
            raise ValueError(f"{json_file!r} has no 'categories'; a detection json needs them.")
        self.category_ids = cat_ids
        self.category_names = [c["name"] for c in coco.loadCats(cat_ids)]
        self.cat_to_label = {c: i + first_label for i, c in enumerate(cat_ids)}

        records = [self._record(coco, img_id) for img_id in sorted(coco.getImgIds())]
        records = self._check_files(records, skip_missing)
        if is_train:
            num_dropped = sum(r.pop("num_degenerate") for r in records)
            if num_dropped:
                logger.warning(
                    "%s: dropped %d annotations whose box has no area.", self.name, num_dropped
                )
            if filter_empty:
                kept = [r for r in records if len(r["labels"])]
                if len(kept) < len(records):
                    logger.info(
                        "%s: %d of %d images have no usable annotation and are not used for "
                        "training (DATALOADER.FILTER_EMPTY_ANNOTATIONS).",
                        self.name, len(records) - len(kept), len(records),
                    )
                records = kept
        if not records:
            raise ValueError(f"{self.name}: no images left to use from {json_file!r}.")
        self.records = records

    # ------------------------------------------------------------------------------------------
    def _record(self, coco: COCO, img_id: int) -> dict:
        info = coco.imgs[img_id]
        rec = {
            "image_id": img_id,
            "file_name": os.path.join(self.image_root, info["file_name"]),
            "height": int(info["height"]),
            "width": int(info["width"]),
        }
        if not self.is_train:
            return rec
        anns = [a for a in coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        h, w = rec["height"], rec["width"]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        rec["num_degenerate"] = int((~keep).sum())
        rec["boxes"] = boxes[keep]
        rec["labels"] = np.array(
            [self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64
        )[keep]
        if self.mask_on:
            rec["segmentations"] = [a.get("segmentation") for a, k in zip(anns, keep) if k]
            if any(not s for s in rec["segmentations"]):
                raise ValueError(
                    f"{self.json_file!r}: image {img_id} has an annotation without "
                    "'segmentation'; set MODEL.MASK_ON False to train boxes only."
                )
        return rec

    def _check_files(self, records: List[dict], skip_missing: bool) -> List[dict]:
        missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
        if not missing:
            return records
        shown = ", ".join(repr(p) for p in missing[:5])
        msg = (
            f"{self.name}: {len(missing)} of the {len(records)} images listed in "
            f"{self.json_file!r} are missing under {self.image_root!r} (first: {shown})"
        )
        if not skip_missing:
            raise FileNotFoundError(
                msg + "; fix the image root, or set DATALOADER.SKIP_MISSING_IMAGES True to skip them."
            )
        logger.warning("%s; skipping them (DATALOADER.SKIP_MISSING_IMAGES).", msg)
        missing = set(missing)
        return [r for r in records if r["file_name"] not in missing]

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def label_to_category_id(self, labels: np.ndarray) -> np.ndarray:
        """Map contiguous labels back to the json's category ids."""
        return np.asarray(self.category_ids, dtype=np.int64)[np.asarray(labels) - self.first_label]

    def _read(self, rec: dict) -> np.ndarray:
        image = read_image(rec["file_name"], self.max_image_pixels)
        if image.shape[:2] != (rec["height"], rec["width"]):
            raise UnreadableImageError(
                rec["file_name"],
                f"its size {image.shape[1]}x{image.shape[0]} differs from the json's "
                f"{rec['width']}x{rec['height']}",
            )
        return image

    def __getitem__(self, item):
        if not self.is_train:
            rec = self.records[int(item)]
            target = {k: rec[k] for k in ("image_id", "height", "width")}
            try:
                image = self._read(rec)
            except UnreadableImageError as e:
                self.num_unreadable += 1
                logger.warning("Skipping an image at evaluation: %s", e)
                return None, target
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target

        index, seed = item
        rng = np.random.default_rng(seed)
        for _ in range(_MAX_READ_RETRIES):
            rec = self.records[int(index)]
            try:
                image = self._read(rec)
                break
            except UnreadableImageError as e:
                self.num_unreadable += 1
                logger.warning("Skipping an unreadable training image: %s", e)
                index = int(rng.integers(len(self.records)))
        else:
            raise RuntimeError(
                f"{self.name}: {_MAX_READ_RETRIES} images in a row could not be read; "
                "check the dataset files."
            )
        return self._training_sample(rec, image, flip=rng.random() < self.flip_prob)

    def _training_sample(self, rec: dict, image: np.ndarray, flip: bool):
        h, w = rec["height"], rec["width"]
        boxes = rec["boxes"].copy()
        masks = None
        if self.mask_on:
            if rec["segmentations"]:
                rles = [_segmentation_to_rle(s, h, w) for s in rec["segmentations"]]
                masks = mask_util.decode(rles).transpose(2, 0, 1)  # N x H x W
            else:
                masks = np.zeros((0, h, w), dtype=np.uint8)
        if flip:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            if masks is not None:
                masks = masks[:, :, ::-1]
        target = {
            "image_id": rec["image_id"],
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(rec["labels"]),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, target


def list_collate(batch: Sequence):
    """``[(image, target), ...]`` -> ``(images, targets)`` lists (images keep their own sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_dataset(cfg, name: str, is_train: bool, first_label: int) -> COCODetection:
    """The :class:`COCODetection` of a registered dataset name, configured from ``cfg``."""
    json_file, image_root = get_dataset_paths(name)
    flip = cfg.INPUT.RANDOM_FLIP
    if flip not in ("horizontal", "none"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal' or 'none', got {flip!r}.")
    return COCODetection(
        json_file,
        image_root,
        is_train=is_train,
        mask_on=cfg.MODEL.MASK_ON and cfg.MODEL.DETECTOR == "mask_rcnn",
        first_label=first_label,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        skip_missing=cfg.DATALOADER.SKIP_MISSING_IMAGES,
        flip_prob=0.5 if flip == "horizontal" else 0.0,
        name=name,
        max_image_pixels=cfg.INPUT.MAX_IMAGE_PIXELS,
    )


def _use_pin_memory(cfg) -> bool:
    return str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()


def build_train_loader(cfg, dataset: COCODetection, start_iter: int = 0):
    """An endless iterator of ``(images, targets)`` batches for this process.

    The sample stream is :class:`ResumableInfiniteSampler`'s: a run resumed at ``start_iter``
    continues at position ``start_iter * IMS_PER_BATCH`` and sees the same images and flips.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    sampler = ResumableInfiniteSampler(
        len(dataset), seed=cfg.SEED, rank=rank, world_size=world, shuffle=True,
        start_position=start_iter * cfg.SOLVER.IMS_PER_BATCH,
    )
    num_workers = usable_num_workers(cfg.DATALOADER.NUM_WORKERS)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=per_process_batch_size(cfg, world),
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=list_collate,
        pin_memory=_use_pin_memory(cfg),
        drop_last=True,
        persistent_workers=num_workers > 0,
        # A private generator: building the loader must not consume the global torch RNG,
        # whose state is part of an exact resume.
        generator=torch.Generator().manual_seed(cfg.SEED + rank),
        worker_init_fn=loader_worker_init,
    )
    return iter(loader)


def build_test_loader(cfg, dataset: COCODetection):
    """A finite loader over this process's contiguous share of ``dataset`` (in order)."""
    world, rank = comm.get_world_size(), comm.get_rank()
    indices = np.array_split(np.arange(len(dataset)), world)[rank].tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=cfg.TEST.IMS_PER_BATCH,
        shuffle=False,
        num_workers=min(usable_num_workers(cfg.DATALOADER.NUM_WORKERS), 4),
        worker_init_fn=loader_worker_init,
        collate_fn=list_collate,
        pin_memory=_use_pin_memory(cfg),
    )
