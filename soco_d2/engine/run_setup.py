"""The start of every run, pretraining or fine-tuning (:func:`setup_run`), and the helpers it
and the trainers use: seeds, the device, torch threads of a CPU run, moving batches."""
import logging
import os
import random

import numpy as np
import torch

from soco_d2.config import ConfigError
from soco_d2.data.loader import usable_cores, usable_num_workers
from soco_d2.utils import comm
from soco_d2.utils.env import write_run_record

from .checkpoint import atomic_write_text
from .launch import cuda_device_index
from .output_dir import lock_output_dir
from .writers import check_writers, setup_logging

__all__ = ["setup_run", "seed_all", "resolve_device", "move_to_device", "check_cpu_run",
           "configure_cpu_threads"]

logger = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_cpu_threads(num_workers: int, processes_per_machine: int) -> int:
    """Give the training process of a CPU run the cores its loader workers do not use.

    Each process gets its cores (:func:`~soco_d2.data.loader.usable_cores`: its CPU affinity
    when a scheduler bound it, else the machine's CPUs divided by ``processes_per_machine``)
    less ``num_workers`` as torch threads (at least one), unless ``OMP_NUM_THREADS`` says
    otherwise. Without this, torch's default (one thread per core) in every process competes
    with the loader workers for the same cores, and OpenMP's spinning threads can make each
    step many times slower.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, usable_cores(processes_per_machine) - max(0, num_workers))
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """``MODEL.DEVICE`` as a device; ``cuda`` becomes this process's GPU
    (:func:`~soco_d2.engine.launch.cuda_device_index` of its local rank)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"MODEL.DEVICE is {name!r} but no CUDA GPU is visible; set MODEL.DEVICE cpu."
            )
        if device.index is None:
            device = torch.device("cuda", cuda_device_index(comm.get_local_rank(),
                                                            comm.get_local_world_size()))
    return device


def move_to_device(obj, device: torch.device, channels_last: bool = False):
    """Copy the tensors of a nested dict / list / tuple to ``device`` (non-blocking)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, channels_last) for v in obj)
    return obj


def check_cpu_run(cfg) -> None:
    """On a machine without a GPU, a config written for GPUs fails here once, naming every key a
    CPU run needs (not one error per attempt)."""
    if torch.cuda.is_available() or torch.device(cfg.MODEL.DEVICE).type != "cuda":
        return
    fixes = ["MODEL.DEVICE cpu"]
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE == "float16":
        fixes.append("SOLVER.AMP.ENABLED False")
    raise ConfigError(
        f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA GPU is visible. To run on this CPU, add "
        f"{' '.join(fixes)} to the command line, or start from a CPU config: "
        "configs/benchmark/soco_r18_learning_cpu.yaml, configs/benchmark/detco_r18_learning_cpu.yaml "
        "(pretraining), configs/demo/ (the quick-start demo's)."
    )


def setup_run(cfg) -> torch.device:
    """The start of every run (pretraining or fine-tuning) in each process: logging, seeds,
    device (cuDNN autotuning on GPU, torch threads on CPU), the AMP check and, on the main
    process, ``OUTPUT_DIR/config.yaml`` and ``OUTPUT_DIR/env.json`` (see
    :func:`~soco_d2.utils.env.write_run_record`); the main process holds the lock of
    ``OUTPUT_DIR`` (one run per folder, :mod:`soco_d2.engine.output_dir`). Returns the device."""
    setup_logging(cfg.OUTPUT_DIR)
    check_writers(cfg)  # an optional writer enabled without its package: fail now, not later
    if comm.is_main_process():
        lock_output_dir(cfg.OUTPUT_DIR)
    seed_all(cfg.SEED + comm.get_rank())
    check_cpu_run(cfg)
    device = resolve_device(cfg.MODEL.DEVICE)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    else:
        threads = configure_cpu_threads(usable_num_workers(cfg.DATALOADER.NUM_WORKERS),
                                        comm.get_local_world_size())
        logger.info("CPU run: %d torch thread(s) per process.", threads)
    amp = cfg.SOLVER.AMP
    if amp.ENABLED and amp.DTYPE == "float16" and device.type != "cuda":
        raise ValueError("SOLVER.AMP.DTYPE float16 needs a CUDA device; on a CPU set "
                         "SOLVER.AMP.ENABLED False (or SOLVER.AMP.DTYPE bfloat16).")
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
        write_run_record(cfg.OUTPUT_DIR, cfg.dump())  # env.json, logged with the full config
    return device
