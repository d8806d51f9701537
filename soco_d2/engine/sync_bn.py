"""Cross-process batch normalisation for CUDA (torch's SyncBatchNorm) and CPU / gloo.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so multi-process CPU runs (and the tests that
check multi-process training on two CPU processes) use :class:`GlooSyncBatchNorm`, which
all-reduces the per-channel sums with a differentiable ``all_reduce``. Both keep the
state-dict keys of ``BatchNorm``, so checkpoints move freely between world sizes.
:func:`sync_batchnorm_to_gloo` does the same for a model built with torch's SyncBatchNorm
(detectron2's ``SyncBN``) that is to train on CPU processes.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm", "sync_batchnorm_to_gloo"]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes (the gradient is summed likewise). Written here because
    ``torch.distributed.nn.functional`` is deprecated and the autograd support of its successor
    differs across the torch versions this package supports."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are computed over all processes (any backend).

    Statistics are weighted by each process's element count, so processes may hold different
    batch sizes. Running statistics follow ``BatchNorm``: biased variance for normalisation,
    unbiased for ``running_var``. Inputs of any dimension >= 2 are accepted; the class derives
    from ``BatchNorm2d`` so that code looking for BN layers by type (fvcore's precise BN, which
    both fine-tuning trainers use) finds it.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.numel() / c
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), count)])
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / self.num_batches_tracked.item()) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.detach().to(self.running_var.dtype), alpha=f)
        scale = invstd if self.weight is None else self.weight * invstd
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        shape = [1, c] + [1] * (x.dim() - 2)
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def _to_gloo_sync(module: nn.Module, convert) -> nn.Module:
    out = module
    if convert(module):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_gloo_sync(child, convert))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``model`` by a synchronised one suited to ``device``."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_gloo_sync(model, lambda m: isinstance(m, _BatchNorm)
                         and not isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm)))


def sync_batchnorm_to_gloo(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` of ``model`` (which refuses CPU tensors, and which
    DistributedDataParallel refuses in a CPU model) by :class:`GlooSyncBatchNorm`; other norms
    stay. Parameters and buffers are shared, not copied."""
    return _to_gloo_sync(model, lambda m: isinstance(m, nn.SyncBatchNorm))
