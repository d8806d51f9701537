import importlib.util
import json
import os
import subprocess
import sys

import pytest

from soco_d2.data.synthetic import make_synthetic_coco

sys.path.insert(0, os.path.dirname(__file__))
from faults import run_and_signal, run_bounded, worker_fault_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "finetune", "mask_rcnn_R50_FPN_1x.yaml")

# CPU-sized model and inputs (module names unchanged).
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.NUM_CLASSES", "3",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "30",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "(0.5,)",
    "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False",
    "LOG_PERIOD", "1",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_net_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path):
    train, _ = make_synthetic_coco(str(tmp_path / "data"), 4, image_size=64, seed=0, split="train")
    val, _ = make_synthetic_coco(str(tmp_path / "data"), 2, image_size=64, seed=1, split="val")
    return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_eval_only_and_resume(data, tmp_path):
    tool = _load_tool()
    out = str(tmp_path / "run")
    args = ["--config-file", CONFIG] + TINY + data + ["OUTPUT_DIR", out]
    results = tool.cli(args + ["SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "1"])
    assert set(results) == {"bbox", "segm"}
    evals = [r for r in _metrics(out) if "bbox/AP" in r]
    assert [r["iteration"] for r in evals] == [1, 2]  # periodic, then final
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/APl"} <= set(evals[0])

    # --eval-only with explicit weights, then from the last checkpoint of OUTPUT_DIR.
    final = os.path.join(out, "model_final.pth")
    again = tool.cli(["--eval-only"] + args + ["MODEL.WEIGHTS", final])
    assert again["bbox"] == pytest.approx(results["bbox"], nan_ok=True)
    tool.cli(["--eval-only"] + args)
    evals = [r for r in _metrics(out) if "bbox/AP" in r]
    assert [r["iteration"] for r in evals] == [1, 2, 2, 2]

    # --resume with a longer schedule trains only the new iteration.
    tool.cli(["--resume"] + args + ["SOLVER.MAX_ITER", "3"])
    losses = [r["iteration"] for r in _metrics(out) if "total_loss" in r]
    assert losses == [1, 2, 3]
    assert [r["iteration"] for r in _metrics(out) if "bbox/AP" in r][-1] == 3


def test_main_loads_configs_on_the_finetune_defaults(monkeypatch):
    import soco_d2.finetune.trainer as trainer_mod

    seen = []

    class FakeTrainer:
        def __init__(self, cfg):
            seen.append(cfg)

        def resume_or_load(self, resume):
            pass

        def train(self):
            return {}

    monkeypatch.setattr(trainer_mod, "FinetuneTrainer", FakeTrainer)
    tool = _load_tool()
    tool.main(tool.default_argument_parser().parse_args(["MODEL.DEVICE", "cpu"]))
    s = seen[0].SOLVER
    assert (s.OPTIMIZER, s.LR_SCHEDULER, s.BASE_LR_BATCH_SIZE) == ("SGD", "WarmupMultiStep", 16)


def test_missing_weights_file_is_a_clear_error(data, tmp_path):
    tool = _load_tool()
    from soco_d2.finetune.weights import WeightsLoadingError

    with pytest.raises(WeightsLoadingError, match="nowhere.pkl"):
        tool.cli(["--config-file", CONFIG] + TINY + data + [
            "OUTPUT_DIR", str(tmp_path / "o"), "SOLVER.MAX_ITER", "1",
            "MODEL.WEIGHTS", str(tmp_path / "nowhere.pkl")])


def test_unknown_key_fails_before_launch(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--config-file", CONFIG, "SOLVER.NO_SUCH", "1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "SOLVER.NO_SUCH" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["SOLVER.MAX_ITERS", "3"], "Non-existent key: SOLVER.MAX_ITERS (no such key; did you mean "
                                "SOLVER.MAX_ITER?)"),
    (["SOLVER.IMS_PER_BATCH", "3"], "SOLVER.IMS_PER_BATCH=3 must be divisible by the number of "
                                    "processes (2)"),
])
def test_user_errors_are_one_message_before_any_process_starts(tmp_path, overrides, message):
    run = run_bounded([sys.executable, TOOL, "--num-gpus", "2", "--config-file", CONFIG,
                       "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o")] + overrides,
                      timeout=120)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr and "Process 0" not in run.stderr
    assert not (tmp_path / "o").exists()  # nothing started


@pytest.mark.slow
def test_two_processes_syncbn_ddp_and_gathered_evaluation(data, tmp_path):
    out = str(tmp_path / "ddp")
    proc = subprocess.run(
        [sys.executable, TOOL, "--num-gpus", "2", "--config-file", CONFIG] + TINY + data +
        ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "4"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evals = [r for r in _metrics(out) if "bbox/AP" in r]
    assert len(evals) == 1 and "segm/AP" in evals[0]
    assert "Evaluation of 2 images" in proc.stdout  # one per process, gathered on rank 0


def _failing_finetune(data, tmp_path, processes):
    out = str(tmp_path / f"fail_{processes}")
    cmd = [sys.executable, TOOL, "--num-gpus", str(processes), "--config-file", CONFIG]
    overrides = TINY + data + ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2",
                               "SOLVER.IMS_PER_BATCH", str(2 * processes),
                               "DATALOADER.NUM_WORKERS", "1"]
    env = worker_fault_env(tmp_path, "soco_d2.finetune.coco_data:COCODetection.__getitem__", "TypeError")
    return run_bounded(cmd + overrides, timeout=300, env=env)


def test_an_exception_in_a_loader_worker_ends_the_run_with_its_cause(data, tmp_path):
    run = _failing_finetune(data, tmp_path, 1)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "TypeError: " in run.stderr and "fault injected in a worker" in run.stderr


@pytest.mark.slow
def test_an_exception_in_a_loader_worker_ends_a_two_process_run(data, tmp_path):
    run = _failing_finetune(data, tmp_path, 2)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "TypeError" in run.stderr and "fault injected in a worker" in run.stderr


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_saves_and_resumes_exactly(data, tmp_path):
    """SIGINT to every process (a terminal's Ctrl-C), loader workers included, at a random step:
    the run saves, exits with 75, and --resume ends with the same weights."""
    import random
    import signal

    import torch

    def cmd(out):
        return [sys.executable, TOOL, "--config-file", CONFIG] + TINY + data + [
            "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "6", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", "2"]

    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    assert run_bounded(cmd(ref), timeout=300).returncode == 0
    step = random.Random().randint(1, 4)
    stopped = run_and_signal(cmd(out), out, step, signal.SIGINT, group=True)
    text = stopped.stdout.read()
    assert stopped.returncode == 75, text[-3000:]
    assert "SIGINT received: stopped after iteration" in text
    done = run_bounded(cmd(out)[:4] + ["--resume"] + cmd(out)[4:], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(os.path.join(ref, "model_final.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (SIGINT after iteration {step})"


def _edit_json(data, edit):
    path = data[1][2:-3]  # DATASETS.TRAIN "('<json>',)"
    with open(path) as f:
        content = json.load(f)
    edit(content)
    with open(path, "w") as f:
        json.dump(content, f)
    return content


def test_duplicate_image_ids_are_refused_naming_them(data, tmp_path):
    """pycocotools keeps one of two images with the same id and moves the other's boxes to it;
    the json is refused up front instead."""
    def duplicate(content):
        content["images"][1]["id"] = content["images"][0]["id"]

    content = _edit_json(data, duplicate)
    run = run_bounded([sys.executable, TOOL, "--config-file", CONFIG] + TINY + data +
                      ["OUTPUT_DIR", str(tmp_path / "o"), "SOLVER.MAX_ITER", "1"], timeout=240)
    assert run.returncode == 1
    assert f"1 duplicate images id(s): {content['images'][0]['id']}" in run.stderr
    assert "renumber them" in run.stderr


def test_malformed_annotations_are_dropped_and_named(data, tmp_path):
    """A polygon of 4 numbers (a TypeError in a loader worker before) and a bbox of 3 numbers
    are dropped, each named by its id in one warning; training goes on."""
    def damage(content):
        content["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
        content["annotations"][1]["bbox"] = [1, 2, 3]

    content = _edit_json(data, damage)
    first, second = content["annotations"][0]["id"], content["annotations"][1]["id"]
    run = run_bounded([sys.executable, TOOL, "--config-file", CONFIG] + TINY + data + [
        "OUTPUT_DIR", str(tmp_path / "o"), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "1"], timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert f"dropped 2 of {len(content['annotations'])} annotations" in log
    assert f"1 with a polygon of 4 numbers (needs x, y pairs, at least 3 points) (ids {first})" in log
    assert f"1 with a bbox that is not [x, y, width >= 0, height >= 0] (ids {second})" in log
