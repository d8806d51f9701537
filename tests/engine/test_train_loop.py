"""The loop both trainers share: its hook order, its metrics flush and its one final-save rule."""
import json
import os
import signal
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import toy_pretrain as toy  # noqa: E402
from final_save import check_final_save_rule  # noqa: E402

from soco_d2.config import get_cfg  # noqa: E402
from soco_d2.engine.checkpoint import Checkpointer  # noqa: E402
from soco_d2.engine.preemption import Preempted  # noqa: E402
from soco_d2.engine.train_loop import NonFiniteLossGuard, TrainLoop  # noqa: E402
from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402


class RecordingLoop(TrainLoop):
    """A one-parameter model on the base loop, recording every hook it is called with."""

    def __init__(self, cfg, stop_in_step=None):
        super().__init__(cfg, torch.device("cpu"))
        self.model = nn.Linear(1, 1, bias=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.max_iter = cfg.SOLVER.MAX_ITER
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.nonfinite = NonFiniteLossGuard(cfg, scaler, "")
        self.checkpointer = Checkpointer(self.model, cfg.OUTPUT_DIR, self.optimizer, scaler)
        self.calls = []
        self.stop_in_step = stop_in_step

    def build_train_loader(self):
        self.calls.append("loader")
        return iter(range(self.start_iter, self.max_iter))

    def before_train(self):
        self.calls.append("before_train")

    def run_step(self, it):
        x = torch.tensor([[float(next(self._data))]])
        loss = self.model(x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.calls.append(f"step {it}")
        if it == self.stop_in_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.record(it, {"loss": loss}, lr=0.1)

    def after_step(self, done):
        self.calls.append(f"after_step {done}")

    def window_metrics(self, done, window, losses, elapsed):
        self.calls.append(f"flush {done} {[w['it'] for w in window]}")
        return {"lr": window[-1]["lr"]}

    def evaluate(self, done):
        self.calls.append(f"evaluate {done}")

    def checkpoint_extra(self):
        self.calls.append("checkpoint")
        return {}

    def after_train(self):
        self.calls.append("after_train")

    def close(self):
        self.calls.append("close")


def _cfg(out, **values):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = str(out)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.LOG_PERIOD = 4, 2, 3
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def test_hook_order_of_a_run(tmp_path):
    loop = RecordingLoop(_cfg(tmp_path))
    loop.train()
    assert loop.calls == [
        "loader", "before_train",
        "step 0", "after_step 1", "evaluate 1",
        "step 1", "after_step 2", "flush 2 [0, 1]", "evaluate 2", "checkpoint",
        "step 2", "after_step 3", "flush 3 [2]", "evaluate 3",
        "step 3", "after_step 4", "flush 4 [3]",  # the last: no evaluation, no periodic checkpoint
        "checkpoint",  # model_final.pth
        "after_train", "close",
    ]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [2, 3, 4] and set(lines[0]) >= {"loss", "lr"}


def test_preemption_flushes_checkpoints_and_skips_the_rest(tmp_path):
    loop = RecordingLoop(_cfg(tmp_path, LOG_PERIOD=10), stop_in_step=0)
    with pytest.raises(Preempted):
        loop.train()
    assert loop.calls == ["loader", "before_train", "step 0", "after_step 1", "evaluate 1",
                          "flush 1 [0]", "checkpoint", "close"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_after_train_is_not_called_after_an_error_but_close_is(tmp_path):
    loop = RecordingLoop(_cfg(tmp_path))

    def failing_step(it):
        raise RuntimeError("step failed")

    loop.run_step = failing_step
    with pytest.raises(RuntimeError, match="step failed"):
        loop.train()
    assert loop.calls == ["loader", "before_train", "close"]


def test_final_save_rule_through_pretraining(tmp_path):
    """(tests/finetune/test_trainer.py: the same rule through fine-tuning)"""
    def run(out, max_iter, resume):
        cfg = toy.toy_cfg(out, **{"SOLVER.MAX_ITER": max_iter, "SOLVER.CHECKPOINT_PERIOD": 1})
        torch.manual_seed(0)
        trainer = PretrainTrainer(cfg, model=toy.EngineToyNet(cfg), dataset=toy.ToyDataset())
        trainer.resume_or_load(resume)
        trainer.train()
        return trainer

    check_final_save_rule(run, tmp_path)
