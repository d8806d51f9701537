"""Parity of this project's SoCo with the official code (hologerry/SoCo): same weights, same sample.

The official code is not part of this project: pass a checkout with ``--official-repo`` (tested
against commit 2be1229). ``benchmarks/official_soco.py`` supplies stand-ins for the two OpenMMLab
imports of the official modules (mmcv's ``ConvModule`` for its FPN, mmdet's
``anchor_inside_flags`` for an unused helper of its data code).

What is compared, per case (ResNet depth, number of images) and per BN mode (``eval``: running
statistics, ``train``: batch statistics, as in pretraining):

* **Models**: the official ``SoCo_FPN`` built from ``contrast/option.py``'s defaults plus the
  arguments of the FPN recipe ``tools/SoCo_FPN_100ep.sh`` (read from the checkout), and this
  project's ``SoCo`` meta-architecture from ``--config`` with ``MODEL.RESNETS.DEPTH`` overridden,
  once per head mode (``MODEL.SOCO.HEAD_MODE``, the config's default first). The official model converts its BNs to ``SyncBatchNorm``; in this single
  CPU process the conversion is skipped while it is built, so its BNs stay the plain
  ``BatchNorm`` layers it created (at world size 1 SyncBatchNorm computes the same thing). Its BN
  affine parameters and running statistics are randomised (fresh ones make eval mode trivial) and
  its target network is perturbed (so that a mix-up of online and target weights shows).
* **Weights**: the official model's state dict, saved as its training script does
  (``{"model": {"module.<name>": tensor}}``), goes through this project's converter
  (:func:`soco_d2.checkpoint.to_torchvision.convert_to_torchvision`, which reads the official layout:
  ``module.encoder`` / ``neck`` / ``head`` and their ``_k`` target copies) and the projector /
  predictor table below, into the model with ``load_state_dict(strict=True)``. A key that
  cannot be mapped stops the run with a message that names it and what was expected.
* **Input**: the official dataset class ``ImageFolderImageAsymBboxAwareMultiJitter1`` with the
  official transforms (``contrast/data/transform.py``) on real images (``--images``), with
  selective-search proposals computed here and written in the official props format. Its
  sample is converted to this project's batch format: images un-normalised to 0-255 floats
  (the model normalises them back), boxes normalised by the view size multiplied by the view
  size (view pixels), ids from the boxes' fifth column. The official model gets the images as
  this model normalises them, so both see bit-identical input (the 0-255 round trip moves them
  by about 1 ulp; the official loss on its dataset's own tensors is reported as a noise floor).
* **Reported**: FPN features (max abs difference per level and view), RoIAlign outputs (every box
  on every level), loss (both pair terms), gradients of every online tensor (max abs difference
  and cosine, per part: backbone, FPN, box head, projector, predictor, all), the level each
  box's loss uses (from the official correspondence matrices) against this model's assignment,
  one LARS step (official ``contrast/lars.py`` + SGD vs :class:`soco_d2.engine.optimizer.LARS`,
  given the same gradients), one EMA step (official ``_momentum_update_key_encoder`` vs
  ``momentum_update`` with the momentum schedule) and the lr / momentum schedules over the whole
  recipe (ImageNet-1k, 100 epochs, 16 x 128 images). When some box's level differs, the
  comparison is repeated with every box of the loss on the official level (``+ levels`` rows),
  which separates the level rule from the head computation.
* **View mapper statistics**: :class:`soco_d2.data.soco_views.SoCoViewMapper` against the
  official dataset class over ``--stat-samples`` samples of the same images and proposals: boxes
  per FPN level per view (official level rule on the view-pixel boxes), mean box side per view,
  distinct proposals per box set and the fraction of padding duplicates.

The official forward first moves its target network by EMA; for the comparisons its momentum
is set to 1 (the target stays as loaded), and the EMA step is compared on its own.

Example (single-threaded; about 5 minutes of CPU time)::

    python benchmarks/parity_official_soco.py --official-repo /path/to/SoCo \\
        --images $SOCO_DATA_ROOT/coco_mini/train2017 --output parity.json
"""
import argparse
import contextlib
import copy
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from soco_d2.checkpoint import ConversionError, convert_to_torchvision
from soco_d2.checkpoint.io import unwrap_state_dict
from soco_d2.config import load_config
from soco_d2.data.image_list import read_image
from soco_d2.data.selective_search import generate_proposals
from soco_d2.data.soco_views import SoCoViewMapper
from soco_d2.engine.optimizer import build_optimizer
from soco_d2.engine.schedules import build_lr_schedule, build_momentum_schedule, max_iter_from_cfg
from soco_d2.modeling import build_model
from soco_d2.modeling.meta_arch.soco import HEAD_MODES
from soco_d2.modeling.pooler import official_box_levels

PARTS = ("backbone", "fpn", "head", "projector", "predictor")

# Official MLP (contrast/models/mlps.py: linear1, bn1, relu1, linear2) -> nn.Sequential indices.
_MLP_LAYERS = {"linear1": "0", "bn1": "1", "linear2": "3"}
_MLP_MODULES = {"projector": "projector", "projector_k": "target_projector", "predictor": "predictor"}
# Converter output (torchvision detector names) -> this model's names, per branch.
_TV_PREFIXES = {
    "online": {"backbone.": "backbone.", "roi_heads.box_head.": "box_head."},
    "target": {"backbone.": "target_backbone.", "roi_heads.box_head.": "target_box_head."},
}


# ------------------------------------------------------------------------------------------------
# Weights: official checkpoint -> this model
# ------------------------------------------------------------------------------------------------
def official_to_model_state(ckpt, depth: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Map an official SoCo_FPN checkpoint to this project's ``SoCo`` state-dict names.

    Returns ``(state, origin)`` with ``origin[model_key] = official_key``. The ResNet, FPN and box
    head of both branches go through the converter; the projector, its target copy and the
    predictor through ``_MLP_LAYERS``. Raises :class:`ConversionError` naming any key that maps
    nowhere and what was expected there.
    """
    source = unwrap_state_dict(ckpt)
    state: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for branch, prefixes in _TV_PREFIXES.items():
        tv, report = convert_to_torchvision(ckpt, branch=branch, depth=depth)
        for src, name in report.mapped.items():
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            if prefix is None:
                raise ConversionError(
                    f"official key '{src}' converts to '{name}', which has no place in the SoCo "
                    f"model: expected a name under {sorted(prefixes)}"
                )
            key = prefixes[prefix] + name[len(prefix):]
            state[key], origin[key] = tv[name], src
    for src, value in source.items():
        m = re.match(r"^(?:module\.)?(projector_k|projector|predictor)\.(.*)$", src)
        if m is None:
            continue
        layer, _, rest = m[2].partition(".")
        if layer not in _MLP_LAYERS or not rest:
            raise ConversionError(
                f"official key '{src}': '{m[2]}' is not a parameter of the official MLP; expected "
                f"{m[1]}.{{{', '.join(_MLP_LAYERS)}}}.<tensor> (Linear, BatchNorm1d, Linear)"
            )
        key = f"{_MLP_MODULES[m[1]]}.{_MLP_LAYERS[layer]}.{rest}"
        state[key], origin[key] = torch.as_tensor(value), src
    used = set(origin.values())
    leftover = [k for k in source if k not in used]
    if leftover:
        raise ConversionError(
            f"official key(s) {leftover[:5]} map to nothing in the SoCo model; expected only "
            "encoder(_k).*, neck(_k).*, head(_k).*, projector(_k).*, predictor.* under 'module.'"
        )
    return state, origin


def load_official_weights(model: nn.Module, ckpt, depth: int) -> Dict[str, str]:
    """Copy the official weights into ``model`` (every tensor, strictly); returns ``origin``."""
    state, origin = official_to_model_state(ckpt, depth)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConversionError(
            f"model key(s) {missing[:5]} get no value from the official checkpoint; check that the "
            "checkpoint and the config describe the same model (depth, head, projector sizes)"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ConversionError(
            f"official key(s) {[origin[k] for k in unexpected[:5]]} map to {unexpected[:5]}, which "
            "the model does not have"
        )
    bad = [
        f"'{origin[k]}' {tuple(v.shape)} -> '{k}' expects {tuple(expected[k].shape)}"
        for k, v in state.items() if v.shape != expected[k].shape
    ]
    if bad:
        raise ConversionError("shape mismatch: " + "; ".join(bad[:5]))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return origin


# ------------------------------------------------------------------------------------------------
# The official code
# ------------------------------------------------------------------------------------------------
def recipe_arguments(repo: str, script: str = "tools/SoCo_FPN_100ep.sh") -> List[str]:
    """The command-line arguments of ``main_pretrain.py`` in an official recipe script, with its
    shell variables (``warmup=${1:-10}``, ``data_dir="..."``) substituted by their defaults."""
    path = os.path.join(repo, script)
    with open(path) as f:
        text = f.read()
    values = {k: v for k, v in re.findall(r"^(\w+)=\$\{\d+:-([^}]*)\}\s*$", text, re.M)}
    values.update({k: v for k, v in re.findall(r'^(\w+)="([^"]*)"\s*$', text, re.M)})
    if "main_pretrain.py" not in text:
        raise ValueError(f"{path}: no main_pretrain.py command found")
    command = text.split("main_pretrain.py", 1)[1].replace("\\\n", " ")
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], ""), command)
    return shlex.split(command)


def official_args(repo: str, depth: int):
    """``contrast/option.py``'s defaults plus the FPN recipe, for a ResNet-``depth`` model."""
    from contrast.option import parse_option

    argv = recipe_arguments(repo) + ["--local_rank", "0", "--arch", f"resnet{depth}"]
    saved = sys.argv
    sys.argv = ["main_pretrain.py"] + argv
    try:
        args = parse_option("pre_train")
    finally:
        sys.argv = saved
    args.in_channels = [c * (4 if depth >= 50 else 1) for c in (64, 128, 256, 512)]
    # The recipe's scale: ImageNet-1k on 16 GPUs (2 nodes x 8) with 128 images each.
    args.num_instances, args.world_size = 1281167, 16
    return args


@contextlib.contextmanager
def plain_batchnorm():
    """Keep the BNs the official model builds (it converts them to SyncBatchNorm, which computes
    the same at world size 1 but needs a process group in every forward)."""
    convert = nn.SyncBatchNorm.convert_sync_batchnorm
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, *a, **k: module)
    try:
        yield
    finally:
        nn.SyncBatchNorm.convert_sync_batchnorm = convert


def build_official(args, seed: int) -> nn.Module:
    from contrast import resnet
    from contrast.models.SoCo_FPN import SoCo_FPN

    torch.manual_seed(seed)
    with plain_batchnorm():
        model = SoCo_FPN(resnet.__dict__[args.arch], args)
    # The iteration count of the recipe (the constructor used this process's world size of 1).
    model.K = int(args.num_instances / args.world_size / args.batch_size * args.epochs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name in ("encoder_k", "neck_k", "head_k", "projector_k"):
            for t in getattr(model, name).state_dict().values():
                if t.is_floating_point():
                    t.mul_(1 + 0.01 * torch.randn(t.shape, generator=g))
    return model


def official_checkpoint(model: nn.Module) -> Dict:
    """The layout ``main_pretrain.py`` saves (a DistributedDataParallel model's state dict)."""
    return {"model": {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            "epoch": 0}


# ------------------------------------------------------------------------------------------------
# Data: the official dataset class on real images
# ------------------------------------------------------------------------------------------------
def list_images(folder: str, count: int) -> List[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if len(names) < 1:
        raise FileNotFoundError(f"--images {folder!r}: no .jpg / .png images")
    return [os.path.join(folder, n) for n in names[:count]]


def compute_proposals(paths: List[str]) -> Dict[str, np.ndarray]:
    """This project's filtered selective-search boxes (x1, y1, x2, y2, continuous)."""
    return {p: generate_proposals(read_image(p)) for p in paths}


def official_dataset(args, paths: List[str], proposals: Dict[str, np.ndarray], workdir: str):
    """``ImageFolderImageAsymBboxAwareMultiJitter1`` over ``paths`` with an official-format props
    file (``{basename: [[x, y, w, h], ...]}``, inclusive corners: x2 = x + w - 1)."""
    from contrast.data.dataset import ImageFolderImageAsymBboxAwareMultiJitter1, pil_loader
    from contrast.data.transform import get_transform

    aug = "ImageAsymBboxAwareMultiJitter1"
    with open(os.path.join(workdir, "map.txt"), "w") as f:
        f.writelines(f"{p}\t0\n" for p in paths)
    props = {}
    for p in paths:
        key = os.path.basename(p).split(".")[0]
        if key in props:
            raise ValueError(f"two images share the basename {key!r}; the official props file needs unique ones")
        b = proposals[p]
        props[key] = [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in b]
    with open(os.path.join(workdir, "props.json"), "w") as f:
        json.dump(props, f)
    transform = get_transform(args, aug, args.crop, args.image_size, crop1=args.crop1,
                              cutout_prob=args.cutout_prob, cutout_ratio=args.cutout_ratio,
                              image3_size=args.image3_size, image4_size=args.image4_size)
    return ImageFolderImageAsymBboxAwareMultiJitter1(
        workdir, "map.txt", "", "props.json", image_size=args.image_size,
        select_strategy=args.select_strategy, select_k=args.select_k,
        weight_strategy=args.weight_strategy, jitter_prob=args.jitter_prob,
        jitter_ratio=args.jitter_ratio, padding_k=args.padding_k, aware_range=args.aware_range,
        aware_start=args.aware_start, aware_end=args.aware_end, max_tries=args.max_tries,
        transform=transform, cache_mode="no", dataset=args.dataset,
        # Its loader given the file's bytes, as in its cache mode: on a path, it closes the file
        # before PIL has read it (it ran on zip archives).
        loader=lambda path: pil_loader(_read_bytes(path)),
    )


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FlipRecorder:
    """Wraps one of the official dataset's flip transforms and records, per call, whether it
    mirrored the image (its output pixels differ from its input's); the random draw is the
    transform's own, so the sample is unchanged."""

    def __init__(self, transform, flags: List[bool]):
        self.transform, self.flags = transform, flags

    def __call__(self, img, *args):
        out = self.transform(img, *args)
        self.flags.append(not np.array_equal(np.asarray(out[0]), np.asarray(img)))
        return out


def record_flips(dataset) -> List[bool]:
    """The (emptied) list that receives the flags of the V1 flip (``transform[3]``) then V2's and
    V3's (``transform[4]``), in call order; the recorders are installed once."""
    t = list(dataset.transform)
    if not isinstance(t[3], FlipRecorder):
        flags: List[bool] = []
        t[3], t[4] = FlipRecorder(t[3], flags), FlipRecorder(t[4], flags)
        dataset.transform = tuple(t)
    flags = dataset.transform[3].flags
    flags.clear()
    return flags


def official_batch(dataset, n: int, seed: int):
    """``n`` samples of the official dataset, collated, and whether each view of each was flipped:
    ``(tensors, {"v1": (n,), "v2": (n,), "v3": (n,)})``."""
    seed_everything(seed)
    flags = record_flips(dataset)
    samples = [dataset[i % len(dataset)] for i in range(n)]
    flips = torch.tensor(flags).view(n, 3)
    tensors = [torch.stack([torch.as_tensor(s[j]) for s in samples]) for j in range(9)]
    return tensors, {v: flips[:, i] for i, v in enumerate(("v1", "v2", "v3"))}


def to_model_batch(sample, flips, mean: torch.Tensor, std: torch.Tensor) -> Dict:
    """The official sample in this project's batch format (the SoCo sample of
    docs/ARCHITECTURE.md, collated): 0-255 float images, view-pixel boxes, ids, flip flags."""
    im1, im2, im3, b1_12, b1_13, b2, b3, _, _ = sample
    images = {v: x * std + mean for v, x in (("v1", im1), ("v2", im2), ("v3", im3))}

    def px(b, view):
        return b[..., :4] * images[view].shape[-1]

    def ids(b):
        return b[..., 4].round().long()

    return {
        "images": images,
        "flips": flips,
        "pairs": [
            {"a": "v1", "b": "v2", "boxes_a": px(b1_12, "v1"), "boxes_b": px(b2, "v2"),
             "ids_a": ids(b1_12), "ids_b": ids(b2)},
            {"a": "v1", "b": "v3", "boxes_a": px(b1_13, "v1"), "boxes_b": px(b3, "v3"),
             "ids_a": ids(b1_13), "ids_b": ids(b3)},
        ],
    }


def official_loss_levels(corres: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The level of each box as the official loss uses it, read from its aware correspondence
    matrix (P*K x P*K: row l*K + i is box i on level l): ``(levels_a, levels_b)`` (N, K), -1 for a
    box without any positive (it does not enter the loss)."""
    n, pk, _ = corres.shape
    p = pk // k
    rows = corres.sum(2).view(n, p, k) > 0
    cols = corres.sum(1).view(n, p, k) > 0

    def level(mask):
        out = torch.full((n, k), -1, dtype=torch.long)
        for lv in range(p):
            out[mask[:, lv]] = lv
        return out

    return level(rows), level(cols)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def part_of(key: str) -> str:
    if key.startswith("backbone.fpn."):
        return "fpn"
    if key.startswith("backbone."):
        return "backbone"
    if key.startswith("box_head."):
        return "head"
    return key.split(".", 1)[0]


def compare_gradients(official: nn.Module, ours: nn.Module, origin: Dict[str, str]) -> Dict:
    off = {f"module.{k}": p for k, p in official.named_parameters() if p.requires_grad}
    mine = dict(ours.named_parameters())
    per_part: Dict[str, Dict[str, list]] = {p: {"a": [], "b": [], "rows": []} for p in PARTS + ("all",)}
    for key, src in origin.items():
        if key not in mine or not mine[key].requires_grad:
            continue
        a = off[src].grad if off[src].grad is not None else torch.zeros_like(off[src])
        b = mine[key].grad if mine[key].grad is not None else torch.zeros_like(mine[key])
        row = {"tensor": key, "official": src, "max_abs_diff": max_abs(a, b),
               "max_abs": float(a.abs().max()), "cosine": cosine(a, b)}
        for part in (part_of(key), "all"):
            per_part[part]["a"].append(a.flatten())
            per_part[part]["b"].append(b.flatten())
            per_part[part]["rows"].append(row)
    out = {}
    for part, d in per_part.items():
        if not d["rows"]:
            continue
        a, b = torch.cat(d["a"]), torch.cat(d["b"])
        worst = min(d["rows"], key=lambda r: r["cosine"])
        out[part] = {
            "tensors": len(d["rows"]),
            "cosine": cosine(a, b),
            "min_tensor_cosine": worst["cosine"],
            "min_cosine_tensor": worst["tensor"],
            "max_abs_diff": max(r["max_abs_diff"] for r in d["rows"]),
            "max_abs_grad": float(a.abs().max()),
        }
    out["worst_tensors"] = sorted(per_part["all"]["rows"], key=lambda r: r["cosine"])[:5]
    return out


def official_features(model, images):
    return [list(model.neck(model.encoder(x))) for x in images]


def official_pooled(model, fpn_feats, boxes):
    """Every box of each (view, box set) on every level: list of (L, N*K, C, S, S)."""
    return [torch.stack([model.roi_align_feature_map(f, b) for f in feats]) for feats, b in zip(fpn_feats, boxes)]


def our_features(model, batch):
    return [list(model.backbone(model.normalize(batch["images"][v])).values()) for v in ("v1", "v2", "v3")]


def our_pooled(model, feats, batch, view_of_set):
    """Our pooler, every box on every level (``pool_all_levels``, or a plan that sends all boxes to
    one level at a time on poolers without it)."""
    out = []
    for (view, boxes) in view_of_set:
        f = feats[view]
        size = tuple(batch["images"][("v1", "v2", "v3")[view]].shape[-2:])
        if hasattr(model.pooler, "pool_all_levels"):
            out.append(model.pooler.pool_all_levels(f, boxes, size))
        else:
            r = boxes.shape[0] * boxes.shape[1]
            levels = []
            for lv in range(len(f)):
                counts = [r if i == lv else 0 for i in range(len(f))]
                levels.append(model.pooler(f, boxes, size, (torch.arange(r), counts)))
            out.append(torch.stack(levels))
    return out


def head_modes(cfg) -> Tuple[Optional[str], List[str]]:
    """The config key that selects the head computation and its values, default first."""
    default = cfg.MODEL.SOCO.HEAD_MODE
    return "MODEL.SOCO.HEAD_MODE", [default] + [m for m in HEAD_MODES if m != default]


def build_ours(config: str, depth: int, mode_key: Optional[str], mode: str):
    overrides = ["MODEL.RESNETS.DEPTH", str(depth), "CHANNELS_LAST", "False", "SOLVER.AMP.ENABLED", "False"]
    if mode_key:
        overrides += [mode_key, mode]
    cfg = load_config(config, overrides)
    return cfg, build_model(cfg)


def run_case(off_model, ckpt, config, depth, bn_mode, sample, batch, mean, std, mode_key, modes, log):
    """Official vs ours for one (depth, images, BN mode) and every head mode. ``batch``: the
    sample in this project's format; the official model gets its images as this model normalises
    them (bit-identical input; they differ from the sample's by the 0-255 round trip, ~1 ulp)."""
    pristine = copy.deepcopy(off_model.state_dict())
    off_model.load_state_dict(pristine)
    off_model.train(bn_mode == "train")
    _, _, _, b1_12, b1_13, b2, b3, c12, c13 = sample
    im1, im2, im3 = ((batch["images"][v].float() - mean) / std for v in ("v1", "v2", "v3"))
    off_model.contrast_momentum = 1.0  # keep the loaded target (see the module docstring)
    off_model.zero_grad(set_to_none=True)
    loss_off = off_model(im1, im2, im3, b1_12, b1_13, b2, b3, c12, c13)
    loss_off.backward()
    with torch.no_grad():
        # Noise floor: the official loss on the dataset's own tensors (1 ulp from the input above).
        loss_floor = off_model(*sample[:3], b1_12, b1_13, b2, b3, c12, c13).item()
        feats_off = official_features(off_model, (im1, im2, im3))
        sets = [(0, b1_12), (0, b1_13), (1, b2), (2, b3)]
        pooled_off = official_pooled(off_model, [feats_off[v] for v, _ in sets], [b for _, b in sets])
    k = b1_12.shape[1]
    lv = {"v1_v2": official_loss_levels(c12, k), "v1_v3": official_loss_levels(c13, k)}

    def evaluate(mode, levels_from_official):
        cfg, ours = build_ours(config, depth, mode_key, mode)
        origin = load_official_weights(ours, ckpt, depth)
        ours.train(bn_mode == "train")
        if levels_from_official:
            use_official_levels(ours.pooler, batch, lv)
        losses = ours(batch)
        loss = sum(losses.values())
        loss.backward()
        r = {
            "loss_official": loss_off.item(),
            "loss_ours": loss.item(),
            "loss_terms_ours": {k_: float(v) for k_, v in losses.items()},
            "loss_rel_diff": abs(loss.item() - loss_off.item()) / max(abs(loss_off.item()), 1e-12),
            "gradients": compare_gradients(off_model, ours, origin),
            "level_disagreements": level_disagreements(ours, batch, lv),
        }
        return cfg, ours, origin, r

    results = {"_official": {"loss": loss_off.item(), "loss_dataset_input": loss_floor,
                             "rel_diff": abs(loss_floor - loss_off.item()) / max(abs(loss_off.item()), 1e-12)}}
    for mode in modes:
        cfg, ours, origin, r = evaluate(mode, False)
        with torch.no_grad():
            feats = our_features(ours, batch)
            r["fpn_max_abs_diff"] = {
                f"P{lv_ + 2}": max(max_abs(feats[v][lv_], feats_off[v][lv_]) for v in range(3)) for lv_ in range(4)
            }
            r["fpn_max_abs"] = max(float(f.abs().max()) for fs in feats_off for f in fs)
            p = batch["pairs"]
            mine = our_pooled(ours, feats, batch, [(0, p[0]["boxes_a"]), (0, p[1]["boxes_a"]),
                                                   (1, p[0]["boxes_b"]), (2, p[1]["boxes_b"])])
            diffs = {
                f"{name} P{lv_ + 2}": max_abs(a[lv_], b[lv_])
                for name, a, b in zip(("v1(12)", "v1(13)", "v2", "v3"), mine, pooled_off) for lv_ in range(4)
            }
            # V3's P5 map (4 x 4 for 112 px) is the one level whose scale is not a power of two:
            # 4/112 in float32 here vs boxes normalised by the view times 4 there. No box of V3 is
            # assigned P5, so these outputs never reach the loss.
            r["pooled_max_abs_diff"] = max(v for k_, v in diffs.items() if k_ != "v3 P5")
            r["pooled_max_abs_diff_v3_p5"] = diffs["v3 P5"]
            r["pooled_max_abs_diff_per_set_and_level"] = diffs
            r["pooled_max_abs"] = max(float(x.abs().max()) for x in pooled_off)
        results[mode] = r
        log(f"    {bn_mode:5s} {mode:9s} loss ours {r['loss_ours']:+.8f} official {r['loss_official']:+.8f} "
            f"(rel {r['loss_rel_diff']:.1e})  grad cos {r['gradients']['all']['cosine']:.7f}")
        if bn_mode == "train" and mode == modes[0]:
            results["_optim"] = compare_optim_and_ema(off_model, ours, origin, cfg)
        del ours
        if r["level_disagreements"]["different"]:
            # The same comparison with each box's loss on the level the official code chose.
            _, ours, _, r2 = evaluate(mode, True)
            del ours
            results[mode]["with_official_levels"] = r2
            log(f"    {bn_mode:5s} {mode:9s} with the official levels: loss ours {r2['loss_ours']:+.8f} "
                f"(rel {r2['loss_rel_diff']:.1e})  grad cos {r2['gradients']['all']['cosine']:.7f}")
    off_model.load_state_dict(pristine)
    off_model.zero_grad(set_to_none=True)
    return results


def use_official_levels(pooler, batch, official_levels) -> None:
    """Make ``pooler.assign_levels`` return, for every box that enters the official loss, the level
    the official code chose for it (looked up by its exact coordinates); its own level otherwise."""
    table = {}
    for p, key in zip(batch["pairs"], ("v1_v2", "v1_v3")):
        for side, levels in zip(("a", "b"), official_levels[key]):
            for box, level in zip(p[f"boxes_{side}"].reshape(-1, 4).tolist(), levels.reshape(-1).tolist()):
                if level >= 0:
                    table[tuple(box)] = level
    own = pooler.assign_levels

    def assign_levels(boxes, flipped=None):
        levels = own(boxes, flipped).clone()
        for i, box in enumerate(boxes.reshape(-1, 4).tolist()):
            levels[i] = table.get(tuple(box), levels[i])
        return levels

    pooler.assign_levels = assign_levels


def level_disagreements(ours, batch, official_levels) -> Dict:
    """Boxes whose loss level (official, from the correspondence matrices) differs from this
    model's assignment of the same view-pixel box."""
    out = {"boxes_in_loss": 0, "different": 0}
    if not hasattr(ours.pooler, "assign_levels"):
        return out
    for p, key in zip(batch["pairs"], ("v1_v2", "v1_v3")):
        for side, levels in zip(("a", "b"), official_levels[key]):
            mine = ours.pooler.assign_levels(p[f"boxes_{side}"], batch["flips"][p[side]]).view(levels.shape)
            used = levels >= 0
            out["boxes_in_loss"] += int(used.sum())
            out["different"] += int((mine[used] != levels[used]).sum())
    return out


def compare_optim_and_ema(off_model, ours, origin, cfg) -> Dict:
    """One LARS step (twice, for the momentum buffer) from the same gradients, then one EMA step."""
    from contrast.lars import LARS, add_weight_decay

    off_params = {f"module.{k}": p for k, p in off_model.named_parameters()}
    mine = dict(ours.named_parameters())
    pairs = [(off_params[src], mine[key]) for key, src in origin.items()
             if key in mine and mine[key].requires_grad]
    lr = build_lr_schedule(cfg, 62500).lr_at(100)  # a warmup-phase rate of the recipe
    args_wd = cfg.SOLVER.WEIGHT_DECAY
    off_opt = LARS(torch.optim.SGD(add_weight_decay(off_model, args_wd), lr=lr, momentum=cfg.SOLVER.MOMENTUM))
    my_opt = build_optimizer(cfg, ours)
    for group in my_opt.param_groups:
        group["lr"] = lr
    for group in off_opt.param_groups:
        group["lr"] = lr
    grads = [a.grad.clone() if a.grad is not None else torch.zeros_like(a) for a, _ in pairs]
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)
    steps = []
    for _ in range(2):  # the second step uses the momentum buffers
        # The official LARS replaces .grad by the scaled gradient: give both the raw one each step.
        for (a, b), g in zip(pairs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        before = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
        off_opt.step()
        my_opt.step()
        upd = [(a - a0, b - b0) for (a, b), (a0, b0) in zip(pairs, before)]
        steps.append({
            "max_abs_update_diff": max(max_abs(ua, ub) for ua, ub in upd),
            "max_abs_update": max(float(ua.abs().max()) for ua, _ in upd),
            "min_update_cosine": min(cosine(ua, ub) for ua, ub in upd),
        })
    # EMA: the official update at iteration k of its schedule vs ours with the momentum schedule.
    k = off_model.K // 3
    off_model.contrast_momentum = cfg.MODEL.EMA.BASE_MOMENTUM
    off_model.k = k
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)  # identical online weights, so only the update rule differs
    off_model._momentum_update_key_encoder()
    m = build_momentum_schedule(cfg, off_model.K).momentum_at(k)
    ours.momentum_update(m)
    off_state = {f"module.{k_}": v for k_, v in off_model.state_dict().items()}
    my_state = ours.state_dict()
    targets = [(off_state[src], my_state[key]) for key, src in origin.items() if key.startswith("target_")
               and key.rsplit(".", 1)[1] in ("weight", "bias")]
    for (a, _), g in zip(pairs, grads):  # the official gradients, for the next comparisons
        a.grad = g
    return {
        "lr": lr,
        "lars_steps": steps,
        "ema": {"iteration": k, "of": off_model.K, "momentum": m,
                "target_max_abs_diff": max(max_abs(a, b) for a, b in targets)},
    }


def compare_schedules(args, cfg_file: str) -> Dict:
    """lr and EMA momentum at every iteration of the recipe (100 epochs of ImageNet-1k, 16 x 128)."""
    from contrast.lr_scheduler import get_scheduler
    from contrast.models.SoCo_FPN import SoCo_FPN

    per_rank = math.ceil(args.num_instances / args.world_size)
    iters_per_epoch = per_rank // args.batch_size  # DistributedSampler + drop_last
    total = iters_per_epoch * args.epochs
    cfg = load_config(cfg_file, ["SOLVER.EPOCHS", str(args.epochs), "SOLVER.WARMUP_EPOCHS", str(args.warmup_epoch),
                                 "SOLVER.IMS_PER_BATCH", str(args.batch_size * args.world_size),
                                 "SOLVER.BASE_LR", str(args.base_learning_rate)])
    max_iter = max_iter_from_cfg(cfg, args.num_instances)
    lr_sched = build_lr_schedule(cfg, max_iter)
    m_sched = build_momentum_schedule(cfg, max_iter)

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=args.batch_size * args.world_size / 256 * args.base_learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = get_scheduler(opt, iters_per_epoch, args)
        lr_off = []
        for _ in range(total):
            lr_off.append(opt.param_groups[0]["lr"])
            sched.step()
    lr_ours = [lr_sched.lr_at(it) for it in range(max_iter)]

    # The official EMA rule, run on scalar float64 "networks": target 0, online 1 -> 1 - m.
    class Scalars(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.w = nn.Parameter(torch.full((1,), value, dtype=torch.float64))

    fake = nn.Module()
    for name in ("encoder", "neck", "head", "projector"):
        setattr(fake, name, Scalars(1.0))
        setattr(fake, f"{name}_k", Scalars(0.0))
    fake.contrast_momentum = args.contrast_momentum
    fake.k, fake.K = 0, int(args.num_instances / args.world_size / args.batch_size * args.epochs)
    m_off = []
    for _ in range(total):
        fake.encoder_k.w.data.zero_()
        SoCo_FPN._momentum_update_key_encoder(fake)
        m_off.append(1.0 - float(fake.encoder_k.w))
    # Both move the target at the start of iteration t (the first included) with m(t): the
    # official m_off[t], ours momentum_at(t). They differ only by the cosine's length (K / max_iter).
    m_ours_used = [m_sched.momentum_at(t) for t in range(max_iter)]
    n = min(total, max_iter)
    lr_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(lr_off[:n], lr_ours[:n]))
    m_diff = max(abs(a - b) for a, b in zip(m_off[:n], m_ours_used[:n]))
    return {
        "iterations_official": total, "iterations_ours": max_iter,
        "lr_peak_official": max(lr_off), "lr_peak_ours": max(lr_ours),
        "lr_max_rel_diff": lr_rel,
        "lr_first_last_official": [lr_off[0], lr_off[-1]], "lr_first_last_ours": [lr_ours[0], lr_ours[-1]],
        "ema_K_official": fake.K, "ema_max_iter_ours": max_iter,
        "momentum_max_abs_diff": m_diff,
        "momentum_last_official": m_off[n - 1], "momentum_last_ours": m_ours_used[n - 1],
    }


# ------------------------------------------------------------------------------------------------
# View mapper statistics
# ------------------------------------------------------------------------------------------------
class SetStats:
    def __init__(self):
        self.levels, self.sides, self.distinct, self.k = [], [], [], 0

    def add(self, boxes_px: np.ndarray, ids: np.ndarray):
        # The official rule (integer corners, sqrt((w + 1)(h + 1)), <= 48 / 96 / 192).
        self.levels.append(official_box_levels(torch.as_tensor(boxes_px), (48.0, 96.0, 192.0)).numpy())
        self.sides.append(np.sqrt(np.clip((boxes_px[:, 2] - boxes_px[:, 0]) * (boxes_px[:, 3] - boxes_px[:, 1]), 0, None)))
        self.distinct.append(len(np.unique(ids)))
        self.k = len(ids)

    def summary(self) -> Dict:
        levels = np.concatenate(self.levels)
        return {
            "boxes": int(len(levels)),
            "per_level": [round(float(np.mean(levels == i)), 4) for i in range(4)],
            "mean_side_px": round(float(np.concatenate(self.sides).mean()), 2),
            "distinct_per_set": round(float(np.mean(self.distinct)), 3),
            "padded_fraction": round(1.0 - float(np.mean(self.distinct)) / self.k, 4),
        }


def cap_proposals(proposals: Dict[str, np.ndarray], cap: int, seed: int) -> Dict[str, np.ndarray]:
    """At most ``cap`` proposals per image (a seeded random subset, in the original order)."""
    rng = np.random.default_rng(seed)
    return {p: b if len(b) <= cap else b[np.sort(rng.choice(len(b), cap, replace=False))]
            for p, b in proposals.items()}


def mapper_statistics(dataset, cfg_file: str, paths, proposals, samples: int, seed: int) -> Dict:
    sets = ("v1(12)", "v2", "v1(13)", "v3")
    official = {s: SetStats() for s in sets}
    seed_everything(seed)
    for i in range(samples):
        s = dataset[i % len(dataset)]
        for name, b, size in (("v1(12)", s[3], 224), ("v1(13)", s[4], 224), ("v2", s[5], 224), ("v3", s[6], 112)):
            b = b.numpy()
            official[name].add(b[:, :4] * size, b[:, 4])
    cfg = load_config(cfg_file)
    mapper = SoCoViewMapper(cfg)
    ours = {s: SetStats() for s in sets}
    rng = np.random.default_rng(seed)
    images = {p: read_image(p) for p in paths}
    for i in range(samples):
        p = paths[i % len(paths)]
        out = mapper(images[p], proposals[p], rng)
        for pair, (a, b) in zip(out["pairs"], (("v1(12)", "v2"), ("v1(13)", "v3"))):
            ours[a].add(pair["boxes_a"].numpy(), pair["ids_a"].numpy())
            ours[b].add(pair["boxes_b"].numpy(), pair["ids_b"].numpy())
    return {"samples": samples, "images": len(paths),
            "official": {s: official[s].summary() for s in sets},
            "ours": {s: ours[s].summary() for s in sets}}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def grad_columns(g: Dict) -> str:
    return (" ".join(f"{g[p]['cosine']:9.6f}" if p in g else f"{'-':>9s}" for p in PARTS + ("all",))
            + f" {g['all']['max_abs_diff'] / max(g['all']['max_abs_grad'], 1e-30):14.1e}")


def print_report(report: Dict) -> None:
    print("\n== Parity with the official SoCo code ==")
    print(f"official: {report['official_repo']}  config: {report['config']}  images: {report['images']}")
    hdr = (f"{'case':9s} {'BN':5s} {'head mode':9s} {'loss official':>14s} {'loss ours':>14s} {'rel diff':>8s} "
           f"{'FPN maxdiff':>11s} {'RoI maxdiff':>11s} {'V3 P5 RoI':>9s} {'lvl diff':>8s} | grad cosine: "
           + " ".join(f"{p[:9]:>9s}" for p in PARTS + ("all",)) + f" {'max|dg|/max|g|':>14s}")
    print(hdr)
    for case in report["cases"]:
        for bn_mode in ("eval", "train"):
            for mode, r in case.get(bn_mode, {}).items():
                if mode.startswith("_"):
                    continue
                g = r["gradients"]
                ld = r["level_disagreements"]
                print(f"{case['name']:9s} {bn_mode:5s} {mode:9s} {r['loss_official']:+14.8f} {r['loss_ours']:+14.8f} "
                      f"{r['loss_rel_diff']:8.1e} {max(r['fpn_max_abs_diff'].values()):11.1e} "
                      f"{r['pooled_max_abs_diff']:11.1e} {r['pooled_max_abs_diff_v3_p5']:9.1e} "
                      f"{ld['different']:>3d}/{ld['boxes_in_loss']:<4d} | "
                      + grad_columns(g))
                if "with_official_levels" in r:
                    o = r["with_official_levels"]
                    print(f"{'':9s} {'':5s} {'+ levels':9s} {'':14s} {o['loss_ours']:+14.8f} {o['loss_rel_diff']:8.1e} "
                          f"{'':11s} {'':11s} {'':9s} {o['level_disagreements']['different']:>3d}/"
                          f"{o['level_disagreements']['boxes_in_loss']:<4d} | " + grad_columns(o["gradients"]))
    for case in report["cases"]:
        floors = ", ".join(f"{m} {case[m]['_official']['rel_diff']:.1e}" for m in ("eval", "train") if m in case)
        print(f"{case['name']}: input 0-255 round trip max abs diff {case['input_round_trip_max_abs_diff']:.1e}; "
              f"official loss on the dataset's tensors vs on the round-tripped ones, relative: {floors}")
    for case in report["cases"]:
        o = case.get("train", {}).get("_optim")
        if o:
            s = "; ".join(f"step {i + 1}: max|du| {st['max_abs_update_diff']:.1e} of max|u| {st['max_abs_update']:.1e}, "
                          f"min cos {st['min_update_cosine']:.8f}" for i, st in enumerate(o["lars_steps"]))
            e = o["ema"]
            print(f"{case['name']}: LARS lr {o['lr']:.5f}: {s}")
            print(f"{case['name']}: EMA at iteration {e['iteration']} of {e['of']} (m = {e['momentum']:.8f}): "
                  f"target max abs diff {e['target_max_abs_diff']:.1e}")
    s = report["schedules"]
    print(f"lr schedule: {s['iterations_official']} / {s['iterations_ours']} iterations (official / ours), "
          f"peak {s['lr_peak_official']:.4f} / {s['lr_peak_ours']:.4f}, max relative difference {s['lr_max_rel_diff']:.1e}")
    print(f"EMA momentum: official K {s['ema_K_official']} vs our max_iter {s['ema_max_iter_ours']}; "
          f"max |m_official - m_ours| of the momentum each iteration's target uses {s['momentum_max_abs_diff']:.1e} "
          f"(last {s['momentum_last_official']:.9f} / {s['momentum_last_ours']:.9f})")
    for cap, st in report["mapper_statistics"].items():
        print(f"\nView mapper vs official dataset class, {st['samples']} samples of {st['images']} images, "
              f"{cap} proposals per image (levels by the official rule on view-pixel boxes):")
        print(f"{'box set':8s} {'source':8s} {'P2':>6s} {'P3':>6s} {'P4':>6s} {'P5':>6s} {'mean side':>9s} "
              f"{'distinct/set':>12s} {'padded':>7s}")
        for name in st["official"]:
            for src in ("official", "ours"):
                d = st[src][name]
                print(f"{name:8s} {src:8s} " + " ".join(f"{x:6.3f}" for x in d["per_level"])
                      + f" {d['mean_side_px']:9.1f} {d['distinct_per_set']:12.3f} {d['padded_fraction']:7.3f}")


def parse_cases(text: str) -> List[Tuple[int, int]]:
    try:
        return [tuple(int(v) for v in c.split(":")) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cases {text!r}: expected DEPTH:IMAGES[,...], e.g. 18:2,50:2") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-repo", required=True, help="checkout of hologerry/SoCo")
    ap.add_argument("--images", default=os.path.join(os.environ.get("SOCO_DATA_ROOT", "datasets"), "coco_mini", "train2017"),
                    help="a folder of real images (default: $SOCO_DATA_ROOT/coco_mini/train2017)")
    ap.add_argument("--num-images", type=int, default=40, help="images used (proposals are computed for each)")
    ap.add_argument("--config", default="configs/soco/soco_fpn_r50_100ep.yaml")
    ap.add_argument("--cases", type=parse_cases, default=parse_cases("18:2,18:8,50:2"), help="DEPTH:IMAGES,...")
    ap.add_argument("--bn-modes", default="eval,train")
    ap.add_argument("--stat-samples", type=int, default=400)
    ap.add_argument("--stat-proposal-caps", default="0,2",
                    help="view-mapper statistics with at most this many proposals per image (0: all); "
                         "few proposals exercise the retry loop and the padding")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="", help="write the full results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from official_soco import import_official

    import_official(args.official_repo)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    paths = list_images(args.images, args.num_images)
    log(f"selective search on {len(paths)} images")
    proposals = compute_proposals(paths)
    workdir = tempfile.mkdtemp(prefix="soco_parity_")
    oargs = official_args(args.official_repo, 50)
    dataset = official_dataset(oargs, paths, proposals, workdir)

    report = {"official_repo": os.path.abspath(args.official_repo), "config": args.config,
              "images": f"{args.images} ({len(paths)})", "command": " ".join(sys.argv), "cases": []}
    cfg0 = load_config(args.config)
    mean = torch.tensor(cfg0.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg0.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    mode_key, modes = head_modes(cfg0)
    report["head_mode_key"], report["head_modes"] = mode_key, modes
    for depth, n in args.cases:
        name = f"R{depth} N{n}"
        log(f"{name}: building the official model and the sample")
        oa = official_args(args.official_repo, depth)
        off_model = build_official(oa, args.seed)
        ckpt = official_checkpoint(off_model)
        sample, flips = official_batch(dataset, n, args.seed)
        batch = to_model_batch(sample, flips, mean, std)
        case = {"name": name, "depth": depth, "images": n, "input_round_trip_max_abs_diff": max(
            max_abs((batch["images"][v] - mean) / std, x) for v, x in zip(("v1", "v2", "v3"), sample[:3]))}
        for bn_mode in args.bn_modes.split(","):
            case[bn_mode] = run_case(off_model, ckpt, args.config, depth, bn_mode, sample, batch, mean, std,
                                     mode_key, modes, log)
        report["cases"].append(case)
        del off_model, ckpt
    log("schedules")
    report["schedules"] = compare_schedules(oargs, args.config)
    log("view mapper statistics")
    report["mapper_statistics"] = {}
    for cap in (int(c) for c in args.stat_proposal_caps.split(",")):
        props = proposals if cap == 0 else cap_proposals(proposals, cap, args.seed)
        ds = dataset if cap == 0 else official_dataset(oargs, paths, props, tempfile.mkdtemp(prefix="soco_parity_"))
        report["mapper_statistics"][f"at most {cap}" if cap else "all"] = mapper_statistics(
            ds, args.config, paths, props, args.stat_samples, args.seed)
    log("done")
    print_report(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
