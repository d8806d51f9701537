import pytest
import torch
from torch import nn

from soco_d2.config import get_cfg
from soco_d2.modeling import build_model
from soco_d2.modeling.losses import soco_pair_loss


def _cfg(**overrides):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "SoCo",
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.FPN.OUT_CHANNELS", 16,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", 2,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", 16,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 32,
        "MODEL.SOCO.PROJECTOR_OUT_DIM", 16,
        "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 32,
    ] + [x for kv in overrides.items() for x in kv])
    return cfg


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(_cfg(**overrides))


def _pair(a, b, size_a, size_b, n=2, collated=True):
    g = torch.Generator().manual_seed(len(a + b) + size_a + size_b)

    def boxes(size):
        xy = torch.rand(n, 2, 2, generator=g) * size * 0.4
        wh = torch.rand(n, 2, 2, generator=g) * size * 0.5 + size * 0.1
        bx = torch.cat([xy, xy + wh], dim=-1)
        bx[0, 1] = torch.tensor([1.0, 2.0, size - 1.0, size - 2.0])  # a large box (P3 at 64 px)
        return bx

    return {
        "a": [a] * n if collated else a,
        "b": [b] * n if collated else b,
        "boxes_a": boxes(size_a),
        "boxes_b": boxes(size_b),
        # image 0: two distinct boxes; image 1: a padding duplicate and an unmatched box.
        "ids_a": torch.tensor([[1, 2], [3, 4]]),
        "ids_b": torch.tensor([[2, 1], [3, 3]]),
    }


def _batch(star=False, n=2, collated=True):
    sizes = {"v1": 64, "v2": 64, "v3": 32, "v4": 48}
    views = ["v1", "v2", "v3"] + (["v4"] if star else [])
    g = torch.Generator().manual_seed(1)
    images = {
        v: torch.randint(0, 256, (n, 3, sizes[v], sizes[v]), generator=g, dtype=torch.uint8) for v in views
    }
    pairs = [_pair("v1", v, 64, sizes[v], n, collated) for v in views[1:]]
    return {"images": images, "pairs": pairs}


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_forward_backward_gradients_only_on_online_network():
    model = _model()
    model.train()
    assert all(not p.requires_grad for m in model.target_modules for p in m.parameters())
    losses = model(_batch())
    assert sorted(losses) == ["loss_v1_v2", "loss_v1_v3"]
    total = sum(losses.values())
    assert all(torch.isfinite(v) and -4 <= v.item() <= 4 for v in losses.values())
    assert -8 <= total.item() <= 8
    total.backward()
    # Every online parameter gets a gradient, even the FPN output convs of levels without boxes
    # (64/32 px views have no box for P4/P5): required by SyncBN and DDP.
    online = [p for m in model.online_modules + [model.predictor] for p in m.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in online)
    assert all(p.grad is None for m in model.target_modules for p in m.parameters())
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    assert any(k.startswith("target_backbone.body.") for k in model.state_dict())


def test_optimizer_step_leaves_target_and_momentum_update_is_exact():
    model = _model()
    target_before = [p.clone() for m in model.target_modules for p in m.parameters()]
    sum(model(_batch()).values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    target_now = [p for m in model.target_modules for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target_before, target_now))
    online = [p.detach().clone() for m in model.online_modules for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online, target_now))
    running_mean = model.target_backbone.body.bn1.running_mean.clone()
    model.momentum_update(0.9)
    for t0, t1, o in zip(target_before, target_now, online):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o)
    assert torch.equal(model.target_backbone.body.bn1.running_mean, running_mean)


def test_target_uses_its_own_batch_statistics():
    model = _model()
    before = model.target_backbone.body.bn1.running_mean.clone()
    model(_batch())
    assert not torch.equal(model.target_backbone.body.bn1.running_mean, before)
    assert model.target_backbone.training


@pytest.mark.parametrize("star,views", [(False, 3), (True, 4)])
def test_one_backbone_pass_per_view_and_network(star, views):
    model = _model()
    online, target = _count_calls(model.backbone), _count_calls(model.target_backbone)
    pooler, head_conv = _count_calls(model.pooler), _count_calls(model.box_head[0][0])
    head_norm = _count_calls(model.box_head[0][1])
    losses = model(_batch(star=star))
    assert len(losses) == views - 1
    assert (len(online), len(target), len(pooler)) == (views, views, 2 * views)
    # The head's convolutions run once over all views; its norms once per view.
    assert (len(head_conv), len(head_norm)) == (1, views)
    if star:
        assert -12 <= sum(losses.values()).item() <= 12


def test_eval_mode_matches_per_pair_reference_and_all_view_batching():
    """With running BN statistics (eval), the batched computation equals a direct per-pair one."""
    model = _model()
    model.eval()
    batch = _batch()
    losses = model(batch)

    def encode(modules, backbone, images, boxes):
        x = model.normalize(images)
        pooled = model.pooler(backbone(x).values(), boxes, tuple(x.shape[-2:]))
        for m in modules:
            pooled = m(pooled)
        return pooled.view(boxes.shape[0], boxes.shape[1], -1)

    online = [model.box_head, model.projector, model.predictor]
    target = [model.target_box_head, model.target_projector]
    for p in batch["pairs"]:
        ia, ib = batch["images"][p["a"][0]], batch["images"][p["b"][0]]
        qa = encode(online, model.backbone, ia, p["boxes_a"])
        qb = encode(online, model.backbone, ib, p["boxes_b"])
        ka = encode(target, model.target_backbone, ia, p["boxes_a"])
        kb = encode(target, model.target_backbone, ib, p["boxes_b"])
        expected = soco_pair_loss(qa, kb, p["ids_a"], p["ids_b"])
        expected = expected + soco_pair_loss(qb, ka, p["ids_b"], p["ids_a"])
        torch.testing.assert_close(losses[f"loss_{p['a'][0]}_{p['b'][0]}"], expected)

    all_model = _model(**{"MODEL.SOCO.HEAD_BATCHING": "all"})
    all_model.load_state_dict(model.state_dict())
    all_model.eval()
    head = _count_calls(all_model.box_head)
    for k, v in all_model(batch).items():
        torch.testing.assert_close(v, losses[k])
    assert len(head) == 1


def test_train_mode_head_norms_each_view_separately():
    """per_view batching: losses and BN running statistics equal separate per-view head calls."""
    import copy

    model = _model()
    reference = copy.deepcopy(model)
    batch = _batch()
    losses = model(batch)

    r = reference
    boxes = {"v1": torch.cat([p["boxes_a"] for p in batch["pairs"]], dim=1)}
    boxes.update({p["b"][0]: p["boxes_b"] for p in batch["pairs"]})

    def encode(modules, backbone, view):
        x = r.normalize(batch["images"][view])
        pooled = r.pooler(list(backbone(x).values()), boxes[view], tuple(x.shape[-2:]))
        for m in modules:  # one call per view: BN statistics of this view only
            pooled = m(pooled)
        return pooled.view(x.shape[0], boxes[view].shape[1], -1)

    q = {v: encode([r.box_head, r.projector, r.predictor], r.backbone, v) for v in boxes}
    with torch.no_grad():
        k = {v: encode([r.target_box_head, r.target_projector], r.target_backbone, v) for v in boxes}
    for i, p in enumerate(batch["pairs"]):
        b = p["b"][0]
        kk = 2  # boxes per set
        qa, ka = q["v1"][:, i * kk:(i + 1) * kk], k["v1"][:, i * kk:(i + 1) * kk]
        expected = soco_pair_loss(qa, k[b], p["ids_a"], p["ids_b"])
        expected = expected + soco_pair_loss(q[b], ka, p["ids_b"], p["ids_a"])
        torch.testing.assert_close(losses[f"loss_v1_{b}"], expected, rtol=1e-4, atol=1e-5)
    for (name, buf), ref in zip(model.box_head.named_buffers(), reference.box_head.buffers()):
        torch.testing.assert_close(buf, ref, rtol=1e-4, atol=1e-5, msg=name)
    for buf, ref in zip(model.predictor.buffers(), reference.predictor.buffers()):
        torch.testing.assert_close(buf, ref, rtol=1e-4, atol=1e-5)


def test_plain_view_names_channels_last_and_autocast():
    model = _model(CHANNELS_LAST=True)
    model.eval()
    ref = _model()
    ref.eval()
    batch = _batch(collated=False)
    ours, theirs = model(batch), ref(batch)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_bad_input_and_config_raise():
    model = _model()
    batch = _batch()
    batch["pairs"][0]["a"] = ["v1", "v2"]
    with pytest.raises(ValueError, match="one view"):
        model(batch)
    batch = _batch()
    del batch["images"]["v3"]
    with pytest.raises(KeyError, match="v3"):
        model(batch)
    batch = _batch()
    batch["pairs"][1]["ids_b"] = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ids_b"):
        model(batch)
    with pytest.raises(ValueError, match="HEAD_BATCHING"):
        _model(**{"MODEL.SOCO.HEAD_BATCHING": "per_level"})
    assert isinstance(model.box_head, nn.Module)
