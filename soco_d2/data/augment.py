"""Image augmentations on ``uint8`` HxWx3 RGB numpy arrays.

Every random choice comes from a ``numpy.random.Generator`` passed by the caller, so a sample's
views are a function of its seed only (see docs/ARCHITECTURE.md, "Randomness").

The operations follow torchvision's definitions (``RandomResizedCrop``, ``ColorJitter``,
``RandomGrayscale``, ``GaussianBlur``, ``RandomSolarize``) but run on numpy/OpenCV arrays:
torchvision's transforms draw from torch's global generator and work on PIL images or tensors,
which would break the per-sample randomness contract and cost a conversion per op.

Coordinate convention: pixel ``(i, j)`` covers the continuous square ``[j, j+1) x [i, i+1)``;
a box ``x1, y1, x2, y2`` lives in that continuous space. :func:`resize` maps an ``in``-pixel
axis onto an ``out``-pixel axis by the factor ``out / in`` in that space (OpenCV's half-pixel
convention), so box coordinates are resized by multiplying them by ``out / in``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "random_resized_crop_params",
    "resize",
    "hflip",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "to_grayscale",
    "gaussian_blur",
    "solarize",
    "ColorAugment",
]

# ITU-R 601-2 luma weights, as PIL's "L" mode and torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> Tuple[int, int, int, int]:
    """Crop ``(y0, x0, h, w)`` of torchvision's ``RandomResizedCrop.get_params``.

    Ten attempts with area fraction ``U(scale)`` and a log-uniform aspect ratio ``w / h`` in
    ``ratio``; if none fits, a centre crop of the whole image clamped to the ratio range.
    The crop is always at least 1x1 and inside the image.
    """
    if height < 1 or width < 1:
        raise ValueError(f"random_resized_crop_params: empty image ({height}x{width})")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0, x0, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = min(height, max(1, int(round(w / min(ratio)))))
    elif in_ratio > max(ratio):
        h = height
        w = min(width, max(1, int(round(h * max(ratio)))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize ``img`` to ``size = (out_h, out_w)`` (bilinear, anti-aliased when shrinking > 2x).

    Up to a 2x reduction, plain bilinear (``cv2.INTER_LINEAR``): its two taps per axis still
    touch every input pixel. Beyond, bilinear alone aliases (it skips pixels), so the image is
    first resized bilinearly to ``k`` times the output size (``k = ceil(factor / 2)``, so that
    stage shrinks at most 2x) and then averaged over exact ``k x k`` blocks (``cv2.INTER_AREA``'s
    integer fast path). This stays within ~1.5 grey levels of true area averaging (the
    anti-aliasing that PIL's bilinear resize in the official SoCo pipeline also does) at a third
    of its cost. Both stages use this module's continuous coordinate convention: boxes scale by
    ``out / in`` per axis. ``img`` may be a slice (a crop) of a larger array.
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = img.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return np.ascontiguousarray(img)
    factor = max(in_h / out_h, in_w / out_w)
    if factor <= 2:
        return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    k = int(math.ceil(factor / 2))
    mid = cv2.resize(img, (out_w * k, out_h * k), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(mid, (out_w, out_h), interpolation=cv2.INTER_AREA)


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right (a contiguous copy)."""
    return cv2.flip(img, 1)


def _gray(img: np.ndarray) -> np.ndarray:
    """Luma of a float32 HxWx3 image, HxW."""
    return img @ GRAY_WEIGHTS


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """``clip(img * factor)`` on a float32 image in [0, 255] (torchvision's definition)."""
    return np.clip(img * np.float32(factor), 0.0, 255.0)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean luma of the image: ``clip(f * img + (1 - f) * mean(gray))``."""
    mean = np.float32(_gray(img).mean())
    return np.clip(img * np.float32(factor) + (1.0 - np.float32(factor)) * mean, 0.0, 255.0)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the per-pixel luma: ``clip(f * img + (1 - f) * gray)``."""
    f = np.float32(factor)
    return np.clip(img * f + ((1.0 - f) * _gray(img))[..., None], 0.0, 255.0)


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue by ``shift`` turns (``shift`` in [-0.5, 0.5], torchvision's unit).

    Like torchvision's PIL path (the official SoCo pipeline): the image is rounded to uint8 and
    converted to 8-bit HSV with OpenCV's ``*_FULL`` conversions, whose hue byte has PIL's "HSV"
    scale (255 is a full turn); the hue byte is shifted by ``round(shift * 255)`` modulo 256 (as
    torchvision's ``np_h += uint8(shift * 255)``, rounded rather than truncated) and converted
    back. About 3x faster than a float32 HSV round trip; hues are exact to about 1/255 turn.
    Takes and returns float32 arrays in [0, 255].
    """
    step = int(round(shift * 255)) % 256
    if step == 0:
        return img
    hsv = cv2.cvtColor(np.rint(img).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(step)  # wraps modulo 256
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL).astype(np.float32)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """3-channel grayscale of a uint8 RGB image (luma weights 0.299, 0.587, 0.114)."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels.

    The kernel size is OpenCV's automatic choice for uint8 images (about +-3 sigma, e.g. 13 taps
    at sigma 2), independent of the image size, like the PIL ``GaussianBlur(radius=sigma)`` of
    the official SoCo code (BYOL's fixed 23-tap kernel at 224 px is the same filter truncated
    further out, where the Gaussian weights are below 1e-3). Borders are reflected.
    """
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma))


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert every value ``>= threshold`` (PIL ``ImageOps.solarize``, torchvision ``solarize``)."""
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _jitter_range(name: str, value: float, center: float, bound: Tuple[float, float]):
    """torchvision ColorJitter's ``[center - value, center + value]`` clamped to ``bound``."""
    if value < 0:
        raise ValueError(f"ColorAugment: {name} must be non-negative, got {value}")
    lo, hi = max(bound[0], center - value), min(bound[1], center + value)
    return None if value == 0 else (lo, hi)


class ColorAugment:
    """BYOL's colour pipeline: jitter (random order), grayscale, Gaussian blur, solarize.

    Args:
        brightness, contrast, saturation: jitter strengths ``s``; factors ``U(max(0, 1-s), 1+s)``.
        hue: hue jitter ``s <= 0.5``; shift ``U(-s, s)`` turns.
        jitter_prob: probability of applying the colour jitter (its four ops in a random order).
        grayscale_prob, blur_prob, solarize_prob: probabilities of the other ops, in that order.
        blur_sigma: range of the blur's standard deviation in pixels.
        solarize_threshold: values ``>= threshold`` are inverted.

    Calling ``aug(img, rng)`` on a uint8 HxWx3 RGB array returns a new uint8 array.
    Jitter runs in float32 (clipped to [0, 255] after every op, rounded once at the end).
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 1.0,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.0,
        solarize_threshold: int = 128,
    ):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorAugment: hue must be in [0, 0.5], got {hue}")
        for name, p in (
            ("jitter_prob", jitter_prob),
            ("grayscale_prob", grayscale_prob),
            ("blur_prob", blur_prob),
            ("solarize_prob", solarize_prob),
        ):
            if not 0 <= p <= 1:
                raise ValueError(f"ColorAugment: {name} must be in [0, 1], got {p}")
        inf = float("inf")
        self.brightness = _jitter_range("brightness", brightness, 1.0, (0.0, inf))
        self.contrast = _jitter_range("contrast", contrast, 1.0, (0.0, inf))
        self.saturation = _jitter_range("saturation", saturation, 1.0, (0.0, inf))
        self.hue = _jitter_range("hue", hue, 0.0, (-0.5, 0.5))
        self.jitter_prob = jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_prob = solarize_prob
        self.solarize_threshold = solarize_threshold

    def jitter(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Colour jitter with fresh factors, ops in a random order (torchvision ColorJitter)."""
        ops = (
            (self.brightness, adjust_brightness),
            (self.contrast, adjust_contrast),
            (self.saturation, adjust_saturation),
            (self.hue, adjust_hue),
        )
        order = rng.permutation(4)
        factors = [None if r is None else rng.uniform(r[0], r[1]) for r, _ in ops]
        out = img.astype(np.float32)
        for i in order:
            if factors[i] is not None:
                out = ops[i][1](out, factors[i])
        return np.rint(out).astype(np.uint8)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.jitter_prob:
            img = self.jitter(img, rng)
        if rng.random() < self.grayscale_prob:
            img = to_grayscale(img)
        if rng.random() < self.blur_prob:
            img = gaussian_blur(img, rng.uniform(*self.blur_sigma))
        if rng.random() < self.solarize_prob:
            img = solarize(img, self.solarize_threshold)
        return img

    def __repr__(self) -> str:
        return (
            f"ColorAugment(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, jitter_prob={self.jitter_prob}, "
            f"grayscale_prob={self.grayscale_prob}, blur_prob={self.blur_prob}, "
            f"blur_sigma={self.blur_sigma}, solarize_prob={self.solarize_prob})"
        )
