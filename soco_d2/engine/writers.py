"""Training metrics: ``metrics.json``, TensorBoard events, a console progress line and,
optionally, Weights & Biases.

Only the main process writes. ``iteration`` is the number of finished iterations. A writer has
``write(iteration, metrics)`` and ``close()``; one that must be continued after a resume (W&B)
also has ``state_dict()``, kept in the checkpoint (:func:`writers_state`).
"""
import datetime
import json
import logging
import os
import sys
from typing import Dict, List

from soco_d2.utils import comm

__all__ = ["JSONWriter", "TensorboardWriter", "ConsolePrinter", "WandbWriter", "GuardedWriter",
           "MetricsWriteError", "build_writers", "check_writers", "writers_state", "setup_logging",
           "format_progress_line", "read_metrics"]

logger = logging.getLogger(__name__)


# Every line carries its level, so a warning never looks like an info line.
LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s]: %(message)s"


def setup_logging(output_dir: str = "", name: str = "soco_d2") -> logging.Logger:
    """Console (main process: INFO, others: WARNING) and ``output_dir/log.txt[.rankN]`` logging
    for the ``soco_d2`` loggers. Calling it again changes nothing."""
    log = logging.getLogger(name)
    if getattr(log, "_soco_configured", False):
        return log
    log.setLevel(logging.INFO)
    log.propagate = False
    rank = comm.get_rank()
    fmt = logging.Formatter(LOG_FORMAT, datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    log.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fname = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        fh = logging.FileHandler(os.path.join(output_dir, fname))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log._soco_configured = True
    return log


def read_metrics(path: str) -> List[Dict]:
    """The JSON lines of a ``metrics.json`` (missing file: no rows)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class JSONWriter:
    """Appends one JSON object per line to ``path``. A write that fails (a full disk) leaves no
    partial line: the file is cut back to its last complete row."""

    def __init__(self, path: str):
        self._file = open(path, "ab", buffering=0)

    def write(self, iteration: int, metrics: Dict[str, float]) -> None:
        line = (json.dumps({"iteration": iteration, **metrics}, sort_keys=False) + "\n").encode()
        start = self._file.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[self._file.write(view):]
        except OSError:
            try:
                self._file.truncate(start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        self._file.close()


class TensorboardWriter:
    """Scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir)

    def write(self, iteration: int, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, iteration)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# Entries with a fixed place in the progress line (the model's other outputs are listed as-is).
_KNOWN = {"total_loss", "lr", "momentum", "data_time", "iter_time", "images_per_sec", "max_mem_mb",
          "eta_seconds", "num_skipped", "num_skipped_total", "num_samples_total",
          "num_unreadable_images"}


def format_progress_line(iteration: int, max_iter: int, m: Dict[str, float]) -> str:
    """``iter 120/62500  loss 1.234 (loss_a 0.6 loss_b 0.6)  lr 0.0800  m 0.99001  data 0.012s
    iter 0.520s  245.1 img/s  ETA 9:01:02``"""
    parts = [f"iter {iteration}/{max_iter}"]
    terms = " ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("loss"))
    if "total_loss" in m:
        parts.append(f"loss {m['total_loss']:.4f}" + (f" ({terms})" if terms else ""))
    others = " ".join(f"{k} {v:.4g}" for k, v in m.items()
                      if not k.startswith("loss") and k not in _KNOWN)
    if others:
        parts.append(others)
    if "lr" in m:
        parts.append(f"lr {m['lr']:.4f}")
    if "momentum" in m:
        parts.append(f"m {m['momentum']:.5f}")
    if "data_time" in m:
        parts.append(f"data {m['data_time']:.3f}s")
    if "iter_time" in m:
        parts.append(f"iter {m['iter_time']:.3f}s")
    if "images_per_sec" in m:
        parts.append(f"{m['images_per_sec']:.1f} img/s")
    if "max_mem_mb" in m:
        parts.append(f"mem {m['max_mem_mb']:.0f}M")
    if m.get("num_skipped", 0) > 0:
        parts.append(f"skipped {int(m['num_skipped'])} bad images")
    if "eta_seconds" in m:
        parts.append(f"ETA {datetime.timedelta(seconds=int(m['eta_seconds']))}")
    return "  ".join(parts)


class ConsolePrinter:
    """Logs :func:`format_progress_line` through the ``soco_d2`` logger."""

    def __init__(self, max_iter: int):
        self.max_iter = max_iter
        self._log = logging.getLogger("soco_d2.train")

    def write(self, iteration: int, metrics: Dict[str, float]) -> None:
        self._log.info(format_progress_line(iteration, self.max_iter, metrics))

    def close(self) -> None:
        pass


class MetricsWriteError(OSError):
    """Metrics could not be written and ``SOLVER.ON_CHECKPOINT_ERROR`` is ``stop``."""


class GuardedWriter:
    """A writer whose failed writes (a full disk, a quota, an I/O error) follow
    ``SOLVER.ON_CHECKPOINT_ERROR``: ``continue`` logs the first failure (and the recovery, with
    the number of rows lost) and trains on; ``stop`` raises :class:`MetricsWriteError`."""

    def __init__(self, writer, name: str, on_error: str = "continue"):
        self.writer, self.name, self.on_error = writer, name, on_error
        self._missed = 0

    def _failed(self, e: Exception, what: str) -> None:
        from .checkpoint import write_failure_reason  # (checkpoint imports nothing from here)

        reason = write_failure_reason(e)
        if reason is None:
            raise e
        message = f"Could not write {self.name} ({what}): {reason}."
        if self.on_error == "stop":
            raise MetricsWriteError(f"{message} Stopping (SOLVER.ON_CHECKPOINT_ERROR stop); free "
                                    "space, then continue with --resume.") from None
        if not self._missed:
            logger.error("%s Training continues (SOLVER.ON_CHECKPOINT_ERROR continue); its rows "
                         "are missing until it can be written again.", message)
        self._missed += 1

    def write(self, iteration: int, metrics: Dict[str, float]) -> None:
        try:
            self.writer.write(iteration, metrics)
        except Exception as e:
            self._failed(e, f"iteration {iteration}")
            return
        if self._missed:
            logger.warning("%s is written again from iteration %d; %d row(s) before it are "
                           "missing.", self.name, iteration, self._missed)
            self._missed = 0

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception as e:
            self._failed(e, "closing it")


_WANDB_MISSING = ("WANDB.ENABLED is True but the wandb package is not installed: install the extra "
                  "with pip install -e \".[wandb]\" (or pip install wandb), or set WANDB.ENABLED "
                  "False.")


class WandbWriter:
    """Scalars, the config and, at the end, the PNGs of ``output_dir`` (the monitor curves) to a
    Weights & Biases run (``WANDB.*``). The run id is kept in the checkpoint
    (:meth:`state_dict`), so a resumed training continues the same W&B run."""

    def __init__(self, cfg, output_dir: str, run_id: str = ""):
        import secrets

        import yaml

        check_writers(cfg)
        import wandb

        w = cfg.WANDB
        self.run_id = run_id or secrets.token_hex(4)  # W&B ids: letters and digits
        self.output_dir = output_dir
        self._wandb = wandb
        self._last_step = 0
        self._run = wandb.init(
            project=w.PROJECT, entity=w.ENTITY or None,
            name=w.NAME or os.path.basename(os.path.normpath(output_dir)),
            group=w.GROUP or None, tags=list(w.TAGS) or None, mode=w.MODE,
            id=self.run_id, resume="allow", dir=output_dir,
            config=yaml.safe_load(cfg.dump()),
        )
        logger.info("W&B run %s (%s mode)%s.", self.run_id, w.MODE,
                    " continued" if run_id else "")

    def write(self, iteration: int, metrics: Dict[str, float]) -> None:
        self._run.log(dict(metrics), step=iteration)
        self._last_step = iteration

    def state_dict(self) -> Dict[str, str]:
        return {"run_id": self.run_id}

    def close(self) -> None:
        import glob

        images = {f"monitor/{os.path.splitext(os.path.basename(p))[0]}": self._wandb.Image(p)
                  for p in sorted(glob.glob(os.path.join(self.output_dir, "*.png")))}
        if images:
            self._run.log(images, step=self._last_step)
        self._run.finish()


def check_writers(cfg) -> None:
    """Raise at start when ``WANDB.ENABLED`` but the wandb package is missing (naming the extra)."""
    if not cfg.WANDB.ENABLED:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise RuntimeError(_WANDB_MISSING) from None
    if cfg.WANDB.MODE not in ("online", "offline"):
        raise ValueError(f"WANDB.MODE must be 'online' or 'offline', got {cfg.WANDB.MODE!r}")


def writers_state(writers: List) -> Dict[str, Dict]:
    """``{writer class name: state}`` of the writers that continue after a resume (checkpoint)."""
    return {type(w).__name__: w.state_dict() for w in writers if hasattr(w, "state_dict")}


def build_writers(output_dir: str, max_iter: int, cfg=None, state: Dict[str, Dict] = None) -> List:
    """Console, ``metrics.json`` and TensorBoard writers on the main process, and W&B when
    ``cfg.WANDB.ENABLED`` (continuing the run of ``state``, a checkpoint's
    :func:`writers_state`); none elsewhere. Failed writes of the files follow
    ``cfg.SOLVER.ON_CHECKPOINT_ERROR`` (default ``continue``; see :class:`GuardedWriter`)."""
    if not comm.is_main_process():
        return []
    on_error = cfg.SOLVER.ON_CHECKPOINT_ERROR if cfg is not None else "continue"
    os.makedirs(output_dir, exist_ok=True)
    writers = [ConsolePrinter(max_iter),
               GuardedWriter(JSONWriter(os.path.join(output_dir, "metrics.json")),
                             os.path.join(output_dir, "metrics.json"), on_error),
               GuardedWriter(TensorboardWriter(output_dir), f"the TensorBoard events in {output_dir}",
                             on_error)]
    if cfg is not None and cfg.WANDB.ENABLED:
        run_id = ((state or {}).get("WandbWriter") or {}).get("run_id", "")
        writers.append(WandbWriter(cfg, output_dir, run_id))
    return writers
