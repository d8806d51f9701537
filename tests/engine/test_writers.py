import json

from soco_d2.engine.writers import build_writers, format_progress_line


def test_progress_line_format():
    m = {"total_loss": 1.2345, "loss_v1_v2": 0.6, "loss_v1_v3": 0.6345, "lr": 0.08,
         "momentum": 0.990012, "data_time": 0.0123, "iter_time": 0.52, "images_per_sec": 245.12,
         "num_skipped": 0, "eta_seconds": 32462.9}
    assert format_progress_line(120, 62500, m) == (
        "iter 120/62500  loss 1.2345 (loss_v1_v2 0.6 loss_v1_v3 0.6345)  lr 0.0800  m 0.99001  "
        "data 0.012s  iter 0.520s  245.1 img/s  ETA 9:01:02"
    )


def test_writers_write_json_lines_and_tensorboard(tmp_path):
    writers = build_writers(str(tmp_path), 10)
    for it in (2, 4):
        for w in writers:
            w.write(it, {"total_loss": 1.0 / it, "lr": 0.1})
    for w in writers:
        w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert lines == [{"iteration": 2, "total_loss": 0.5, "lr": 0.1},
                     {"iteration": 4, "total_loss": 0.25, "lr": 0.1}]
    assert list(tmp_path.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------
# Weights & Biases, through a fake wandb module (no network, no package needed)
# ------------------------------------------------------------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import toy_pretrain as toy  # noqa: E402


class FakeWandb(types.ModuleType):
    """Records what the writer hands to ``wandb`` (``init`` kwargs, logged rows, images)."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, rows=[], finished=False)
        run.log = lambda data, step=None: run.rows.append((step, dict(data)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    class Image:
        def __init__(self, path):
            self.path = path


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _wandb_cfg(out, **extra):
    return toy.toy_cfg(out, **{"WANDB.ENABLED": True, "WANDB.MODE": "offline",
                               "WANDB.PROJECT": "p", **extra})


def _train(cfg, resume=False, fail_at_call=None):
    from soco_d2.engine.trainer import PretrainTrainer

    torch.manual_seed(0)
    model = toy.EngineToyNet(cfg)
    model.fail_at_call = fail_at_call
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    trainer.resume_or_load(resume)
    trainer.train()


def test_wandb_gets_the_tensorboard_scalars_and_the_config(tmp_path, fake_wandb):
    cfg = _wandb_cfg(tmp_path)
    _train(cfg)
    (run,) = fake_wandb.runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["project"] == "p"
    assert run.kwargs["resume"] == "allow" and run.kwargs["dir"] == str(tmp_path)
    assert run.kwargs["name"] == os.path.basename(str(tmp_path))
    assert run.kwargs["config"]["SOLVER"]["BASE_LR"] == cfg.SOLVER.BASE_LR
    rows = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [(r.pop("iteration"), r) for r in rows] == run.rows  # every scalar, at its iteration
    assert run.finished
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert ckpt["writers"] == {"WandbWriter": {"run_id": run.kwargs["id"]}}


def test_resume_continues_the_same_wandb_run(tmp_path, fake_wandb):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(_wandb_cfg(tmp_path), fail_at_call=4)  # after the checkpoint at iteration 3
    _train(_wandb_cfg(tmp_path), resume=True)
    first, second = fake_wandb.runs
    assert second.kwargs["id"] == first.kwargs["id"] and second.kwargs["resume"] == "allow"
    assert [step for step, _ in second.rows] == [4, 6]
    _train(_wandb_cfg(tmp_path / "other"))
    assert fake_wandb.runs[2].kwargs["id"] != first.kwargs["id"]  # a new run: a new id


def test_wandb_uploads_the_monitor_pngs_at_the_end(tmp_path, fake_wandb):
    writers = build_writers(str(tmp_path), 10, _wandb_cfg(tmp_path))
    for w in writers:
        w.write(5, {"knn/top1": 12.5, "rankme": 3.0})
    (tmp_path / "monitor_curves.png").write_bytes(b"png")
    for w in writers:
        w.close()
    (run,) = fake_wandb.runs
    step, images = run.rows[-1]
    assert step == 5 and images["monitor/monitor_curves"].path == str(tmp_path / "monitor_curves.png")
    assert run.rows[0] == (5, {"knn/top1": 12.5, "rankme": 3.0})


def test_wandb_enabled_without_the_package_names_the_extra(tmp_path, monkeypatch):
    from soco_d2.engine.trainer import PretrainTrainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = _wandb_cfg(tmp_path)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[wandb\]"'):
        PretrainTrainer(cfg, model=toy.EngineToyNet(cfg), dataset=toy.ToyDataset())
    assert not (tmp_path / "model_final.pth").exists()
    with pytest.raises(ValueError, match="WANDB.MODE"):
        monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
        build_writers(str(tmp_path), 10, _wandb_cfg(tmp_path, **{"WANDB.MODE": "cloud"}))


def test_wandb_off_by_default(tmp_path, fake_wandb):
    _train(toy.toy_cfg(tmp_path))
    assert fake_wandb.runs == []


def test_every_log_line_carries_its_level(tmp_path):
    import logging

    from soco_d2.engine.writers import setup_logging

    log = setup_logging(str(tmp_path), name="soco_d2_test_levels")
    log.info("an ordinary line")
    log.warning("something to act on")
    for h in log.handlers:
        h.flush()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert " INFO soco_d2_test_levels]: an ordinary line" in lines[0]
    assert " WARNING soco_d2_test_levels]: something to act on" in lines[1]
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    logging.getLogger("soco_d2_test_levels")._soco_configured = False
