"""torchvision detectors for fine-tuning: Mask R-CNN R-FPN (v2 design) and RetinaNet R-FPN.

Mask R-CNN is built exactly as ``torchvision.models.detection.maskrcnn_resnet50_fpn_v2`` (BN in
the FPN, 4conv1fc box head with BN, 4-conv mask head with BN, 2-conv RPN head): SoCo's transfer
architecture. Its pieces are built here from torchvision's classes rather than by calling the
constructor so that the ResNet depth (R-18 for CPU tests), the head sizes and the norms come from
the config; the module names, hence the state-dict keys, are those of the constructor.

RetinaNet follows detectron2's RetinaNet R50-FPN recipe, which sits between torchvision's two
constructors: P6/P7 are computed from C5 (as detectron2 and torchvision's v2; v1 uses P5), the
heads have no norm and the box loss is L1 (as detectron2, whose SMOOTH_L1_LOSS_BETA 0 is L1, and
torchvision's v1; v2 uses GroupNorm heads and a GIoU loss). The FPN norm is MODEL.FPN.NORM (the
SoCo / MoCo RetinaNet recipes use SyncBN in the FPN).

Where torchvision's detectors differ from detectron2's, config choices give detectron2's
behaviour (anchors, RoIAlign, RPN head, box-loss betas, RetinaNet's loss normaliser and NMS
order; :mod:`soco_d2.config.finetune`); the COCO reproduction configs select them, and
``tests/detectron2/test_detector_parity.py`` checks outputs and losses against detectron2.

Images enter as float tensors on the 0-255 scale; the model normalises them with
MODEL.PIXEL_MEAN / PIXEL_STD (RGB, 0-255) and resizes them (:class:`TrainTestResize`).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from soco_d2.modeling.sync_bn import convert_sync_batchnorm
from soco_d2.finetune.retinanet import ConfigurableRetinaNet, box_regression_loss
from soco_d2.utils import comm
from soco_d2.utils.torchvision_internals import convert_to_roi_format, filter_input, setup_scales

__all__ = [
    "DETECTORS",
    "AlignedMultiScaleRoIAlign",
    "TrainTestResize",
    "ConfigurableAnchorGenerator",
    "SmoothL1RPN",
    "SmoothL1RoIHeads",
    "build_detector",
    "first_label",
    "backbone_prefix",
]

logger = logging.getLogger(__name__)

DETECTORS = ("mask_rcnn", "retinanet")

_RESNETS = {
    18: resnet.resnet18,
    34: resnet.resnet34,
    50: resnet.resnet50,
    101: resnet.resnet101,
    152: resnet.resnet152,
}

# Parameters of the ResNet inside a detector: "backbone.body.<torchvision resnet name>".
_BACKBONE_PREFIX = "backbone.body."


def backbone_prefix() -> str:
    return _BACKBONE_PREFIX


def first_label(cfg) -> int:
    """Label of the first category: 1 for Mask R-CNN (0 is its background), 0 for RetinaNet."""
    return 1 if cfg.MODEL.DETECTOR == "mask_rcnn" else 0


def _norm(name: str, key: str, allow_none: bool = True, allow_frozen: bool = False):
    """``nn.BatchNorm2d`` for "BN"/"SyncBN" (made SyncBN when world > 1), None for ""."""
    if name in ("BN", "SyncBN"):
        return nn.BatchNorm2d
    if name == "" and allow_none:
        return None
    if name == "FrozenBN" and allow_frozen:
        return FrozenBatchNorm2d
    allowed = ["BN", "SyncBN"] + (["FrozenBN"] if allow_frozen else []) + ([""] if allow_none else [])
    raise ValueError(f"{key} must be one of {allowed}, got {name!r}.")


class TrainTestResize(GeneralizedRCNNTransform):
    """torchvision's detection transform with separate train and test sizes.

    In training mode the short side is drawn at random (torch RNG) from ``min_size_train`` for
    every image and the long side capped at ``max_size_train`` (detectron2's
    ``ResizeShortestEdge(..., "choice")``); in eval mode they are ``min_size_test`` and
    ``max_size_test``. (torchvision's own transform uses the last train size at test time.)
    """

    def __init__(self, min_size_train, max_size_train, min_size_test, max_size_test,
                 image_mean, image_std, size_divisible: int = 32):
        super().__init__(tuple(min_size_train), max_size_train, list(image_mean), list(image_std),
                         size_divisible=size_divisible)
        self._sizes = {
            True: (tuple(int(s) for s in min_size_train), int(max_size_train)),
            False: ((int(min_size_test),), int(max_size_test)),
        }

    def train(self, mode: bool = True):
        self.min_size, self.max_size = self._sizes[bool(mode)]
        return super().train(mode)


def _backbone(cfg, returned_layers=None, extra_blocks=None):
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNETS:
        raise ValueError(f"MODEL.RESNETS.DEPTH must be one of {sorted(_RESNETS)}, got {depth}.")
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must lie in 0..5, got {freeze_at}.")
    norm = _norm(cfg.MODEL.RESNETS.NORM, "MODEL.RESNETS.NORM", allow_none=False, allow_frozen=True)
    body = _RESNETS[depth](weights=None, norm_layer=norm)
    c5_channels = body.inplanes
    if callable(extra_blocks):
        extra_blocks = extra_blocks(c5_channels)
    return _resnet_fpn(body, 5 - freeze_at, returned_layers or [1, 2, 3, 4], extra_blocks,
                       cfg.MODEL.FPN.OUT_CHANNELS, _norm(cfg.MODEL.FPN.NORM, "MODEL.FPN.NORM"))


def _resnet_fpn(body, trainable_layers, returned_layers, extra_blocks, out_channels, norm_layer):
    """torchvision's ResNet-FPN extractor (same freezing and module names), with the FPN width
    taken from the config: torchvision's own ``_resnet_fpn_extractor`` fixes it at 256."""
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            p.requires_grad_(False)
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    stage2 = body.inplanes // 8
    in_channels = [stage2 * 2 ** (i - 1) for i in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels, out_channels,
                           extra_blocks=extra_blocks, norm_layer=norm_layer)


_POOLER_TYPES = ("ROIAlign", "ROIAlignV2")
_TORCHVISION_BETA = 1.0 / 9  # smooth-L1 beta of torchvision's RPN and RoI box losses


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level mapper, scales and interface) whose
    ``roi_align`` calls use ``aligned=True``: detectron2's ``ROIAlignV2`` (the -0.5 pixel shift;
    torchvision's class always pools with ``aligned=False``)."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        x_filtered = filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        first = x_filtered[0]
        result = first.new_zeros((len(rois), first.shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(x_filtered, self.scales)):
            idx = torch.where(levels == level)[0]
            result[idx] = roi_align(feature, rois[idx], self.output_size, spatial_scale=scale,
                                    sampling_ratio=self.sampling_ratio, aligned=True).to(result.dtype)
        return result


def _roi_pool(pooler_type: str, key: str, levels, resolution: int, sampling_ratio: int) -> MultiScaleRoIAlign:
    if pooler_type not in _POOLER_TYPES:
        raise ValueError(f"{key} must be one of {_POOLER_TYPES}, got {pooler_type!r}.")
    cls = AlignedMultiScaleRoIAlign if pooler_type == "ROIAlignV2" else MultiScaleRoIAlign
    return cls(levels, resolution, sampling_ratio)


class ConfigurableAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with detectron2's anchors as options.

    ``round_cell_anchors=False``: detectron2's cell anchors, ``(-w/2, -h/2, w/2, h/2)`` with
    ``w = size / sqrt(ratio)``, ``h = size * sqrt(ratio)``, not rounded to pixels, listed
    size-major (torchvision rounds them and lists them ratio-major; the order decides which
    output channels of a head predict which anchor when a level has several sizes, as
    RetinaNet's). ``strides``: each level's stride, as detectron2 (4..64 for Mask R-CNN, 8..128
    for RetinaNet); None is torchvision's ``padded image size // feature size``, which is not the
    stride where the padded image is no multiple of it (P6 / P7 of an 800 x 1344 input: 61 / 114
    px instead of 64 / 128). Anchor centres start at 0 (offset 0) in both libraries.
    """

    def __init__(self, sizes, aspect_ratios, round_cell_anchors: bool = True,
                 strides: Optional[Sequence[int]] = None):
        self.round_cell_anchors = bool(round_cell_anchors)  # read by generate_anchors
        super().__init__(sizes, aspect_ratios)
        if strides is not None and len(strides) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} anchor levels need as many strides, got {list(strides)}.")
        self.strides = None if strides is None else [int(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        if self.round_cell_anchors:
            return super().generate_anchors(scales, aspect_ratios, dtype, device)
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[:, None] / h_ratios[None, :]).reshape(-1)
        hs = (scales[:, None] * h_ratios[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        if self.strides is None:
            return super().forward(image_list, feature_maps)
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"anchor strides {self.strides} for {len(feature_maps)} feature maps")
        device = feature_maps[0].device
        # as torchvision builds its strides: a fill on the device, no host-to-device copy
        strides = [[torch.empty((), dtype=torch.int64, device=device).fill_(s)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        per_level = self.grid_anchors([list(f.shape[-2:]) for f in feature_maps], strides)
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


def _anchor_generator(cfg, sizes, first_level: int) -> ConfigurableAnchorGenerator:
    a = cfg.MODEL.ANCHOR_GENERATOR
    strides = None if a.STRIDE_FROM_IMAGE_SIZE else [2 ** (first_level + i) for i in range(len(sizes))]
    return ConfigurableAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes), a.ROUND_CELL_ANCHORS, strides)


def _box_head(box, in_channels: int) -> nn.Module:
    """4conv1fc (SoCo, torchvision v2) or, with NUM_CONV 0 and NUM_FC 2, torchvision's
    ``TwoMLPHead`` (the standard 2fc head of the MoCo / DetCo recipe; names ``fc6`` / ``fc7``)."""
    res = box.POOLER_RESOLUTION
    if box.NUM_CONV == 0 and box.NUM_FC == 2:
        return TwoMLPHead(in_channels * res * res, box.FC_DIM)
    return FastRCNNConvFCHead(
        (in_channels, res, res), [box.CONV_DIM] * box.NUM_CONV, [box.FC_DIM] * box.NUM_FC,
        norm_layer=_norm(box.NORM, "MODEL.ROI_BOX_HEAD.NORM"),
    )


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's RPN whose box loss takes its smooth-L1 beta from ``smooth_l1_beta``
    (torchvision: 1/9; detectron2: ``MODEL.RPN.SMOOTH_L1_BETA`` 0, an L1 loss). Sampling and
    normalisation are torchvision's (over the sampled anchors: 256 per image, as detectron2's
    ``BATCH_SIZE_PER_IMAGE * images`` whenever an image has enough negatives)."""

    smooth_l1_beta: float = _TORCHVISION_BETA

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor],
                     regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg))[0]
        sampled = torch.cat([sampled_pos, sampled_neg])
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        box_loss = box_regression_loss(pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos],
                                       self.smooth_l1_beta) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's RoI heads whose box loss takes its smooth-L1 beta from ``smooth_l1_beta``
    (torchvision: 1/9; detectron2: ``MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA`` 0, an L1 loss). With
    another beta, ``loss_box_reg`` is recomputed from the sampled RoIs' targets and the box
    predictor's output of the same forward (torchvision's ``fastrcnn_loss`` fixes 1/9)."""

    smooth_l1_beta: float = _TORCHVISION_BETA

    def select_training_samples(self, proposals, targets):
        out = super().select_training_samples(proposals, targets)
        self._box_loss_inputs = {"labels": out[2], "targets": out[3]}
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.smooth_l1_beta == _TORCHVISION_BETA:
            return super().forward(features, proposals, image_shapes, targets)
        outputs = []
        handle = self.box_predictor.register_forward_hook(lambda _m, _args, out: outputs.append(out[1]))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            handle.remove()
        inputs = self._box_loss_inputs
        del self._box_loss_inputs
        inputs["deltas"] = outputs[0]
        labels, regression_targets = torch.cat(inputs["labels"]), torch.cat(inputs["targets"])
        deltas = inputs["deltas"].reshape(labels.numel(), -1, 4)
        pos = torch.where(labels > 0)[0]
        losses["loss_box_reg"] = box_regression_loss(
            deltas[pos, labels[pos]], regression_targets[pos], self.smooth_l1_beta) / labels.numel()
        return result, losses


def _smooth_l1_beta(value: float, key: str) -> float:
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}.")
    return float(value)


def _mask_rcnn(cfg, num_classes: int) -> nn.Module:
    backbone = _backbone(cfg)
    out = backbone.out_channels
    levels = ["0", "1", "2", "3"]
    anchors = _anchor_generator(cfg, ((32,), (64,), (128,), (256,), (512,)), first_level=2)
    rpn = cfg.MODEL.RPN
    box = cfg.MODEL.ROI_BOX_HEAD
    if box.NUM_FC < 1:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.NUM_FC must be >= 1, got {box.NUM_FC}.")
    rpn_beta = _smooth_l1_beta(rpn.SMOOTH_L1_BETA, "MODEL.RPN.SMOOTH_L1_BETA")
    box_beta = _smooth_l1_beta(box.SMOOTH_L1_BETA, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA")
    res = box.POOLER_RESOLUTION
    kwargs = dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(out, anchors.num_anchors_per_location()[0], conv_depth=rpn.NUM_CONV),
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN,
        rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        box_roi_pool=_roi_pool(box.POOLER_TYPE, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", levels, res,
                               box.POOLER_SAMPLING_RATIO),
        box_head=_box_head(box, out),
        box_predictor=FastRCNNPredictor(box.FC_DIM, num_classes),
        box_batch_size_per_image=cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        box_positive_fraction=cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION,
        box_score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        box_nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
    if not cfg.MODEL.MASK_ON:
        model = FasterRCNN(backbone, None, **kwargs)  # classes set by box_predictor
    else:
        m = cfg.MODEL.ROI_MASK_HEAD
        model = MaskRCNN(
            backbone,
            None,  # classes set by the predictors
            mask_roi_pool=_roi_pool(m.POOLER_TYPE, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", levels,
                                    m.POOLER_RESOLUTION, box.POOLER_SAMPLING_RATIO),
            mask_head=MaskRCNNHeads(out, [m.CONV_DIM] * m.NUM_CONV, 1,
                                    norm_layer=_norm(m.NORM, "MODEL.ROI_MASK_HEAD.NORM")),
            mask_predictor=MaskRCNNPredictor(m.CONV_DIM, 256, num_classes),
            **kwargs,
        )
    # The same modules with the box-loss beta as an attribute (torchvision's constructors take
    # no beta). Reassigning the class of a built module is what torch.nn.utils.parametrize does;
    # the subclasses add methods only, so the modules and their state-dict names are unchanged.
    model.rpn.__class__ = SmoothL1RPN
    model.rpn.smooth_l1_beta = rpn_beta
    model.roi_heads.__class__ = SmoothL1RoIHeads
    model.roi_heads.smooth_l1_beta = box_beta
    return model


def _retinanet(cfg, num_classes: int) -> nn.Module:
    c = cfg.MODEL.FPN.OUT_CHANNELS

    def p6p7(c5_channels):
        extra = LastLevelP6P7(c5_channels, c)
        extra.use_P5 = False  # from C5 also when C5 has the FPN's width (torchvision then uses P5)
        return extra

    backbone = _backbone(cfg, returned_layers=[2, 3, 4], extra_blocks=p6p7)
    octaves = (0.0, 1.0 / 3, 2.0 / 3)
    if cfg.MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS:  # torchvision's sizes: 32, 40, 50, ...
        sizes = tuple(tuple(int(x * 2 ** o) for o in octaves) for x in (32, 64, 128, 256, 512))
    else:  # detectron2's Base-RetinaNet: 32, 40.32, 50.80, ...
        sizes = tuple(tuple(x * 2 ** o for o in octaves) for x in (32, 64, 128, 256, 512))
    anchors = _anchor_generator(cfg, sizes, first_level=3)
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    r = cfg.MODEL.RETINANET
    return ConfigurableRetinaNet(
        backbone,
        num_classes,
        anchor_generator=anchors,
        head=head,
        score_thresh=r.SCORE_THRESH_TEST,
        nms_thresh=r.NMS_THRESH_TEST,
        topk_candidates=r.TOPK_CANDIDATES_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        loss_normalizer=r.LOSS_NORMALIZER,
        smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA,
        nms_on_clipped_boxes=r.NMS_ON_CLIPPED_BOXES,
    )


def build_detector(cfg, device: Optional[str] = None) -> nn.Module:
    """The detector of ``cfg``, randomly initialised (initial weights:
    :func:`~soco_d2.finetune.weights.load_detector_weights`).

    ``MODEL.NUM_CLASSES`` counts foreground classes; Mask R-CNN gets one more output for the
    background. BN layers become synchronised ones (``AllReduceBatchNorm``) when the world size is > 1.
    """
    kind = cfg.MODEL.DETECTOR
    if kind not in DETECTORS:
        raise ValueError(f"MODEL.DETECTOR must be one of {DETECTORS}, got {kind!r}.")
    if cfg.MODEL.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.NUM_CLASSES must be >= 1, got {cfg.MODEL.NUM_CLASSES}.")
    if kind == "mask_rcnn":
        model = _mask_rcnn(cfg, cfg.MODEL.NUM_CLASSES + 1)
    else:
        model = _retinanet(cfg, cfg.MODEL.NUM_CLASSES)
    i = cfg.INPUT
    model.transform = TrainTestResize(
        i.MIN_SIZE_TRAIN, i.MAX_SIZE_TRAIN, i.MIN_SIZE_TEST, i.MAX_SIZE_TEST,
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
    )
    device = torch.device(device or cfg.MODEL.DEVICE)
    if comm.get_world_size() > 1:
        # One all-reduce per BN call, no host sync, on any device and backend.
        model = convert_sync_batchnorm(model, device)
    return model.to(device)
