"""The run's environment on record: versions, devices, the code's git commit, the command line.

:func:`collect_env` gathers it as a JSON-able dict, :func:`format_env` as log lines, and
:func:`write_run_record` writes ``env.json`` next to a run's ``config.yaml`` and logs both the
environment and the full resolved config, so a result can be traced to its code and setup later
(what detectron2's ``default_setup`` logs, plus the git state).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

__all__ = ["collect_env", "format_env", "git_state", "write_run_record", "log_environment",
           "file_provenance"]

logger = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(folder: str = PACKAGE_DIR) -> Dict[str, object]:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``; ``commit`` is None (with a
    ``"reason"``) when git is not installed or the code is not in a checkout (a wheel install)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # Tracked files only: untracked outputs (runs, datasets) do not make the code dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        why = getattr(e, "stderr", "") or str(e)
        return {"commit": None, "dirty": None,
                "reason": f"not a git checkout ({why.strip().splitlines()[0] if why.strip() else e})"}
    return {"commit": commit, "dirty": dirty}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("soco_d2")
    except Exception:  # not installed (run from a checkout)
        import soco_d2

        return soco_d2.__version__


def _gpus() -> List[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def collect_env(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Python, torch, torchvision, CUDA, cuDNN, NCCL, GPUs, CPUs, this package and the command."""
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # built without NCCL
            nccl = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpus = _gpus()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    argv = list(sys.argv if argv is None else argv)
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
        "argv": argv,
        "cwd": os.getcwd(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "soco_d2": {"version": _package_version(), "path": PACKAGE_DIR, **git_state()},
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": cuda,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
        "cpu_usable": affinity,
    }


def format_env(env: Dict[str, object]) -> str:
    """A few lines for the log."""
    pkg = env["soco_d2"]
    if pkg.get("commit"):
        code = f"git {pkg['commit'][:12]}{' (dirty: uncommitted changes)' if pkg['dirty'] else ''}"
    else:
        code = f"git commit unknown: {pkg.get('reason')}"
    gpus = ", ".join(env["gpus"]) or "none"
    return "\n".join([
        f"soco_d2 {pkg['version']} ({code}) at {pkg['path']}",
        f"python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}",
        f"CUDA {env['cuda']} (available: {env['cuda_available']}), cuDNN {env['cudnn']}, NCCL {env['nccl']}",
        f"GPUs ({env['gpu_count']}): {gpus}; CPUs: {env['cpu_count']} ({env['cpu_usable']} usable)",
        f"command: {env['command']}",
    ])


def log_environment(argv: Optional[List[str]] = None, log: logging.Logger = logger) -> Dict[str, object]:
    """Log :func:`collect_env` (a tool without a run folder); returns it."""
    env = collect_env(argv)
    log.info("Environment:\n%s", format_env(env))
    return env


def write_run_record(output_dir: str, config_text: str = "", argv: Optional[List[str]] = None,
                     log: logging.Logger = logger) -> Dict[str, object]:
    """Log the environment and the full resolved config, and write ``output_dir/env.json``
    (beside ``config.yaml``). Returns the environment."""
    from soco_d2.utils.fileio import atomic_write_text

    env = log_environment(argv, log)
    if config_text:
        log.info("Full config:\n%s", config_text)
    atomic_write_text(os.path.join(output_dir, "env.json"), json.dumps(env, indent=2) + "\n")
    return env


def file_provenance(path: str) -> str:
    """``path (N MB, modified <UTC time>, sha256 <first 12 hex digits>)``: where weights came from."""
    import hashlib

    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        return f"{path} (cannot read: {e.strerror or e})"
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    return (f"{path} ({st.st_size / 1e6:.1f} MB, modified {mtime:%Y-%m-%d %H:%M:%S} UTC, "
            f"sha256 {h.hexdigest()[:12]})")
