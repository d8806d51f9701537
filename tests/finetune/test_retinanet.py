import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.ops import box_iou

from soco_d2.config import load_config
from soco_d2.finetune.detectors import build_detector

IMAGES = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255,
          torch.rand(3, 96, 112, generator=torch.Generator().manual_seed(1)) * 255]
TARGETS = [{"boxes": torch.tensor([[5.0, 5, 40, 30], [50, 20, 110, 90]]), "labels": torch.tensor([0, 2])},
           {"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1])}]


def _model(*overrides):
    torch.manual_seed(0)
    cfg = load_config("", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.DETECTOR", "retinanet",
                           "MODEL.NUM_CLASSES", 3, "MODEL.FPN.OUT_CHANNELS", 32, "INPUT.MIN_SIZE_TRAIN", "(96,)",
                           "INPUT.MAX_SIZE_TRAIN", 1000, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 1000,
                           *overrides])
    return build_detector(cfg)


def _head_and_anchors(model):
    il, targets = model.transform(list(IMAGES), [dict(t) for t in TARGETS])
    features = list(model.backbone(il.tensors).values())
    return targets, model.head(features), model.anchor_generator(il, features)


def test_per_image_losses_are_torchvisions():
    model = _model()
    targets, outputs, anchors = _head_and_anchors(model)
    ours = model.compute_loss(targets, outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, outputs, anchors)
    for k in ("classification", "bbox_regression"):
        torch.testing.assert_close(ours[k], theirs[k])
    # an image without boxes: only background anchors, as in torchvision
    empty = [targets[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    ours, theirs = model.compute_loss(empty, outputs, anchors), RetinaNet.compute_loss(model, empty, outputs, anchors)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k])


def test_ema_normaliser_and_beta():
    """"ema": the batch's summed losses over an EMA of the batch's foreground count (momentum
    0.9, from 100), updated at every call; each image's sum is its torchvision loss (its own sum
    over its own count) times its count."""
    model = _model("MODEL.RETINANET.LOSS_NORMALIZER", "ema")
    targets, outputs, anchors = _head_and_anchors(model)
    sums = {"classification": 0.0, "bbox_regression": 0.0}
    n = 0
    for i, (t, a) in enumerate(zip(targets, anchors)):
        count = int((model.proposal_matcher(box_iou(t["boxes"], a)) >= 0).sum())
        alone = RetinaNet.compute_loss(model, [t], {k: v[i:i + 1] for k, v in outputs.items()}, [a])
        for k in sums:
            sums[k] = sums[k] + alone[k] * count
        n += count
    assert n > 0
    norm = 100.0
    for _ in range(2):
        norm = 0.9 * norm + 0.1 * n
        losses = model.compute_loss(targets, outputs, anchors)
        for k in sums:
            torch.testing.assert_close(losses[k], sums[k] / norm)
    # beta 0.5 lowers the box loss only
    smooth = _model("MODEL.RETINANET.LOSS_NORMALIZER", "ema", "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.5)
    s = smooth.compute_loss(*_head_and_anchors(smooth))
    torch.testing.assert_close(s["classification"], sums["classification"] / (0.9 * 100 + 0.1 * n))
    assert 0 < s["bbox_regression"] < sums["bbox_regression"] / (0.9 * 100 + 0.1 * n)


def test_detections_clipped_after_nms_are_inside_and_nonempty():
    model = _model("MODEL.RETINANET.NMS_ON_CLIPPED_BOXES", False, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0).eval()
    with torch.no_grad():
        out = model(list(IMAGES))
    for image, det in zip(IMAGES, out):
        b = det["boxes"]
        assert len(b) == 100  # TEST.DETECTIONS_PER_IMAGE
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= image.shape[2]).all() and (b[:, 3] <= image.shape[1]).all()
        assert ((b[:, 2:] - b[:, :2]) > 0).all()


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="MODEL.RETINANET.LOSS_NORMALIZER"):
        _model("MODEL.RETINANET.LOSS_NORMALIZER", "batch")
    with pytest.raises(ValueError, match="MODEL.RETINANET.SMOOTH_L1_LOSS_BETA"):
        _model("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", -0.1)
