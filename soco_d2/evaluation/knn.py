"""Probing frozen features on a small labelled image folder: weighted kNN and a linear probe.

The labelled data is an ImageNet-layout folder (one sub-folder per class, the folder name is the
label): either two folders (train / val) or one, split deterministically per class.

* :func:`build_probe_split` lists and checks the folders. An empty class, a class too small to
  appear on both sides of a split, or a validation class the training folder lacks is skipped and
  counted; fewer than two usable classes is a :class:`ProbeDataError` naming the setting to fix.
* :class:`ProbeImages` decodes the images once (resize of the shorter side to ``size / 0.875``,
  centre crop ``size``), each process only its share (``rank::world``); unreadable files are
  skipped and counted.
* :func:`extract_features` runs a feature function over the images in eval mode on any device;
  with several processes every process extracts its share and the features are gathered, so all
  processes end with the same ``(N, D)`` matrix.
* :func:`weighted_knn` is the weighted kNN of InstDisc / solo-learn (cosine similarity, the ``k``
  nearest training features vote with weight ``exp(sim / T)``); :func:`linear_probe` fits a
  softmax classifier on standardised frozen features (full-batch L-BFGS).
"""
from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from soco_d2.data.augment import resize
from soco_d2.data.image_list import IMAGE_EXTENSIONS, UnreadableImageError, read_image
from soco_d2.utils import comm

__all__ = [
    "ProbeDataError",
    "LabeledImages",
    "ProbeSplit",
    "build_probe_split",
    "ProbeImages",
    "extract_features",
    "weighted_knn",
    "linear_probe",
    "CROP_FRACTION",
    "write_object_crops",
]

logger = logging.getLogger(__name__)

MONITOR_KEYS = ("MONITOR.KNN.TRAIN_ROOT", "MONITOR.KNN.VAL_ROOT", "MONITOR.KNN.VAL_FRACTION")

# Shorter side resized to size / CROP_FRACTION, then a centre crop of ``size`` (256 -> 224).
CROP_FRACTION = 0.875


class ProbeDataError(ValueError):
    """A probe folder that cannot be used; the message names the setting and the fix."""


@dataclass
class LabeledImages:
    paths: List[str]
    labels: np.ndarray  # int64, index into ProbeSplit.classes

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ProbeSplit:
    classes: List[str]
    train: LabeledImages
    val: LabeledImages
    # what was left out and why: {"empty class": [...], "class with one image": [...], ...}
    skipped: Dict[str, List[str]] = field(default_factory=dict)

    def describe(self) -> str:
        text = (f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images")
        if self.skipped:
            text += "; skipped: " + "; ".join(
                f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                for k, v in self.skipped.items())
        return text


def _class_folders(root: str, name: str) -> Dict[str, List[str]]:
    if not root or not os.path.isdir(root):
        raise ProbeDataError(
            f"{name} = {root!r} is not a folder: give a labelled image folder with one "
            "sub-folder per class (ImageNet layout, the folder name is the label).")
    classes = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ProbeDataError(
            f"{name} = {root!r} has no class sub-folders: the probe needs one sub-folder per "
            "class (e.g. root/dog/1.jpg, root/cat/2.jpg).")
    out = {}
    for c in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        out[c] = sorted(files)
    return out


def _cap(files: List[str], max_per_class: int) -> List[str]:
    return files[:max_per_class] if max_per_class > 0 else files


def build_probe_split(train_root: str, val_root: str = "", val_fraction: float = 0.5,
                      max_per_class: int = 0, seed: int = 0,
                      names: Tuple[str, str, str] = MONITOR_KEYS) -> ProbeSplit:
    """The labelled train / val images of a probe (see the module docstring).

    ``val_root`` empty: each class of ``train_root`` is split deterministically (a per-class
    shuffle seeded by ``seed`` and the class name) into ``round(n * val_fraction)`` validation
    images (at least one) and the rest (at least one). ``max_per_class`` > 0 keeps the first
    that many images (sorted by path) of each class and side. ``names``: what error messages call
    the three settings (config keys or a command-line tool's flags).
    """
    train_name, val_name, fraction_name = names
    skipped: Dict[str, List[str]] = {}
    train = _class_folders(train_root, train_name)
    for c in [c for c, f in train.items() if not f]:
        skipped.setdefault("empty class", []).append(c)
        del train[c]
    if val_root:
        val = _class_folders(val_root, val_name)
        for c in [c for c, f in val.items() if not f]:
            skipped.setdefault("empty class", []).append(f"val/{c}")
            del val[c]
        for c in [c for c in val if c not in train]:
            skipped.setdefault("val class without train images", []).append(c)
            del val[c]
        pairs = {c: (_cap(train[c], max_per_class), _cap(val.get(c, []), max_per_class))
                 for c in train}
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ProbeDataError(f"{fraction_name} must be in (0, 1), got {val_fraction}.")
        pairs = {}
        for c, files in train.items():
            if len(files) < 2:
                skipped.setdefault("class with one image (needs 2 to split)", []).append(c)
                continue
            order = np.random.default_rng([seed, zlib.crc32(c.encode())]).permutation(len(files))
            n_val = min(len(files) - 1, max(1, int(round(len(files) * val_fraction))))
            val_files = sorted(files[i] for i in order[:n_val])
            train_files = sorted(files[i] for i in order[n_val:])
            pairs[c] = (_cap(train_files, max_per_class), _cap(val_files, max_per_class))
    classes = sorted(pairs)
    if len(classes) < 2:
        found = f"{len(classes)} usable class" + ("" if len(classes) == 1 else "es")
        why = "; ".join(f"skipped {len(v)} {k}: {', '.join(v[:5])}" for k, v in skipped.items())
        raise ProbeDataError(
            f"{train_name} = {train_root!r}: {found}{' (' + why + ')' if why else ''}; a probe "
            "needs at least 2 classes with images on both sides: add class sub-folders with at "
            f"least 2 images each (or give {val_name}).")

    def side(i: int) -> LabeledImages:
        paths, labels = [], []
        for y, c in enumerate(classes):
            paths += pairs[c][i]
            labels += [y] * len(pairs[c][i])
        return LabeledImages(paths, np.asarray(labels, dtype=np.int64))

    split = ProbeSplit(classes, side(0), side(1), skipped)
    if len(split.val) == 0:
        raise ProbeDataError(f"{val_name} = {val_root!r} has no images of the training "
                             f"classes {classes[:5]}...: nothing to evaluate.")
    return split


def load_probe_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side to ``round(size / CROP_FRACTION)``, centre crop."""
    img = read_image(path)
    h, w = img.shape[:2]
    short = max(size, int(round(size / CROP_FRACTION)))
    scale = short / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    img = resize(img, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


class ProbeImages:
    """This process's share (indices ``rank::world``) of ``paths``, decoded once to uint8."""

    def __init__(self, paths: Sequence[str], size: int):
        rank, world = comm.get_rank(), comm.get_world_size()
        self.num_total = len(paths)
        self.indices = np.arange(rank, len(paths), world)
        images, valid, bad = [], [], []
        for i in self.indices:
            try:
                images.append(torch.from_numpy(load_probe_image(paths[i], size)).permute(2, 0, 1))
                valid.append(True)
            except UnreadableImageError as e:
                images.append(torch.zeros(3, size, size, dtype=torch.uint8))
                valid.append(False)
                bad.append(f"{e}")
        self.images = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        self.valid = torch.tensor(valid, dtype=torch.bool)
        self.unreadable = bad
        if bad:
            logger.warning("Probe images: %d unreadable file(s) skipped, e.g. %s", len(bad), bad[0])


def _gather_rows(local: torch.Tensor, num_total: int) -> torch.Tensor:
    """Rows of every process's share (process ``r`` holds rows ``r::world``) in the original
    order. Shares differ in size by at most one row; they are padded for the gather."""
    world = comm.get_world_size()
    if world == 1:
        return local
    per = -(-num_total // world)
    pad = local.new_zeros((per - local.shape[0],) + tuple(local.shape[1:]))
    gathered = comm.all_gather(torch.cat([local, pad])).view(world, per, *local.shape[1:])
    # row i of the full set is row i // world of process i % world
    return gathered.transpose(0, 1).reshape(world * per, *local.shape[1:])[:num_total]


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], Dict[str, torch.Tensor]], images: ProbeImages,
                     device: torch.device, batch_size: int = 64
                     ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """``fn(uint8 images on device) -> {name: (B, D)}`` over this process's share, gathered over
    processes. Returns ``({name: (N, D) float32 L2-normalised on CPU}, valid (N,) bool)``;
    rows of unreadable images are zero and ``valid`` False. Collective with several processes.
    """
    parts: Dict[str, List[torch.Tensor]] = {}
    n = images.images.shape[0]
    names: Optional[List[str]] = None
    for start in range(0, max(n, 1), batch_size):
        batch = images.images[start:start + batch_size]
        if batch.shape[0] == 0:
            # an empty share (more processes than images) still needs the feature sizes: run one
            # dummy image so every process enters the gathers below with the same shapes
            batch = images.images.new_zeros((1,) + tuple(images.images.shape[1:]))
        out = fn(batch.to(device))
        names = sorted(out)
        for k in names:
            f = F.normalize(out[k].float().flatten(1), dim=1).cpu()
            parts.setdefault(k, []).append(f)
    feats = {}
    for k in names:
        local = torch.cat(parts[k])[:n]
        feats[k] = _gather_rows(local, images.num_total)
    valid = _gather_rows(images.valid.to(torch.uint8), images.num_total).bool()
    return feats, valid


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, positive_only: bool = False
                   ) -> Tuple[float, float]:
    k = min(5, scores.shape[1])
    top, pred = scores.topk(k, dim=1)
    hit = pred == labels[:, None]
    if positive_only:  # kNN: a class no neighbour voted for is no hit, whatever its tie rank
        hit &= top > 0
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(dim=1).float().mean().item()


def sampling_noise(accuracy: float, num_images: int) -> float:
    """Two binomial standard errors, in points, of an ``accuracy`` (percent) measured on
    ``num_images`` images: differences below it are within the noise of which images were drawn.
    At 0% or 100% the variance of one image more or less (``0.25 / n``) is used instead of zero."""
    n = max(int(num_images), 1)
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(max(p * (1.0 - p), 0.25 / n) / n)


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tuple[float, float]:
    """Top-1 / top-5 accuracy (percent) of the weighted kNN classifier (InstDisc, solo-learn):
    cosine similarity to the training features, the ``k`` most similar vote for their class with
    weight ``exp(sim / temperature)``. ``k`` is capped at the number of training features. A
    class that got no vote does not count as a top-5 hit (it would only tie with other zeros)."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("weighted_knn needs at least one training and one test feature.")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return _topk_accuracy(torch.cat(scores), test_labels, positive_only=True)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> Tuple[float, float]:
    """Top-1 / top-5 accuracy (percent) of a softmax classifier on frozen features.

    Features are standardised with the training set's mean / std; the classifier (weights and
    bias from zero) minimises cross-entropy + ``weight_decay * |W|^2`` with full-batch L-BFGS
    (deterministic: no sampling, no initial noise)."""
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_features.double() - mean) / std
    layer = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), train_labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return _topk_accuracy(layer(xt), test_labels)


def write_object_crops(json_file: str, image_root: str, output_dir: str, max_per_class: int = 50,
                       min_size: float = 8.0, margin: float = 0.1) -> Dict[str, int]:
    """A labelled probe folder from a COCO instances json: each non-crowd object at least
    ``min_size`` px wide and tall, cropped with ``margin`` x its size of context on each side,
    saved as ``output_dir/<category name>/<annotation id>.png`` (the first ``max_per_class``
    per category, in annotation order). Returns the number of crops per category."""
    import json

    import cv2

    with open(json_file) as f:
        data = json.load(f)
    names = {c["id"]: c["name"].replace("/", "_") for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    by_image: Dict[int, List[dict]] = {}
    counts = {n: 0 for n in names.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        name = names.get(a["category_id"])
        if a.get("iscrowd", 0) or w < min_size or h < min_size or name is None:
            continue
        if counts[name] >= max_per_class:
            continue
        counts[name] += 1
        by_image.setdefault(a["image_id"], []).append(a)
    for image_id, anns in by_image.items():
        img = read_image(os.path.join(image_root, files[image_id]))
        ih, iw = img.shape[:2]
        for a in anns:
            x, y, w, h = a["bbox"]
            x0, y0 = max(0, int(x - margin * w)), max(0, int(y - margin * h))
            x1, y1 = min(iw, int(math.ceil(x + w + margin * w))), min(ih, int(math.ceil(y + h + margin * h)))
            folder = os.path.join(output_dir, names[a["category_id"]])
            os.makedirs(folder, exist_ok=True)
            cv2.imwrite(os.path.join(folder, f"{a['id']}.png"),
                        cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_RGB2BGR))
    return {n: c for n, c in counts.items() if c}
