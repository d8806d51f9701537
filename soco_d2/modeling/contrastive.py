"""InfoNCE against a queue of negatives, and the queue itself (MoCo v2, used by DetCo)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import comm

__all__ = ["info_nce", "FeatureQueue", "check_queue_size"]


def info_nce(
    q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE: cross-entropy of ``[q.k+, q.queue^T] / T`` with the positive at index 0.

    Args:
        q: (N, D) queries; k_pos: (N, D) positive keys (no gradient is taken through them);
        queue: (K, D) negatives. All are expected L2-normalised. Computed in float32.
    Returns the mean loss over the N queries.
    """
    q = q.float()
    k_pos = k_pos.detach().float()
    pos = (q * k_pos).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().float().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def check_queue_size(queue_size: int, ims_per_batch: int, grad_accum_steps: int = 1) -> int:
    """Keys enqueued per forward (``IMS_PER_BATCH / GRAD_ACCUM_STEPS``, over all processes);
    raise a clear error unless the queue holds a whole number of such batches."""
    keys_per_step = ims_per_batch // max(grad_accum_steps, 1)
    if keys_per_step < 1 or queue_size < keys_per_step or queue_size % keys_per_step:
        raise ValueError(
            f"MODEL.DETCO.QUEUE_SIZE ({queue_size}) must be a positive multiple of the keys "
            f"enqueued per step, SOLVER.IMS_PER_BATCH / SOLVER.GRAD_ACCUM_STEPS = "
            f"{ims_per_batch} / {grad_accum_steps} = {keys_per_step}. Set MODEL.DETCO.QUEUE_SIZE "
            f"to a multiple of {keys_per_step} (e.g. {max(1, queue_size // max(keys_per_step, 1)) * keys_per_step})"
            " or change SOLVER.IMS_PER_BATCH."
        )
    return keys_per_step


class FeatureQueue(nn.Module):
    """A FIFO of ``size`` L2-normalised ``dim``-d keys (MoCo's memory bank).

    ``queue`` (size, dim) and ``ptr`` are buffers, so they are saved in ``state_dict`` and a
    resumed run continues with the same negatives. Initialised with random unit vectors, as MoCo.
    The pointer is also kept on the host (``position``), so that enqueueing never reads the
    device; loading a state dict sets both.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got {size} x {dim}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.position = 0  # == int(self.ptr), on the host

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def negatives(self) -> torch.Tensor:
        """A detached copy of the queue (safe to use in a loss before :meth:`enqueue` runs)."""
        return self.queue.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gathered: bool = False) -> None:
        """Gather ``keys`` (B, dim) from every process (rank order; a no-op for one process;
        ``gathered``: they are the keys of all processes already), write them at the pointer
        (wrapping around) and advance it. Collective unless ``gathered``: every process must call
        it with the same B, so the queues stay identical across processes."""
        if not gathered:
            keys = comm.all_gather(keys)
        b = keys.shape[0]
        if b > self.size:
            raise ValueError(
                f"Cannot enqueue {b} keys into a queue of {self.size} "
                "(raise MODEL.DETCO.QUEUE_SIZE)"
            )
        ptr = self.position
        first = min(b, self.size - ptr)  # the rest wraps around to the start
        keys = keys.detach().to(self.queue.dtype)
        self.queue[ptr:ptr + first] = keys[:first]
        self.queue[: b - first] = keys[first:]
        self.position = (ptr + b) % self.size
        self.ptr.fill_(self.position)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "queue")
        if saved is not None and tuple(saved.shape) != tuple(self.queue.shape):
            raise ValueError(
                f"Checkpoint queue {prefix}queue has shape {tuple(saved.shape)} (size x dim) but "
                f"the model's is {tuple(self.queue.shape)}: set MODEL.DETCO.QUEUE_SIZE = "
                f"{saved.shape[0]} and MODEL.DETCO.FEATURE_DIM = {saved.shape[1]} to resume it, "
                "or start a new run."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.position = int(self.ptr)  # once per load, not per step

    def extra_repr(self) -> str:
        return f"size={self.queue.shape[0]}, dim={self.queue.shape[1]}"
