import pytest
import torch
import torchvision

from soco_d2.config import get_cfg
from soco_d2.modeling.heads import (
    MLP, box_head_output_dim, build_box_head, build_predictor, build_projector,
)


def test_box_head_keys_match_torchvision_maskrcnn_v2():
    head = build_box_head(get_cfg(), 256)
    ref = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None
    ).roi_heads.box_head.state_dict()
    ours = head.state_dict()
    assert sorted(ours) == sorted(ref)
    assert all(ours[k].shape == v.shape for k, v in ref.items())
    assert head(torch.randn(3, 256, 7, 7)).shape == (3, 1024)
    assert box_head_output_dim(get_cfg(), 256) == 1024


def test_box_head_without_norm_and_bad_norm():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.NORM", "", "MODEL.ROI_BOX_HEAD.NUM_CONV", 1,
                         "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 16])
    head = build_box_head(cfg, 4)
    assert head[0][0].bias is not None and len(head[0]) == 2  # conv (with bias) + ReLU
    assert head(torch.randn(2, 4, 7, 7)).shape == (2, 16)
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN"
    with pytest.raises(ValueError, match="ROI_BOX_HEAD.NORM"):
        build_box_head(cfg, 4)


def test_mlp_dims_from_config():
    cfg = get_cfg()
    proj, pred = build_projector(cfg, 1024), build_predictor(cfg)
    assert [tuple(p.shape) for p in proj.parameters()] == [
        (4096, 1024), (4096,), (4096,), (4096,), (256, 4096), (256,)
    ]
    assert pred[0].in_features == 256 and pred[3].out_features == 256


def test_mlp_hand_computed():
    mlp = MLP(1, 1, 1)
    with torch.no_grad():
        mlp[0].weight.fill_(2.0)
        mlp[0].bias.fill_(1.0)
        mlp[3].weight.fill_(3.0)
        mlp[3].bias.fill_(0.5)
    # Linear: 2x + 1 on x = (0, 1) -> (1, 3); BN (batch stats, eps 1e-5) -> (-1, 1) * 1/sqrt(1 + 1e-5);
    # ReLU -> (0, 0.99999); Linear 3 h + 0.5 -> (0.5, 3.5).
    out = mlp(torch.tensor([[0.0], [1.0]]))
    expected = torch.tensor([[0.5], [0.5 + 3 / (1 + 1e-5) ** 0.5]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("num_conv, num_fc, expected", [
    (0, 0, 4 * 5 * 5),  # flattened pooled features
    (1, 0, 8 * 5 * 5),  # flattened conv output
    (2, 0, 8 * 5 * 5),
    (0, 1, 16),
])
def test_box_head_output_dim_is_the_heads_output_width(num_conv, num_fc, expected):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.NUM_CONV", num_conv, "MODEL.ROI_BOX_HEAD.NUM_FC", num_fc,
                         "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 16,
                         "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5])
    assert box_head_output_dim(cfg, 4) == expected
    assert build_box_head(cfg, 4)(torch.randn(2, 4, 5, 5)).shape == (2, expected)
