import pytest
import torch
from torch import nn

from soco_d2.config import get_cfg
from soco_d2.engine.optimizer import LARS, build_optimizer


def test_lars_two_steps_hand_computed():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    z = nn.Parameter(torch.zeros(2, 2))  # ||z|| = 0 -> trust ratio 1
    opt = LARS([{"params": [w, z]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1, eps=0.0)
    for p, g in ((w, [[0.6, 0.8]]), (b, [0.5, 0.5]), (z, [[1.0, 1.0], [1.0, 1.0]])):
        p.grad = torch.tensor(g)
    opt.step()
    # w: g + wd*w = [0.9, 1.2] (norm 1.5); ratio 0.1*5/1.5 = 1/3 -> [0.3, 0.4]; w - 2*[0.3, 0.4]
    torch.testing.assert_close(w.data, torch.tensor([[2.4, 3.2]]))
    # excluded bias: plain SGD step with the same lr, no decay
    torch.testing.assert_close(b.data, torch.tensor([0.0, -3.0]))
    torch.testing.assert_close(z.data, torch.full((2, 2), -2.0))
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5, 0.5])
    z.grad = None
    opt.step()
    # w = [2.4, 3.2] (norm 4): g' = [0.84, 1.12] (norm 1.4); ratio 0.4/1.4 -> [0.24, 0.32]
    # buf = 0.9*[0.3, 0.4] + [0.24, 0.32] = [0.51, 0.68]; w - 2*buf
    torch.testing.assert_close(w.data, torch.tensor([[1.38, 1.84]]))
    # bias buf = 0.9*0.5 + 0.5 = 0.95
    torch.testing.assert_close(b.data, torch.tensor([-1.9, -4.9]))
    torch.testing.assert_close(z.data, torch.full((2, 2), -2.0))  # no grad: untouched


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1, bias=True), nn.BatchNorm2d(3))


def _cfg(opt="LARS"):
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = opt
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.IMS_PER_BATCH = 512
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 256
    cfg.SOLVER.WEIGHT_DECAY = 0.5
    cfg.SOLVER.LARS_TRUST_COEF = 0.001
    cfg.SOLVER.MOMENTUM = 0.9
    return cfg


def test_build_lars_excludes_bias_and_norm():
    model = _model()
    model[0].bias.requires_grad_(True)
    model[1].bias.requires_grad_(False)  # frozen: not optimised at all
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, LARS)
    regular, excluded = opt.param_groups
    assert [p is model[0].weight for p in regular["params"]] == [True]
    assert regular["weight_decay"] == 0.5 and not regular["lars_exclude"]
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight)}
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    assert regular["lr"] == excluded["lr"] == 2.0  # 1.0 * 512 / 256

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    opt.step()
    # bias and BN weight: p - lr * g, no decay, no trust ratio
    for name in ("0.bias", "1.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[name].data, before[name] - 0.2)
    torch.testing.assert_close(model[1].bias.data, before["1.bias"])
    # conv weight: decay and trust ratio
    w0 = before["0.weight"]
    g = 0.1 + 0.5 * w0
    ratio = 0.001 * w0.norm() / (g.norm() + 1e-8)
    torch.testing.assert_close(model[0].weight.data, w0 - 2.0 * ratio * g)


def test_build_sgd_and_bad_name():
    model = _model()
    opt = build_optimizer(_cfg("SGD"), model)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg("Adam"), model)
