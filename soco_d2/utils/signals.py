"""Signal primitives below every layer: the preemption signals, :class:`Preempted`, the watcher
that records them (:class:`PreemptionWatcher`) and the loader workers' handling
(:func:`ignore_preemption_signals`). How the trainers use them: :mod:`soco_d2.engine.preemption`.
"""
import logging
import os
import signal
import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from soco_d2.utils import comm

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "Preempted",
    "PreemptionWatcher",
    "ignore_preemption_signals",
]

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL
# SIGINT too: Ctrl-C reaches every process of the terminal's group, loader workers included.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with :data:`PREEMPTED_EXIT_CODE`
    (a ``SystemExit``: no traceback, and ``except Exception`` does not swallow it)."""

    def __init__(self, message: str = "preempted"):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the data loaders (and initializer of other worker processes):
    SIGTERM / SIGUSR1 / SIGINT from the job (a scheduler or Ctrl-C signalling every process)
    are left to the training process, while a SIGTERM from this worker's parent still ends the
    worker.

    A worker that ignored SIGTERM outright could never be stopped by its parent: torch's loader
    shutdown and Python's exit handlers end daemon workers with SIGTERM and then wait for them,
    so a run that failed would hang at exit. On Linux the signals are blocked and a thread
    waits for them (``sigwaitinfo`` tells who sent each one); elsewhere they are ignored.
    """
    if not hasattr(signal, "sigwaitinfo"):
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    for sig in PREEMPTION_SIGNALS:  # a forked worker inherits the trainer's handlers
        signal.signal(sig, signal.SIG_DFL)
    threading.Thread(target=_obey_parent_only, args=(parent,), daemon=True,
                     name="worker-signals").start()


def _obey_parent_only(parent: int) -> None:
    """Waits for the blocked signals; a SIGTERM from ``parent`` ends the process as SIGTERM
    does by default, any other is dropped."""
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            os._exit(128 + signal.SIGTERM)  # not reached: the default action ends the process


class PreemptionWatcher:
    """Records SIGTERM / SIGUSR1 / SIGINT in this process; :meth:`should_stop` makes all
    processes agree.

    Use as a context manager around the training loop; the previous handlers come back on exit.
    Handlers can only be installed from the main thread; elsewhere the watcher stays inactive
    (with a warning) and the signals keep their previous effect.
    """

    def __init__(self, signals: Sequence[int] = PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous = {}
        self._group = None

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: SIGTERM / SIGUSR1 / SIGINT will not stop the "
                           "run cleanly.")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if comm.get_world_size() > 1:
            # A CPU group: agreeing on the flag never waits for the GPU.
            self._group = (None if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def should_stop(self) -> bool:
        """True on every process once any process received a signal (collective when
        distributed: every process calls it after every step)."""
        local = self.received is not None
        if comm.get_world_size() == 1:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
