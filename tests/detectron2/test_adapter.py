"""The detectron2 adapter against a real detectron2 build (skipped without detectron2)."""
import copy
import glob
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg as get_d2_cfg  # noqa: E402
from detectron2.modeling import build_model as build_d2_model  # noqa: E402

from soco_d2.checkpoint import convert_to_d2, save_d2_pkl  # noqa: E402
from soco_d2.config import get_cfg  # noqa: E402
from soco_d2.detectron2 import D2SoCo, add_soco_d2_config  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402
from soco_d2.modeling.losses import soco_pair_loss  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
D2_CONFIGS = os.path.join(REPO, "configs", "detectron2")
ARCH_YAML = os.path.join(D2_CONFIGS, "pretrain", "soco_fpn_r50_d2arch.yaml")
TINY = {
    # Most tests compare with detectron2's own level rule and the per-view head batching;
    # the faithful mode has its own tests.
    "MODEL.SOCO.HEAD_MODE": "per_view",
    "MODEL.SOCO.LEVEL_ASSIGNMENT": "torchvision",
    "MODEL.SOCO.PROJECTOR_HIDDEN_DIM": 32,
    "MODEL.SOCO.PROJECTOR_OUT_DIM": 16,
    "MODEL.SOCO.PREDICTOR_HIDDEN_DIM": 32,
}
R18_TINY = {
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    "MODEL.FPN.OUT_CHANNELS": 16,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 2,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 16,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
    **TINY,
}
BACKBONE_AND_HEAD = ("backbone.", "roi_heads.box_head.")


def _flat(overrides):
    return [x for kv in overrides.items() for x in kv]


def _d2_cfg(**overrides):
    cfg = get_d2_cfg()
    add_soco_d2_config(cfg)
    cfg.merge_from_file(ARCH_YAML)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "CHANNELS_LAST", False] + _flat(overrides))
    return cfg


def _adapter(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_d2_model(_d2_cfg(**{**R18_TINY, **overrides}))


def _soco_model(depth=18, **overrides):
    """soco_d2's torchvision SoCo with the same sizes as ``_adapter`` (no zero-initialised
    gammas, so that every residual branch contributes to the features compared)."""
    sizes = R18_TINY if depth == 18 else TINY
    keys = {k: v for k, v in sizes.items() if k != "MODEL.RESNETS.RES2_OUT_CHANNELS"}
    cfg = get_cfg()
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", False]
        + _flat(keys) + _flat(overrides)
    )
    torch.manual_seed(1)
    return build_model(cfg)


def _batch(n=2, star=False):
    """A collated SoCo batch (docs/ARCHITECTURE.md): V1, V2 64 px, V3 32 px (V4 48 px for SoCo*)."""
    sizes = {"v1": 64, "v2": 64, "v3": 32, "v4": 48}
    views = ["v1", "v2", "v3"] + (["v4"] if star else [])
    g = torch.Generator().manual_seed(1)
    images = {
        v: torch.randint(0, 256, (n, 3, sizes[v], sizes[v]), generator=g, dtype=torch.uint8) for v in views
    }

    def boxes(size):
        xy = torch.rand(n, 2, 2, generator=g) * size * 0.4
        wh = torch.rand(n, 2, 2, generator=g) * size * 0.5 + size * 0.1
        bx = torch.cat([xy, xy + wh], dim=-1)
        bx[0, 1] = torch.tensor([1.0, 2.0, size - 1.0, size - 2.0])  # a large box (P3 at 64 px)
        return bx

    pairs = [
        {"a": ["v1"] * n, "b": [v] * n, "boxes_a": boxes(64), "boxes_b": boxes(sizes[v]),
         "ids_a": torch.tensor([[1, 2], [3, 4]]), "ids_b": torch.tensor([[2, 1], [3, 3]])}
        for v in views[1:]
    ]
    return {"images": images, "pairs": pairs}


def _mask_rcnn(**overrides):
    """detectron2's Mask R-CNN R50-FPN (4conv1fc BN box head) from the shipped recipe."""
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml"))
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
         "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN"] + _flat(overrides)
    )
    torch.manual_seed(2)
    model = build_d2_model(cfg)
    model.eval()
    return model


def _randomize_bn_statistics(model):
    """Running statistics unlike a fresh model's (0 / 1), so that loading them can be checked."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)


def _short_to_adapter(name):
    """Converter short name (stem.*, res2.*, fpn_*, box_head.*) -> D2SoCo online name."""
    if name.startswith("box_head."):
        return "roi_heads." + name
    if name.startswith("fpn_"):
        return "backbone." + name
    return "backbone.bottom_up." + name


def _online_to_target(name):
    if name.startswith("roi_heads.box_head."):
        return "target_box_head." + name[len("roi_heads.box_head."):]
    return "target_" + name


# ------------------------------------------------------------------------------------------------
# The meta-architecture
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [18, 50])
def test_builds_from_detectron2_config_with_detectron2_names(depth):
    sizes = R18_TINY if depth == 18 else {"MODEL.FPN.OUT_CHANNELS": 16, "MODEL.ROI_BOX_HEAD.CONV_DIM": 16,
                                          "MODEL.ROI_BOX_HEAD.FC_DIM": 32, **TINY}
    torch.manual_seed(0)
    model = build_d2_model(_d2_cfg(**{**sizes, "MODEL.RESNETS.DEPTH": depth}))
    assert type(model) is D2SoCo
    keys = set(model.state_dict())
    assert {"backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res2.0.conv1.norm.running_mean",
            "backbone.fpn_lateral2.norm.weight", "backbone.fpn_output5.weight",
            "roi_heads.box_head.conv1.norm.weight", "roi_heads.box_head.fc1.weight",
            "projector.0.weight", "predictor.3.weight", "target_backbone.bottom_up.stem.conv1.weight",
            "target_box_head.fc1.weight", "target_projector.3.bias"} <= keys
    assert not any("fpn_lateral6" in k or "top_block" in k for k in keys)
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5"]
    # stride in the 3x3 conv (STRIDE_IN_1X1 False); zero-initialised last norm of each block
    block = model.backbone.bottom_up.res3[0]
    if depth == 50:
        assert (block.conv1.stride, block.conv2.stride) == ((1, 1), (2, 2))
        last = block.conv3
    else:
        assert block.conv1.stride == (2, 2)
        last = block.conv2
    assert torch.count_nonzero(last.norm.weight) == 0
    assert model.pooler.pooler.level_poolers[0].aligned
    assert all(not p.requires_grad for m in model.target_modules for p in m.parameters())


def test_forward_backward_gradients_only_on_online_network():
    model = _adapter()
    model.train()
    losses = model(_batch())
    assert sorted(losses) == ["loss_v1_v2", "loss_v1_v3"]
    assert all(torch.isfinite(v) and -4 <= v.item() <= 4 for v in losses.values())
    sum(losses.values()).backward()
    # Every online parameter gets a gradient (FPN output convs of levels without boxes included).
    online = [p for m in model.online_modules + [model.predictor] for p in m.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in online)
    assert all(p.grad is None for m in model.target_modules for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_momentum_update_is_exact_and_leaves_buffers():
    model = _adapter()
    sum(model(_batch()).values()).backward()
    target_before = [p.clone() for m in model.target_modules for p in m.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    target_now = [p for m in model.target_modules for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target_before, target_now))
    online = [p.detach().clone() for m in model.online_modules for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online, target_now))
    running_mean = model.target_backbone.bottom_up.stem.conv1.norm.running_mean.clone()
    model.momentum_update(0.9)
    for t0, t1, o in zip(target_before, target_now, online):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o)
    assert torch.equal(model.target_backbone.bottom_up.stem.conv1.norm.running_mean, running_mean)


def test_level_assignment_boundaries():
    """sqrt(wh) < 48 -> P2, < 96 -> P3, < 192 -> P4, else P5; a box on a boundary goes up."""
    model = _adapter()
    sides = torch.tensor([10.0, 47.9, 48.0, 95.9, 96.0, 191.9, 192.0, 400.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], dim=1)
    assert model.pooler.assign_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # non-square: 24 x 96 has sqrt(area) 48
    assert model.pooler.assign_levels(torch.tensor([[0.0, 0.0, 24.0, 96.0]])).tolist() == [1]
    order, counts = model.pooler.level_plan(boxes.view(2, 4, 4))
    assert counts.tolist() == [2, 2, 2, 2] and order.tolist() == list(range(8))


def _load_converted(model, ref):
    """Load soco_d2 model ``ref``'s weights into adapter ``model`` through the converter."""
    state = {}
    for branch in ("online", "target"):
        d2, _ = convert_to_d2(ref.state_dict(), branch=branch)
        for k, v in d2.items():
            name = _short_to_adapter(k)
            state[name if branch == "online" else _online_to_target(name)] = torch.as_tensor(v)
    for name in ("projector", "predictor", "target_projector"):
        state.update({f"{name}.{k}": v for k, v in getattr(ref, name).state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected


def test_same_losses_as_soco_d2_model_with_converted_weights():
    """soco_d2's torchvision SoCo, converted with the project's converter and loaded into the
    adapter, gives the same losses (eval-mode BN, views of multiples of 32 px: no padding)."""
    ref = _soco_model()
    _randomize_bn_statistics(ref)
    model = _adapter()
    _load_converted(model, ref)
    ref.eval()
    model.eval()
    batch = _batch()
    expected, got = ref(batch), model(batch)
    assert sorted(got) == ["loss_v1_v2", "loss_v1_v3"]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(v) for v in model(_batch(star=True)).values())  # 48 px V4: padded


def test_per_view_heads_equal_separate_calls_and_all_batching_differs():
    model = _adapter()
    reference = copy.deepcopy(model)
    batch = _batch()
    losses = model(batch)
    r = reference
    boxes = {"v1": torch.cat([p["boxes_a"] for p in batch["pairs"]], dim=1)}
    boxes.update({p["b"][0]: p["boxes_b"] for p in batch["pairs"]})

    def encode(modules, backbone, view):
        x = r.normalize(batch["images"][view])
        pooled = r.pooler(list(backbone(x).values()), boxes[view])
        for m in modules:
            pooled = m(pooled)
        return pooled.view(x.shape[0], boxes[view].shape[1], -1)

    q = {v: encode([r.box_head, r.projector, r.predictor], r.backbone, v) for v in boxes}
    with torch.no_grad():
        k = {v: encode([r.target_box_head, r.target_projector], r.target_backbone, v) for v in boxes}
    for i, p in enumerate(batch["pairs"]):
        b = p["b"][0]
        qa, ka = q["v1"][:, 2 * i:2 * i + 2], k["v1"][:, 2 * i:2 * i + 2]
        expected = soco_pair_loss(qa, k[b], p["ids_a"], p["ids_b"])
        expected = expected + soco_pair_loss(q[b], ka, p["ids_b"], p["ids_a"])
        torch.testing.assert_close(losses[f"loss_v1_{b}"], expected, rtol=1e-4, atol=1e-5)
    for buf, ref in zip(model.box_head.buffers(), reference.box_head.buffers()):
        torch.testing.assert_close(buf, ref, rtol=1e-4, atol=1e-5)

    mixed = _adapter(**{"MODEL.SOCO.HEAD_MODE": "all"})
    mixed.load_state_dict(r.state_dict())
    assert not torch.allclose(mixed(batch)["loss_v1_v3"], losses["loss_v1_v3"])


def test_faithful_mode_matches_soco_d2_faithful_mode():
    """The faithful head mode (every box on every level, norms per view, box set and level) gives
    the same train-mode losses in the adapter as in soco_d2's model with converted weights."""
    faithful = {"MODEL.SOCO.HEAD_MODE": "faithful", "MODEL.SOCO.LEVEL_ASSIGNMENT": "official"}
    ref = _soco_model(**faithful)
    model = _adapter(**faithful)
    _load_converted(model, ref)
    batch = _batch()
    losses, expected = model(batch), ref(batch)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-4, atol=1e-5)


def test_112_px_view_is_padded_for_the_fpn():
    """A 112 px V3 (SoCo's size) goes through detectron2's FPN after padding to 128 px."""
    model = _adapter()
    batch = _batch()
    g = torch.Generator().manual_seed(3)
    batch["images"]["v3"] = torch.randint(0, 256, (2, 3, 112, 112), generator=g, dtype=torch.uint8)
    batch["pairs"][1]["boxes_b"] = batch["pairs"][1]["boxes_b"] * 3.5
    assert model.normalize(batch["images"]["v3"]).shape[-2:] == (128, 128)
    x = model.normalize(batch["images"]["v3"])
    assert torch.equal(x[..., 112:, :], torch.zeros_like(x[..., 112:, :]))
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_config_raises():
    with pytest.raises(ValueError, match="FREEZE_AT"):
        _adapter(**{"MODEL.BACKBONE.FREEZE_AT": 2})
    with pytest.raises(ValueError, match="IN_FEATURES"):
        _adapter(**{"MODEL.ROI_HEADS.IN_FEATURES": ["p3", "p4", "p5"]})
    with pytest.raises(ValueError, match="HEAD_MODE"):
        _adapter(**{"MODEL.SOCO.HEAD_MODE": "per_level"})
    with pytest.raises(ValueError, match="LEVEL_ASSIGNMENT 'torchvision'"):
        _adapter(**{"MODEL.SOCO.LEVEL_ASSIGNMENT": "official"})
    with pytest.raises(ValueError, match="NUM_FC"):
        _adapter(**{"MODEL.ROI_BOX_HEAD.NUM_FC": 0})


# ------------------------------------------------------------------------------------------------
# Transfer into detectron2's Mask R-CNN
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mask_rcnn():
    return _mask_rcnn()


def _expect_loaded(detector, expected):
    """Every backbone / FPN / box-head tensor of ``detector`` equals ``expected[name]``."""
    names = [k for k in detector.state_dict() if k.startswith(BACKBONE_AND_HEAD)]
    assert any(k.startswith("backbone.bottom_up.res5.") for k in names)
    assert any(k.startswith("roi_heads.box_head.conv4.norm.") for k in names)
    missing = [k for k in names if k not in expected]
    assert not missing, missing[:10]
    state = detector.state_dict()
    for k in names:
        torch.testing.assert_close(state[k], torch.as_tensor(expected[k]).to(state[k].dtype), msg=k)


def test_adapter_weights_load_into_mask_rcnn_by_name(mask_rcnn, tmp_path):
    model = _adapter(**{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
                        "MODEL.FPN.OUT_CHANNELS": 256, "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
                        "MODEL.ROI_BOX_HEAD.CONV_DIM": 256, "MODEL.ROI_BOX_HEAD.FC_DIM": 1024})
    _randomize_bn_statistics(model)
    weights = model.detection_state_dict()
    assert set(weights) == {k for k in mask_rcnn.state_dict() if k.startswith(BACKBONE_AND_HEAD)}
    path = tmp_path / "soco_d2arch.pth"
    torch.save({"model": weights}, path)
    detector = copy.deepcopy(mask_rcnn)
    DetectionCheckpointer(detector).load(str(path))
    _expect_loaded(detector, weights)

    # and through the project's converter (detectron2-named input) to a .pkl
    d2, report = convert_to_d2(model.state_dict())
    assert not report.unmapped
    pkl = tmp_path / "soco_d2arch.pkl"
    save_d2_pkl(d2, pkl)
    detector = copy.deepcopy(mask_rcnn)
    DetectionCheckpointer(detector).load(str(pkl))
    _expect_loaded(detector, weights)


def test_converted_soco_d2_weights_load_and_compute_the_same_features(mask_rcnn, tmp_path):
    """soco_d2's own SoCo R50-FPN -> convert_to_d2 -> save_d2_pkl -> detectron2's checkpointer:
    no backbone / FPN / box-head key missing, and detectron2 computes the same P2-P5 and box-head
    outputs as soco_d2's modules."""
    ref = _soco_model(depth=50)
    _randomize_bn_statistics(ref)
    d2, report = convert_to_d2(ref.state_dict())
    assert not report.unmapped
    pkl = tmp_path / "soco_fpn.pkl"
    save_d2_pkl(d2, pkl)
    detector = copy.deepcopy(mask_rcnn)
    checkpointer = DetectionCheckpointer(detector)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(pkl)))
    assert not [k for k in incompatible.missing_keys if k.startswith(BACKBONE_AND_HEAD)]
    _expect_loaded(detector, {_short_to_adapter(k): v for k, v in d2.items()})

    # detectron2 computes the same pyramid and box-head features with these weights
    ref.eval()
    detector.eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 96, generator=g)
    boxes = torch.tensor([[[2.0, 3.0, 30.0, 40.0], [10.0, 5.0, 90.0, 60.0]]] * 2)
    with torch.no_grad():
        ours = list(ref.backbone(x).values())
        theirs = detector.backbone(x)
        assert list(theirs) == ["p2", "p3", "p4", "p5", "p6"]
        for a, name in zip(ours, ["p2", "p3", "p4", "p5"]):
            torch.testing.assert_close(theirs[name], a, rtol=1e-4, atol=1e-4)
        pooled = ref.pooler(ours, boxes, (64, 96))
        torch.testing.assert_close(detector.roi_heads.box_head(pooled), ref.box_head(pooled),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(D2_CONFIGS, "*.yaml"))), ids=os.path.basename)
def test_shipped_detectron2_configs_merge_into_detectron2(path):
    cfg = get_d2_cfg()
    cfg.merge_from_file(path)  # unknown keys or wrong types raise here
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.INPUT.FORMAT == "RGB"


# ------------------------------------------------------------------------------------------------
# Training with soco_d2's engine and data loader, then conversion
# ------------------------------------------------------------------------------------------------
def test_trains_with_soco_d2_engine_and_converts(tmp_path, monkeypatch):
    """soco_d2's PretrainTrainer and data loader drive the adapter; the checkpoint it writes
    converts with tools/convert_to_d2.py's library function."""
    # keep the test process's torch thread count (the trainer sizes it from the cores otherwise)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    import json
    import math

    import soco_d2.data  # noqa: F401  (registers the view mappers)
    from soco_d2.config import load_config
    from soco_d2.data.synthetic import make_synthetic_coco
    from soco_d2.engine.trainer import PretrainTrainer

    _, image_dir = make_synthetic_coco(str(tmp_path / "data"), num_images=4, image_size=96, seed=0)
    out = str(tmp_path / "out")
    cfg = load_config(os.path.join(REPO, "configs", "soco", "soco_fpn_r50_100ep.yaml"), [
        "MODEL.DEVICE", "cpu", "INPUT.SOCO.VIEW1_SIZE", "64", "INPUT.SOCO.VIEW2_SIZE", "64",
        "INPUT.SOCO.VIEW3_SIZE", "48", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
        "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0", "CHANNELS_LAST", "False",
        "LOG_PERIOD", "1", "DATASETS.PRETRAIN.NAME", "", "DATASETS.PRETRAIN.IMAGE_ROOT", image_dir,
        "OUTPUT_DIR", out,
    ])
    model = _adapter()
    trainer = PretrainTrainer(cfg, model=model)
    trainer.resume_or_load(resume=False)
    target_before = model.target_box_head.fc1.weight.clone()
    trainer.train()
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["total_loss"]) for r in rows)
    assert not torch.equal(model.target_box_head.fc1.weight, target_before)  # EMA ran

    d2, report = convert_to_d2(os.path.join(out, "model_final.pth"))
    assert not report.unmapped and report.depth == 18
    torch.testing.assert_close(torch.as_tensor(d2["box_head.fc1.weight"]), model.box_head.fc1.weight.detach())
    assert {"backbone.fpn_lateral2.weight", "roi_heads.box_head.conv1.weight"} <= set(report.mapped)
