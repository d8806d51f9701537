import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from soco_d2.utils import env as env_mod
from soco_d2.utils.env import collect_env, file_provenance, format_env, git_state, write_run_record

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_collect_env_has_the_versions_devices_and_command():
    env = collect_env(["tools/pretrain_net.py", "--config-file", "a b.yaml"])
    assert env["python"] == sys.version.split()[0]
    assert env["torch"] == torch.__version__
    for key in ("torchvision", "cuda", "cudnn", "nccl", "gpus", "gpu_count", "cpu_count"):
        assert key in env
    assert env["gpu_count"] == len(env["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert env["cpu_count"] == os.cpu_count()
    assert env["command"].endswith("tools/pretrain_net.py --config-file 'a b.yaml'")
    assert env["soco_d2"]["version"]
    json.dumps(env)  # JSON-able
    text = format_env(env)
    assert "torch " + torch.__version__ in text and "'a b.yaml'" in text


@needs_git
def test_git_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "run_output.txt").write_text("untracked outputs do not count\n")
    assert git_state(str(tmp_path)) == {"commit": head, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(str(tmp_path)) == {"commit": head, "dirty": True}


def test_no_git_or_no_checkout_is_recorded_not_raised(tmp_path, monkeypatch):
    state = git_state(str(tmp_path))  # not a checkout
    assert state["commit"] is None and "not a git checkout" in state["reason"]
    monkeypatch.setenv("PATH", str(tmp_path))  # git absent
    state = git_state(str(tmp_path))
    assert state == {"commit": None, "dirty": None, "reason": "git is not installed"}
    assert "git commit unknown: git is not installed" in format_env(collect_env([]))


def test_write_run_record(tmp_path, caplog):
    caplog.set_level("INFO")
    env = write_run_record(str(tmp_path), "SEED: 7\nOUTPUT_DIR: x\n", argv=["tool.py", "A", "1"])
    assert json.loads((tmp_path / "env.json").read_text()) == env
    assert "Full config:\nSEED: 7" in caplog.text and "torch " + torch.__version__ in caplog.text


def test_file_provenance(tmp_path):
    import hashlib

    f = tmp_path / "w.pth"
    f.write_bytes(b"x" * 3_000_000)
    text = file_provenance(str(f))
    assert str(f) in text and "3.0 MB" in text and hashlib.sha256(f.read_bytes()).hexdigest()[:12] in text
    assert "cannot read" in file_provenance(str(tmp_path / "missing.pth"))


def test_training_run_writes_env_json_beside_config_and_logs_the_config(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
    import toy_pretrain as toy

    cfg = toy.toy_cfg(tmp_path)
    from soco_d2.engine.trainer import PretrainTrainer

    PretrainTrainer(cfg, model=toy.EngineToyNet(cfg), dataset=toy.ToyDataset())
    env = json.loads((tmp_path / "env.json").read_text())
    assert (tmp_path / "config.yaml").exists()
    assert env["torch"] == torch.__version__ and env["soco_d2"]["path"] == env_mod.PACKAGE_DIR
    log = (tmp_path / "log.txt").read_text()
    assert "Full config:" in log and cfg.dump().splitlines()[0] in log
