"""soco_d2's torchvision Mask R-CNN with the detectron2-equal choices (1-conv RPN head, unrounded
anchors, ROIAlignV2) computes what detectron2's Mask R-CNN R50-FPN (4conv1fc BN) computes, given
the same weights: proposals, boxes, scores, classes and mask probabilities (eval mode)."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg as get_d2_cfg  # noqa: E402
from detectron2.modeling import build_model as build_d2_model  # noqa: E402

from soco_d2.checkpoint.convert import d2_to_torchvision  # noqa: E402
from soco_d2.config import load_config  # noqa: E402
from soco_d2.finetune.detectors import build_detector  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
CLASSES = 3
# Every detection above the score threshold is kept: random weights give tied scores, and which
# of two tied detections a cap of 100 keeps is arbitrary in both libraries.
NO_CAP = 10000
SIZES = ((128, 160), (128, 192))  # (H, W): same short side, so that neither model resizes


def _d2_model():
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                         "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN",
                         "MODEL.ROI_HEADS.NUM_CLASSES", CLASSES, "INPUT.MIN_SIZE_TEST", 0,
                         "TEST.DETECTIONS_PER_IMAGE", NO_CAP])
    torch.manual_seed(0)
    model = build_d2_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # statistics and affine unlike a fresh model's
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.3 + 0.2)  # features stay O(1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        # spread the scores so that ranking, NMS and the score threshold have work to do
        for p in (model.proposal_generator.rpn_head.objectness_logits.weight,
                  model.roi_heads.box_predictor.cls_score.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _torchvision_state(d2_state):
    """detectron2 Mask R-CNN weights -> soco_d2's torchvision names (the converter maps the
    backbone, FPN and box head; the RPN head, predictors and mask head are mapped here)."""
    tv, _ = d2_to_torchvision(d2_state)
    rpn = "proposal_generator.rpn_head."
    tv["rpn.head.conv.0.0.weight"] = d2_state[rpn + "conv.weight"]
    tv["rpn.head.conv.0.0.bias"] = d2_state[rpn + "conv.bias"]
    for src, dst in (("objectness_logits", "cls_logits"), ("anchor_deltas", "bbox_pred")):
        for t in ("weight", "bias"):
            tv[f"rpn.head.{dst}.{t}"] = d2_state[f"{rpn}{src}.{t}"]
    # box predictor: detectron2's background is the last class, torchvision's the first; the
    # class-specific regression has no background rows in detectron2
    p = "roi_heads.box_predictor."
    for t in ("weight", "bias"):
        cls = d2_state[f"{p}cls_score.{t}"]
        tv[f"roi_heads.box_predictor.cls_score.{t}"] = torch.cat([cls[-1:], cls[:-1]])
        reg = d2_state[f"{p}bbox_pred.{t}"]
        tv[f"roi_heads.box_predictor.bbox_pred.{t}"] = torch.cat([torch.zeros_like(reg[:4]), reg])
    m = "roi_heads.mask_head."
    for i in range(4):
        tv[f"roi_heads.mask_head.{i}.0.weight"] = d2_state[f"{m}mask_fcn{i + 1}.weight"]
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            tv[f"roi_heads.mask_head.{i}.1.{t}"] = d2_state[f"{m}mask_fcn{i + 1}.norm.{t}"]
    for t in ("weight", "bias"):
        tv[f"roi_heads.mask_predictor.conv5_mask.{t}"] = d2_state[f"{m}deconv.{t}"]
        pred = d2_state[f"{m}predictor.{t}"]
        tv[f"roi_heads.mask_predictor.mask_fcn_logits.{t}"] = torch.cat([torch.zeros_like(pred[:1]), pred])
    return tv


def _ours(choices):
    cfg = load_config(os.path.join(REPO, "configs", "finetune", "mask_rcnn_R50_FPN_1x.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", str(CLASSES),
                       "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "100000",
                       "TEST.DETECTIONS_PER_IMAGE", str(NO_CAP)] + choices)
    return build_detector(cfg).eval()


def _order(boxes, scores=None):
    """A canonical order of detections (scores, then boxes; rounded): equal scores are common with
    random weights, and the two libraries may rank tied entries differently."""
    cols = [boxes[:, i].numpy().round(2) for i in (3, 2, 1, 0)]
    if scores is not None:
        cols.append(-scores.numpy().round(4))
    return torch.as_tensor(np.lexsort(cols))


def _match(boxes, scores, labels, boxes2, scores2, labels2):
    """Index into the second set of each detection of the first: same label, nearest box and
    score; a one-to-one pairing. (Tied scores make the two libraries list detections in
    different orders.)"""
    a = torch.cat([boxes, scores[:, None] * 1000, labels[:, None].float() * 1e6], 1)
    b = torch.cat([boxes2, scores2[:, None] * 1000, labels2[:, None].float() * 1e6], 1)
    j = torch.cdist(a.double(), b.double(), p=float("inf")).argmin(1)
    assert len(set(j.tolist())) == len(j), "detections without a counterpart"
    return j


def _run_both(d2, tv, images):
    with torch.no_grad():
        batched = [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]
        il = d2.preprocess_image(batched)
        feats = d2.backbone(il.tensor)
        d2_props, _ = d2.proposal_generator(il, feats, None)
        d2_dets, _ = d2.roi_heads(il, feats, d2_props, None)
        tv_il, _ = tv.transform(list(images))
        assert tv_il.image_sizes == list(SIZES) and tv_il.tensors.shape == il.tensor.shape
        tv_feats = tv.backbone(tv_il.tensors)
        tv_props, _ = tv.rpn(tv_il, tv_feats)
        tv_dets, _ = tv.roi_heads(tv_feats, tv_props, tv_il.image_sizes)
    return d2_props, d2_dets, tv_props, tv_dets


@pytest.mark.slow  # two ResNet-50 Mask R-CNNs on CPU (about 30 s of CPU)
def test_mask_rcnn_equals_detectron2_with_the_detectron2_choices():
    d2 = _d2_model()
    # the shipped COCO recipe selects the detectron2-equal choices
    tv = _ours([])
    missing, unexpected = tv.load_state_dict(_torchvision_state(d2.state_dict()), strict=True)
    assert not missing and not unexpected
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in SIZES]
    d2_props, d2_dets, tv_props, tv_dets = _run_both(d2, tv, images)
    for dp, tp in zip(d2_props, tv_props):
        d2_boxes = dp.proposal_boxes.tensor
        assert len(dp) == len(tp) > 500
        torch.testing.assert_close(tp[_order(tp)], d2_boxes[_order(d2_boxes)], rtol=0, atol=1e-3)
    total = 0
    for dd, td in zip(d2_dets, tv_dets):
        assert len(td["boxes"]) == len(dd)
        total += len(dd)
        j = _match(td["boxes"], td["scores"], td["labels"], dd.pred_boxes.tensor, dd.scores, dd.pred_classes + 1)
        torch.testing.assert_close(td["boxes"], dd.pred_boxes.tensor[j], rtol=0, atol=1e-3)
        torch.testing.assert_close(td["scores"], dd.scores[j], rtol=0, atol=1e-5)
        assert torch.equal(td["labels"], dd.pred_classes[j] + 1)
        torch.testing.assert_close(td["masks"], dd.pred_masks[j], rtol=0, atol=1e-4)
    assert total > 100  # detections to compare, not two empty lists


@pytest.mark.slow  # three ResNet-50 Mask R-CNNs on CPU
def test_torchvision_choices_differ_from_detectron2():
    """Each choice matters: with torchvision's v2 defaults (rounded anchors, aligned=False) the
    outputs differ from detectron2's on the same weights."""
    d2 = _d2_model()
    state = _torchvision_state(d2.state_dict())
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in SIZES]
    for choice in (["MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", "True"],
                   ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign", "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign"]):
        tv = _ours(choice)
        tv.load_state_dict(state, strict=True)
        d2_props, d2_dets, tv_props, tv_dets = _run_both(d2, tv, images)
        same_props = all(
            len(dp) == len(tp) and torch.allclose(tp[_order(tp)], dp.proposal_boxes.tensor[
                _order(dp.proposal_boxes.tensor)], atol=1e-3)
            for dp, tp in zip(d2_props, tv_props))
        same_dets = True
        for dd, td in zip(d2_dets, tv_dets):
            if len(td["boxes"]) != len(dd):
                same_dets = False
                continue
            a = torch.cat([td["boxes"], td["scores"][:, None] * 1000], 1)
            b = torch.cat([dd.pred_boxes.tensor, dd.scores[:, None] * 1000], 1)
            same_dets &= bool((torch.cdist(a, b, p=float("inf")).min(1).values < 1e-2).all())
        assert not (same_props and same_dets), choice
