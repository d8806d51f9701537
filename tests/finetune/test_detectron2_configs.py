"""The detectron2-format configs (configs/detectron2/*.yaml) are for detectron2's own
tools/train_net.py; detectron2 is not installed here, so they are checked against the keys of
detectron2's config (detectron2/config/defaults.py, v0.6) that they use, and against the SoCo /
MoCo recipes they reproduce."""
import ast
import glob
import os

import pytest
import yaml

FOLDER = os.path.join(os.path.dirname(__file__), "../../configs/detectron2")
FILES = sorted(glob.glob(os.path.join(FOLDER, "*.yaml")))

# Keys of detectron2's default config (detectron2/config/defaults.py) that the files may use.
DETECTRON2_KEYS = {
    "VERSION",
    "MODEL.META_ARCHITECTURE", "MODEL.WEIGHTS", "MODEL.MASK_ON", "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.FREEZE_AT",
    "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.OUT_FEATURES", "MODEL.RESNETS.NORM",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.FPN.IN_FEATURES", "MODEL.FPN.NORM",
    "MODEL.ANCHOR_GENERATOR.SIZES", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "MODEL.RPN.IN_FEATURES", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.NAME", "MODEL.ROI_HEADS.IN_FEATURES",
    "MODEL.ROI_BOX_HEAD.NAME", "MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.NUM_FC",
    "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
    "MODEL.ROI_MASK_HEAD.NAME", "MODEL.ROI_MASK_HEAD.NUM_CONV", "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
    "MODEL.RETINANET.IOU_THRESHOLDS", "MODEL.RETINANET.IOU_LABELS",
    "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
    "DATASETS.TRAIN", "DATASETS.TEST",
    "INPUT.FORMAT", "INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST",
    "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.STEPS",
    "SOLVER.MAX_ITER",
    "TEST.PRECISE_BN.ENABLED",
}
# Registered names in stock detectron2 (and the one from the MoCo code, documented in the README).
REGISTERED = {"GeneralizedRCNN", "RetinaNet", "build_resnet_fpn_backbone",
              "build_retinanet_resnet_fpn_backbone", "StandardROIHeads", "FastRCNNConvFCHead",
              "MaskRCNNConvUpsampleHead", "Res5ROIHeadsExtraNorm"}


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load(path):
    """Flat {key: value} of a file with its _BASE_ chain, as detectron2 merges it."""
    with open(path) as f:
        data = yaml.safe_load(f)
    base = data.pop("_BASE_", None)
    flat = load(os.path.join(os.path.dirname(path), base)) if base else {}
    for k, v in _flatten(data):
        # yacs reads strings such as "(60000, 80000)" with ast.literal_eval.
        if isinstance(v, str) and v.startswith("("):
            v = ast.literal_eval(v)
        flat[k] = v
    return flat


def test_files_are_there():
    names = {os.path.basename(f) for f in FILES}
    assert {"mask_rcnn_R50_FPN_1x.yaml", "mask_rcnn_R50_FPN_2x.yaml", "mask_rcnn_R50_C4_1x.yaml",
            "retinanet_R50_FPN_1x.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_only_detectron2_keys(path):
    cfg = load(path)
    unknown = set(cfg) - DETECTRON2_KEYS
    assert not unknown, f"keys not in detectron2's config: {sorted(unknown)}"
    for key in ("MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME", "MODEL.ROI_HEADS.NAME",
                "MODEL.ROI_BOX_HEAD.NAME", "MODEL.ROI_MASK_HEAD.NAME"):
        if key in cfg:
            assert cfg[key] in REGISTERED, (key, cfg[key])


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_torchvision_style_input_and_full_fine_tuning(path):
    cfg = load(path)
    assert cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert cfg["INPUT.FORMAT"] == "RGB"
    assert cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert cfg["MODEL.BACKBONE.FREEZE_AT"] == 0
    assert cfg["MODEL.RESNETS.NORM"] == "SyncBN"
    assert cfg["TEST.PRECISE_BN.ENABLED"] is True
    assert cfg["INPUT.MIN_SIZE_TRAIN"] == (640, 672, 704, 736, 768, 800)
    assert cfg["SOLVER.IMS_PER_BATCH"] == 16
    assert cfg["DATASETS.TRAIN"] == ("coco_2017_train",)


def test_soco_mask_rcnn_fpn_recipe():
    one = load(os.path.join(FOLDER, "mask_rcnn_R50_FPN_1x.yaml"))
    assert one["MODEL.MASK_ON"] is True
    assert (one["MODEL.ROI_BOX_HEAD.NUM_CONV"], one["MODEL.ROI_BOX_HEAD.NUM_FC"]) == (4, 1)
    assert one["MODEL.ROI_BOX_HEAD.NORM"] == one["MODEL.ROI_MASK_HEAD.NORM"] == "SyncBN"
    assert one["MODEL.FPN.NORM"] == "SyncBN"
    assert one["SOLVER.WEIGHT_DECAY"] == 2.5e-5 and one["SOLVER.BASE_LR"] == 0.02
    assert (one["SOLVER.STEPS"], one["SOLVER.MAX_ITER"]) == ((60000, 80000), 90000)
    two = load(os.path.join(FOLDER, "mask_rcnn_R50_FPN_2x.yaml"))
    assert (two["SOLVER.STEPS"], two["SOLVER.MAX_ITER"]) == ((120000, 160000), 180000)
    assert two["MODEL.ROI_BOX_HEAD.NUM_CONV"] == 4


def test_c4_and_retinanet_recipes():
    c4 = load(os.path.join(FOLDER, "mask_rcnn_R50_C4_1x.yaml"))
    assert c4["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    assert (c4["MODEL.RPN.PRE_NMS_TOPK_TEST"], c4["MODEL.RPN.POST_NMS_TOPK_TEST"]) == (6000, 1000)
    assert c4["SOLVER.WEIGHT_DECAY"] == 2.5e-5
    ret = load(os.path.join(FOLDER, "retinanet_R50_FPN_1x.yaml"))
    assert ret["MODEL.META_ARCHITECTURE"] == "RetinaNet"
    assert ret["SOLVER.BASE_LR"] == 0.01 and ret["SOLVER.WEIGHT_DECAY"] == 1e-4
    assert ret["MODEL.RETINANET.SMOOTH_L1_LOSS_BETA"] == 0.0
    sizes = ret["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert [s[0] for s in sizes] == [32, 64, 128, 256, 512]
    assert all(s[1] == pytest.approx(s[0] * 2 ** (1 / 3)) and s[2] == pytest.approx(s[0] * 2 ** (2 / 3))
               for s in sizes)
