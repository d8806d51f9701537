"""Scale-aware RoIAlign over FPN levels P2-P5.

Each box goes to a level by ``MODEL.SOCO.LEVEL_ASSIGNMENT``: ``"official"`` (the official SoCo
code's rule on integer corners, ``<=`` thresholds 48 / 96 / 192) or ``"torchvision"`` (the FPN
paper's rule of torchvision's ``LevelMapper``); the two disagree on 1.55% of SoCo's boxes
(BENCHMARKS.md). :meth:`ScaleAwareRoIPooler.forward` pools each box on its level only,
:meth:`ScaleAwareRoIPooler.pool_all_levels` every box on every level (the faithful head mode).
RoIAlign is ``torchvision.ops.roi_align(aligned=True)``, once per level: torchvision's
``MultiScaleRoIAlign`` always uses ``aligned=False`` (half a cell off). The rules, the scales and
why: docs/SOCO.md, "Box levels" and "Pooling".
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from soco_d2.utils.torchvision_internals import LevelMapper

LEVEL_ASSIGNMENTS = ("official", "torchvision")


def official_box_levels(boxes: Tensor, boundaries, flipped: Optional[Tensor] = None) -> Tensor:
    """Level index (0 = the first map) of each box of ``boxes`` (..., 4), flattened, by the
    official SoCo rule: corners truncated to integers, ``s = sqrt((x2 - x1 + 1) (y2 - y1 + 1))``,
    level = the first ``l`` with ``s <= boundaries[l]``, else the last level (``len(boundaries)``).
    ``boundaries``: a sequence of numbers, or a tensor on the boxes' device (no copy from the
    host: the pooler keeps its boundaries as such a buffer).

    The official code truncates the corners before the horizontal flip; ``flipped`` (a bool per
    leading index of ``boxes``, e.g. ``(N,)`` for ``(N, K, 4)``) marks boxes given after a flip,
    whose x corners are then rounded up: ``trunc(S - x) = S - ceil(x)`` for a view of width S.
    """
    b = boxes.float()
    x, y = b[..., 0::2], b[..., 1::2]
    if flipped is not None:
        flip = flipped.to(b.device, torch.bool).reshape(flipped.shape + (1,) * (b.dim() - flipped.dim()))
        x = torch.where(flip, x.ceil(), x.trunc())
    else:
        x = x.trunc()
    y = y.trunc()
    side = ((x[..., 1] - x[..., 0] + 1) * (y[..., 1] - y[..., 0] + 1)).sqrt().reshape(-1)
    if torch.is_tensor(boundaries):
        bounds = boundaries.to(side.dtype)
    else:
        bounds = torch.tensor(boundaries, dtype=side.dtype, device=side.device)
    # searchsorted(right=False) = number of boundaries strictly below s = first l with s <= b_l.
    return torch.searchsorted(bounds, side.contiguous(), right=False)


class ScaleAwareRoIPooler(nn.Module):
    """Pool ``(N, K, 4)`` boxes from a list of FPN maps ``[P_min .. P_max]``.

    Args:
        output_size: side of the pooled feature (7).
        sampling_ratio: RoIAlign sampling points per bin; 0 means adaptive.
        canonical_box_size, canonical_level: a box of side ``canonical_box_size`` pixels goes
            to ``canonical_level``.
        min_level, max_level: the levels of the first and last feature map (P2, P5).
    """

    def __init__(
        self,
        output_size: int = 7,
        sampling_ratio: int = 0,
        canonical_box_size: int = 96,
        canonical_level: int = 4,
        min_level: int = 2,
        max_level: int = 5,
        level_assignment: str = "official",
    ):
        super().__init__()
        if level_assignment not in LEVEL_ASSIGNMENTS:
            raise ValueError(
                f"MODEL.SOCO.LEVEL_ASSIGNMENT = {level_assignment!r}; use one of {list(LEVEL_ASSIGNMENTS)}."
            )
        self.level_assignment = level_assignment
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0 = adaptive), got {sampling_ratio}.")
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio if sampling_ratio > 0 else -1
        self.min_level = min_level
        self.num_levels = max_level - min_level + 1
        self.level_mapper = LevelMapper(
            min_level, max_level, canonical_scale=canonical_box_size, canonical_level=canonical_level
        )
        self.boundaries = [
            canonical_box_size * 2.0 ** (level + 1 - canonical_level) for level in range(min_level, max_level)
        ]
        # On the model's device, so that assigning levels copies nothing from the host.
        self.register_buffer("level_boundaries", torch.tensor(self.boundaries), persistent=False)

    def assign_levels(self, boxes: Tensor, flipped: Optional[Tensor] = None) -> Tensor:
        """Index (0 = ``min_level``) of the level each of the ``(..., 4)`` boxes is pooled on,
        flattened, by ``level_assignment`` (``flipped``: see :func:`official_box_levels`)."""
        if self.level_assignment == "official":
            return official_box_levels(boxes, self.level_boundaries, flipped)
        return self.level_mapper([boxes.reshape(-1, 4).float()])

    def feature_scales(self, features: Sequence[Tensor], image_size: Tuple[int, int]) -> List[float]:
        """Spatial scale of each map (feature size / view size, rounded to a power of two)."""
        if len(features) != self.num_levels:
            raise ValueError(
                f"Expected {self.num_levels} feature maps (P{self.min_level}.."
                f"P{self.min_level + self.num_levels - 1}), got {len(features)}."
            )
        scales = []
        for i, f in enumerate(features):
            scale = 2.0 ** round(math.log2(f.shape[-2] / image_size[0]))
            expected = 2.0 ** -(self.min_level + i)
            if scale != expected:
                raise ValueError(
                    f"Feature map {i} has size {tuple(f.shape[-2:])} for a view of {tuple(image_size)}: "
                    f"stride {1 / scale:g}, expected {1 / expected:g} for P{self.min_level + i}."
                )
            scales.append(scale)
        return scales

    def level_plan(self, boxes: Tensor, flipped: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(order, counts)`` for ``boxes`` (N, K, 4): the flattened boxes sorted by level and the
        number of boxes per level. Pass it to :meth:`forward` (with ``counts`` as a list) to share
        one plan between networks and read all counts of a step with a single host sync."""
        levels = self.assign_levels(boxes, flipped)
        order = torch.argsort(levels, stable=True)
        # Not bincount: on a GPU it reads the largest value on the host.
        counts = torch.zeros(self.num_levels, dtype=torch.long, device=levels.device)
        return order, counts.scatter_add_(0, levels, torch.ones_like(levels))

    def forward(
        self,
        features: Sequence[Tensor],
        boxes: Tensor,
        image_size: Tuple[int, int],
        plan: Optional[Tuple[Tensor, List[int]]] = None,
    ) -> Tensor:
        """Pool ``boxes`` (N, K, 4; x1, y1, x2, y2 in view pixels) from ``features`` (N images).

        ``plan``: ``(order, counts)`` from :meth:`level_plan` for these boxes (computed here when
        omitted, at the cost of one host sync). Returns ``(N * K, C, S, S)``, image-major (box
        ``k`` of image ``n`` at row ``n * K + k``).
        """
        features = list(features)
        scales = self.feature_scales(features, image_size)
        n, k = boxes.shape[:2]
        if boxes.shape != (n, k, 4) or n != features[0].shape[0]:
            raise ValueError(
                f"boxes must be (N, K, 4) with N = {features[0].shape[0]} images; got {tuple(boxes.shape)}."
            )
        # Boxes stay fp32; a lower-precision map is cast up per level, as autocast's roi_align
        # and the official code do.
        flat = boxes.reshape(-1, 4).float()
        batch_index = torch.arange(n, device=boxes.device, dtype=flat.dtype).repeat_interleave(k)
        rois = torch.cat([batch_index[:, None], flat], dim=1)

        if plan is None:
            order, counts = self.level_plan(flat)
            counts = counts.tolist()  # host sync
        else:
            order, counts = plan
        pooled = [
            roi_align(
                feat.float(), level_rois, self.output_size, spatial_scale=scale,
                sampling_ratio=self.sampling_ratio, aligned=True,
            )
            for feat, level_rois, scale, count in zip(features, rois[order].split(counts), scales, counts)
            if count > 0
        ]
        if not pooled:
            c = features[0].shape[1]
            return features[0].new_zeros((0, c) + self.output_size)
        pooled = torch.cat(pooled)
        # Undo the sort by level: row order[i] of the result is row i of ``pooled``.
        return torch.empty_like(pooled).index_copy_(0, order, pooled)


    def pool_all_levels(self, features: Sequence[Tensor], boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
        """Pool every box of ``boxes`` (N, K, 4; view pixels) on every map of ``features``, as the
        official code: returns ``(L, N * K, C, S, S)``, level-major, image-major within a level.

        Each map is scaled by its exact size ratio to the view, per axis (``image_size`` = (H, W)).
        """
        features = list(features)
        if len(features) != self.num_levels:
            raise ValueError(
                f"Expected {self.num_levels} feature maps (P{self.min_level}.."
                f"P{self.min_level + self.num_levels - 1}), got {len(features)}."
            )
        n, k = boxes.shape[:2]
        if boxes.shape != (n, k, 4) or n != features[0].shape[0]:
            raise ValueError(
                f"boxes must be (N, K, 4) with N = {features[0].shape[0]} images; got {tuple(boxes.shape)}."
            )
        flat = boxes.reshape(-1, 4).float()
        batch_index = torch.arange(n, device=boxes.device, dtype=flat.dtype).repeat_interleave(k)[:, None]
        height, width = image_size
        pooled = []
        corners = flat.view(-1, 2, 2)  # (x, y) of both corners
        for feat in features:
            # x by the width ratio, y by the height ratio (Python numbers: no copy to the device)
            scaled = torch.stack([corners[..., 0] * (feat.shape[-1] / width),
                                  corners[..., 1] * (feat.shape[-2] / height)], dim=-1)
            rois = torch.cat([batch_index, scaled.view(-1, 4)], dim=1)
            pooled.append(
                roi_align(
                    feat.float(), rois, self.output_size, spatial_scale=1.0,
                    sampling_ratio=self.sampling_ratio, aligned=True,
                )
            )
        return torch.stack(pooled)


def build_soco_pooler(cfg) -> ScaleAwareRoIPooler:
    """The pooler of ``cfg.MODEL.ROI_BOX_HEAD`` with SoCo's scale-aware assignment."""
    return ScaleAwareRoIPooler(
        output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        canonical_box_size=cfg.MODEL.SOCO.CANONICAL_BOX_SIZE,
        canonical_level=cfg.MODEL.SOCO.CANONICAL_LEVEL,
        level_assignment=cfg.MODEL.SOCO.LEVEL_ASSIGNMENT,
    )
