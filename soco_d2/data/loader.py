"""The pretraining data loader: an endless iterator of per-process micro-batches."""
import logging
import os

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from soco_d2.utils import comm

from .samplers import ResumableInfiniteSampler


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: the worker leaves SIGTERM / SIGUSR1 to the training
    process (see :mod:`soco_d2.engine.preemption`)."""
    from soco_d2.engine.preemption import ignore_preemption_signals  # the engine imports this module
    from soco_d2.engine.watchdog import dump_stacks_on_request

    ignore_preemption_signals(worker_id)
    dump_stacks_on_request()

__all__ = ["per_process_batch_size", "build_pretrain_loader", "usable_num_workers",
           "loader_worker_init"]

logger = logging.getLogger(__name__)
_capped_logged = set()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), shared by the processes of the machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, comm.get_local_world_size()))


def usable_num_workers(requested: int) -> int:
    """``DATALOADER.NUM_WORKERS`` capped to :func:`usable_cores` (more workers than cores only
    compete for them; torch warns that the loader may freeze). Logs the cap once per process.
    The data stream does not depend on the number of workers, so capping changes no result."""
    requested = max(0, int(requested))
    cores = usable_cores()
    if requested <= cores:
        return requested
    if (requested, cores) not in _capped_logged:
        _capped_logged.add((requested, cores))
        logger.info("DATALOADER.NUM_WORKERS %d is more than the %d usable core(s) of this process; "
                    "using %d loader workers.", requested, cores, cores)
    return cores


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
        generator=generator,
        worker_init_fn=loader_worker_init,
    )
    return iter(loader)
