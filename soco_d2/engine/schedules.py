"""Per-iteration schedules: learning rate (linear warmup + cosine) and EMA momentum."""
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
)

from soco_d2.modeling.ema import cosine_momentum

__all__ = [
    "scaled_lr",
    "max_iter_from_cfg",
    "warmup_iters_from_cfg",
    "LRSchedule",
    "MomentumSchedule",
    "build_lr_schedule",
    "build_momentum_schedule",
]


def scaled_lr(cfg) -> float:
    """Linear scaling rule: ``BASE_LR * IMS_PER_BATCH / BASE_LR_BATCH_SIZE``."""
    s = cfg.SOLVER
    return s.BASE_LR * s.IMS_PER_BATCH / s.BASE_LR_BATCH_SIZE


def max_iter_from_cfg(cfg, dataset_len: int) -> int:
    """``SOLVER.MAX_ITER`` if positive, else ``EPOCHS * (dataset_len // IMS_PER_BATCH)``."""
    s = cfg.SOLVER
    if s.MAX_ITER > 0:
        return int(s.MAX_ITER)
    per_epoch = dataset_len // s.IMS_PER_BATCH
    if per_epoch == 0:
        raise ValueError(
            f"The dataset has {dataset_len} images, fewer than SOLVER.IMS_PER_BATCH="
            f"{s.IMS_PER_BATCH}: lower the batch size or set SOLVER.MAX_ITER."
        )
    return int(s.EPOCHS * per_epoch)


def warmup_iters_from_cfg(cfg, max_iter: int) -> int:
    """``round(max_iter * WARMUP_EPOCHS / EPOCHS)``."""
    s = cfg.SOLVER
    if s.EPOCHS <= 0:
        raise ValueError(f"SOLVER.EPOCHS must be positive, got {s.EPOCHS}.")
    return int(round(max_iter * s.WARMUP_EPOCHS / s.EPOCHS))


class LRSchedule:
    """Linear warmup from ``warmup_factor * lr`` to ``lr`` over ``warmup_iters``, then cosine
    from ``lr`` to ``min_lr`` at ``max_iter`` (fvcore's composite scheduler)."""

    def __init__(self, lr: float, max_iter: int, warmup_iters: int, warmup_factor: float,
                 min_lr: float):
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}.")
        if not 0 <= warmup_iters <= max_iter:
            raise ValueError(f"warmup_iters={warmup_iters} must lie in [0, max_iter={max_iter}].")
        self.lr, self.max_iter, self.warmup_iters = lr, max_iter, warmup_iters
        warmup = LinearParamScheduler(warmup_factor * lr, lr)
        cosine = CosineParamScheduler(lr, min_lr)
        frac = warmup_iters / max_iter
        if warmup_iters == 0:
            self._sched = cosine
        elif warmup_iters == max_iter:
            self._sched = warmup
        else:
            self._sched = CompositeParamScheduler(
                [warmup, cosine], lengths=[frac, 1.0 - frac], interval_scaling=["rescaled"] * 2
            )

    def lr_at(self, it: int) -> float:
        """Learning rate of (0-based) iteration ``it``; ``it == max_iter`` gives ``min_lr``."""
        return float(self._sched(min(max(it, 0), self.max_iter) / self.max_iter))


class MomentumSchedule:
    """EMA momentum of the target network per iteration: cosine from ``base`` to 1, or constant."""

    def __init__(self, base: float, max_iter: int, kind: str = "cosine"):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"MODEL.EMA.SCHEDULE must be 'cosine' or 'constant', got {kind!r}.")
        self.base, self.max_iter, self.kind = base, max_iter, kind

    def momentum_at(self, it: int) -> float:
        if self.kind == "constant":
            return self.base
        return cosine_momentum(self.base, it, self.max_iter)


def build_lr_schedule(cfg, max_iter: int) -> LRSchedule:
    s = cfg.SOLVER
    if s.LR_SCHEDULER != "WarmupCosine":
        raise ValueError(f"SOLVER.LR_SCHEDULER must be 'WarmupCosine', got {s.LR_SCHEDULER!r}.")
    return LRSchedule(scaled_lr(cfg), max_iter, warmup_iters_from_cfg(cfg, max_iter),
                      s.WARMUP_FACTOR, s.MIN_LR)


def build_momentum_schedule(cfg, max_iter: int) -> MomentumSchedule:
    return MomentumSchedule(cfg.MODEL.EMA.BASE_MOMENTUM, max_iter, cfg.MODEL.EMA.SCHEDULE)
