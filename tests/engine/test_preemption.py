"""Preemption (SIGTERM / SIGUSR1), failing checkpoint writes and dying loader workers."""
import errno
import json
import os
import signal
import sys

import pytest
import torch
from torch.utils.data import get_worker_info

sys.path.insert(0, os.path.dirname(__file__))
import toy_pretrain as toy  # noqa: E402

import soco_d2.engine.checkpoint as ckpt_mod  # noqa: E402
from soco_d2.engine.checkpoint import CheckpointWriteError  # noqa: E402
from soco_d2.engine.preemption import (  # noqa: E402
    PREEMPTED_EXIT_CODE,
    DataLoaderWorkerDied,
    Preempted,
    PreemptionWatcher,
)
from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402


def _trainer(cfg, dataset=None, signal_at_call=None, sig=signal.SIGTERM):
    torch.manual_seed(0)  # the model is built outside the trainer: same initial weights
    model = toy.EngineToyNet(cfg)
    if signal_at_call is not None:
        forward = model.forward

        def signalling_forward(batch):
            if model.calls == signal_at_call:
                os.kill(os.getpid(), sig)  # arrives in the middle of a step
            return forward(batch)

        model.forward = signalling_forward
    return PretrainTrainer(cfg, model=model, dataset=dataset or toy.ToyDataset())


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_after_the_step_and_resume_is_exact(tmp_path, sig, soco_log):
    ref = _trainer(toy.toy_cfg(tmp_path / "ref"))
    ref.train()

    cfg = toy.toy_cfg(tmp_path / "run", **{"SOLVER.CHECKPOINT_PERIOD": 0})
    trainer = _trainer(cfg, signal_at_call=4, sig=sig)  # during iteration 5 (accumulation 1)
    with pytest.raises(Preempted) as stop:
        trainer.train()
    assert stop.value.code == PREEMPTED_EXIT_CODE == 75
    out = "\n".join(soco_log)
    assert f"{signal.Signals(sig).name} received: stopped after iteration 5 of 6" in out
    assert "--resume" in out
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000005.pth"
    assert not (tmp_path / "run" / "model_final.pth").exists()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    assert rows[-1]["iteration"] == 5  # the metrics of the finished steps are written
    # the previous handler is back once the loop is left
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)

    resumed = _trainer(toy.toy_cfg(tmp_path / "run", **{"SOLVER.CHECKPOINT_PERIOD": 0}))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5
    resumed.train()
    _assert_same_weights(_weights(tmp_path / "ref" / "model_final.pth"),
                         _weights(tmp_path / "run" / "model_final.pth"))


def test_watcher_restores_handlers_and_records_the_first_signal():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatcher() as watcher:
        assert not watcher.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop() and watcher.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _failing_save(iteration_to_fail, code=errno.ENOSPC, as_torch=False):
    """``torch.save`` that fails with ``code`` (ENOSPC, EDQUOT, EIO) for the checkpoint of one
    iteration: as an ``OSError``, or (``as_torch``) as torch's zip writer reports it, a
    ``RuntimeError`` with the ``OSError`` of the file as its context."""
    real_save = torch.save

    def save(obj, f):
        if obj.get("iteration") == iteration_to_fail:
            f.write(b"the first bytes of a checkpoint")
            if not as_torch:
                raise OSError(code, os.strerror(code))
            try:
                raise OSError(code, os.strerror(code))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                   "704 vs 598")
        return real_save(obj, f)

    return save


@pytest.mark.parametrize("code, as_torch", [(errno.ENOSPC, False), (errno.ENOSPC, True),
                                            (errno.EDQUOT, True), (errno.EIO, False)],
                         ids=["ENOSPC", "ENOSPC-torch", "EDQUOT-torch", "EIO"])
def test_failed_checkpoint_write_keeps_the_last_good_one_and_follows_the_policy(
        tmp_path, monkeypatch, soco_log, code, as_torch):
    """Whatever the failed write raises (torch reports a full disk as a RuntimeError from
    inline_container), SOLVER.ON_CHECKPOINT_ERROR decides: continue or stop."""
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(4, code, as_torch))
    reason = os.strerror(code)
    _trainer(toy.toy_cfg(tmp_path / "go", **{"SOLVER.CHECKPOINT_PERIOD": 2})).train()
    out = "\n".join(soco_log)
    assert "Could not write checkpoint" in out and reason in out and "Training continues" in out
    assert (tmp_path / "go" / "last_checkpoint").read_text() == "model_final.pth"
    with pytest.raises(CheckpointWriteError, match=reason):
        _trainer(toy.toy_cfg(tmp_path / "stop", **{"SOLVER.CHECKPOINT_PERIOD": 2,
                                                   "SOLVER.ON_CHECKPOINT_ERROR": "stop"})).train()
    assert (tmp_path / "stop" / "last_checkpoint").read_text() == "model_0000002.pth"


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_failed_metrics_write_follows_the_policy(tmp_path, monkeypatch, soco_log, policy):
    """metrics.json on a full disk or over quota: the run trains on without the rows it could
    not write (never a half-written line), or stops, as SOLVER.ON_CHECKPOINT_ERROR says."""
    from soco_d2.engine import writers

    class OverQuota:
        """The file of metrics.json; the rows of iterations 2 and 3 reach the disk in part."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if bytes(data).startswith((b'{"iteration": 2,', b'{"iteration": 3,')):
                self.f.write(bytes(data)[:7])
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = writers.JSONWriter.__init__

    def init(self, path):
        real_init(self, path)
        self._file = OverQuota(self._file)

    monkeypatch.setattr(writers.JSONWriter, "__init__", init)
    cfg = toy.toy_cfg(tmp_path / policy, **{"SOLVER.ON_CHECKPOINT_ERROR": policy, "LOG_PERIOD": 1})
    metrics = tmp_path / policy / "metrics.json"
    if policy == "stop":
        with pytest.raises(writers.MetricsWriteError, match=f"{metrics}.*Disk quota exceeded"):
            _trainer(cfg).train()
        return
    _trainer(cfg).train()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 4, 5, 6]
    out = "\n".join(soco_log)
    assert out.count("Could not write") == 1 and "Disk quota exceeded" in out
    assert "written again from iteration 4; 2 row(s) before it are missing" in out


def test_disk_full_keeps_the_last_good_checkpoint_and_continues_or_stops(tmp_path, monkeypatch,
                                                                         soco_log):
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(4))
    cfg = toy.toy_cfg(tmp_path / "go", **{"SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.MAX_TO_KEEP": 0})
    _trainer(cfg).train()  # ON_CHECKPOINT_ERROR "continue" (default)
    out = "\n".join(soco_log)
    assert "Could not write checkpoint" in out and "No space left on device" in out
    assert "last_checkpoint still names" in out and "model_0000002.pth" in out
    names = sorted(p.name for p in (tmp_path / "go").iterdir() if "model" in p.name)
    assert names == ["model_0000002.pth", "model_final.pth"]  # no partial file left
    assert (tmp_path / "go" / "last_checkpoint").read_text() == "model_final.pth"

    cfg = toy.toy_cfg(tmp_path / "stop", **{"SOLVER.CHECKPOINT_PERIOD": 2,
                                            "SOLVER.ON_CHECKPOINT_ERROR": "stop"})
    with pytest.raises(CheckpointWriteError) as e:
        _trainer(cfg).train()
    assert "No space left on device" in str(e.value) and "model_0000002.pth" in str(e.value)
    assert (tmp_path / "stop" / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in (tmp_path / "stop").iterdir() if "model" in p.name) == [
        "model_0000002.pth"]
    _weights(tmp_path / "stop" / "model_0000002.pth")  # complete and readable

    # The final checkpoint failing always stops the run (nothing would come after it).
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(6))
    with pytest.raises(CheckpointWriteError, match="model_final.pth"):
        _trainer(toy.toy_cfg(tmp_path / "final")).train()
    assert (tmp_path / "final" / "last_checkpoint").read_text() == "model_0000003.pth"


class SelfKillingDataset(toy.ToyDataset):
    """Its loader worker gets ``sig`` on its ``die_at``-th item: SIGKILL as from the
    out-of-memory killer, SIGBUS as when shared memory runs out."""

    def __init__(self, die_at, sig=signal.SIGKILL):
        super().__init__()
        self.die_at, self.calls, self.sig = die_at, 0, sig

    def __getitem__(self, key):
        if get_worker_info() is None:  # the shared-memory check reads one sample up front
            return super().__getitem__(key)
        self.calls += 1
        if self.calls == self.die_at:
            os.kill(os.getpid(), self.sig)
        return super().__getitem__(key)


def test_killed_loader_worker_names_the_cause_and_the_run_resumes(tmp_path):
    # (the same number of workers: it sets the number of torch threads)
    ref = _trainer(toy.toy_cfg(tmp_path / "ref", **{"DATALOADER.NUM_WORKERS": 1}))
    ref.train()
    cfg = toy.toy_cfg(tmp_path / "run", **{"DATALOADER.NUM_WORKERS": 1})
    # 8 images per step, 2 batches prefetched: the worker dies loading batch 6, after the
    # checkpoint of iteration 3.
    with pytest.raises(DataLoaderWorkerDied) as e:
        _trainer(cfg, dataset=SelfKillingDataset(die_at=44)).train()
    msg = str(e.value)
    assert "out-of-memory" in msg and "DATALOADER.NUM_WORKERS" in msg and "--resume" in msg
    marker = tmp_path / "run" / "last_checkpoint"  # model_0000003.pth unless the machine lags
    assert (marker.read_text() if marker.exists() else "No checkpoint was written yet") in msg
    resumed = _trainer(toy.toy_cfg(tmp_path / "run", **{"DATALOADER.NUM_WORKERS": 1}))
    resumed.resume_or_load(resume=True)
    resumed.train()
    _assert_same_weights(_weights(tmp_path / "ref" / "model_final.pth"),
                         _weights(tmp_path / "run" / "model_final.pth"))


def test_after_a_worker_died_the_loader_workers_are_stopped_and_unregistered(tmp_path):
    """The loader's iterator outlives the failed run (the exception holds its frames): its
    workers must be joined and unregistered from torch's SIGCHLD handler when train() ends,
    or a later SIGCHLD raises the worker's death again wherever the process is then."""
    trainer = _trainer(toy.toy_cfg(tmp_path, **{"DATALOADER.NUM_WORKERS": 1}),
                       dataset=SelfKillingDataset(die_at=10))
    built = []
    build = trainer.build_train_loader
    trainer.build_train_loader = lambda: built.append(build()) or built[-1]
    with pytest.raises(DataLoaderWorkerDied):
        trainer.train()
    it = built[0].dataloader_iter
    assert not it._worker_pids_set  # what torch's SIGCHLD handler checks
    assert all(w.exitcode is not None for w in it._workers)  # joined (reaped)


def test_bus_error_in_a_loader_worker_points_to_shared_memory(tmp_path):
    cfg = toy.toy_cfg(tmp_path, **{"DATALOADER.NUM_WORKERS": 1})
    with pytest.raises(DataLoaderWorkerDied) as e:
        _trainer(cfg, dataset=SelfKillingDataset(die_at=10, sig=signal.SIGBUS)).train()
    msg = str(e.value)
    assert "SIGBUS" in msg and "/dev/shm" in msg and "--shm-size" in msg and "--ipc=host" in msg
    assert "out-of-memory killer" not in msg and "--resume" in msg


def _wait_in_worker(ready):
    from soco_d2.engine.preemption import ignore_preemption_signals

    ignore_preemption_signals()
    ready.set()
    import time

    time.sleep(120)


def test_a_worker_ignores_the_jobs_signals_but_its_parent_can_end_it():
    """SIGTERM / SIGUSR1 from another process (a scheduler signalling the job) leave a loader
    worker running; its parent's SIGTERM (torch's shutdown, Python's exit handlers) ends it."""
    import multiprocessing
    import subprocess

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_wait_in_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(60)
        for sig in ("TERM", "USR1"):
            subprocess.run([sys.executable, "-c",
                            f"import os, signal; os.kill({worker.pid}, signal.SIG{sig})"],
                           check=True, timeout=60)
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()
        worker.join(30)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
