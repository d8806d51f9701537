import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import toy_pretrain as toy  # noqa: E402

from soco_d2.engine.trainer import PretrainTrainer, move_to_device  # noqa: E402


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
    from soco_d2.engine.trainer import configure_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        assert configure_cpu_threads(num_workers=4, processes_per_machine=2) == 4  # 16 // 2 - 4
        assert torch.get_num_threads() == 4
        assert configure_cpu_threads(num_workers=8, processes_per_machine=2) == 1  # at least one
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert configure_cpu_threads(num_workers=0, processes_per_machine=1) == 3  # user's choice
    finally:
        torch.set_num_threads(before)
