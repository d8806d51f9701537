import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from soco_d2.config import load_config
from soco_d2.engine.arguments import default_argument_parser
from soco_d2.engine.launch import default_backend, dist_env_from_environ, first_slurm_host

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from soco_d2.engine.launch import launch
    from soco_d2.utils import comm

    def main(out_dir):
        info = {"rank": comm.get_rank(), "world": comm.get_world_size(),
                "local_rank": comm.get_local_rank(), "pid": os.getpid()}
        with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
            json.dump(info, f)

    if __name__ == "__main__":
        # --num-gpus 3 must be ignored: the launcher already started the processes
        launch(main, num_gpus_per_machine=3, backend="gloo", args=(sys.argv[1],))
''')
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST",
                 "SLURM_JOB_ID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _read(out_dir):
    files = sorted(f for f in os.listdir(out_dir) if f.startswith("rank"))
    return [json.loads(open(os.path.join(out_dir, f)).read()) for f in files]


def test_parser_and_overrides():
    args = default_argument_parser().parse_args(
        ["--config-file", "", "--num-gpus", "4", "--resume", "SOLVER.IMS_PER_BATCH", "256",
         "OUTPUT_DIR", "out/x"])
    assert args.num_gpus == 4 and args.num_machines == 1 and args.machine_rank == 0
    assert args.dist_url == "auto" and args.resume and not args.eval_only
    assert args.opts == ["SOLVER.IMS_PER_BATCH", "256", "OUTPUT_DIR", "out/x"]
    cfg = load_config(args.config_file, args.opts)
    assert cfg.SOLVER.IMS_PER_BATCH == 256 and cfg.OUTPUT_DIR == "out/x"


def test_default_backend_on_cpu():
    assert default_backend("cpu") == "gloo"


def test_environment_detection():
    assert dist_env_from_environ({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    d = dist_env_from_environ(env)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("torchrun", 3, 8, 1, 2)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42"}
    d = dist_env_from_environ(slurm)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert d.master_port == 15042
    assert d.master_addr.startswith("gpu0")  # "gpu07" (from scontrol, or parsed without it)
    # one SLURM task (e.g. an salloc shell): --num-gpus decides, as without SLURM
    assert dist_env_from_environ({**slurm, "SLURM_NTASKS": "1"}) is None


def test_first_slurm_host(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert first_slurm_host("node[03-05,9],cpu1") == "node03"
    assert first_slurm_host("single") == "single"
    assert first_slurm_host("a12,b3") == "a12"


@pytest.mark.slow
def test_torchrun_does_not_spawn(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), str(script), str(tmp_path)],
        check=True, env=_clean_env(), timeout=300)
    infos = _read(tmp_path)
    assert [(i["rank"], i["local_rank"], i["world"]) for i in infos] == [(0, 0, 2), (1, 1, 2)]
    assert infos[0]["pid"] != infos[1]["pid"]


@pytest.mark.slow
def test_slurm_tasks_form_one_job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=_clean_env(
            SLURM_PROCID=r, SLURM_NTASKS=2, SLURM_LOCALID=r, SLURM_NODELIST="localhost",
            SLURM_JOB_ID=7, MASTER_PORT=port))
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    infos = _read(tmp_path)
    assert [(i["rank"], i["local_rank"], i["world"]) for i in infos] == [(0, 0, 2), (1, 1, 2)]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_spawned_process_after_the_same_step(tmp_path):
    """``kill <launcher>``: the two spawned processes agree on a step, write one checkpoint with
    both random states, and the launcher exits with the preemption code."""
    import signal
    import time

    import torch

    engine_tests = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {engine_tests!r})
        import toy_pretrain as toy
        from soco_d2.engine.launch import launch
        overrides = {{"SOLVER.MAX_ITER": 100000, "SOLVER.CHECKPOINT_PERIOD": 0, "LOG_PERIOD": 1}}
        launch(toy.train_and_dump, 2, backend="gloo", args=({str(out)!r}, "unused.pt", overrides))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 75, output[-3000:]
    name = (out / "last_checkpoint").read_text()
    state = torch.load(out / name, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_states"]) == 2
    assert name == f"model_{state['iteration']:07d}.pth" and 3 <= state["iteration"] < 100000
    assert "SIGTERM received: stopped after iteration" in output


# ---------------------------------------------------------------- which GPU each process uses
TORCHRUN_8 = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
              "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
SRUN_8 = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
          "SLURM_NTASKS_PER_NODE": "8", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "9"}


@pytest.fixture
def gpus(monkeypatch):
    """Pretend ``n`` CUDA devices are visible; records ``torch.cuda.set_device`` calls."""
    import torch

    state = {"n": 8, "set": []}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["n"] > 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state["set"].append(d))
    return state


@pytest.mark.parametrize("env, visible, expected", [
    (TORCHRUN_8, 8, 5),                                          # torchrun, all GPUs visible
    (SRUN_8, 8, 5),                                              # srun without GPU binding
    ({**SRUN_8, "CUDA_VISIBLE_DEVICES": "5"}, 1, 0),             # srun --gpus-per-task=1 / --gpu-bind
    ({**SRUN_8, "SLURM_GPUS_PER_TASK": "2"}, 2, 1),              # two GPUs bound to each task
    ({}, 8, 5),                                                  # --num-gpus 8 (spawned here)
])
def test_cuda_device_of_each_launcher(gpus, env, visible, expected):
    from soco_d2.engine.launch import cuda_device_index

    gpus["n"] = visible
    assert cuda_device_index(5, 8, env) == expected


@pytest.mark.parametrize("env, names", [
    (TORCHRUN_8, "LOCAL_RANK / LOCAL_WORLD_SIZE"),
    ({**TORCHRUN_8, "LOCAL_WORLD_SIZE": "8"}, "torchrun --nproc-per-node"),
    (SRUN_8, "SLURM_LOCALID / SLURM_NTASKS_PER_NODE"),
    ({}, "--num-gpus"),
])
def test_more_local_processes_than_devices_without_binding_is_an_error(gpus, env, names):
    from soco_d2.engine.launch import cuda_device_index

    gpus["n"] = 4
    with pytest.raises(RuntimeError) as e:
        cuda_device_index(5, 8, {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    text = str(e.value)
    assert names in text and "CUDA_VISIBLE_DEVICES='0,1,2,3'" in text and "only 4 CUDA" in text
    assert "--gpus-per-task=1" in text and "at most 4 process(es) per machine" in text
    gpus["n"] = 1  # one visible device: a binding under SLURM, two processes on one GPU otherwise
    if env is SRUN_8:
        assert cuda_device_index(5, 8, env) == 0
    else:
        with pytest.raises(RuntimeError, match="only 1 CUDA"):
            cuda_device_index(5, 8, env)


def test_launch_and_resolve_device_use_the_bound_gpu(gpus, monkeypatch):
    """srun with one GPU per task: local rank 5 sets and trains on device 0, not "GPU 5"."""
    import importlib

    import torch
    import torch.distributed as dist

    from soco_d2.engine.run_setup import resolve_device
    from soco_d2.utils import comm

    gpus["n"] = 1
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in {**SRUN_8, "MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": "5"}.items():
        monkeypatch.setenv(k, v)

    class Stop(Exception):
        pass

    def no_group(**kwargs):
        raise Stop(kwargs)

    monkeypatch.setattr(dist, "init_process_group", no_group)
    with pytest.raises(Stop):
        importlib.import_module("soco_d2.engine.launch").launch(lambda: None, 1, backend="nccl")
    assert gpus["set"] == [0]
    monkeypatch.setattr(comm, "_LOCAL_RANK", 5)
    monkeypatch.setattr(comm, "_LOCAL_WORLD_SIZE", 8)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit index is kept
    gpus["n"] = 8
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_device("cuda") == torch.device("cuda", 5)
