import glob
import logging
import os

import pytest
import torch
import torchvision

from soco_d2.config import load_config
from soco_d2.finetune.detectors import build_detector
from soco_d2.finetune.weights import WeightsLoadingError, load_detector_weights

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../configs/finetune/*.yaml")))
COCO_1X = [c for c in CONFIGS if os.path.basename(c) == "mask_rcnn_R50_FPN_1x.yaml"][0]


def _tiny_model(tiny_overrides, seed):
    torch.manual_seed(seed)
    return build_detector(load_config(COCO_1X, tiny_overrides))


def test_load_detector_state_dict(tiny_overrides, tmp_path):
    src = _tiny_model(tiny_overrides, 1)
    path = str(tmp_path / "det.pth")
    torch.save({"model": src.state_dict(), "iteration": 5}, path)
    dst = _tiny_model(tiny_overrides, 2)
    report = load_detector_weights(dst, path)
    assert report["missing"] == [] and report["unused"] == []
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_load_bare_torchvision_resnet(tiny_overrides, tmp_path, caplog):
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    path = str(tmp_path / "r18.pth")
    torch.save(resnet.state_dict(), path)
    dst = _tiny_model(tiny_overrides, 2)
    fpn_before = dst.backbone.fpn.inner_blocks[0][0].weight.clone()
    log = logging.getLogger("soco_d2")
    log.addHandler(caplog.handler)  # the soco_d2 logger may not propagate (setup_logging)
    caplog.set_level("INFO", logger="soco_d2")
    try:
        report = load_detector_weights(dst, path)
    finally:
        log.removeHandler(caplog.handler)
    torch.testing.assert_close(dst.backbone.body.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    torch.testing.assert_close(dst.backbone.fpn.inner_blocks[0][0].weight, fpn_before)
    assert "backbone.body.fc.weight" in report["unused"]
    log = caplog.text
    assert "Loaded from" in log and "backbone.body (100)" in log  # 100 tensors
    assert "Left at initialisation" in log and "backbone.fpn" in log
    assert any(k.startswith("backbone.fpn") for k in report["missing"])


def test_load_detectron2_pkl(tiny_overrides, tmp_path):
    from soco_d2.checkpoint import convert_to_d2, save_d2_pkl

    src = _tiny_model(tiny_overrides, 1)
    d2, _ = convert_to_d2(src.state_dict(), parts=("backbone", "fpn", "head"), allow_unmapped=True)
    path = str(tmp_path / "w.pkl")
    save_d2_pkl(d2, path)
    dst = _tiny_model(tiny_overrides, 2)
    rpn_before = dst.rpn.head.conv[0][0].weight.clone()
    report = load_detector_weights(dst, path)
    sd, ref = dst.state_dict(), src.state_dict()
    for prefix in ("backbone.body.", "backbone.fpn.", "roi_heads.box_head."):
        keys = [k for k in ref if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
        assert keys and all(k in report["loaded"] for k in keys)
        for k in keys:
            torch.testing.assert_close(sd[k], ref[k])
    torch.testing.assert_close(dst.rpn.head.conv[0][0].weight, rpn_before)  # not in the file


def test_weights_errors(tiny_overrides, tmp_path):
    model = _tiny_model(tiny_overrides, 0)
    with pytest.raises(WeightsLoadingError, match="does not exist"):
        load_detector_weights(model, str(tmp_path / "missing.pkl"))
    path = str(tmp_path / "other.pth")
    torch.save({"encoder.fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsLoadingError, match="No backbone weight"):
        load_detector_weights(model, path)
    # Right names, wrong depth: the first blocks match, the rest does not.
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsLoadingError, match="only in part.*MODEL.RESNETS.DEPTH"):
        load_detector_weights(model, path)
