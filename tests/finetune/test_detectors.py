import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet, maskrcnn_resnet50_fpn_v2

from soco_d2.config import load_config
from soco_d2.finetune.detectors import build_detector, first_label


def _cfg(*overrides):
    return load_config("", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, *overrides])


def test_mask_rcnn_r50_is_torchvisions_v2_design():
    torch.manual_seed(0)
    ours = build_detector(load_config("", ["MODEL.DEVICE", "cpu"]))
    ref = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=81)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert all(p.requires_grad for p in ours.parameters())  # FREEZE_AT 0: every layer trains
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.roi_heads.box_head.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.roi_heads.mask_head.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.backbone.fpn.modules()) == 8


def test_retinanet_follows_detectron2():
    model = build_detector(_cfg("MODEL.DETECTOR", "retinanet", "MODEL.NUM_CLASSES", 5))
    assert isinstance(model, RetinaNet)
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 512  # P6 from C5 (R-18: 512)
    assert not model.backbone.fpn.extra_blocks.use_P5
    assert not any(isinstance(m, nn.GroupNorm) for m in model.head.modules())
    assert model.head.regression_head._loss_type == "l1"
    assert model.head.classification_head.num_classes == 5
    assert first_label(_cfg("MODEL.DETECTOR", "retinanet")) == 0
    assert first_label(_cfg()) == 1


def test_train_and_test_sizes_and_normalisation():
    cfg = _cfg("INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", 150,
               "INPUT.MIN_SIZE_TEST", 80, "INPUT.MAX_SIZE_TEST", 120)
    model = build_detector(cfg)
    t = model.transform
    assert (t.min_size, t.max_size) == ((64, 96), 150)
    model.eval()
    assert (t.min_size, t.max_size) == ((80,), 120)
    image = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1).expand(3, 40, 60).clone()
    batch, _ = t([image])
    assert batch.tensors.shape[-2:] == (96, 128)  # 80 x 120 padded to multiples of 32
    assert batch.image_sizes == [(80, 120)]
    assert batch.tensors[:, :, :80, :120].abs().max() < 1e-4  # mean pixel -> 0
    model.train()
    sizes = {t(([torch.zeros(3, 40, 60)]))[0].image_sizes[0][0] for _ in range(30)}
    assert sizes == {64, 96}  # short side drawn from MIN_SIZE_TRAIN


def test_freeze_at():
    model = build_detector(_cfg("MODEL.BACKBONE.FREEZE_AT", 2))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.body.conv1.weight" in frozen and "backbone.body.layer1.0.conv1.weight" in frozen
    assert not any(n.startswith("backbone.body.layer2") for n in frozen)


def test_box_only_and_bad_values():
    model = build_detector(_cfg("MODEL.MASK_ON", False))
    assert isinstance(model, FasterRCNN) and not isinstance(model, MaskRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    with pytest.raises(ValueError, match="MODEL.DETECTOR"):
        build_detector(_cfg("MODEL.DETECTOR", "yolo"))
    with pytest.raises(ValueError, match="MODEL.FPN.NORM"):
        build_detector(_cfg("MODEL.FPN.NORM", "GN"))


def test_training_forward_returns_losses(tiny_overrides):
    from soco_d2.config import load_config as lc

    model = build_detector(lc("", tiny_overrides))
    images = [torch.rand(3, 64, 80) * 255, torch.rand(3, 72, 64) * 255]
    targets = [{"boxes": torch.tensor([[5.0, 5, 40, 30]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 80, dtype=torch.uint8)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 72, 64, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_two_fc_box_head_of_the_moco_recipe():
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    model = build_detector(_cfg("MODEL.ROI_BOX_HEAD.NUM_CONV", 0, "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
                                "MODEL.ROI_BOX_HEAD.NORM", "", "MODEL.ROI_MASK_HEAD.NORM", ""))
    assert isinstance(model.roi_heads.box_head, TwoMLPHead)
    assert "roi_heads.box_head.fc7.weight" in model.state_dict()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.mask_head.modules())


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_fpn_width_follows_the_config(detector):
    """A SoCo FPN pretrained at another width must fit the detector's FPN and heads."""
    model = build_detector(_cfg("MODEL.DETECTOR", detector, "MODEL.FPN.OUT_CHANNELS", 64))
    assert model.backbone.out_channels == 64
    assert model.backbone.fpn.inner_blocks[0][0].out_channels == 64
    x = [torch.rand(3, 64, 64)]
    model.eval()
    with torch.no_grad():
        model(x)
