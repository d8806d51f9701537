"""SoCo's views of one image and the proposal boxes that link them.

The sample format is the "SoCo sample" of docs/ARCHITECTURE.md. All geometry follows the
continuous coordinate convention of :mod:`soco_d2.data.augment`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from .augment import ColorAugment, hflip, random_resized_crop_params, resize
from .boxes import crop_boxes, hflip_boxes, jitter_boxes, pad_to_k, sample_k, scale_boxes
from .registry import MAPPER_REGISTRY
from .view_mapper import ViewMapper

__all__ = ["SoCoViewMapper"]

Crop = Tuple[int, int, int, int]  # y0, x0, h, w in original pixels


def _to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@MAPPER_REGISTRY.register()
class SoCoViewMapper(ViewMapper):
    """Builds SoCo's views V1, V2, V3 (and SoCo*'s V4) with K corresponding proposals per pair.

    V1 is the whole image, V2 a random resized crop, V3 another crop (``V3_MODE "independent"``,
    the official code) or V2 downsampled (``"downsample"``), V4 (SoCo*) V2 resized. Each pair
    (V1-V2, V1-V3) draws its own K proposals among those inside both views, retrying the crops up
    to ``MAX_TRIES`` times, and pads each box set to K with its own duplicates; boxes correspond by
    id, never by position. Colour, blur, solarize and cutout follow the official recipe. Every
    rule, the no-proposal fallback and the draw order from ``rng``: docs/SOCO.md.
    """

    sheet_name = "soco"

    def __init__(self, cfg):
        c = cfg.INPUT.SOCO
        self.size1, self.size2, self.size3, self.size4 = (
            int(c.VIEW1_SIZE),
            int(c.VIEW2_SIZE),
            int(c.VIEW3_SIZE),
            int(c.VIEW4_SIZE),
        )
        for key, value in (("VIEW1_SIZE", self.size1), ("VIEW2_SIZE", self.size2), ("VIEW3_SIZE", self.size3)):
            if value < 1:
                raise ValueError(f"INPUT.SOCO.{key} must be a positive size in pixels, got {value}")
        if self.size4 < 0:
            raise ValueError(f"INPUT.SOCO.VIEW4_SIZE must be >= 0 (0 disables V4), got {self.size4}")
        if c.V3_MODE not in ("independent", "downsample"):
            raise ValueError(f"INPUT.SOCO.V3_MODE must be 'independent' or 'downsample', got {c.V3_MODE!r}")
        self.v3_independent = c.V3_MODE == "independent"
        self.crop_scale = tuple(float(v) for v in c.CROP_SCALE)
        self.crop_ratio = tuple(float(v) for v in c.CROP_RATIO)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ValueError(f"INPUT.SOCO.CROP_SCALE must be (min, max) with 0 < min <= max, got {c.CROP_SCALE}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"INPUT.SOCO.CROP_RATIO must be (min, max) with 0 < min <= max, got {c.CROP_RATIO}")
        self.k = int(c.NUM_PROPOSALS)
        if self.k < 1:
            raise ValueError(f"INPUT.SOCO.NUM_PROPOSALS must be >= 1, got {self.k}")
        self.max_tries = int(c.MAX_TRIES)
        if self.max_tries < 1:
            raise ValueError(f"INPUT.SOCO.MAX_TRIES must be >= 1, got {self.max_tries}")
        self.jitter_prob, self.jitter_ratio = float(c.JITTER_PROB), float(c.JITTER_RATIO)
        self.flip_prob = float(c.FLIP_PROB)
        self.min_box_size = float(c.MIN_BOX_SIZE)
        self.cutout = bool(c.CUTOUT)
        self.cutout_ratio = tuple(float(v) for v in c.CUTOUT_RATIO)
        self.cutout_prob = float(c.CUTOUT_PROB)
        self.fill = np.clip(np.rint(np.asarray(cfg.MODEL.PIXEL_MEAN, dtype=np.float64)), 0, 255).astype(np.uint8)

        if len(c.COLOR_JITTER) != 4:
            raise ValueError(
                f"INPUT.SOCO.COLOR_JITTER must be (brightness, contrast, saturation, hue), got {c.COLOR_JITTER}"
            )
        for key in ("BLUR_PROB", "SOLARIZE_PROB"):
            if len(c[key]) != 2:
                raise ValueError(f"INPUT.SOCO.{key} must have two entries (V1, V2/V3/V4), got {c[key]}")
        self.color = [
            ColorAugment(
                *c.COLOR_JITTER,
                jitter_prob=c.COLOR_JITTER_PROB,
                grayscale_prob=c.GRAYSCALE_PROB,
                blur_prob=c.BLUR_PROB[i],
                blur_sigma=tuple(c.BLUR_SIGMA),
                solarize_prob=c.SOLARIZE_PROB[i],
            )
            for i in (0, 1)
        ]

    # ------------------------------------------------------------------------------- geometry

    def _crop(self, height: int, width: int, rng: np.random.Generator) -> Crop:
        return random_resized_crop_params(height, width, self.crop_scale, self.crop_ratio, rng)

    def _sample_crops(self, proposals: np.ndarray, keep1: np.ndarray, height: int, width: int, rng):
        """Crops of V2 (and V3 when independent) with the candidate proposals of each pair."""
        need = max(self.k // 2, 1)
        for attempt in range(self.max_tries):
            crop2 = self._crop(height, width, rng)
            boxes2, keep2 = crop_boxes(proposals, crop2, self.min_box_size)
            common2 = np.flatnonzero(keep1 & keep2)
            crop3 = boxes3 = common3 = None
            if self.v3_independent:
                crop3 = self._crop(height, width, rng)
                boxes3, keep3 = crop_boxes(proposals, crop3, self.min_box_size)
                common3 = np.flatnonzero(keep1 & keep3)
            enough = len(common2) >= need and (common3 is None or len(common3) >= need)
            if enough or len(proposals) == 0:
                break
            need = max(need // 2, 1)  # official: halve the requirement, but never below one box
        return (crop2, boxes2, common2), (crop3, boxes3, common3)

    def _pair(self, boxes1, crop, boxes_b, common, num_props, height, width, rng):
        """K boxes in V1 (original pixels) and in the crop (crop pixels), each side with its ids.

        Both sides list the chosen proposals once, in the same order, then padding duplicates
        drawn independently per side (as the official code pads each box set separately).
        """
        chosen = sample_k(len(common), self.k, rng)
        if len(chosen):
            idx = common[chosen]
            a, b, ids = boxes1[idx], boxes_b[idx], idx.astype(np.int64)
        else:
            y0, x0, h, w = crop
            a = np.array([[x0, y0, x0 + w, y0 + h]], np.float32)
            b = np.array([[0, 0, w, h]], np.float32)
            ids = np.array([num_props], np.int64)
        a = jitter_boxes(a, self.jitter_prob, self.jitter_ratio, rng)
        a, _ = crop_boxes(a, (0, 0, height, width), min_size=0)
        take_a = pad_to_k(len(ids), self.k, rng)
        take_b = pad_to_k(len(ids), self.k, rng)
        return a[take_a], ids[take_a], b[take_b], ids[take_b]

    # ------------------------------------------------------------------------------- pixels

    def _cutout(self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Fill a random square inside each box (probability ``CUTOUT_PROB``) with the pixel mean."""
        n = len(boxes)
        apply = rng.random(n) < self.cutout_prob
        area = rng.uniform(*self.cutout_ratio, size=n)
        centre = rng.random((n, 2))
        if not apply.any():
            return img
        img = img.copy()
        h, w = img.shape[:2]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        half = np.sqrt(area * bw * bh) / 2
        cx, cy = boxes[:, 0] + centre[:, 0] * bw, boxes[:, 1] + centre[:, 1] * bh
        x1 = np.clip(np.rint(cx - half), 0, w).astype(int)
        x2 = np.clip(np.rint(cx + half), 0, w).astype(int)
        y1 = np.clip(np.rint(cy - half), 0, h).astype(int)
        y2 = np.clip(np.rint(cy + half), 0, h).astype(int)
        for i in np.flatnonzero(apply):  # at most K boxes
            img[y1[i] : y2[i], x1[i] : x2[i]] = self.fill
        return img

    @staticmethod
    def _unique_boxes(boxes: np.ndarray, ids: np.ndarray) -> np.ndarray:
        _, first = np.unique(ids, return_index=True)
        return boxes[np.sort(first)]

    # ------------------------------------------------------------------------------- sample

    def __call__(self, image: np.ndarray, proposals, rng: np.random.Generator) -> Dict:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SoCoViewMapper expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        proposals = np.zeros((0, 4), np.float32) if proposals is None else np.asarray(proposals, np.float32)
        proposals = proposals.reshape(-1, 4)
        num_props = len(proposals)
        boxes1, keep1 = crop_boxes(proposals, (0, 0, height, width), self.min_box_size)

        (crop2, boxes2, common2), (crop3, boxes3, common3) = self._sample_crops(
            proposals, keep1, height, width, rng
        )
        a12, ids1_12, b2, ids2 = self._pair(boxes1, crop2, boxes2, common2, num_props, height, width, rng)
        if self.v3_independent:
            a13, ids1_13, b3, ids3 = self._pair(boxes1, crop3, boxes3, common3, num_props, height, width, rng)

        flip1, flip2, flip3, flip4 = rng.random(4) < self.flip_prob
        if not self.v3_independent:
            flip3 = flip2

        # V1: whole image.
        s1 = self.size1
        img1 = resize(image, (s1, s1))
        sx1, sy1 = s1 / width, s1 / height

        def v1_boxes(a):
            a = scale_boxes(a, sx1, sy1)
            return hflip_boxes(a, s1) if flip1 else a

        if flip1:
            img1 = hflip(img1)

        # V2: crop of the original image.
        y0, x0, h2, w2 = crop2
        s2 = self.size2
        img2_geom = resize(image[y0 : y0 + h2, x0 : x0 + w2], (s2, s2))
        box2 = scale_boxes(b2, s2 / w2, s2 / h2)
        img2 = hflip(img2_geom) if flip2 else img2_geom
        box2_view = hflip_boxes(box2, s2) if flip2 else box2

        # V3.
        s3 = self.size3
        if self.v3_independent:
            y0, x0, h3, w3 = crop3
            img3 = resize(image[y0 : y0 + h3, x0 : x0 + w3], (s3, s3))
            box3 = scale_boxes(b3, s3 / w3, s3 / h3)
            if flip3:
                img3, box3 = hflip(img3), hflip_boxes(box3, s3)
        else:
            img3 = resize(img2, (s3, s3))
            box3 = scale_boxes(box2_view, s3 / s2, s3 / s2)
            a13, ids1_13, ids3 = a12, ids1_12, ids2

        views = {"v1": img1, "v2": img2, "v3": img3}
        pairs = [
            ("v2", v1_boxes(a12), ids1_12, box2_view, ids2),
            ("v3", v1_boxes(a13), ids1_13, box3, ids3),
        ]

        # V4 (SoCo*): V2 downsampled.
        if self.size4 > 0:
            s4 = self.size4
            img4 = resize(img2_geom, (s4, s4))
            box4 = scale_boxes(box2, s4 / s2, s4 / s2)
            if flip4:
                img4, box4 = hflip(img4), hflip_boxes(box4, s4)
            views["v4"] = img4
            pairs.append(("v4", pairs[0][1], ids1_12, box4, ids2))

        views["v1"] = self.color[0](views["v1"], rng)
        for name in ("v2", "v3", "v4"):
            if name in views:
                views[name] = self.color[1](views[name], rng)

        if self.cutout:
            views["v2"] = self._cutout(views["v2"], self._unique_boxes(box2_view, ids2), rng)
            views["v3"] = self._cutout(views["v3"], self._unique_boxes(box3, ids3), rng)

        flips = {"v1": flip1, "v2": flip2, "v3": flip3, "v4": flip4}
        return {
            "images": {name: _to_chw_tensor(img) for name, img in views.items()},
            "flips": {name: torch.tensor(bool(flips[name])) for name in views},
            "pairs": [
                {
                    "a": "v1",
                    "b": name,
                    "boxes_a": torch.from_numpy(np.ascontiguousarray(boxes_a, dtype=np.float32)),
                    "boxes_b": torch.from_numpy(np.ascontiguousarray(boxes_b, dtype=np.float32)),
                    "ids_a": torch.from_numpy(ids_a.copy()),
                    "ids_b": torch.from_numpy(ids_b.copy()),
                }
                for name, boxes_a, ids_a, boxes_b, ids_b in pairs
            ],
        }

    def view_sheet(self, image: np.ndarray, rng: np.random.Generator, panel: int = 224,
                   proposals=None, filtered=None) -> np.ndarray:
        """The image with its proposals (kept / filtered), then V1..V4 with their boxes
        (:func:`~soco_d2.data.visualize.soco_sheet`)."""
        from .visualize import soco_sheet

        filtered = np.zeros((0, 4), np.float32) if filtered is None else filtered
        return soco_sheet(image, proposals, filtered, self(image, proposals, rng), self.min_box_size, panel)
