"""SoCo over detectron2's modules: backbone builder, RoI pooler and the ``D2SoCo`` meta-architecture.

``D2SoCo`` inherits the forward pass, the loss terms, the momentum update and the batch format
(docs/ARCHITECTURE.md) of :class:`soco_d2.modeling.meta_arch.soco.SoCo`; only the modules differ:

=================  =========================================  ====================================
part               soco_d2 (torchvision)                      D2SoCo (detectron2)
=================  =========================================  ====================================
ResNet + FPN       ``backbone.body.*``, ``backbone.fpn.*``    ``backbone.bottom_up.*``,
                                                              ``backbone.fpn_lateral{l}.*``,
                                                              ``backbone.fpn_output{l}.*``
RoI pooler         ``ScaleAwareRoIPooler``                    ``ROIPooler`` (ROIAlignV2)
box head           ``box_head.{i}.*``                         ``roi_heads.box_head.conv{i}.*``
projector etc.     ``projector``, ``predictor``, ``target_*`` the same
=================  =========================================  ====================================

so the online weights load into detectron2's ``GeneralizedRCNN`` (Mask R-CNN R50-FPN with the
4conv1fc BN box head) without renaming.

Level assignment: ``MODEL.SOCO.LEVEL_ASSIGNMENT "official"`` as soco_d2's pooler (with
``HEAD_MODE "faithful"`` only: detectron2's ``ROIPooler`` assigns levels itself), or
``"torchvision"``: detectron2's ``assign_boxes_to_levels``,
``floor(CANONICAL_LEVEL + log2(sqrt((x2 - x1) * (y2 - y1)) / CANONICAL_BOX_SIZE + 1e-8))``
clamped to P2..P5; with 96 / 4: ``s < 48 -> P2``, ``48 <= s < 96 -> P3``, ``96 <= s < 192 -> P4``,
``s >= 192 -> P5``. A box exactly on a boundary goes to the upper level, as in soco_d2's pooler
(torchvision's convention); the two differ only for sizes within about 1e-6 (relative) below a
boundary, where torchvision's larger epsilon (1e-6 added to the level) already rounds up.

Images are zero-padded (after normalisation, bottom / right) to a multiple of the FPN's
``size_divisibility`` (32), as detectron2's ``ImageList`` does: its FPN upsamples by exactly 2,
so a 112 px view (P5 4x4, P4 7x7) cannot go through unpadded. Boxes are unaffected (they stay
in view pixels); only the features near the padded border differ from soco_d2's model.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.modeling.roi_heads import build_box_head
from detectron2.structures import Boxes
from torch import Tensor, nn

from soco_d2.modeling.heads import build_predictor, build_projector
from soco_d2.modeling.ema import frozen_copy
from soco_d2.modeling.meta_arch.soco import SoCo, check_head_mode
from soco_d2.modeling.pooler import official_box_levels

__all__ = ["D2SoCo", "SoCoROIPooler", "build_soco_resnet_fpn_backbone", "zero_init_residual"]


def zero_init_residual(resnet: nn.Module) -> None:
    """Zero gamma on the last norm of every residual block of a detectron2 ``ResNet``
    (torchvision's ``zero_init_residual``; detectron2's blocks have no such option). The last
    conv of a block is ``conv3`` (bottleneck) or ``conv2`` (basic block)."""
    for stage in resnet.stages:
        for block in stage:
            last = block.conv3 if hasattr(block, "conv3") else block.conv2
            if last.norm is not None:
                nn.init.zeros_(last.norm.weight)


@BACKBONE_REGISTRY.register()
def build_soco_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's ResNet + FPN as ``build_resnet_fpn_backbone`` builds it, without the P6
    max-pool top block (SoCo's pyramid is P2-P5; the block has no weights, so the parameter
    names are those of ``build_resnet_fpn_backbone``), and with zero gamma on the last norm of
    every residual block when ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL:
        zero_init_residual(bottom_up)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


class SoCoROIPooler(nn.Module):
    """detectron2's ``ROIPooler`` behind the interface SoCo's forward uses
    (:class:`soco_d2.modeling.pooler.ScaleAwareRoIPooler`): ``level_plan(boxes)`` and
    ``forward(features, boxes (N, K, 4), image_size, plan) -> (N * K, C, S, S)`` image-major.

    ``ROIPooler`` assigns levels itself (with the same function as :meth:`level_plan`), so the
    plan only serves SoCo's bookkeeping of levels without boxes, and ``image_size`` is unused
    (scales come from the feature strides).
    """

    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__()
        h = cfg.MODEL.ROI_BOX_HEAD
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        self.pooler = ROIPooler(
            output_size=h.POOLER_RESOLUTION,
            scales=[1.0 / input_shape[f].stride for f in in_features],
            sampling_ratio=h.POOLER_SAMPLING_RATIO,
            pooler_type=h.POOLER_TYPE,
            canonical_box_size=cfg.MODEL.SOCO.CANONICAL_BOX_SIZE,
            canonical_level=cfg.MODEL.SOCO.CANONICAL_LEVEL,
        )
        self.num_levels = len(in_features)
        self.level_assignment = cfg.MODEL.SOCO.LEVEL_ASSIGNMENT
        p = self.pooler
        self.boundaries = [
            p.canonical_box_size * 2.0 ** (level + 1 - p.canonical_level)
            for level in range(p.min_level, p.max_level)
        ]

    def assign_levels(self, boxes: Tensor, flipped: Optional[Tensor] = None) -> Tensor:
        """Index (0 = the first feature map) of the level each box of ``boxes`` (..., 4) is pooled on."""
        if self.level_assignment == "official":
            return official_box_levels(boxes, self.boundaries, flipped)
        p = self.pooler
        return assign_boxes_to_levels(
            [Boxes(boxes.reshape(-1, 4).float())], p.min_level, p.max_level,
            p.canonical_box_size, p.canonical_level,
        )

    def level_plan(self, boxes: Tensor, flipped: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(order, counts)``: the flattened boxes sorted by level and the boxes per level."""
        levels = self.assign_levels(boxes, flipped)
        return torch.argsort(levels, stable=True), torch.bincount(levels, minlength=self.num_levels)

    def forward(
        self,
        features: Sequence[Tensor],
        boxes: Tensor,
        image_size: Optional[Tuple[int, int]] = None,
        plan: Optional[Tuple[Tensor, List[int]]] = None,
    ) -> Tensor:
        # fp32 maps, so that ROIAlign (which casts the boxes to the map's dtype) keeps fp32 box
        # coordinates under autocast, as soco_d2's pooler.
        features = [f.float() for f in features]
        if len(features) != self.num_levels:
            raise ValueError(f"Expected {self.num_levels} feature maps, got {len(features)}.")
        if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"boxes must be (N, K, 4) with N = {features[0].shape[0]} images; got {tuple(boxes.shape)}."
            )
        return self.pooler(features, [Boxes(b) for b in boxes.float()])

    def pool_all_levels(self, features: Sequence[Tensor], boxes: Tensor, image_size=None) -> Tensor:
        """Every box on every level with that level's pooler: ``(L, N * K, C, S, S)``."""
        n, k = boxes.shape[:2]
        flat = boxes.reshape(-1, 4).float()
        index = torch.arange(n, device=flat.device, dtype=flat.dtype).repeat_interleave(k)[:, None]
        rois = torch.cat([index, flat], dim=1)
        return torch.stack(
            [pool(f.float(), rois) for f, pool in zip(features, self.pooler.level_poolers)]
        )


@META_ARCH_REGISTRY.register()
class D2SoCo(SoCo):
    """SoCo (see :class:`soco_d2.modeling.meta_arch.soco.SoCo`) built from detectron2's modules.

    ``SoCo.__init__`` builds torchvision modules, so it is not called; this constructor sets the
    same attributes from a detectron2 config (:func:`~soco_d2.detectron2.add_soco_d2_config`):
    ``MODEL.BACKBONE``, ``MODEL.RESNETS``, ``MODEL.FPN``, ``MODEL.ROI_HEADS.IN_FEATURES``,
    ``MODEL.ROI_BOX_HEAD`` and ``MODEL.SOCO``. ``forward(batch)``, ``momentum_update(m)`` and the
    loss are SoCo's.
    """

    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.head_mode = check_head_mode(cfg)
        if self.head_mode != "faithful" and cfg.MODEL.SOCO.LEVEL_ASSIGNMENT != "torchvision":
            raise ValueError(
                f"MODEL.SOCO.HEAD_MODE = {self.head_mode!r} pools with detectron2's ROIPooler, which "
                "assigns levels by its own rule: set MODEL.SOCO.LEVEL_ASSIGNMENT 'torchvision' (or "
                "HEAD_MODE 'faithful')."
            )
        if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT}: pretraining trains every "
                "layer; set it to 0 (detectron2's default, 2, freezes the stem and res2)."
            )
        if cfg.MODEL.ROI_BOX_HEAD.NUM_FC < 1:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.NUM_FC must be >= 1: the projector takes the box head's fc output."
            )
        self.channels_last = cfg.CHANNELS_LAST
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        if in_features != list(shapes):
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES = {in_features}, but the backbone "
                f"({cfg.MODEL.BACKBONE.NAME}) outputs {list(shapes)}; SoCo pools from every output "
                "level: set them equal (['p2', 'p3', 'p4', 'p5'] with build_soco_resnet_fpn_backbone)."
            )
        self.pooler = SoCoROIPooler(cfg, shapes)
        r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        box_head = build_box_head(cfg, ShapeSpec(channels=shapes[in_features[0]].channels, height=r, width=r))
        # ``roi_heads.box_head``: the name of the box head in detectron2's GeneralizedRCNN.
        self.roi_heads = nn.ModuleDict({"box_head": box_head})
        self.projector = build_projector(cfg, box_head.output_shape.channels)
        self.predictor = build_predictor(cfg)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_box_head = frozen_copy(box_head)
        self.target_projector = frozen_copy(self.projector)
        self.embedding_tap = nn.Identity()  # see SoCo._online_heads
        for name, value in (("pixel_mean", cfg.MODEL.PIXEL_MEAN), ("pixel_std", cfg.MODEL.PIXEL_STD)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)

    @property
    def box_head(self) -> nn.Module:
        return self.roi_heads["box_head"]

    def normalize(self, images: Tensor) -> Tensor:
        """SoCo's normalisation, then zero padding (bottom / right) to a multiple of the
        backbone's ``size_divisibility``, as detectron2's ``ImageList.from_tensors``."""
        x = super().normalize(images)
        d = self.backbone.size_divisibility
        pad_h, pad_w = -x.shape[-2] % d, -x.shape[-1] % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def _heads(self, pooled: Dict, modules: Sequence[nn.Module], groups_per_entry: int = 1) -> Dict:
        if self.head_mode == "all":
            return super()._heads(pooled, modules, groups_per_entry)
        # detectron2's Conv2d applies its norm inside the conv module, so SoCo's shared-conv /
        # per-group-BN path cannot reach it: run each group of rows through the heads on its own
        # (the same BN statistics per group, one call per group, as the official code).
        out = {}
        for key, x in pooled.items():
            parts = []
            for part in x.split(len(x) // groups_per_entry):
                for m in modules:
                    part = m(part)
                parts.append(part)
            out[key] = torch.cat(parts)
        return out

    def detection_state_dict(self) -> Dict[str, Tensor]:
        """The online weights that a detectron2 ``GeneralizedRCNN`` (FPN, 4conv1fc box head)
        loads by name: ``backbone.*`` and ``roi_heads.box_head.*``."""
        return {
            k: v for k, v in self.state_dict().items()
            if k.startswith(("backbone.", "roi_heads.box_head."))
        }
