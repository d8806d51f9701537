import pytest
import torch
from torch import nn

from soco_d2.config import get_cfg
from soco_d2.engine.optimizer import LARS, build_optimizer, get_param_groups


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


def test_lars_defaults():
    w = nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=0.5)
    assert opt.defaults == dict(lr=0.5, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                                eps=1e-8, nesterov=False, lars_exclude=False)
    # Boundary values that are valid: no learning rate, momentum, decay or eps at all.
    LARS([w], lr=0.0, momentum=0.0, weight_decay=0.0, eps=0.0)


@pytest.mark.parametrize("key, value", [
    ("lr", -0.1), ("momentum", -0.1), ("weight_decay", -0.1), ("trust_coefficient", 0.0),
    ("trust_coefficient", -0.1), ("eps", -1e-9),
])
def test_lars_rejects_bad_settings_naming_them(key, value):
    settings = dict(lr=1.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001, eps=1e-8)
    settings[key] = value
    with pytest.raises(ValueError, match=f"Invalid LARS settings: .*{key}={value}"):
        LARS([nn.Parameter(torch.ones(2, 2))], **settings)


def test_lars_nesterov_two_steps_hand_computed():
    # Excluded group (no decay, no trust ratio) so the momentum arithmetic is plain.
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([{"params": [b], "lars_exclude": True}], lr=0.5, momentum=0.9, nesterov=True)
    b.grad = torch.tensor([1.0, 2.0])
    opt.step()
    # buf = g = [1, 2]; update g + 0.9 * buf = [1.9, 3.8]; b - 0.5 * update
    torch.testing.assert_close(b.data, torch.tensor([0.05, -3.9]))
    b.grad = torch.tensor([1.0, 0.0])
    opt.step()
    # buf = 0.9 * [1, 2] + [1, 0] = [1.9, 1.8]; update [1, 0] + 0.9 * buf = [2.71, 1.62]
    torch.testing.assert_close(b.data, torch.tensor([0.05 - 1.355, -3.9 - 0.81]))


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_lars_momentum_extremes(momentum):
    # momentum 0: plain SGD; momentum 1: the buffer sums every gradient.
    b = nn.Parameter(torch.tensor([0.0]))
    opt = LARS([{"params": [b], "lars_exclude": True}], lr=1.0, momentum=momentum)
    for g in (1.0, 2.0):
        b.grad = torch.tensor([g])
        opt.step()
    expected = -(1.0 + 2.0) if momentum == 0 else -(1.0 + (1.0 + 2.0))
    torch.testing.assert_close(b.data, torch.tensor([expected]))


def test_param_groups_split_by_dimension():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2), nn.Conv2d(2, 2, 1))
    weights = [model[0].weight, model[2].weight]  # 2-D and 4-D
    excluded = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    groups = get_param_groups(model, 0.3, exclude_bias_and_norm=True)
    assert groups == [
        {"params": weights, "weight_decay": 0.3, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    assert get_param_groups(model, 0.3, exclude_bias_and_norm=False) == [
        {"params": list(model.parameters()), "weight_decay": 0.3, "lars_exclude": False},
    ]
    # Only 1-D parameters: no empty decayed group.
    norm = nn.LayerNorm(2)
    assert get_param_groups(norm, 0.3, True) == [
        {"params": list(norm.parameters()), "weight_decay": 0.0, "lars_exclude": True},
    ]


def test_build_lars_without_exclusion_decays_and_scales_biases():
    model = _model()
    cfg = _cfg()
    cfg.SOLVER.EXCLUDE_BIAS_AND_NORM = False
    opt = build_optimizer(cfg, model)
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.5 and group["lars_exclude"] is False
    b0 = model[0].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    opt.step()
    g = 0.1 + 0.5 * b0
    torch.testing.assert_close(model[0].bias.data, b0 - 2.0 * 0.001 * b0.norm() / (g.norm() + 1e-8) * g)


@pytest.mark.parametrize("name", ["LARS", "SGD"])
def test_build_optimizer_passes_every_solver_setting(name):
    cfg = _cfg(name)
    cfg.SOLVER.MOMENTUM = 0.8
    cfg.SOLVER.NESTEROV = True
    cfg.SOLVER.LARS_TRUST_COEF = 0.02
    cfg.SOLVER.LARS_EPS = 1e-5
    opt = build_optimizer(cfg, _model())
    expected = dict(lr=2.0, momentum=0.8, weight_decay=0.5, nesterov=True)
    if name == "LARS":
        expected.update(trust_coefficient=0.02, eps=1e-5)
    for group in opt.param_groups:
        assert {k: group[k] for k in expected if k != "weight_decay"} == \
            {k: v for k, v in expected.items() if k != "weight_decay"}
    # A group added later (e.g. a newly unfrozen layer) gets the configured settings, decay included.
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))]})
    assert {k: opt.param_groups[-1][k] for k in expected} == expected


def test_build_optimizer_without_trainable_parameters():
    model = _model().requires_grad_(False)
    message = r"^The model has no parameter with requires_grad=True: nothing to train\.$"
    with pytest.raises(ValueError, match=message):
        build_optimizer(_cfg(), model)
