"""``OUTPUT_DIR``: checked before a run starts, and held by one run at a time.

Two runs writing into one folder overwrite each other's checkpoints and ``config.yaml`` and
interleave their ``metrics.json``. The main process of a run therefore holds an exclusive
``fcntl.flock`` on ``OUTPUT_DIR/run.lock`` for as long as it lives; the file names the host
and process id of the holder, so a second run is refused with both. The kernel releases the
lock when its process ends, however it ends (a crash, SIGKILL), so a lock file left by a dead
run is simply taken over, with a log line naming the run that left it (a run that ends
normally empties the file).

``flock`` is advisory and local to the file system's lock service: on a network file system
that does not support it (some NFS setups without a lock daemon) the lock cannot be taken and
the run stops, saying so; use a local or lock-capable ``OUTPUT_DIR`` there.
"""
import atexit
import errno
import logging
import os
import socket
import time
from typing import Dict

__all__ = ["OutputDirError", "check_output_dir", "lock_output_dir", "LOCK_FILE"]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_held: Dict[str, int] = {}  # real path of OUTPUT_DIR -> descriptor of its lock, in this process


class OutputDirError(RuntimeError):
    """``OUTPUT_DIR`` cannot be used: not a folder, not writable, or in use by another run."""


def _holder(text: str) -> str:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if not fields.get("pid"):
        return "an unknown process"
    return (f"process {fields['pid']} on host {fields.get('host', '?')} "
            f"(started {fields.get('started', '?')})")


def check_output_dir(path: str, lock: bool = True) -> None:
    """Raise :class:`OutputDirError` naming ``OUTPUT_DIR`` when ``path`` is a file, cannot be
    created or written, or (``lock``) is locked by a running run. Changes nothing. Call it
    before starting processes (``lock`` only where the run's main process will start: not on
    the other machines or ranks of a job); :func:`lock_output_dir` then takes the lock."""
    if not path:
        raise OutputDirError("OUTPUT_DIR is empty; set it to the folder the run writes to.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"OUTPUT_DIR {path!r} exists and is not a folder; choose another "
                             "OUTPUT_DIR or remove the file.")
    existing = os.path.abspath(path)  # the folder itself, or the nearest folder it goes in
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputDirError(f"OUTPUT_DIR {path!r} cannot be created: {existing!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == os.path.abspath(path) else f"would be created in {existing!r}, which is"
        raise OutputDirError(f"OUTPUT_DIR {path!r} {what} not writable (permissions or a "
                             "read-only file system); choose a writable OUTPUT_DIR.")
    if not os.path.isdir(path):
        return  # a new folder: no run can hold it
    if not lock or os.path.realpath(path) in _held:
        return
    if not os.path.exists(os.path.join(path, LOCK_FILE)):
        return  # never locked
    fd = _open_lock(path)
    try:
        _try_lock(fd, path)
    finally:
        os.close(fd)  # closing releases the lock: the run takes it again


def _open_lock(path: str) -> int:
    try:
        return os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputDirError(f"OUTPUT_DIR {path!r} is not writable ({e.strerror or e}); choose "
                             "a writable OUTPUT_DIR.") from None


def _try_lock(fd: int, path: str) -> str:
    """Lock ``fd`` (non-blocking); returns what the lock file said before."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            raise OutputDirError(
                f"OUTPUT_DIR {path!r} is in use by another run: {_holder(text)} holds "
                f"{os.path.join(path, LOCK_FILE)}. Two runs in one folder overwrite each "
                "other's checkpoints; wait for it to end, stop it, or choose another "
                "OUTPUT_DIR.") from None
        raise OutputDirError(
            f"Cannot lock {os.path.join(path, LOCK_FILE)} ({e.strerror or e}): the file system "
            "of OUTPUT_DIR does not support file locks; choose an OUTPUT_DIR on a local or "
            "lock-capable file system.") from None
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


def lock_output_dir(path: str) -> None:
    """Take the lock of ``OUTPUT_DIR`` for the life of this process (main process of a run;
    a second call for the same folder in this process does nothing). Raises
    :class:`OutputDirError` when another run holds it."""
    key = os.path.realpath(path)
    if key in _held:
        return
    check_output_dir(path, lock=False)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"OUTPUT_DIR {path!r} cannot be created: {e.strerror or e}. "
                             "Choose a writable OUTPUT_DIR.") from None
    fd = _open_lock(path)
    try:
        before = _try_lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    if before.strip():
        logger.warning("Taking over %s, left by %s, which ended without releasing it (killed "
                       "or crashed).",
                    os.path.join(path, LOCK_FILE), _holder(before))
    record = (f"host={socket.gethostname()}\npid={os.getpid()}\n"
              f"started={time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    _held[key] = fd
    atexit.register(os.ftruncate, fd, 0)  # ended normally: the next run has nothing to take over

