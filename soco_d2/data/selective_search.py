"""Selective-search proposals (OpenCV ``cv2.ximgproc``) and SoCo's box filter.

Proposals are computed on a downscaled copy of the image (``max_size``: longest side, aspect
kept; never upscaled) and mapped back to original pixels. OpenCV returns integer rects
``(x, y, w, h)`` where the region covers pixels ``x .. x+w-1``; as a box in continuous pixel
coordinates this is ``x1=x, x2=x+w`` (SoCo's official code is one pixel short here), which
rescales exactly by the ratio of the image sizes. Boxes are then rounded to whole pixels (what
the uint16 proposals file stores), de-duplicated, and filtered with SoCo's ``ratio3size0308``
rule (see :func:`filter_boxes`), so the returned boxes are exactly the stored ones.

OpenCV ranks its boxes with an unseeded random order; to make the output a pure function of the
image, the boxes are returned sorted (row-lexicographic), and a ``max_boxes`` cap keeps a uniform
random subset seeded by the boxes themselves.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import cv2
import numpy as np

from soco_d2.utils.signals import Preempted, PreemptionWatcher, ignore_preemption_signals

from .image_list import DEFAULT_MAX_IMAGE_PIXELS, ImageList, UnreadableImageError, read_image_reduced
from .proposals import ProposalWriter

logger = logging.getLogger(__name__)

__all__ = [
    "SS_MODES",
    "DEFAULT_MAX_SIZE",
    "filter_mask",
    "filter_boxes",
    "downscale",
    "selective_search",
    "raw_proposals",
    "generate_proposals",
    "GenerationSummary",
    "run_generation",
    "check_selective_search_available",
]

SS_MODES = ("fast", "quality", "single")
# Longest side of the copy selective search runs on; chosen from benchmarks/bench_proposals.py
# (see BENCHMARKS.md, "Proposals").
DEFAULT_MAX_SIZE = 128


def check_selective_search_available() -> None:
    """Raise a ``RuntimeError`` with the fix when this OpenCV has no ``cv2.ximgproc`` (the contrib
    modules): typically a plain ``opencv-python`` installed next to the contrib build shadows it."""
    if hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "segmentation"):
        return
    raise RuntimeError(
        f"OpenCV {getattr(cv2, '__version__', '?')} (from {getattr(cv2, '__file__', '?')}) has no "
        "cv2.ximgproc, which selective search needs: it is in the contrib build only. Another "
        "OpenCV package installed next to it shadows it. Fix: pip uninstall -y opencv-python "
        "opencv-python-headless opencv-contrib-python opencv-contrib-python-headless && "
        "pip install opencv-contrib-python-headless")


def filter_mask(
    boxes: np.ndarray,
    image_hw: Tuple[int, int],
    min_side: float = 32,
    max_aspect: Optional[float] = 3.0,
    scale_range: Optional[Tuple[float, float]] = (0.3, 0.8),
) -> np.ndarray:
    """Boolean mask of the boxes (x1, y1, x2, y2) that pass every rule (bounds inclusive):

    * ``w >= min_side`` and ``h >= min_side`` (w = x2 - x1, h = y2 - y1);
    * ``1 / max_aspect <= w / h <= max_aspect`` (skipped when ``max_aspect`` is None);
    * ``lo <= sqrt(w * h) / sqrt(W * H) <= hi`` for ``scale_range = (lo, hi)`` (skipped when None).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    keep = (w >= min_side) & (h >= min_side) & (w > 0) & (h > 0)
    if max_aspect is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            keep &= (w / h <= max_aspect) & (h / w <= max_aspect)
    if scale_range is not None:
        image_h, image_w = image_hw
        scale = np.sqrt(np.clip(w * h, 0, None)) / np.sqrt(float(image_h) * float(image_w))
        keep &= (scale >= scale_range[0]) & (scale <= scale_range[1])
    return keep


def filter_boxes(
    boxes: np.ndarray,
    image_hw: Tuple[int, int],
    min_side: float = 32,
    max_aspect: float = 3.0,
    scale_range: Tuple[float, float] = (0.3, 0.8),
    fallback: bool = True,
) -> np.ndarray:
    """SoCo's proposal filter ``ratio3size0308`` (see :func:`filter_mask`), vectorised.

    With ``fallback`` (the official post-processing), an image left with no box keeps the boxes
    that pass the aspect and minimum-side rules only; if none, those that pass the minimum-side
    rule only; if none, nothing. Returns the kept rows of ``boxes`` (same dtype, input order).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    stages = [(max_aspect, scale_range)]
    if fallback:
        stages += [(max_aspect, None), (None, None)]
    for aspect, scales in stages:
        keep = filter_mask(boxes, image_hw, min_side, aspect, scales)
        if keep.any():
            return boxes[keep]
    return boxes[:0]


def downscale(image: np.ndarray, max_size: Optional[int]) -> np.ndarray:
    """Resize so that the longest side is at most ``max_size`` (aspect kept, area filter)."""
    h, w = image.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return image
    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def selective_search(image_rgb: np.ndarray, mode: str = "fast") -> np.ndarray:
    """Raw OpenCV selective search on ``image_rgb`` as float64 boxes (x1, y1, x2, y2)."""
    if mode not in SS_MODES:
        raise ValueError(f"selective-search mode {mode!r} is not one of {SS_MODES}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # OpenCV expects BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    else:
        ss.switchToSingleStrategy()
    rects = ss.process()
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float64)
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    rects[:, 2:] += rects[:, :2]
    return rects


def raw_proposals(image: np.ndarray, max_size: Optional[int] = DEFAULT_MAX_SIZE, mode: str = "fast",
                  image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Selective-search boxes of ``image`` before the filter: computed on the copy downscaled to
    ``max_size``, mapped to the original (H, W) pixels (``image_hw``, default ``image``'s size),
    rounded to whole pixels, clipped and de-duplicated (float64, sorted)."""
    h, w = image_hw or image.shape[:2]
    small = downscale(image, max_size)
    boxes = selective_search(small, mode)
    boxes *= np.array([w / small.shape[1], h / small.shape[0]] * 2)
    boxes = np.rint(boxes)
    np.clip(boxes, 0, [w, h, w, h], out=boxes)
    return np.unique(boxes, axis=0)


def generate_proposals(
    image: np.ndarray,
    max_size: Optional[int] = DEFAULT_MAX_SIZE,
    mode: str = "fast",
    min_side: float = 32,
    max_boxes: Optional[int] = None,
    fallback: bool = True,
    image_hw: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Filtered selective-search proposals of an RGB image, in its original pixels.

    ``image_hw``: the original (H, W) when ``image`` is a reduced copy of the whole image (see
    :func:`~soco_d2.data.image_list.read_image_reduced`); default: ``image``'s own size.

    Returns a float32 (N, 4) array of whole-pixel boxes (x1, y1, x2, y2), sorted, unique,
    clipped to the image and passing :func:`filter_boxes` (with its fallback). ``max_boxes``
    caps N with a deterministic uniform random subset.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    h, w = image_hw or image.shape[:2]
    if min(h, w) < 2 or min(h, w) < min_side:
        return np.zeros((0, 4), np.float32)  # no box can pass the minimum-side rule
    boxes = raw_proposals(image, max_size, mode, image_hw)
    boxes = filter_boxes(boxes, (h, w), min_side=min_side, fallback=fallback)
    if max_boxes is not None and len(boxes) > max_boxes:
        seed = zlib.crc32(boxes.astype(np.int64).tobytes())
        pick = np.random.default_rng(seed).choice(len(boxes), size=max_boxes, replace=False)
        boxes = boxes[np.sort(pick)]
    return boxes.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Generation over a dataset
# ------------------------------------------------------------------------------------------------


@dataclass
class GenerationSummary:
    """What one :func:`run_generation` call did."""

    images_total: int = 0  # images of this shard
    images_skipped: int = 0  # already in the (partial) output when resuming
    images_done: int = 0  # computed and written by this call
    boxes_total: int = 0
    boxes_min: int = 0
    zero_box_images: int = 0
    unreadable: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def boxes_mean(self) -> float:
        return self.boxes_total / self.images_done if self.images_done else 0.0

    @property
    def images_per_second(self) -> float:
        return (self.images_done + len(self.unreadable)) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"images done: {self.images_done} (of {self.images_total} in this shard, "
            f"{self.images_skipped} already done), boxes per image: mean {self.boxes_mean:.1f}, "
            f"min {self.boxes_min}; images with zero boxes: {self.zero_box_images}; "
            f"unreadable images skipped: {len(self.unreadable)} (recorded in the file); "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s"
        )


def _init_worker() -> None:
    """Initializer of the pool's processes: OpenCV single-threaded (one process per core;
    OpenCV's own threads would oversubscribe), and the job's signals left to the main process,
    which stops the run cleanly and then ends the workers itself (see
    :func:`~soco_d2.utils.signals.ignore_preemption_signals`). A worker killed by a signal
    sent to the whole process group could otherwise die holding a lock of the task queue and
    leave the main process waiting for it forever."""
    from soco_d2.utils.watchdog import dump_stacks_on_request

    cv2.setNumThreads(1)
    ignore_preemption_signals()
    dump_stacks_on_request()


class ProposalWorkerDied(RuntimeError):
    """A process of the proposal pool ended abnormally (most often: the out-of-memory killer)."""


def _pool_results(tasks, workers: int, watcher):
    """``_process_one`` of each task, as they finish, on ``workers`` processes (in this process
    when ``workers`` is 1). Stops once ``watcher`` saw a signal (tasks still running are
    dropped); an exception of a task is raised here, with the worker's traceback.

    :class:`concurrent.futures.ProcessPoolExecutor`, unlike ``multiprocessing.Pool``, notices a
    worker that dies (its task would otherwise never return). On the way out, whatever the
    reason, the workers still running are killed: a task blocked on a stalled read cannot keep
    the process alive (the executor's shutdown would wait for it)."""
    if workers == 1:
        cv2.setNumThreads(1)
        for task in tasks:
            if watcher.received:
                return
            yield _process_one(task)
        return
    before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                                   initializer=_init_worker)
    todo, pending = iter(tasks), {}
    try:
        while not watcher.received:
            while len(pending) < 2 * workers:  # a short queue: a stop drops little work
                task = next(todo, None)
                if task is None:
                    break
                pending[executor.submit(_process_one, task)] = task[0]
            if not pending:
                return
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise ProposalWorkerDied(
                        f"A proposal worker process died while computing {key!r} or another "
                        "image (killed by a signal: most often the kernel's out-of-memory "
                        "killer). Lower --workers or --max-size, or give the job more memory; "
                        "the finished images are kept, continue with --resume.") from None
                yield result
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        for process in set(multiprocessing.active_children()) - before:
            process.kill()
            process.join()


def _process_one(task):
    """Worker body: (key, path or archive member, params, max_pixels) -> (key, boxes uint16 or
    None, (H, W), error or None)."""
    key, path, params, max_pixels = task
    try:
        # JPEGs are decoded at a reduced scale (DCT scaling) that keeps at least twice the
        # search size; decoding only down to the search size itself cost recall in
        # benchmarks/bench_proposals.py.
        max_size = params.get("max_size")
        image, hw = read_image_reduced(path, 2 * max_size if max_size else None, max_pixels)
    except UnreadableImageError as e:
        return key, None, None, e.reason
    try:
        boxes = generate_proposals(image, image_hw=hw, **params)
    except MemoryError:
        return key, None, None, "out of memory in selective search"
    except Exception as e:  # cv2.error or anything else this one image triggers
        return key, None, None, f"selective search failed ({e})"
    return key, boxes, hw, None


def run_generation(
    images: ImageList,
    output: str,
    workers: Optional[int] = None,
    shard: Tuple[int, int] = (0, 1),
    resume: bool = False,
    max_size: Optional[int] = DEFAULT_MAX_SIZE,
    mode: str = "fast",
    min_side: float = 32,
    max_boxes: Optional[int] = None,
    chunk_size: int = 1000,
    progress: bool = True,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    watchdog_timeout: float = 1800.0,
) -> GenerationSummary:
    """Compute the proposals of ``images`` (shard ``(i, n)``: every n-th image from the i-th) into
    the proposals file ``output``, with a pool of ``workers`` processes (default: all cores).

    SIGTERM, SIGUSR1 or SIGINT (to this process or its whole group) stops the run: what is
    finished is written (``output.parts/``) and
    :class:`~soco_d2.utils.signals.Preempted` is raised (exit code 75); ``resume``
    continues. Unreadable images (see :func:`~soco_d2.data.image_list.read_image`; ``max_pixels`` is its
    header-checked pixel limit) are logged, counted and recorded in the file's ``unreadable``
    list. With ``resume`` the images already in ``output`` or in its partial chunks (unreadable
    ones included) are skipped. Results are written in chunks of
    ``chunk_size`` images, so a killed run loses at most the images of one chunk. No result for
    ``watchdog_timeout`` seconds (0: never) ends the run with every thread's stack (see
    :mod:`soco_d2.utils.watchdog`); the finished chunks stay for ``--resume``.
    """
    from tqdm import tqdm

    check_selective_search_available()
    from soco_d2.utils.watchdog import Watchdog, beat

    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard {index}/{count} is invalid: need 0 <= I < N")
    if mode not in SS_MODES:
        raise ValueError(f"selective-search mode {mode!r} is not one of {SS_MODES}")
    params = {"max_size": max_size or None, "mode": mode, "min_side": min_side, "max_boxes": max_boxes}
    metadata = {"generator": "opencv selective search", "opencv": cv2.__version__, **params}
    summary = GenerationSummary()
    start = time.perf_counter()
    shard_ids = range(index, len(images), count)
    summary.images_total = len(shard_ids)
    with PreemptionWatcher() as watcher, Watchdog(watchdog_timeout, "--watchdog-timeout"), \
            ProposalWriter(output, chunk_size=chunk_size, resume=resume, metadata=metadata) as writer:
        tasks = [(images.keys[i], images.source(i), params, max_pixels)
                 for i in shard_ids if images.keys[i] not in writer.done_keys]
        summary.images_skipped = summary.images_total - len(tasks)
        workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks) or 1))
        min_boxes = None
        with contextlib.closing(_pool_results(tasks, workers, watcher)) as results:
            for key, boxes, image_hw, error in tqdm(results, total=len(tasks), disable=not progress,
                                                    desc="proposals", unit="img", smoothing=0.05):
                if error is not None:
                    logger.warning("skipping unreadable image %s: %s", key, error)
                    summary.unreadable.append(key)
                    writer.add_unreadable(key, error)
                else:
                    writer.add(key, boxes, image_hw)
                    summary.images_done += 1
                    summary.boxes_total += len(boxes)
                    summary.zero_box_images += len(boxes) == 0
                    min_boxes = len(boxes) if min_boxes is None else min(min_boxes, len(boxes))
                beat("the next image")
                if watcher.received:
                    break
        summary.boxes_min = min_boxes or 0
        if watcher.received:
            writer.flush()
            summary.seconds = time.perf_counter() - start
            logger.warning("%s received: stopped; %s. The finished images are in %s; continue "
                           "with --resume.", watcher.signal_name, summary.format(), writer.parts_dir)
            raise Preempted(f"proposal generation stopped by {watcher.signal_name}")
    summary.seconds = time.perf_counter() - start
    return summary
