"""benchmarks/bench_demo_costs.py: stage costs fitted from a demo's records, and its table."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_demo_costs", os.path.join(REPO, "benchmarks", "bench_demo_costs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def demo_output(tmp_path):
    """A demo's records: 10 pretraining iterations at 1.5 s with 3 probes of 0.5 s over 50 crops,
    2 x 20 fine-tuning iterations at 0.5 s (1.0 and 0.6 s), 40 val images inferred in 8 s."""
    out = tmp_path / "demo"
    summary = {
        "budget": {"minutes": 1.0, "pretrain_iters": 10, "finetune_iters": 20, "knn_points": 2,
                   "projected_seconds": {"proposals": 5.0, "pretrain": 20.0, "finetune_soco": 15.0,
                                         "finetune_scratch": 15.0},
                   "projected_total_seconds": 55.0},
        "stage_seconds": {"data": 0.5, "proposals": 9.0, "pretrain": 19.5, "convert": 0.2,
                          "finetune_soco": 20.0, "finetune_scratch": 22.0, "finetune": 42.0, "report": 0.3},
        "stage_cpu_seconds": {"data": 0.4, "proposals": 17.0, "pretrain": 35.0, "convert": 0.2,
                              "finetune_soco": 38.0, "finetune_scratch": 41.0, "finetune": 79.0, "report": 0.3},
        "total_seconds": 71.5, "total_cpu_seconds": 131.9,
        "proposals": {"images": 80}, "data": {"num_val": 40},
    }
    out.mkdir()
    (out / "demo_summary.json").write_text(json.dumps(summary))
    _write_rows(out / "pretrain" / "metrics.json",
                [{"iteration": 0, "knn_time": 0.5}, {"iteration": 5, "iter_time": 1.4, "knn_time": 0.5},
                 {"iteration": 10, "iter_time": 1.6, "knn_time": 0.5}])
    for run, t in (("soco", 0.5), ("scratch", 0.6)):
        _write_rows(out / f"finetune_{run}" / "metrics.json",
                    [{"iteration": 10, "iter_time": t - 0.1}, {"iteration": 20, "iter_time": t + 0.1}])
    for split in ("train", "val"):
        for i in range(25):
            (out / "probe" / split / "a").mkdir(parents=True, exist_ok=True)
            (out / "probe" / split / "a" / f"{i}.png").write_bytes(b"x")
    (out / "log.txt").write_text("... Inference on 40 images: 7.0 s (0.175 s / image).\n"
                                 "... Inference on 40 images: 9.0 s (0.225 s / image).\n")
    return out


def test_fit_costs(demo_output):
    bench = _bench()
    costs = bench._demo_tool().StageCosts(proposals_start=1.0)
    fitted = bench.fit_costs(str(demo_output), costs)
    assert fitted["proposals_start"] == 1.0
    assert fitted["proposals_per_image"] == pytest.approx((9.0 - 1.0) / 80)
    assert fitted["pretrain_iter"] == pytest.approx(1.5)
    assert fitted["pretrain_start"] == pytest.approx(19.5 - 10 * 1.5 - 1.5)
    assert fitted["knn_probe_per_crop"] == pytest.approx(0.5 / 50)
    assert fitted["finetune_iter"] == pytest.approx(0.55)
    # fine-tuning stages: 21 s on average, 11 of them iterations, 8 the evaluation
    assert fitted["evaluation_per_image"] == pytest.approx(8.0 / 40)
    assert fitted["finetune_start"] == pytest.approx(21.0 - 20 * 0.55 - 8.0)


def test_table(demo_output, capsys):
    assert _bench().main([str(demo_output)]) == 0
    out = capsys.readouterr().out
    assert "| pretrain | 20.0 | 19.5 | 35.0 |" in out
    assert "| other (data, conversion, report) | 0 | 1.0 | |" in out
    assert "| total | 55.0 | 71.5 | 131.9 |" in out
    assert "pretrain_iter = 1.5  (" in out
