"""soco_d2's torchvision detectors with the detectron2-equal choices compute what detectron2's
compute, given the same weights and images: Mask R-CNN R50-FPN (4conv1fc BN; 1-conv RPN head,
detectron2's anchors, ROIAlignV2) gives the same proposals, boxes, scores, classes and mask
probabilities, RetinaNet R50-FPN (detectron2's anchors, NMS before clipping) the same boxes,
scores and classes; in training mode both give detectron2's losses (L1 box losses, RetinaNet's
EMA loss normaliser)."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg as get_d2_cfg  # noqa: E402
from detectron2.modeling import build_model as build_d2_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from soco_d2.checkpoint import d2_to_torchvision  # noqa: E402
from soco_d2.config import load_config  # noqa: E402
from soco_d2.finetune.detectors import build_detector  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
CLASSES = 3
# Every detection above the score threshold is kept: random weights give tied scores, and which
# of two tied detections a cap of 100 keeps is arbitrary in both libraries.
NO_CAP = 10000
# (H, W): same short side, so that neither model resizes. The batch is padded to 128 x 224, no
# multiple of P6's / P7's stride (64 / 128): torchvision's anchor strides differ there.
SIZES = ((128, 160), (128, 224))


def _d2_model(config="mask_rcnn_R50_FPN_1x.yaml", extra=()):
    """detectron2's model of ``configs/detectron2/<config>`` (SyncBN -> BN for one CPU process),
    random weights and BN statistics unlike a fresh model's."""
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                         "TEST.DETECTIONS_PER_IMAGE", NO_CAP] + list(extra))
    torch.manual_seed(0)
    model = build_d2_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.3 + 0.2)  # features stay O(1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model, g


def _d2_mask_rcnn(extra=()):
    model, g = _d2_model("mask_rcnn_R50_FPN_1x.yaml", [
        "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN",
        "MODEL.ROI_HEADS.NUM_CLASSES", CLASSES, "INPUT.MIN_SIZE_TEST", 0] + list(extra))
    with torch.no_grad():
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


def _ours(choices, config="mask_rcnn_R50_FPN_1x.yaml"):
    """Our detector of ``configs/finetune/<config>``, sized so that it resizes no image."""
    cfg = load_config(os.path.join(REPO, "configs", "finetune", config),
                      ["MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", str(CLASSES),
                       "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "100000",
                       "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "100000",
                       "TEST.DETECTIONS_PER_IMAGE", str(NO_CAP)] + list(choices))
    return build_detector(cfg).eval()


def _images():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in SIZES]


def _targets(with_masks, counts=(2, 3), scale=0.35):
    """``counts`` boxes per image, 12 px to 12 px + ``scale`` of the image wide and high; classes
    0..2 (detectron2's count)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for (h, w), n in zip(SIZES, counts):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * scale, h * scale]) + 12
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1)
        t = {"boxes": boxes, "labels": torch.randint(0, CLASSES, (n,), generator=g)}
        if with_masks:  # an ellipse in each box
            yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
            t["masks"] = ((((xx - c[:, :1, None]) / r[:, :1, None]) ** 2
                           + ((yy - c[:, 1:, None]) / r[:, 1:, None]) ** 2) <= 1).to(torch.uint8)
        out.append(t)
    return out


def _d2_inputs(images, targets=None):
    batched = []
    for i, im in enumerate(images):
        x = {"image": im, "height": im.shape[1], "width": im.shape[2]}
        if targets is not None:
            inst = Instances(tuple(im.shape[1:]))
            inst.gt_boxes = Boxes(targets[i]["boxes"])
            inst.gt_classes = targets[i]["labels"]
            if "masks" in targets[i]:
                inst.gt_masks = BitMasks(targets[i]["masks"].bool())
            x["instances"] = inst
        batched.append(x)
    return batched


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


def _same_detections(d2_dets, tv_dets):
    """Whether every image has as many detections in both and each of ours has one of
    detectron2's within 1e-2 (box corners, score x 1000)."""
    for dd, td in zip(d2_dets, tv_dets):
        if len(td["boxes"]) != len(dd):
            return False
        a = torch.cat([td["boxes"], td["scores"][:, None] * 1000], 1)
        b = torch.cat([dd.pred_boxes.tensor, dd.scores[:, None] * 1000], 1)
        if len(a) and not bool((torch.cdist(a, b, p=float("inf")).min(1).values < 1e-2).all()):
            return False
    return True


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
    d2 = _d2_mask_rcnn()
    # the shipped COCO recipe selects the detectron2-equal choices
    tv = _ours([])
    missing, unexpected = tv.load_state_dict(_torchvision_state(d2.state_dict()), strict=True)
    assert not missing and not unexpected
    images = _images()
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


@pytest.mark.slow  # four ResNet-50 Mask R-CNNs on CPU
def test_torchvision_choices_differ_from_detectron2():
    """Each choice matters: with torchvision's v2 defaults (rounded anchors, anchor strides from the
    image size, aligned=False) the outputs differ from detectron2's on the same weights."""
    d2 = _d2_mask_rcnn()
    state = _torchvision_state(d2.state_dict())
    images = _images()
    for choice in (["MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", "True"],
                   ["MODEL.ANCHOR_GENERATOR.STRIDE_FROM_IMAGE_SIZE", "True"],
                   ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign", "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign"]):
        tv = _ours(choice)
        tv.load_state_dict(state, strict=True)
        d2_props, d2_dets, tv_props, tv_dets = _run_both(d2, tv, images)
        same_props = all(
            len(dp) == len(tp) and torch.allclose(tp[_order(tp)], dp.proposal_boxes.tensor[
                _order(dp.proposal_boxes.tensor)], atol=1e-3)
            for dp, tp in zip(d2_props, tv_props))
        assert not (same_props and _same_detections(d2_dets, tv_dets)), choice


# ------------------------------------------------------------------------------------ RetinaNet
def _d2_retinanet():
    model, g = _d2_model("retinanet_R50_FPN_1x.yaml", ["MODEL.RETINANET.NUM_CLASSES", CLASSES])
    h = model.head
    with torch.no_grad():
        # a head whose scores pass the 0.05 threshold and spread (the prior-initialised head
        # scores 0.01 everywhere), and whose boxes move and cross the image border
        for m in list(h.cls_subnet) + list(h.bbox_subnet):
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.03)
        h.cls_score.weight.copy_(torch.randn(h.cls_score.weight.shape, generator=g) * 0.05)
        h.cls_score.bias.copy_(torch.randn(h.cls_score.bias.shape, generator=g) - 3)
        h.bbox_pred.weight.copy_(torch.randn(h.bbox_pred.weight.shape, generator=g) * 0.05)
    return model


def _retinanet_state(d2_state):
    """detectron2 RetinaNet weights -> soco_d2's torchvision names (the converter maps the
    backbone and FPN; P6 / P7 and the head are mapped here: same tensors, other names)."""
    tv, _ = d2_to_torchvision(d2_state, fpn_levels=(3, 4, 5))
    for t in ("weight", "bias"):
        for p in ("p6", "p7"):
            tv[f"backbone.fpn.extra_blocks.{p}.{t}"] = d2_state[f"backbone.top_block.{p}.{t}"]
        for i in range(4):
            tv[f"head.classification_head.conv.{i}.0.{t}"] = d2_state[f"head.cls_subnet.{2 * i}.{t}"]
            tv[f"head.regression_head.conv.{i}.0.{t}"] = d2_state[f"head.bbox_subnet.{2 * i}.{t}"]
        tv[f"head.classification_head.cls_logits.{t}"] = d2_state[f"head.cls_score.{t}"]
        tv[f"head.regression_head.bbox_reg.{t}"] = d2_state[f"head.bbox_pred.{t}"]
    return tv


def _our_retinanet(d2, choices=()):
    model = _ours(choices, "retinanet_R50_FPN_1x.yaml")
    missing, unexpected = model.load_state_dict(_retinanet_state(d2.state_dict()), strict=True)
    assert not missing and not unexpected
    return model


def _retinanet_detections(d2, ours, images):
    with torch.no_grad():
        theirs = [r["instances"] for r in d2(_d2_inputs(images))]
        mine = ours(list(images))
    return theirs, mine


@pytest.mark.slow  # two ResNet-50 RetinaNets on CPU
def test_retinanet_equals_detectron2_with_the_detectron2_choices():
    d2 = _d2_retinanet()
    ours = _our_retinanet(d2)  # the shipped COCO recipe selects the detectron2-equal choices
    theirs, mine = _retinanet_detections(d2, ours, _images())
    total = border = 0
    for dd, td in zip(theirs, mine):
        assert len(td["boxes"]) == len(dd)
        total += len(dd)
        h, w = dd.image_size
        b = dd.pred_boxes.tensor
        border += int(((b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= w) | (b[:, 3] >= h)).sum())
        j = _match(td["boxes"], td["scores"], td["labels"], b, dd.scores, dd.pred_classes)
        torch.testing.assert_close(td["boxes"], b[j], rtol=0, atol=1e-3)
        torch.testing.assert_close(td["scores"], dd.scores[j], rtol=0, atol=1e-5)
        assert torch.equal(td["labels"], dd.pred_classes[j])
    assert total > 500 and border > 100  # detections to compare, many clipped at the border


@pytest.mark.slow  # four ResNet-50 RetinaNets on CPU
def test_retinanet_torchvision_choices_differ_from_detectron2():
    """Each choice matters: torchvision's rounded / truncated / ratio-major cell anchors, anchor
    strides from the image size, and NMS on clipped boxes each change the detections."""
    d2 = _d2_retinanet()
    images = _images()
    for choice in (["MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", "True"],
                   ["MODEL.ANCHOR_GENERATOR.STRIDE_FROM_IMAGE_SIZE", "True"],
                   ["MODEL.RETINANET.NMS_ON_CLIPPED_BOXES", "True"]):
        theirs, mine = _retinanet_detections(d2, _our_retinanet(d2, choice), images)
        assert not _same_detections(theirs, mine), choice


def _d2_losses(d2, images, targets, steps):
    d2.train()
    with EventStorage(0):
        return [d2(_d2_inputs(images, targets)) for _ in range(steps)]


@pytest.mark.slow  # two ResNet-50 RetinaNets, training forwards
def test_retinanet_training_losses_equal_detectron2():
    """Same weights, images and targets (no sampling in RetinaNet): the focal and box losses of
    detectron2's first and second step, whose EMA normaliser has moved (0.9 * 100 + 0.1 n, then
    again); torchvision's per-image normalisation gives other values. Few small boxes, so that
    the foreground count n is far from the EMA's start of 100."""
    d2 = _d2_retinanet()
    ours = _our_retinanet(d2).train()
    images, targets = _images(), _targets(with_masks=False, counts=(1, 2), scale=0.15)
    theirs = _d2_losses(d2, images, targets, steps=2)
    mine = [ours(list(images), targets) for _ in range(2)]
    for t, m in zip(theirs, mine):
        torch.testing.assert_close(m["classification"], t["loss_cls"], rtol=1e-4, atol=0)
        torch.testing.assert_close(m["bbox_regression"], t["loss_box_reg"], rtol=1e-4, atol=0)
    assert mine[1]["classification"] / mine[0]["classification"] > 1.02  # the EMA fell towards n
    per_image = _our_retinanet(d2, ["MODEL.RETINANET.LOSS_NORMALIZER", "per_image"]).train()
    other = per_image(list(images), targets)
    assert other["classification"] / theirs[0]["loss_cls"] > 2


@pytest.mark.slow  # two ResNet-50 Mask R-CNNs, training forwards
def test_mask_rcnn_training_losses_equal_detectron2():
    """Same weights, images and targets: RPN and RoI-head losses equal detectron2's with the
    reproduction config (L1 box losses). The RPN's anchor sampling draws the same random
    permutations in both libraries once the generator is seeded alike; the RoI sampler takes
    every proposal (a batch far above the proposal count), so its draws cannot differ. The mask
    loss is left out: detectron2 rasterises polygon targets (or thresholds aligned RoIAlign crops
    of bitmasks) where torchvision takes unaligned, unthresholded crops."""
    all_rois = 100000
    d2 = _d2_mask_rcnn(["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", all_rois])
    state = _torchvision_state(d2.state_dict())
    images, targets = _images(), _targets(with_masks=True)
    torch.manual_seed(5)
    theirs = _d2_losses(d2, images, targets, steps=1)[0]
    pairs = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_loc",
             "loss_classifier": "loss_cls", "loss_box_reg": "loss_box_reg"}
    assert all(float(theirs[k]) > 0 for k in pairs.values())

    def our_losses(choices):
        model = _ours(["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(all_rois)] + choices).train()
        model.load_state_dict(state, strict=True)
        tv_targets = [dict(t, labels=t["labels"] + 1) for t in targets]  # torchvision: 0 is background
        il, tv_targets = model.transform(list(images), tv_targets)  # draws a (single) train size
        torch.manual_seed(5)
        feats = model.backbone(il.tensors)
        proposals, rpn_losses = model.rpn(il, feats, tv_targets)
        _, roi_losses = model.roi_heads(feats, proposals, il.image_sizes, tv_targets)
        return {**rpn_losses, **roi_losses}

    mine = our_losses([])
    for ours_key, d2_key in pairs.items():
        torch.testing.assert_close(mine[ours_key], theirs[d2_key], rtol=1e-4, atol=0, msg=ours_key)
    # torchvision's beta 1/9 changes the box losses only
    tv_betas = our_losses(["MODEL.RPN.SMOOTH_L1_BETA", str(1 / 9), "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", str(1 / 9)])
    for key in ("loss_rpn_box_reg", "loss_box_reg"):
        assert not torch.allclose(tv_betas[key], theirs[pairs[key]], rtol=1e-2), key
    for key in ("loss_objectness", "loss_classifier"):
        torch.testing.assert_close(tv_betas[key], theirs[pairs[key]], rtol=1e-4, atol=0, msg=key)
