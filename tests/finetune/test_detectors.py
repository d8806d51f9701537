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
    assert model.head.classification_head.num_classes == 5
    # torchvision's losses and postprocessing unless the config selects detectron2's
    assert (model.loss_normalizer, model.smooth_l1_beta, model.nms_on_clipped_boxes) == ("per_image", 0.0, True)
    # torchvision's anchor sizes (truncated octaves) unless ROUND_CELL_ANCHORS is False
    assert model.anchor_generator.sizes[0] == (32, 40, 50)
    exact = build_detector(_cfg("MODEL.DETECTOR", "retinanet", "MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", False))
    assert exact.anchor_generator.sizes[1] == pytest.approx((64, 64 * 2 ** (1 / 3), 64 * 2 ** (2 / 3)))
    # P6 from C5 also when C5 has the FPN's width (torchvision's class would take P5 then)
    same_width = build_detector(_cfg("MODEL.DETECTOR", "retinanet", "MODEL.FPN.OUT_CHANNELS", 512))
    assert not same_width.backbone.fpn.extra_blocks.use_P5
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


def test_detectron2_choices_aligned_roi_align_and_unrounded_anchors():
    from torchvision.ops import roi_align

    from soco_d2.finetune.detectors import AlignedMultiScaleRoIAlign, ConfigurableAnchorGenerator

    model = build_detector(_cfg("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2", "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
                                "ROIAlignV2", "MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", False,
                                "MODEL.RPN.NUM_CONV", 1))
    assert isinstance(model.roi_heads.box_roi_pool, AlignedMultiScaleRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, AlignedMultiScaleRoIAlign)
    assert len(model.rpn.head.conv) == 1
    # detectron2's cell anchors for size 32: w = 32 / sqrt(r), h = 32 sqrt(r), not rounded
    cell = model.rpn.anchor_generator.cell_anchors[0]
    s = 2 ** 0.5
    torch.testing.assert_close(cell, torch.tensor([[-16 * s, -8 * s, 16 * s, 8 * s], [-16.0, -16.0, 16.0, 16.0],
                                                   [-8 * s, -16 * s, 8 * s, 16 * s]]))
    assert isinstance(model.rpn.anchor_generator, ConfigurableAnchorGenerator)
    rounded = build_detector(_cfg()).rpn.anchor_generator.cell_anchors[0]
    assert torch.equal(rounded, rounded.round()) and not torch.equal(rounded, cell)

    # the aligned pooler = roi_align(aligned=True) on each box's level (torchvision's mapper)
    pool = model.roi_heads.box_roi_pool
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(1, 4, 64 // 2 ** i, 64 // 2 ** i, generator=g) for i, k in enumerate("0123")}
    boxes = [torch.tensor([[3.0, 4.0, 20.0, 30.0], [1.0, 2.0, 250.0, 200.0], [10.0, 10.0, 130.0, 90.0]])]
    out = pool(feats, boxes, [(256, 256)])
    levels = pool.map_levels(boxes)
    assert levels.tolist() == [0, 1, 0]  # sqrt(wh) 21, 222, 98 px: P2, P3, P2 (canonical 224 at P4)
    for i, lvl in enumerate(levels.tolist()):
        scale = 1 / 4 / 2 ** lvl
        ref = roi_align(feats[str(lvl)], [boxes[0][i:i + 1]], 7, spatial_scale=scale, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[i:i + 1], ref)
    unaligned = build_detector(_cfg()).roi_heads.box_roi_pool(feats, boxes, [(256, 256)])
    assert not torch.allclose(out, unaligned)
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.POOLER_TYPE"):
        build_detector(_cfg("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIPool"))


def test_anchor_order_and_strides_of_detectron2():
    """detectron2's cell anchors are listed size-major, torchvision's ratio-major; detectron2
    spaces a level's anchors by its stride, torchvision by padded image size // feature size."""
    from torchvision.models.detection.image_list import ImageList

    from soco_d2.finetune.detectors import ConfigurableAnchorGenerator

    sizes, ratios = ((32, 64),), ((0.5, 2.0),)
    d2 = ConfigurableAnchorGenerator(sizes, ratios, round_cell_anchors=False, strides=[64])
    tv = ConfigurableAnchorGenerator(sizes, ratios)
    wh = lambda a: (a[:, 2:] - a[:, :2]).round().tolist()  # noqa: E731
    assert wh(d2.cell_anchors[0]) == [[45, 23], [23, 45], [91, 45], [45, 91]]  # size-major
    assert wh(tv.cell_anchors[0]) == [[46, 22], [90, 46], [22, 46], [46, 90]]  # ratio-major, rounded
    # a 128 x 224 batch: a P6 map is 2 x 4 (224 / 64 = 3.5 rounded up)
    images = ImageList(torch.zeros(1, 3, 128, 224), [(128, 224)])
    feature = [torch.zeros(1, 1, 2, 4)]
    centres = lambda a: ((a[::4, :2] + a[::4, 2:]) / 2).tolist()  # noqa: E731
    assert centres(d2(images, feature)[0]) == [[x, y] for y in (0, 64) for x in (0, 64, 128, 192)]
    assert centres(tv(images, feature)[0]) == [[x, y] for y in (0, 64) for x in (0, 56, 112, 168)]
    with pytest.raises(ValueError, match="strides"):
        ConfigurableAnchorGenerator(sizes * 2, ratios * 2, strides=[64])


def test_box_loss_betas_of_the_rpn_and_the_roi_heads(tiny_overrides):
    """torchvision's beta 1/9 keeps torchvision's losses; another beta changes the RPN and RoI
    box losses only, and beta 0 is an L1 loss."""
    from soco_d2.config import load_config as lc
    from soco_d2.finetune.retinanet import box_regression_loss

    images = [torch.rand(3, 64, 80) * 255, torch.rand(3, 72, 64) * 255]
    targets = [{"boxes": torch.tensor([[5.0, 5, 40, 30], [30, 20, 70, 60]]), "labels": torch.tensor([1, 2]),
                "masks": torch.zeros(2, 64, 80, dtype=torch.uint8)},
               {"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1]),
                "masks": torch.ones(1, 72, 64, dtype=torch.uint8)}]

    def losses(*betas):
        torch.manual_seed(0)
        model = build_detector(lc("", tiny_overrides + ["MODEL.RPN.SMOOTH_L1_BETA", betas[0],
                                                        "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", betas[1]]))
        torch.manual_seed(1)  # same train size and samples
        return model(images, targets)

    tv = losses(1 / 9, 1 / 9)
    # the recomputed losses with a beta next to 1/9 (torchvision's own loss code is used at 1/9)
    near = losses(1 / 9 + 1e-9, 1 / 9 + 1e-9)
    for k in tv:
        torch.testing.assert_close(near[k], tv[k])
    l1 = losses(0.0, 0.0)
    for k in ("loss_objectness", "loss_classifier", "loss_mask"):
        torch.testing.assert_close(l1[k], tv[k])
    for k in ("loss_rpn_box_reg", "loss_box_reg"):
        assert l1[k] > tv[k] > 0  # |x| exceeds smooth L1 everywhere but at 0
    x, y = torch.tensor([0.0, 0.05, 2.0]), torch.zeros(3)
    assert box_regression_loss(x, y, 0.0) == pytest.approx(2.05)
    assert box_regression_loss(x, y, 0.5) == pytest.approx(0.5 * 0.05 ** 2 / 0.5 + 2.0 - 0.25)
    with pytest.raises(ValueError, match="MODEL.RPN.SMOOTH_L1_BETA"):
        losses(-1.0, 0.0)
