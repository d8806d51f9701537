"""benchmarks/bench_learning.py at a toy size on a generated copy of the data layout: both
benchmark configs train with the kNN and health monitors, the table and the PNG come out."""
import importlib.util
import json
import math
import os
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine"))
import monitor_toy as mtoy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning", os.path.join(REPO, "benchmarks", "bench_learning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scenes(folder, n, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
        cv2.rectangle(img, (10, 10), (50, 60), (255, 255, 255), -1)
        cv2.imwrite(os.path.join(folder, f"{i}.png"), img)


@pytest.mark.slow
def test_toy_run_writes_curves_table_and_png(tmp_path, capsys):
    root = tmp_path / "data"
    _scenes(root / "coco_mini" / "train2017", 2, 0)
    _scenes(root / "coco_mini" / "val2017", 1, 1)
    _scenes(root / "pennfudan" / "PNGImages", 1, 2)
    mtoy.make_labeled_folder(root / "caltech101_subset", per_class=4, size=40)
    out = tmp_path / "out"
    rc = _bench().main([str(a) for a in [
        "--data-root", root, "--output-dir", out, "--seeds", 0, 1, "--iters", 2, "--batch", 2,
        "--probe-period", 1, "--probe-size", 32, "--soco-opts", "DATALOADER.NUM_WORKERS", 0,
        "--detco-opts", "MODEL.DETCO.QUEUE_SIZE", 8, "DATALOADER.NUM_WORKERS", 0]])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["knn"]) == {"soco/knn_res5_top1", "soco/knn_box_top1", "detco/knn_res5_top1"}
    for key, rows in summary["knn"].items():
        assert [k for k in rows if k != "target"] == ["0", "1", "2"], key
        assert len(rows["2"]["per_seed"]) == 2 and "met" in rows["target"]
    assert (out / "learning_curves.png").stat().st_size > 10_000
    # every run moved every stage, by a small step from its own rebuilt initialisation (a wrong
    # rebuild, an independent init, would be near sqrt(2))
    assert set(summary["weight_change"]) == {"soco/seed0", "soco/seed1", "detco/seed0", "detco/seed1"}
    for run, change in summary["weight_change"].items():
        assert list(change) == ["stem", "res2", "res3", "res4", "res5"], run
        assert all(0 < v < 0.2 for v in change.values()), (run, change)
    detco = [json.loads(x) for x in (out / "detco_seed1" / "metrics.json").read_text().splitlines()]
    assert any(r.get("chance_level") == pytest.approx(math.log(9)) for r in detco)
    assert any("rankme" in r for r in detco)
    for run in ("soco_seed0", "detco_seed1"):  # probes with recomputed BN statistics by default
        assert "BN_STATS: train" in (out / run / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert "| detco | res5 | 2 |" in printed and "target (> 3 std)" in printed
    assert "| soco | 1 | " in printed and "initialisation -> final" in printed


def test_finished_finetuning_is_reused_unless_its_command_changes(tmp_path, monkeypatch):
    bench = _bench()
    calls = []

    def fake_tool(tool, config, opts):
        calls.append(opts)
        out = opts[opts.index("OUTPUT_DIR") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write(json.dumps({"iteration": 3, "bbox/AP": 10.0 + len(calls), "segm/AP": 5.0}) + "\n")

    monkeypatch.setattr(bench, "_run_tool", fake_tool)

    def args(**kw):
        base = dict(output_dir=str(tmp_path), device="cpu", depth=18, finetune_iters=4,
                    finetune_opts=[], overwrite=False)
        base.update(kw)
        return type("Args", (), base)

    first = bench._finetune(args(), "soco", "w.pkl", 0)
    assert first["bbox/AP"] == 11.0 and len(calls) == 1
    assert "SOLVER.WARMUP_ITERS" in calls[0] and calls[0][calls[0].index("SOLVER.WARMUP_ITERS") + 1] == "1"
    assert bench._finetune(args(), "soco", "w.pkl", 0) == first and len(calls) == 1  # reused
    assert bench._finetune(args(finetune_iters=8), "soco", "w.pkl", 0)["bbox/AP"] == 12.0  # new command
    assert bench._finetune(args(finetune_iters=8, overwrite=True), "soco", "w.pkl", 0)["bbox/AP"] == 13.0
    assert bench._finetune(args(), "scratch", "", 0)["bbox/AP"] == 14.0  # another init, another folder
    assert len(calls) == 4


def test_target_needs_a_gain_above_three_std_over_at_least_two_seeds():
    target = _bench()._target
    assert target({"mean": 9.0, "std": 0.5}, {"mean": 10.6, "std": 0.3}, 3, 3) == (pytest.approx(1.6), True)
    assert target({"mean": 9.0, "std": 0.5}, {"mean": 10.4, "std": 0.3}, 3, 3) == (pytest.approx(1.4), False)
    assert target({"mean": 9.0, "std": 0.1}, {"mean": 10.0, "std": 0.4}, 3, 2)[1] is False  # the larger std
    assert target({"mean": 9.0, "std": 0.0}, {"mean": 9.0, "std": 0.0}, 1, 3)[1] is False  # one probe point
    assert target({"mean": 8.6, "std": 0.0}, {"mean": 8.8, "std": 0.0}, 5, 1) == (pytest.approx(0.2), None)
