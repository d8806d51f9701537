"""Vectorised box bookkeeping for view construction.

Boxes are float32 ``(N, 4)`` arrays of ``x1, y1, x2, y2`` in continuous pixel coordinates
(pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, see :mod:`soco_d2.data.augment`), so a box
``[0, 0, W, H]`` is a whole ``W x H`` image and its width is ``x2 - x1`` (the official SoCo code
used inclusive ``x2 = x1 + w - 1``, one pixel short). Crops are ``(y0, x0, h, w)`` tuples as
returned by :func:`~soco_d2.data.augment.random_resized_crop_params`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["jitter_boxes", "crop_boxes", "scale_boxes", "hflip_boxes", "sample_k", "pad_to_k"]


def jitter_boxes(boxes: np.ndarray, prob: float, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """SoCo's box jitter: each box, with probability ``prob``, becomes

    ``x1 += r1 * w``, ``y1 += r2 * h``, ``w *= 1 + r3``, ``h *= 1 + r4`` (then ``x2 = x1 + w``,
    ``y2 = y1 + h``), with four independent ``r ~ U(-ratio, ratio)`` per box.

    This is the official code's ``jitter_props``; the paper writes the same update with one
    symbol ``r`` (``w + r * w = w * (1 + r)``). Draws: ``rng.random(N)`` (which boxes), then
    ``rng.uniform(-ratio, ratio, (N, 4))`` (columns r1..r4). Returns a new float32 array; the
    result may leave the view, callers clip it.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    n = len(boxes)
    apply = rng.random(n) < prob
    r = rng.uniform(-ratio, ratio, size=(n, 4)).astype(np.float32)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    x1 = boxes[:, 0] + r[:, 0] * w
    y1 = boxes[:, 1] + r[:, 1] * h
    jittered = np.stack([x1, y1, x1 + w * (1 + r[:, 2]), y1 + h * (1 + r[:, 3])], axis=1)
    return np.where(apply[:, None], jittered, boxes).astype(np.float32)


def crop_boxes(
    boxes: np.ndarray, crop: Sequence[int], min_size: float = 1.0
) -> Tuple[np.ndarray, np.ndarray]:
    """Intersect boxes with the crop ``(y0, x0, h, w)`` and express them in crop coordinates.

    Returns ``(cropped, keep)``: ``cropped`` holds every input box clipped and shifted (float32,
    same length as ``boxes``), ``keep`` marks the boxes whose intersection with the crop has a
    positive area and is at least ``min_size`` wide and tall (in the input's pixels). The
    official code kept any positive overlap, including one-pixel slivers that carry no object;
    ``min_size=0`` reproduces it.
    """
    y0, x0, h, w = crop
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    lo = np.array([x0, y0, x0, y0], dtype=np.float32)
    hi = np.array([x0 + w, y0 + h, x0 + w, y0 + h], dtype=np.float32)
    cropped = np.clip(boxes, lo, hi) - lo
    bw = cropped[:, 2] - cropped[:, 0]
    bh = cropped[:, 3] - cropped[:, 1]
    keep = (bw > 0) & (bh > 0) & (bw >= min_size) & (bh >= min_size)
    return cropped, keep


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Multiply x coordinates by ``sx`` and y coordinates by ``sy`` (a resize by ``out / in``)."""
    return (np.asarray(boxes, dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(
        np.float32
    )


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Boxes of the left-right mirror of an image ``width`` pixels wide."""
    boxes = np.asarray(boxes, dtype=np.float32)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1).astype(
        np.float32
    )


def sample_k(num_candidates: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``min(k, num_candidates)`` distinct candidate positions in random order (the official
    ``select_props`` with strategy ``random``). Draws one ``rng.permutation``; with no candidates
    it returns an empty array without drawing and the caller supplies a fallback box."""
    if k < 1:
        raise ValueError(f"sample_k: k must be >= 1, got {k}")
    if num_candidates <= 0:
        return np.zeros(0, np.int64)
    return rng.permutation(num_candidates)[:k].astype(np.int64)


def pad_to_k(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (length ``k``) into ``m`` chosen boxes: ``0 .. m-1`` once each, then ``k - m``
    duplicates drawn with replacement (the official ``pad_bboxs_with_common``).

    The official code pads every box set of a view pair separately, so a caller draws one
    ``pad_to_k`` per box set: the two sides of a pair then share their first ``m`` entries and
    differ in the duplicates. Per-box augmentation (jitter) is applied before padding, so
    duplicates are exact copies, as in the official code. Draws ``rng.integers`` only when
    ``m < k``.
    """
    if k < 1 or not 1 <= m <= k:
        raise ValueError(f"pad_to_k: need 1 <= m <= k, got m={m}, k={k}")
    pad = rng.integers(0, m, size=k - m) if m < k else np.zeros(0, np.int64)
    return np.concatenate([np.arange(m, dtype=np.int64), pad.astype(np.int64)])
