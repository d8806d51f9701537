"""tools/demo.py: the whole chain at a tiny budget, its plan and projection, user data, bad input."""
import importlib.util
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from soco_d2.data.synthetic import make_synthetic_coco
from soco_d2.finetune.trainer import FinetuneTrainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool():
    spec = importlib.util.spec_from_file_location("demo_tool", os.path.join(REPO, "tools", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load_tool()
DemoError, DemoSettings, run_demo, prepare_data = demo.DemoError, demo.DemoSettings, demo.run_demo, demo.prepare_data
format_ap_table, probe_folders = demo.format_ap_table, demo.probe_folders
knn_curve, format_knn_curve, knn_verdict = demo.knn_curve, demo.format_knn_curve, demo.knn_verdict

# Shrinks the demo configs further so a run takes seconds: 32 px views, batch 2, 64 px detector input.
PRETRAIN_TINY = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.SOCO.VIEW1_SIZE", "32", "INPUT.SOCO.VIEW2_SIZE", "32",
                 "INPUT.SOCO.VIEW3_SIZE", "32", "LOG_PERIOD", "1"]
FINETUNE_TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                 "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
                 "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
                 "MODEL.RPN.POST_NMS_TOPK_TEST", "30", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
                 "TEST.PRECISE_BN.NUM_ITER", "1", "LOG_PERIOD", "1"]


def tiny_settings(out, **kw):
    base = dict(output_dir=str(out), num_train_images=12, num_val_images=4, image_size=64,
                pretrain_iters=2, finetune_iters=2, workers=1, progress=False,
                pretrain_opts=PRETRAIN_TINY, finetune_opts=FINETUNE_TINY)
    base.update(kw)
    return DemoSettings(**base)


@pytest.fixture
def keep_threads():
    """The trainers size torch's thread pool for a CPU run; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def backbone_at_start(monkeypatch):
    """conv1 weight of every fine-tuned detector when training starts, by OUTPUT_DIR."""
    seen = {}
    original = FinetuneTrainer.train

    def train(self):
        seen[self.cfg.OUTPUT_DIR] = self.model.backbone.body.conv1.weight.detach().clone()
        return original(self)

    monkeypatch.setattr(FinetuneTrainer, "train", train)
    return seen


@pytest.mark.slow
def test_demo_end_to_end_on_synthetic_data(tmp_path, keep_threads, backbone_at_start, capsys):
    out = tmp_path / "demo"
    summary = run_demo(tiny_settings(out))

    # Every stage left its output.
    assert (out / "proposals.socoprop").is_file()
    assert summary["proposals"]["images"] == 12
    checkpoint = out / "pretrain" / "model_final.pth"
    assert checkpoint.is_file()
    pre_rows = [json.loads(x) for x in (out / "pretrain" / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in pre_rows if "total_loss" in r] == [1, 2]
    # the kNN monitor on the object crops: iteration 0 (random init), then every iteration here
    assert [r["iteration"] for r in pre_rows if "knn_res5_top1" in r] == [0, 1, 2]
    assert set(summary["pretrain"]["knn_top1"]) == {"res5", "box"}
    assert "BN_STATS: train" in (out / "pretrain" / "config.yaml").read_text()
    assert sorted(os.listdir(out / "probe" / "train")) == ["box", "disc", "triangle"]
    sheet = summary["pretrain"]["view_sheet"]
    assert os.path.basename(os.path.dirname(sheet)) == "views" and os.path.getsize(sheet) > 1000
    assert (out / "soco_converted.pkl").is_file()
    for run in ("soco", "scratch"):
        rows = [json.loads(x) for x in (out / f"finetune_{run}" / "metrics.json").read_text().splitlines()]
        evals = [r for r in rows if "bbox/AP" in r]
        assert evals and "segm/AP" in evals[-1] and evals[-1]["iteration"] == 2
        assert summary["finetune"][run]["metrics"]["bbox/AP"] == evals[-1]["bbox/AP"]
    png = (out / "demo_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    on_disk = json.loads((out / "demo_summary.json").read_text())
    assert on_disk["pretrain"]["iterations"] == 2 and on_disk["finetune"]["soco"]["iterations"] == 2
    assert set(on_disk["stage_seconds"]) >= {"data", "proposals", "pretrain", "convert", "finetune", "report"}
    # where the CPU time went: per stage, the probes' share of pretraining, the total
    assert set(on_disk["stage_cpu_seconds"]) == set(on_disk["stage_seconds"])
    assert all(v >= 0 for v in on_disk["stage_cpu_seconds"].values())
    assert 0 < on_disk["knn_probe_seconds"] <= on_disk["stage_seconds"]["pretrain"]
    assert on_disk["total_cpu_seconds"] >= on_disk["stage_cpu_seconds"]["pretrain"] > 0

    # The SoCo run started from the converted online backbone; the scratch run did not.
    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    online_conv1 = pretrained["backbone.body.conv1.weight"]
    with open(out / "soco_converted.pkl", "rb") as f:
        d2 = pickle.load(f)["model"]
    np.testing.assert_array_equal(d2["stem.conv1.weight"], online_conv1.numpy())
    assert torch.equal(backbone_at_start[str(out / "finetune_soco")], online_conv1)
    assert not torch.equal(backbone_at_start[str(out / "finetune_scratch")], online_conv1)
    init = summary["finetune"]["soco"]["backbone_init"]
    assert init["tensors"] > 50 and init["equal_to_pretrained"] == init["tensors"]
    assert summary["finetune"]["scratch"]["backbone_init"]["equal_to_pretrained"] < init["tensors"]

    printed = capsys.readouterr().out
    for heading in ("[1/6] Data", "[3/6] SoCo pretraining", "[5/6] Mask R-CNN", "SoCo pretrained"):
        assert heading in printed
    # the plan and its projection before training, the time left after each stage
    plan = printed.split("plan: ")[1].splitlines()[0]
    assert plan.startswith("2 pretraining iterations with 3 kNN probes, 2 x 2 fine-tuning iterations; projected ")
    assert f"projected {on_disk['budget']['projected_total_seconds'] / 60:.1f} min on 2 idle CPU cores" in plan
    assert printed.index("plan: ") < printed.index("[2/6]") and printed.count("min left)") == 5
    assert "APbb50" in printed and "APmk" in printed and "noisy" in printed
    assert "kNN top-1 (%) of the pretrained backbone" in printed and "What this run shows:" in printed

    # The printed probe command gives the monitor's last res5 number on the final checkpoint.
    command = printed.split("The same probe on the final checkpoint")[1].splitlines()[1].split()
    assert command[:2] == ["python", "tools/probe.py"] and "--bn-stats" in command
    args = [a for a in command[2:] if a != "--random-init"]
    results = tmp_path / "probe.jsonl"
    spec = importlib.util.spec_from_file_location("probe_tool", os.path.join(REPO, "tools", "probe.py"))
    probe_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_tool)
    assert probe_tool.main(args + ["--output", str(results)]) == 0
    probed = json.loads(results.read_text().splitlines()[0])
    last = [r for r in pre_rows if "knn_res5_top1" in r][-1]
    assert probed["knn_top1"] == pytest.approx(last["knn_res5_top1"], abs=1e-6)


@pytest.mark.slow
def test_demo_on_user_coco_data(tmp_path, keep_threads):
    """--train-json / --val-json: the user's files are used as given (no synthetic data)."""
    user = tmp_path / "mine"
    train_json, train_images = make_synthetic_coco(str(user), 6, 48, seed=3, split="train")
    val_json, val_images = make_synthetic_coco(str(user), 2, 48, seed=4, split="val")
    out = tmp_path / "demo"
    summary = run_demo(tiny_settings(out, train_json=train_json, train_images=train_images,
                                     val_json=val_json, val_images=val_images,
                                     pretrain_iters=1, finetune_iters=1))
    assert not (out / "data").exists()
    assert summary["data"]["synthetic"] is False
    assert summary["data"]["train_json"] == os.path.abspath(train_json)
    assert summary["proposals"]["images"] == 6  # pretraining images = the user's training images
    assert summary["data"]["num_classes"] == 3
    assert "segm/AP" in summary["finetune"]["scratch"]["metrics"]
    cfg_text = (out / "finetune_soco" / "config.yaml").read_text()
    assert "NUM_CLASSES: 3" in cfg_text and "instances_val.json" in cfg_text


def test_missing_train_json_is_a_clear_error_before_anything_is_written(tmp_path, capsys):
    tool = load_tool()
    out = tmp_path / "demo"
    missing = str(tmp_path / "nowhere" / "instances_train.json")
    rc = tool.main(["--output-dir", str(out), "--train-json", missing, "--val-json", missing])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--train-json" in err and missing in err and "does not exist" in err
    assert not out.exists()


def test_user_data_flag_errors(tmp_path):
    train_json, _ = make_synthetic_coco(str(tmp_path / "d"), 2, 48, seed=0, split="train")
    with pytest.raises(DemoError, match="--val-json"):
        prepare_data(DemoSettings(output_dir=str(tmp_path / "o"), train_json=train_json))
    with pytest.raises(DemoError, match="need --train-json"):
        prepare_data(DemoSettings(output_dir=str(tmp_path / "o"), val_json=train_json))
    with pytest.raises(DemoError, match="--val-images .* is not a folder"):
        prepare_data(DemoSettings(output_dir=str(tmp_path / "o"), train_json=train_json,
                                  val_json=train_json, val_images=str(tmp_path / "no_images")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DemoError, match="not valid JSON"):
        prepare_data(DemoSettings(output_dir=str(tmp_path / "o"), train_json=str(bad),
                                  val_json=train_json))


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    (tmp_path / "pretrain").mkdir()
    with pytest.raises(DemoError, match="--overwrite"):
        run_demo(DemoSettings(output_dir=str(tmp_path), progress=False))


def test_the_budget_fills_the_minutes_after_the_fixed_costs():
    costs = demo.StageCosts(proposals_start=1, proposals_per_image=0.5, pretrain_start=3, pretrain_iter=2,
                            knn_probe_per_crop=0.01, finetune_start=4, finetune_iter=1, evaluation_per_image=0.25)
    b = demo.plan_budget(2, 10, 8, 100, costs=costs)
    # fixed: proposals 1 + 5, pretrain 3 + 3 probes x 1 s, fine-tunings 2 x (4 + 2) = 24 s of 120
    assert b.knn_points == 2 and b.pretrain_iters == int(0.3 * 96 / 2) and b.finetune_iters == int(0.7 * 96 / 2)
    assert b.projected == {"proposals": 6, "pretrain": 3 + 3 + 2 * b.pretrain_iters,
                           "finetune_soco": 6 + b.finetune_iters, "finetune_scratch": 6 + b.finetune_iters}
    assert 118 <= b.total <= 120
    longer = demo.plan_budget(10, 10, 8, 100, costs=costs)
    assert longer.knn_points == 8 and longer.pretrain_iters > 4 * b.pretrain_iters
    assert demo.plan_budget(2, 10, 8, 0, costs=costs).knn_points == 0  # no probe, no probe cost
    fixed = demo.plan_budget(2, 10, 8, 100, pretrain_iters=7, finetune_iters=3, costs=costs)
    assert (fixed.pretrain_iters, fixed.finetune_iters) == (7, 3)  # explicit iterations win
    tiny = demo.plan_budget(0.01, 10, 8, 100, costs=costs)
    assert tiny.pretrain_iters == 1 and tiny.knn_points == 1  # iteration 0 and the end
    with pytest.raises(DemoError, match="--minutes"):
        demo.plan_budget(0, 10, 8, 100)
    # the time left: what is not done yet, at the pace of what is done
    assert demo.eta_seconds({"a": 10, "b": 20, "c": 30}, {"a": 20}) == 100
    assert demo.eta_seconds({"a": 10, "b": 20}, {}) == 30


def test_ap_table():
    table = format_ap_table({"bbox/AP": 12.5, "bbox/APl": math.nan, "segm/AP": 3.0},
                            {"bbox/AP": 10.0, "bbox/APl": math.nan, "segm/AP": 4.25})
    lines = table.splitlines()
    assert lines[2].split() == ["APbb", "12.50", "10.00", "+2.50"]
    assert lines[3].split() == ["APbbl", "n/a", "n/a", "n/a"]
    assert lines[4].split() == ["APmk", "3.00", "4.25", "-1.25"]
    assert len(lines) == 5  # metrics neither run has are left out


def test_knn_curve_and_the_sentence_that_reads_it():
    rows = [{"iteration": 0, "knn_res5_top1": 40.0, "knn_box_top1": 50.0, "knn_time": 1.0},
            {"iteration": 5, "total_loss": -1.0},
            {"iteration": 10, "total_loss": -2.0, "knn_res5_top1": 55.5, "knn_box_top1": 49.0}]
    curve = knn_curve(rows)
    assert curve == {"res5": {0: 40.0, 10: 55.5}, "box": {0: 50.0, 10: 49.0}}
    lines = format_knn_curve(curve).splitlines()
    assert lines[0].split() == ["iteration", "0", "10"] and lines[1].split() == ["res5", "40.0", "55.5"]
    # 100 validation images at 40%: two standard errors are 200 * sqrt(0.4 * 0.6 / 100) = 9.8 points
    assert "40.0% at iteration 0 -> 55.5% at iteration 10, 100 validation images" in knn_verdict(curve, 100)
    assert "separates the object classes better" in knn_verdict(curve, 100)
    assert "9.8-point sampling noise" in knn_verdict(curve, 100)
    # the same gain on 30 images (17.9 points of noise) is not evidence
    small = knn_verdict(curve, 30)
    assert "rose by less than its 17.9-point sampling noise" in small
    assert "does not show that SoCo learned" in small and "17.9-point" in small
    assert "--minutes" not in small and "BENCHMARKS.md" in small  # no budget that does not exist
    assert "does not show" in knn_verdict({"res5": {0: 40.0, 10: 49.7}}, 100)
    assert "separates" in knn_verdict({"res5": {0: 40.0, 10: 49.9}}, 100)
    flat = knn_verdict({"res5": {0: 40.0, 10: 39.0}}, 100)
    assert "did not rise; compare with its 9.8-point" in flat and "--minutes" not in flat


def test_probe_folders_from_the_jsons(tmp_path):
    data = prepare_data(DemoSettings(output_dir=str(tmp_path), num_train_images=8, num_val_images=4,
                                     image_size=64), say=lambda *a: None)
    said = []
    train, val = probe_folders(DemoSettings(output_dir=str(tmp_path)), data, said.append)
    assert sorted(os.listdir(train)) == ["box", "disc", "triangle"] and os.path.isdir(val)
    assert "object crops of 3 categories" in said[0]
    one = tmp_path / "one.json"
    d = json.loads(open(data.train_json).read())
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] == 1]
    one.write_text(json.dumps(d))
    data.train_json = str(one)
    said.clear()
    assert probe_folders(DemoSettings(output_dir=str(tmp_path / "x")), data, said.append) is None
    assert "kNN probe off" in said[0]


def _coco_subset(src, dst, num_images):
    """The first ``num_images`` images of a COCO json and their annotations."""
    with open(src) as f:
        data = json.load(f)
    data["images"] = data["images"][:num_images]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    with open(dst, "w") as f:
        json.dump(data, f)
    return str(dst)


def test_whole_chain_on_penn_fudan(tmp_path, keep_threads, data_root):
    """Real images: proposals -> SoCo pretraining -> conversion -> Mask R-CNN -> COCO AP."""
    root = os.path.join(data_root, "pennfudan")
    images = os.path.join(root, "PNGImages")
    train = _coco_subset(os.path.join(root, "annotations", "instances_train.json"),
                         tmp_path / "train.json", 6)
    val = _coco_subset(os.path.join(root, "annotations", "instances_val.json"),
                       tmp_path / "val.json", 2)
    out = tmp_path / "demo"
    summary = run_demo(tiny_settings(out, train_json=train, train_images=images, val_json=val,
                                     val_images=images, pretrain_iters=2, finetune_iters=2))
    assert summary["proposals"]["images"] == 6
    assert summary["data"]["num_classes"] == 1
    for run in ("soco", "scratch"):
        metrics = summary["finetune"][run]["metrics"]
        assert {"bbox/AP", "segm/AP"} <= set(metrics)
    assert (out / "soco_converted.pkl").is_file()


@pytest.mark.slow
def test_a_preempted_demo_resumes_to_the_same_result(tmp_path, keep_threads, monkeypatch):
    import signal

    from soco_d2.engine.preemption import Preempted
    from soco_d2.engine.trainer import PretrainTrainer

    whole = run_demo(tiny_settings(tmp_path / "whole", pretrain_iters=3))
    original = PretrainTrainer.run_step
    fired = []

    def run_step(self, it):
        if it == 1 and not fired:
            fired.append(it)
            os.kill(os.getpid(), signal.SIGTERM)  # preemption in the middle of pretraining
        return original(self, it)

    monkeypatch.setattr(PretrainTrainer, "run_step", run_step)
    out = tmp_path / "stopped"
    with pytest.raises(Preempted):
        run_demo(tiny_settings(out, pretrain_iters=3))
    assert not (out / "pretrain" / "model_final.pth").exists()
    with pytest.raises(DemoError, match="other settings .*pretrain_iters: 3 then, 4 now"):
        run_demo(tiny_settings(out, pretrain_iters=4, resume=True))
    resumed = run_demo(tiny_settings(out, pretrain_iters=3, resume=True))
    a = torch.load(tmp_path / "whole" / "pretrain" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "pretrain" / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for run in ("soco", "scratch"):
        assert resumed["finetune"][run]["metrics"] == whole["finetune"][run]["metrics"]
    assert resumed["finetune"]["soco"]["backbone_init"] == whole["finetune"]["soco"]["backbone_init"]


def test_resume_needs_an_earlier_demo(tmp_path):
    with pytest.raises(DemoError, match="no demo to continue"):
        run_demo(tiny_settings(tmp_path / "empty", resume=True))
    with pytest.raises(DemoError, match="pass one"):
        run_demo(tiny_settings(tmp_path / "empty", resume=True, overwrite=True))


@pytest.mark.slow
def test_the_demo_runs_on_a_wheel_install(tmp_path):
    """The demo is an application on the installed package: a wheel built from the sources,
    installed into a fresh virtual environment, runs ``tools/demo.py`` copied away from the
    sources (only the demo and its configs beside it)."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "soco_d2"), src / "soco_d2",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, timeout=600, cwd=tmp_path,
               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels), str(src)], **run)
    assert built.returncode == 0, built.stderr
    venv = tmp_path / "venv"
    # torch and the other dependencies come from this interpreter's site-packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, **{k: v for k, v in run.items() if k != "text"})
    python = str(venv / "bin" / "python")
    wheel = next(wheels.glob("soco_d2-*.whl"))
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr
    where = subprocess.run([python, "-c", "import soco_d2; print(soco_d2.__file__)"], **run)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel, not the sources

    app = tmp_path / "app"
    shutil.copytree(os.path.join(REPO, "configs"), app / "configs")
    (app / "tools").mkdir()
    shutil.copy(os.path.join(REPO, "tools", "demo.py"), app / "tools" / "demo.py")
    helped = subprocess.run([python, str(app / "tools" / "demo.py"), "--help"], **run)
    assert helped.returncode == 0 and "--minutes" in helped.stdout, helped.stderr
    out = tmp_path / "demo"
    step = subprocess.run([python, str(app / "tools" / "demo.py"), "--output-dir", str(out),
                           "--num-train-images", "6", "--num-val-images", "2", "--image-size", "64",
                           "--pretrain-iters", "1", "--finetune-iters", "1", "--workers", "1", "--no-progress",
                           "--pretrain-opts", *PRETRAIN_TINY, "--finetune-opts", *FINETUNE_TINY], **run)
    assert step.returncode == 0, step.stdout[-2000:] + step.stderr[-2000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["pretrain"]["iterations"] == 1 and "bbox/AP" in summary["finetune"]["soco"]["metrics"]
