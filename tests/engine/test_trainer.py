import copy
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import toy_pretrain as toy  # noqa: E402

from soco_d2.engine.run_setup import move_to_device  # noqa: E402
from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402


def _train(cfg, resume=False, **model_attrs):
    torch.manual_seed(0)  # the model is built outside the trainer: same initial weights
    model = toy.EngineToyNet(cfg)
    for k, v in model_attrs.items():
        setattr(model, k, v)
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    trainer.resume_or_load(resume)
    trainer.train()
    return trainer


def _final_state(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, workers):
    common = dict(**{"DATALOADER.NUM_WORKERS": workers, "SOLVER.GRAD_ACCUM_STEPS": 2})
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _train(toy.toy_cfg(ref_dir, **common))

    # crash in the second micro-batch of iteration 5 (forward call 9): last checkpoint is at 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(toy.toy_cfg(run_dir, **common), fail_at_call=9)
    assert (run_dir / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (run_dir / "model_final.pth").exists()
    trainer = _train(toy.toy_cfg(run_dir, **common), resume=True)
    assert trainer.start_iter == 3

    ref, got = _final_state(ref_dir), _final_state(run_dir)
    assert got["iteration"] == ref["iteration"] == 6
    assert ref["model"].keys() == got["model"].keys()
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    for pid, st in ref["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], got["optimizer"]["state"][pid]["momentum_buffer"])
    # the target network moved and the queue was filled during training
    assert not torch.equal(ref["model"]["target.0.weight"], ref["model"]["online.0.weight"])
    assert (ref["model"]["queue"] != 0).all()


def test_outputs_of_a_run(tmp_path):
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.MAX_TO_KEEP": 1, "SOLVER.CHECKPOINT_PERIOD": 2})
    _train(cfg)
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000004.pth",
                                                                    "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert "EngineToyNet" in (tmp_path / "config.yaml").read_text()
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [2, 4, 6]
    for key in ("loss_match", "loss_small", "total_loss", "feat_norm", "lr", "momentum",
                "data_time", "iter_time", "images_per_sec", "num_skipped", "eta_seconds"):
        assert key in lines[0]
    assert lines[0]["total_loss"] == pytest.approx(lines[0]["loss_match"] + lines[0]["loss_small"])
    assert lines[-1]["lr"] == pytest.approx(trainer_lr(cfg, 5))
    # resuming a finished run does nothing and keeps the final checkpoint
    before = os.path.getmtime(tmp_path / "model_final.pth")
    trainer = _train(cfg, resume=True)
    assert trainer.start_iter == 6 and os.path.getmtime(tmp_path / "model_final.pth") == before


def trainer_lr(cfg, it):
    from soco_d2.engine.schedules import build_lr_schedule

    return build_lr_schedule(cfg, cfg.SOLVER.MAX_ITER).lr_at(it)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.CHECKPOINT_PERIOD": 2, "LOG_PERIOD": 100})
    with pytest.raises(FloatingPointError, match=r"iteration 4 of 6.*loss_match=nan") as e:
        _train(cfg, nan_at_call=3)
    assert "model_0000002.pth" in str(e.value)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000002.pth"]
    state = torch.load(tmp_path / "model_0000002.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


class _NanToy(toy.EngineToyNet):
    """The toy with a NaN loss in each forward call of ``nan_calls``."""

    nan_calls = ()

    def forward(self, batch):
        call = self.calls
        out = super().forward(batch)
        if call in self.nan_calls:
            out["loss_match"] = out["loss_match"] * float("nan")
        return out


@pytest.fixture
def skipping_scaler(monkeypatch):
    """The trainer's GradScaler enabled on the CPU (float16 autocast needs CUDA; the scaler's
    skip of a step with non-finite gradients is the same on a CPU)."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled=True: real(device, init_scale=2.0**10, enabled=True))


def _nan_run(cfg, nan_calls):
    torch.manual_seed(0)
    model = _NanToy(cfg)
    model.nan_calls = set(nan_calls)
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    trainer.train()
    return trainer


def test_fp16_run_survives_non_finite_losses_its_scaler_skipped(tmp_path, skipping_scaler, soco_log):
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE": 3,
                                   "SOLVER.CHECKPOINT_PERIOD": 0})
    trainer = _nan_run(cfg, nan_calls={1, 3, 4})  # iterations 2, 4 and 5: at most 2 in a row
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**10 / 8  # 3 skips
    final = _final_state(tmp_path)
    assert final["iteration"] == 6
    assert all(torch.isfinite(v.float()).all() for v in final["model"].values())
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x.get("num_nonfinite", 0) for x in lines] == [1, 1, 1]  # windows 1-2, 3-4, 5-6
    assert all(x["loss_match"] == x["loss_match"] for x in lines)  # finite steps only: no NaN
    warned = [m for m in soco_log if m.startswith("Non-finite loss in iteration(s)")]
    assert len(warned) == 3 and "4, 5" not in warned[1] and "iteration(s) 4: " in warned[1]
    assert "MAX_CONSECUTIVE_NONFINITE" in warned[0]


def test_fp16_run_stops_after_the_configured_consecutive_non_finite_losses(tmp_path, skipping_scaler):
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE": 3,
                                   "SOLVER.CHECKPOINT_PERIOD": 1})
    with pytest.raises(FloatingPointError, match=r"iteration 4 of 6.*loss_match=nan.*"
                       r"The 3 iterations up to this one.*MAX_CONSECUTIVE_NONFINITE 3") as e:
        _nan_run(cfg, nan_calls={1, 2, 3})  # iterations 2, 3, 4 (across two metric windows)
    assert "the last good one is" in str(e.value) and "model_0000003.pth" in str(e.value)
    with pytest.raises(ValueError, match="MAX_CONSECUTIVE_NONFINITE must be an integer >= 1"):
        PretrainTrainer(toy.toy_cfg(tmp_path / "bad", **{"SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE": 0}),
                        model=toy.EngineToyNet(cfg), dataset=toy.ToyDataset())


def test_without_a_scaler_the_first_non_finite_loss_stops(tmp_path):
    """fp32 / bf16: the step of a non-finite loss was applied, whatever the setting."""
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE": 3, "LOG_PERIOD": 100})
    with pytest.raises(FloatingPointError, match=r"iteration 2 of 6.*loss_match=nan"):
        _nan_run(cfg, nan_calls={1})


def test_too_many_bad_images_stop_the_run(tmp_path):
    cfg = toy.toy_cfg(tmp_path, **{"DATALOADER.MAX_BAD_IMAGE_FRACTION": 0.2})
    model = toy.EngineToyNet(cfg)
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset(skip_every=2))
    with pytest.raises(RuntimeError, match=r"unreadable.*MAX_BAD_IMAGE_FRACTION=0.2"):
        trainer.train()

    # a few bad images are tolerated and counted
    ok_dir = tmp_path / "ok"
    cfg = toy.toy_cfg(ok_dir, **{"DATALOADER.MAX_BAD_IMAGE_FRACTION": 0.2})
    trainer = PretrainTrainer(cfg, model=toy.EngineToyNet(cfg), dataset=toy.ToyDataset(skip_every=8))
    trainer.train()
    lines = [json.loads(x) for x in (ok_dir / "metrics.json").read_text().splitlines()]
    assert lines[-1]["num_skipped_total"] == trainer.num_skipped_total > 0


def test_bf16_autocast_and_grad_clipping_run(tmp_path):
    cfg = toy.toy_cfg(tmp_path, **{"SOLVER.AMP.ENABLED": True, "SOLVER.CLIP_GRAD_NORM": 0.01,
                                  "SOLVER.MAX_ITER": 2, "CHANNELS_LAST": True})
    trainer = _train(cfg)
    assert trainer.iter == 1
    state = _final_state(tmp_path)["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_move_to_device_nested():
    batch = {"images": {"v1": torch.zeros(2, 3, 4, 4)}, "pairs": [{"a": ["v1", "v1"], "b": torch.ones(2)}]}
    out = move_to_device(batch, torch.device("cpu"), channels_last=True)
    assert out["images"]["v1"].is_contiguous(memory_format=torch.channels_last)
    assert out["pairs"][0]["a"] == ["v1", "v1"] and torch.equal(out["pairs"][0]["b"], torch.ones(2))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """Same global batch on 1 and on 2 CPU processes: SyncBN statistics, gradients and updated
    weights agree (plain BN on two processes would not: each sees half the batch)."""
    from soco_d2.engine.launch import launch

    overrides = {"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 0}
    launch(toy.train_and_dump, num_gpus_per_machine=2, backend="gloo",
           args=(str(tmp_path / "two"), str(tmp_path / "two.pt"), overrides))
    toy.train_and_dump(str(tmp_path / "one"), str(tmp_path / "one.pt"), overrides)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["bn_type"] == "BatchNorm2d" and two["bn_type"] == "AllReduceBatchNorm"
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) == 8
    for k, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][k], g, rtol=1e-4, atol=1e-4, msg=k)
    for k, v in one["state"].items():
        if k == "queue":  # filled from each process's own half of the batch
            continue
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-4, msg=k)
    assert not torch.equal(one["state"]["online.1.running_mean"], torch.zeros(4))


def test_model_can_keep_per_process_batchnorm(tmp_path):
    """A model with ``sync_batchnorm = False`` (DetCo with shuffle-BN, as MoCo) keeps plain BN."""
    from soco_d2.engine.launch import launch

    overrides = {"SOLVER.MAX_ITER": 1, "SOLVER.CHECKPOINT_PERIOD": 0}
    launch(toy.train_and_dump, num_gpus_per_machine=2, backend="gloo",
           args=(str(tmp_path / "two"), str(tmp_path / "two.pt"), overrides, False))
    assert torch.load(tmp_path / "two.pt", weights_only=True)["bn_type"] == "BatchNorm2d"


def test_cpu_threads_leave_cores_to_loader_workers(monkeypatch):
    from soco_d2.engine.run_setup import configure_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # the whole machine: shared
    try:
        assert configure_cpu_threads(num_workers=4, processes_per_machine=2) == 4  # 16 // 2 - 4
        assert torch.get_num_threads() == 4
        assert configure_cpu_threads(num_workers=8, processes_per_machine=2) == 1  # at least one
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert configure_cpu_threads(num_workers=0, processes_per_machine=1) == 3  # user's choice
    finally:
        torch.set_num_threads(before)


def _official_loop(cfg, model, batches):
    """The official SoCo training loop written out (hologerry/SoCo ``main_pretrain.py`` train()
    with ``SoCo_FPN.forward``, ``contrast/lars.py`` and ``contrast/lr_scheduler.py``), run on
    ``model`` over ``batches``; returns each step's (lr, momentum, loss).

    Step t (0-based): the target moves first, ``t = t * m + o * (1 - m)`` with
    ``m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2`` (the first step too); forward, backward; LARS:
    on tensors of more than one dimension ``g += wd * p`` then ``g *= coef |p| / (|g| + eps)``,
    then SGD momentum (``buf = g`` first, ``buf = mu * buf + g`` after), ``p -= lr * buf``; lr
    ``base * (f + (1 - f) t / W)`` during the W warmup steps, then
    ``min + (base - min) (1 + cos(pi (t - W) / (T - W))) / 2``."""
    s = cfg.SOLVER
    total = s.MAX_ITER
    warmup = round(total * s.WARMUP_EPOCHS / s.EPOCHS)
    base = s.BASE_LR * s.IMS_PER_BATCH / s.BASE_LR_BATCH_SIZE
    params = [p for p in model.parameters() if p.requires_grad]
    bufs, steps = {}, []
    for t, images in enumerate(batches):
        m = 1 - (1 - cfg.MODEL.EMA.BASE_MOMENTUM) * (math.cos(math.pi * t / total) + 1) / 2
        with torch.no_grad():
            for pt, po in zip(model.target.parameters(), model.online.parameters()):
                pt.copy_(pt * m + po * (1 - m))
        if t < warmup:
            lr = base * (s.WARMUP_FACTOR + (1 - s.WARMUP_FACTOR) * t / warmup)
        else:
            lr = s.MIN_LR + (base - s.MIN_LR) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2
        out = model({"image": images})
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad
                if p.ndim > 1:
                    g = g + s.WEIGHT_DECAY * p
                    if p.norm() > 0 and g.norm() > 0:
                        g = g * (s.LARS_TRUST_COEF * p.norm() / (g.norm() + s.LARS_EPS))
                bufs[i] = g.clone() if i not in bufs else bufs[i] * s.MOMENTUM + g
                p.sub_(lr * bufs[i])
        steps.append((lr, m, loss.item()))
    return steps


def test_trajectory_follows_the_official_loop_order(tmp_path):
    """Six iterations of the trainer against the official loop written out: the EMA before each
    forward (the first included) with the momentum of that iteration, LARS, warmup + cosine.
    The target starts away from the online network (as after ``MODEL.WEIGHTS`` of a pretrained
    checkpoint), so the first update matters."""
    cfg = toy.toy_cfg(tmp_path, **{"MODEL.EMA.BASE_MOMENTUM": 0.9, "LOG_PERIOD": 1,
                                   "SOLVER.CHECKPOINT_PERIOD": 0})
    torch.manual_seed(0)
    model = toy.EngineToyNet(cfg, noise=0.0)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    model.seen = []
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    trainer.train()
    assert len(model.seen) == cfg.SOLVER.MAX_ITER

    steps = _official_loop(cfg, reference, model.seen)
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == list(range(1, 7))
    for line, (lr, m, loss) in zip(lines, steps):
        assert line["lr"] == pytest.approx(lr, rel=1e-12), line["iteration"]
        assert line["momentum"] == pytest.approx(m, rel=1e-12), line["iteration"]
        assert line["total_loss"] == pytest.approx(loss, rel=1e-5), line["iteration"]
    final = _final_state(tmp_path)["model"]
    expected = reference.state_dict()
    assert final.keys() == expected.keys()
    # The write-out rounds differently (its own EMA and LARS arithmetic): up to 1e-5 relative
    # after six steps; a change of the loop order or of a schedule index moves weights by 1e-3.
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5, msg=k)


def _detco_queues_worker(rank, init_file, out_dir, ddp_option):
    import torch.distributed as dist

    from soco_d2.config import get_cfg
    from soco_d2.utils import comm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if ddp_option is not None:  # the DDP option of another torch version
            comm._no_buffer_broadcast = lambda: dict(ddp_option)
        cfg = get_cfg()
        cfg.MODEL.META_ARCHITECTURE = "DetCo"
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.DETCO.QUEUE_SIZE = 8
        cfg.MODEL.DETCO.HEAD_HIDDEN_DIM = 16
        cfg.MODEL.DETCO.FEATURE_DIM = 8
        cfg.SOLVER.IMS_PER_BATCH = 4
        cfg.OUTPUT_DIR = os.path.join(out_dir, "run")
        # the model is built after seeding with SEED + rank: its queues are drawn per process
        trainer = PretrainTrainer(cfg, dataset=toy.ToyDataset())
        m = trainer.model.module
        torch.save({"queues": {f"{kind}.{lvl}": q.queue.clone() for kind in ("global", "local")
                               for lvl, q in getattr(m, f"queues_{kind}").items()},
                    "param": next(m.parameters()).detach().clone()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("ddp_option", [None, {"broadcast_buffers": False}],
                         ids=["this torch", "broadcast_buffers=False"])
def test_two_processes_start_from_the_same_detco_queues(tmp_path, ddp_option):
    import torch.multiprocessing as mp

    mp.start_processes(_detco_queues_worker, nprocs=2, start_method="spawn",
                       args=(str(tmp_path / "init"), str(tmp_path), ddp_option))
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert len(a["queues"]) == 8  # global and local, res2-res5
    assert torch.equal(a["param"], b["param"])
    for k in a["queues"]:
        assert torch.equal(a["queues"][k], b["queues"][k]), k
