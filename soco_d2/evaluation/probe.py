"""Rank pretrained backbones without fine-tuning: kNN and linear probes on frozen res5 features.

:func:`load_probe_backbone` reads any weight file the converter understands (a checkpoint of
this project, a converted detectron2 ``.pkl``, a torchvision ResNet state dict, a MoCo-style
``module.encoder_q.`` checkpoint, ...; see :mod:`soco_d2.checkpoint.layout`) into a torchvision
ResNet whose output is the global-average-pooled res5 feature, or builds a randomly initialised
one. :func:`probe_backbones` runs the same weighted kNN as the training monitor (and optionally a
linear probe) for each backbone on one labelled folder. ``tools/probe.py`` is the command line.

BN statistics (``bn_stats``): ``"weights"`` probes with the running statistics the weights carry;
``"train"`` first recomputes them (:func:`recompute_bn_statistics`) as the plain average over the
probe's training images, so that backbones are compared by their weights alone. A freshly built
network's running statistics are mean 0 / variance 1, which makes every BN layer an identity in
evaluation mode: a random-init baseline probed with them is another function than the same
weights with the statistics of any data.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from soco_d2.checkpoint.layout import ConversionError
from soco_d2.checkpoint.to_torchvision import convert_to_torchvision
from soco_d2.checkpoint.validate import SUPPORTED_DEPTHS

from ..utils import comm
from .knn import (ProbeImages, ProbeSplit, _gather_rows, extract_features, linear_probe, sampling_noise,
                  weighted_knn)

__all__ = ["ProbeBackbone", "load_probe_backbone", "probe_backbones", "format_probe_table",
           "recompute_bn_statistics", "bn_statistics_of", "BN_STATS"]

BN_STATS = ("weights", "train")

# torchvision's ImageNet statistics on the 0-255 scale (this project's MODEL.PIXEL_MEAN / STD)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ProbeBackbone:
    name: str
    model: nn.Module  # images (normalised) -> (B, C) pooled res5 features
    depth: int
    description: str


def load_probe_backbone(weights: Optional[str] = None, depth: Optional[int] = None,
                        random_init: bool = False, branch: str = "online", trust: bool = False,
                        seed: int = 0) -> ProbeBackbone:
    """A torchvision ResNet (fc removed) with the backbone weights of ``weights``, or randomly
    initialised (torchvision's init, seeded) with ``random_init`` (``depth`` required)."""
    if random_init == bool(weights):
        raise ValueError("Give either weights or random_init (and a depth), not both / neither.")
    if random_init:
        if depth not in SUPPORTED_DEPTHS:
            raise ValueError(f"--random-init needs --depth, one of {SUPPORTED_DEPTHS} (got {depth}).")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        desc = f"random init (torchvision, seed {seed})"
        name = f"random-init R{depth} seed {seed}"
    else:
        state, report = convert_to_torchvision(weights, parts=("backbone",), branch=branch,
                                               depth=depth, trust=trust)
        depth = report.depth
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        prefix = "backbone.body."
        body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = net.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ConversionError(f"{weights}: the backbone weights do not fill a ResNet-{depth}: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}.")
        desc = f"{'; '.join(report.layout)}; {branch} branch"
        name = str(weights)
    net.fc = nn.Identity()
    return ProbeBackbone(name, net.eval(), depth, desc)


def _features_fn(net: nn.Module):
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)

    def fn(images):
        x = (images.float() - mean.to(images.device)) / std.to(images.device)
        return {"res5": net(x)}

    return fn


def _bn_passes(valid: torch.Tensor, num_total: int, batch_size: int) -> List[torch.Tensor]:
    """This process's rows (indices into its share) for each BN pass; the same number of passes
    on every process (collective when distributed).

    The readable images of all processes, in their global order, go in chunks of
    ``batch_size x processes`` (each process's part of a chunk is about ``batch_size``: its
    share is every ``world``-th image); chunks join until every process has at least 2 images
    in the pass (a batch of one image has no variance), and a last pass short of that joins the
    one before. Every process derives the plan from the same gathered validity flags, so a
    synchronised BN meets the same collectives everywhere, and with synchronised BN the passes
    are those of one process with ``batch_size x processes``.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    if world > 1:
        valid = _gather_rows(valid.to(torch.uint8), num_total).bool()
    positions = valid.nonzero().flatten()
    owner_counts = torch.bincount(positions % world, minlength=world)
    if int(owner_counts.min()) < 2:
        where = ("" if world == 1 else f" on each of the {world} processes (readable per process: "
                 f"{owner_counts.tolist()})")
        raise ValueError(f"Recomputing BN statistics needs at least 2 readable training images{where}.")
    groups, current = [], []
    for chunk in positions.split(batch_size * world):
        current.append(chunk)
        if int(torch.bincount(torch.cat(current) % world, minlength=world).min()) >= 2:
            groups.append(torch.cat(current))
            current = []
    if current:  # a short tail joins the pass before (there is one: every process has 2 images)
        groups[-1] = torch.cat([groups[-1]] + current)
    return [g[g % world == rank] // world for g in groups]


@torch.no_grad()
def recompute_bn_statistics(net: nn.Module, images: ProbeImages, device: torch.device,
                            batch_size: int = 64, fn: Optional[Callable] = None) -> int:
    """Replace the running mean / variance of every BN layer of ``net`` by the average of their
    batch statistics over the readable ``images`` (training-mode passes of ``fn`` (default: the
    pooled res5 of a torchvision ResNet ``net``) of about ``batch_size`` images per process, BN
    momentum None: every pass weighs the same); ``net`` is left in evaluation mode. BN layers that
    split their batch (``num_splits``, DetCo's one-process shuffle-BN) run unsplit. With several
    processes each one uses its share of ``images`` (at least 2 each), every process runs the same
    passes (see :func:`_bn_passes`; a synchronised BN is a collective) and the statistics are
    averaged over the processes, weighted by their image counts (collective). Returns the number
    of images used."""
    bns = _tracked_bns(net)
    world = comm.get_world_size()
    num_total = images.num_total if world > 1 else len(images.valid)
    passes = _bn_passes(images.valid, num_total, batch_size)
    mine = sum(len(p) for p in passes)
    used = int(comm.all_reduce_sum(torch.tensor([float(mine)])))
    settings = [(m.momentum, getattr(m, "num_splits", None)) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        if hasattr(m, "num_splits"):
            m.num_splits = 1
    fn = fn or _features_fn(net)
    net.eval()
    for m in bns:
        m.train()
    try:
        for rows in passes:
            fn(images.images[rows].to(device))
    finally:
        for m, (momentum, splits) in zip(bns, settings):
            m.momentum = momentum
            if splits is not None:
                m.num_splits = splits
        net.eval()
    if world > 1 and bns:  # one collective for every layer's mean and variance
        bufs = [b for m in bns for b in (m.running_mean, m.running_var)]
        merged = comm.all_reduce_sum(torch.cat(bufs) * (mine / used))
        for b, avg in zip(bufs, merged.split([b.numel() for b in bufs])):
            b.copy_(avg)
    return used


def _tracked_bns(net: nn.Module) -> List[_BatchNorm]:
    return [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def bn_statistics_of(net: nn.Module, images: ProbeImages, device: torch.device, batch_size: int = 64,
                     fn: Optional[Callable] = None) -> Iterator[int]:
    """Inside the block, ``net``'s BN running statistics are those recomputed over ``images``
    (:func:`recompute_bn_statistics`); its own come back afterwards. Yields the images used."""
    bns = _tracked_bns(net)
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
    try:
        yield recompute_bn_statistics(net, images, device, batch_size, fn)
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def probe_backbones(backbones: Sequence[ProbeBackbone], split: ProbeSplit, image_size: int = 224,
                    k: int = 20, temperature: float = 0.07, linear: bool = False,
                    batch_size: int = 64, device: str = "cpu", bn_stats: str = "weights",
                    progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One result dict per backbone: ``knn_top1``, ``knn_top5`` (and ``linear_top1`` /
    ``linear_top5``) in percent, the number of images used and the time taken. ``bn_stats``:
    see the module docstring. ``progress`` receives a line at each stage of each backbone."""
    say = progress or (lambda line: None)
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}.")
    dev = torch.device(device)
    say(f"decoding {len(split.train)} training and {len(split.val)} validation images at {image_size} px")
    train_images = ProbeImages(split.train.paths, image_size)
    val_images = ProbeImages(split.val.paths, image_size)
    results = []
    for i, b in enumerate(backbones, 1):
        t0 = time.perf_counter()
        net = b.model.to(dev).eval()
        if bn_stats == "train":
            say(f"[{i}/{len(backbones)}] {b.name}: BN statistics over {train_images.num_total} training images")
            recompute_bn_statistics(net, train_images, dev, batch_size)
        say(f"[{i}/{len(backbones)}] {b.name}: features of {train_images.num_total} training and "
            f"{val_images.num_total} validation images at {image_size} px")
        train, ok_tr = extract_features(_features_fn(net), train_images, dev, batch_size)
        val, ok_va = extract_features(_features_fn(net), val_images, dev, batch_size)
        ytr = torch.as_tensor(split.train.labels)[ok_tr]
        yva = torch.as_tensor(split.val.labels)[ok_va]
        xtr, xva = train["res5"][ok_tr], val["res5"][ok_va]
        r = {"name": b.name, "depth": b.depth, "weights": b.description,
             "train_images": int(ok_tr.sum()), "val_images": int(ok_va.sum()),
             "classes": len(split.classes), "bn_stats": bn_stats,
             "unreadable": len(train_images.unreadable) + len(val_images.unreadable)}
        r["knn_top1"], r["knn_top5"] = weighted_knn(xtr, ytr, xva, yva, len(split.classes), k, temperature)
        if linear:
            r["linear_top1"], r["linear_top5"] = linear_probe(xtr, ytr, xva, yva, len(split.classes))
        r["seconds"] = time.perf_counter() - t0
        say(f"[{i}/{len(backbones)}] {b.name}: kNN top-1 {r['knn_top1']:.2f} in {r['seconds']:.0f} s")
        results.append(r)
    return results


def format_probe_table(results: Sequence[Dict]) -> str:
    """Results as a text table, best kNN top-1 first; beside each accuracy its sampling noise
    (two standard errors over the validation images, :func:`~soco_d2.evaluation.knn.sampling_noise`):
    two backbones closer than that are not told apart by this probe."""
    cols = ["knn_top1", "knn_top5"] + (["linear_top1", "linear_top5"] if "linear_top1" in results[0] else [])
    rows = sorted(results, key=lambda r: -r["knn_top1"])
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'weights':<{width}}  " + "  ".join(f"{c + ' +- 2se':>17}" for c in cols)]
    for r in rows:
        cells = [f"{r[c]:>9.2f} +- {sampling_noise(r[c], r['val_images']):>4.1f}" for c in cols]
        lines.append(f"{r['name']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
