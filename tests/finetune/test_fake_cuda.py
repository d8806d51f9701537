"""The fine-tuning detectors on a fake ``cuda:0`` (torch's FakeTensorMode, no GPU needed): every
tensor their training and inference forwards make or meet is on the device, and every host sync
they make is one of those listed below with its reason (tests/fake_cuda.py says what counts as
one and how it is found). A new sync, or one that went away, fails the test.

Each detector is built by ``build_detector`` from its shipped config (made tiny: R18, small
images and heads) under the fake device and fed samples of the project's COCO dataset class,
moved as the trainer moves them, under fp16 autocast. Only forwards run: the autograd engine
needs a real device, so the backward pass is not covered here.

torchvision's detection code is data-dependent by design (anchor matching, sampling, NMS, per
level RoI selection): those syncs are listed, not removed. Mask pasting at inference
(``paste_masks_in_image``) reads every detection's box on the host in a Python loop, which no
fake value can follow: it is replaced by a function of the same output shape and listed.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import fake_cuda  # noqa: E402

from soco_d2.config import load_config  # noqa: E402
from soco_d2.finetune.coco_data import COCODetection, list_collate  # noqa: E402
from soco_d2.finetune.detectors import build_detector, first_label  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TV = "torchvision/models/detection/"
OURS = "soco_d2/finetune/"
H2D, SCALAR, SHAPE = "host to device", "scalar read", "data-dependent shape"

REASONS = {
    (H2D, TV + "transform.py:normalize"): "torchvision's transform: pixel mean / std as tensors per image",
    (H2D, TV + "transform.py:<listcomp>"): "torchvision's resize_boxes: size ratios as tensors per image",
    (SCALAR, TV + "generalized_rcnn.py:forward"): "torchvision's check for degenerate target boxes",
    (SCALAR, TV + "retinanet.py:forward"): "torchvision's check for degenerate target boxes",
    (H2D, TV + "anchor_utils.py:<listcomp>"): "torchvision's anchor strides as tensors per level",
    (H2D, TV + "_utils.py:decode_single"): "torchvision's BoxCoder: the clamp value as a tensor",
    (H2D, TV + "_utils.py:encode_single"): "torchvision's BoxCoder: the weights as a tensor",
    (SHAPE, "torchvision/ops/boxes.py:remove_small_boxes"): "proposals / detections kept by size",
    (H2D, "torchvision/ops/boxes.py:_batched_nms_coordinate_trick"): "batched NMS: the offset constant",
    (SHAPE, "torchvision/_autograd_registrations.py:_autocast_nms"): "NMS keeps a data-dependent number",
    (SHAPE, TV + "rpn.py:filter_proposals"): "RPN proposals kept by score",
    (SHAPE, TV + "_utils.py:set_low_quality_matches_"): "the matcher's best anchor per box",
    (SHAPE, TV + "_utils.py:__call__"): "the positive / negative sampler picks indices by label",
    (SHAPE, TV + "roi_heads.py:subsample"): "the RoI sampler's chosen proposals",
    (SHAPE, TV + "roi_heads.py:fastrcnn_loss"): "the box loss on positive RoIs only",
    (SHAPE, TV + "roi_heads.py:forward"): "the mask head on positive RoIs only",
    (SHAPE, TV + "roi_heads.py:postprocess_detections"): "detections kept by score and size",
    (SCALAR, TV + "roi_heads.py:paste_masks_in_image"): "mask pasting reads each box on the host",
    (SHAPE, OURS + "detectors.py:forward"): "AlignedMultiScaleRoIAlign selects each level's RoIs "
                                            "(as torchvision's MultiScaleRoIAlign)",
    (SHAPE, OURS + "detectors.py:compute_loss"): "the RPN loss on sampled anchors (as torchvision)",
    (SHAPE, OURS + "retinanet.py:compute_loss"): "RetinaNet's loss on foreground / non-ignored "
                                                 "anchors (as torchvision)",
    (SHAPE, OURS + "retinanet.py:postprocess_detections"): "candidates kept by score (as torchvision)",
}

MASK_RCNN_TRAIN = {
    (H2D, TV + "transform.py:normalize"), (H2D, TV + "transform.py:<listcomp>"),
    (SCALAR, TV + "generalized_rcnn.py:forward"), (H2D, TV + "anchor_utils.py:<listcomp>"),
    (H2D, TV + "_utils.py:decode_single"), (H2D, TV + "_utils.py:encode_single"),
    (SHAPE, "torchvision/ops/boxes.py:remove_small_boxes"), (SHAPE, TV + "rpn.py:filter_proposals"),
    (H2D, "torchvision/ops/boxes.py:_batched_nms_coordinate_trick"),
    (SHAPE, "torchvision/_autograd_registrations.py:_autocast_nms"),
    (SHAPE, TV + "_utils.py:set_low_quality_matches_"), (SHAPE, TV + "_utils.py:__call__"),
    (SHAPE, TV + "roi_heads.py:subsample"), (SHAPE, TV + "roi_heads.py:fastrcnn_loss"),
    (SHAPE, TV + "roi_heads.py:forward"), (SHAPE, OURS + "detectors.py:forward"),
    (SHAPE, OURS + "detectors.py:compute_loss"),
}
MASK_RCNN_TEST = {
    (H2D, TV + "transform.py:normalize"), (H2D, TV + "transform.py:<listcomp>"),
    (H2D, TV + "anchor_utils.py:<listcomp>"), (H2D, TV + "_utils.py:decode_single"),
    (SHAPE, "torchvision/ops/boxes.py:remove_small_boxes"), (SHAPE, TV + "rpn.py:filter_proposals"),
    (H2D, "torchvision/ops/boxes.py:_batched_nms_coordinate_trick"),
    (SHAPE, "torchvision/_autograd_registrations.py:_autocast_nms"),
    (SHAPE, TV + "roi_heads.py:postprocess_detections"), (SHAPE, OURS + "detectors.py:forward"),
    (SCALAR, TV + "roi_heads.py:paste_masks_in_image"),
}
RETINANET_TRAIN = {
    (H2D, TV + "transform.py:normalize"), (H2D, TV + "transform.py:<listcomp>"),
    (SCALAR, TV + "retinanet.py:forward"), (H2D, TV + "anchor_utils.py:<listcomp>"),
    (SHAPE, TV + "_utils.py:set_low_quality_matches_"), (H2D, TV + "_utils.py:encode_single"),
    (SHAPE, OURS + "retinanet.py:compute_loss"),
}
RETINANET_TEST = {
    (H2D, TV + "transform.py:normalize"), (H2D, TV + "transform.py:<listcomp>"),
    (H2D, TV + "anchor_utils.py:<listcomp>"), (H2D, TV + "_utils.py:decode_single"),
    (H2D, "torchvision/ops/boxes.py:_batched_nms_coordinate_trick"),
    (SHAPE, "torchvision/_autograd_registrations.py:_autocast_nms"),
    (SHAPE, OURS + "retinanet.py:postprocess_detections"),
}


def _run(config, overrides, json_file, image_dir, training, monkeypatch):
    cfg = load_config(os.path.join(ROOT, "configs", "finetune", config), overrides + ["MODEL.DEVICE", "cuda"])
    dataset = COCODetection(json_file, image_dir, is_train=True, first_label=first_label(cfg),
                            mask_on=cfg.MODEL.DETECTOR == "mask_rcnn", flip_prob=0.0)
    images, targets = list_collate([dataset[(i, 0)] for i in range(2)])
    recorder = fake_cuda.HostSyncRecorder()

    def paste_masks(masks, boxes, image_shape, padding=1):
        recorder.add(SCALAR, TV + "roi_heads.py:paste_masks_in_image")
        return masks.new_empty((masks.shape[0], 1) + tuple(image_shape))

    monkeypatch.setattr("torchvision.models.detection.transform.paste_masks_in_image", paste_masks)
    with fake_cuda.fake_cuda() as mode:
        with torch.device(fake_cuda.DEVICE):
            model = build_detector(cfg, "cuda")
        model.train(training)
        images, targets = fake_cuda.to_fake_device(mode, (images, targets))
        images = [im.float() for im in images]  # as FinetuneTrainer.run_step
        with fake_cuda.fake_autocast(), recorder:
            out = model(images, targets) if training else model(images)
    return out, {(s.kind, s.where) for s in recorder.syncs}


@pytest.mark.parametrize("config, training, expected", [
    ("mask_rcnn_R50_FPN_1x.yaml", True, MASK_RCNN_TRAIN),
    ("mask_rcnn_R50_FPN_1x.yaml", False, MASK_RCNN_TEST),
    ("retinanet_R50_FPN_1x.yaml", True, RETINANET_TRAIN),
    ("retinanet_R50_FPN_1x.yaml", False, RETINANET_TEST),
])
def test_detector_on_fake_cuda(config, training, expected, tiny_coco, tiny_overrides, monkeypatch):
    out, syncs = _run(config, tiny_overrides, *tiny_coco, training, monkeypatch)
    tensors = list(out.values()) if training else [v for det in out for v in det.values()]
    assert tensors and all(t.device == fake_cuda.DEVICE for t in tensors)
    assert syncs - expected == set(), "host syncs not listed (give each a reason in REASONS)"
    assert expected - syncs == set(), "listed host syncs that no longer happen: drop them"
    assert expected <= set(REASONS)
