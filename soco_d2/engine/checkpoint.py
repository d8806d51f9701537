"""Atomic training checkpoints that resume a run exactly (same data, schedules and random
states; on a GPU the weights differ from an uninterrupted run's by the rounding of its
nondeterministic kernels, see docs/TRAINING.md).

fvcore's ``Checkpointer`` writes in place (a crash mid-write leaves a truncated file that
``last_checkpoint`` points to) and unpickles arbitrary objects, so this module writes to a
temporary file in the same folder, fsyncs and renames it, and reads with
``torch.load(weights_only=True)``. Everything saved is therefore tensors and plain containers,
random-number-generator states included.

A checkpoint holds ``model`` (the whole meta-architecture: online and target networks, queues),
``optimizer``, ``scaler``, ``iteration`` (the number of finished iterations), ``rng_states`` (one
per process), ``world_size``, ``config`` (YAML text) and any extra entries given to ``save``.

A write that fails (disk full, quota, I/O error) raises :class:`CheckpointWriteError` on every
process and leaves the previous checkpoint and ``last_checkpoint`` as they were; temporary files
left by a process killed in the middle of a write are removed when the next run starts.
"""
import logging
import os
import random
import re
from typing import Dict, List, Optional, Tuple

import yaml

import numpy as np
import torch
from torch import nn

from soco_d2.utils import comm
from soco_d2.utils.fileio import atomic_write, atomic_write_text

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "atomic_save",
    "atomic_write_text",
    "get_rng_state",
    "set_rng_state",
    "check_state_dict_matches",
    "list_periodic_checkpoints",
    "write_failure_reason",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
_PARTIAL = re.compile(r"^\.(model_.*\.pth|last_checkpoint)\..*\.tmp$")  # left by a killed write


class CheckpointMismatchError(RuntimeError):
    """The model of a checkpoint does not have the keys / shapes of the model being trained."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one and ``last_checkpoint`` are intact."""


def write_failure_reason(e: BaseException) -> Optional[str]:
    """Why a file write failed, or ``None`` when ``e`` is not a failed write: an ``OSError``
    (ENOSPC, EDQUOT, EIO, ...), or torch's ``RuntimeError`` from its zip writer, which reports
    the ``OSError`` of the file it writes to (a full disk) as ``[enforce fail at
    inline_container.cc...]`` with the ``OSError`` as its context."""
    seen, depth = e, 0
    while seen is not None and depth < 8:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    text = str(e)
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"torch could not write the file ({text.strip().splitlines()[0]})"
    return None


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def get_rng_state() -> Dict:
    """Python, numpy, torch CPU and CUDA generator states as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("CUDA RNG states saved for %d devices, %d visible: not restored.",
                           len(cuda_states), torch.cuda.device_count())


def _flatten(tree, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(saved: str, current: str) -> List[Tuple[str, object, object]]:
    """``(key, checkpoint value, config value)`` of every config key that differs between two
    config dumps (YAML text), model keys first; ``OUTPUT_DIR`` is left out."""
    try:
        a, b = _flatten(yaml.safe_load(saved)), _flatten(yaml.safe_load(current))
    except yaml.YAMLError:
        return []
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "OUTPUT_DIR"]
    keys.sort(key=lambda k: (not k.startswith("MODEL."), k))
    return [(k, a.get(k, "(absent)"), b.get(k, "(absent)")) for k in keys]


def config_differences(saved: str, current: str, limit: int = 12) -> List[str]:
    """``KEY: checkpoint value vs this config value`` for the config keys that differ between
    two config dumps (YAML text), model keys first; ``OUTPUT_DIR`` is left out."""
    changed = _changed_keys(saved, current)
    lines = [f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in changed[:limit]]
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more")
    return lines


# Config keys that change how a run is carried out (logging, checkpoints, monitors, workers,
# when to give up), not the weights it computes.
_BOOKKEEPING = ("DATALOADER.NUM_WORKERS", "DATALOADER.BAD_IMAGE_MIN_SAMPLES",
                "DATALOADER.MAX_BAD_IMAGE_FRACTION", "LOG_PERIOD", "SOLVER.CHECKPOINT_PERIOD",
                "SOLVER.MAX_TO_KEEP", "SOLVER.ON_CHECKPOINT_ERROR", "REQUEUE_ON_PREEMPTION",
                "TEST.EVAL_PERIOD", "SOLVER.WATCHDOG_TIMEOUT", "MONITOR.")


def resume_changes(saved: str, current: str, path: str, iteration: int) -> str:
    """The log message for a resume whose config differs from the checkpoint's: every changed
    key, and which of them change the training from ``iteration`` on (every key takes effect:
    the schedules are recomputed from the config, and the optimizer's hyperparameters are set
    from it over the restored state) and which only the bookkeeping. Empty when none changed."""
    changed = _changed_keys(saved, current)
    if not changed:
        return ""

    def is_bookkeeping(key):
        return any(key == b or (b.endswith(".") and key.startswith(b)) for b in _BOOKKEEPING)
    training = [c for c in changed if not is_bookkeeping(c[0])]
    other = [c for c in changed if is_bookkeeping(c[0])]
    lines = [f"Resuming from {path} (iteration {iteration}) with a config that differs from the "
             f"one it was written with in {len(changed)} key(s); every one takes effect from "
             f"iteration {iteration} on."]
    if training:
        lines.append(f"{len(training)} change(s) the training itself (the result will differ "
                     "from an uninterrupted run with either config):")
        lines += [f"  {k}: {a!r} -> {b!r}" for k, a, b in training]
    if other:
        lines.append(f"{len(other)} change(s) only logging, checkpoints, monitors or workers:")
        lines += [f"  {k}: {a!r} -> {b!r}" for k, a, b in other]
    return "\n".join(lines)


def check_state_dict_matches(expected: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor],
                             source: str, saved_config: str = "", config: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` listing every missing, unexpected or reshaped key
    and, when both config dumps are given, the config keys that differ."""
    lines: List[str] = []
    for k in sorted(set(expected) - set(loaded)):
        lines.append(f"  missing in checkpoint: {k} (model {tuple(expected[k].shape)})")
    for k in sorted(set(loaded) - set(expected)):
        lines.append(f"  not in model:          {k} (checkpoint {tuple(loaded[k].shape)})")
    for k in sorted(set(expected) & set(loaded)):
        if tuple(expected[k].shape) != tuple(loaded[k].shape):
            lines.append(f"  shape mismatch:        {k}: checkpoint {tuple(loaded[k].shape)}"
                         f" vs model {tuple(expected[k].shape)}")
    if lines:
        diff = config_differences(saved_config, config) if saved_config and config else []
        cfg_text = ("\nThe checkpoint was written with another config; keys that differ:\n  "
                    + "\n  ".join(diff)) if diff else ""
        raise CheckpointMismatchError(
            f"The model in {source} does not match the model built from the config "
            f"({len(lines)} keys differ):\n" + "\n".join(lines) + cfg_text + "\nResume with the "
            "config the checkpoint was written with, or start a new run in another OUTPUT_DIR."
        )


class Checkpointer:
    """Saves and restores the full training state in ``output_dir``.

    ``save`` must be called by every process (it gathers their RNG states); only the main
    process writes. Periodic checkpoints are ``model_{iteration:07d}.pth``; at most
    ``max_to_keep`` of them are kept (0 keeps all). ``last_checkpoint`` names the newest file.
    ``config`` (the YAML dump of the run's config) lets a refused checkpoint name the config
    keys it was written with that differ.
    """

    def __init__(self, model: nn.Module, output_dir: str, optimizer=None, scaler=None,
                 max_to_keep: int = 0, config: str = ""):
        self.model = comm.unwrap(model)
        self.output_dir = output_dir
        self.optimizer, self.scaler, self.max_to_keep = optimizer, scaler, max_to_keep
        self.config = config
        if comm.is_main_process() and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                if _PARTIAL.match(name):
                    logger.info("Removing %s, left by a checkpoint write that did not finish.", name)
                    os.remove(os.path.join(output_dir, name))

    # -------------------------------------------------------------------- saving
    def save(self, name: str, iteration: int, config: str = "", **extra) -> Optional[str]:
        """Write ``name`` and point ``last_checkpoint`` at it (main process; every process calls
        it). Raises :class:`CheckpointWriteError` on every process when the write fails."""
        rng_states = comm.all_gather_object(get_rng_state())
        path = os.path.join(self.output_dir, name)
        error = None
        if comm.is_main_process():
            data = {"model": self.model.state_dict(), "iteration": int(iteration),
                    "rng_states": rng_states, "world_size": comm.get_world_size(),
                    "config": config or self.config}
            if self.optimizer is not None:
                data["optimizer"] = self.optimizer.state_dict()
            if self.scaler is not None:
                data["scaler"] = self.scaler.state_dict()
            data.update(extra)
            try:
                previous = self.last_checkpoint()
            except FileNotFoundError:
                previous = None
            try:
                atomic_save(data, path)
                atomic_write_text(os.path.join(self.output_dir, LAST_CHECKPOINT), name)
            except Exception as e:
                reason = write_failure_reason(e)
                if reason is None:
                    raise
                error = (
                    f"Could not write checkpoint {path} (iteration {iteration}): "
                    f"{reason}. Nothing was replaced: last_checkpoint still names "
                    f"{previous or 'no checkpoint (none written yet)'}. Free space in "
                    f"{self.output_dir} (or fix the disk), then continue with --resume."
                )
        if comm.get_world_size() > 1:
            error = comm.all_gather_object(error)[0]
        if error:
            raise CheckpointWriteError(error)
        if not comm.is_main_process():
            return None
        logger.info("Saved checkpoint %s (iteration %d).", path, iteration)
        if _PERIODIC.match(name):
            self._remove_old_periodic()
        return path

    def _remove_old_periodic(self) -> None:
        if self.max_to_keep <= 0:
            return
        for path in list_periodic_checkpoints(self.output_dir)[: -self.max_to_keep]:
            os.remove(path)

    # -------------------------------------------------------------------- loading
    def last_checkpoint(self) -> Optional[str]:
        """Path named by ``output_dir/last_checkpoint``, or ``None`` when there is none."""
        marker = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            name = f.read().strip()
        path = os.path.join(self.output_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{marker} names {name!r}, which does not exist in {self.output_dir}. Remove "
                f"{marker} to start fresh, or point it at an existing checkpoint."
            )
        return path

    def load(self, path: str, model_only: bool = False) -> Dict:
        """Restore from ``path``; return the checkpoint's remaining entries (``iteration``...)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"Cannot read checkpoint {path}: {e}") from e
        state = data.pop("model") if isinstance(data, dict) and "model" in data else data
        if not isinstance(state, dict):
            raise CheckpointMismatchError(f"{path} holds no model state dict.")
        saved_config = data.get("config", "") if isinstance(data, dict) else ""
        check_state_dict_matches(self.model.state_dict(), state, path,
                                 saved_config if isinstance(saved_config, str) else "", self.config)
        self.model.load_state_dict(state)
        if model_only:
            return {}
        if isinstance(saved_config, str) and saved_config and self.config:
            message = resume_changes(saved_config, self.config, path, int(data.get("iteration", 0)))
            if message:
                logger.warning(message)
        if self.optimizer is not None and "optimizer" in data:
            # The optimizer's state (momentum buffers) comes from the checkpoint, its
            # hyperparameters (weight decay, momentum, ...) from this run's config: loading
            # the state dict alone would silently keep the checkpoint's.
            configured = [{k: v for k, v in g.items() if k != "params"}
                          for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(data.pop("optimizer"))
            for group, values in zip(self.optimizer.param_groups, configured):
                group.update(values)
        if self.scaler is not None and "scaler" in data:
            self.scaler.load_state_dict(data.pop("scaler"))
        rng_states = data.pop("rng_states", None)
        if rng_states is not None:
            if len(rng_states) == comm.get_world_size():
                set_rng_state(rng_states[comm.get_rank()])
            else:
                logger.warning(
                    "%s was written by %d processes, this run has %d: random states not restored"
                    " (the data stream is still exact; model-side randomness is not).",
                    path, len(rng_states), comm.get_world_size())
        return data

    def resume_or_load(self, weights: str, resume: bool) -> Dict:
        """With ``resume``: load ``last_checkpoint`` if present (full state); else load model
        ``weights`` only (if given); else nothing. Returns the loaded entries (``iteration``)."""
        if resume:
            path = self.last_checkpoint()
            if path is not None:
                logger.info("Resuming from %s.", path)
                return self.load(path)
            logger.info("No checkpoint in %s: starting a new run.", self.output_dir)
        if weights:
            logger.info("Loading model weights from %s.", weights)
            self.load(weights, model_only=True)
        elif not resume:
            logger.info("Starting a new run (no --resume, no MODEL.WEIGHTS).")
        return {}


def list_periodic_checkpoints(output_dir: str) -> List[str]:
    """Periodic checkpoint files in ``output_dir``, oldest first."""
    names = sorted(f for f in os.listdir(output_dir) if _PERIODIC.match(f))
    return [os.path.join(output_dir, f) for f in names]
