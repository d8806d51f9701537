"""Pretraining D2SoCo / D2DetCo from soco_d2 configs (MODEL.DETECTRON2.CONFIG_FILE): the shipped
configs/detectron2/pretrain/ files through soco_d2's engine and tools/pretrain_net.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from soco_d2.checkpoint import convert_to_d2  # noqa: E402
from soco_d2.config import ConfigError, load_config  # noqa: E402
from soco_d2.data.image_list import list_images  # noqa: E402
from soco_d2.data.selective_search import run_generation  # noqa: E402
from soco_d2.data.synthetic import make_synthetic_coco  # noqa: E402
from soco_d2.detectron2 import D2DetCo, D2SoCo, pretrain_d2_config  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
PRETRAIN = os.path.join(REPO, "configs", "detectron2", "pretrain")
SOCO = os.path.join(PRETRAIN, "soco_fpn_r50_100ep.yaml")
DETCO = os.path.join(PRETRAIN, "detco_r50_200ep.yaml")
R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.DETECTRON2.OPTS", "['MODEL.RESNETS.RES2_OUT_CHANNELS', 64]"]


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2_pretrain_data")
    _, image_dir = make_synthetic_coco(str(root), num_images=4, image_size=96, seed=0)
    props = str(root / "props.socoprop")
    run_generation(list_images(image_dir), props, workers=1, progress=False)
    return image_dir, props


def _common(image_dir, out):
    return R18 + ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                  "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0", "CHANNELS_LAST", "False",
                  "LOG_PERIOD", "1", "DATASETS.PRETRAIN.NAME", "", "DATASETS.PRETRAIN.IMAGE_ROOT", image_dir,
                  "OUTPUT_DIR", out]


def soco_overrides(image_dir, props, out):
    return _common(image_dir, out) + [
        "INPUT.SOCO.VIEW1_SIZE", "64", "INPUT.SOCO.VIEW2_SIZE", "64", "INPUT.SOCO.VIEW3_SIZE", "32",
        "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", "32",
        "MODEL.SOCO.PROJECTOR_OUT_DIM", "16", "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", "32",
        "DATASETS.PRETRAIN.PROPOSALS", props,
    ]


def detco_overrides(image_dir, out):
    return _common(image_dir, out) + [
        "MODEL.DETCO.QUEUE_SIZE", "4", "MODEL.DETCO.HEAD_HIDDEN_DIM", "16", "MODEL.DETCO.FEATURE_DIM", "8",
        "INPUT.DETCO.GLOBAL_SIZE", "32", "INPUT.DETCO.LOCAL_CROP_SIZE", "96", "INPUT.DETCO.PATCH_SIZE", "24",
    ]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_training_config_values_reach_the_detectron2_config(tmp_path):
    cfg = load_config(DETCO, detco_overrides("imgs", str(tmp_path)) + ["MODEL.DETCO.TEMPERATURE", "0.3"])
    d2 = pretrain_d2_config(cfg)
    assert d2.MODEL.META_ARCHITECTURE == "D2DetCo"
    # shared keys follow the training config; detectron2-only keys come from the file and OPTS
    assert d2.MODEL.RESNETS.DEPTH == 18 and d2.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
    assert d2.MODEL.DETCO.TEMPERATURE == 0.3 and d2.MODEL.DETCO.QUEUE_SIZE == 4
    assert d2.SOLVER.IMS_PER_BATCH == 2 and d2.MODEL.DEVICE == "cpu" and d2.CHANNELS_LAST is False
    assert d2.MODEL.RESNETS.STRIDE_IN_1X1 is False and d2.MODEL.BACKBONE.FREEZE_AT == 0
    assert isinstance(build_model(cfg), D2DetCo)


def test_bad_detectron2_settings_name_the_key(tmp_path):
    base = detco_overrides("imgs", str(tmp_path))
    with pytest.raises(ConfigError, match=r"MODEL\.DETECTRON2\.OPTS.*MODEL\.RESNETS\.NO_SUCH_KEY"):
        pretrain_d2_config(load_config(DETCO, base + ["MODEL.DETECTRON2.OPTS", "['MODEL.RESNETS.NO_SUCH_KEY', 1]"]))
    bad = tmp_path / "bad_d2arch.yaml"
    bad.write_text(f'_BASE_: "{os.path.join(PRETRAIN, "detco_r50_d2arch.yaml")}"\nMODEL:\n  FPNN:\n    NORM: "BN"\n')
    with pytest.raises(ConfigError, match=r"bad_d2arch\.yaml.*MODEL\.FPNN"):
        pretrain_d2_config(load_config(DETCO, base + ["MODEL.DETECTRON2.CONFIG_FILE", str(bad)]))
    with pytest.raises(ConfigError, match=r"CONFIG_FILE = 'nowhere\.yaml': no such file"):
        pretrain_d2_config(load_config(DETCO, base + ["MODEL.DETECTRON2.CONFIG_FILE", "nowhere.yaml"]))
    # a SoCo network paired with DetCo's data pipeline
    with pytest.raises(ConfigError, match=r"'DetCo'.*'D2SoCo'.*'D2DetCo'"):
        pretrain_d2_config(load_config(DETCO, base + ["MODEL.DETECTRON2.CONFIG_FILE",
                                                     os.path.join(PRETRAIN, "soco_fpn_r50_d2arch.yaml")]))


def test_shipped_d2soco_config_trains_with_soco_d2_engine_and_converts(unlabeled, tmp_path):
    import soco_d2.data  # noqa: F401  (registers the view mappers)
    from soco_d2.engine.trainer import PretrainTrainer

    out = str(tmp_path / "soco")
    cfg = load_config(SOCO, soco_overrides(*unlabeled, out))
    trainer = PretrainTrainer(cfg)
    assert isinstance(trainer.model, D2SoCo)
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = _metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"loss_v1_v2", "loss_v1_v3"} <= set(rows[-1]) and all(math.isfinite(r["total_loss"]) for r in rows)
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    assert "backbone.bottom_up.res2.0.conv1.norm.weight" in state and "target_backbone.fpn_lateral2.weight" in state
    d2, report = convert_to_d2(os.path.join(out, "model_final.pth"))
    assert not report.unmapped
    assert {"stem.conv1.weight", "fpn_output5.weight", "box_head.fc1.weight"} <= set(d2)


@pytest.mark.slow  # two tool processes
def test_pretrain_net_runs_d2detco_then_resumes(unlabeled, tmp_path):
    out = str(tmp_path / "detco")
    tool = [sys.executable, os.path.join(REPO, "tools", "pretrain_net.py"), "--config-file", DETCO]
    overrides = detco_overrides(unlabeled[0], out)
    run = subprocess.run(tool + overrides, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"loss_global_global", "loss_local_local", "loss_local_global"} <= set(rows[-1])
    run = subprocess.run(tool + ["--resume"] + overrides + ["SOLVER.MAX_ITER", "3"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Continuing at iteration 2 of 3" in run.stdout + run.stderr
    assert [r["iteration"] for r in _metrics(out)] == [1, 2, 3]
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    assert "encoder_q.body.res4.1.conv2.norm.running_mean" in state
    assert int(state["queues_global.res5.ptr"]) == 2  # 3 steps x 2 keys in a queue of 4
