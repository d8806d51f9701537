import pytest
import torch
import torchvision

from soco_d2.checkpoint.layout import ConversionError
from soco_d2.checkpoint.to_d2 import convert_to_d2
from soco_d2.checkpoint.validate import expected_backbone_shapes, infer_depth


def test_resnet18_and_depth_inference():
    r = torchvision.models.resnet18()
    d2, report = convert_to_d2(r.state_dict(), parts=["backbone"])
    assert report.depth == 18 and "res2.1.conv2.weight" in d2 and "res2.0.conv3.weight" not in d2
    for depth in (18, 34, 50, 101, 152):
        assert infer_depth(dict.fromkeys(expected_backbone_shapes(depth)))[0] == depth


def test_old_checkpoint_without_num_batches_tracked_converts():
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches" not in k}
    d2, _ = convert_to_d2(sd, parts=["backbone"])
    assert "stem.conv1.norm.running_var" in d2


def test_wrong_depth_refused():
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(ConversionError, match=r"expected a ResNet-34 but the checkpoint holds a ResNet-18"):
        convert_to_d2(sd, parts=["backbone"], depth=34)


def test_missing_backbone_key_refused():
    sd = torchvision.models.resnet18().state_dict()
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(ConversionError, match=r"res4\.1\.conv2\.norm\.running_var"):
        convert_to_d2(sd, parts=["backbone"], depth=18)
    sd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ConversionError, match=r"cannot infer the ResNet depth.*\(2, 2, 2, 1\)"):
        convert_to_d2(sd, parts=["backbone"])


def test_wrong_shape_refused():
    sd = torchvision.models.resnet18().state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ConversionError, match=r"res3\.0\.conv1\.weight: \(128, 64, 1, 1\) instead of \(128, 64, 3, 3\)"):
        convert_to_d2(sd, parts=["backbone"])


def test_missing_fpn_and_head_keys_refused(small_soco_state):
    sd = {k: v for k, v in small_soco_state.items() if k != "backbone.fpn.layer_blocks.2.1.running_var"}
    with pytest.raises(ConversionError, match=r"fpn_output4\.norm\.running_var"):
        convert_to_d2(sd)
    sd = {k: v for k, v in small_soco_state.items() if not k.startswith("box_head.2.")}
    with pytest.raises(ConversionError, match=r"box head"):
        convert_to_d2(sd)
