"""The pretraining data loader: an endless iterator of per-process micro-batches."""
import logging
import os
import random
import shutil
import signal
import threading
from typing import Optional, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from soco_d2.utils import comm
from soco_d2.utils.signals import ignore_preemption_signals

from .samplers import ResumableInfiniteSampler


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: the worker leaves SIGTERM / SIGUSR1 to the training
    process (see :mod:`soco_d2.engine.preemption`)."""
    from soco_d2.utils.watchdog import dump_stacks_on_request

    ignore_preemption_signals(worker_id)
    dump_stacks_on_request()

__all__ = ["per_process_batch_size", "build_pretrain_loader", "PretrainBatches", "usable_num_workers",
           "loader_worker_init", "check_shared_memory", "SharedMemoryTooSmall",
           "stop_loader_workers"]

logger = logging.getLogger(__name__)
_capped_logged = set()


def _core_share(processes: Optional[int] = None) -> Tuple[int, str]:
    """(cores this process may use, how that was worked out)."""
    procs = max(1, comm.get_local_world_size() if processes is None else processes)
    machine = os.cpu_count() or 1
    if not hasattr(os, "sched_getaffinity"):
        return max(1, machine // procs), f"{machine} CPUs shared by {procs} process(es)"
    affinity = len(os.sched_getaffinity(0))
    if affinity < machine:
        return affinity, f"its CPU affinity: {affinity} of the machine's {machine} CPUs"
    return max(1, affinity // procs), (f"its CPU affinity covers all {machine} CPUs of the "
                                       f"machine, shared by {procs} process(es)")


def usable_cores(processes: Optional[int] = None) -> int:
    """Cores this process may use. A CPU affinity smaller than the machine is this process's own
    share (a scheduler that binds each task, e.g. SLURM's ``--cpus-per-task`` with CPU binding,
    or ``taskset``); an affinity that covers the whole machine is shared by the ``processes`` of
    the machine (default: the local world size) and divided among them."""
    return _core_share(processes)[0]


def usable_num_workers(requested: int) -> int:
    """``DATALOADER.NUM_WORKERS`` capped to :func:`usable_cores` (more workers than cores only
    compete for them; torch warns that the loader may freeze). A cap is logged once per process
    at WARNING, with the numbers. The data stream does not depend on the number of workers, so
    capping changes no result."""
    requested = max(0, int(requested))
    cores, how = _core_share()
    if requested <= cores:
        return requested
    if (requested, cores) not in _capped_logged:
        _capped_logged.add((requested, cores))
        logger.warning("DATALOADER.NUM_WORKERS %d is more than the %d core(s) this process may "
                       "use (%s); using %d loader worker(s).", requested, cores, how, cores)
    return cores


SHM_PATH = "/dev/shm"
SHM_MARGIN = 1.25  # batches of other sizes, the pin-memory copy in flight, other users of /dev/shm
SHM_CHECKS = ("error", "warn", "off")


def _shm_check_mode(mode: str) -> str:
    if mode not in SHM_CHECKS:
        raise ValueError(f"DATALOADER.SHM_CHECK must be one of {SHM_CHECKS}, got {mode!r}.")
    return mode


class SharedMemoryTooSmall(RuntimeError):
    """``/dev/shm`` cannot hold the batches the loader workers hand over
    (``DATALOADER.SHM_CHECK``)."""


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def check_shared_memory(batch_bytes: int, num_workers: int, prefetch_factor: int, mode: str,
                        path: Optional[str] = None) -> int:
    """Compare the shared memory the loader workers of this machine need (``batch_bytes`` x
    ``num_workers`` x ``prefetch_factor`` x processes per machine x :data:`SHM_MARGIN`) with the
    free space of ``path`` (default :data:`SHM_PATH`). ``mode`` (``DATALOADER.SHM_CHECK``):
    ``"error"`` raises :class:`SharedMemoryTooSmall` when it is short, ``"warn"`` logs the same
    message, ``"off"`` skips. Returns the bytes needed (0 when nothing was checked)."""
    path = path or SHM_PATH
    if _shm_check_mode(mode) == "off" or num_workers == 0 or not os.path.isdir(path):
        return 0
    procs = comm.get_local_world_size()
    needed = int(batch_bytes * num_workers * prefetch_factor * procs * SHM_MARGIN)
    usage = shutil.disk_usage(path)
    if usage.free >= needed:
        return needed
    gib = 2**30
    size = max(1, -(-needed // gib))
    text = (f"{path} has {usage.free} bytes free ({usage.free / gib:.2f} GiB; {usage.total} in "
            f"all) but the data-loader workers of this machine need about {needed} bytes "
            f"({needed / gib:.2f} GiB) of shared memory: {batch_bytes} bytes per batch x "
            f"{num_workers} workers x {prefetch_factor} prefetched x {procs} process(es) x "
            f"{SHM_MARGIN} margin. Without it the workers die with a bus error. In a container "
            f"start it with --shm-size={size}g (or --ipc=host); or lower DATALOADER.NUM_WORKERS or "
            f"the images per process (SOLVER.IMS_PER_BATCH). DATALOADER.SHM_CHECK warn trains "
            f"anyway.")
    if mode == "error":
        raise SharedMemoryTooSmall(text)
    logger.warning(text)
    return needed


def _batch_bytes(dataset, key, batch_size: int) -> int:
    """Bytes of a batch of ``batch_size`` samples like ``dataset[key]`` (read here, in this
    process, with the global random states restored afterwards: they are part of an exact
    resume)."""
    states = random.getstate(), np.random.get_state()
    # OpenCV's thread pool must not start in this process before the loader forks its workers:
    # a forked worker's first cv2.setNumThreads(1) (PretrainDataset) would wait forever for the
    # pool's threads, which the fork did not copy. The training process decodes no images
    # once the workers do, so it stays single-threaded in OpenCV.
    cv2.setNumThreads(1)
    with torch.random.fork_rng(devices=[]):
        sample = dataset[key]
    random.setstate(states[0])
    np.random.set_state(states[1])
    return _nbytes(sample) * batch_size


def per_process_batch_size(cfg, world_size: int) -> int:
    """``IMS_PER_BATCH // world_size // GRAD_ACCUM_STEPS`` (must divide exactly)."""
    total, accum = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.GRAD_ACCUM_STEPS
    if total % (world_size * accum) != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} must be divisible by the number of processes "
            f"({world_size}) times SOLVER.GRAD_ACCUM_STEPS ({accum}); pick a multiple of "
            f"{world_size * accum}."
        )
    return total // (world_size * accum)


def build_pretrain_loader(cfg, dataset, start_iter: int = 0):
    """An infinite iterator over batches of ``dataset`` for this process.

    Each optimizer step consumes ``IMS_PER_BATCH`` positions of the global sample stream
    (``GRAD_ACCUM_STEPS`` micro-batches per process), so the loader of a run resumed at
    ``start_iter`` starts at position ``start_iter * IMS_PER_BATCH``.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    batch_size = per_process_batch_size(cfg, world)
    sampler = ResumableInfiniteSampler(
        len(dataset), seed=cfg.SEED, rank=rank, world_size=world, shuffle=True,
        start_position=start_iter * cfg.SOLVER.IMS_PER_BATCH,
    )
    num_workers = usable_num_workers(cfg.DATALOADER.NUM_WORKERS)
    prefetch_factor = 2  # DataLoader's default, named here for the shared-memory check
    if num_workers > 0 and _shm_check_mode(cfg.DATALOADER.SHM_CHECK) != "off":
        check_shared_memory(_batch_bytes(dataset, next(iter(sampler)), batch_size), num_workers,
                            prefetch_factor, cfg.DATALOADER.SHM_CHECK)
    # A private generator: creating the iterator must not consume the global torch RNG, whose
    # state is part of an exact resume. (Sample randomness comes from the sampler's seeds.)
    generator = torch.Generator().manual_seed(cfg.SEED + rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=default_collate,
        pin_memory=str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=generator,
        worker_init_fn=loader_worker_init,
    )
    return PretrainBatches(iter(loader), dataset)


class PretrainBatches:
    """The batches of a DataLoader iterator (``dataloader_iter``, which holds the workers),
    unchanged. The first time a batch skipped an image and the dataset has skipped some for
    their size (:meth:`~soco_d2.data.dataset.PretrainDataset.size_change_summary`), one line is
    logged here, in the training process: the workers cannot, several could find such images at
    once."""

    def __init__(self, dataloader_iter, dataset):
        self.dataloader_iter = dataloader_iter
        self._summary = getattr(dataset, "size_change_summary", None)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.dataloader_iter)
        if self._summary is not None and isinstance(batch, dict) and "num_skipped" in batch \
                and int(torch.as_tensor(batch["num_skipped"]).sum()):
            line = self._summary()
            if line:
                logger.warning(line)
                self._summary = None
        return batch


def stop_loader_workers(batches) -> None:
    """Stop the worker processes of a training loader now: ``batches`` is a DataLoader iterator
    or a :class:`PretrainBatches`. The workers are joined and unregistered from torch's SIGCHLD
    handler, which otherwise reports a worker that died as a ``RuntimeError`` raised wherever
    the main thread is at the next SIGCHLD, for as long as the iterator lives (after a failed
    run: as long as its exception holds the loader's frames), e.g. while the next trainer of
    the process is being built. Calling it again does nothing."""
    it = getattr(batches, "dataloader_iter", batches)
    # torch shuts an iterator's workers down only from its __del__ (or at the end of an epoch,
    # which an endless sampler never reaches); _shutdown_workers is that step, called now.
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:  # no worker processes (DATALOADER.NUM_WORKERS 0)
        return
    if threading.current_thread() is not threading.main_thread():
        shutdown()
        return
    # A SIGCHLD during the shutdown (a worker that dies or exits now) is handled after it, when
    # this iterator's workers are no longer registered: torch's handler would otherwise raise
    # in the middle of the shutdown and could leave them registered.
    caught = []
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: caught.append(frame))
    try:
        shutdown()
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)
    if caught and callable(previous):
        previous(signal.SIGCHLD, caught[0])  # other loaders' workers are still watched
