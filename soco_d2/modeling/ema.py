"""Exponential moving average of an online network into a target (momentum) network."""
import copy
import math
from typing import Iterable, List, Union

import torch
from torch import nn

Modules = Union[nn.Module, Iterable[nn.Module]]


def _parameters(modules: Modules) -> List[nn.Parameter]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    return [p for m in modules for p in m.parameters()]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters get no gradient: a target network."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online_modules: Modules, target_modules: Modules, m: float) -> None:
    """``theta_t = m * theta_t + (1 - m) * theta_o`` for every parameter, in place.

    Buffers (BN running statistics) are not averaged: the target keeps its own, as the
    official SoCo code. The modules are matched in order and must have the same structure.
    """
    online = _parameters(online_modules)
    target = _parameters(target_modules)
    if len(online) != len(target) or any(o.shape != t.shape for o, t in zip(online, target)):
        raise ValueError(
            f"Online and target networks differ: {len(online)} vs {len(target)} parameters "
            "(or mismatched shapes); build the target as a deep copy of the online network."
        )
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"Momentum must be in [0, 1], got {m}.")
    # theta_t + (1 - m) (theta_o - theta_t), one fused multi-tensor kernel per device and dtype.
    torch._foreach_lerp_(target, online, 1.0 - m)


def cosine_momentum(base: float, it: int, max_iter: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * it / max_iter) + 1) / 2`` (base -> 1)."""
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}.")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * it / max_iter) + 1.0) / 2.0
