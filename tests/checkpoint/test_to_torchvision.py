import numpy as np
import pytest
import torch

from soco_d2.checkpoint.layout import ConversionError
from soco_d2.checkpoint.to_d2 import convert_to_d2
from soco_d2.checkpoint.to_torchvision import convert_to_torchvision, d2_to_torchvision


@pytest.fixture(scope="module")
def maskrcnn_v2():
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)


def _assert_loads(model, tv, required):
    result = model.load_state_dict(tv, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(required)]
    assert not missing, missing[:10]
    assert not result.unexpected_keys, result.unexpected_keys[:10]


def test_d2_to_torchvision_loads_into_maskrcnn_v2(soco_state, modules, maskrcnn_v2):
    d2, _ = convert_to_d2(soco_state)
    tv, skipped = d2_to_torchvision(d2)
    assert not skipped
    _assert_loads(maskrcnn_v2, tv, ("backbone.", "roi_heads.box_head."))
    sd = maskrcnn_v2.state_dict()
    assert torch.equal(sd["backbone.body.layer3.4.bn2.weight"], modules["bb"].body.layer3[4].bn2.weight)
    assert torch.equal(sd["backbone.fpn.layer_blocks.1.0.weight"], modules["bb"].fpn.layer_blocks[1][0].weight)
    assert torch.equal(sd["roi_heads.box_head.5.weight"], modules["head"][5].weight)
    # the same state as the project's own SoCo names: conversion there and back is the identity
    for k, v in soco_state.items():
        if k.startswith("backbone."):
            assert torch.equal(tv[k], v), k
        elif k.startswith("box_head."):
            assert torch.equal(tv["roi_heads." + k], v), k
    tv2, report = convert_to_torchvision(soco_state)
    assert tv2.keys() == tv.keys() and report.mapped["box_head.0.1.weight"] == "roi_heads.box_head.0.1.weight"


def test_d2_to_torchvision_accepts_qualified_and_moco_names(soco_state, maskrcnn_v2):
    d2, _ = convert_to_d2(soco_state)
    qualified = {}
    for k, v in d2.items():
        if k.startswith(("stem.", "res")):
            qualified["backbone.bottom_up." + k] = v
        elif k.startswith("fpn_"):
            qualified["backbone." + k] = v
        else:
            qualified["roi_heads." + k] = v
    qualified["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), np.float32)
    tv_short, _ = d2_to_torchvision(d2)
    tv_q, skipped = d2_to_torchvision(qualified)
    assert tv_q.keys() == tv_short.keys()
    assert all(torch.equal(tv_q[k], tv_short[k]) for k in tv_q)
    assert list(skipped) == ["roi_heads.box_predictor.cls_score.weight"]
    # a MoCo/DetCo backbone-only .pkl (stem./res names, stray stem.fc) loads its body
    moco = {k: v for k, v in d2.items() if k.startswith(("stem.", "res"))}
    moco["stem.fc.0.weight"] = np.zeros((4, 4), np.float32)
    tv_m, skipped = d2_to_torchvision(moco)
    assert list(skipped) == ["stem.fc.0.weight"]
    _assert_loads(maskrcnn_v2, tv_m, ("backbone.body.",))


def test_d2_c4_model_to_torchvision(soco_state):
    d2, _ = convert_to_d2(soco_state, parts=["backbone"])
    c4 = {("roi_heads." if k.startswith("res5") else "backbone.") + k: v for k, v in d2.items()}
    tv, skipped = d2_to_torchvision(c4)
    assert len(tv) == len(d2) and not skipped and "backbone.body.layer4.2.bn3.bias" in tv
    # convert_to_d2 also reads the C4 layout (res5 in the ROI heads)
    d2_back, report = convert_to_d2(c4, parts=["backbone"])
    assert set(d2_back) == set(d2) and report.depth == 50


def test_d2_to_torchvision_retinanet_levels(soco_state):
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    d2, _ = convert_to_d2(soco_state, parts=["backbone", "fpn"])
    tv, skipped = d2_to_torchvision(d2, fpn_levels=(3, 4, 5))
    assert tv["backbone.fpn.inner_blocks.0.0.weight"].shape == (256, 512, 1, 1)
    assert sorted(skipped) == sorted(k for k in d2 if k.startswith(("fpn_lateral2", "fpn_output2")))
    model = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None)
    body = {k: v for k, v in tv.items() if k.startswith("backbone.body.") or k.endswith(".0.weight")}
    _assert_loads(model, body, ("backbone.body.",))


def test_d2_to_torchvision_two_fc_head():
    d2 = {"box_head.fc1.weight": np.ones((1024, 12544), np.float32), "box_head.fc2.bias": np.ones(1024, np.float32)}
    tv, _ = d2_to_torchvision(d2)
    # FastRCNNConvFCHead((256, 7, 7), [], [1024, 1024]): Flatten at 0, fc at 1 and 3
    assert set(tv) == {"roi_heads.box_head.1.weight", "roi_heads.box_head.3.bias"}
    with pytest.raises(ConversionError, match="no detectron2"):
        d2_to_torchvision({"rpn.head.weight": np.ones(1)})
