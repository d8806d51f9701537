import glob
import json
import logging
import os
import shutil
import sys

import pytest
import torch

from soco_d2.config import load_config
from soco_d2.finetune.trainer import FinetuneTrainer
from soco_d2.finetune.weights import WeightsLoadingError

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from final_save import check_final_save_rule  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../configs/finetune/*.yaml")))
SHIPPED = [c for c in CONFIGS if not os.path.basename(c).startswith("Base")]
COCO_1X = [c for c in CONFIGS if os.path.basename(c) == "mask_rcnn_R50_FPN_1x.yaml"][0]


def _overrides(tiny_overrides, json_file, out, *extra):
    return tiny_overrides + ["DATASETS.TRAIN", f"('{json_file}',)", "DATASETS.TEST",
                             f"('{json_file}',)", "OUTPUT_DIR", str(out), *extra]


@pytest.mark.parametrize("config", SHIPPED, ids=os.path.basename)
def test_shipped_config_trains_and_evaluates(config, tiny_coco, tiny_overrides, tmp_path):
    json_file, _ = tiny_coco
    cfg = load_config(config, _overrides(tiny_overrides, json_file, tmp_path / "out"))
    assert cfg.TEST.PRECISE_BN.ENABLED
    trainer = FinetuneTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    tasks = {"bbox", "segm"} if cfg.MODEL.DETECTOR == "mask_rcnn" else {"bbox"}
    assert set(results) == tasks
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert [r["iteration"] for r in lines if "total_loss" in r] == [1, 2]
    final = [r for r in lines if "bbox/AP" in r]
    assert len(final) == 1 and final[0]["iteration"] == 2
    assert {k.split("/")[0] for k in final[0] if "/" in k} == tasks
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    assert os.path.isfile(tmp_path / "out" / "config.yaml")


def test_resume_continues_exactly(tiny_coco, tiny_overrides, tmp_path):
    json_file, _ = tiny_coco
    common = ["SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", "()",
              "SOLVER.MAX_TO_KEEP", 0]

    def run(out, resume):
        cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, out) + common)
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        start = trainer.start_iter
        trainer.train()
        return start, torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]

    a = tmp_path / "a"
    _, straight = run(a, False)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "model_0000002.pth", b / "model_0000002.pth")
    (b / "last_checkpoint").write_text("model_0000002.pth")
    start, resumed = run(b, True)
    assert start == 2
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_final_save_rule_through_finetuning(tiny_coco, tiny_overrides, tmp_path):
    """(tests/engine/test_train_loop.py: the same rule through pretraining)"""
    json_file, _ = tiny_coco

    def run(out, max_iter, resume):
        cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, out) + [
            "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", max_iter])
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return trainer

    check_final_save_rule(run, tmp_path)


def test_eval_only_needs_weights(tiny_coco, tiny_overrides, tmp_path):
    json_file, _ = tiny_coco
    cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, tmp_path / "empty"))
    trainer = FinetuneTrainer(cfg, train=False)
    with pytest.raises(WeightsLoadingError, match="last_checkpoint"):
        trainer.load_for_eval()


def test_class_count_must_match(tiny_coco, tiny_overrides, tmp_path):
    json_file, _ = tiny_coco
    cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, tmp_path / "o") +
                      ["MODEL.NUM_CLASSES", 80])
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        FinetuneTrainer(cfg)


def test_pennfudan_real_data(data_root, monkeypatch, tiny_overrides, tmp_path, caplog):
    monkeypatch.setenv("SOCO_DATASETS", data_root)
    config = os.path.join(os.path.dirname(CONFIGS[0]), "mask_rcnn_R18_FPN_pennfudan_cpu.yaml")
    overrides = tiny_overrides + ["MODEL.NUM_CLASSES", 1, "OUTPUT_DIR", str(tmp_path / "pf"),
                                  "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96]
    cfg = load_config(config, overrides)
    assert cfg.DATASETS.TRAIN == ("pennfudan_train",) and cfg.DATASETS.TEST == ("pennfudan_val",)
    trainer = FinetuneTrainer(cfg)
    assert len(trainer.train_dataset) == 127
    trainer.resume_or_load(resume=False)
    log = logging.getLogger("soco_d2")
    log.addHandler(caplog.handler)
    caplog.set_level("INFO", logger="soco_d2")
    try:
        results = trainer.train()
    finally:
        log.removeHandler(caplog.handler)
    assert "Evaluation of 43 images" in caplog.text
    for task in ("bbox", "segm"):
        assert set(results[task]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    final = [json.loads(line) for line in open(tmp_path / "pf" / "metrics.json")][-1]
    assert "bbox/AP" in final and "segm/AP" in final and final["iteration"] == 2


@pytest.mark.slow  # three short Mask R-CNN runs
def test_preemption_signal_checkpoints_and_resume_continues_exactly(tiny_coco, tiny_overrides,
                                                                    tmp_path):
    import signal

    from soco_d2.engine.preemption import PREEMPTED_EXIT_CODE, Preempted

    json_file, _ = tiny_coco
    common = ["SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 0, "DATASETS.TEST", "()"]

    def trainer_for(out, resume):
        cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, out) + common)
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        return trainer

    def final(out):
        return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]

    trainer_for(tmp_path / "a", False).train()
    trainer = trainer_for(tmp_path / "b", False)
    step = trainer.run_step

    def signalled_step(it):
        if it == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # during iteration 2
        step(it)

    trainer.run_step = signalled_step
    with pytest.raises(Preempted) as stop:
        trainer.train()
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert (tmp_path / "b" / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (tmp_path / "b" / "model_final.pth").exists()
    resumed = trainer_for(tmp_path / "b", True)
    assert resumed.start_iter == 2
    resumed.train()
    straight = final(tmp_path / "a")
    for k, v in final(tmp_path / "b").items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_wandb_scalars_and_resume_continue_the_same_run(tiny_coco, tiny_overrides, tmp_path, monkeypatch):
    import sys
    import types

    runs = []

    def init(**kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, rows=[])
        run.log = lambda data, step=None: run.rows.append((step, dict(data)))
        run.finish = lambda: None
        runs.append(run)
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=str))
    json_file, _ = tiny_coco
    out = tmp_path / "run"

    def run(max_iter, resume):
        cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, out) + [
            "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", "()",
            "WANDB.ENABLED", True, "WANDB.MODE", "offline"])
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()

    run(1, False)
    run(2, True)
    assert len(runs) == 2 and runs[1].kwargs["id"] == runs[0].kwargs["id"]
    assert runs[1].rows[0][0] == 2 and "total_loss" in runs[1].rows[0][1]


def test_coco_eval_backend_checked_before_training(tiny_coco, tiny_overrides, tmp_path, monkeypatch):
    import sys

    json_file, _ = tiny_coco
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed
    cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, tmp_path / "o") + [
        "TEST.COCO_EVAL_BACKEND", "faster_coco_eval"])
    with pytest.raises(RuntimeError, match="faster-coco-eval"):
        FinetuneTrainer(cfg)


@pytest.mark.parametrize("limit", [2, 1])
def test_fp16_non_finite_loss_the_scaler_skipped(tiny_coco, tiny_overrides, tmp_path, monkeypatch,
                                                 limit):
    """A NaN loss in iteration 2 under a gradient scaler (enabled on the CPU here; float16
    autocast needs CUDA): the step is skipped and training goes on, unless
    SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE is 1."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled=True: real(device, init_scale=2.0**10, enabled=True))
    json_file, _ = tiny_coco
    cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, tmp_path) + [
        "SOLVER.MAX_ITER", 3, "DATASETS.TEST", "()", "SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE", limit])
    trainer = FinetuneTrainer(cfg)
    forward, calls = trainer.model.forward, []

    def nan_in_the_second_call(*args):
        out = forward(*args)
        calls.append(1)
        return {k: v * float("nan") if len(calls) == 2 else v for k, v in out.items()}

    trainer.model.forward = nan_in_the_second_call
    if limit == 1:
        with pytest.raises(FloatingPointError, match=r"iteration 2 of 3.*loss_classifier=nan"):
            trainer.train()
        return
    trainer.train()
    assert trainer.scaler.get_scale() == 2.0**9
    lines = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [r.get("num_nonfinite", 0) for r in lines] == [0, 1, 0]
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_precise_bn_stops_its_loader_workers_when_it_fails(tiny_coco, tiny_overrides, tmp_path, monkeypatch):
    """Precise BN's own loader: its workers are joined and unregistered from torch's SIGCHLD
    handler when the pass ends, also when it raises (the exception keeps the iterator alive)."""
    import fvcore.nn.precise_bn

    json_file, _ = tiny_coco
    cfg = load_config(COCO_1X, _overrides(tiny_overrides, json_file, tmp_path / "out",
                                          "DATALOADER.NUM_WORKERS", 1))
    trainer = FinetuneTrainer(cfg)
    seen = []

    def failing_pass(model, batches, num_iters):
        seen.append(batches)
        next(batches)  # the workers are running
        raise RuntimeError("a precise-BN batch failed")

    monkeypatch.setattr(fvcore.nn.precise_bn, "update_bn_stats", failing_pass)
    with pytest.raises(RuntimeError, match="precise-BN batch failed"):
        trainer.test(0)
    assert not seen[0]._worker_pids_set  # what torch's SIGCHLD handler checks
    assert all(w.exitcode is not None for w in seen[0]._workers)  # joined
