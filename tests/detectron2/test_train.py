"""Fine-tuning through detectron2's trainer from tools/train_net.py (skipped without detectron2)."""
import copy
import importlib
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg as get_d2_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model as build_d2_model  # noqa: E402
from detectron2.modeling.roi_heads import Res5ROIHeads  # noqa: E402

from soco_d2.checkpoint import save_d2_pkl  # noqa: E402
from soco_d2.config import ConfigError  # noqa: E402
from soco_d2.data.synthetic import make_synthetic_coco  # noqa: E402
from soco_d2.detectron2.train import (  # noqa: E402
    Res5ROIHeadsExtraNorm,
    WeightsError,
    register_datasets,
    setup_finetune_cfg,
    sync_bn_to_bn,
)
from soco_d2.evaluation.reported_ap import read_eval_metrics  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
D2_CONFIGS = os.path.join(REPO, "configs", "detectron2")
TOOL = os.path.join(REPO, "tools", "train_net.py")
# A thin ResNet-50 and small heads / images, so that a detectron2 step takes well under a second.
THIN = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
    "TEST.PRECISE_BN.NUM_ITER", "2",
]


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("train_net_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2_finetune_data")
    json_file, _ = make_synthetic_coco(str(root), num_images=4, image_size=96, seed=0)
    return json_file


def _thin_resnet_pkl(path, depth_overrides=()):
    """A .pkl of a thin detectron2 ResNet-50 (the weights a converted D2DetCo would give)."""
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml"))
    cfg.merge_from_list(THIN[:6] + ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                                    "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN"]
                        + list(depth_overrides))
    torch.manual_seed(0)
    # detectron2's short names, as tools/convert_to_d2.py writes them (the converter itself only
    # accepts standard ResNet widths)
    d2 = {k[len("backbone.bottom_up."):]: v.numpy() for k, v in build_d2_model(cfg).state_dict().items()
          if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
    save_d2_pkl(d2, path)
    return d2


def test_res5_head_with_extra_norm():
    cfg = setup_finetune_cfg(os.path.join(D2_CONFIGS, "mask_rcnn_R50_C4_1x.yaml"), THIN)
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.RESNETS.NORM == "BN"
    torch.manual_seed(0)
    model = build_d2_model(cfg).eval()
    heads = model.roi_heads
    assert isinstance(heads, Res5ROIHeadsExtraNorm)
    norm = heads.res5.norm
    assert isinstance(norm, torch.nn.BatchNorm2d) and norm.num_features == 256  # 8 x RES2_OUT_CHANNELS
    assert "roi_heads.res5.norm.running_var" in model.state_dict()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.weight.uniform_(0.5, 2)
    # res5 = detectron2's three res5 blocks, then the norm
    plain = copy.deepcopy(heads.res5)
    del plain.norm
    x = torch.randn(2, 128, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(heads.res5(x), norm(plain(x)))
    assert type(heads).__mro__[1] is Res5ROIHeads


def test_sync_bn_becomes_bn_on_one_process_only(soco_log):
    cfg = get_d2_cfg()
    cfg.merge_from_file(os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml"))
    assert sync_bn_to_bn(cfg.clone(), world_size=2) == []
    changed = sync_bn_to_bn(cfg, world_size=1)
    assert sorted(changed) == ["MODEL.FPN.NORM", "MODEL.RESNETS.NORM", "MODEL.ROI_BOX_HEAD.NORM",
                               "MODEL.ROI_MASK_HEAD.NORM"]
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.ROI_MASK_HEAD.NORM == "BN"
    lines = [m for m in soco_log if "SyncBN -> BN" in m]
    assert len(lines) == 1 and "MODEL.FPN.NORM" in lines[0]


def test_datasets_soco_d2_names_and_json_paths_are_registered(coco, tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    (root / "pennfudan" / "annotations").mkdir(parents=True)
    (root / "pennfudan" / "annotations" / "instances_val.json").write_text(open(coco).read())
    monkeypatch.setenv("SOCO_DATASETS", str(root))
    if "pennfudan_val" in DatasetCatalog.list():
        DatasetCatalog.remove("pennfudan_val")
        MetadataCatalog.remove("pennfudan_val")
    new = register_datasets(["coco_2017_val", "pennfudan_val", coco])
    assert "coco_2017_val" not in new  # detectron2's own name stays detectron2's
    assert set(new) <= {"pennfudan_val", coco} and "pennfudan_val" in new
    meta = MetadataCatalog.get("pennfudan_val")
    assert meta.json_file == str(root / "pennfudan" / "annotations" / "instances_val.json")
    assert meta.image_root == str(root / "pennfudan" / "PNGImages")
    records = DatasetCatalog.get(coco)
    assert len(records) == 4 and os.path.isfile(records[0]["file_name"]) and records[0]["annotations"]
    with pytest.raises(KeyError, match=r"'no_such_set'.*detectron2 knows"):
        register_datasets(["no_such_set"])


def test_unknown_key_fails_before_launching(tool, monkeypatch):
    launch_module = importlib.import_module("soco_d2.engine.launch")  # the module, not the function
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ConfigError, match=r"detectron2 overrides.*MODEL\.RESNETS\.NO_SUCH_KEY"):
        tool.cli(["--config-file", os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml"),
                  "MODEL.RESNETS.NO_SUCH_KEY", "1"])


def _run(tool, config, out, *extra):
    return tool.cli(["--config-file", config] + list(extra) + THIN + ["OUTPUT_DIR", str(out)])


def test_train_net_runs_detectron2_trainer_evaluates_and_check_ap_reads_it(tool, coco, tmp_path):
    """The FPN recipe through tools/train_net.py: our .pkl loads, detectron2's trainer runs with
    precise BN and COCO evaluation; metrics.json holds what tools/check_ap.py reads."""
    pkl = tmp_path / "thin.pkl"
    weights = _thin_resnet_pkl(pkl)
    out = tmp_path / "run"
    config = os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml")
    data = ["DATASETS.TRAIN", f"('{coco}',)", "DATASETS.TEST", f"('{coco}',)", "MODEL.WEIGHTS", str(pkl)]
    _run(tool, config, out, *data, "SOLVER.MAX_ITER", "2")
    log = (out / "log.txt").read_text()
    assert "SyncBN -> BN" in log and "precise" in log.lower()
    assert json.loads((out / "env.json").read_text())["torch"] == torch.__version__
    state = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert int(state["backbone.bottom_up.res3.0.conv1.norm.num_batches_tracked"]) > 0
    metrics, iteration = read_eval_metrics(str(out))
    assert iteration == 2  # the final evaluation, written after the last of 2 iterations
    assert {"bbox/AP", "segm/AP", "bbox/AP50"} <= set(metrics)

    # --eval-only on the final model appends its results to metrics.json
    lines_before = len((out / "metrics.json").read_text().splitlines())
    _run(tool, config, out, "--eval-only", *data[:4], "MODEL.WEIGHTS", str(out / "model_final.pth"))
    lines = (out / "metrics.json").read_text().splitlines()
    assert len(lines) == lines_before + 1 and "bbox/AP" in json.loads(lines[-1])

    # the pretrained tensors were loaded before training (stem conv: lr 0.001, 2 steps)
    assert torch.allclose(state["backbone.bottom_up.stem.conv1.weight"],
                          torch.as_tensor(weights["stem.conv1.weight"]), atol=0.05)


def test_pkl_without_the_backbone_names_the_missing_keys(tool, coco, tmp_path):
    pkl = tmp_path / "partial.pkl"
    d2 = _thin_resnet_pkl(pkl)
    save_d2_pkl({k: v for k, v in d2.items() if not k.startswith("res4.")}, pkl)
    with pytest.raises(WeightsError, match=r"res4\.0\.conv1\.weight.*tools/convert_to_d2\.py"):
        _run(tool, os.path.join(D2_CONFIGS, "retinanet_R50_FPN_1x.yaml"), tmp_path / "r",
             "DATASETS.TRAIN", f"('{coco}',)", "DATASETS.TEST", "()", "MODEL.WEIGHTS", str(pkl),
             "SOLVER.MAX_ITER", "1", "MODEL.RETINANET.NUM_CLASSES", "3")


@pytest.mark.slow  # two CPU processes (gloo), 2 iterations and an evaluation each
def test_two_cpu_processes_train_with_synced_bn_and_precise_bn(tool, coco, tmp_path):
    """--num-gpus 2 on CPU: detectron2's DDP wrap (no device_ids for a CPU model), SyncBN as
    AllReduceBatchNorm (torch's needs CUDA), precise BN finding those layers, evaluation gathered
    from both processes."""
    pkl = tmp_path / "thin.pkl"
    _thin_resnet_pkl(pkl)
    out = tmp_path / "run2"
    _run(tool, os.path.join(D2_CONFIGS, "mask_rcnn_R50_FPN_1x.yaml"), out, "--num-gpus", "2",
         "DATASETS.TRAIN", f"('{coco}',)", "DATASETS.TEST", f"('{coco}',)", "MODEL.WEIGHTS", str(pkl),
         "SOLVER.MAX_ITER", "2")
    log = (out / "log.txt").read_text()
    assert "SyncBN -> BN" not in log
    assert "2 CPU processes:" in log and "SyncBatchNorm layers -> AllReduceBatchNorm" in log
    assert "Running precise-BN for 2 iterations" in log and "PreciseBN is disabled" not in log
    state = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert "backbone.bottom_up.res2.0.conv1.norm.running_var" in state  # detectron2's names kept
    metrics, iteration = read_eval_metrics(str(out))
    assert iteration == 2 and {"bbox/AP", "segm/AP"} <= set(metrics)
