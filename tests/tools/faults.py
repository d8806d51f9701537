"""Running a tool as a subprocess under a hard timeout, and injecting faults into its workers.

``run_bounded`` starts the tool in a session of its own and kills the whole session when the
timeout passes, so a hang (of the tool or of one of its workers, which would keep the output
pipes open) fails the test instead of blocking it.

``worker_fault_env`` makes a class's ``__getitem__`` raise a given built-in exception inside
torch data-loader workers only, in every Python process the tool starts (spawned ranks
included): a ``sitecustomize`` module, which Python imports at start-up, applies the patch.
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

    _module, _cls, _exc = _spec.split(":")
    _klass = getattr(importlib.import_module(_module), _cls)
    _original = _klass.__getitem__

    def __getitem__(self, item):
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            raise getattr(builtins, _exc)("fault injected in a loader worker")
        return _original(self, item)

    _klass.__getitem__ = __getitem__
'''


def worker_fault_env(tmp_path, target: str, exception: str) -> dict:
    """Environment for a subprocess whose loader workers raise ``exception`` (a built-in name)
    from ``target.__getitem__`` (``"module:Class"``)."""
    hook = tmp_path / "fault_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(hook), REPO, env.get("PYTHONPATH", "")) if p)
    env["SOCO_TEST_WORKER_RAISES"] = f"{target}:{exception}"
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
