"""Small helpers around ``torch.distributed`` that also work when it is not initialised.

Without an initialised process group every function behaves as for a world of one process.
"""
import inspect
import os
from typing import Dict, List, Mapping, Sequence, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# Set by :func:`soco_d2.engine.launch.launch` in each worker; ``LOCAL_RANK`` is the fallback.
_LOCAL_RANK = None
_LOCAL_WORLD_SIZE = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """Rank of this process on its machine (selects the GPU)."""
    if _LOCAL_RANK is not None:
        return _LOCAL_RANK
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def get_local_world_size() -> int:
    if _LOCAL_WORLD_SIZE is not None:
        return _LOCAL_WORLD_SIZE
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size())) if is_distributed() else 1


def set_local_rank(local_rank: int, local_world_size: int) -> None:
    global _LOCAL_RANK, _LOCAL_WORLD_SIZE
    _LOCAL_RANK, _LOCAL_WORLD_SIZE = int(local_rank), int(local_world_size)


def is_main_process() -> bool:
    return get_rank() == 0


def _comm_device() -> torch.device:
    """The device a tensor must live on for a collective of the current backend."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    """Barrier across all processes (no-op for a single process)."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order (no gradient).

    Every process must pass a tensor of the same shape and dtype. The result is on the device of
    ``tensor``.
    """
    world = get_world_size()
    if world == 1:
        return tensor.detach().clone()
    device = tensor.device
    t = tensor.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0).to(device)


@torch.no_grad()
def all_gather_tensors(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """:func:`all_gather` of several tensors with the same first dimension, in one collective
    per dtype (the tensors are flattened per row and concatenated for the exchange)."""
    if get_world_size() == 1:
        return [t.detach().clone() for t in tensors]
    n = tensors[0].shape[0]
    out: List[torch.Tensor] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(n, -1) for i in idx], dim=1)
        parts = all_gather(flat).split([tensors[i][:1].numel() for i in idx], dim=1)
        for i, part in zip(idx, parts):
            out[i] = part.reshape(-1, *tensors[i].shape[1:])
    return out


def all_reduce_mean(
    metrics: Mapping[str, Union[float, torch.Tensor]]
) -> Dict[str, float]:
    """Average a dict of scalars over all processes (all must pass the same keys)."""
    keys = sorted(metrics)
    if not keys:
        return {}
    values = torch.stack(
        [torch.as_tensor(metrics[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys]
    )
    world = get_world_size()
    if world > 1:
        values = values.to(_comm_device())
        dist.all_reduce(values)
        values = values / world
    return dict(zip(keys, values.cpu().tolist()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (returns a new tensor on the input's device)."""
    if get_world_size() == 1:
        return tensor.clone()
    t = tensor.detach().to(_comm_device()).clone()
    dist.all_reduce(t)
    return t.to(tensor.device)


def all_gather_object(obj):
    """List of ``obj`` from every process in rank order (picklable objects)."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` (BN statistics, queues) from process ``src`` to all
    processes (collective; no-op for one process). DistributedDataParallel with
    ``broadcast_buffers=False`` does not sync buffers at construction (the option of torch
    versions without ``forward_sync_buffers``), so buffers drawn from a per-process seed would
    otherwise start different on every process."""
    if get_world_size() == 1:
        return
    device = _comm_device()
    for buf in module.buffers():
        t = buf if buf.device == device else buf.to(device)
        dist.broadcast(t, src)
        if t is not buf:
            buf.copy_(t)


def _no_buffer_broadcast() -> Dict:
    """DDP option that keeps buffers (BN statistics, queues) process-local during training:
    ``forward_sync_buffers=False`` in recent torch, ``broadcast_buffers=False`` before (which,
    unlike the former, does not sync them at construction either: :func:`wrap_ddp` does that
    with :func:`broadcast_buffers`)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel, as every trainer runs it on several processes:
    every process starts from process 0's parameters and buffers (collective), and buffers stay
    process-local during training (no sync in the forward; synchronised BN layers share their
    statistics themselves)."""
    broadcast_buffers(model)
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **_no_buffer_broadcast(),
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself if unwrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
