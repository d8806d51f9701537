import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_to_d2.py")


def _main(*args):
    """In-process run (a subprocess costs seconds of imports on a loaded 2-core machine)."""
    spec = importlib.util.spec_from_file_location("convert_to_d2_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


class Namespace:
    """Stands for the argparse namespace some training scripts store in their checkpoints."""


@pytest.fixture(scope="module")
def soco_checkpoint(tmp_path_factory):
    """A small training checkpoint with this project's SoCo names (ResNet-18, 32-channel FPN)."""
    torch.manual_seed(0)
    bb = BackboneWithFPN(torchvision.models.resnet18(), {f"layer{i + 1}": str(i) for i in range(4)},
                         [64, 128, 256, 512], 32, norm_layer=torch.nn.BatchNorm2d)
    head = FastRCNNConvFCHead((32, 7, 7), [32] * 4, [64], norm_layer=torch.nn.BatchNorm2d)
    model = {}
    for prefix, module in (("backbone.", bb), ("box_head.", head), ("target_backbone.", bb)):
        model.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    model["projector.0.weight"] = torch.randn(16, 64)
    model["target_backbone.body.conv1.weight"] += 1.0
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save({"model": model, "iteration": 100}, path)
    return path, model


def test_d2_output_and_report(soco_checkpoint, tmp_path, capsys):
    path, model = soco_checkpoint
    assert _main(path, tmp_path / "soco.pkl") == 0
    out = capsys.readouterr().out
    assert "mapped" in out and "dropped" in out and "unmapped        0" in out
    assert "target branch" in out and "projector: 1" in out
    assert "PIXEL_MEAN [123.675, 116.280, 103.530]" in out and "INPUT.FORMAT RGB" in out
    assert "STRIDE_IN_1X1 False" in out and "WEIGHT_DECAY 0.000025" in out
    with open(tmp_path / "soco.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and obj["__author__"] == "soco_d2"
    np.testing.assert_array_equal(obj["model"]["stem.conv1.weight"], model["backbone.body.conv1.weight"].numpy())
    np.testing.assert_array_equal(obj["model"]["box_head.fc1.bias"], model["box_head.5.bias"].numpy())


def test_target_branch_and_parts(soco_checkpoint, tmp_path):
    path, model = soco_checkpoint
    assert _main(path, tmp_path / "t.pkl", "--branch", "target", "--parts", "backbone,fpn") == 0
    with open(tmp_path / "t.pkl", "rb") as f:
        weights = pickle.load(f)["model"]
    np.testing.assert_array_equal(weights["stem.conv1.weight"], model["target_backbone.body.conv1.weight"].numpy())
    assert not any(k.startswith("box_head.") for k in weights)


def test_torchvision_format(soco_checkpoint, tmp_path):
    path, model = soco_checkpoint
    assert _main(path, tmp_path / "tv.pth", "--format", "torchvision") == 0
    state = torch.load(tmp_path / "tv.pth", weights_only=True)["model"]
    assert torch.equal(state["backbone.fpn.inner_blocks.3.1.running_mean"],
                       model["backbone.fpn.inner_blocks.3.1.running_mean"])
    assert torch.equal(state["roi_heads.box_head.5.weight"], model["box_head.5.weight"])
    assert _main(path, tmp_path / "retina.pth", "--format", "torchvision", "--fpn-levels", "3,4,5") == 0
    state = torch.load(tmp_path / "retina.pth", weights_only=True)["model"]
    assert torch.equal(state["backbone.fpn.inner_blocks.0.0.weight"], model["backbone.fpn.inner_blocks.1.0.weight"])


def test_failures_exit_nonzero_with_message(soco_checkpoint, tmp_path, capsys):
    path, model = soco_checkpoint
    assert _main(tmp_path / "missing.pth", tmp_path / "x.pkl") == 1
    assert "missing.pth" in capsys.readouterr().err
    assert _main(path, tmp_path / "x.pth") == 1
    assert ".pkl" in capsys.readouterr().err
    # a DetCo/MoCo-like backbone-only file with the default parts: names the missing parts
    body = {k[len("backbone.body."):]: v for k, v in model.items() if k.startswith("backbone.body.")}
    torch.save(body, tmp_path / "body.pth")
    assert _main(tmp_path / "body.pth", tmp_path / "x.pkl") == 1
    assert "['fpn', 'head'] not found" in capsys.readouterr().err
    assert _main(tmp_path / "body.pth", tmp_path / "body.pkl", "--parts", "backbone", "--depth", "50") == 1
    assert "expected a ResNet-50 but the checkpoint holds a ResNet-18" in capsys.readouterr().err
    # a file with pickled objects: refused unless trusted
    torch.save({"model": body, "args": Namespace()}, tmp_path / "args.pth")
    assert _main(tmp_path / "args.pth", tmp_path / "x.pkl", "--parts", "backbone") == 1
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert _main(tmp_path / "args.pth", tmp_path / "ok.pkl", "--parts", "backbone", "--trust-checkpoint") == 0
    # unknown keys: refused unless --allow-unmapped
    torch.save(dict(body, **{"weird.thing": torch.zeros(1)}), tmp_path / "weird.pth")
    assert _main(tmp_path / "weird.pth", tmp_path / "x.pkl", "--parts", "backbone") == 1
    assert "weird.thing" in capsys.readouterr().err
    assert _main(tmp_path / "weird.pth", tmp_path / "w.pkl", "--parts", "backbone", "--allow-unmapped") == 0
    assert "unmapped        1  weird.thing" in capsys.readouterr().out
    assert not (tmp_path / "x.pkl").exists()


@pytest.mark.parametrize("content, says, trust", [
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "neither a zip archive (what torch.save writes) nor a pickle (its first bytes: 5f 82", False),
    (b"", "the file is empty", False),
    # A pickle that torch's weights-only unpickler refuses (an opcode it does not admit).
    (b"\x80\x02\x5cgarbage", "with torch.load(weights_only=True), which refused it "
     "(Unsupported operand 92)", True),
], ids=["random_bytes", "empty", "refused_by_weights_only"])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, capsys, content, says, trust):
    (tmp_path / "weights.pth").write_bytes(content)
    assert _main(tmp_path / "weights.pth", tmp_path / "x.pkl") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'weights.pth'} is not a readable torch checkpoint")
    assert says in err and ("--trust-checkpoint" in err) is trust
    assert "Traceback" not in err and not (tmp_path / "x.pkl").exists()


@pytest.mark.slow
def test_cli_subprocess(soco_checkpoint, tmp_path):
    path, _ = soco_checkpoint
    ok = subprocess.run([sys.executable, TOOL, str(path), str(tmp_path / "s.pkl"), "--parts", "backbone"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 120 tensors" in ok.stdout and (tmp_path / "s.pkl").is_file()


def test_engine_checkpoint_of_the_soco_model(tmp_path, capsys):
    """A checkpoint written by the training engine (model + optimizer + RNG states) converts
    without --trust-checkpoint."""
    from soco_d2.config import get_cfg
    from soco_d2.engine.checkpoint import Checkpointer
    from soco_d2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "SoCo", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18,
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 32, "MODEL.SOCO.PROJECTOR_OUT_DIM", 16,
        "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 32,
    ])
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("model_final.pth", 7, config=cfg.dump())
    assert _main(tmp_path / "model_final.pth", tmp_path / "soco.pkl") == 0
    out = capsys.readouterr().out
    assert "unmapped        0" in out and "ResNet depth: 18" in out
    with open(tmp_path / "soco.pkl", "rb") as f:
        weights = pickle.load(f)["model"]
    state = model.state_dict()
    np.testing.assert_array_equal(weights["fpn_output2.norm.weight"], state["backbone.fpn.layer_blocks.0.1.weight"].numpy())
    assert {k.split(".")[1] for k in weights if k.startswith("box_head.")} == {"conv1", "conv2", "conv3", "conv4", "fc1"}
