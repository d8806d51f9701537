import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from soco_d2.modeling import build_model
from soco_d2.modeling.losses import soco_pair_loss

sys.path.insert(0, os.path.dirname(__file__))
import soco_tiny  # noqa: E402
from soco_tiny import tiny_soco_cfg  # noqa: E402


_cfg = tiny_soco_cfg


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


def _count_group_norms(monkeypatch):
    """The group sizes of every per-group batch-norm call of the SoCo heads."""
    from soco_d2.modeling.meta_arch import soco

    calls = []
    per_group = soco.batch_norm_per_group

    def counted(bn, x, sizes):
        calls.append((bn, list(sizes)))
        return per_group(bn, x, sizes)

    monkeypatch.setattr(soco, "batch_norm_per_group", counted)
    return calls


@pytest.mark.parametrize("star,views", [(False, 3), (True, 4)])
def test_one_backbone_pass_per_view_and_network(star, views, monkeypatch):
    model = _model(**{"MODEL.SOCO.HEAD_MODE": "per_view"})
    online, target = _count_calls(model.backbone), _count_calls(model.target_backbone)
    pooler, head_conv = _count_calls(model.pooler), _count_calls(model.box_head[0][0])
    norms = _count_group_norms(monkeypatch)
    losses = model(_batch(star=star))
    assert len(losses) == views - 1
    assert (len(online), len(target), len(pooler)) == (views, views, 2 * views)
    # The head's convolutions run once over all views; its norms once, with statistics per view.
    assert len(head_conv) == 1
    head_norm = [sizes for bn, sizes in norms if bn is model.box_head[0][1]]
    assert len(head_norm) == 1 and len(head_norm[0]) == views
    if star:
        assert -12 <= sum(losses.values()).item() <= 12


@pytest.mark.parametrize("star,box_sets", [(False, 4), (True, 6)])
def test_faithful_mode_norms_once_per_view_box_set_and_level(star, box_sets, monkeypatch):
    """Every BN layer of the heads runs once per network, with statistics per (view, box set,
    level) group: one collective per layer on several processes, not one per group."""
    model = _model()
    assert model.head_mode == "faithful"
    online, target = _count_calls(model.backbone), _count_calls(model.target_backbone)
    head_conv = _count_calls(model.box_head[0][0])
    norms = _count_group_norms(monkeypatch)
    model(_batch(star=star))
    views = box_sets // 2 + 1
    assert (len(online), len(target)) == (views, views)
    assert len(head_conv) == 1
    rows = 2 * 2  # N images x K boxes per box set
    for layer in (model.box_head[0][1], model.predictor[1], model.target_box_head[0][1]):
        assert [sizes for bn, sizes in norms if bn is layer] == [[rows] * 4 * box_sets]
    bns = [m for m in list(model.box_head.modules()) + list(model.projector.modules())
           + list(model.predictor.modules()) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len([1 for bn, _ in norms if any(bn is b for b in bns)]) == len(bns)


def _official_level(box, flipped=False, width=0):
    """The official rule, written out: integer corners of the box before the flip,
    sqrt((w + 1)(h + 1)), <= 48 / 96 / 192."""
    x1, y1, x2, y2 = box.tolist()
    if flipped:
        x1, x2 = width - x2, width - x1
    x1, y1, x2, y2 = (int(v) for v in (x1, y1, x2, y2))
    s = math.sqrt((x2 - x1 + 1) * (y2 - y1 + 1))
    return 0 if s <= 48 else 1 if s <= 96 else 2 if s <= 192 else 3


def _official_objective(model, batch):
    """The official SoCo_FPN forward, written out: per (view, box set, level) one call of head,
    projector and predictor on all N*K boxes pooled on that level, then the aware correspondence
    matrix (N, 4K, 4K) and ``regression_loss_bboxs_aware``."""
    levels = 4

    def encode(modules, backbone, images, boxes):
        x = model.normalize(images)
        feats = list(backbone(x).values())
        n, k = boxes.shape[:2]
        outs = []
        for f in feats:
            scaled = boxes.clone()
            scaled[..., 0::2] *= f.shape[-1] / x.shape[-1]
            scaled[..., 1::2] *= f.shape[-2] / x.shape[-2]
            rois = torch.cat([torch.arange(n).repeat_interleave(k)[:, None].float(), scaled.reshape(-1, 4)], 1)
            y = roi_align(f, rois, (7, 7), 1.0, -1, aligned=True)
            for m in modules:
                y = m(y)
            outs.append(F.normalize(y, dim=1).reshape(n, k, -1))
        return torch.cat(outs, dim=1)  # (N, 4K, C), level-major

    flips = batch.get("flips", {})

    def assigned_ids(view, boxes, ids, unused):
        n, k = ids.shape
        width = batch["images"][view].shape[-1]
        flipped = flips.get(view, torch.zeros(n, dtype=torch.bool))
        out = torch.full((n, levels * k), float(unused))
        for i in range(n):
            for j in range(k):
                out[i, _official_level(boxes[i, j], bool(flipped[i]), width) * k + j] = float(ids[i, j])
        return out

    def loss(q, kk, corr):
        sim = torch.bmm(q, kk.transpose(1, 2))
        return -2 * ((sim * corr).sum((1, 2)) / (corr.sum((1, 2)) + 1e-6)).mean()

    online = [model.box_head, model.projector, model.predictor]
    target = [model.target_box_head, model.target_projector]
    pairs = batch["pairs"]
    # The official order of calls (it matters for the running statistics): V1's box sets, then
    # the other views; online first, then target.
    sides = [(i, "a") for i in range(len(pairs))] + [(i, "b") for i in range(len(pairs))]

    def inputs(i, side):
        return batch["images"][pairs[i][side][0]], pairs[i][f"boxes_{side}"]

    q = {s: encode(online, model.backbone, *inputs(*s)) for s in sides}
    with torch.no_grad():
        k = {s: encode(target, model.target_backbone, *inputs(*s)) for s in sides}
    losses = {}
    for i, p in enumerate(pairs):
        ida = assigned_ids(p["a"][0], p["boxes_a"], p["ids_a"], -1)
        idb = assigned_ids(p["b"][0], p["boxes_b"], p["ids_b"], -2)
        corr = (ida[:, :, None] == idb[:, None, :]).float()
        losses[f"loss_{p['a'][0]}_{p['b'][0]}"] = (
            loss(q[i, "a"], k[i, "b"], corr) + loss(q[i, "b"], k[i, "a"], corr.transpose(1, 2))
        )
    return losses


def _flipped_batch():
    """A batch whose flags mark flipped views and whose V2 box 0 of image 1 is a box whose level
    depends on the flag: (5.5, 0, 54, 46) flipped in a 64 px view is (10, 0, 58.5, 46) before the
    flip, s = sqrt(49 * 47) = 47.99 -> P2, while its own corners give sqrt(50 * 47) -> P3."""
    batch = _batch()
    batch["flips"] = {"v1": torch.tensor([True, False]), "v2": torch.tensor([False, True]),
                      "v3": torch.tensor([True, True])}
    batch["pairs"][0]["boxes_b"][1, 0] = torch.tensor([5.5, 0.0, 54.0, 46.0])
    return batch


@pytest.mark.parametrize("flipped", [False, True])
def test_faithful_train_mode_equals_the_official_objective(flipped):
    """Train mode (batch statistics): loss, every online gradient and the heads' running
    statistics equal the official computation (one call per view, box set and level), with the
    official level of every box (read before the flip)."""
    # Embedding width 12, unlike any row count of the batch (a per-level view built with the
    # wrong dimension would not fail by coincidence).
    model = _model(**{"MODEL.SOCO.PROJECTOR_OUT_DIM": 12})
    reference = copy.deepcopy(model)
    batch = _flipped_batch() if flipped else _batch()
    losses = model(batch)
    expected = _official_objective(reference, batch)
    assert sorted(losses) == sorted(expected)
    for key in losses:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    sum(expected.values()).backward()
    # float32 sums in another order: tolerances relative to the tensor's largest entry (and to the
    # largest gradient overall, for biases before a BN, whose exact gradient is 0).
    largest = max(p.grad.abs().max().item() for p in reference.parameters() if p.requires_grad)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            atol = 1e-5 * ref.grad.abs().max().item() + 1e-6 * largest
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=atol, msg=name)
    for module, ref in ((model.box_head, reference.box_head), (model.target_projector, reference.target_projector)):
        for (name, buf), ref_buf in zip(module.named_buffers(), ref.buffers()):
            torch.testing.assert_close(buf, ref_buf, rtol=1e-5, atol=1e-6, msg=name)
    # The per-view mode normalises differently, so its train-mode loss differs.
    per_view = _model(**{"MODEL.SOCO.HEAD_MODE": "per_view"})
    other = per_view(batch)
    assert not torch.allclose(other["loss_v1_v2"], losses["loss_v1_v2"].detach(), rtol=1e-3)
    if flipped:  # without the flags, the box above goes to P3 and the loss changes
        del batch["flips"]
        assert not torch.allclose(_model()(batch)["loss_v1_v2"], losses["loss_v1_v2"].detach(), rtol=1e-4)


@pytest.mark.slow
def test_faithful_mode_on_two_gloo_processes_matches_one_process(tmp_path):
    """Half the batch on each of two processes with the engine's synchronised BN: the same loss,
    gradients (averaged as DDP does) and head BN buffers as the whole batch in one process."""
    from soco_d2.engine.launch import launch

    launch(soco_tiny.dump_gradients, num_gpus_per_machine=2, backend="gloo", args=(str(tmp_path / "two"), {}))
    soco_tiny.dump_gradients(str(tmp_path / "one"), {})
    one = torch.load(tmp_path / "one.0", weights_only=True)
    ranks = [torch.load(tmp_path / f"two.{r}", weights_only=True) for r in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one["loss"])
    assert ranks[0]["grads"].keys() == one["grads"].keys()
    largest = max(g.abs().max().item() for g in one["grads"].values())
    for name, g in one["grads"].items():
        mean = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        atol = 1e-5 * g.abs().max().item() + 1e-6 * largest  # see the test above
        torch.testing.assert_close(mean, g, rtol=1e-4, atol=atol, msg=name)
    for name, buf in one["buffers"].items():
        torch.testing.assert_close(ranks[0]["buffers"][name], buf, rtol=1e-4, atol=1e-6, msg=name)


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

    for mode in ("all", "per_view"):
        other = _model(**{"MODEL.SOCO.HEAD_MODE": mode})
        other.load_state_dict(model.state_dict())
        other.eval()
        head = _count_calls(other.box_head[0][0])
        for k, v in other(batch).items():
            torch.testing.assert_close(v, losses[k])
        assert len(head) == 1


def test_train_mode_head_norms_each_view_separately():
    """per_view mode: losses and BN running statistics equal separate per-view head calls."""
    model = _model(**{"MODEL.SOCO.HEAD_MODE": "per_view", "MODEL.SOCO.LEVEL_ASSIGNMENT": "torchvision"})
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
    with pytest.raises(ValueError, match="HEAD_MODE"):
        _model(**{"MODEL.SOCO.HEAD_MODE": "per_level"})
    assert isinstance(model.box_head, nn.Module)


def test_normalize_subtracts_the_pixel_mean_and_divides_by_the_std():
    model = _model()
    images = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = _cfg()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(images), (images.float() - mean) / std)


@pytest.mark.parametrize("views", [["v2"], ["v2", "v3"]])
def test_train_mode_all_views_norm_differs_from_per_view(views):
    """Train mode: "all" normalises the heads over the boxes of every view at once, "per_view"
    per view (two or three views), so their losses differ."""
    batch = _batch()
    batch["pairs"] = [p for p in batch["pairs"] if p["b"][0] in views]
    per_view = _model(**{"MODEL.SOCO.HEAD_MODE": "per_view"})
    joint = _model(**{"MODEL.SOCO.HEAD_MODE": "all"})
    joint.load_state_dict(per_view.state_dict())
    a, b = per_view(batch), joint(batch)
    assert sorted(a) == sorted(b) == [f"loss_v1_{v}" for v in views]
    assert all(not torch.allclose(a[k], b[k]) for k in a)


def test_more_boxes_per_image_than_images():
    # K = 3 boxes per set, N = 2 images: eval-mode losses agree between the head modes.
    batch = _batch()
    for p in batch["pairs"]:
        for side in "ab":
            p[f"boxes_{side}"] = torch.cat([p[f"boxes_{side}"], p[f"boxes_{side}"][:, :1]], dim=1)
            p[f"ids_{side}"] = torch.cat([p[f"ids_{side}"], p[f"ids_{side}"][:, :1]], dim=1)
    faithful = _model()
    per_view = _model(**{"MODEL.SOCO.HEAD_MODE": "per_view"})
    per_view.load_state_dict(faithful.state_dict())
    faithful.eval()
    per_view.eval()
    a, b = faithful(batch), per_view(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
