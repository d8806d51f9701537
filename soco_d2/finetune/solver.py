"""The fine-tuning solver: SGD with detectron2's weight-decay groups, linear scaling of the
learning rate (``BASE_LR * IMS_PER_BATCH / BASE_LR_BATCH_SIZE``), linear (or constant) warmup
then step decay (fvcore's param schedulers)."""
import logging
from typing import List

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
)
from torch import nn

__all__ = ["resolve_steps", "WarmupMultiStepLR", "build_lr_scheduler", "build_finetune_optimizer"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
               nn.modules.instancenorm._InstanceNorm)


def resolve_steps(steps, max_iter: int) -> List[int]:
    """``SOLVER.STEPS`` as iterations: values in (0, 1) are fractions of ``max_iter``.

    Steps at or beyond ``max_iter`` (or rounding to 0) are dropped with a warning (as detectron2
    drops steps beyond ``MAX_ITER``).
    """
    out = []
    for s in steps:
        if s <= 0:
            raise ValueError(f"SOLVER.STEPS must be positive, got {tuple(steps)}.")
        out.append(int(round(s * max_iter)) if s < 1 else int(s))
    if out != sorted(out) or len(set(out)) != len(out):
        raise ValueError(f"SOLVER.STEPS must increase strictly; got {tuple(steps)} -> {out}.")
    kept = [s for s in out if 0 < s < max_iter]
    if len(kept) < len(out):
        logger.warning("SOLVER.STEPS %s -> %s: only steps within 1..%d are used (SOLVER.MAX_ITER=%d).",
                       tuple(steps), out, max_iter - 1, max_iter)
    return kept


class WarmupMultiStepLR:
    """Learning rate per iteration: warmup from ``warmup_factor * lr`` (linear, or constant) over
    ``warmup_iters``, then ``lr * gamma ** k`` after the k-th step (fvcore schedulers, evaluated
    at ``iteration / max_iter`` as detectron2's ``LRMultiplier``)."""

    def __init__(self, lr: float, max_iter: int, steps: List[int], gamma: float,
                 warmup_iters: int, warmup_factor: float, warmup_method: str = "linear"):
        if max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive for fine-tuning, got {max_iter}.")
        self.max_iter, self.base_lr = max_iter, lr
        decay = MultiStepParamScheduler(
            [lr * gamma**k for k in range(len(steps) + 1)], num_updates=max_iter, milestones=steps
        ) if steps else ConstantParamScheduler(lr)
        warmup_iters = min(max(int(warmup_iters), 0), max_iter)
        if warmup_iters == 0:
            self._sched = decay
            return
        if warmup_method == "linear":
            warmup = LinearParamScheduler(warmup_factor * lr, lr)
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(warmup_factor * lr)
        else:
            raise ValueError(f"SOLVER.WARMUP_METHOD must be 'linear' or 'constant', got {warmup_method!r}.")
        frac = warmup_iters / max_iter
        if frac >= 1.0:
            self._sched = warmup
            return
        # "fixed": the decay scheduler sees the global position, so milestones stay absolute.
        self._sched = CompositeParamScheduler(
            [warmup, decay], lengths=[frac, 1.0 - frac], interval_scaling=["rescaled", "fixed"]
        )

    def lr_at(self, it: int) -> float:
        return float(self._sched(min(max(it, 0), self.max_iter - 1) / self.max_iter))


def build_lr_scheduler(cfg, max_iter: int) -> WarmupMultiStepLR:
    s = cfg.SOLVER
    if s.LR_SCHEDULER != "WarmupMultiStep":
        raise ValueError(
            f"Fine-tuning needs SOLVER.LR_SCHEDULER 'WarmupMultiStep', got {s.LR_SCHEDULER!r} "
            "(pretraining's schedule: load fine-tuning configs on soco_d2.config.get_finetune_cfg's "
            "defaults, as tools/train_net.py does, or set the key)."
        )
    lr = s.BASE_LR * s.IMS_PER_BATCH / s.BASE_LR_BATCH_SIZE
    return WarmupMultiStepLR(lr, max_iter, resolve_steps(s.STEPS, max_iter), s.GAMMA,
                             s.WARMUP_ITERS, s.WARMUP_FACTOR, s.WARMUP_METHOD)


def build_finetune_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD; parameters of normalisation layers get ``WEIGHT_DECAY_NORM``, all others (biases
    included) ``WEIGHT_DECAY``, as detectron2's default optimizer."""
    s = cfg.SOLVER
    if s.OPTIMIZER != "SGD":
        raise ValueError(
            f"Fine-tuning uses SOLVER.OPTIMIZER 'SGD', got {s.OPTIMIZER!r} (pretraining's optimizer: "
            "load fine-tuning configs on soco_d2.config.get_finetune_cfg's defaults, as "
            "tools/train_net.py does, or set the key)."
        )
    norm, other, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm if isinstance(module, _NORM_TYPES) else other).append(p)
    groups = [{"params": other, "weight_decay": s.WEIGHT_DECAY}]
    if norm:
        groups.append({"params": norm, "weight_decay": s.WEIGHT_DECAY_NORM})
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
