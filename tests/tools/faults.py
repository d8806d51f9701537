"""Running a tool as a subprocess under a hard timeout, and injecting faults into its workers.

``run_bounded`` starts the tool in a session of its own and kills the whole session when the
timeout passes, so a hang (of the tool or of one of its workers, which would keep the output
pipes open) fails the test instead of blocking it. ``run_and_signal`` starts a training tool
and signals it (or its whole process group) once its ``metrics.json`` reaches an iteration.

``worker_fault_env`` makes a function or method raise a given built-in exception (or SIGKILL
its process, or never return) inside the tool's worker processes only (torch data-loader
workers, or pool processes): a ``sitecustomize`` module, which Python imports at start-up in every process the
tool starts (spawned ranks included), applies the patch.
"""
import json
import os
import signal
import subprocess
import time

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
            if _exc == "HANG":  # a read that never returns (a stalled file system)
                import time

                time.sleep(3600)
            raise getattr(builtins, _exc)("fault injected in a worker")
        return _original(*args, **kwargs)

    setattr(_owner, _name, _faulty)
'''


def worker_fault_env(tmp_path, target: str, exception: str, where: str = "loader") -> dict:
    """Environment for a subprocess in whose workers ``target`` (``"module:attr"``, e.g.
    ``"pkg.mod:Class.__getitem__"``) raises ``exception`` (a built-in exception's name;
    ``"SIGKILL"``: the worker kills itself; ``"HANG"``: it never returns). ``where``: ``"loader"`` (torch data-loader
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


def _read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_and_signal(cmd, out, iteration, sig, timeout=240, group=False):
    """Start ``cmd``, send ``sig`` once ``metrics.json`` reaches ``iteration``, to the trainer
    or (``group``) to every process of the job; returns the process."""
    metrics = os.path.join(out, "metrics.json")
    rows_before = len(_read_metrics(out)) if os.path.exists(metrics) else 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            rows = _read_metrics(out)[rows_before:] if os.path.exists(metrics) else []
        except json.JSONDecodeError:  # a line being written
            rows = []
        if rows and rows[-1]["iteration"] >= iteration:  # a row written by this run
            if sig == signal.SIGKILL or group:
                os.killpg(proc.pid, sig)  # the whole job: trainer and loader workers
            else:
                os.kill(proc.pid, sig)  # the trainer only, as `kill` or a scheduler does
            break
        time.sleep(0.05)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {timeout} s after {signal.Signals(sig).name}")
    return proc
