"""Checkpoint layouts for the conversion tests, built from torchvision modules with random
values (so that a wrong mapping cannot go unnoticed), and detectron2's matching heuristics."""
import re
from collections import Counter
from copy import deepcopy

import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead


def d2_align(model_keys, ckpt_keys):
    """detectron2's matching heuristics (``align_and_update_state_dicts``): model key ``m`` takes
    checkpoint key ``c`` when ``m == c`` or ``m`` ends with ``"." + c``, the longest ``c`` winning;
    a checkpoint key taken by two model keys is ambiguous (detectron2 then loads neither)."""
    matched = {}
    for m in model_keys:
        cands = [c for c in ckpt_keys if m == c or m.endswith("." + c)]
        if cands:
            matched[m] = max(cands, key=len)
    dup = [c for c, n in Counter(matched.values()).items() if n > 1]
    assert not dup, f"ambiguous checkpoint keys: {dup[:5]}"
    return matched


def assert_covers(model_shapes, d2, select):
    """Every model key selected by ``select`` is matched by a d2 key of the same shape."""
    wanted = [k for k in model_shapes if select(k)]
    assert wanted
    matched = d2_align(wanted, list(d2))
    missing = [k for k in wanted if k not in matched]
    assert not missing, missing[:10]
    bad = [(k, model_shapes[k], d2[c].shape) for k, c in matched.items() if tuple(d2[c].shape) != model_shapes[k]]
    assert not bad, bad[:5]


def randomize(module, seed):
    """Random values in every parameter and buffer so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return module


def prefixed(module_or_sd, prefix):
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    return {prefix + k: v.clone() for k, v in sd.items()}


def resnet_fpn(seed, depth=50, width=256):
    body = getattr(torchvision.models, f"resnet{depth}")()
    channels = [64 * 2**i * (4 if depth >= 50 else 1) for i in range(4)]
    bb = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, channels, width,
                         norm_layer=torch.nn.BatchNorm2d)
    return randomize(bb, seed)


def box_head(seed, width=256, fc=1024):
    return randomize(FastRCNNConvFCHead((width, 7, 7), [width] * 4, [fc], norm_layer=torch.nn.BatchNorm2d), seed)


def shifted(module):
    """A copy with different values (a stand-in for the target network)."""
    copy = deepcopy(module)
    with torch.no_grad():
        for t in copy.state_dict().values():
            t.add_(1)
    return copy


def soco_layout(modules):
    """This project's SoCo model state dict (soco_d2.modeling.meta_arch.soco.SoCo names)."""
    sd = {}
    sd.update(prefixed(modules["bb"], "backbone."))
    sd.update(prefixed(modules["head"], "box_head."))
    mlp = lambda i, h, o: torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.BatchNorm1d(h),  # noqa: E731
                                              torch.nn.ReLU(), torch.nn.Linear(h, o))
    sd.update(prefixed(mlp(1024, 64, 16), "projector."))
    sd.update(prefixed(mlp(16, 64, 16), "predictor."))
    sd.update(prefixed(modules["bb_t"], "target_backbone."))
    sd.update(prefixed(modules["head_t"], "target_box_head."))
    sd.update(prefixed(mlp(1024, 64, 16), "target_projector."))
    return sd


def official_soco_state(modules):
    """The official SoCo checkpoint layout (module.encoder / neck / head, mmdet FPN names)."""

    def official(bb, head, suffix):
        sd = {}
        for k, v in bb.body.state_dict().items():
            sd[f"module.encoder{suffix}.{k}"] = v
        for k, v in bb.fpn.state_dict().items():
            m = re.match(r"(inner|layer)_blocks\.(\d)\.(\d)\.(.*)", k)
            conv = "lateral_convs" if m[1] == "inner" else "fpn_convs"
            sd[f"module.neck{suffix}.{conv}.{m[2]}.{'conv' if m[3] == '0' else 'bn'}.{m[4]}"] = v
        for k, v in head.state_dict().items():
            m = re.match(r"(\d)\.(\d)\.(.*)", k)
            if m:
                sd[f"module.head{suffix}.{'conv' if m[2] == '0' else 'bn'}{int(m[1]) + 1}.{m[3]}"] = v
            else:
                sd[f"module.head{suffix}.fc1.{k.split('.')[1]}"] = v
        return sd

    sd = official(modules["bb"], modules["head"], "")
    sd.update(official(modules["bb_t"], modules["head_t"], "_k"))
    sd["module.projector.linear1.weight"] = torch.randn(4096, 1024)
    sd["module.projector.bn1.running_mean"] = torch.randn(4096)
    sd["module.predictor.linear1.weight"] = torch.randn(4096, 256)
    sd["module.projector_k.linear1.weight"] = torch.randn(4096, 1024)
    return {"model": sd, "optimizer": {}, "epoch": 100}


def detco_state(modules):
    """This project's DetCo names: encoder_q.body (torchvision ResNet), per-level heads, queues."""
    sd = prefixed(modules["bb"].body, "encoder_q.body.")
    sd.update(prefixed(modules["bb_t"].body, "encoder_k.body."))
    for enc in ("encoder_q", "encoder_k"):
        for lvl in ("res2", "res5"):
            sd[f"{enc}.global_heads.{lvl}.0.weight"] = torch.randn(8, 8)
            sd[f"{enc}.local_heads.{lvl}.2.bias"] = torch.randn(8)
    for kind in ("global", "local"):
        sd[f"queues_{kind}.res3.queue"] = torch.randn(16, 8)
        sd[f"queues_{kind}.res3.ptr"] = torch.tensor(3)
    return sd
