"""Running a tool as a subprocess under a hard timeout, and injecting faults into its workers.

``run_bounded`` starts the tool in a session of its own and kills the whole session when the
timeout passes, so a hang (of the tool or of one of its workers, which would keep the output
pipes open) fails the test instead of blocking it.

``worker_fault_env`` makes a function or method raise a given built-in exception (or SIGKILL
its process) inside the tool's worker processes only (torch data-loader workers, or pool
processes): a ``sitecustomize`` module, which Python imports at start-up in every process the
tool starts (spawned ranks included), applies the patch.
"""
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SITECUSTOMIZE = '''
import os

_spec = os.environ.get("SOCO_TEST_WORKER_RAISES")
if _spec:
    import builtins
    import importlib
    import multiprocessing
    import signal

    _module, _attr, _exc, _where = _spec.split(":")
    _owner = importlib.import_module(_module)
    *_path, _name = _attr.split(".")
    for _part in _path:
        _owner = getattr(_owner, _part)
    _original = getattr(_owner, _name)

    def _in_worker():
        if _where == "loader":
            from torch.utils.data import get_worker_info

            return get_worker_info() is not None
        return multiprocessing.parent_process() is not None  # a pool process

    def _faulty(*args, **kwargs):
        if _in_worker():
            if _exc == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            raise getattr(builtins, _exc)("fault injected in a worker")
        return _original(*args, **kwargs)

    setattr(_owner, _name, _faulty)
'''


def worker_fault_env(tmp_path, target: str, exception: str, where: str = "loader") -> dict:
    """Environment for a subprocess in whose workers ``target`` (``"module:attr"``, e.g.
    ``"pkg.mod:Class.__getitem__"``) raises ``exception`` (a built-in exception's name, or
    ``"SIGKILL"``: the worker kills itself). ``where``: ``"loader"`` (torch data-loader
    workers) or ``"pool"`` (any process started by the tool's process)."""
    hook = tmp_path / "fault_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(hook), REPO, env.get("PYTHONPATH", "")) if p)
    env["SOCO_TEST_WORKER_RAISES"] = f"{target}:{exception}:{where}"
    return env


def run_bounded(cmd, timeout: float, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` with stdout and stderr, in a new session; when ``timeout``
    seconds pass, the whole session is killed and the test fails as a hang."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:3]))} ... did not end within {timeout} s (hung)\n"
                    f"{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


PYTHON = sys.executable
