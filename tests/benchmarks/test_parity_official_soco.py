"""The parity benchmark's reader of official SoCo checkpoints (no official code needed): a fake
checkpoint in the official layout, built from this project's model, loads back exactly, and
keys it cannot map stop it with a message naming the key and what was expected."""
import importlib.util
import os
import re

import pytest
import torch

from soco_d2.checkpoint import ConversionError
from soco_d2.config import load_config
from soco_d2.modeling import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def parity():
    path = os.path.join(ROOT, "benchmarks", "parity_official_soco.py")
    spec = importlib.util.spec_from_file_location("parity_official_soco", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_model(seed):
    torch.manual_seed(seed)
    cfg = load_config(os.path.join(ROOT, "configs/soco/soco_fpn_r50_100ep.yaml"), [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", "24",
        "MODEL.SOCO.PROJECTOR_OUT_DIM", "8", "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", "24", "CHANNELS_LAST", "False",
    ])
    return build_model(cfg)


def official_name(key):
    """This project's SoCo state-dict name -> the official SoCo_FPN checkpoint name."""
    k = "_k" if key.startswith("target_") else ""
    key = key.removeprefix("target_")
    rules = [
        (r"backbone\.body\.(.*)", lambda m: f"encoder{k}.{m[1]}"),
        (r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(\d)\.(.*)", lambda m: (
            f"neck{k}.{'lateral_convs' if m[1] == 'inner' else 'fpn_convs'}.{m[2]}."
            f"{'conv' if m[3] == '0' else 'bn'}.{m[4]}")),
        (r"box_head\.(\d)\.(\d)\.(.*)", lambda m: f"head{k}.{'conv' if m[2] == '0' else 'bn'}{int(m[1]) + 1}.{m[3]}"),
        (r"box_head\.5\.(.*)", lambda m: f"head{k}.fc1.{m[1]}"),
        (r"(projector|predictor)\.(\d)\.(.*)", lambda m: f"{m[1]}{k}.{({'0': 'linear1', '1': 'bn1', '3': 'linear2'})[m[2]]}.{m[3]}"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return "module." + fn(m)
    raise AssertionError(key)


@pytest.fixture(scope="module")
def official_ckpt():
    source = small_model(0)
    return source, {"model": {official_name(k): v.clone() for k, v in source.state_dict().items()}}


def test_official_checkpoint_loads_every_tensor(parity, official_ckpt):
    source, ckpt = official_ckpt
    model = small_model(1)
    origin = parity.load_official_weights(model, ckpt, depth=18)
    assert origin["target_projector.1.running_var"] == "module.projector_k.bn1.running_var"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, source.state_dict()[k], rtol=0, atol=0, msg=k)


def test_unmappable_official_keys_are_named_with_what_was_expected(parity, official_ckpt):
    _, ckpt = official_ckpt
    bad = {"model": dict(ckpt["model"], **{"module.projector.linear3.weight": torch.zeros(2, 2)})}
    with pytest.raises(ConversionError, match=r"'module\.projector\.linear3\.weight'.*expected "
                                              r"projector\.\{linear1, bn1, linear2\}"):
        parity.load_official_weights(small_model(1), bad, depth=18)

    bad = {"model": dict(ckpt["model"], **{"module.neck.lateral_convs.0.se.weight": torch.zeros(2)})}
    with pytest.raises(ConversionError, match=r"'module\.neck\.lateral_convs\.0\.se\.weight' \(inside the "
                                              r"FPN, mmdetection block at 'module\.neck\.', which expects "
                                              r"lateral_convs\.\{i\}\.conv\.weight"):
        parity.load_official_weights(small_model(1), bad, depth=18)

    bad = {"model": {k: v for k, v in ckpt["model"].items() if k != "module.predictor.bn1.running_var"}}
    with pytest.raises(ConversionError, match=r"model key\(s\) \['predictor\.1\.running_var'\] get no value"):
        parity.load_official_weights(small_model(1), bad, depth=18)
