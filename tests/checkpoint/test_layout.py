from collections import Counter

import numpy as np
import pytest
import torch
import torchvision

from soco_d2.checkpoint.layout import ConversionError
from soco_d2.checkpoint.to_d2 import convert_to_d2
from soco_d2.checkpoint.to_torchvision import convert_to_torchvision
from soco_d2.checkpoint.validate import expected_backbone_shapes

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from weight_layouts import (  # noqa: E402
    assert_covers,
    d2_align,
    detco_state,
    official_soco_state,
    prefixed,
    randomize,
)


def test_soco_project_layout_matches_detectron2_fpn_model(soco_state, modules, d2_shapes):
    d2, report = convert_to_d2(soco_state)
    assert report.depth == 50 and not report.unmapped
    fpn = d2_shapes["mask_rcnn_R_50_FPN_4conv1fc_BN"]
    assert_covers(fpn, d2, lambda k: k.startswith("backbone.") or k.startswith("roi_heads.box_head."))
    # every output key lands somewhere in the detectron2 model
    assert set(d2_align(fpn, d2).values()) == set(d2)
    # values carried over exactly
    bb, head = modules["bb"], modules["head"]
    np.testing.assert_array_equal(d2["res4.3.conv2.weight"], bb.body.layer3[3].conv2.weight.detach().numpy())
    np.testing.assert_array_equal(d2["res3.0.shortcut.norm.running_var"],
                                  bb.body.layer2[0].downsample[1].running_var.numpy())
    np.testing.assert_array_equal(d2["fpn_lateral3.norm.bias"], bb.fpn.inner_blocks[1][1].bias.detach().numpy())
    np.testing.assert_array_equal(d2["fpn_output5.weight"], bb.fpn.layer_blocks[3][0].weight.detach().numpy())
    np.testing.assert_array_equal(d2["box_head.conv3.norm.running_mean"], head[2][1].running_mean.numpy())
    np.testing.assert_array_equal(d2["box_head.fc1.weight"], head[5].weight.detach().numpy())
    assert d2["stem.conv1.norm.num_batches_tracked"] == bb.body.bn1.num_batches_tracked.item()
    # what was dropped, and why
    reasons = Counter(report.dropped.values())
    assert reasons["target branch"] == len([k for k in soco_state if k.startswith("target_backbone.")]) + len(
        [k for k in soco_state if k.startswith("target_box_head.")])
    assert reasons["projector"] == len([k for k in soco_state if "projector." in k])
    assert reasons["predictor"] == len([k for k in soco_state if k.startswith("predictor.")])
    assert len(report.mapped) + len(report.dropped) == len(soco_state)


def test_target_branch(soco_state, modules):
    d2, report = convert_to_d2(soco_state, branch="target")
    np.testing.assert_array_equal(d2["res2.0.conv1.weight"],
                                  modules["bb_t"].body.layer1[0].conv1.weight.detach().numpy())
    np.testing.assert_array_equal(d2["box_head.fc1.bias"], modules["head_t"][5].bias.detach().numpy())
    assert report.dropped["backbone.body.conv1.weight"] == "online branch"


def test_parts_subset_drops_the_rest(small_soco_state):
    d2, report = convert_to_d2(small_soco_state, parts=("backbone",))
    assert not any(k.startswith(("fpn_", "box_head.")) for k in d2)
    assert report.dropped["backbone.fpn.inner_blocks.0.0.weight"] == "part not requested (fpn)"
    assert report.dropped["box_head.5.weight"] == "part not requested (head)"


def test_official_soco_layout(modules, d2_shapes):
    ckpt = official_soco_state(modules)
    d2, report = convert_to_d2(ckpt)
    assert_covers(d2_shapes["mask_rcnn_R_50_FPN_4conv1fc_BN"], d2,
                  lambda k: k.startswith("backbone.") or k.startswith("roi_heads.box_head."))
    bb, head = modules["bb"], modules["head"]
    np.testing.assert_array_equal(d2["fpn_lateral2.weight"], bb.fpn.inner_blocks[0][0].weight.detach().numpy())
    np.testing.assert_array_equal(d2["fpn_output4.norm.running_mean"], bb.fpn.layer_blocks[2][1].running_mean.numpy())
    np.testing.assert_array_equal(d2["box_head.conv2.norm.weight"], head[1][1].weight.detach().numpy())
    np.testing.assert_array_equal(d2["res5.2.conv3.norm.bias"], bb.body.layer4[2].bn3.bias.detach().numpy())
    assert report.dropped["module.encoder_k.conv1.weight"] == "target branch"
    assert report.dropped["module.neck_k.lateral_convs.0.conv.weight"] == "target branch"
    assert report.dropped["module.projector.linear1.weight"] == "projector"
    d2_t, _ = convert_to_d2(ckpt, branch="target")
    np.testing.assert_array_equal(d2_t["box_head.fc1.weight"], modules["head_t"][5].weight.detach().numpy())


def test_detco_layout_covers_c4_fpn_and_retinanet_backbones(modules, d2_shapes):
    d2, report = convert_to_d2(detco_state(modules), parts=("backbone",))
    assert report.depth == 50 and not report.unmapped
    assert_covers(d2_shapes["mask_rcnn_R_50_C4"], d2,
                  lambda k: k.startswith("backbone.") or k.startswith("roi_heads.res5."))
    for model in ("mask_rcnn_R_50_FPN_4conv1fc_BN", "mask_rcnn_R_50_FPN_2fc_plain", "retinanet_R_50_FPN"):
        assert_covers(d2_shapes[model], d2, lambda k: k.startswith("backbone.bottom_up."))
    np.testing.assert_array_equal(d2["res5.1.conv1.weight"], modules["bb"].body.layer4[1].conv1.weight.detach().numpy())
    assert Counter(report.dropped.values()) == Counter(
        {"target branch": len(expected_backbone_shapes(50)), "head (not transferred)": 8, "queue": 4})


def test_detco_default_parts_names_missing_parts(modules):
    with pytest.raises(ConversionError, match=r"\['fpn', 'head'\] not found.*--parts backbone"):
        convert_to_d2(detco_state(modules))


def test_moco_layout(modules, tmp_path):
    sd = prefixed(modules["bb"].body, "module.encoder_q.")
    sd.update(prefixed(modules["bb_t"].body, "module.encoder_k."))
    for enc in ("encoder_q", "encoder_k"):
        sd[f"module.{enc}.fc.0.weight"] = torch.randn(2048, 2048)
        sd[f"module.{enc}.fc.2.bias"] = torch.randn(128)
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"state_dict": sd, "epoch": 200, "arch": "resnet50"}, tmp_path / "moco.pth.tar")
    d2, report = convert_to_d2(tmp_path / "moco.pth.tar", parts="backbone")
    assert set(d2) == set(expected_backbone_shapes(50))
    np.testing.assert_array_equal(d2["stem.conv1.weight"], modules["bb"].body.conv1.weight.detach().numpy())
    assert report.dropped["module.encoder_q.fc.0.weight"] == "classifier (fc)"
    assert report.dropped["module.queue_ptr"] == "queue"


def test_torchvision_resnet_state_dict():
    r = randomize(torchvision.models.resnet50(), 5)
    d2, report = convert_to_d2(r.state_dict(), parts=["backbone"], depth=50)
    assert set(d2) == set(expected_backbone_shapes(50)) and len(d2) == 318  # as detectron2's R-50
    assert report.dropped == {"fc.weight": "classifier (fc)", "fc.bias": "classifier (fc)"}
    np.testing.assert_array_equal(d2["res3.2.conv2.norm.weight"], r.layer2[2].bn2.weight.detach().numpy())


def test_unknown_layout_lists_keys_and_known_layouts():
    sd = {"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "encoder.norm.bias": torch.zeros(3)}
    with pytest.raises(ConversionError) as e:
        convert_to_d2(sd)
    msg = str(e.value)
    assert "encoder.blocks.0.attn.qkv.weight" in msg and "Known layouts" in msg and "ResNet, torchvision names" in msg


def test_ambiguous_online_backbones_refused(modules):
    sd = prefixed(modules["bb"].body, "encoder_q.")
    sd.update(prefixed(modules["bb"].body, "backbone."))
    with pytest.raises(ConversionError, match="ambiguous"):
        convert_to_d2(sd, parts=["backbone"])


def test_unmappable_official_key_named_with_what_its_block_expects(modules):
    ckpt = official_soco_state(modules)
    ckpt["model"]["module.encoder.layer1.0.se.fc.weight"] = torch.zeros(4, 4)
    with pytest.raises(ConversionError) as e:
        convert_to_d2(ckpt)
    msg = str(e.value)
    assert "'module.encoder.layer1.0.se.fc.weight' (inside the ResNet, torchvision names block at 'module.encoder.'" in msg
    assert "layer1.0.conv1.weight" in msg and "--allow-unmapped" in msg


def _small_cfg(arch):
    from soco_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", arch, "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18,
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 32,
        "MODEL.SOCO.PROJECTOR_OUT_DIM", 16, "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 32,
        "MODEL.DETCO.QUEUE_SIZE", 8, "SOLVER.IMS_PER_BATCH", 4, "MODEL.DETCO.HEAD_HIDDEN_DIM", 32, "MODEL.DETCO.FEATURE_DIM", 16,
    ])
    return cfg


def test_project_soco_model_converts():
    from soco_d2.modeling import build_model

    model = build_model(_small_cfg("SoCo"))
    with torch.no_grad():
        for p in model.target_backbone.parameters():
            p.add_(1.0)
    state = model.state_dict()
    d2, report = convert_to_d2({"model": state, "iteration": 10})
    assert report.depth == 18 and not report.unmapped
    assert set(report.mapped.values()) == set(d2) and "box_head.conv2.norm.running_var" in d2
    assert sorted({k.split(".")[0] for k in report.dropped}) == [
        "predictor", "projector", "target_backbone", "target_box_head", "target_projector"]
    np.testing.assert_array_equal(d2["box_head.fc1.weight"], state["box_head.3.weight"].numpy())
    d2_t, _ = convert_to_d2(state, branch="target")
    np.testing.assert_array_equal(d2_t["res3.1.conv2.weight"], state["target_backbone.body.layer2.1.conv2.weight"].numpy())
    # and back to the same torchvision names the model uses
    tv, _ = convert_to_torchvision(state)
    assert all(torch.equal(tv[k], state[k]) for k in state if k.startswith("backbone."))
    assert all(torch.equal(tv["roi_heads." + k], state[k]) for k in state if k.startswith("box_head."))


def test_project_detco_model_converts():
    from soco_d2.modeling import build_model

    model = build_model(_small_cfg("DetCo"))
    state = model.state_dict()
    d2, report = convert_to_d2(state, parts="backbone")
    assert report.depth == 18 and not report.unmapped and set(d2) == set(expected_backbone_shapes(18))
    np.testing.assert_array_equal(d2["res4.0.shortcut.norm.weight"], state["encoder_q.body.layer3.0.downsample.1.weight"].numpy())
    reasons = Counter(report.dropped.values())
    assert set(reasons) == {"target branch", "head (not transferred)", "queue"}
    assert reasons["queue"] == len([k for k in state if k.startswith("queues_")])
