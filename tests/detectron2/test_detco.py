"""D2DetCo (DetCo over detectron2's ResNet) against a real detectron2 build (skipped without it)."""
import copy
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg as get_d2_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY  # noqa: E402
from detectron2.modeling import build_model as build_d2_model  # noqa: E402

from soco_d2.checkpoint import convert_to_d2, save_d2_pkl  # noqa: E402
from soco_d2.checkpoint.layout import map_torchvision_resnet_key  # noqa: E402
from soco_d2.config import get_cfg  # noqa: E402
from soco_d2.detectron2 import D2DetCo, add_soco_d2_config  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402
from soco_d2.modeling.meta_arch.detco import SplitBatchNorm2d  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
D2_CONFIGS = os.path.join(REPO, "configs", "detectron2")
ARCH_YAML = os.path.join(D2_CONFIGS, "pretrain", "detco_r50_d2arch.yaml")
# DetCo's small settings (queue of 8 = 4 steps of 2 keys), on both configs.
DETCO_TINY = {
    "SOLVER.IMS_PER_BATCH": 2,
    "MODEL.DETCO.QUEUE_SIZE": 8,
    "MODEL.DETCO.HEAD_HIDDEN_DIM": 32,
    "MODEL.DETCO.FEATURE_DIM": 16,
}
# A thin ResNet-50 (bottleneck blocks, 8-channel groups).
THIN_R50 = {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.WIDTH_PER_GROUP": 8,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 32}
R50 = {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256}


def _flat(overrides):
    return [x for kv in overrides.items() for x in kv]


def _d2_cfg(**overrides):
    cfg = get_d2_cfg()
    add_soco_d2_config(cfg)
    cfg.merge_from_file(ARCH_YAML)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "CHANNELS_LAST", False] + _flat({**DETCO_TINY, **overrides}))
    return cfg


def _d2detco(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = _d2_cfg(**{"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64, **overrides})
    return build_d2_model(cfg)


def _detco(seed=1, **overrides):
    """soco_d2's torchvision DetCo with the same sizes."""
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "DetCo",
                         "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", False]
                        + _flat({**DETCO_TINY, **overrides}))
    torch.manual_seed(seed)
    return build_model(cfg)


def _batch(n=2, size=32, patch=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "global": torch.randint(0, 256, (n, 2, 3, size, size), generator=g, dtype=torch.uint8),
        "local": torch.randint(0, 256, (n, 2, 9, 3, patch, patch), generator=g, dtype=torch.uint8),
        "local_perm": torch.stack([torch.stack([torch.randperm(9, generator=g) for _ in range(2)])
                                   for _ in range(n)]),
    }


def _torchvision_to_d2detco(name):
    """DetCo state-dict name -> D2DetCo name (only the ResNet body is renamed)."""
    for enc in ("encoder_q.body.", "encoder_k.body."):
        if name.startswith(enc):
            return enc + map_torchvision_resnet_key(name[len(enc):])
    return name


def test_registered_in_detectron2_with_detectron2_resnet_names():
    assert META_ARCH_REGISTRY.get("D2DetCo") is D2DetCo
    model = _d2detco()
    assert isinstance(model, D2DetCo)
    names = set(model.state_dict())
    for enc in ("encoder_q", "encoder_k"):
        assert {f"{enc}.body.stem.conv1.weight", f"{enc}.body.stem.conv1.norm.running_var",
                f"{enc}.body.res3.0.shortcut.norm.weight", f"{enc}.body.res5.1.conv2.weight",
                f"{enc}.global_heads.res5.2.weight", f"{enc}.local_heads.res2.0.weight"} <= names
    assert not any(".layer1." in k or k.endswith(".bn1.weight") for k in names)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())


@pytest.mark.parametrize("splits", [1, 2])
def test_same_forward_losses_and_queues_as_detco_with_the_same_weights(splits):
    """D2DetCo is DetCo with detectron2's ResNet: with DetCo's weights renamed it gives the same
    twelve loss terms, the same gradients and the same queue contents, with plain BN and with
    one-process shuffle-BN (BN over 2 sub-batches, key batch shuffled)."""
    n = 2 * splits
    common = {"SOLVER.IMS_PER_BATCH": n, "MODEL.DETCO.SHUFFLE_BN_SPLITS": splits}
    ref, model = _detco(**common).train(), _d2detco(seed=7, **common).train()
    split_bn = [m for m in model.encoder_q.body.modules() if isinstance(m, SplitBatchNorm2d)]
    assert len(split_bn) == (0 if splits == 1 else len(
        [m for m in ref.encoder_q.body.modules() if isinstance(m, SplitBatchNorm2d)])) and (splits == 1 or split_bn)
    state = {_torchvision_to_d2detco(k): v for k, v in ref.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    batch = _batch(n=n)
    torch.manual_seed(11)
    out_ref = ref(batch)
    torch.manual_seed(11)
    out = model(batch)
    assert set(out) == set(out_ref) and len(out) == 3 + 3 * 4
    for k in out:
        torch.testing.assert_close(out[k], out_ref[k], rtol=1e-5, atol=1e-6, msg=k)
    sum(v for k, v in out_ref.items() if k.startswith("loss")).backward()
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    torch.testing.assert_close(model.encoder_q.body.res4[0].conv2.weight.grad,
                               ref.encoder_q.body.layer3[0].conv2.weight.grad, rtol=1e-4, atol=1e-6)
    for lvl in ("res2", "res5"):
        torch.testing.assert_close(model.queues_local[lvl].queue, ref.queues_local[lvl].queue)
        assert int(model.queues_global[lvl].ptr) == int(ref.queues_global[lvl].ptr) == n
    model.momentum_update(0.5)
    ref.momentum_update(0.5)
    torch.testing.assert_close(model.encoder_k.body.stem.conv1.weight, ref.encoder_k.body.conv1.weight)


def test_zero_init_residual_and_stride_follow_the_detectron2_config():
    model = _d2detco(**{"MODEL.RESNETS.ZERO_INIT_RESIDUAL": True})
    assert torch.count_nonzero(model.encoder_q.body.res3[1].conv2.norm.weight) == 0
    assert torch.count_nonzero(model.encoder_q.body.res3[1].conv1.norm.weight) > 0
    thin = _d2detco(**THIN_R50)
    block = thin.encoder_q.body.res3[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # STRIDE_IN_1X1 False


def test_levels_subset_builds_only_those_stages():
    model = _d2detco(**{"MODEL.DETCO.LEVELS": ("res3", "res4"), "MODEL.DETCO.LEVEL_WEIGHTS": (0.5, 1.0),
                        "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4"]})
    out = model(_batch())
    assert {"global_global_res3", "local_global_res4"} <= set(out) and "global_global_res5" not in out
    assert not any(k.startswith("encoder_q.body.res5.") for k in model.state_dict())


def test_bad_config_names_the_keys():
    with pytest.raises(ValueError, match="FREEZE_AT"):
        _d2detco(**{"MODEL.BACKBONE.FREEZE_AT": 2})
    with pytest.raises(ValueError, match=r"OUT_FEATURES.*MODEL.DETCO.LEVELS"):
        _d2detco(**{"MODEL.RESNETS.OUT_FEATURES": ["res4", "res5"]})
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM"):
        _d2detco(**{"MODEL.RESNETS.NORM": "GN"})
    with pytest.raises(ValueError, match="QUEUE_SIZE"):
        _d2detco(**{"MODEL.DETCO.QUEUE_SIZE": 7})


def _detector(name, **overrides):
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(D2_CONFIGS, name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                         "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN",
                         "MODEL.ROI_HEADS.NAME", "StandardROIHeads" if "FPN" in name else "Res5ROIHeads"]
                        + _flat({**R50, "MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.CONV_DIM": 16,
                                 "MODEL.ROI_BOX_HEAD.FC_DIM": 16, "MODEL.ROI_MASK_HEAD.CONV_DIM": 16, **overrides}))
    torch.manual_seed(2)
    return build_d2_model(cfg).eval()


@pytest.mark.parametrize("recipe,layout", [("mask_rcnn_R50_FPN_1x.yaml", "FPN"), ("mask_rcnn_R50_C4_1x.yaml", "C4")])
def test_converted_checkpoint_loads_into_fpn_and_c4_detectors(recipe, layout, tmp_path):
    """D2DetCo's checkpoint -> convert_to_d2 (the backbone) -> detectron2's checkpointer: every
    ResNet tensor of the FPN and C4 Mask R-CNN is loaded, with the query encoder's values (a
    standard ResNet-50: the converter checks the shapes)."""
    model = _d2detco(**R50)
    for m in model.modules():  # running statistics unlike a fresh model's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, ckpt)
    d2, report = convert_to_d2(str(ckpt), parts="backbone")
    assert not report.unmapped
    assert set(d2) == set(model.encoder_q.body.state_dict())
    pkl = tmp_path / "detco.pkl"
    save_d2_pkl(d2, pkl)

    detector = _detector(recipe)
    checkpointer = DetectionCheckpointer(detector)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(pkl)))
    expected = model.detection_state_dict(layout)
    resnet = [k for k in detector.state_dict() if k.startswith(("backbone.bottom_up.", "roi_heads.res5."))
              or (layout == "C4" and k.startswith("backbone."))]
    assert set(resnet) == set(expected)
    assert not set(incompatible.missing_keys) & set(expected)
    state = detector.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, msg=k)
    # the full names load directly as well
    detector = _detector(recipe)
    assert not set(detector.load_state_dict(expected, strict=False).missing_keys) & set(expected)
    with pytest.raises(ValueError, match="layout"):
        model.detection_state_dict("C5")
