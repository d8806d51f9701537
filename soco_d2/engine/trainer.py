"""The pretraining trainer of SoCo and DetCo, on the loop of :mod:`soco_d2.engine.train_loop`
(metrics flush, checkpoints, preemption stop and closing are the loop's); every run starts with
:func:`~soco_d2.engine.run_setup.setup_run`.

One iteration ``it``: ``model.momentum_update(m)`` (the target network's EMA step, before the
forward, as the official SoCo and MoCo code); set the scheduled learning rate;
``GRAD_ACCUM_STEPS`` micro-batches (forward under autocast when AMP is on, backward of the summed
``loss*`` entries; DDP gradient sync only on the last one); optional gradient clipping; optimizer
step. ``m = momentum_at(it)``, iteration ``it``'s value of the
scheduled EMA momentum. Losses stay on the device and are checked / averaged over processes once
per log period and before every checkpoint, so the loop does not wait for the GPU each step.
The loop's hooks run the monitors (:mod:`soco_d2.engine.monitors`) and count unreadable images.
"""
import collections
import logging
import statistics
import time
from contextlib import nullcontext
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from soco_d2.data.loader import build_pretrain_loader
from soco_d2.modeling.sync_bn import convert_sync_batchnorm
from soco_d2.utils import comm

from .checkpoint import Checkpointer
from .monitors import Monitors
from .optimizer import build_optimizer
from .run_setup import move_to_device, setup_run
from .schedules import build_lr_schedule, build_momentum_schedule, max_iter_from_cfg
from .train_loop import NonFiniteLossGuard, TrainLoop

__all__ = ["PretrainTrainer"]

logger = logging.getLogger(__name__)


class PretrainTrainer(TrainLoop):
    """Builds everything from ``cfg`` (or takes ``model`` / ``dataset``) and trains.

    Typical use::

        trainer = PretrainTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
    """

    def __init__(self, cfg, model: nn.Module = None, dataset=None):
        super().__init__(cfg, setup_run(cfg))
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
            model = comm.wrap_ddp(model, self.device)
        self.model = model

        if dataset is None:
            from soco_d2.data.dataset import build_pretrain_dataset

            dataset = build_pretrain_dataset(cfg)
        self.dataset = dataset
        self.max_iter = max_iter_from_cfg(cfg, len(dataset))
        self.optimizer = build_optimizer(cfg, comm.unwrap(model))
        self.lr_schedule = build_lr_schedule(cfg, self.max_iter)
        self.momentum_schedule = build_momentum_schedule(cfg, self.max_iter)
        self.amp_dtype = torch.bfloat16 if s.AMP.DTYPE == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=s.AMP.ENABLED and s.AMP.DTYPE == "float16"
        )
        self.nonfinite = NonFiniteLossGuard(
            cfg, self.scaler, "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRAD_NORM or switch "
            "SOLVER.AMP.DTYPE.")
        self.checkpointer = Checkpointer(comm.unwrap(model), cfg.OUTPUT_DIR, self.optimizer,
                                         self.scaler, max_to_keep=s.MAX_TO_KEEP, config=cfg.dump())
        self._unreadable = set()  # indices of images found unreadable by any process
        self.num_skipped_total = 0  # over all processes, since the start of the run
        self.num_samples_total = 0
        self._iter_times = collections.deque(maxlen=200)
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

    # ------------------------------------------------------------------ loop hooks
    def build_train_loader(self):
        return build_pretrain_loader(self.cfg, self.dataset, self.start_iter)

    def before_train(self) -> None:
        self.monitors.before_train()

    def after_step(self, done: int) -> None:
        self.monitors.after_step(done)

    def flush_requested(self) -> bool:
        return self.monitors.pending

    def close(self) -> None:
        self.monitors.close()  # before the writers: they upload its plot (W&B)

    def run_step(self, it: int) -> None:
        cfg, s = self.cfg, self.cfg.SOLVER
        t0 = time.perf_counter()
        # The official order (SoCo_FPN.forward, MoCo's builder): the target moves by EMA at the
        # start of every iteration, the first included, with the momentum of that iteration,
        # m(it), and the online weights of the previous optimizer step. A checkpoint written
        # after iteration it - 1 holds the target before this update; a resumed run makes it.
        momentum = self.momentum_schedule.momentum_at(it)
        comm.unwrap(self.model).momentum_update(momentum)
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
        iter_time = time.perf_counter() - t0
        self._iter_times.append(iter_time)
        self.record(it, dict(sorted(summed.items())), lr=lr, momentum=momentum,
                    data_time=data_time, iter_time=iter_time, skipped=skipped, samples=samples)

    # ------------------------------------------------------------------ metrics
    def window_metrics(self, done: int, window: List[Dict], losses: Dict[str, float],
                       elapsed: float) -> Dict:
        """Count the skipped images over processes and stop when too many were unreadable;
        the step times, learning rate, EMA momentum and the monitors' metrics."""
        counts = comm.all_reduce_sum(torch.tensor(
            [sum(w["skipped"] for w in window), sum(w["samples"] for w in window)],
            dtype=torch.float64))
        skipped, samples = int(counts[0]), int(counts[1])
        self._sync_unreadable()
        self.num_skipped_total += skipped
        self.num_samples_total += samples
        self._check_bad_images()
        monitored = self.monitors.pop_metrics()
        iter_time = statistics.median(self._iter_times)
        metrics = dict(
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
        return metrics

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

    def checkpoint_extra(self) -> Dict:
        images = getattr(self.dataset, "images", None)
        unreadable = sorted(images.keys[i] for i in self._unreadable) if images is not None else []
        return dict(num_skipped_total=self.num_skipped_total,
                    num_samples_total=self.num_samples_total, unreadable_images=unreadable)
