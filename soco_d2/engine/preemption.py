"""Stopping cleanly when the job is preempted, and the faults a long run must survive.

``SIGTERM`` (sent by schedulers and ``kill``), ``SIGUSR1`` (SLURM's ``--signal=USR1@90``) and
``SIGINT`` (Ctrl-C) do not kill a training process that watches for them with
:class:`PreemptionWatcher`: the
current step finishes, every process agrees to stop after the same step, the trainer writes a
checkpoint (atomically) and raises :class:`Preempted`, which ends the process with
:data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), distinct from a failure
(1). ``--resume`` then continues with the same data and random states (on a CPU, to the same
weights as an uninterrupted run). With ``requeue``, the main process first asks SLURM to
put the job back in the queue (``scontrol requeue $SLURM_JOB_ID``).

Loader workers ignore these signals when the job sends them (:func:`ignore_preemption_signals`,
their ``worker_init_fn``; the signal primitives live in :mod:`soco_d2.utils.signals`): a scheduler
that signals every process of the job must not kill the workers under the step that is still
finishing. A SIGTERM from the worker's own parent (torch's
loader shutdown, Python's exit handlers) still ends it, so a failed run never waits on them.
"""
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import traceback
from typing import Callable, List, Optional

from soco_d2.utils import comm
# The signal primitives live below the data layer (its workers use them); re-exported here.
from soco_d2.utils import signals
from soco_d2.utils.signals import (  # noqa: F401
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SIGNALS,
    Preempted,
    PreemptionWatcher,
    ignore_preemption_signals,
)

__all__ = signals.__all__ + ["requeue_slurm_job", "DataLoaderWorkerDied", "explain_worker_death"]

logger = logging.getLogger(__name__)

def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (main process only). Returns whether it succeeded;
    failures (not under SLURM, no ``scontrol``, refused) are logged, not raised."""
    if not comm.is_main_process():
        return False
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job
           else os.environ.get("SLURM_JOB_ID"))
    if not job:
        logger.warning("Requeue asked for, but this is not a SLURM job (no SLURM_JOB_ID).")
        return False
    if shutil.which("scontrol") is None:
        logger.error("Requeue asked for, but scontrol is not on PATH: job %s is not requeued.", job)
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True,
                       timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.error("scontrol requeue %s failed: %s", job, str(detail).strip())
        return False
    logger.info("SLURM job %s requeued; it continues from the checkpoint with --resume.", job)
    return True


class DataLoaderWorkerDied(RuntimeError):
    """A data-loader worker process ended abnormally (most often: the out-of-memory killer, or a
    bus error when shared memory runs out)."""


def _is_worker_death(e: BaseException) -> bool:
    if isinstance(e, DataLoaderWorkerDied):
        return False
    # "DataLoader worker (pid ...) is killed by signal / exited unexpectedly"; not "Caught
    # ValueError in DataLoader worker process 0", an exception of the worker re-raised here.
    if isinstance(e, RuntimeError) and "DataLoader worker (pid" in str(e):
        return True
    # Fetching a batch from a worker that is being killed can also fail with a broken
    # connection (shared-memory hand-over) before torch notices that the worker is gone.
    if isinstance(e, (ConnectionError, EOFError)):
        tb = e.__traceback__
        while tb is not None:
            if f"torch{os.sep}utils{os.sep}data" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
    return False


@contextlib.contextmanager
def explain_worker_death(last_checkpoint: Callable[[], Optional[str]]):
    """Turn the death of a data-loader worker, which torch reports from wherever the main
    process is when it notices (``next`` on the loader, or any point through its SIGCHLD
    handler), into :class:`DataLoaderWorkerDied` with the likely cause, the fix and the
    checkpoint to resume from (``last_checkpoint()``)."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as e:
        if not _is_worker_death(e):
            raise
        signals = _worker_signals(e)
        # The finished frames of the loader hold its iterator; free them so that it shuts
        # its other workers down now, not when this exception is collected.
        traceback.clear_frames(e.__traceback__)
        try:
            last = last_checkpoint()
        except FileNotFoundError:
            last = None
        resume = (f"The last checkpoint is {last}; continue with --resume." if last
                  else "No checkpoint was written yet; --resume starts over.")
        raise DataLoaderWorkerDied(
            f"A data-loader worker died ({type(e).__name__}: {str(e).strip()}"
            f"{'; ended by ' + ', '.join(sorted(set(signals))) if signals else ''}). "
            f"{_likely_cause(str(e), signals)} {resume}") from None


def _worker_signals(e: BaseException) -> List[str]:
    """Names of the signals that ended the loader's workers: from torch's message ("killed by
    signal: Bus error") or, when it only says "exited unexpectedly", from the exit codes of the
    workers of the loader iterator whose frames the traceback holds."""
    names = re.findall(r"killed by signal: ([\w ]+)", str(e))
    tb = e.__traceback__
    while tb is not None:
        workers = getattr(tb.tb_frame.f_locals.get("self"), "_workers", None)
        for w in workers if isinstance(workers, list) else []:
            code = getattr(w, "exitcode", None)
            if isinstance(code, int) and code < 0:
                names.append(signal.Signals(-code).name)
        tb = tb.tb_next
    return names


def _likely_cause(message: str, signals: List[str]) -> str:
    if "Bus error" in signals or "SIGBUS" in signals or "shared memory" in message:
        return ("A bus error (SIGBUS) in a worker means that shared memory (/dev/shm), where "
                "workers hand their batches over, ran out: a container's default is 64 MB. "
                "Start the container with a larger --shm-size (or --ipc=host), or lower "
                "DATALOADER.NUM_WORKERS or the images per process (SOLVER.IMS_PER_BATCH); "
                "the check before the first step (DATALOADER.SHM_CHECK) estimates the need.")
    return ("A worker that is killed (SIGKILL, 'Killed') is almost always a victim of the "
            "kernel's out-of-memory killer: lower DATALOADER.NUM_WORKERS or the images per "
            "process (SOLVER.IMS_PER_BATCH), or give the job more memory.")
