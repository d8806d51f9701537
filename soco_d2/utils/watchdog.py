"""A hang watchdog: a run that makes no progress for too long dumps its stacks and ends.

A stalled network file system, a collective that one process never joins or a reader that
blocks do not raise: the job waits until its wall-clock limit. :class:`Watchdog` is a thread
that expects :func:`beat` (called after every iteration, evaluation batch, proposal result and
checkpoint) at least every ``timeout`` seconds. When none comes it logs what it was waiting
for, writes every thread's stack (:mod:`faulthandler`) of this process and of its worker
processes (which dump theirs on ``SIGUSR2``, see :func:`dump_stacks_on_request`) to stderr
and to the log file, kills the workers and ends the process with :data:`HANG_EXIT_CODE`.
Nothing is saved: the state of a process stuck in the middle of a step is not a consistent
checkpoint; ``--resume`` continues from the last one.
"""
import faulthandler
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Optional

__all__ = ["HANG_EXIT_CODE", "Watchdog", "beat", "dump_stacks_on_request"]

logger = logging.getLogger(__name__)

HANG_EXIT_CODE = 3
_current: Optional["Watchdog"] = None


def beat(what: str = "") -> None:
    """Tell the running watchdog (if any) that the process made progress; ``what`` names what
    comes next (shown if it never finishes)."""
    if _current is not None:
        _current.beat(what)


def dump_stacks_on_request() -> None:
    """In a worker process: write every thread's stack to stderr on ``SIGUSR2`` (the watchdog
    of the parent sends it before ending the run)."""
    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, all_threads=True)


def _log_file_streams():
    for handler in logging.getLogger("soco_d2").handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            yield handler.stream


class Watchdog:
    """Context manager: ends the process when :func:`beat` is not called for ``timeout``
    seconds (0 or less: disabled). ``name`` says what it watches (``SOLVER.WATCHDOG_TIMEOUT``)."""

    def __init__(self, timeout: float, name: str):
        self.timeout, self.name = float(timeout), name
        self._last, self._what = time.monotonic(), "the first step"
        self._stop = threading.Event()
        self._thread = None

    def beat(self, what: str = "") -> None:
        self._last, self._what = time.monotonic(), what or "the next step"

    def __enter__(self) -> "Watchdog":
        global _current
        if self.timeout > 0:
            _current = self
            self.beat("the first step")
            self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _current
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if _current is self:
            _current = None

    def _watch(self) -> None:
        while not self._stop.wait(min(10.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.timeout:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        message = (f"No progress for {idle:.0f} s (waiting for {self._what}; {self.name} is "
                   f"{self.timeout:g} s): the run is stuck (a stalled file system, a collective "
                   "another process never joined, a blocking read). The stacks of every thread "
                   "of this process and of its workers follow; the run ends with exit code "
                   f"{HANG_EXIT_CODE}. Continue from the last checkpoint with --resume.")
        logger.error(message)
        children = multiprocessing.active_children()
        for child in children:  # their stacks first (they write to the same stderr)
            try:
                os.kill(child.pid, signal.SIGUSR2)
            except (OSError, AttributeError):
                pass
        time.sleep(1.0)
        for stream in [sys.stderr, *_log_file_streams()]:
            try:
                stream.flush()
                faulthandler.dump_traceback(file=stream, all_threads=True)
                stream.flush()
            except (OSError, ValueError):
                pass
        for child in children:
            child.kill()
        logging.shutdown()
        os._exit(HANG_EXIT_CODE)
