import glob
import os

import pytest
import torch

from soco_d2.config import get_finetune_cfg, load_config
from soco_d2.finetune.detectors import build_detector
from soco_d2.finetune.solver import (
    WarmupMultiStepLR,
    build_finetune_optimizer,
    build_lr_scheduler,
    resolve_steps,
)

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../configs/finetune/*.yaml")))
COCO_1X = [c for c in CONFIGS if os.path.basename(c) == "mask_rcnn_R50_FPN_1x.yaml"][0]


def test_resolve_steps():
    assert resolve_steps((60000, 80000), 90000) == [60000, 80000]
    assert resolve_steps((2 / 3, 8 / 9), 180000) == [120000, 160000]
    assert resolve_steps((60000, 80000), 70000) == [60000]  # beyond MAX_ITER: dropped
    with pytest.raises(ValueError, match="increase"):
        resolve_steps((80000, 60000), 90000)


def test_warmup_multistep_matches_detectron2():
    s = WarmupMultiStepLR(0.02, 90000, [60000, 80000], 0.1, 1000, 0.001)
    assert s.lr_at(0) == pytest.approx(0.02 * 0.001)
    # detectron2: lr * (warmup_factor * (1 - a) + a), a = it / warmup_iters
    assert s.lr_at(500) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert s.lr_at(1000) == pytest.approx(0.02)
    assert s.lr_at(59999) == pytest.approx(0.02)
    assert s.lr_at(60000) == pytest.approx(0.002)
    assert s.lr_at(80000) == pytest.approx(0.0002)
    assert s.lr_at(89999) == pytest.approx(0.0002)


def test_linear_scaling_of_the_learning_rate():
    cfg = load_config(COCO_1X, ["SOLVER.IMS_PER_BATCH", 8])
    sched = build_lr_scheduler(cfg, cfg.SOLVER.MAX_ITER)
    assert sched.lr_at(5000) == pytest.approx(0.01)


def test_pretraining_solver_is_refused():
    cfg = load_config("", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "SOLVER.MAX_ITER", 10])
    with pytest.raises(ValueError, match="SGD"):
        build_finetune_optimizer(cfg, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="WarmupMultiStep"):
        build_lr_scheduler(cfg, 10)


def test_optimizer_weight_decay_groups(tiny_overrides):
    cfg = load_config(COCO_1X, tiny_overrides)
    model = build_detector(cfg)
    opt = build_finetune_optimizer(cfg, model)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_id[id(params["backbone.body.bn1.weight"])] == 0.0
    assert by_id[id(params["roi_heads.box_head.0.1.bias"])] == 0.0  # a BN bias
    assert by_id[id(params["backbone.body.conv1.weight"])] == pytest.approx(2.5e-5)
    assert by_id[id(params["roi_heads.box_predictor.cls_score.bias"])] == pytest.approx(2.5e-5)
    assert len(by_id) == len(params)
    assert opt.defaults["momentum"] == 0.9


def test_finetune_defaults_build_the_solver_without_solver_keys():
    cfg = load_config("", ["SOLVER.MAX_ITER", 100], defaults=get_finetune_cfg)
    opt = build_finetune_optimizer(cfg, torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["weight_decay"] == 1e-4
    sched = build_lr_scheduler(cfg, 100)
    assert sched.base_lr == pytest.approx(0.02) and sched.lr_at(0) == pytest.approx(0.02 * 0.001)
