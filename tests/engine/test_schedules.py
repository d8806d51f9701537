import math

import pytest

from soco_d2.config import get_cfg
from soco_d2.engine.schedules import (
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
