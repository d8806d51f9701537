"""Scale-aware RoIAlign over FPN levels P2-P5: each box is pooled only on the level its size picks.

Level assignment (torchvision's ``LevelMapper``, the FPN paper's eq. 1 with SoCo's constants
``MODEL.SOCO.CANONICAL_BOX_SIZE = 96`` and ``CANONICAL_LEVEL = 4``)::

    s     = sqrt((x2 - x1) * (y2 - y1))            # in pixels of the box's own view
    level = clamp(floor(4 + log2(s / 96) + 1e-6), 2, 5)

so ``s < 48 -> P2``, ``48 <= s < 96 -> P3``, ``96 <= s < 192 -> P4``, ``s >= 192 -> P5``.
The official SoCo code measures ``s = sqrt((w + 1) * (h + 1))`` and uses ``<=`` thresholds
(``s <= 48 -> P2``, ``<= 96 -> P3``, ``<= 192 -> P4``, else P5). The two conventions give the same
level except for boxes that sit exactly on a boundary (e.g. a 48 x 48 box: P3 here, P2 there).
This project follows torchvision's convention, which detectors fine-tuned from these weights
(torchvision / detectron2 FPN poolers) also use.

RoIAlign is ``torchvision.ops.roi_align(..., aligned=True)`` with adaptive sampling (sampling
ratio 0 in the config = torchvision's -1), as the official code and detectron2's ROIAlignV2.
torchvision's ``MultiScaleRoIAlign`` cannot be used as is: it always calls ``roi_align`` with
``aligned=False``, which samples half a feature cell off (no -0.5 pixel shift: 2 px on P2, 16 px
on P5) and stretches RoIs smaller than one feature cell to one cell. So this module combines
torchvision's ``LevelMapper`` with one ``roi_align(aligned=True)`` call per level.

Feature scales are inferred from the feature and view sizes, rounded to a power of two (as
torchvision's ``MultiScaleRoIAlign``): a 112 px view has a 4x4 P5 map (ResNet rounds up) and
scale 1/32. The official code instead scales by the exact ratio (4/112) on such a level; the two
agree on every level whose size divides the view, and a box in a 112 px view can never reach P5
(it needs s >= 192), so the difference never arises with SoCo's views.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper


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
    ):
        super().__init__()
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0 = adaptive), got {sampling_ratio}.")
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio if sampling_ratio > 0 else -1
        self.min_level = min_level
        self.num_levels = max_level - min_level + 1
        self.level_mapper = LevelMapper(
            min_level, max_level, canonical_scale=canonical_box_size, canonical_level=canonical_level
        )

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """Index (0 = ``min_level``) of the level each of the ``(R, 4)`` boxes is pooled on."""
        return self.level_mapper([boxes.reshape(-1, 4)])

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

    def level_plan(self, boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(order, counts)`` for ``boxes`` (N, K, 4): the flattened boxes sorted by level and the
        number of boxes per level. Pass it to :meth:`forward` (with ``counts`` as a list) to share
        one plan between networks and read all counts of a step with a single host sync."""
        levels = self.assign_levels(boxes)
        order = torch.argsort(levels, stable=True)
        return order, torch.bincount(levels, minlength=self.num_levels)

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


def build_soco_pooler(cfg) -> ScaleAwareRoIPooler:
    """The pooler of ``cfg.MODEL.ROI_BOX_HEAD`` with SoCo's scale-aware assignment."""
    return ScaleAwareRoIPooler(
        output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        canonical_box_size=cfg.MODEL.SOCO.CANONICAL_BOX_SIZE,
        canonical_level=cfg.MODEL.SOCO.CANONICAL_LEVEL,
    )
