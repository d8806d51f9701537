"""The training loop both trainers run: pretraining (:mod:`soco_d2.engine.trainer`) and
fine-tuning (:mod:`soco_d2.finetune.trainer`) subclass :class:`TrainLoop`.

:meth:`TrainLoop.train` runs iterations ``start_iter .. max_iter - 1``; after iteration ``it``
(``done = it + 1`` finished):

1. ``run_step(it)`` (the subclass: forward, backward, optimizer step; it hands its losses to
   :meth:`~TrainLoop.record`, which keeps them on the device), then the watchdog's heartbeat;
2. the ``after_step(done)`` hook;
3. the metrics flush, every ``LOG_PERIOD``, before a checkpoint, at the end, and whenever
   ``flush_requested()``: the window's losses averaged over processes (one host sync),
   :class:`NonFiniteLossGuard`'s check, the ``window_metrics`` hook, the writers;
4. the ``evaluate(done)`` hook (not after the last iteration);
5. the periodic checkpoint, every ``SOLVER.CHECKPOINT_PERIOD`` (not after the last iteration);
6. the preemption check: after SIGTERM / SIGUSR1 / SIGINT the run flushes its metrics, writes a
   checkpoint and exits with ``PREEMPTED_EXIT_CODE`` (:mod:`soco_d2.engine.preemption`).

Then ``model_final.pth`` (:meth:`TrainLoop.final_save_needed`, one rule for both trainers) and
the ``after_train()`` hook; in any case (an error too) the loader's workers stop at once, the
``close()`` hook and the writers close, and every process meets the others before returning.
The loop runs inside the preemption watcher, the hang watchdog (``SOLVER.WATCHDOG_TIMEOUT``)
and the explanation of a dead loader worker.
"""
import logging
import os
import time
from typing import Dict, List

import torch

from soco_d2.data.loader import stop_loader_workers
from soco_d2.utils import comm
from soco_d2.utils.watchdog import Watchdog, beat

from .checkpoint import Checkpointer, CheckpointWriteError
from .preemption import Preempted, PreemptionWatcher, explain_worker_death, requeue_slurm_job
from .writers import build_writers, writers_state

__all__ = ["TrainLoop", "NonFiniteLossGuard", "save_checkpoint", "stop_for_preemption"]

logger = logging.getLogger(__name__)


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


class TrainLoop:
    """The loop, its metrics flush, checkpoints, preemption stop and closing (see module doc).

    A subclass's ``__init__`` calls ``super().__init__(cfg, device)`` and sets ``model`` (wrapped
    with :func:`~soco_d2.utils.comm.wrap_ddp` on several processes), ``max_iter``,
    ``checkpointer`` and ``nonfinite`` (a :class:`NonFiniteLossGuard`); it implements
    ``build_train_loader()`` and ``run_step(it)``, and overrides the hooks it needs (each does
    nothing here). Resuming sets ``start_iter`` and ``_writers_state``.
    """

    model: torch.nn.Module
    max_iter: int
    checkpointer: Checkpointer
    nonfinite: NonFiniteLossGuard

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.start_iter = 0
        self.iter = 0
        self.writers: List = []
        self._writers_state: Dict = {}  # the W&B run to continue (from the resumed checkpoint)
        self._data = None  # the training loader's iterator, while training
        self._loss_names: List[str] = []
        self._reset_window()

    # ------------------------------------------------------------------ the subclass's part
    def build_train_loader(self):
        """An iterator over training batches that starts at ``start_iter``."""
        raise NotImplementedError

    def run_step(self, it: int) -> None:
        """One optimizer step on batches of ``self._data``; ends with :meth:`record`."""
        raise NotImplementedError

    def start_message(self) -> str:
        return (f"Training {self.max_iter} iterations from iteration {self.start_iter}, "
                f"{self.world_size} process(es), {self.cfg.SOLVER.IMS_PER_BATCH} images per step.")

    def before_train(self) -> None:
        """Hook: the loader exists (its workers run), no step yet."""

    def after_step(self, done: int) -> None:
        """Hook: iteration ``done`` finished, before its metrics flush."""

    def flush_requested(self) -> bool:
        """Hook: flush the metrics after this iteration although no period says so."""
        return False

    def window_metrics(self, done: int, window: List[Dict], losses: Dict[str, float],
                       elapsed: float) -> Dict:
        """Hook of the metrics flush (every process: may be collective, may raise). ``window``:
        the :meth:`record` entries since the last flush; ``losses``: their mean over processes
        and finite steps; ``elapsed``: seconds since the last flush. Returns the metrics to
        write besides the losses."""
        return {}

    def evaluate(self, done: int) -> None:
        """Hook: after the metrics flush of every iteration but the last."""

    def checkpoint_extra(self) -> Dict:
        """Hook: entries a checkpoint holds besides the training state and the writers'."""
        return {}

    def after_train(self) -> None:
        """Hook: ``model_final.pth`` is written; outside the preemption watcher and watchdog."""

    def close(self) -> None:
        """Hook: at the end of :meth:`train` (also after an error), before the writers close."""

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        logger.info(self.start_message())
        self.writers = build_writers(cfg.OUTPUT_DIR, self.max_iter, cfg, self._writers_state)
        self._reset_window()
        self.model.train()
        period = cfg.SOLVER.CHECKPOINT_PERIOD
        try:
            # (the loader's workers start here: a worker that dies at once is explained too)
            # (outside the watcher: torch may report the worker's death again, from its SIGCHLD
            # handler, while the watcher restores the signal handlers)
            with explain_worker_death(self.checkpointer.last_checkpoint), \
                    PreemptionWatcher() as watcher, \
                    Watchdog(cfg.SOLVER.WATCHDOG_TIMEOUT, "SOLVER.WATCHDOG_TIMEOUT"):
                self._data = self.build_train_loader()
                self.before_train()
                for it in range(self.start_iter, self.max_iter):
                    self.iter = it
                    self.run_step(it)
                    done = it + 1
                    beat(f"iteration {done + 1}")
                    self.after_step(done)
                    last = done == self.max_iter
                    ckpt = period > 0 and done % period == 0
                    if done % cfg.LOG_PERIOD == 0 or ckpt or last or self.flush_requested():
                        self._flush_metrics(done)
                    if not last:
                        self.evaluate(done)
                    if ckpt and not last:
                        self._save(f"model_{done:07d}.pth", done)
                    if not last and watcher.should_stop():
                        self._flush_metrics(done)
                        stop_for_preemption(cfg, watcher, lambda n, i: self._save(n, i, final=True),
                                            done, self.max_iter)
                if self.final_save_needed():
                    self._save("model_final.pth", self.max_iter, final=True)
            self.after_train()  # (a failure here loses nothing: the final model is saved)
        finally:
            data, self._data = self._data, None
            # A loader worker that died can still be reported (SIGCHLD) while closing up.
            with explain_worker_death(self.checkpointer.last_checkpoint):
                # The workers stop first and now, on every exit path: after a worker died, the
                # frames an exception holds would keep them registered with torch's SIGCHLD
                # handler, which then raises at a random point later in the process.
                stop_loader_workers(data)
                self.close()
                for w in self.writers:
                    w.close()
        # Every process leaves its last collective before any of them tears the group down.
        comm.synchronize()

    def final_save_needed(self) -> bool:
        """``model_final.pth`` is written when this run trained at least one iteration, or when
        ``OUTPUT_DIR`` has none yet (a run resumed at its end from a periodic checkpoint); a
        finished run resumed again keeps its file."""
        return self.start_iter < self.max_iter or not os.path.exists(
            os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth"))

    def _save(self, name: str, iteration: int, final: bool = False) -> None:
        save_checkpoint(self.cfg, self.checkpointer, name, iteration, final=final,
                        **self.checkpoint_extra(), writers=writers_state(self.writers))

    # ------------------------------------------------------------------ metrics
    def record(self, it: int, losses: Dict[str, torch.Tensor], **info) -> None:
        """Keep iteration ``it``'s losses (scalars, left on the device: no host sync) and
        ``info`` (plain numbers the subclass's :meth:`window_metrics` reads) until the next
        flush. Every iteration must give the same loss names."""
        names = list(losses)
        if not self._loss_names:
            self._loss_names = names
        if names != self._loss_names:
            raise RuntimeError(
                f"The model's outputs changed at iteration {it + 1}: {names} instead of "
                f"{self._loss_names}; every iteration must return the same keys."
            )
        vec = torch.stack([losses[k].detach().float().to(self.device).reshape(()) for k in names])
        self._window.append(dict(info, it=it, vec=vec))

    def _reset_window(self) -> None:
        self._window: List[Dict] = []
        self._window_start = time.perf_counter()

    def _flush_metrics(self, done: int) -> None:
        """Average the window's losses over processes (one host sync), check them
        (:class:`NonFiniteLossGuard`), run :meth:`window_metrics` and write the mean over the
        finite steps with the hook's metrics (main process). Collective: every process calls it."""
        if not self._window:
            return
        window = self._window
        rows = comm.all_reduce_sum(torch.stack([w["vec"] for w in window])) / self.world_size
        rows = rows.double().cpu()
        elapsed = time.perf_counter() - self._window_start
        self._reset_window()
        finite = self.nonfinite.check(rows, self._loss_names, [w["it"] for w in window],
                                      self.max_iter, self.checkpointer.last_checkpoint)
        losses = dict(zip(self._loss_names, rows[finite].mean(dim=0).tolist()))
        metrics = {**losses, **self.window_metrics(done, window, losses, elapsed)}
        if not self.writers:
            return
        if not bool(finite.all()):  # steps the float16 gradient scaler skipped
            metrics["num_nonfinite"] = int((~finite).sum())
        if self.device.type == "cuda":
            metrics["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        for w in self.writers:
            w.write(done, metrics)
