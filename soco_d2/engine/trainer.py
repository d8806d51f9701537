"""The pretraining loop shared by SoCo and DetCo.

One iteration ``it``: ``model.momentum_update(m)`` (the target network's EMA step, before the
forward, as the official SoCo and MoCo code); set the scheduled learning rate;
``GRAD_ACCUM_STEPS`` micro-batches (forward under autocast when AMP is on, backward of the summed
``loss*`` entries; DDP gradient sync only on the last one); optional gradient clipping; optimizer
step. ``m = momentum_at(it)``, iteration ``it``'s value of the
scheduled EMA momentum. Losses stay on the device and are checked / averaged over processes once
per log period and before every checkpoint, so the loop does not wait for the GPU each step.

After every step the loop asks the :class:`~soco_d2.engine.preemption.PreemptionWatcher`
whether a process received SIGTERM / SIGUSR1 / SIGINT; if so it writes a checkpoint and exits with
``PREEMPTED_EXIT_CODE`` (see :mod:`soco_d2.engine.preemption` and docs/TRAINING.md).
"""
import collections
import inspect
import logging
import os
import random
import statistics
import time
from contextlib import nullcontext
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from soco_d2.config import ConfigError
from soco_d2.data.loader import build_pretrain_loader, usable_cores, usable_num_workers
from soco_d2.modeling.sync_bn import convert_sync_batchnorm
from soco_d2.utils import comm
from soco_d2.utils.env import write_run_record
from soco_d2.utils.watchdog import Watchdog, beat

from .checkpoint import Checkpointer, CheckpointWriteError, atomic_write_text
from .launch import cuda_device_index
from .monitors import Monitors
from .preemption import Preempted, PreemptionWatcher, explain_worker_death, requeue_slurm_job
from .optimizer import build_optimizer
from .output_dir import lock_output_dir
from .schedules import build_lr_schedule, build_momentum_schedule, max_iter_from_cfg
from .writers import build_writers, check_writers, setup_logging, writers_state

__all__ = ["PretrainTrainer", "seed_all", "resolve_device", "move_to_device", "NonFiniteLossGuard",
           "check_cpu_run"]

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


def _no_buffer_broadcast() -> Dict:
    """DDP option that keeps buffers (BN statistics, queues) process-local during training:
    ``forward_sync_buffers=False`` in recent torch, ``broadcast_buffers=False`` before (which,
    unlike the former, does not sync them at construction either: the trainer does that with
    :func:`~soco_d2.utils.comm.broadcast_buffers`)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def save_checkpoint(cfg, checkpointer: Checkpointer, name: str, iteration: int,
                    final: bool = False, **extra) -> bool:
    """``checkpointer.save`` with the policy of ``SOLVER.ON_CHECKPOINT_ERROR`` for a failed write:
    ``continue`` logs the error and trains on (the previous checkpoint stays the last one),
    ``stop`` raises. The final and the preemption checkpoints (``final``) always raise, since
    nothing comes after them. Returns whether the checkpoint was written."""
    beat(f"the checkpoint {name}")
    try:
        checkpointer.save(name, iteration, config=cfg.dump(), **extra)
        beat()
        return True
    except CheckpointWriteError as e:
        if final or cfg.SOLVER.ON_CHECKPOINT_ERROR == "stop":
            raise
        logger.error("%s Training continues (SOLVER.ON_CHECKPOINT_ERROR continue); the next "
                     "checkpoint is tried as usual.", e)
        return False


def stop_for_preemption(cfg, watcher: PreemptionWatcher, save, done: int, max_iter: int):
    """Write the preemption checkpoint with ``save(name, done)``, requeue the SLURM job when
    ``REQUEUE_ON_PREEMPTION`` says so, and raise :class:`Preempted` (every process)."""
    name = f"model_{done:07d}.pth"
    save(name, done)
    path = os.path.join(cfg.OUTPUT_DIR, name)
    logger.warning("%s received: stopped after iteration %d of %d and saved %s. Continue with "
                   "--resume (exit code %d).", watcher.signal_name or "Preemption signal", done,
                   max_iter, path, Preempted().code)
    if cfg.REQUEUE_ON_PREEMPTION:
        requeue_slurm_job()
    raise Preempted(f"preempted after iteration {done}; resume from {path}")


class NonFiniteLossGuard:
    """Stops a run on non-finite losses, read at each metrics flush (no host sync per step).

    Without a gradient scaler (fp32, bfloat16) the step of a non-finite loss was applied to the
    weights: the first one stops the run. With float16's ``GradScaler`` a non-finite loss makes
    non-finite gradients; the scaler skips that step and lowers the loss scale (apex O1, which the
    SoCo recipe reproduces, does the same) and the run continues, until
    ``SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE`` consecutive iterations had one. (A non-finite loss
    whose gradients are finite, which the scaler does not skip, leaves the weights finite too.)
    The count of consecutive iterations carries over from one flush to the next.
    """

    def __init__(self, cfg, scaler: torch.amp.GradScaler, hint: str):
        limit = cfg.SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE
        if int(limit) != limit or limit < 1:
            raise ValueError(f"SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE must be an integer >= 1 "
                             f"(got {limit!r}); 1 stops at the first non-finite loss.")
        self.scaler = scaler
        self.limit = int(limit) if scaler.is_enabled() else 1
        self.hint = hint
        self.run = 0  # consecutive iterations with a non-finite loss, up to the last flush

    def check(self, rows: torch.Tensor, names: List[str], iterations: List[int], max_iter: int,
              last_checkpoint) -> torch.Tensor:
        """``rows``: (iterations, len(names)) values on the CPU, averaged over processes;
        ``iterations``: their 0-based iteration numbers. Raises ``FloatingPointError`` naming
        the iteration where the limit is reached; else returns the mask of the finite rows (and
        logs the skipped ones). ``last_checkpoint()``: the path to name in the error."""
        cols = [i for i, k in enumerate(names) if k.startswith("loss") or k == "total_loss"]
        finite = torch.isfinite(rows[:, cols]).all(dim=1)
        for row, ok in enumerate(finite.tolist()):
            self.run = 0 if ok else self.run + 1
            if self.run < self.limit:
                continue
            terms = ", ".join(f"{names[i]}={rows[row, i].item():.4g}" for i in cols)
            last = last_checkpoint()
            streak = ("" if self.limit == 1 else
                      f" The {self.limit} iterations up to this one all had a non-finite loss "
                      f"(SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE {self.limit}); the gradient "
                      f"scaler skipped their steps.")
            raise FloatingPointError(
                f"Non-finite loss in iteration {iterations[row] + 1} of {max_iter} (averaged over "
                f"processes): {terms}.{streak} Stopping; no checkpoint of this state was "
                f"written, the last good one is {last or 'none (no checkpoint yet)'}. {self.hint}"
            )
        if not bool(finite.all()):
            bad = [iterations[r] + 1 for r in (~finite).nonzero().flatten().tolist()]
            logger.warning(
                "Non-finite loss in iteration(s) %s: the float16 gradient scaler skipped those "
                "steps (loss scale now %g); training continues. %d consecutive iterations with a "
                "non-finite loss stop the run (SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE).",
                ", ".join(map(str, bad)), self.scaler.get_scale(), self.limit)
        return finite


class PretrainTrainer:
    """Builds everything from ``cfg`` (or takes ``model`` / ``dataset``) and trains.

    Typical use::

        trainer = PretrainTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
    """

    def __init__(self, cfg, model: nn.Module = None, dataset=None):
        self.cfg = cfg
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.device = setup_run(cfg)
        s = cfg.SOLVER

        if model is None:
            from soco_d2.modeling import build_model

            model = build_model(cfg)
        model = model.to(self.device)
        if cfg.CHANNELS_LAST:
            model = model.to(memory_format=torch.channels_last)
        if self.world_size > 1:
            if getattr(model, "sync_batchnorm", True):  # a model may keep per-process BN (MoCo)
                model = convert_sync_batchnorm(model, self.device)
            # Every process starts from process 0's buffers, as MoCo's (DetCo's queues are drawn
            # from the per-process seed) and as the checkpoint, which keeps process 0's.
            comm.broadcast_buffers(model)
            model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
                **_no_buffer_broadcast(),
            )
        self.model = model

        if dataset is None:
            from soco_d2.data.dataset import build_pretrain_dataset

            dataset = build_pretrain_dataset(cfg)
        self.dataset = dataset
        self.max_iter = max_iter_from_cfg(cfg, len(dataset))
        self.optimizer = build_optimizer(cfg, _unwrap(model))
        self.lr_schedule = build_lr_schedule(cfg, self.max_iter)
        self.momentum_schedule = build_momentum_schedule(cfg, self.max_iter)
        self.amp_dtype = torch.bfloat16 if s.AMP.DTYPE == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=s.AMP.ENABLED and s.AMP.DTYPE == "float16"
        )
        self.nonfinite = NonFiniteLossGuard(
            cfg, self.scaler, "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRAD_NORM or switch "
            "SOLVER.AMP.DTYPE.")
        self.checkpointer = Checkpointer(_unwrap(model), cfg.OUTPUT_DIR, self.optimizer,
                                         self.scaler, max_to_keep=s.MAX_TO_KEEP, config=cfg.dump())
        self._unreadable = set()  # indices of images found unreadable by any process
        self.start_iter = 0
        self.iter = 0
        self.num_skipped_total = 0  # over all processes, since the start of the run
        self.num_samples_total = 0
        self._window: List[Dict] = []
        self._iter_times = collections.deque(maxlen=200)
        self._loss_names: List[str] = []
        self.monitors = Monitors(cfg, self)  # kNN probe / health (MONITOR.*), checks its settings

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from ``OUTPUT_DIR/last_checkpoint`` when ``resume`` and it exists; otherwise
        load ``MODEL.WEIGHTS`` (model only) when set; otherwise start fresh."""
        data = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume)
        self.start_iter = int(data.get("iteration", 0))
        self.num_skipped_total = int(data.get("num_skipped_total", 0))
        self.num_samples_total = int(data.get("num_samples_total", 0))
        self._writers_state = data.get("writers", {})  # the W&B run to continue
        images = getattr(self.dataset, "images", None)
        if images is not None and hasattr(self.dataset, "mark_unreadable"):
            known = [images.index_of(k) for k in data.get("unreadable_images", []) if k in images]
            self.dataset.mark_unreadable(known)
            self._unreadable.update(known)
        if self.start_iter:
            logger.info("Continuing at iteration %d of %d.", self.start_iter, self.max_iter)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        logger.info("Training %d iterations from iteration %d, %d process(es), %d images per step.",
                    self.max_iter, self.start_iter, self.world_size, cfg.SOLVER.IMS_PER_BATCH)
        self.writers = build_writers(cfg.OUTPUT_DIR, self.max_iter, cfg,
                                     getattr(self, "_writers_state", {}))
        self.model.train()
        try:
            # (the loader's workers start here: a worker that dies at once is explained too)
            # (outside the watcher: torch may report the worker's death again, from its SIGCHLD
            # handler, while the watcher restores the signal handlers)
            with explain_worker_death(self.checkpointer.last_checkpoint), \
                    PreemptionWatcher() as watcher, \
                    Watchdog(cfg.SOLVER.WATCHDOG_TIMEOUT, "SOLVER.WATCHDOG_TIMEOUT"):
                self._data = build_pretrain_loader(cfg, self.dataset, self.start_iter)
                self.monitors.before_train()
                for it in range(self.start_iter, self.max_iter):
                    self.iter = it
                    self.run_step(it)
                    done = it + 1
                    beat(f"iteration {done + 1}")
                    self.monitors.after_step(done)
                    is_ckpt = cfg.SOLVER.CHECKPOINT_PERIOD > 0 and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0
                    if (done % cfg.LOG_PERIOD == 0 or is_ckpt or done == self.max_iter
                            or self.monitors.pending):
                        self._flush_metrics(done)
                    if is_ckpt and done < self.max_iter:
                        self._save(f"model_{done:07d}.pth", done)
                    if done < self.max_iter and watcher.should_stop():
                        self._flush_metrics(done)
                        stop_for_preemption(cfg, watcher, lambda n, i: self._save(n, i, final=True),
                                            done, self.max_iter)
                if self.start_iter < self.max_iter or not os.path.exists(
                    os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
                ):
                    self._save("model_final.pth", self.max_iter, final=True)
        finally:
            self._data = None  # stops the loader's worker processes (first: see below)
            # A loader worker that died can still be reported (SIGCHLD) while closing up.
            with explain_worker_death(self.checkpointer.last_checkpoint):
                self.monitors.close()  # first: the writers upload its plot (W&B)
                for w in self.writers:
                    w.close()
        # Every process leaves its last collective before any of them tears the group down.
        comm.synchronize()

    def run_step(self, it: int) -> None:
        cfg, s = self.cfg, self.cfg.SOLVER
        t0 = time.perf_counter()
        # The official order (SoCo_FPN.forward, MoCo's builder): the target moves by EMA at the
        # start of every iteration, the first included, with the momentum of that iteration,
        # m(it), and the online weights of the previous optimizer step. A checkpoint written
        # after iteration it - 1 holds the target before this update; a resumed run makes it.
        momentum = self.momentum_schedule.momentum_at(it)
        _unwrap(self.model).momentum_update(momentum)
        lr = self.lr_schedule.lr_at(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        accum = s.GRAD_ACCUM_STEPS
        data_time, skipped, samples = 0.0, 0, 0
        summed: Dict[str, torch.Tensor] = {}
        for j in range(accum):
            td = time.perf_counter()
            batch = next(self._data)
            data_time += time.perf_counter() - td
            if isinstance(batch, dict) and "num_skipped" in batch:
                skipped += int(torch.as_tensor(batch.pop("num_skipped")).sum())
            samples += cfg.SOLVER.IMS_PER_BATCH // (self.world_size * accum)
            batch = move_to_device(batch, self.device, cfg.CHANNELS_LAST)
            sync = isinstance(self.model, DistributedDataParallel) and j < accum - 1
            with self.model.no_sync() if sync else nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                    enabled=s.AMP.ENABLED):
                    out = self.model(batch)
                loss_terms = [v for k, v in out.items() if k.startswith("loss")]
                if not loss_terms:
                    raise RuntimeError(
                        f"The model returned no entry whose key starts with 'loss' "
                        f"(got {sorted(out)}); nothing to optimise."
                    )
                losses = sum(loss_terms)
                self.scaler.scale(losses / accum).backward()
            out = {k: torch.as_tensor(v).detach().float() for k, v in out.items()}
            out["total_loss"] = losses.detach().float()
            for k, v in out.items():
                summed[k] = summed[k] + v / accum if k in summed else v / accum
        if s.CLIP_GRAD_NORM > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], s.CLIP_GRAD_NORM
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._record(it, summed, lr, momentum, data_time, time.perf_counter() - t0, skipped, samples)

    # ------------------------------------------------------------------ metrics
    def _record(self, it, values, lr, momentum, data_time, iter_time, skipped, samples):
        if not self._loss_names:
            self._loss_names = sorted(values)
        if sorted(values) != self._loss_names:
            raise RuntimeError(
                f"The model's outputs changed at iteration {it + 1}: {sorted(values)} "
                f"instead of {self._loss_names}; every iteration must return the same keys."
            )
        vec = torch.stack([values[k].to(self.device).reshape(()) for k in self._loss_names])
        self._window.append(dict(it=it, vec=vec, lr=lr, momentum=momentum, data_time=data_time,
                                 iter_time=iter_time, skipped=skipped, samples=samples))
        self._iter_times.append(iter_time)

    def _flush_metrics(self, done: int) -> None:
        """Average the window over processes, stop on a non-finite loss or too many bad images,
        and write the metrics (main process). Collective: every process calls it."""
        if not self._window:
            return
        window, self._window = self._window, []
        vecs = comm.all_reduce_sum(torch.stack([w["vec"] for w in window])) / self.world_size
        counts = comm.all_reduce_sum(torch.tensor(
            [sum(w["skipped"] for w in window), sum(w["samples"] for w in window)],
            dtype=torch.float64))
        vecs = vecs.double().cpu()
        finite = self.nonfinite.check(vecs, self._loss_names, [w["it"] for w in window],
                                      self.max_iter, self.checkpointer.last_checkpoint)
        skipped, samples = int(counts[0]), int(counts[1])
        self._sync_unreadable()
        self.num_skipped_total += skipped
        self.num_samples_total += samples
        self._check_bad_images()
        monitored = self.monitors.pop_metrics()
        if not self.writers:
            return
        mean = vecs[finite].mean(dim=0).tolist()  # the steps the scaler skipped left out
        metrics = dict(zip(self._loss_names, mean))
        if not bool(finite.all()):
            metrics["num_nonfinite"] = int((~finite).sum())
        iter_time = statistics.median(self._iter_times)
        metrics.update(
            lr=window[-1]["lr"],
            momentum=window[-1]["momentum"],
            data_time=float(np.mean([w["data_time"] for w in window])),
            iter_time=float(np.mean([w["iter_time"] for w in window])),
            images_per_sec=self.cfg.SOLVER.IMS_PER_BATCH / max(iter_time, 1e-9),
            num_skipped=skipped,
            num_skipped_total=self.num_skipped_total,
            eta_seconds=iter_time * (self.max_iter - done),
        )
        metrics.update(monitored)
        if hasattr(self.dataset, "unreadable_indices"):
            metrics["num_unreadable_images"] = len(self._unreadable)  # distinct files, all processes
        if self.device.type == "cuda":
            metrics["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        for w in self.writers:
            w.write(done, metrics)

    def _sync_unreadable(self) -> None:
        """Gather the images any process found unreadable since the last call (collective), so
        that every process skips them without reading and each file is counted once."""
        if not hasattr(self.dataset, "unreadable_indices"):
            return
        new = [i for i in self.dataset.unreadable_indices() if i not in self._unreadable]
        found = set(new)
        if self.world_size > 1:
            found = set().union(*comm.all_gather_object(new))
            self.dataset.mark_unreadable(sorted(found - set(new)))
        self._unreadable.update(found)

    def _check_bad_images(self) -> None:
        dl = self.cfg.DATALOADER
        read = self.num_skipped_total + self.num_samples_total
        if read < dl.BAD_IMAGE_MIN_SAMPLES or read == 0:
            return
        frac = self.num_skipped_total / read
        if frac > dl.MAX_BAD_IMAGE_FRACTION:
            raise RuntimeError(
                f"{self.num_skipped_total} of {read} images read so far ({frac:.2%}) were "
                f"unreadable and skipped, more than DATALOADER.MAX_BAD_IMAGE_FRACTION="
                f"{dl.MAX_BAD_IMAGE_FRACTION}. Check the dataset (the log names the bad files) or "
                f"raise the threshold."
            )

    def _save(self, name: str, iteration: int, final: bool = False) -> None:
        images = getattr(self.dataset, "images", None)
        unreadable = sorted(images.keys[i] for i in self._unreadable) if images is not None else []
        save_checkpoint(self.cfg, self.checkpointer, name, iteration, final=final,
                        num_skipped_total=self.num_skipped_total,
                        num_samples_total=self.num_samples_total,
                        unreadable_images=unreadable,
                        writers=writers_state(getattr(self, "writers", [])))
