"""benchmarks/bench_gpu.py: its CPU smoke run (every part, tiny) writes the JSON and the table,
and a failing part is recorded while the next ones run."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_gpu.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--smoke", "--out", str(tmp_path)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    parts = data["parts"]
    table = (tmp_path / "bench_gpu.md").read_text()
    assert data["meta"]["device_name"] == "cpu" and data["meta"]["peak_tflops"] is None
    names = list(parts)
    for method in ("soco_faithful", "soco_per_view", "soco_star", "detco", "soco_floor", "soco_star_floor",
                   "detco_floor"):
        assert f"step/{method}/bf16/cl/eager/b2" in names
    for name in ("sync_debug", "loader/soco_faithful/w1", "loader/detco/w2", "finetune/mask_rcnn/fp32",
                 "step/soco_faithful/bf16/nchw/eager/b2", "step/soco_faithful/bf16/cl/eager/b4",
                 "step/soco_floor/bf16/cl/compile/b2"):
        assert name in names
    for name, r in parts.items():
        if r["status"] == "skipped":  # what a CPU cannot run
            assert "fp16" in name or "finetune/mask_rcnn/bf16" == name, (name, r)
            continue
        assert r["status"] == "ok", (name, r)
        assert name in table
        if name.startswith(("step/", "loader/", "finetune/")):
            assert r["images_per_s"] > 0 and r["step_s"] > 0, (name, r)
        if name.startswith("step/") and "compile" not in name or name.startswith("finetune/"):
            assert r["flops_per_step"] > 1e6, (name, r)
        if name.startswith("loader/"):
            assert r["loader_images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1, (name, r)
    assert sorted(k for k in parts["sync_debug"] if k in ("soco_faithful", "detco")) == ["detco", "soco_faithful"]


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    bench = _bench()
    calls = []

    def broken(b, amp):
        calls.append(amp)
        if not amp:
            raise RuntimeError("CUDA error: out of memory")
        return {"status": "ok", "images_per_s": 1.0, "step_s": 1.0}

    monkeypatch.setattr(bench, "part_finetune", broken)
    data = bench.main(["--device", "cpu", "--smoke", "--parts", "finetune", "--out", str(tmp_path)])
    assert calls == [False, True]
    fp32, bf16 = data["parts"]["finetune/mask_rcnn/fp32"], data["parts"]["finetune/mask_rcnn/bf16"]
    assert fp32["status"] == "error" and "out of memory" in fp32["error"]
    assert bf16["status"] == "ok"
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["parts"]["finetune/mask_rcnn/fp32"]["status"] == "error"
    assert "finetune/mask_rcnn/fp32" in (tmp_path / "bench_gpu.md").read_text()


def test_time_box_and_budget(tmp_path, monkeypatch):
    bench = _bench()
    with pytest.raises(bench.PartTimeout):
        with bench.time_box(0.05):
            time.sleep(2)
    monkeypatch.setattr(bench, "part_finetune", lambda b, amp: {"status": "ok"})
    data = bench.main(["--device", "cpu", "--smoke", "--parts", "finetune", "--budget-s", "5", "--out", str(tmp_path)])
    assert all(r["status"] == "skipped" and r["reason"].startswith("budget") for r in data["parts"].values())


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("Tesla T4", None)])
def test_peak_flops_of_the_card(name, peak, monkeypatch):
    import torch

    bench = _bench()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.peak_tflops(torch.device("cuda", 0)) == peak
    assert bench.peak_tflops(torch.device("cpu")) is None
