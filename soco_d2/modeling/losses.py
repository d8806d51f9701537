"""Pretraining losses."""
import torch
import torch.nn.functional as F
from torch import Tensor


def soco_pair_loss(q: Tensor, k: Tensor, ids_q: Tensor, ids_k: Tensor, eps: float = 1e-6) -> Tensor:
    """SoCo's box-level BYOL loss between two views (``regression_loss_bboxs_aware``).

    Args:
        q: (N, M, C) online predictions of the boxes of one view.
        k: (N, M', C) target projections of the boxes of the other view.
        ids_q, ids_k: (N, M), (N, M') proposal ids; box i of view q and box j of view k of
            image n are a positive pair iff ``ids_q[n, i] == ids_k[n, j] >= 0``. Padding
            duplicates repeat ids (several positives per box); negative ids never match.

    Returns ``-2 * mean_n( sum_ij C_nij <q_ni, k_nj> / (sum_ij C_nij + eps) )`` with q and k
    L2-normalised, computed in fp32 even under autocast. It lies in [-2, 2] (-2 when every
    positive pair is aligned; BYOL's ``2 - 2 cos`` minus the constant 2). An image without any
    positive pair contributes 0.
    """
    if q.dim() != 3 or k.dim() != 3 or ids_q.shape != q.shape[:2] or ids_k.shape != k.shape[:2]:
        raise ValueError(
            "soco_pair_loss expects q (N, M, C), k (N, M', C), ids_q (N, M), ids_k (N, M'); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(ids_q.shape)}, {tuple(ids_k.shape)}."
        )
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
        sim = torch.bmm(q, k.transpose(1, 2))  # (N, M, M')
        valid = (ids_q >= 0)[:, :, None] & (ids_k >= 0)[:, None, :]
        positive = ((ids_q[:, :, None] == ids_k[:, None, :]) & valid).float()
        per_image = (positive * sim).sum(dim=(1, 2)) / (positive.sum(dim=(1, 2)) + eps)
        return -2.0 * per_image.mean()
