import pytest
import torch
import torchvision
from torch import nn

from soco_d2.config import get_cfg
from soco_d2.modeling.backbone import FPN_LEVEL_NAMES, build_resnet_fpn_backbone


def _cfg(depth=50, **overrides):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def test_r50_state_dict_matches_torchvision_maskrcnn_v2_backbone():
    ours = build_resnet_fpn_backbone(_cfg(50)).state_dict()
    ref = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None
    ).backbone.state_dict()
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].shape == v.shape, k
    assert "fpn.inner_blocks.0.1.weight" in ours and "fpn.inner_blocks.0.0.bias" not in ours


@pytest.mark.parametrize("depth,c5", [(18, 512), (34, 512)])
def test_small_depths_give_p2_to_p5(depth, c5):
    bb = build_resnet_fpn_backbone(_cfg(depth, **{"MODEL.FPN.OUT_CHANNELS": 32}))
    assert bb.fpn.inner_blocks[3][0].in_channels == c5
    out = bb(torch.zeros(2, 3, 112, 112))
    assert list(out) == FPN_LEVEL_NAMES  # no extra P6 level
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 32, 28, 28), (2, 32, 14, 14), (2, 32, 7, 7), (2, 32, 4, 4)
    ]


def test_zero_init_residual_and_fpn_norm_switch():
    bb = build_resnet_fpn_backbone(_cfg(18))
    assert torch.all(bb.body.layer1[0].bn2.weight == 0)
    bb = build_resnet_fpn_backbone(
        _cfg(18, **{"MODEL.RESNETS.ZERO_INIT_RESIDUAL": False, "MODEL.FPN.NORM": ""})
    )
    assert torch.all(bb.body.layer1[0].bn2.weight == 1)
    lateral = bb.fpn.inner_blocks[0]
    assert len(lateral) == 1 and lateral[0].bias is not None  # plain conv with bias, no BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.fpn.modules())


def test_bad_norm_names_the_key():
    with pytest.raises(ValueError, match="MODEL.FPN.NORM"):
        build_resnet_fpn_backbone(_cfg(18, **{"MODEL.FPN.NORM": "GN"}))
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH"):
        build_resnet_fpn_backbone(_cfg(26))
