"""Label-free health figures of a representation (``MONITOR.HEALTH``): RankMe and the
per-dimension std of L2-normalised embeddings, the warnings when they show a collapse, and the
rows of every process gathered for them. See :mod:`soco_d2.engine.monitors`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from soco_d2.utils import comm

__all__ = ["rankme", "embedding_std", "collapse_warning", "rank_drop_warning", "gather_rows"]


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``z`` (N, D): ``exp(-sum p log p)``, ``p = s / |s|_1 + eps`` over the
    singular values ``s`` (RankMe, Garrido et al. 2023). Between 1 and ``min(N, D)``."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the std over rows of the L2-normalised ``z`` (N, D)."""
    return float(F.normalize(z.double(), dim=1).std(dim=0).mean())


def collapse_warning(std: float, dim: int, ratio: float, rank: float, iteration: int) -> Optional[str]:
    """The warning text when ``std`` is below ``ratio / sqrt(dim)``, else None."""
    ref = 1.0 / math.sqrt(dim)
    if std >= ratio * ref:
        return None
    return (
        f"Embedding collapse at iteration {iteration}: the per-dimension std of the L2-normalised "
        f"projector outputs is {std:.4g}, below {ratio:g} x {ref:.4g} (1/sqrt({dim}), the value of "
        f"embeddings spread over the sphere); RankMe {rank:.2f} of at most {dim}. Check: the "
        "learning rate and its warmup (too high a rate collapses BYOL / SoCo early), the EMA "
        "momentum (MODEL.EMA.BASE_MOMENTUM; a target equal to the online network collapses), the "
        "predictor and the BN layers of projector / predictor (BYOL needs both), weight decay, and "
        "that the views differ (augmentations, crops, proposals).")


def rank_drop_warning(rank: float, peak: float, ratio: float, iteration: int) -> Optional[str]:
    """The warning text when RankMe ``rank`` is below ``ratio`` x ``peak`` (its highest value so
    far in the run), else None."""
    if rank >= ratio * peak:
        return None
    return (
        f"Dimensional collapse at iteration {iteration}: RankMe of the projector outputs is "
        f"{rank:.2f}, below {ratio:g} x {peak:.2f} (its highest value in this run): the embeddings "
        "use few directions, and the kNN accuracy of such runs falls (MONITOR.HEALTH.RANK_DROP_RATIO "
        "sets the threshold, 0 turns it off). Check: the learning rate and its scaling with the "
        "batch size (SOLVER.BASE_LR, BASE_LR_BATCH_SIZE, LARS_TRUST_COEF), the warmup, the EMA "
        "momentum (MODEL.EMA.BASE_MOMENTUM), and that the views differ (augmentations, crops, "
        "proposals).")


def gather_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows of ``z`` from every process (different row counts allowed)."""
    if comm.get_world_size() == 1:
        return z
    counts = comm.all_gather(torch.tensor([z.shape[0], z.shape[1]], dtype=torch.long)).view(-1, 2)
    n, d = int(counts[:, 0].max()), int(counts[:, 1].max())
    padded = z.new_zeros(n, d)
    padded[: z.shape[0], : z.shape[1]] = z
    gathered = comm.all_gather(padded).view(-1, n, d)
    return torch.cat([gathered[r, : int(c)] for r, c in enumerate(counts[:, 0])])
