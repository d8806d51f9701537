"""The pretraining dataset: an image, its proposals, and the view mapper's sample.

``PretrainDataset[(index, sample_seed)]`` builds ``rng = numpy.random.default_rng(sample_seed)``
and hands it to the view mapper, so a sample depends only on ``(index, sample_seed)`` (see
docs/ARCHITECTURE.md). An unreadable image is counted in the sample's ``"num_skipped"`` and
replaced by the next index; the trainer sums the counts over all processes and stops the run
above ``DATALOADER.MAX_BAD_IMAGE_FRACTION``. The first failure of a file is logged and
remembered in memory shared by the process and its DataLoader workers, so the file is never
read (nor logged) again; the replacement, hence the sample, is the same either way.

An image whose size no longer matches the one its proposals were computed on is skipped the
same way (counted, remembered, replaced by the next index) when its aspect ratio changed: the
file was replaced after the proposals were made, and its boxes would be stretched onto another
picture. An image of the same aspect ratio at another size (up to the rounding of each side to
whole pixels) is the same picture resized (e.g. proposals of full-size ImageNet, training on a
resized copy): its boxes are rescaled. Images skipped for their size are not logged one by one:
:class:`~soco_d2.data.loader.PretrainBatches` logs one line per process at the first
(:meth:`PretrainDataset.size_change_summary`).

Images that the proposals file records as unreadable are left out of the dataset up front.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .boxes import scale_boxes
from .coco_catalog import datasets_root
from .image_list import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageList,
    UnreadableImageError,
    list_images,
    read_image,
)
from .proposals import ProposalStore
from .registry import build_mapper

__all__ = [
    "PretrainDataset",
    "build_pretrain_dataset",
    "register_pretrain_dataset",
    "registered_pretrain_datasets",
    "check_proposal_coverage",
    "drop_unreadable",
    "datasets_root",
    "same_picture_resized",
]

logger = logging.getLogger(__name__)

# Why an image is skipped: the values of PretrainDataset's per-image flags (0: not skipped).
UNREADABLE, SIZE_CHANGED = 1, 2


def same_picture_resized(stored_hw: Tuple[int, int], read_hw: Tuple[int, int]) -> bool:
    """Whether an image of ``read_hw`` can be the picture of ``stored_hw`` at another scale:
    their aspect ratios agree up to the rounding of each side to whole pixels.

    Two sizes ``h x w`` and ``hs x ws`` of one picture differ from its exact proportions by at
    most half a pixel per side, so ``|h * ws - hs * w| <= (h + w + hs + ws) / 2``.
    """
    (hs, ws), (h, w) = stored_hw, read_hw
    return abs(h * ws - hs * w) <= (h + w + hs + ws) / 2


class ImageSizeChanged(Exception):
    """An image reads with another aspect ratio than the one its proposals were computed on."""


class PretrainDataset(Dataset):
    """Images of an :class:`~soco_d2.data.image_list.ImageList` with their proposals, mapped to views.

    Args:
        images: the image list.
        proposals: a :class:`~soco_d2.data.proposals.ProposalStore` (memory-mapped, cheap to send
            to DataLoader workers) or ``None``. An image without an entry or with an empty entry
            gets one whole-image box (the official fallback). Boxes computed on an image of another
            size than the one read (e.g. proposals of full-size ImageNet, training on a resized
            copy) are rescaled to it; an image whose aspect ratio changed is skipped (see the
            module's docstring).
        mapper: ``mapper(image, proposals, rng) -> dict`` (a registered view mapper).
        max_consecutive_failures: raise after this many unreadable images in a row (a wrong image
            root or a dead disk, not a few corrupt files).
        max_image_pixels: images whose header declares more pixels are unreadable
            (``INPUT.MAX_IMAGE_PIXELS``; see :func:`~soco_d2.data.image_list.read_image`).
    """

    def __init__(
        self,
        images: ImageList,
        proposals: Optional[ProposalStore],
        mapper: Callable,
        max_consecutive_failures: int = 50,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if len(images) == 0:
            raise ValueError(f"PretrainDataset: the image list {images!r} is empty")
        self.images = images
        self.proposals = proposals
        self.mapper = mapper
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.max_image_pixels = max_image_pixels
        self._warned_resize = False
        self._cv2_single_thread = False
        # One flag per image, in shared memory: DataLoader workers (forked or spawned) see and
        # set the same flags, so a file found unreadable is not read again by any of them. The
        # value says why (UNREADABLE, SIZE_CHANGED).
        self._skipped = torch.zeros(len(images), dtype=torch.uint8).share_memory_()

    def unreadable_indices(self) -> List[int]:
        """Indices of the images skipped so far by this process or its loader workers: found
        unreadable, or read with another aspect ratio than their proposals'."""
        return self._skipped.nonzero().flatten().tolist()

    def mark_unreadable(self, indices: Iterable[int]) -> None:
        """Remember images as skipped (found by another process, or before a resume)."""
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        if len(indices):
            self._skipped[indices] = torch.where(self._skipped[indices] > 0,
                                                 self._skipped[indices], UNREADABLE)

    def size_change_summary(self) -> Optional[str]:
        """One line on the images skipped so far (by this process or its loader workers) because
        their size no longer matches their proposals; ``None`` when there are none."""
        changed = (self._skipped == SIZE_CHANGED).nonzero().flatten()
        if not len(changed):
            return None
        first = int(changed[0])
        key = self.images.keys[first]
        h, w = self.proposals.image_size(key)
        return (
            f"{len(changed)} image(s) no longer match their proposals in {self.proposals.path!r} "
            f"(e.g. {self.images.path(first)!r}: its proposals were computed on a {h}x{w} (height x "
            f"width) image and it now reads with another aspect ratio, so the file was replaced after the proposals "
            f"were made). They are skipped like unreadable images and counted in num_skipped and "
            f"num_unreadable_images of metrics.json; further ones get no line of their own. "
            f"Regenerate the proposals (tools/generate_proposals.py) to train on them."
        )

    def __len__(self) -> int:
        return len(self.images)

    def proposals_for(self, index: int, height: int, width: int) -> np.ndarray:
        """float32 (N, 4) boxes of image ``index`` in the pixels of its ``height x width`` array.
        Raises :class:`ImageSizeChanged` when that is not the size the boxes were computed on,
        resized (:func:`same_picture_resized`)."""
        boxes = None
        if self.proposals is not None:
            key = self.images.keys[index]
            boxes = self.proposals.get(key)
            if boxes is not None and len(boxes):
                stored_h, stored_w = self.proposals.image_size(key)
                if not same_picture_resized((stored_h, stored_w), (height, width)):
                    raise ImageSizeChanged(key)
                if (stored_h, stored_w) != (height, width):
                    if not self._warned_resize:
                        logger.warning(
                            "Proposals of %r were computed on a %dx%d image but it reads as %dx%d; "
                            "rescaling its boxes (and those of any other such image, without "
                            "further warnings).",
                            key, stored_h, stored_w, height, width,
                        )
                        self._warned_resize = True
                    boxes = scale_boxes(boxes, width / stored_w, height / stored_h)
        if boxes is None or len(boxes) == 0:
            return np.array([[0, 0, width, height]], dtype=np.float32)
        return boxes

    def __getitem__(self, item) -> Dict:
        if isinstance(item, (tuple, list)):
            index, seed = int(item[0]), int(item[1])
        else:
            index = seed = int(item)
        if not self._cv2_single_thread and get_worker_info() is not None:
            cv2.setNumThreads(1)  # DataLoader workers already run in parallel
            self._cv2_single_thread = True
        n = len(self.images)
        for attempt in range(self.max_consecutive_failures + 1):
            i = (index + attempt) % n
            # The first try uses sample_seed itself (the contract); replacements derive from it.
            rng = np.random.default_rng(seed if attempt == 0 else [seed, attempt])
            if self._skipped[i]:
                continue
            try:
                image = read_image(self.images.source(i), self.max_image_pixels)
            except UnreadableImageError as e:
                self._skipped[i] = UNREADABLE
                logger.warning("Skipping unreadable image %s: %s (not read again in this run)",
                               e.path, e.reason)
                continue
            try:
                proposals = self.proposals_for(i, *image.shape[:2])
            except ImageSizeChanged:
                self._skipped[i] = SIZE_CHANGED  # logged once, by the loader (one line)
                continue
            sample = self.mapper(image, proposals, rng)
            sample["num_skipped"] = attempt
            return sample
        raise RuntimeError(
            f"{self.max_consecutive_failures + 1} consecutive images could not be read (or no "
            f"longer match their proposals), starting at {self.images.path(index)!r} (see the "
            f"warnings above). The image root {self.images.root!r} is probably wrong or "
            f"unreadable."
        )


# ------------------------------------------------------------------------------------------------
# Named datasets
# ------------------------------------------------------------------------------------------------

_DATASETS: Dict[str, Dict[str, Optional[str]]] = {}


def register_pretrain_dataset(
    name: str, image_source: str, proposals: Optional[str] = None, layout: str = ""
) -> None:
    """Register ``name`` for ``DATASETS.PRETRAIN.NAME``.

    Args:
        image_source: a folder, ``.txt`` list file or COCO ``.json`` (see
            :func:`~soco_d2.data.image_list.list_images`); a relative path is taken under the
            ``$SOCO_DATASETS`` folder.
        proposals: default proposals file (relative paths under ``$SOCO_DATASETS`` too), used
            when ``DATASETS.PRETRAIN.PROPOSALS`` is empty.

    ``$SOCO_DATASETS`` defaults to ``./datasets``.
        layout: a one-line description of the expected files, shown when they are missing.
    """
    if name in _DATASETS:
        raise KeyError(f"pretraining dataset {name!r} is already registered")
    _DATASETS[name] = {"image_source": image_source, "proposals": proposals, "layout": layout}


def registered_pretrain_datasets():
    return sorted(_DATASETS)


register_pretrain_dataset(
    "imagenet_train", "imagenet/train", layout="$SOCO_DATASETS/imagenet/train/<wnid>/<image>.JPEG"
)
register_pretrain_dataset(
    "imagenet_val", "imagenet/val", layout="$SOCO_DATASETS/imagenet/val/[<wnid>/]<image>.JPEG"
)
register_pretrain_dataset(
    "coco_2017_train_unlabeled",
    "coco/annotations/instances_train2017.json",
    layout="$SOCO_DATASETS/coco/annotations/instances_train2017.json and coco/train2017/<image>.jpg "
    "(the train2017 images, labels unused)",
)
register_pretrain_dataset(
    "coco_2017_unlabeled", "coco/unlabeled2017", layout="$SOCO_DATASETS/coco/unlabeled2017/<image>.jpg"
)


def _under_datasets_root(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(datasets_root(), path)


def _resolve_source(cfg) -> Tuple[str, Optional[str]]:
    """(image source, default proposals file or None) from DATASETS.PRETRAIN."""
    d = cfg.DATASETS.PRETRAIN
    if d.IMAGE_ROOT:
        if d.NAME:
            logger.info("DATASETS.PRETRAIN.IMAGE_ROOT %r is used instead of NAME %r.", d.IMAGE_ROOT, d.NAME)
        return d.IMAGE_ROOT, None
    if not d.NAME:
        raise ValueError(
            "No pretraining images: set DATASETS.PRETRAIN.NAME (one of "
            f"{registered_pretrain_datasets()}) or DATASETS.PRETRAIN.IMAGE_ROOT (a folder, a .txt "
            "list of image paths or a COCO .json)."
        )
    if d.NAME not in _DATASETS:
        raise KeyError(
            f"DATASETS.PRETRAIN.NAME {d.NAME!r} is not registered; known: {registered_pretrain_datasets()} "
            f"(or use DATASETS.PRETRAIN.IMAGE_ROOT, or soco_d2.data.dataset.register_pretrain_dataset)"
        )
    entry = _DATASETS[d.NAME]
    source = _under_datasets_root(entry["image_source"])
    if not os.path.exists(source):
        where = (
            f"$SOCO_DATASETS={os.environ['SOCO_DATASETS']!r}"
            if os.environ.get("SOCO_DATASETS")
            else "$SOCO_DATASETS is not set, so the default ./datasets"
        )
        raise FileNotFoundError(
            f"DATASETS.PRETRAIN.NAME {d.NAME!r}: {source!r} does not exist ({where}). Expected "
            f"layout: {entry['layout'] or entry['image_source']}. Set SOCO_DATASETS to the folder "
            f"holding it, or set DATASETS.PRETRAIN.IMAGE_ROOT to the images instead."
        )
    proposals = entry["proposals"]
    return source, _under_datasets_root(proposals) if proposals else None


def check_proposal_coverage(
    images: ImageList, store: ProposalStore, max_missing_fraction: float, image_source: str = ""
) -> Tuple[int, int]:
    """Count the images without a proposals entry and those with an empty one; log both.

    Raises ``ValueError`` when the images without an entry exceed ``max_missing_fraction``
    (the proposals were made for another image set). Images the file records as unreadable
    are not missing (:func:`drop_unreadable` leaves them out first). Returns ``(missing, empty)``.
    """
    stored_keys = store.keys
    stored = set(stored_keys) | set(store.unreadable)
    missing = sum(1 for k in images.keys if k not in stored)
    image_keys = set(images.keys)
    counts = store.box_counts()
    empty = sum(1 for k, c in zip(stored_keys, counts) if c == 0 and k in image_keys)
    n = len(images)
    source = image_source or images.root
    if missing:
        example = next(k for k in images.keys if k not in stored)
        logger.warning(
            "%d of %d images (%.2f%%) of %r have no entry in the proposals file %r (e.g. %r); "
            "they use one whole-image box.",
            missing, n, 100.0 * missing / n, source, store.path, example,
        )
    if missing / n > max_missing_fraction:
        raise ValueError(
            f"{missing} of {n} images ({missing / n:.2%}) of {source!r} have no entry in the proposals "
            f"file {store.path!r}, more than DATASETS.PRETRAIN.MAX_MISSING_PROPOSALS="
            f"{max_missing_fraction}. The proposals were made for another image set (or another "
            f"image root: keys are paths relative to {images.root!r}, e.g. {images.keys[0]!r}). "
            f"Generate proposals for this image set with tools/generate_proposals.py."
        )
    if empty:
        logger.info(
            "%d of %d images (%.2f%%) have an empty proposal list; they use one whole-image box.",
            empty, n, 100.0 * empty / n,
        )
    return missing, empty


def drop_unreadable(images: ImageList, store: ProposalStore) -> ImageList:
    """``images`` without those the proposals file records as unreadable (logged once)."""
    bad = [k for k in store.unreadable_keys if k in images]
    if not bad:
        return images
    logger.warning(
        "%d of %d images are recorded as unreadable in the proposals file %r (e.g. %r: %s); "
        "they are left out.", len(bad), len(images), store.path, bad[0], store.unreadable[bad[0]])
    if len(bad) == len(images):
        raise ValueError(
            f"Every image of {images.root!r} is recorded as unreadable in the proposals file "
            f"{store.path!r} (e.g. {bad[0]!r}: {store.unreadable[bad[0]]}). Check the files.")
    bad = set(bad)
    return images.subset([k for k in images.keys if k not in bad])


def build_pretrain_dataset(cfg) -> PretrainDataset:
    """The :class:`PretrainDataset` of ``cfg.DATASETS.PRETRAIN`` with the mapper ``cfg.INPUT.MAPPER``.

    Images: ``IMAGE_ROOT`` if set, else the registered ``NAME`` (under ``$SOCO_DATASETS``).
    Proposals: ``PROPOSALS`` if set, else the registered default, else none: refused for a mapper
    that trains on proposals unless ``WHOLE_IMAGE_BOXES`` (then one whole-image box per image).
    """
    source, default_proposals = _resolve_source(cfg)
    images = list_images(source)
    logger.info("Pretraining images: %d from %r.", len(images), source)
    proposals_path = cfg.DATASETS.PRETRAIN.PROPOSALS or default_proposals
    store = None
    mapper = build_mapper(cfg)
    if proposals_path:
        store = ProposalStore.open(proposals_path)
        images = drop_unreadable(images, store)
        check_proposal_coverage(images, store, cfg.DATASETS.PRETRAIN.MAX_MISSING_PROPOSALS, source)
    elif getattr(mapper, "uses_proposals", True):
        if not cfg.DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES:
            raise ValueError(
                f"DATASETS.PRETRAIN.PROPOSALS is empty, and {cfg.INPUT.MAPPER} trains on proposals: "
                f"without them every image of {source!r} would get one whole-image box, which is "
                "image-level pretraining, not SoCo. Generate them with tools/generate_proposals.py "
                "--images <the same images> --output <file> and set DATASETS.PRETRAIN.PROPOSALS "
                "<file>; or set DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES True to train on whole-image "
                "boxes on purpose."
            )
        logger.warning(
            "DATASETS.PRETRAIN.PROPOSALS is empty and DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES is True: "
            "every image uses one whole-image box (image-level pretraining, not SoCo's objective)."
        )
    return PretrainDataset(images, store, mapper, max_image_pixels=cfg.INPUT.MAX_IMAGE_PIXELS)
