"""SoCo pretraining end to end: proposals file -> every shipped SoCo config -> checkpoint -> resume."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from soco_d2.config import load_config
from soco_d2.data.image_list import list_images
from soco_d2.data.selective_search import run_generation
from soco_d2.data.synthetic import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCO_CONFIGS = sorted(
    f for f in glob.glob(os.path.join(REPO, "configs", "soco", "*.yaml"))
    if not os.path.basename(f).startswith("Base")
)


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """Six synthetic images and their selective-search proposals file."""
    root = tmp_path_factory.mktemp("soco_data")
    _, image_dir = make_synthetic_coco(str(root), num_images=6, image_size=96, seed=0)
    props = str(root / "props.socoprop")
    run_generation(list_images(image_dir), props, workers=1, progress=False)
    return image_dir, props


def tiny_overrides(image_dir, props, out, star=False):
    """Small sizes for a CPU run; everything else stays as the config says."""
    views = ["INPUT.SOCO.VIEW1_SIZE", "64", "INPUT.SOCO.VIEW2_SIZE", "64",
             "INPUT.SOCO.VIEW3_SIZE", "48" if star else "32"]
    if star:
        views += ["INPUT.SOCO.VIEW4_SIZE", "32"]
    return views + [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", "64",
        "MODEL.SOCO.PROJECTOR_OUT_DIM", "32", "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.AMP.ENABLED", "False",
        "DATALOADER.NUM_WORKERS", "0", "CHANNELS_LAST", "False", "LOG_PERIOD", "1",
        "DATASETS.PRETRAIN.IMAGE_ROOT", image_dir, "DATASETS.PRETRAIN.PROPOSALS", props,
        "OUTPUT_DIR", out,
    ]


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("config", SOCO_CONFIGS, ids=os.path.basename)
def test_shipped_soco_config_runs_two_iterations(config, unlabeled, tmp_path):
    import soco_d2.data  # noqa: F401  (registers the view mappers)
    import soco_d2.modeling  # noqa: F401  (registers the meta-architectures)
    from soco_d2.engine.trainer import PretrainTrainer

    star = "star" in os.path.basename(config)
    out = str(tmp_path / "out")
    cfg = load_config(config, tiny_overrides(*unlabeled, out, star=star))
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    expected = {"loss_v1_v2", "loss_v1_v3"} | ({"loss_v1_v4"} if star else set())
    assert expected <= set(rows[-1])
    assert all(math.isfinite(r["total_loss"]) for r in rows)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_cli_trains_then_resumes_with_a_longer_schedule(unlabeled, tmp_path):
    out = str(tmp_path / "cli")
    tool = os.path.join(REPO, "tools", "pretrain_net.py")
    base = [sys.executable, tool, "--config-file", SOCO_CONFIGS[0], "--num-gpus", "1"]
    overrides = tiny_overrides(*unlabeled, out)
    subprocess.run(base + overrides, check=True, capture_output=True, text=True, timeout=300)
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]

    longer = overrides + ["SOLVER.MAX_ITER", "3"]
    run = subprocess.run(base + ["--resume"] + longer, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Continuing at iteration 2 of 3" in run.stdout + run.stderr
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3]
