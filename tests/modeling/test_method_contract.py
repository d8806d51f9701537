"""The method contract (soco_d2.modeling.meta_arch.method): SoCo and DetCo implement it, and a method
written in its own file (tests/modeling/toy_byol.py, image-level BYOL) trains through
PretrainTrainer, is probed by the kNN monitor, watched by the health monitor, visualised and
converted, with no change elsewhere."""
import importlib.util
import json
import math
import os
import pickle
import sys

import cv2
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine"))
import monitor_toy as mtoy  # noqa: E402
import toy_byol  # noqa: E402
import toy_pretrain  # noqa: E402

from soco_d2.config import get_cfg  # noqa: E402
from soco_d2.data.visualize import write_view_sheets  # noqa: E402
from soco_d2.engine.model_taps import embedding_module, probe_feature_fn  # noqa: E402
from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402
from soco_d2.modeling.meta_arch.detco import DetCo  # noqa: E402
from soco_d2.modeling.meta_arch.method import PretrainMethod  # noqa: E402
from soco_d2.modeling.meta_arch.soco import SoCo  # noqa: E402

CONVERT_TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_to_d2.py")


def _convert(*args):
    spec = importlib.util.spec_from_file_location("convert_to_d2_tool", CONVERT_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _cfg(tmp_path):
    images = mtoy.make_labeled_folder(tmp_path / "images", per_class=3, size=40)
    cfg = toy_byol.add_toy_byol_config(toy_pretrain.toy_cfg(
        tmp_path / "out", **mtoy.monitor_overrides(
            images, **{"MONITOR.KNN.PERIOD": 0, "MONITOR.KNN.IMAGE_SIZE": 32, "MONITOR.PLOT": False})))
    cfg.MODEL.META_ARCHITECTURE = "ToyBYOL"
    cfg.INPUT.MAPPER = "ToyBYOLViewMapper"
    cfg.DATASETS.PRETRAIN.IMAGE_ROOT = images
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 4
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 0
    cfg.LOG_PERIOD = 1
    return cfg, images


def test_a_method_in_its_own_files_trains_is_monitored_visualised_and_converted(tmp_path):
    cfg, images = _cfg(tmp_path)
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)  # the model and the dataset come from the registries
    assert isinstance(trainer.model, toy_byol.ToyBYOL)
    target_before = trainer.model.target_encoder.conv1.weight.clone()
    trainer.train()
    model = trainer.model

    # the EMA of the contract's momentum pairs moved the target
    assert not torch.equal(model.target_encoder.conv1.weight, target_before)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    knn = [r for r in rows if "knn_res5_top1" in r]
    assert [r["iteration"] for r in knn] == [0, 2]  # kNN probe of probe_features (start, end)
    health = [r for r in rows if "rankme" in r]
    assert health and all(r["emb_std"] > 0 and r["rankme"] >= 1 for r in health)
    assert all(math.isfinite(r["loss_byol"]) for r in rows if "loss_byol" in r)

    sheets = write_view_sheets(cfg, images, str(tmp_path / "views"), num_images=2, panel=64)
    assert [os.path.basename(p)[:17] for p in sheets] == ["toy_byol_views_00", "toy_byol_views_01"]
    assert all(cv2.imread(p).shape == (64, 64 * 2 + 6, 3) for p in sheets)

    ckpt = tmp_path / "out" / "model_final.pth"
    assert _convert(ckpt, tmp_path / "byol.pkl", "--parts", "backbone", "--depth", 18) == 0
    with open(tmp_path / "byol.pkl", "rb") as f:
        d2 = pickle.load(f)["model"]
    assert torch.equal(torch.from_numpy(d2["stem.conv1.weight"]), model.encoder.conv1.weight)
    assert torch.equal(torch.from_numpy(d2["res5.1.conv2.weight"]), model.encoder.layer4[1].conv2.weight)
    assert _convert(ckpt, tmp_path / "byol_tv.pth", "--parts", "backbone", "--format", "torchvision") == 0
    tv = torch.load(tmp_path / "byol_tv.pth", weights_only=True)["model"]
    assert torch.equal(tv["backbone.body.layer1.0.conv1.weight"], model.encoder.layer1[0].conv1.weight)
    assert _convert(ckpt, tmp_path / "byol_t.pkl", "--parts", "backbone", "--branch", "target") == 0
    with open(tmp_path / "byol_t.pkl", "rb") as f:
        target = pickle.load(f)["model"]
    assert torch.equal(torch.from_numpy(target["stem.conv1.weight"]), model.target_encoder.conv1.weight)


def _tiny(arch):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", arch, "MODEL.RESNETS.DEPTH", 18,
                         "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 1,
                         "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 24,
                         "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 16, "MODEL.SOCO.PROJECTOR_OUT_DIM", 8,
                         "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 16, "MODEL.DETCO.QUEUE_SIZE", 16,
                         "SOLVER.IMS_PER_BATCH", 2, "MODEL.DETCO.FEATURE_DIM", 8,
                         "MODEL.DETCO.HEAD_HIDDEN_DIM", 16])
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", ["SoCo", "DetCo"])
def test_soco_and_detco_implement_the_contract(arch):
    model = _tiny(arch)
    assert isinstance(model, PretrainMethod)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        features = probe_feature_fn(model, None, None)(images)  # the model's own normalisation
        direct = model.probe_features(model.normalize(images))
    assert list(features) == list(direct) == (["res5", "box"] if arch == "SoCo" else ["res5"])
    assert all(torch.equal(features[k], direct[k]) for k in direct)
    assert embedding_module(model) is model.embedding_module()
    online, target = zip(*model.momentum_pairs())
    with torch.no_grad():
        for t in target:
            for p in t.parameters():
                p.zero_()
    model.momentum_update(0.25)  # target = 0.25 * 0 + 0.75 * online
    for o, t in zip(online, target):
        for po, pt in zip(o.parameters(), t.parameters()):
            torch.testing.assert_close(pt, 0.75 * po)
    assert model.chance_level == (math.log(17) if arch == "DetCo" else None)
    assert model.sync_batchnorm is (arch == "SoCo")  # DetCo's default KEY_BN "shuffle": per-process BN


def test_a_method_missing_part_of_the_contract_cannot_be_built():
    class NoProbe(PretrainMethod):
        def normalize(self, images):
            return images.float()

        def momentum_pairs(self):
            return []

        def embedding_module(self):
            return self

    with pytest.raises(TypeError, match="probe_features"):
        NoProbe()
    assert issubclass(SoCo, PretrainMethod) and issubclass(DetCo, PretrainMethod)


def test_soco_on_a_backbone_without_a_body_says_the_probe_cannot_run():
    model = _tiny("SoCo")
    model.backbone = torch.nn.Identity()  # e.g. detectron2's FPN: bottom_up, not body
    with pytest.raises(NotImplementedError, match=r"MONITOR.KNN.*Identity.*MONITOR.KNN.ENABLED off"):
        probe_feature_fn(model, None, None)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
