import math

import pytest

from soco_d2.config import get_cfg
from soco_d2.engine.schedules import (
    LRSchedule,
    MomentumSchedule,
    build_lr_schedule,
    build_momentum_schedule,
    max_iter_from_cfg,
    scaled_lr,
    warmup_iters_from_cfg,
)


def _cfg():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.IMS_PER_BATCH = 512
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 256
    cfg.SOLVER.EPOCHS = 10
    cfg.SOLVER.WARMUP_EPOCHS = 2
    cfg.SOLVER.WARMUP_FACTOR = 0.01
    cfg.SOLVER.MIN_LR = 1e-6
    cfg.SOLVER.MAX_ITER = 100
    return cfg


def test_lr_warmup_then_cosine():
    cfg = _cfg()
    assert scaled_lr(cfg) == 2.0
    assert warmup_iters_from_cfg(cfg, 100) == 20
    s = build_lr_schedule(cfg, 100)
    assert s.lr_at(0) == pytest.approx(0.02)  # 0.01 * 2.0
    assert s.lr_at(10) == pytest.approx(0.02 + 0.5 * (2.0 - 0.02))
    assert s.lr_at(20) == pytest.approx(2.0)  # end of warmup
    assert s.lr_at(60) == pytest.approx(1e-6 + 0.5 * (2.0 - 1e-6))  # middle of the cosine
    assert s.lr_at(40) == pytest.approx(1e-6 + 0.5 * (2.0 - 1e-6) * (1 + math.cos(math.pi / 4)))
    assert s.lr_at(100) == pytest.approx(1e-6)


def test_lr_without_warmup():
    cfg = _cfg()
    cfg.SOLVER.WARMUP_EPOCHS = 0
    s = build_lr_schedule(cfg, 100)
    assert s.lr_at(0) == pytest.approx(2.0)
    assert s.lr_at(50) == pytest.approx(1e-6 + 0.5 * (2.0 - 1e-6))


def test_max_iter_from_epochs():
    cfg = _cfg()
    assert max_iter_from_cfg(cfg, 5000) == 100
    cfg.SOLVER.MAX_ITER = 0
    assert max_iter_from_cfg(cfg, 5000) == 10 * (5000 // 512)
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        max_iter_from_cfg(cfg, 100)


def test_momentum_schedules():
    cfg = _cfg()
    cfg.MODEL.EMA.BASE_MOMENTUM = 0.99
    m = build_momentum_schedule(cfg, 100)
    assert m.momentum_at(0) == pytest.approx(0.99)
    assert m.momentum_at(50) == pytest.approx(0.995)
    assert m.momentum_at(25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert m.momentum_at(100) == pytest.approx(1.0)
    cfg.MODEL.EMA.SCHEDULE = "constant"
    assert build_momentum_schedule(cfg, 100).momentum_at(70) == 0.99


def test_max_iter_of_one_is_taken_as_given():
    cfg = _cfg()
    cfg.SOLVER.MAX_ITER = 1
    assert max_iter_from_cfg(cfg, 5000) == 1


def test_warmup_iters_need_positive_epochs():
    cfg = _cfg()
    cfg.SOLVER.EPOCHS = 1
    cfg.SOLVER.WARMUP_EPOCHS = 0.5
    assert warmup_iters_from_cfg(cfg, 100) == 50
    cfg.SOLVER.EPOCHS = 0
    with pytest.raises(ValueError, match="SOLVER.EPOCHS must be positive, got 0"):
        warmup_iters_from_cfg(cfg, 100)


def test_unknown_lr_scheduler_names_the_key():
    cfg = _cfg()
    cfg.SOLVER.LR_SCHEDULER = "WarmupMultiStep"
    with pytest.raises(ValueError, match="SOLVER.LR_SCHEDULER must be 'WarmupCosine', got 'WarmupMultiStep'"):
        build_lr_schedule(cfg, 100)


def test_lr_schedule_edge_lengths():
    # One iteration in all.
    assert LRSchedule(2.0, 1, 0, 0.01, 0.0).lr_at(0) == pytest.approx(2.0)
    # One warmup iteration: iteration 0 is still at the warmup start.
    s = LRSchedule(2.0, 10, 1, 0.01, 0.0)
    assert s.lr_at(0) == pytest.approx(0.02)
    assert s.lr_at(1) == pytest.approx(2.0)
    # Warmup over the whole run: linear all the way, no cosine.
    s = LRSchedule(2.0, 10, 10, 0.01, 0.0)
    assert s.lr_at(0) == pytest.approx(0.02)
    assert s.lr_at(5) == pytest.approx(0.02 + 0.5 * (2.0 - 0.02))
    assert s.lr_at(10) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "max_iter, warmup_iters, message",
    [
        (0, 0, "max_iter must be positive, got 0"),
        (10, 11, r"warmup_iters=11 must lie in \[0, max_iter=10\]"),
        (10, -1, r"warmup_iters=-1 must lie in \[0, max_iter=10\]"),
    ],
)
def test_lr_schedule_bad_lengths(max_iter, warmup_iters, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(1.0, max_iter, warmup_iters, 0.1, 0.0)


def test_momentum_schedule_defaults_to_cosine_and_rejects_unknown_kinds():
    m = MomentumSchedule(0.99, 100)
    assert m.kind == "cosine"
    assert m.momentum_at(50) == pytest.approx(0.995)
    with pytest.raises(ValueError, match="MODEL.EMA.SCHEDULE must be 'cosine' or 'constant', got 'linear'"):
        MomentumSchedule(0.99, 100, "linear")
