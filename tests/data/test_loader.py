import collections
import os
import signal

import pytest
import torch

from soco_d2.data import loader


def test_workers_are_capped_to_the_usable_cores_with_one_log_line(monkeypatch, soco_log):
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(loader.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(loader, "_capped_logged", set())
    assert loader.usable_num_workers(8) == 2
    assert loader.usable_num_workers(8) == 2
    assert loader.usable_num_workers(2) == 2 and loader.usable_num_workers(0) == 0
    assert soco_log == ["DATALOADER.NUM_WORKERS 8 is more than the 2 core(s) this process may use "
                        "(its CPU affinity covers all 2 CPUs of the machine, shared by 1 "
                        "process(es)); using 2 loader worker(s)."]
    # Cores are shared by the processes of the machine.
    monkeypatch.setattr(loader.comm, "get_local_world_size", lambda: 2)
    assert loader.usable_num_workers(8) == 1


@pytest.mark.parametrize("affinity, machine, processes, workers", [
    (12, 96, 8, 8),   # SLURM binds 12 CPUs to each of 8 tasks: the affinity is this task's own
    (96, 96, 8, 8),   # no binding: 96 CPUs shared by 8 processes, 12 each
    (64, 64, 8, 8),   # 8 each
    (48, 48, 8, 6),   # 6 each: capped
    (4, 96, 1, 4),    # taskset -c 0-3 on one process
])
def test_workers_under_cpu_binding(monkeypatch, soco_log, affinity, machine, processes, workers):
    from soco_d2.engine.run_setup import configure_cpu_threads

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(affinity)),
                        raising=False)
    monkeypatch.setattr(loader.os, "cpu_count", lambda: machine)
    monkeypatch.setattr(loader.comm, "get_local_world_size", lambda: processes)
    monkeypatch.setattr(loader, "_capped_logged", set())
    assert loader.usable_num_workers(8) == workers
    if workers < 8:
        (line,) = soco_log
        assert f"DATALOADER.NUM_WORKERS 8 is more than the {workers} core(s)" in line
        assert (f"its CPU affinity: {affinity} of the machine's {machine} CPUs" in line
                if affinity < machine else f"all {machine} CPUs of the machine, shared by "
                f"{processes} process(es)" in line)
    else:
        assert soco_log == []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:  # a CPU run's torch threads: the same cores, less the workers
        assert configure_cpu_threads(workers, processes) == max(1, loader.usable_cores() - workers)
    finally:
        torch.set_num_threads(before)


def test_a_worker_cap_is_logged_as_a_warning(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(loader.os, "cpu_count", lambda: 96)
    monkeypatch.setattr(loader, "_capped_logged", set())
    with caplog.at_level(logging.INFO, logger="soco_d2"):
        assert loader.usable_num_workers(8) == 3
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "its CPU affinity: 3 of the machine's 96 CPUs" in record.getMessage()


class _Images:
    """Samples of 3 x 100 x 100 uint8 (30000 bytes), keyed like the pretraining datasets."""

    def __len__(self):
        return 16

    def __getitem__(self, key):
        index, seed = key
        return {"image": torch.full((3, 100, 100), index, dtype=torch.uint8), "num_skipped": 0}


def _shm_cfg(mode):
    from soco_d2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.DATALOADER.SHM_CHECK = mode
    return cfg


@pytest.fixture
def small_shm(monkeypatch, tmp_path):
    """A /dev/shm of 64 MB with 100 kB free; 2 usable cores."""
    monkeypatch.setattr(loader, "SHM_PATH", str(tmp_path))
    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 100_000}
    monkeypatch.setattr(loader.shutil, "disk_usage",
                        lambda path: usage(64 * 2**20, 64 * 2**20 - free["bytes"], free["bytes"]))
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return free


def test_too_small_shared_memory_is_reported_before_the_first_step(small_shm, soco_log):
    # 4 images x 30000 bytes x 2 workers x 2 prefetched x 1 process x 1.25 margin
    with pytest.raises(loader.SharedMemoryTooSmall) as e:
        loader.build_pretrain_loader(_shm_cfg("error"), _Images())
    text = str(e.value)
    assert "need about 600000 bytes" in text and "100000 bytes free" in text
    assert "--shm-size=1g" in text and "--ipc=host" in text and "bus error" in text
    assert "DATALOADER.SHM_CHECK warn" in text
    batches = loader.build_pretrain_loader(_shm_cfg("warn"), _Images())
    assert next(batches)["image"].shape == (4, 3, 100, 100)
    del batches
    assert sum("need about 600000 bytes" in m for m in soco_log) == 1
    small_shm["bytes"] = 600_000  # enough: no message
    del soco_log[:]
    loader.build_pretrain_loader(_shm_cfg("error"), _Images())
    assert not any("shared memory" in m for m in soco_log)
    with pytest.raises(ValueError, match="DATALOADER.SHM_CHECK must be one of"):
        loader.build_pretrain_loader(_shm_cfg("maybe"), _Images())


def test_the_shared_memory_check_reads_its_sample_without_opencv_threads(small_shm, monkeypatch):
    """The check decodes one sample in the training process before the workers are forked: with
    OpenCV's thread pool started there, a forked worker's cv2.setNumThreads(1) waits forever."""
    import cv2

    seen = []

    class Decoding(_Images):
        def __getitem__(self, key):
            seen.append(cv2.getNumThreads())
            return super().__getitem__(key)

    small_shm["bytes"] = 10**9
    monkeypatch.setattr(cv2, "setNumThreads", lambda n, real=cv2.setNumThreads: (seen.append(("set", n)), real(n)))
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        loader.build_pretrain_loader(_shm_cfg("error"), Decoding())
        assert seen[-1] == 1 and ("set", 1) in seen  # single-threaded while it read
    finally:
        cv2.setNumThreads(before)



def test_stopping_the_workers_after_one_died_unregisters_them():
    """A worker that died stays registered with torch's SIGCHLD handler until its iterator is
    shut down; when the loader reports the death first (a broken pipe, a timeout) and the
    worker's SIGCHLD comes later, the handler raises it again wherever the process is then.
    stop_loader_workers joins the workers and unregisters them."""
    it = iter(torch.utils.data.DataLoader(range(64), num_workers=1, persistent_workers=True))
    next(it)
    torch_handler = signal.getsignal(signal.SIGCHLD)
    pid = it._workers[0].pid
    held = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: held.append(signum))
    try:  # the worker dies; its SIGCHLD is held back
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
    finally:
        signal.signal(signal.SIGCHLD, torch_handler)
    loader.stop_loader_workers(it)
    torch_handler(signal.SIGCHLD, None)  # the late SIGCHLD: nothing raised
    assert it._workers[0].exitcode == -signal.SIGKILL
    loader.stop_loader_workers(it)  # again: nothing to do
