"""Optimizers for pretraining: LARS (as in the official SoCo code) and plain SGD."""
from typing import List

import torch
from torch import nn

__all__ = ["LARS", "build_optimizer", "get_param_groups"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Written here because neither torch nor torchvision ships LARS. It follows the recipe of the
    official SoCo / BYOL code, per parameter tensor ``p`` with gradient ``g``:

    * ``g = g + weight_decay * p`` (weight decay enters before the trust ratio);
    * ``g = g * trust_coefficient * ||p|| / (||g|| + eps)`` when both norms are positive
      (the ratio is 1 otherwise);
    * SGD momentum: ``buf = momentum * buf + g`` (``buf = g`` on the first step),
      ``p = p - lr * buf`` (or ``p - lr * (g + momentum * buf)`` with Nesterov).

    A parameter group with ``lars_exclude=True`` (biases and norm weights) skips the first two
    steps: no weight decay and no trust ratio, but the same learning rate and momentum.
    The update is vectorised over the tensors of a group with ``torch._foreach_*`` kernels.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"Invalid LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay},"
                f" trust_coefficient={trust_coefficient}, eps={eps}"
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"] != 0:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = torch.where(
                    (p_norm > 0) & (g_norm > 0),
                    group["trust_coefficient"] * p_norm / (g_norm + group["eps"]),
                    torch.ones_like(p_norm),
                )
                grads = torch._foreach_mul(grads, list(ratio.unbind()))
            self._sgd_momentum(group, params, grads)
        return loss

    def _sgd_momentum(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]):
        momentum = group["momentum"]
        if momentum != 0:
            bufs, old_bufs, old_grads = [], [], []
            for p, g in zip(params, grads):
                buf = self.state[p].get("momentum_buffer")
                if buf is None:  # first step: buf = g
                    buf = self.state[p]["momentum_buffer"] = g.detach().clone()
                else:
                    old_bufs.append(buf)
                    old_grads.append(g)
                bufs.append(buf)
            if old_bufs:  # buf = momentum * buf + g
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_grads)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


def get_param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool):
    """Trainable parameters split into a decayed group and, optionally, an excluded group of all
    1-D tensors (biases, norm weights) with ``weight_decay=0`` and ``lars_exclude=True``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": params, "weight_decay": weight_decay, "lars_exclude": False}]
    regular = [p for p in params if p.ndim > 1]
    excluded = [p for p in params if p.ndim <= 1]
    groups = []
    if regular:
        groups.append({"params": regular, "weight_decay": weight_decay, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("LARS" or "SGD") over the trainable parameters of ``model``.

    The learning rate set here is the scaled peak rate; the trainer sets each iteration's rate.
    """
    from .schedules import scaled_lr

    s = cfg.SOLVER
    groups = get_param_groups(model, s.WEIGHT_DECAY, s.EXCLUDE_BIAS_AND_NORM)
    if not groups:
        raise ValueError("The model has no parameter with requires_grad=True: nothing to train.")
    lr = scaled_lr(cfg)
    if s.OPTIMIZER == "LARS":
        return LARS(groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                    trust_coefficient=s.LARS_TRUST_COEF, eps=s.LARS_EPS, nesterov=s.NESTEROV)
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                               nesterov=s.NESTEROV)
    raise ValueError(f"SOLVER.OPTIMIZER must be 'LARS' or 'SGD', got {s.OPTIMIZER!r}.")

