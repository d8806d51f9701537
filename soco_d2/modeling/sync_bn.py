"""Cross-process batch normalisation without host syncs, for any backend (NCCL, gloo).

:class:`AllReduceBatchNorm` computes the training statistics of all processes with one
all-reduce of (sum, sum of squares, count) per call, and its backward with one all-reduce of
(sum of dy, sum of dy * (x - mean)): the same numbers as ``torch.nn.SyncBatchNorm`` (forward,
gradients, running statistics), but no host sync. torch's SyncBatchNorm all-gathers
(mean, invstd, count) and drops the statistics of processes with an empty batch through a
boolean mask, which waits for the device on every call (three syncs per call), and it refuses
CPU tensors. Here an empty batch adds zeros to the sums, so nothing needs dropping.

:func:`batch_norm_per_group` normalises consecutive groups of rows with each group's own
statistics, as running the layer on every group in turn would, with one collective for all
groups on several processes: SoCo's faithful head normalises every (view, box set, level) group
separately.

Both keep the state-dict keys of ``BatchNorm``, so checkpoints move freely between world sizes.
:func:`convert_sync_batchnorm` converts a model (the engine does so on several processes; on
one process the converted layers compute what ``BatchNorm`` does);
:func:`sync_batchnorm_to_gloo` converts a model built with torch's SyncBatchNorm (detectron2's
``SyncBN``) that is to train on CPU processes.
"""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AllReduceBatchNorm", "batch_norm_per_group", "convert_sync_batchnorm", "sync_batchnorm_to_gloo"]


def _views(x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """``x`` (R, C, ...) as views ``(g, n, C, ...)`` of consecutive groups of rows: one view of
    all groups when they are equal, else one view per group."""
    if len(set(sizes)) == 1:
        return [x.unflatten(0, (len(sizes), sizes[0]))]
    return [part.unsqueeze(0) for part in x.split(list(sizes))]


def _reduce_dims(view: torch.Tensor) -> List[int]:
    return [1] + list(range(3, view.dim()))


def _per_group(coeffs: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """(g, C) coefficients shaped to broadcast against a view (g, n, C, ...)."""
    return coeffs.view(coeffs.shape[0], 1, coeffs.shape[1], *([1] * (view.dim() - 3)))


def _group_slices(views: List[torch.Tensor]) -> List[slice]:
    """The groups each view of :func:`_views` covers."""
    out, g = [], 0
    for v in views:
        out.append(slice(g, g + v.shape[0]))
        g += v.shape[0]
    return out


def _new_rows(like: torch.Tensor, sizes: Sequence[int], fill) -> torch.Tensor:
    """A new tensor like ``like`` whose group views ``(g, n, C, ...)`` are written by
    ``fill(out_view, i, groups)`` (``i``: index of the view). Not a view of another tensor: the
    output of an autograd function may be modified in place (ReLU(inplace=True) follows most
    BN layers)."""
    out = torch.empty_like(like)
    views = _views(out, sizes)
    for i, (o, g) in enumerate(zip(views, _group_slices(views))):
        fill(o, i, g)
    return out


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _update_running_stats(bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
    """Update ``bn``'s running statistics as ``G`` calls in turn would (G = rows of ``mean``;
    ``var`` biased, made unbiased with the global count ``n`` of each group, as BatchNorm)."""
    groups = mean.shape[0]
    if bn.momentum is None:  # cumulative average: the factor depends on the count, as in BatchNorm
        start = int(bn.num_batches_tracked.item())  # host sync, as torch's BatchNorm here
        factors = [1.0 / (start + g + 1) for g in range(groups)]
    else:
        factors = [float(bn.momentum)] * groups
    bn.num_batches_tracked.add_(groups)
    # r_G = prod_g (1 - f_g) r_0 + sum_g f_g prod_{h > g} (1 - f_h) s_g: one update for all groups.
    keep, decay = 1.0, []
    for f in reversed(factors):
        decay.append(keep)
        keep *= 1 - f
    if bn.momentum is None or groups == 1:
        w = mean.new_tensor([f * d for f, d in zip(factors, reversed(decay))]) if groups > 1 else None
    else:  # m (1 - m)^(G - 1 - g), built on the device (no host-to-device copy)
        m = factors[0]
        w = m * (1 - m) ** torch.arange(groups - 1, -1, -1, device=mean.device, dtype=mean.dtype)
    unbiased = var * (n / (n - 1).clamp_min(1))[:, None]
    valid = (n > 0)[:, None]  # a group empty on every process leaves the statistics alone
    for buf, stat in ((bn.running_mean, mean), (bn.running_var, unbiased)):
        stat = torch.where(valid, stat, buf.to(stat.dtype)[None])
        if w is None:
            buf.mul_(keep).add_(stat[0].to(buf.dtype), alpha=factors[0])
        else:
            buf.mul_(keep).add_((w[:, None] * stat).sum(0).to(buf.dtype))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with per-group statistics over all processes: one all-reduce in forward and
    one in backward (when the input needs a gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn, sizes):
        xf = x.float()
        views = _views(xf, sizes)
        groups, c = len(sizes), x.shape[1]
        per_row = x[:1, :1].numel()  # elements per row and channel
        stats = torch.cat([torch.cat([v.sum(_reduce_dims(v)) for v in views]).flatten(),
                           torch.cat([(v * v).sum(_reduce_dims(v)) for v in views]).flatten()]
                          + [xf.new_full((v.shape[0],), float(v.shape[1] * per_row)) for v in views])
        dist.all_reduce(stats)
        n = stats[2 * groups * c:]
        safe = n.clamp_min(1)[:, None]
        mean = stats[: groups * c].view(groups, c) / safe
        var = (stats[groups * c: 2 * groups * c].view(groups, c) / safe - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + bn.eps)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                _update_running_stats(bn, mean, var, n)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        y = _new_rows(xf, sizes, lambda o, i, g: torch.addcmul(
            _per_group(shift[g], o), views[i], _per_group(scale[g], o), out=o))
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.sizes, ctx.has_bias = sizes, bias is not None
        return _like_input(y.to(x.dtype), x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        xv, dyv = _views(x.float(), ctx.sizes), _views(dy.float(), ctx.sizes)
        slices = _group_slices(xv)
        groups, c = mean.shape
        sum_dy = torch.cat([d.sum(_reduce_dims(d)) for d in dyv])
        sum_dy_xmu = torch.cat([(d * (v - _per_group(mean[g], v))).sum(_reduce_dims(v))
                                for d, v, g in zip(dyv, xv, slices)])
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:  # this process's share, as BatchNorm
            grad_weight = (sum_dy_xmu * invstd).sum(0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy.flatten(), sum_dy_xmu.flatten()])
            dist.all_reduce(both)
            sum_dy, sum_dy_xmu = both[: groups * c].view(groups, c), both[groups * c:].view(groups, c)
            safe = n.clamp_min(1)[:, None]
            scale = invstd if weight is None else invstd * weight.float()
            mean_dy = sum_dy / safe
            proj = invstd * invstd * sum_dy_xmu / safe

            # dx = scale * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))), as
            # torch's batch_norm_backward_elemt.
            def fill(o, i, g):
                v = xv[i]
                torch.sub(dyv[i], _per_group(mean_dy[g], o), out=o)
                o.sub_((v - _per_group(mean[g], o)) * _per_group(proj[g], o)).mul_(_per_group(scale[g], o))

            grad_x = _new_rows(dy.float(), ctx.sizes, fill)
            grad_x = _like_input(grad_x.to(x.dtype), x)
        return grad_x, grad_weight, grad_bias, None, None


def _needs_sync(bn: nn.Module) -> bool:
    return isinstance(bn, AllReduceBatchNorm) and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


def _uses_batch_stats(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


class AllReduceBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are computed over all processes (any backend), with
    one all-reduce per call and no host sync (module docstring).

    Statistics are weighted by each process's element count, so processes may hold different
    batch sizes (or none). Running statistics follow ``BatchNorm``: biased variance for
    normalisation, unbiased (global count) for ``running_var``. Inputs of any dimension >= 2 are
    accepted; the class derives from ``BatchNorm2d`` so that code looking for BN layers by type
    (fvcore's precise BN, which both fine-tuning trainers use) finds it. On one process (or in
    evaluation) it is ``BatchNorm``.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _uses_batch_stats(self) or not _needs_sync(self):
            return super().forward(x)
        self._check_input_dim(x)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self, (x.shape[0],))


def batch_norm_per_group(bn: nn.Module, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``bn`` applied to each group of consecutive rows of ``x`` (``sizes`` rows each) with that
    group's statistics, the running statistics updated once per group in order: what
    ``torch.cat([bn(part) for part in x.split(sizes)])`` computes, in one call (and one
    collective for an :class:`AllReduceBatchNorm` on several processes).

    ``bn``: any batch norm; only an :class:`AllReduceBatchNorm` on several processes (in
    training) runs as one call, the others run per group (no collective to save). In evaluation
    (running statistics) the groups do not matter: one call.
    """
    sizes = [int(s) for s in sizes]
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"group sizes {sizes} do not add up to the {x.shape[0]} rows of the input.")
    if isinstance(bn, _BatchNorm) and not _uses_batch_stats(bn):
        return bn(x)
    if len(sizes) == 1:
        return bn(x)
    if not _needs_sync(bn):
        # No collective to save: BatchNorm's own kernel per group, bit for bit what the layer
        # computes on each group (the official-parity benchmark compares at 1e-7).
        return torch.cat([bn(part) for part in x.split(sizes)])
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
    return _SyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn, tuple(sizes))


def _to_sync(module: nn.Module, convert) -> nn.Module:
    out = module
    if convert(module):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_sync(child, convert))
    return out


def convert_sync_batchnorm(model: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """Replace every BatchNorm of ``model`` by an :class:`AllReduceBatchNorm` (on any device:
    torch's SyncBatchNorm syncs the host on every call). Parameters and buffers are shared.
    ``device`` is accepted for callers that name it; the result does not depend on it."""
    return _to_sync(model, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, AllReduceBatchNorm))


def sync_batchnorm_to_gloo(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` of ``model`` (which refuses CPU tensors, and which
    DistributedDataParallel refuses in a CPU model) by :class:`AllReduceBatchNorm`; other norms
    stay. Parameters and buffers are shared, not copied."""
    return _to_sync(model, lambda m: isinstance(m, nn.SyncBatchNorm))
