import copy
import math

import pytest
import torch
from torch import nn

from soco_d2.modeling.ema import cosine_momentum, momentum_update


def _pair():
    online = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    target = copy.deepcopy(online)
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        online[0].bias.fill_(10.0)
        target[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        target[0].bias.fill_(0.0)
        online[1].running_mean.fill_(5.0)
        target[1].running_mean.fill_(-1.0)
    return online, target


def test_momentum_update_hand_computed_and_buffers_untouched():
    online, target = _pair()
    momentum_update([online], [target], 0.9)
    # 0.9 * 3 + 0.1 * 1 = 2.8; 0.9 * -2 + 0.1 * 2 = -1.6; 0.9 * 0 + 0.1 * 10 = 1.
    torch.testing.assert_close(target[0].weight, torch.tensor([[2.8, -1.6]]))
    torch.testing.assert_close(target[0].bias, torch.tensor([1.0]))
    assert target[1].running_mean.item() == -1.0  # target keeps its own BN statistics
    assert online[0].weight.tolist() == [[1.0, 2.0]]
    momentum_update(online, target, 1.0)
    torch.testing.assert_close(target[0].bias, torch.tensor([1.0]))
    momentum_update(online, target, 0.0)
    assert target[0].weight.tolist() == [[1.0, 2.0]]


def test_momentum_update_rejects_mismatch():
    with pytest.raises(ValueError, match="differ"):
        momentum_update(nn.Linear(2, 1), nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="Momentum"):
        momentum_update(nn.Linear(2, 1), nn.Linear(2, 1), 1.5)


def test_cosine_momentum_hand_computed():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    # it = 25: 1 - 0.01 * (cos(pi / 4) + 1) / 2
    assert cosine_momentum(0.99, 25, 100) == pytest.approx(1 - 0.01 * (math.sqrt(0.5) + 1) / 2)
    # One-iteration run: base at the start, 1 at the end.
    assert cosine_momentum(0.99, 0, 1) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_iter must be positive, got 0"):
        cosine_momentum(0.99, 0, 0)
