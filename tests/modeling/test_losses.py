import math
import re

import pytest
import torch

from soco_d2.modeling.losses import soco_pair_loss


def test_single_positive_is_minus_two_cosine():
    # The seed's formula for one box seen in two views: L = -2 <v, v'> / (|v| |v'|).
    q = torch.tensor([[[3.0, 4.0]]])
    k = torch.tensor([[[1.0, 0.0]]])
    ids = torch.tensor([[7]])
    loss = soco_pair_loss(q, k, ids, ids)
    torch.testing.assert_close(loss, torch.tensor(-2 * 0.6 / (1 + 1e-6)))


def test_hand_computed_padding_duplicates_and_negative_ids():
    # Image 0: q boxes with ids [1, 2, 1(padding duplicate)], k boxes with ids [2, 1, -1].
    # Positives: (0,1), (1,0), (2,1) -> cosines 1, 0, -1 (unit vectors chosen below).
    # Image 1: ids q [5, -1, 6], k [-1, 6, 9] -> positives (2, 1) only: cosine 0.6.
    q = torch.tensor([
        [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]],
        [[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]],
    ])
    k = torch.tensor([
        [[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]],
        [[0.0, 1.0], [4.0, 3.0], [1.0, 1.0]],
    ])
    ids_q = torch.tensor([[1, 2, 1], [5, -1, 6]])
    ids_k = torch.tensor([[2, 1, -1], [-1, 6, 9]])
    # Image 0: q0.k1 = 1; q1.k0 = 0; q2.k1 = -1 -> (1 + 0 - 1) / 3 = 0.
    # Image 1: q2.k1 = (0, 1).(0.8, 0.6) = 0.6 -> 0.6 / 1.
    expected = -2 * (0.0 / (3 + 1e-6) + 0.6 / (1 + 1e-6)) / 2
    torch.testing.assert_close(soco_pair_loss(q, k, ids_q, ids_k), torch.tensor(expected))


def test_two_negative_ids_never_match_and_empty_image_gives_zero():
    q = torch.ones(1, 2, 3)
    ids = torch.tensor([[-1, -1]])
    assert soco_pair_loss(q, q, ids, ids).item() == 0.0


def test_fp32_under_autocast_and_gradient():
    q = torch.randn(2, 4, 8, requires_grad=True)
    k = torch.randn(2, 4, 8)
    ids = torch.tensor([[0, 1, 2, 0], [3, 4, 5, 6]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soco_pair_loss(q.bfloat16(), k.bfloat16(), ids, ids)
    assert loss.dtype == torch.float32
    assert -2 <= loss.item() <= 2
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    # Aligned predictions of distinct boxes reach the minimum -2.
    distinct = torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]])
    assert math.isclose(soco_pair_loss(k, k, distinct, distinct).item(), -2.0, abs_tol=1e-5)


@pytest.mark.parametrize("q_shape, k_shape, ids_q_shape, ids_k_shape", [
    ((1, 2, 3), (1, 2, 3), (1, 3), (1, 2)),
    ((1, 2, 3), (1, 2, 3), (1, 2), (2, 2)),
    ((1, 2, 3, 1), (1, 2, 3), (1, 2), (1, 2)),  # only q has the wrong rank
    ((1, 2, 3), (1, 2, 3, 1), (1, 2), (1, 2)),  # only k has the wrong rank
])
def test_bad_shapes_raise(q_shape, k_shape, ids_q_shape, ids_k_shape):
    expects = "soco_pair_loss expects q (N, M, C), k (N, M', C), ids_q (N, M), ids_k (N, M'); got "
    expects += f"{q_shape}, {k_shape}, {ids_q_shape}, {ids_k_shape}."
    with pytest.raises(ValueError, match=f"^{re.escape(expects)}$"):
        soco_pair_loss(torch.ones(q_shape), torch.ones(k_shape), torch.ones(ids_q_shape), torch.ones(ids_k_shape))


def test_proposal_id_zero_is_a_valid_id():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    # Box 0 of q pairs with box 1 of k (id 0, cosine 1); box 1 with box 0 (id 3, cosine 0.8).
    loss = soco_pair_loss(q, k, torch.tensor([[0, 3]]), torch.tensor([[3, 0]]), eps=0.0)
    torch.testing.assert_close(loss, torch.tensor(-2 * (1.0 + 0.8) / 2))


def test_eps_is_added_to_the_number_of_positives():
    q = torch.tensor([[[1.0, 0.0]]])
    ids = torch.tensor([[4]])
    torch.testing.assert_close(soco_pair_loss(q, q, ids, ids, eps=0.5), torch.tensor(-2 * 1.0 / 1.5))
