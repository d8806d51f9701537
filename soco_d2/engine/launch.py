"""Start one process per GPU (or CPU worker), on one or several machines.

Three ways to get a process group, checked in this order:

1. ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``): the process is already one of the workers; nothing is
   spawned and the group is initialised from the environment (``env://``).
2. SLURM with more than one task (``srun``, one task per GPU): rank, world size and local rank
   come from ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``. The master address is
   ``MASTER_ADDR`` if set, else the first host of ``SLURM_NODELIST`` (expanded with
   ``scontrol show hostnames`` when available, else parsed from the list); the port is
   ``MASTER_PORT`` if set, else derived from ``SLURM_JOB_ID``.
3. Otherwise, detectron2's scheme: ``num_gpus_per_machine * num_machines`` processes, spawned
   here with :mod:`torch.multiprocessing` when that is more than one.

On a machine without GPUs (``gloo`` backend) a "GPU" is simply one CPU process.

Each process uses CUDA device ``local_rank % torch.cuda.device_count()``
(:func:`cuda_device_index`): its local rank when every process of the machine sees all of its
GPUs (torchrun, ``--num-gpus``, ``srun`` without GPU binding), device 0 when SLURM binds one GPU
per task (``--gpus-per-task=1``, ``--gpu-bind``). More local processes than visible devices
without such a binding would put two processes on one GPU: an error naming the variables read.

When this process spawned the workers, it forwards SIGTERM and SIGUSR1 to them (they stop
cleanly, see :mod:`soco_d2.engine.preemption`) and exits with their preemption exit code.
"""
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from datetime import timedelta
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException

from soco_d2.utils import comm

from .preemption import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS, Preempted

__all__ = ["launch", "launch_from_args", "default_backend", "DistEnv", "dist_env_from_environ",
           "first_slurm_host", "cuda_device_index"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


class DistEnv(NamedTuple):
    """A process's place in a job started by an external launcher."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def default_backend(device: str = "cuda") -> str:
    """``"nccl"`` when ``device`` is a CUDA device and CUDA is available, else ``"gloo"``."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return "nccl"
    return "gloo"


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``.

    Uses ``scontrol show hostnames`` when it is installed; otherwise parses the first entry.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                check=True, capture_output=True, text=True, timeout=30,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"Cannot read a host name from SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_local_world_size(env) -> int:
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0].split(",")[0])
    if "SLURM_TASKS_PER_NODE" in env:  # e.g. "4(x2)" or "2,1"
        return int(env["SLURM_TASKS_PER_NODE"].split("(")[0].split(",")[0])
    return int(env["SLURM_NTASKS"])


def _launcher_of(env) -> Optional[str]:
    """``"torchrun"``, ``"slurm"`` or ``None`` (this process starts the job itself)."""
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return "slurm"
    return None


def dist_env_from_environ(env=None) -> Optional[DistEnv]:
    """The torchrun / SLURM description of this process, or ``None`` when neither applies."""
    env = os.environ if env is None else env
    launcher = _launcher_of(env)
    if launcher == "torchrun":
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            "torchrun",
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    if launcher == "slurm":
        port = env.get("MASTER_PORT")
        if port is None:
            port = 15000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return DistEnv(
            "slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_local_world_size(env),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_NODELIST"]),
            master_port=int(port),
        )
    return None


_LAYOUT_VARS = {
    "torchrun": "LOCAL_RANK / LOCAL_WORLD_SIZE (torchrun --nproc-per-node)",
    "slurm": ("SLURM_LOCALID / SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE "
              "(srun --ntasks-per-node)"),
    None: "--num-gpus",
}


def _gpus_per_task(env) -> int:
    """``SLURM_GPUS_PER_TASK`` (``"1"``, ``"a100:1"``) as a number; 0 when not set."""
    m = re.search(r"(\d+)$", env.get("SLURM_GPUS_PER_TASK", ""))
    return int(m.group(1)) if m else 0


def cuda_device_index(local_rank: int, local_world_size: int, env=None) -> int:
    """The CUDA device of local process ``local_rank`` of ``local_world_size``:
    ``local_rank % torch.cuda.device_count()``.

    That is the local rank when the processes of a machine all see its GPUs (torchrun,
    ``--num-gpus``, ``srun`` without GPU binding), and device 0 when SLURM binds one GPU to each
    task (each task sees one device; ``SLURM_GPUS_PER_TASK`` devices when that is set). With more
    local processes than visible devices and no such binding, two processes would share a GPU
    (NCCL refuses): a ``RuntimeError`` that names the variables read and the fix.
    """
    env = os.environ if env is None else env
    n = torch.cuda.device_count()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    shown = (f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None
             else "CUDA_VISIBLE_DEVICES unset")
    if n == 0:
        raise RuntimeError(f"No CUDA device is visible to this process ({shown}); set "
                           "MODEL.DEVICE cpu or run where GPUs are visible.")
    launcher = _launcher_of(env)
    bound = launcher == "slurm" and (n == 1 or _gpus_per_task(env) == n)
    if local_world_size > n and not bound:
        raise RuntimeError(
            f"Local rank {local_rank} of {local_world_size} processes on this machine (read from "
            f"{_LAYOUT_VARS[launcher]}) but only {n} CUDA device(s) are visible ({shown}): "
            f"two processes would share a GPU. Start at most {n} process(es) per machine "
            "(--num-gpus, torchrun --nproc-per-node, srun --ntasks-per-node), or under SLURM "
            "bind one GPU to each task (srun --gpus-per-task=1 or --gpu-bind=single:1).")
    return local_rank % n


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    backend: Optional[str] = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in every process of the job.

    Args:
        num_gpus_per_machine: processes per machine (GPUs; CPU processes with ``gloo``).
        dist_url: ``tcp://host:port`` of machine 0, or ``"auto"`` for a free local port.
        backend: ``"nccl"`` or ``"gloo"``; default :func:`default_backend` ``("cuda")``.
    """
    backend = backend or default_backend("cuda")
    denv = dist_env_from_environ()
    if denv is not None:
        if denv.launcher == "torchrun":
            init_method = "env://"
        else:
            init_method = f"tcp://{denv.master_addr}:{denv.master_port}"
        logger.info(
            "Started by %s: rank %d of %d (local rank %d); ignoring --num-gpus/--num-machines.",
            denv.launcher, denv.rank, denv.world_size, denv.local_rank,
        )
        return _run_worker(
            main_func, args, backend, init_method, denv.rank, denv.world_size,
            denv.local_rank, denv.local_world_size, timeout,
        )

    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError('--dist-url "auto" only works on one machine; give tcp://<host>:<port>.')
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// init is unreliable across machines; prefer tcp://<host>:<port>.")
    context = mp.start_processes(
        _spawned_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, args, backend, dist_url, world_size, num_gpus_per_machine,
              machine_rank, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    with _forward_signals(context.processes):
        try:
            while not context.join():
                pass
        except ProcessExitedException as e:
            if e.exit_code == PREEMPTED_EXIT_CODE:
                raise Preempted(f"the workers stopped for preemption ({e})") from None
            raise


@contextlib.contextmanager
def _forward_signals(processes):
    """Pass SIGTERM / SIGUSR1 received by this (spawning) process on to ``processes``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawned_worker(local_rank, main_func, args, backend, dist_url, world_size,
                    num_gpus_per_machine, machine_rank, timeout):
    rank = machine_rank * num_gpus_per_machine + local_rank
    _run_worker(main_func, args, backend, dist_url, rank, world_size, local_rank,
                num_gpus_per_machine, timeout)


def _run_worker(main_func, args, backend, init_method, rank, world_size, local_rank,
                local_world_size, timeout):
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_index(local_rank, local_world_size))
    dist.init_process_group(
        backend=backend, init_method=init_method, world_size=world_size, rank=rank,
        timeout=timeout,
    )
    comm.set_local_rank(local_rank, local_world_size)
    try:
        comm.synchronize()
        return main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_from_args(main_func: Callable, args, device: str):
    """``launch(main_func, ...)`` with the process layout of parsed ``default_argument_parser``
    arguments (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``); the
    backend follows ``device`` (``MODEL.DEVICE``). ``main_func`` receives ``args``."""
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=default_backend(device),
    )
