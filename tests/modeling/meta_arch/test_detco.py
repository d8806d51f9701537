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
from soco_d2.modeling.meta_arch.detco import DetCo, batch_shuffle

LEVELS = ("res2", "res3", "res4", "res5")


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
    out = m(batch)

    # Recompute every term from the encoders' outputs and the queues as they were.
    glob, local = before.normalize(batch["global"]), before.normalize(batch["local"])
    perm = batch["local_perm"]
    with torch.no_grad():
        q_g, q_l = before.encoder_q(glob[:, 0], local[:, 0], perm[:, 0])
        k_g, k_l = before.encoder_k(glob[:, 1], local[:, 1], perm[:, 1])
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


def test_local_combine_orders(model):
    enc = copy.deepcopy(model.encoder_q).eval()
    b = _batch(n=2, seed=5)
    glob, patches = model.normalize(b["global"])[:, 0], model.normalize(b["local"])[:, 0]
    perm = b["local_perm"][:, 0]
    shuffle = torch.randperm(9)
    with torch.no_grad():
        _, a = enc(glob, patches, perm)
        _, c = enc(glob, patches[:, shuffle], perm[:, shuffle])
    for lvl in LEVELS:  # "concat": in cell order, so the patch order does not matter
        torch.testing.assert_close(a[lvl], c[lvl], rtol=1e-5, atol=1e-6)
    enc.combine = "concat_shuffled"
    with torch.no_grad():
        _, a = enc(glob, patches, perm)
        _, c = enc(glob, patches[:, shuffle], perm[:, shuffle])
    assert not torch.allclose(a["res5"], c["res5"], atol=1e-4)


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
    with pytest.raises(ValueError, match="LOCAL_COMBINE"):
        DetCo(_cfg(LOCAL_COMBINE="max"))
    with pytest.raises(ValueError, match="KEY_BN"):
        DetCo(_cfg(KEY_BN="frozen"))


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

    root = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    cfg = load_config(
        os.path.join(root, "configs", "detco", f"{name}.yaml"),
        ["MODEL.RESNETS.DEPTH", "18", "SOLVER.IMS_PER_BATCH", "2", "MODEL.DETCO.QUEUE_SIZE", "4",
         "MODEL.DETCO.HEAD_HIDDEN_DIM", "16", "INPUT.DETCO.GLOBAL_SIZE", "32",
         "INPUT.DETCO.LOCAL_CROP_SIZE", "96", "INPUT.DETCO.PATCH_SIZE", "24"],
    )
    assert cfg.MODEL.META_ARCHITECTURE == "DetCo" and cfg.SOLVER.OPTIMIZER == "SGD"
    mapper, model = build_mapper(cfg), build_model(cfg).train()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9)
    for step in range(2):
        batch = default_collate([mapper(img, None, rng) for img in images[2 * step: 2 * step + 2]])
        out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update(cfg.MODEL.EMA.BASE_MOMENTUM)
    assert int(model.queues_local["res5"].ptr) == 0  # 2 steps x 2 keys wrapped a queue of 4


def _model_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        m = DetCo(_cfg(KEY_BN="shuffle")).train()
        m.encoder_k.eval()  # per-sample key features, so shuffling must not change them
        batch = _batch(n=2, seed=10 + rank)
        glob, local = m.normalize(batch["global"]), m.normalize(batch["local"])
        perm = batch["local_perm"]
        with torch.no_grad():
            direct = m.encoder_k(glob[:, 1], local[:, 1], perm[:, 1])
            shuffled = m._keys(glob[:, 1], local[:, 1], perm[:, 1])
        m(batch)
        m.encoder_k.train()  # with batch statistics, the shuffle changes the keys
        with torch.no_grad():
            train_direct = m.encoder_k(glob[:, 1], local[:, 1], perm[:, 1])[0]["res2"]
            train_shuffled = m._keys(glob[:, 1], local[:, 1], perm[:, 1])[0]["res2"]
        torch.save({"direct": direct, "shuffled": shuffled,
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
    assert torch.equal(got[0]["queue"], got[1]["queue"])
    keys = torch.cat([got[0]["direct"][1]["res3"], got[1]["direct"][1]["res3"]])
    torch.testing.assert_close(got[0]["queue"][:4], keys, rtol=1e-5, atol=1e-6)


def test_key_bn_decides_whether_the_engine_synchronises_batchnorm():
    assert DetCo(_cfg(KEY_BN="shuffle")).sync_batchnorm is False  # MoCo: per-process BN
    assert DetCo(_cfg(KEY_BN="sync")).sync_batchnorm is True
