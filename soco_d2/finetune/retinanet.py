"""torchvision's RetinaNet with detectron2's loss normalisation, box loss and test-time clipping
as options (``MODEL.RETINANET.*``; docs/FINETUNE.md).

=========================  =========================================  ===========================================
option                     torchvision                                detectron2 (``RetinaNet``)
=========================  =========================================  ===========================================
``loss_normalizer``        ``"per_image"``: each image's losses over  ``"ema"``: the batch's losses over an EMA
                           its own foreground anchors, then the mean  (momentum 0.9, from 100) of the batch's
                           over the images                            foreground anchors (``DenseDetector._ema_update``)
``smooth_l1_beta``         0 (L1)                                     ``SMOOTH_L1_LOSS_BETA`` (0 in Base-RetinaNet)
``nms_on_clipped_boxes``   True: boxes clipped to the image, then     False: NMS on the decoded boxes; the kept
                           NMS                                        ones are clipped, empty ones dropped
=========================  =========================================  ===========================================

Matching (IoU >= 0.5 foreground, < 0.4 background, low-quality matches kept), the focal loss
(alpha 0.25, gamma 2), the box coder (weights 1, ``dw`` / ``dh`` clamped at log(1000/16)) and the
per-level score threshold and top-k of inference are the same in both libraries.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection import RetinaNet
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss

__all__ = ["LOSS_NORMALIZERS", "ConfigurableRetinaNet", "box_regression_loss"]

LOSS_NORMALIZERS = ("per_image", "ema")

# detectron2's DenseDetector._ema_update: initial value and momentum of the loss normaliser
_EMA_START = 100.0
_EMA_MOMENTUM = 0.9


def box_regression_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 loss; L1 for ``beta`` below 1e-5 (detectron2's ``smooth_l1_loss`` rule)."""
    if beta < 1e-5:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class ConfigurableRetinaNet(RetinaNet):
    """torchvision's ``RetinaNet`` (same modules, names and matching) with the options of the
    module docstring; the defaults are torchvision's."""

    def __init__(self, *args, loss_normalizer: str = "per_image", smooth_l1_beta: float = 0.0,
                 nms_on_clipped_boxes: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_normalizer not in LOSS_NORMALIZERS:
            raise ValueError(f"MODEL.RETINANET.LOSS_NORMALIZER must be one of {LOSS_NORMALIZERS}, "
                             f"got {loss_normalizer!r}.")
        if smooth_l1_beta < 0:
            raise ValueError(f"MODEL.RETINANET.SMOOTH_L1_LOSS_BETA must be >= 0, got {smooth_l1_beta}.")
        self.loss_normalizer = loss_normalizer
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.nms_on_clipped_boxes = bool(nms_on_clipped_boxes)
        # EMA of the foreground count ("ema"): a plain tensor, so neither saved nor broadcast by
        # DDP; each process keeps its own, and a resumed run starts again from 100 (detectron2's
        # attribute behaves the same).
        self._ema_foreground: Optional[Tensor] = None

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                     anchors: List[Tensor]) -> Dict[str, Tensor]:
        cls_logits = head_outputs["cls_logits"]  # (N, R, K)
        box_deltas = head_outputs["bbox_regression"]  # (N, R, 4)
        ignore = self.head.classification_head.BETWEEN_THRESHOLDS
        cls_sums, box_sums, foreground = [], [], []
        for t, logits, deltas, anchors_i in zip(targets, cls_logits, box_deltas, anchors):
            if t["boxes"].numel() == 0:
                matched = torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device)
            else:
                matched = self.proposal_matcher(box_ops.box_iou(t["boxes"], anchors_i))
            fg = torch.where(matched >= 0)[0]
            gt_classes = torch.zeros_like(logits)
            gt_classes[fg, t["labels"][matched[fg]]] = 1.0
            valid = matched != ignore
            cls_sums.append(sigmoid_focal_loss(logits[valid], gt_classes[valid], reduction="sum"))
            target_deltas = self.box_coder.encode_single(t["boxes"][matched[fg]], anchors_i[fg])
            box_sums.append(box_regression_loss(deltas[fg], target_deltas, self.smooth_l1_beta))
            foreground.append(fg.numel())
        if self.loss_normalizer == "per_image":
            n = max(1, len(targets))
            return {
                "classification": sum(c / max(1, f) for c, f in zip(cls_sums, foreground)) / n,
                "bbox_regression": sum(b / max(1, f) for b, f in zip(box_sums, foreground)) / n,
            }
        normalizer = self._update_ema(max(1, sum(foreground)), cls_logits)
        return {"classification": sum(cls_sums) / normalizer, "bbox_regression": sum(box_sums) / normalizer}

    def _update_ema(self, count: int, like: Tensor) -> Tensor:
        old = self._ema_foreground
        if old is None:
            old = torch.full((), _EMA_START, dtype=torch.float64, device=like.device)  # no host copy
        self._ema_foreground = old * _EMA_MOMENTUM + count * (1 - _EMA_MOMENTUM)
        return self._ema_foreground.to(like.dtype)

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.nms_on_clipped_boxes:
            return super().postprocess_detections(head_outputs, anchors, image_shapes)
        detections: List[Dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for deltas, logits, anchors_level in zip(head_outputs["bbox_regression"], head_outputs["cls_logits"],
                                                     anchors[index]):
                deltas, logits = deltas[index], logits[index]
                num_classes = logits.shape[-1]
                flat = torch.sigmoid(logits).flatten()
                keep = torch.where(flat > self.score_thresh)[0]
                top, order = flat[keep].topk(min(keep.numel(), self.topk_candidates))
                idx = keep[order]
                anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
                boxes.append(self.box_coder.decode_single(deltas[anchor_idx], anchors_level[anchor_idx]))
                scores.append(top)
                labels.append(idx % num_classes)
            boxes_i, scores_i, labels_i = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = box_ops.batched_nms(boxes_i, scores_i, labels_i, self.nms_thresh)[: self.detections_per_img]
            boxes_i = box_ops.clip_boxes_to_image(boxes_i[keep], image_shape)
            nonempty = (boxes_i[:, 2] > boxes_i[:, 0]) & (boxes_i[:, 3] > boxes_i[:, 1])
            detections.append({"boxes": boxes_i[nonempty], "scores": scores_i[keep][nonempty],
                               "labels": labels_i[keep][nonempty]})
        return detections
