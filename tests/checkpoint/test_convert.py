import json
import os
import pickle
import re
from collections import Counter
from copy import deepcopy

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from soco_d2.checkpoint.convert import (
    ConversionError,
    convert_to_d2,
    convert_to_torchvision,
    d2_to_torchvision,
    expected_backbone_shapes,
    infer_depth,
    save_d2_pkl,
)
from soco_d2.checkpoint.io import UnsafeCheckpointError, load_checkpoint_file


class Args:
    """Stands for the argparse namespace many training scripts store in their checkpoints."""

    lr = 0.1


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d2_shapes():
    """detectron2's real state-dict keys and shapes (``$SOCO_D2_SHAPES``, or
    ``$SOCO_DATA_ROOT/../reference/d2_state_dict_shapes.json``); skips when absent."""
    candidates = [os.environ.get("SOCO_D2_SHAPES", "")]
    if os.environ.get("SOCO_DATA_ROOT"):
        candidates.append(
            os.path.join(os.environ["SOCO_DATA_ROOT"], "..", "reference", "d2_state_dict_shapes.json")
        )
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                return {m: {k: tuple(s) for k, s in keys.items()} for m, keys in json.load(f).items()}
    pytest.skip("d2_state_dict_shapes.json not found (set SOCO_D2_SHAPES or SOCO_DATA_ROOT)")


def d2_align(model_keys, ckpt_keys):
    """detectron2's matching heuristics (``align_and_update_state_dicts``): model key ``m`` takes
    checkpoint key ``c`` when ``m == c`` or ``m`` ends with ``"." + c``, the longest ``c`` winning;
    a checkpoint key taken by two model keys is ambiguous (detectron2 then loads neither)."""
    matched = {}
    for m in model_keys:
        cands = [c for c in ckpt_keys if m == c or m.endswith("." + c)]
        if cands:
            matched[m] = max(cands, key=len)
    dup = [c for c, n in Counter(matched.values()).items() if n > 1]
    assert not dup, f"ambiguous checkpoint keys: {dup[:5]}"
    return matched


def assert_covers(model_shapes, d2, select):
    """Every model key selected by ``select`` is matched by a d2 key of the same shape."""
    wanted = [k for k in model_shapes if select(k)]
    assert wanted
    matched = d2_align(wanted, list(d2))
    missing = [k for k in wanted if k not in matched]
    assert not missing, missing[:10]
    bad = [(k, model_shapes[k], d2[c].shape) for k, c in matched.items() if tuple(d2[c].shape) != model_shapes[k]]
    assert not bad, bad[:5]


def randomize(module, seed):
    """Random values in every parameter and buffer so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return module


def prefixed(module_or_sd, prefix):
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    return {prefix + k: v.clone() for k, v in sd.items()}


def resnet_fpn(seed, depth=50, width=256):
    body = getattr(torchvision.models, f"resnet{depth}")()
    channels = [64 * 2**i * (4 if depth >= 50 else 1) for i in range(4)]
    bb = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, channels, width,
                         norm_layer=torch.nn.BatchNorm2d)
    return randomize(bb, seed)


def box_head(seed, width=256, fc=1024):
    return randomize(FastRCNNConvFCHead((width, 7, 7), [width] * 4, [fc], norm_layer=torch.nn.BatchNorm2d), seed)


def shifted(module):
    """A copy with different values (a stand-in for the target network)."""
    copy = deepcopy(module)
    with torch.no_grad():
        for t in copy.state_dict().values():
            t.add_(1)
    return copy


@pytest.fixture(scope="module")
def modules():
    bb, head = resnet_fpn(0), box_head(1)
    return {"bb": bb, "head": head, "bb_t": shifted(bb), "head_t": shifted(head)}


def soco_layout(modules):
    """This project's SoCo model state dict (soco_d2.modeling.meta_arch.soco.SoCo names)."""
    sd = {}
    sd.update(prefixed(modules["bb"], "backbone."))
    sd.update(prefixed(modules["head"], "box_head."))
    mlp = lambda i, h, o: torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.BatchNorm1d(h),  # noqa: E731
                                              torch.nn.ReLU(), torch.nn.Linear(h, o))
    sd.update(prefixed(mlp(1024, 64, 16), "projector."))
    sd.update(prefixed(mlp(16, 64, 16), "predictor."))
    sd.update(prefixed(modules["bb_t"], "target_backbone."))
    sd.update(prefixed(modules["head_t"], "target_box_head."))
    sd.update(prefixed(mlp(1024, 64, 16), "target_projector."))
    return sd


@pytest.fixture(scope="module")
def soco_state(modules):
    return soco_layout(modules)


@pytest.fixture(scope="module")
def small_soco_state():
    """The same layout over a ResNet-18 + 32-channel FPN and head, for quick tests."""
    bb, head = resnet_fpn(4, depth=18, width=32), box_head(5, width=32, fc=64)
    return soco_layout({"bb": bb, "head": head, "bb_t": shifted(bb), "head_t": shifted(head)})


def official_soco_state(modules):
    """The official SoCo checkpoint layout (module.encoder / neck / head, mmdet FPN names)."""

    def official(bb, head, suffix):
        sd = {}
        for k, v in bb.body.state_dict().items():
            sd[f"module.encoder{suffix}.{k}"] = v
        for k, v in bb.fpn.state_dict().items():
            m = re.match(r"(inner|layer)_blocks\.(\d)\.(\d)\.(.*)", k)
            conv = "lateral_convs" if m[1] == "inner" else "fpn_convs"
            sd[f"module.neck{suffix}.{conv}.{m[2]}.{'conv' if m[3] == '0' else 'bn'}.{m[4]}"] = v
        for k, v in head.state_dict().items():
            m = re.match(r"(\d)\.(\d)\.(.*)", k)
            if m:
                sd[f"module.head{suffix}.{'conv' if m[2] == '0' else 'bn'}{int(m[1]) + 1}.{m[3]}"] = v
            else:
                sd[f"module.head{suffix}.fc1.{k.split('.')[1]}"] = v
        return sd

    sd = official(modules["bb"], modules["head"], "")
    sd.update(official(modules["bb_t"], modules["head_t"], "_k"))
    sd["module.projector.linear1.weight"] = torch.randn(4096, 1024)
    sd["module.projector.bn1.running_mean"] = torch.randn(4096)
    sd["module.predictor.linear1.weight"] = torch.randn(4096, 256)
    sd["module.projector_k.linear1.weight"] = torch.randn(4096, 1024)
    return {"model": sd, "optimizer": {}, "epoch": 100}


# ------------------------------------------------------------------------------------------------
# SoCo layouts
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Backbone-only layouts: DetCo, MoCo, torchvision
# ------------------------------------------------------------------------------------------------
def detco_state(modules):
    """This project's DetCo names: encoder_q.body (torchvision ResNet), per-level heads, queues."""
    sd = prefixed(modules["bb"].body, "encoder_q.body.")
    sd.update(prefixed(modules["bb_t"].body, "encoder_k.body."))
    for enc in ("encoder_q", "encoder_k"):
        for lvl in ("res2", "res5"):
            sd[f"{enc}.global_heads.{lvl}.0.weight"] = torch.randn(8, 8)
            sd[f"{enc}.local_heads.{lvl}.2.bias"] = torch.randn(8)
    for kind in ("global", "local"):
        sd[f"queues_{kind}.res3.queue"] = torch.randn(16, 8)
        sd[f"queues_{kind}.res3.ptr"] = torch.tensor(3)
    return sd


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


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_unknown_layout_lists_keys_and_known_layouts():
    sd = {"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "encoder.norm.bias": torch.zeros(3)}
    with pytest.raises(ConversionError) as e:
        convert_to_d2(sd)
    msg = str(e.value)
    assert "encoder.blocks.0.attn.qkv.weight" in msg and "Known layouts" in msg and "ResNet, torchvision names" in msg


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


def test_unexpected_leftovers_refused_unless_allowed(small_soco_state):
    sd = dict(small_soco_state, **{"mystery.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"mystery\.weight.*--allow-unmapped"):
        convert_to_d2(sd)
    d2, report = convert_to_d2(sd, allow_unmapped=True)
    assert report.unmapped == ["mystery.weight"] and "stem.conv1.weight" in d2


def test_ambiguous_online_backbones_refused(modules):
    sd = prefixed(modules["bb"].body, "encoder_q.")
    sd.update(prefixed(modules["bb"].body, "backbone."))
    with pytest.raises(ConversionError, match="ambiguous"):
        convert_to_d2(sd, parts=["backbone"])


def test_bad_arguments():
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(ConversionError, match="unknown parts"):
        convert_to_d2(sd, parts=["neck"])
    with pytest.raises(ConversionError, match="unknown branch"):
        convert_to_d2(sd, branch="teacher")
    with pytest.raises(ConversionError, match=r"no target-branch weights|not found in the target branch"):
        convert_to_d2(sd, parts=["backbone"], branch="target")


def test_foreign_pickles_and_unsafe_torch_files(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(1)}, "x": os.system}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        convert_to_d2(tmp_path / "evil.pkl", parts=["backbone"])

    sd = torchvision.models.resnet18().state_dict()
    torch.save({"model": sd, "args": Args()}, tmp_path / "with_args.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"--trust-checkpoint"):
        convert_to_d2(tmp_path / "with_args.pth", parts=["backbone"])
    d2, _ = convert_to_d2(tmp_path / "with_args.pth", parts=["backbone"], trust=True)
    assert len(d2) == len(expected_backbone_shapes(18))


# ------------------------------------------------------------------------------------------------
# Writing and the way back to torchvision
# ------------------------------------------------------------------------------------------------
def test_save_d2_pkl_round_trip(small_soco_state, tmp_path):
    d2, _ = convert_to_d2(small_soco_state)
    save_d2_pkl(d2, tmp_path / "out" / "soco.pkl")
    assert os.listdir(tmp_path / "out") == ["soco.pkl"]  # no temp file left behind
    with open(tmp_path / "out" / "soco.pkl", "rb") as f:
        raw = pickle.load(f)
    assert raw["__author__"] == "soco_d2" and raw["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())
    again = load_checkpoint_file(tmp_path / "out" / "soco.pkl")  # the restricted unpickler reads it
    np.testing.assert_array_equal(again["box_head.fc1.weight"], d2["box_head.fc1.weight"])
    # and it converts again, as a detectron2-layout input, to the same weights
    d2_again, report = convert_to_d2(tmp_path / "out" / "soco.pkl")
    assert set(d2_again) == set(d2) and not report.dropped
    with pytest.raises(ConversionError, match=r"\.pkl"):
        save_d2_pkl(d2, tmp_path / "soco.pth")


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


# ------------------------------------------------------------------------------------------------
# The project's own pretraining models, as built from configs
# ------------------------------------------------------------------------------------------------
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


def test_unmappable_official_key_named_with_what_its_block_expects(modules):
    ckpt = official_soco_state(modules)
    ckpt["model"]["module.encoder.layer1.0.se.fc.weight"] = torch.zeros(4, 4)
    with pytest.raises(ConversionError) as e:
        convert_to_d2(ckpt)
    msg = str(e.value)
    assert "'module.encoder.layer1.0.se.fc.weight' (inside the ResNet, torchvision names block at 'module.encoder.'" in msg
    assert "layer1.0.conv1.weight" in msg and "--allow-unmapped" in msg
