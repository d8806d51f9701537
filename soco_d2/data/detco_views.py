"""DetCo's views: two global views (MoCo v2) and two sets of 3x3 jigsaw patches (PIRL).

Sample (``S = INPUT.DETCO.GLOBAL_SIZE``, ``P = INPUT.DETCO.PATCH_SIZE``, ``G = INPUT.DETCO.GRID``)::

    {"global":     uint8 2 x 3 x S x S,          # view 0 -> query encoder, view 1 -> key encoder
     "local":      uint8 2 x G*G x 3 x P x P,    # patch set 0 -> query, set 1 -> key; shuffled
     "local_perm": int64 2 x G*G}                # cell index (row-major) of each patch

A patch set follows the paper's order (DetCo, Sec. 3.4): random crop of at least
``LOCAL_CROP_SCALE[0]`` of the image resized to ``LOCAL_CROP_SIZE`` (255), flip, a ``G x G`` grid of
``255 // G = 85`` px cells, a random ``P = 64`` px crop inside each cell, a random shuffle, and
colour jitter, grayscale and blur with the global views' parameters: one draw for the whole set
(``LOCAL_COLOR "set"``, the paper) or one per patch (``"patch"``, PIRL). The colour runs on the
cut patches rather than on the 255 px crop (57% of the pixels): jitter and grayscale are
pixel-wise (contrast uses the mean over the set's patches), and each patch is blurred on its own,
so no patch sees its neighbours' pixels. ``local_perm[s, j]`` is the cell of
patch ``j``: cell ``c`` covers rows ``(c // G) * 85 ...`` and columns ``(c % G) * 85 ...`` of the
(flipped) resized crop. Every random choice comes from the sample's ``rng``.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np
import torch

from . import augment
from .registry import MAPPER_REGISTRY
from .view_mapper import ViewMapper

__all__ = ["DetCoViewMapper", "PatchSet"]

_AUGMENTS = ("mocov2", "randaugment", "autoaugment")
_LOCAL_COLOR = ("set", "patch")


class PatchSet(NamedTuple):
    """One jigsaw patch set and where it came from (for inspection and tests)."""

    patches: np.ndarray  # uint8 (G*G, P, P, 3), shuffled
    perm: np.ndarray  # int64 (G*G,), cell index of each patch
    crop: Tuple[int, int, int, int]  # (y0, x0, h, w) in the input image
    offsets: np.ndarray  # int64 (G*G, 2): (dy, dx) of each patch inside its cell, by cell
    flipped: bool  # the resized crop was mirrored before the grid was cut


@MAPPER_REGISTRY.register()
class DetCoViewMapper(ViewMapper):
    """Build DetCo's two global views and two jigsaw patch sets from one image.

    ``mapper(image, proposals, rng)``: ``image`` uint8 HxWx3 RGB (any size >= 1x1; small images
    are upsampled), ``proposals`` is ignored. Returns the dict described in the module docstring.
    """

    uses_proposals = False  # DetCo contrasts whole views and patches, not boxes
    sheet_name = "detco"

    def __init__(self, cfg):
        c = cfg.INPUT.DETCO
        self.global_size = int(c.GLOBAL_SIZE)
        self.global_scale = tuple(c.GLOBAL_CROP_SCALE)
        self.ratio = tuple(c.CROP_RATIO)
        self.local_size = int(c.LOCAL_CROP_SIZE)
        self.local_scale = tuple(c.LOCAL_CROP_SCALE)
        self.grid = int(c.GRID)
        self.patch = int(c.PATCH_SIZE)
        self.cell = self.local_size // max(self.grid, 1)
        self.flip_prob = float(c.FLIP_PROB)
        if self.grid < 1 or self.patch < 1 or self.patch > self.cell:
            raise ValueError(
                f"INPUT.DETCO: PATCH_SIZE ({self.patch}) must be in [1, LOCAL_CROP_SIZE // GRID]"
                f" = [1, {self.local_size} // {self.grid} = {self.cell}]; lower PATCH_SIZE or GRID,"
                " or raise LOCAL_CROP_SIZE."
            )
        if c.LOCAL_COLOR not in _LOCAL_COLOR:
            raise ValueError(
                f"INPUT.DETCO.LOCAL_COLOR must be one of {_LOCAL_COLOR}, got {c.LOCAL_COLOR!r}."
            )
        self.local_color = c.LOCAL_COLOR
        b, ct, s, h = c.COLOR_JITTER
        jitter = dict(brightness=b, contrast=ct, saturation=s, hue=h,
                      jitter_prob=c.COLOR_JITTER_PROB, grayscale_prob=c.GRAYSCALE_PROB,
                      blur_sigma=tuple(c.BLUR_SIGMA), solarize_prob=0.0)
        self.color = augment.ColorAugment(blur_prob=c.BLUR_PROB, **jitter)
        # A patch set shares one colour draw: jitter and grayscale run on the stacked patches;
        # the blur (same sigma) runs on each patch so that it does not mix neighbours.
        self.set_color = augment.ColorAugment(blur_prob=0.0, **jitter)
        self.blur_prob = float(c.BLUR_PROB)
        self.blur_sigma = tuple(c.BLUR_SIGMA)
        self.policy = _build_policy(c)
        # Cell origins, row-major: cell k is at (k // G, k % G).
        k = np.arange(self.grid * self.grid)
        self._cell_origin = np.stack([k // self.grid, k % self.grid], axis=1) * self.cell

    # --------------------------------------------------------------------------------------
    def __call__(self, image: np.ndarray, proposals=None, rng: np.random.Generator = None):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"DetCoViewMapper expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}"
            )
        if rng is None:
            raise ValueError("DetCoViewMapper needs the sample's numpy Generator (rng)")
        views = [self.global_view(image, rng) for _ in range(2)]
        sets = [self.patch_set(image, rng) for _ in range(2)]
        glob = np.stack(views).transpose(0, 3, 1, 2)
        local = np.stack([s.patches for s in sets]).transpose(0, 1, 4, 2, 3)
        return {
            "global": torch.from_numpy(np.ascontiguousarray(glob)),
            "local": torch.from_numpy(np.ascontiguousarray(local)),
            "local_perm": torch.from_numpy(np.stack([s.perm for s in sets])),
        }

    # --------------------------------------------------------------------------------------
    def global_view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """MoCo v2 view, uint8 S x S x 3: random resized crop, flip, [policy], colour, blur."""
        h, w = image.shape[:2]
        y0, x0, ch, cw = augment.random_resized_crop_params(h, w, self.global_scale, self.ratio, rng)
        view = augment.resize(image[y0 : y0 + ch, x0 : x0 + cw], (self.global_size,) * 2)
        if rng.random() < self.flip_prob:
            view = augment.hflip(view)
        if self.policy is not None:
            view = _apply_policy(self.policy, view, rng)
        return self.color(view, rng)

    def patch_set(self, image: np.ndarray, rng: np.random.Generator) -> PatchSet:
        """One shuffled set of ``G*G`` jigsaw patches (see the module docstring)."""
        h, w = image.shape[:2]
        crop = augment.random_resized_crop_params(h, w, self.local_scale, self.ratio, rng)
        y0, x0, ch, cw = crop
        big = augment.resize(image[y0 : y0 + ch, x0 : x0 + cw], (self.local_size,) * 2)
        flipped = bool(rng.random() < self.flip_prob)
        if flipped:
            big = augment.hflip(big)
        n = self.grid * self.grid
        offsets = rng.integers(0, self.cell - self.patch + 1, size=(n, 2))
        perm = rng.permutation(n).astype(np.int64)
        p = self.patch
        # Nine basic slices + one stack: ~25x faster than a single fancy-index gather.
        top_left = (self._cell_origin + offsets)[perm].tolist()
        patches = np.stack([big[y : y + p, x : x + p] for y, x in top_left])
        if self.local_color == "set":
            patches = self.set_color(patches.reshape(n * p, p, 3), rng).reshape(n, p, p, 3)
            if rng.random() < self.blur_prob:
                sigma = rng.uniform(*self.blur_sigma)
                patches = np.stack([augment.gaussian_blur(q, sigma) for q in patches])
        else:
            patches = np.stack([self.color(q, rng) for q in patches])
        return PatchSet(patches, perm, crop, offsets.astype(np.int64), flipped)

    def view_sheet(self, image: np.ndarray, rng: np.random.Generator, panel: int = 224,
                   proposals=None, filtered=None) -> np.ndarray:
        """Two global views and two patch sets (:func:`~soco_d2.data.visualize.detco_sheet`)."""
        from .visualize import detco_sheet

        views = [self.global_view(image, rng) for _ in range(2)]
        sets = [self.patch_set(image, rng) for _ in range(2)]
        return detco_sheet(image, views, sets, self.grid, panel)

    def __repr__(self) -> str:
        return (
            f"DetCoViewMapper(global={self.global_size} scale={self.global_scale}, "
            f"local={self.local_size} scale={self.local_scale} grid={self.grid} "
            f"patch={self.patch} color={self.local_color}, policy={self.policy}, {self.color})"
        )


def _build_policy(c):
    """torchvision's RandAugment / AutoAugment (ImageNet policy) for the "AA" models, or None."""
    from torchvision.transforms import v2

    if c.AUGMENT not in _AUGMENTS:
        raise ValueError(f"INPUT.DETCO.AUGMENT must be one of {_AUGMENTS}, got {c.AUGMENT!r}.")
    if c.AUGMENT == "randaugment":
        return v2.RandAugment(num_ops=c.RANDAUGMENT_NUM_OPS, magnitude=c.RANDAUGMENT_MAGNITUDE)
    if c.AUGMENT == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    return None


def _apply_policy(policy, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Run a torchvision auto-augment policy on a uint8 HxWx3 array, seeded from ``rng``.

    torchvision draws its choices from torch's global generator; forking it and seeding it from
    the sample's ``rng`` keeps the view a function of the sample seed (and leaves the caller's
    torch RNG state untouched).
    """
    seed = int(rng.integers(0, 2**63 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = policy(torch.from_numpy(view).permute(2, 0, 1))
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())
