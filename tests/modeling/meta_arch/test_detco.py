import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from soco_d2.config import get_cfg
from soco_d2.modeling import META_ARCH_REGISTRY
from soco_d2.modeling.contrastive import info_nce
from soco_d2.modeling.meta_arch.detco import DetCo, SplitBatchNorm2d, batch_shuffle, frozen_running_stats

LEVELS = ("res2", "res3", "res4", "res5")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")


def _cfg(**detco):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DetCo"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = False
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.MODEL.DETCO.QUEUE_SIZE = 8
    cfg.MODEL.DETCO.HEAD_HIDDEN_DIM = 32
    cfg.MODEL.DETCO.FEATURE_DIM = 16
    cfg.INPUT.DETCO.GLOBAL_SIZE = 32
    cfg.INPUT.DETCO.PATCH_SIZE = 16
    cfg.MODEL.DETCO.SHUFFLE_BN_SPLITS = 2  # one process: 2 BN sub-batches of 2 images
    for k, v in detco.items():
        setattr(cfg.MODEL.DETCO, k, v)
    return cfg


def _batch(n=4, seed=0, grid=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "global": torch.randint(0, 256, (n, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
        "local": torch.randint(0, 256, (n, 2, grid * grid, 3, 16, 16), dtype=torch.uint8,
                               generator=g),
        "local_perm": torch.stack([torch.randperm(grid * grid, generator=g)
                                   for _ in range(2 * n)]).view(n, 2, grid * grid),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DetCo(_cfg())


def test_registered():
    assert META_ARCH_REGISTRY.get("DetCo") is DetCo


def test_tiny_forward_backward_is_finite(model):
    m = copy.deepcopy(model).train()
    out = m(_batch())
    losses = {k: v for k, v in out.items() if k.startswith("loss")}
    assert set(losses) == {"loss_global_global", "loss_local_local", "loss_local_global"}
    assert {f"{kind}_{lvl}" for kind in ("global_global", "local_local", "local_global")
            for lvl in LEVELS} == set(out) - set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in m.encoder_q.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in m.encoder_k.parameters())
    assert all(int(q.ptr) == 4 for q in list(m.queues_global.values()) + list(m.queues_local.values()))


def test_losses_are_the_weighted_three_terms_per_level():
    torch.manual_seed(1)
    m = DetCo(_cfg(LOSS_WEIGHTS=(1.0, 2.0, 3.0))).train()
    for q in list(m.queues_global.values()) + list(m.queues_local.values()):
        q.queue.copy_(torch.nn.functional.normalize(torch.randn_like(q.queue), dim=1))
    before = copy.deepcopy(m)
    batch = _batch(seed=3)
    torch.manual_seed(7)  # the key shuffle of one-process shuffle-BN
    out = m(batch)

    # Recompute every term from the encoders' outputs and the queues as they were.
    glob, local = before.normalize(batch["global"]), before.normalize(batch["local"])
    perm = batch["local_perm"]
    with torch.no_grad():
        q_g, q_l = before.encoder_q(glob[:, 0], local[:, 0], perm[:, 0])
        torch.manual_seed(7)
        k_g, k_l = before._keys(batch["global"][:, 1], batch["local"][:, 1], perm[:, 1])
    w = dict(zip(LEVELS, (0.1, 0.4, 0.7, 1.0)))
    totals = {"global_global": 0.0, "local_local": 0.0, "local_global": 0.0}
    for lvl in LEVELS:
        qg, ql = before.queues_global[lvl].queue, before.queues_local[lvl].queue
        expected = {
            "global_global": 1.0 * info_nce(q_g[lvl], k_g[lvl], qg, 0.2),
            "local_local": 2.0 * info_nce(q_l[lvl], k_l[lvl], ql, 0.2),
            "local_global": 3.0 * info_nce(q_l[lvl], k_g[lvl], qg, 0.2),
        }
        for kind, value in expected.items():
            torch.testing.assert_close(out[f"{kind}_{lvl}"], value, rtol=1e-5, atol=1e-6)
            totals[kind] += w[lvl] * value
        # The keys of this batch were enqueued, global keys in the global queue.
        torch.testing.assert_close(m.queues_global[lvl].queue[:4], k_g[lvl])
        torch.testing.assert_close(m.queues_local[lvl].queue[:4], k_l[lvl])
        torch.testing.assert_close(m.queues_global[lvl].queue[4:], qg[4:])
    for kind, value in totals.items():
        torch.testing.assert_close(out[f"loss_{kind}"], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", [None, "concat_shuffled", "concat_grid", "mean"])
def test_local_feature_and_the_patch_order(combine):
    # The same physical patches in another order (``local_perm`` permuted with them): the
    # paper's shuffled-order concatenation (the default) sees the order, the others do not.
    torch.manual_seed(0)
    m = DetCo(_cfg() if combine is None else _cfg(LOCAL_COMBINE=combine)).eval()
    b = _batch(n=2, seed=5)
    glob, patches = m.normalize(b["global"])[:, 0], m.normalize(b["local"])[:, 0]
    perm = b["local_perm"][:, 0]
    shuffle = torch.tensor([3, 7, 0, 8, 1, 5, 2, 6, 4])
    with torch.no_grad():
        g_a, a = m.encoder_q(glob, patches, perm)
        g_c, c = m.encoder_q(glob, patches[:, shuffle], perm[:, shuffle])
    for lvl in LEVELS:
        torch.testing.assert_close(g_a[lvl], g_c[lvl])
        if combine in (None, "concat_shuffled"):
            assert (a[lvl] - c[lvl]).abs().max() > 1e-3, lvl
        else:
            torch.testing.assert_close(a[lvl], c[lvl], rtol=1e-5, atol=1e-6)


def test_default_local_combine_is_the_papers_shuffled_concatenation():
    from soco_d2.config import load_config

    assert get_cfg().MODEL.DETCO.LOCAL_COMBINE == "concat_shuffled"
    for name in ("detco_r50_200ep", "detco_r50_200ep_aa", "detco_r50_800ep"):
        cfg = load_config(os.path.join(ROOT, "configs", "detco", f"{name}.yaml"))
        assert cfg.MODEL.DETCO.LOCAL_COMBINE == "concat_shuffled", name


def test_mean_combine_builds_smaller_local_heads():
    m = DetCo(_cfg(LOCAL_COMBINE="mean"))
    assert m.encoder_q.local_heads["res5"][0].in_features == 512
    assert DetCo(_cfg()).encoder_q.local_heads["res5"][0].in_features == 9 * 512
    out = m(_batch())
    assert torch.isfinite(out["loss_local_local"])


def test_momentum_update(model):
    m = copy.deepcopy(model)
    for pq, pk in zip(m.encoder_q.parameters(), m.encoder_k.parameters()):
        assert torch.equal(pq, pk)  # the key encoder starts as a copy
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    old_k = [p.clone() for p in m.encoder_k.parameters()]
    m.momentum_update(0.9)
    for pq, pk, k0 in zip(m.encoder_q.parameters(), m.encoder_k.parameters(), old_k):
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * pq)


def test_backbone_keys_are_torchvision_resnet_names(model):
    sd = model.state_dict()
    body = {k[len("encoder_q.body."):]: v for k, v in sd.items() if k.startswith("encoder_q.body.")}
    assert any(k.startswith("encoder_k.body.layer4.") for k in sd)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(body, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]


def test_resume_restores_queues_exactly(model):
    m = copy.deepcopy(model).train()
    m(_batch(seed=1))
    m(_batch(seed=2))
    m(_batch(seed=3))
    restored = DetCo(_cfg())
    restored.load_state_dict(m.state_dict())
    for name in ("queues_global", "queues_local"):
        for lvl in LEVELS:
            a, b = getattr(m, name)[lvl], getattr(restored, name)[lvl]
            assert torch.equal(a.queue, b.queue) and int(a.ptr) == int(b.ptr) == 4


def test_checkpoint_with_another_queue_size_is_a_clear_error(model):
    cfg = _cfg(QUEUE_SIZE=16)
    with pytest.raises(ValueError, match=r"MODEL.DETCO.QUEUE_SIZE = 8"):
        DetCo(cfg).load_state_dict(model.state_dict())


def test_config_errors():
    with pytest.raises(ValueError, match=r"MODEL.DETCO.QUEUE_SIZE \(10\).*SOLVER.IMS_PER_BATCH"):
        DetCo(_cfg(QUEUE_SIZE=10))
    with pytest.raises(ValueError, match="LEVEL_WEIGHTS"):
        DetCo(_cfg(LEVEL_WEIGHTS=(1.0, 1.0)))
    valid = r"\('concat_shuffled', 'concat_grid', 'mean'\)"
    with pytest.raises(ValueError, match=r"MODEL.DETCO.LOCAL_COMBINE must be one of " + valid):
        DetCo(_cfg(LOCAL_COMBINE="max"))
    with pytest.raises(ValueError, match=r"'concat' is now 'concat_grid'"):
        DetCo(_cfg(LOCAL_COMBINE="concat"))
    with pytest.raises(ValueError, match=r"KEY_BN must be one of \('shuffle', 'sync'\)"):
        DetCo(_cfg(KEY_BN="frozen"))
    with pytest.raises(ValueError, match="MODEL.DETCO.SHUFFLE_BN_SPLITS must be >= 1"):
        DetCo(_cfg(SHUFFLE_BN_SPLITS=0))


def test_subset_of_levels_drops_the_later_stages():
    m = DetCo(_cfg(LEVELS=("res2", "res3"), LEVEL_WEIGHTS=(0.5, 1.0)))
    keys = m.state_dict()
    assert any(k.startswith("encoder_q.body.layer2.") for k in keys)
    assert not any(k.startswith(("encoder_q.body.layer3.", "encoder_q.body.layer4.")) for k in keys)
    out = m(_batch())
    assert {k.rsplit("_", 1)[1] for k in out if not k.startswith("loss")} == {"res2", "res3"}


def _shuffle_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # only rank 0's permutation may count
        x = torch.arange(4.0)[:, None] + 4 * rank  # samples 0..3 on rank 0, 4..7 on rank 1
        y = x * 10
        (xs, ys), restore = batch_shuffle((x, y))
        back = restore({"x": xs * 2})
        torch.save({"xs": xs, "ys": ys, "back": back["x"]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_batch_shuffle_across_two_processes(tmp_path):
    mp.start_processes(_shuffle_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    shuffled = torch.cat([g["xs"] for g in got]).flatten()
    assert sorted(shuffled.tolist()) == list(range(8))  # every sample once, over both ranks
    for g in got:
        torch.testing.assert_close(g["ys"], g["xs"] * 10)  # tensors shuffled together
    assert set(got[0]["xs"].flatten().tolist()) != {0.0, 1.0, 2.0, 3.0}  # samples moved rank
    for r, g in enumerate(got):  # outputs come back to their own samples
        torch.testing.assert_close(g["back"].flatten(), (torch.arange(4.0) + 4 * r) * 2)


@pytest.mark.parametrize("name", ["detco_r50_200ep", "detco_r50_800ep", "detco_r50_200ep_aa"])
def test_shipped_configs_train_a_step_on_mapped_samples(name):
    import numpy as np
    from torch.utils.data._utils.collate import default_collate

    from soco_d2.config import load_config
    from soco_d2.data import build_mapper
    from soco_d2.modeling import build_model

    cfg = load_config(
        os.path.join(ROOT, "configs", "detco", f"{name}.yaml"),
        ["MODEL.RESNETS.DEPTH", "18", "SOLVER.IMS_PER_BATCH", "4", "MODEL.DETCO.QUEUE_SIZE", "8",
         "MODEL.DETCO.SHUFFLE_BN_SPLITS", "2",
         "MODEL.DETCO.HEAD_HIDDEN_DIM", "16", "INPUT.DETCO.GLOBAL_SIZE", "32",
         "INPUT.DETCO.LOCAL_CROP_SIZE", "96", "INPUT.DETCO.PATCH_SIZE", "24"],
    )
    assert cfg.MODEL.META_ARCHITECTURE == "DetCo" and cfg.SOLVER.OPTIMIZER == "SGD"
    mapper, model = build_mapper(cfg), build_model(cfg).train()
    assert model.encoder_k.body.layer1[0].bn1.num_splits == 2  # one-process shuffle-BN
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(8)]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9)
    for step in range(2):
        batch = default_collate([mapper(img, None, rng) for img in images[4 * step: 4 * step + 4]])
        out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update(cfg.MODEL.EMA.BASE_MOMENTUM)
    assert int(model.queues_local["res5"].ptr) == 0  # 2 steps x 4 keys wrapped a queue of 8


def _model_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        m = DetCo(_cfg(KEY_BN="shuffle")).train()
        m.encoder_k.eval()  # per-sample key features, so shuffling must not change them
        batch = _batch(n=2, seed=10 + rank)
        glob, local = m.normalize(batch["global"]), m.normalize(batch["local"])
        key_pixels = (batch["global"][:, 1], batch["local"][:, 1])  # uint8: _keys normalises
        perm = batch["local_perm"]
        with torch.no_grad():
            direct = m.encoder_k(glob[:, 1], local[:, 1], perm[:, 1])
            shuffled = m._keys(*key_pixels, perm[:, 1])
        m(batch)
        m.encoder_k.train()  # with batch statistics, the shuffle changes the keys
        with torch.no_grad():
            train_direct = m.encoder_k(glob[:, 1], local[:, 1], perm[:, 1])[0]["res2"]
            train_shuffled = m._keys(*key_pixels, perm[:, 1])[0]["res2"]
        split = any(isinstance(mod, SplitBatchNorm2d) for mod in m.modules())
        torch.save({"direct": direct, "shuffled": shuffled, "split_bn": split,
                    "train_changed": not torch.allclose(train_direct, train_shuffled),
                    "queue": m.queues_local["res3"].queue.clone()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_shuffle_bn_and_shared_queues(tmp_path):
    mp.start_processes(_model_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for g in got:
        for direct, shuffled in zip(g["direct"], g["shuffled"]):
            for lvl in LEVELS:
                torch.testing.assert_close(shuffled[lvl], direct[lvl], rtol=1e-5, atol=1e-6)
    assert got[0]["train_changed"] and got[1]["train_changed"]
    assert not got[0]["split_bn"]  # several processes: plain per-process BN, shuffled across them
    assert torch.equal(got[0]["queue"], got[1]["queue"])
    keys = torch.cat([got[0]["direct"][1]["res3"], got[1]["direct"][1]["res3"]])
    torch.testing.assert_close(got[0]["queue"][:4], keys, rtol=1e-5, atol=1e-6)


def test_key_bn_decides_whether_the_engine_synchronises_batchnorm():
    assert DetCo(_cfg(KEY_BN="shuffle")).sync_batchnorm is False  # MoCo: per-process BN
    assert DetCo(_cfg(KEY_BN="sync")).sync_batchnorm is True


@pytest.mark.parametrize("affine", [True, False])
def test_split_batchnorm_keeps_channels_last_and_honours_affine(affine):
    """A channels_last input gives a channels_last output with the same values as NCHW; without
    affine parameters the output is the plain per-sub-batch normalisation."""
    torch.manual_seed(1)
    split = SplitBatchNorm2d(3, num_splits=2, affine=affine)
    if affine:
        with torch.no_grad():
            split.bias.uniform_(-1.0, 1.0)
    x = torch.randn(4, 3, 5, 4) * 2.0 + 1.0
    out = split(x)
    out_cl = split(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)
    plain = torch.nn.BatchNorm2d(3, affine=affine)
    if affine:
        plain.load_state_dict({k: v for k, v in split.state_dict().items()})
    torch.testing.assert_close(out[0::2], plain(x[0::2]), rtol=1e-5, atol=1e-5)


def test_split_batchnorm_normalises_each_sub_batch_separately():
    torch.manual_seed(0)
    split = SplitBatchNorm2d(3, num_splits=2)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2.0)
        split.bias.uniform_(-1.0, 1.0)
    plain = [torch.nn.BatchNorm2d(3) for _ in range(2)]
    for bn in plain:
        bn.load_state_dict({k: v for k, v in split.state_dict().items()})
    x = torch.randn(6, 3, 5, 4) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2.0
    x.requires_grad_(True)
    out = split(x)
    for g in range(2):  # sub-batch g holds samples g, g + 2, g + 4
        torch.testing.assert_close(out[g::2], plain[g](x[g::2]), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        expected = (getattr(plain[0], name) + getattr(plain[1], name)) / 2
        torch.testing.assert_close(getattr(split, name), expected)
    assert int(split.num_batches_tracked) == 1
    out.square().sum().backward()
    assert split.weight.grad is not None and torch.isfinite(x.grad).all()
    split.eval()  # evaluation: the running statistics, as BatchNorm2d
    plain[0].eval().load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain[0](x))
    with pytest.raises(ValueError, match="5 samples cannot be split into 2.*SHUFFLE_BN_SPLITS"):
        split.train()(torch.randn(5, 3, 2, 2))


@pytest.mark.parametrize("splits", [1, 2])
def test_running_statistics_come_from_the_global_views_only(splits):
    """A training step leaves the query encoder's BN running statistics as a pass over the
    query's global views alone would: the 9 small patches per image do not enter them."""
    torch.manual_seed(0)
    m = DetCo(_cfg(SHUFFLE_BN_SPLITS=splits)).train()
    batch = _batch(n=4, seed=5)
    ref = copy.deepcopy(m.encoder_q.body).train()
    with torch.no_grad():
        ref(m.normalize(batch["global"])[:, 0])
        m(batch)
    bns = [(n, mod) for n, mod in m.encoder_q.body.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    ref_bns = dict(ref.named_modules())
    assert len(bns) == 20  # ResNet-18: stem + 16 in the blocks + 3 downsample
    for name, bn in bns:
        assert bn.track_running_stats
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, buf), getattr(ref_bns[name], buf), msg=f"{name}.{buf}")
    assert any(not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean)) for _, bn in bns)


@pytest.mark.parametrize("make", [lambda: torch.nn.BatchNorm2d(3), lambda: SplitBatchNorm2d(3, num_splits=2)],
                         ids=["BatchNorm2d", "SplitBatchNorm2d"])
def test_frozen_running_stats_normalises_with_the_batch_and_restores_tracking(make):
    bn = make()  # a fresh module per run (a parametrized instance would carry state between runs)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3.0 + 1.0
    tracked = copy.deepcopy(bn).train()
    expected = tracked(x)
    before = copy.deepcopy(bn.state_dict())
    with frozen_running_stats(torch.nn.Sequential(bn.train())):
        assert not bn.track_running_stats
        out = bn(x)
    torch.testing.assert_close(out, expected)  # the batch's statistics, as with tracking
    assert bn.track_running_stats
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])
    bn(x)  # tracking is back on
    assert int(bn.num_batches_tracked) == 1
    with pytest.raises(RuntimeError, match="boom"):  # restored on an error too
        with frozen_running_stats(bn):
            raise RuntimeError("boom")
    assert bn.track_running_stats


def test_one_process_shuffle_bn_normalises_keys_with_shuffled_sub_batches():
    """Each key equals its image's key computed with plain BN over the images of one sub-batch
    (the un-shuffle puts every key back on its own image), and the sub-batches change with the
    shuffle: the keys are not those of the unshuffled batch."""
    torch.manual_seed(0)
    m = DetCo(_cfg(SHUFFLE_BN_SPLITS=2)).train()
    plain = DetCo(_cfg(SHUFFLE_BN_SPLITS=1)).train()
    plain.load_state_dict(m.state_dict())  # the split BN keeps BatchNorm2d's names
    assert m.bn_splits == 2 and plain.bn_splits == 1
    assert not any(isinstance(mod, SplitBatchNorm2d) for mod in plain.modules())
    batch = _batch(n=4, seed=4)
    glob, local = m.normalize(batch["global"])[:, 1], m.normalize(batch["local"])[:, 1]
    perm = batch["local_perm"][:, 1]

    def close(a, b):
        return all(torch.allclose(a[i][lvl], b[i][lvl], rtol=1e-4, atol=1e-5)
                   for i in range(2) for lvl in LEVELS)

    def per_image(keys):
        n = len(keys[0]["res2"])
        return [tuple({lvl: k[lvl][i] for lvl in LEVELS} for k in keys) for i in range(n)]

    partitions = [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    expected = {}
    with torch.no_grad():
        for part in partitions:
            keys = [None] * 4
            for group in part:
                idx = list(group)
                for j, k in zip(group, per_image(plain.encoder_k(glob[idx], local[idx], perm[idx]))):
                    keys[j] = k
            expected[part] = keys
        unshuffled = per_image(m.encoder_k(glob, local, perm))  # sub-batches {0, 2}, {1, 3}
    assert all(close(a, b) for a, b in zip(unshuffled, expected[partitions[1]]))
    assert not all(close(a, b) for a, b in zip(unshuffled, expected[partitions[0]]))

    used = []
    for seed in range(6):
        torch.manual_seed(seed)
        with torch.no_grad():
            keys = per_image(m._keys(batch["global"][:, 1], batch["local"][:, 1], perm))
        match = [p for p in partitions if all(close(a, b) for a, b in zip(keys, expected[p]))]
        assert len(match) == 1, seed
        used.append(match[0])
    assert len(set(used)) > 1 and any(p != partitions[1] for p in used)


def test_one_process_shuffle_bn_warns_where_it_cannot_apply(soco_log):
    assert DetCo(_cfg(SHUFFLE_BN_SPLITS=2)).bn_splits == 2
    assert not any("shuffle-BN" in m for m in soco_log)
    m = DetCo(_cfg(SHUFFLE_BN_SPLITS=3))  # 4 images per step
    assert m.bn_splits == 1 and not any(isinstance(x, SplitBatchNorm2d) for x in m.modules())
    (text,) = [m for m in soco_log if "shuffle-BN" in m]
    assert "SHUFFLE_BN_SPLITS = 3" in text and "no shuffle-BN" in text
    assert "same samples" in text and "one of [2]" in text
    soco_log.clear()
    DetCo(_cfg(SHUFFLE_BN_SPLITS=1))
    (text,) = [m for m in soco_log if "shuffle-BN" in m]
    assert "SHUFFLE_BN_SPLITS = 1: no shuffle-BN" in text
    soco_log.clear()
    assert DetCo(_cfg(KEY_BN="sync")).bn_splits == 1  # no shuffle asked for: no split
    assert not any("shuffle-BN" in m for m in soco_log)
    cfg = _cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.DETCO.QUEUE_SIZE = 8, 16
    cfg.SOLVER.GRAD_ACCUM_STEPS = 2  # 4 images per forward
    assert DetCo(cfg).bn_splits == 2


CONSEQUENCE = (
    "query and key encoders normalise with the statistics of the same samples, the shortcut "
    "MoCo's shuffle-BN prevents (a positive pair can be told by its shared batch statistics)"
)


@pytest.mark.parametrize("key_bn,world,per_process,splits,expected,fix", [
    ("shuffle", 1, 8, 2, 2, None),
    ("shuffle", 1, 6, 3, 3, None),          # 2 per sub-batch is enough
    ("shuffle", 2, 8, 2, 1, None),          # several processes: MoCo's cross-process shuffle
    ("sync", 1, 8, 2, 1, None),
    ("shuffle", 1, 4, 4, 1, "set MODEL.DETCO.SHUFFLE_BN_SPLITS to one of [2]"),   # 1 per sub-batch
    ("shuffle", 1, 6, 4, 1, "set MODEL.DETCO.SHUFFLE_BN_SPLITS to one of [2, 3]"),
    ("shuffle", 1, 2, 2, 1, "use at least 4 images per step"),
    ("shuffle", 1, 3, 2, 1, "use at least 4 images per step"),
])
def test_one_process_bn_splits_rule_and_exact_warning(soco_log, key_bn, world, per_process, splits, expected, fix):
    from soco_d2.modeling.meta_arch.detco import _one_process_bn_splits

    d = get_cfg().MODEL.DETCO.clone()
    d.KEY_BN, d.SHUFFLE_BN_SPLITS = key_bn, splits
    assert _one_process_bn_splits(d, world, per_process) == expected
    warnings = [m for m in soco_log if "shuffle-BN" in m]
    if fix is None:
        assert not warnings
    else:
        assert warnings == [
            f"One process: MODEL.DETCO.SHUFFLE_BN_SPLITS = {splits} needs a multiple of {splits} images per "
            f"step (at least 2 per sub-batch), got {per_process}: no shuffle-BN; {CONSEQUENCE}. To fix it, {fix}."
        ]


def test_one_process_bn_splits_of_one_and_below(soco_log):
    from soco_d2.modeling.meta_arch.detco import _one_process_bn_splits

    d = get_cfg().MODEL.DETCO.clone()
    d.KEY_BN, d.SHUFFLE_BN_SPLITS = "shuffle", 1
    assert _one_process_bn_splits(d, 1, 8) == 1
    assert soco_log == [f"One process and MODEL.DETCO.SHUFFLE_BN_SPLITS = 1: no shuffle-BN; {CONSEQUENCE}."]
    d.SHUFFLE_BN_SPLITS = 0
    with pytest.raises(ValueError) as err:
        _one_process_bn_splits(d, 1, 8)
    assert str(err.value) == (
        "MODEL.DETCO.SHUFFLE_BN_SPLITS must be >= 1, got 0 (1 turns one-process shuffle-BN off)."
    )


def test_default_and_shipped_queue_size_is_moco_v2s_65536():
    from soco_d2.config import load_config

    cfg = _cfg()
    cfg.MODEL.DETCO.QUEUE_SIZE = get_cfg().MODEL.DETCO.QUEUE_SIZE
    assert DetCo(cfg).queues_local["res2"].size == 65536
    for name in ("detco_r50_200ep", "detco_r50_200ep_aa", "detco_r50_800ep"):
        shipped = load_config(os.path.join(ROOT, "configs", "detco", f"{name}.yaml"))
        assert shipped.MODEL.DETCO.QUEUE_SIZE == 65536, name
        assert shipped.MODEL.DETCO.SHUFFLE_BN_SPLITS == 8, name  # 256 / 8 = MoCo's 32 per GPU
        assert shipped.SOLVER.IMS_PER_BATCH == 256, name


# --------------------------------------------------------------------------------------------
# Construction details: exact messages, widths, buffers, and the split BN's settings.

def _message(cfg):
    with pytest.raises(ValueError) as err:
        DetCo(cfg)
    return str(err.value)


def test_config_errors_exact_messages():
    assert _message(_cfg(LEVELS=())) == (
        "MODEL.DETCO.LEVELS must be a subset of ('res2', 'res3', 'res4', 'res5'), got ().")
    assert _message(_cfg(LEVELS=("res5", "res6"), LEVEL_WEIGHTS=(1.0, 1.0))) == (
        "MODEL.DETCO.LEVELS must be a subset of ('res2', 'res3', 'res4', 'res5'), got ('res5', 'res6').")
    assert _message(_cfg(LOSS_WEIGHTS=(1.0, 1.0))) == (
        "MODEL.DETCO.LOSS_WEIGHTS needs 3 weights (global-global, local-local, local-global), "
        "got (1.0, 1.0).")
    valid = "('concat_shuffled', 'concat_grid', 'mean')"
    assert _message(_cfg(LOCAL_COMBINE="concat")) == (
        f"MODEL.DETCO.LOCAL_COMBINE must be one of {valid}, got 'concat' ('concat' is now 'concat_grid').")
    assert _message(_cfg(LOCAL_COMBINE="max")) == (
        f"MODEL.DETCO.LOCAL_COMBINE must be one of {valid}, got 'max'.")
    for t in (0.0, -0.2):
        assert _message(_cfg(TEMPERATURE=t)) == f"MODEL.DETCO.TEMPERATURE must be positive, got {t}."
    cfg = _cfg()
    cfg.MODEL.RESNETS.NORM = "GN"
    assert _message(cfg) == (
        "MODEL.RESNETS.NORM = 'GN' is not supported by DetCo; use 'BN' (cross-process BN of the "
        "key encoder is MODEL.DETCO.KEY_BN).")


def test_batch_division_over_processes_and_accumulation(monkeypatch):
    # Two processes: 8 images are 4 per process; 6 images do not divide into 2 x 2 steps.
    monkeypatch.setattr("soco_d2.utils.comm.get_world_size", lambda: 2)
    cfg = _cfg()
    cfg.SOLVER.IMS_PER_BATCH = 8
    assert DetCo(cfg).bn_splits == 1  # several processes: MoCo's cross-process shuffle
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.GRAD_ACCUM_STEPS = 6, 2
    assert _message(cfg) == (
        "SOLVER.IMS_PER_BATCH (6) must be divisible by the world size (2) times "
        "SOLVER.GRAD_ACCUM_STEPS (2).")
    monkeypatch.setattr("soco_d2.utils.comm.get_world_size", lambda: 1)
    # Accumulation: 8 images in 2 forwards enqueue 4 keys each, so a queue of 4 is whole.
    cfg = _cfg(QUEUE_SIZE=4)
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.GRAD_ACCUM_STEPS = 8, 2
    assert DetCo(cfg).queues_global["res5"].queue.shape[0] == 4


def test_pixel_statistics_standardise_and_stay_out_of_checkpoints():
    cfg = _cfg()
    cfg.MODEL.PIXEL_MEAN = [100.0, 120.0, 140.0]
    cfg.MODEL.PIXEL_STD = [50.0, 60.0, 70.0]
    m = DetCo(cfg)
    x = torch.randint(0, 256, (2, 2, 3, 4, 5), dtype=torch.uint8)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    out = m.normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() - mean) / std)
    assert not any(k.startswith("pixel_") for k in m.state_dict())  # config values, not weights


def test_encoder_widths_follow_depth_and_hidden_dim():
    from soco_d2.modeling.meta_arch.detco import DetCoEncoder

    cfg = _cfg(HEAD_HIDDEN_DIM=0)  # 0: hidden width = the level's channels C
    enc = DetCoEncoder(cfg)
    for lvl, c in zip(LEVELS, (64, 128, 256, 512)):
        assert (enc.global_heads[lvl][0].in_features, enc.global_heads[lvl][0].out_features) == (c, c)
        assert (enc.local_heads[lvl][0].in_features, enc.local_heads[lvl][0].out_features) == (9 * c, c)
        assert enc.global_heads[lvl][2].out_features == 16
    cfg.MODEL.RESNETS.DEPTH = 50  # bottleneck blocks: 4 x the channels
    enc = DetCoEncoder(cfg)
    assert [enc.global_heads[lvl][0].in_features for lvl in LEVELS] == [256, 512, 1024, 2048]
    assert enc.local_heads["res5"][0].out_features == 2048


def test_heads_are_nonlinear_mlps():
    # fc -> ReLU -> fc: a linear map would satisfy h(x) + h(-x) = 2 h(0).
    torch.manual_seed(0)
    head = DetCo(_cfg()).encoder_q.global_heads["res5"]
    x = torch.randn(8, 512)
    with torch.no_grad():
        gap = head(x) + head(-x) - 2 * head(torch.zeros_like(x))
    assert gap.abs().max() > 1e-2
    assert [type(layer) for layer in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_follows_the_config(zero_init):
    cfg = _cfg()
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = zero_init
    body = DetCo(cfg).encoder_q.body
    last_bns = [body.layer1[0].bn2.weight, body.layer4[1].bn2.weight]
    assert all(bool((w == 0).all()) == zero_init for w in last_bns)


def test_query_patch_order_is_undone_with_the_querys_own_cells():
    # concat_grid: the query's patches and their cells permuted together leave every loss as it
    # was (the query un-shuffles with its own cell indices, not the key's).
    torch.manual_seed(0)
    m = DetCo(_cfg(LOCAL_COMBINE="concat_grid")).train()
    for q in list(m.queues_global.values()) + list(m.queues_local.values()):
        q.queue.copy_(torch.nn.functional.normalize(torch.randn_like(q.queue), dim=1))
    b = _batch(seed=6)
    shuffled = {k: v.clone() for k, v in b.items()}
    order = torch.tensor([3, 7, 0, 8, 1, 5, 2, 6, 4])
    shuffled["local"][:, 0] = b["local"][:, 0][:, order]
    shuffled["local_perm"][:, 0] = b["local_perm"][:, 0][:, order]
    outs = []
    for batch in (b, shuffled):
        torch.manual_seed(1)  # the same key shuffle
        outs.append(copy.deepcopy(m)(batch))
    for k in ("loss_local_local", "loss_local_global", "loss_global_global"):
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6)


def test_split_batchnorm_construction():
    assert SplitBatchNorm2d(3).num_splits == 1
    assert SplitBatchNorm2d(3, num_splits=1).num_splits == 1
    with pytest.raises(ValueError) as err:
        SplitBatchNorm2d(3, num_splits=0)
    assert str(err.value) == "SplitBatchNorm2d: num_splits must be >= 1, got 0"
    with pytest.raises(ValueError) as err:
        SplitBatchNorm2d(3, num_splits=2).train()(torch.randn(5, 3, 2, 2))
    assert str(err.value) == (
        "SplitBatchNorm2d: a batch of 5 samples cannot be split into 2 sub-batches "
        "(MODEL.DETCO.SHUFFLE_BN_SPLITS): feed a multiple of it.")


def test_split_batchnorm_replaces_each_bn_with_its_settings_and_state():
    from soco_d2.modeling.meta_arch.detco import _split_batchnorm

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
        torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=None, affine=False,
                                                 track_running_stats=False)),
    )
    with torch.no_grad():
        module[1].weight.uniform_(0.5, 2.0)
        module[1].running_mean.uniform_(-1.0, 1.0)
    module[1].num_batches_tracked.fill_(7)
    module.eval()
    before = copy.deepcopy(module[1].state_dict())
    _split_batchnorm(module, 4)
    a, b = module[1], module[2][0]
    assert type(a) is SplitBatchNorm2d and type(b) is SplitBatchNorm2d
    assert (a.num_splits, a.eps, a.momentum, a.affine, a.track_running_stats) == (4, 1e-3, 0.3, True, True)
    assert (b.num_splits, b.eps, b.momentum, b.affine, b.track_running_stats) == (4, 1e-5, None, False, False)
    assert not a.training and not b.training
    for k, v in before.items():
        assert torch.equal(a.state_dict()[k], v), k


def test_split_batchnorm_eps_cumulative_average_and_untracked():
    torch.manual_seed(0)
    x1, x2 = torch.randn(4, 3, 2, 2) * 0.3, torch.randn(4, 3, 2, 2) * 0.3 + 1.0
    # eps and momentum None (cumulative average): as plain BN per sub-batch, statistics averaged
    split = SplitBatchNorm2d(3, num_splits=2, eps=0.5, momentum=None)
    plain = [torch.nn.BatchNorm2d(3, eps=0.5, momentum=None) for _ in range(2)]
    for x in (x1, x2):
        out = split(x)
        for g in range(2):
            torch.testing.assert_close(out[g::2], plain[g](x[g::2]))
    for name in ("running_mean", "running_var"):
        expected = (getattr(plain[0], name) + getattr(plain[1], name)) / 2
        torch.testing.assert_close(getattr(split, name), expected)
    assert int(split.num_batches_tracked) == 2
    # without running statistics: batch statistics only
    free = SplitBatchNorm2d(3, num_splits=2, momentum=None, track_running_stats=False)
    ref = torch.nn.BatchNorm2d(3, track_running_stats=False)
    torch.testing.assert_close(free(x1)[1::2], ref(x1[1::2]))


def test_split_batchnorm_output_is_contiguous_for_a_strided_input():
    x = torch.randn(4, 3, 5, 8)[..., ::2]
    assert not x.is_contiguous()
    out = SplitBatchNorm2d(3, num_splits=2)(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, SplitBatchNorm2d(3, num_splits=2)(x.contiguous()))
