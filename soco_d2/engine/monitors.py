"""Representation monitors of a pretraining run: is the representation improving, or collapsing?

* **kNN probe** (``MONITOR.KNN``): weighted kNN top-1 / top-5 on a labelled image folder, from
  res5 features (and, for SoCo, the box-head embedding of the whole-image box), at iteration 0,
  every ``PERIOD`` iterations and at the end; the training stream is the same with it on or off.
* **Health** (``MONITOR.HEALTH``), label-free: RankMe and the embedding std of the projector
  outputs, with collapse warnings; for DetCo the chance level ``ln(Q + 1)`` of each InfoNCE term.

Keys, warnings, the probe's BN statistics and what the monitors ask of a model:
docs/TRAINING.md, "Is it learning? Monitors".
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from soco_d2.evaluation.knn import (
    ProbeDataError,
    ProbeImages,
    build_probe_split,
    extract_features,
    sampling_noise,
    weighted_knn,
)
from soco_d2.evaluation.probe import BN_STATS, bn_statistics_of
from soco_d2.modeling.meta_arch.method import PretrainMethod
from soco_d2.utils import comm

from .writers import read_metrics

__all__ = [
    "Monitors",
    "probe_feature_fn",
    "embedding_module",
    "rankme",
    "embedding_std",
    "collapse_warning",
    "rank_drop_warning",
    "plot_monitor_curves",
]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def probe_feature_fn(model: nn.Module, pixel_mean, pixel_std) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """``fn(uint8 images (B, 3, H, W)) -> {feature name: (B, D)}`` for the online network of
    ``model``: a :class:`~soco_d2.modeling.meta_arch.method.PretrainMethod`'s ``probe_features``
    of its ``normalize``; any other model's ``probe_features`` of images normalised with
    ``pixel_mean`` / ``pixel_std``."""
    m = _unwrap(model)
    if isinstance(m, PretrainMethod):
        return lambda images: m.probe_features(m.normalize(images))
    channels_last = getattr(m, "channels_last", False)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        x = (images.float() - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if callable(getattr(m, "probe_features", None)):
        return lambda images: m.probe_features(normalize(images))
    raise ValueError(
        f"MONITOR.KNN: no probe features for a {type(m).__name__} model: it is no PretrainMethod "
        "(soco_d2.modeling.meta_arch.method) and has no probe_features(images) -> {name: (B, D)}; "
        "implement the method contract or turn MONITOR.KNN.ENABLED off.")


def embedding_module(model: nn.Module) -> nn.Module:
    """The module whose outputs are the embeddings the loss uses: a
    :class:`~soco_d2.modeling.meta_arch.method.PretrainMethod`'s ``embedding_module()``, else
    the last layer of the model's ``projector`` (so the hook fires however the model runs the
    projector: as a whole or layer by layer)."""
    m = _unwrap(model)
    if isinstance(m, PretrainMethod):
        return m.embedding_module()
    proj = getattr(m, "projector", None)
    if proj is None:
        raise ValueError(
            f"MONITOR.HEALTH: a {type(m).__name__} model is no PretrainMethod "
            "(soco_d2.modeling.meta_arch.method) and has no 'projector' module; implement the "
            "method contract or turn MONITOR.HEALTH.ENABLED off.")
    leaves = [mod for mod in proj.modules() if not list(mod.children())]
    return leaves[-1] if leaves else proj


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``z`` (N, D): ``exp(-sum p log p)``, ``p = s / |s|_1 + eps`` over the
    singular values ``s`` (RankMe, Garrido et al. 2023). Between 1 and ``min(N, D)``."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the std over rows of the L2-normalised ``z`` (N, D)."""
    return float(F.normalize(z.double(), dim=1).std(dim=0).mean())


def collapse_warning(std: float, dim: int, ratio: float, rank: float, iteration: int) -> Optional[str]:
    """The warning text when ``std`` is below ``ratio / sqrt(dim)``, else None."""
    ref = 1.0 / math.sqrt(dim)
    if std >= ratio * ref:
        return None
    return (
        f"Embedding collapse at iteration {iteration}: the per-dimension std of the L2-normalised "
        f"projector outputs is {std:.4g}, below {ratio:g} x {ref:.4g} (1/sqrt({dim}), the value of "
        f"embeddings spread over the sphere); RankMe {rank:.2f} of at most {dim}. Check: the "
        "learning rate and its warmup (too high a rate collapses BYOL / SoCo early), the EMA "
        "momentum (MODEL.EMA.BASE_MOMENTUM; a target equal to the online network collapses), the "
        "predictor and the BN layers of projector / predictor (BYOL needs both), weight decay, and "
        "that the views differ (augmentations, crops, proposals).")


def rank_drop_warning(rank: float, peak: float, ratio: float, iteration: int) -> Optional[str]:
    """The warning text when RankMe ``rank`` is below ``ratio`` x ``peak`` (its highest value so
    far in the run), else None."""
    if rank >= ratio * peak:
        return None
    return (
        f"Dimensional collapse at iteration {iteration}: RankMe of the projector outputs is "
        f"{rank:.2f}, below {ratio:g} x {peak:.2f} (its highest value in this run): the embeddings "
        "use few directions, and the kNN accuracy of such runs falls (MONITOR.HEALTH.RANK_DROP_RATIO "
        "sets the threshold, 0 turns it off). Check: the learning rate and its scaling with the "
        "batch size (SOLVER.BASE_LR, BASE_LR_BATCH_SIZE, LARS_TRUST_COEF), the warmup, the EMA "
        "momentum (MODEL.EMA.BASE_MOMENTUM), and that the views differ (augmentations, crops, "
        "proposals).")


class _EmbeddingWindow:
    """Keeps the last ``rows`` output rows of a module (forward hook, detached float32 copies on
    the module's device: a copy to the host per forward would wait for the GPU every step)."""

    def __init__(self, module: nn.Module, rows: int):
        self.rows = rows
        self.parts: collections.deque = collections.deque()
        self.count = 0
        self.dim = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        z = output.detach().reshape(-1, output.shape[-1])[-self.rows:].to(torch.float32, copy=True)
        self.dim = z.shape[1]
        self.parts.append(z)
        self.count += z.shape[0]
        while self.parts and self.count - self.parts[0].shape[0] >= self.rows:
            self.count -= self.parts.popleft().shape[0]

    def matrix(self) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(0, self.dim or 0)
        return torch.cat(list(self.parts))[-self.rows:]

    def close(self):
        self.handle.remove()


def _gather_matrix(z: torch.Tensor) -> torch.Tensor:
    """Rows of ``z`` from every process (different row counts allowed)."""
    if comm.get_world_size() == 1:
        return z
    counts = comm.all_gather(torch.tensor([z.shape[0], z.shape[1]], dtype=torch.long)).view(-1, 2)
    n, d = int(counts[:, 0].max()), int(counts[:, 1].max())
    padded = z.new_zeros(n, d)
    padded[: z.shape[0], : z.shape[1]] = z
    gathered = comm.all_gather(padded).view(-1, n, d)
    return torch.cat([gathered[r, : int(c)] for r, c in enumerate(counts[:, 0])])


class Monitors:
    """The monitors of one :class:`~soco_d2.engine.trainer.PretrainTrainer` (see module doc).

    The trainer calls :meth:`before_train` (probe at iteration 0), :meth:`after_step` after every
    iteration (collective: every process), flushes its metrics when :attr:`pending` and adds
    :meth:`pop_metrics`, and calls :meth:`close` at the end (plot).
    """

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        k, h = cfg.MONITOR.KNN, cfg.MONITOR.HEALTH
        self.knn_on, self.health_on = bool(k.ENABLED), bool(h.ENABLED)
        self.pending = False
        self._metrics: Dict[str, float] = {}
        self._window: Optional[_EmbeddingWindow] = None
        self._images = None
        self._last_probe_end: Optional[float] = None
        self._last_warned = -10**9
        self._peak_rank = 0.0
        self.chance_level = None
        self._dim: Optional[int] = None
        m = _unwrap(trainer.model)
        if self.knn_on:
            if k.K < 1 or k.TEMPERATURE <= 0 or k.IMAGE_SIZE < 16 or k.BATCH_SIZE < 1 or k.PERIOD < 0:
                raise ProbeDataError(
                    f"MONITOR.KNN: K ({k.K}) and BATCH_SIZE ({k.BATCH_SIZE}) must be >= 1, TEMPERATURE "
                    f"({k.TEMPERATURE}) > 0, IMAGE_SIZE ({k.IMAGE_SIZE}) >= 16, PERIOD ({k.PERIOD}) >= 0.")
            if k.BN_STATS not in BN_STATS:
                raise ProbeDataError(f"MONITOR.KNN.BN_STATS must be one of {BN_STATS}, got {k.BN_STATS!r}.")
            self.split = build_probe_split(k.TRAIN_ROOT, k.VAL_ROOT, k.VAL_FRACTION,
                                           k.MAX_PER_CLASS, k.SPLIT_SEED)
            logger.info("kNN probe: %s (%s).", self.split.describe(), k.TRAIN_ROOT)
            self.features = probe_feature_fn(m, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
        if self.health_on:
            if h.WINDOW < 2 or h.PERIOD < 0 or h.COLLAPSE_STD_RATIO < 0 or not 0 <= h.RANK_DROP_RATIO < 1:
                raise ValueError(f"MONITOR.HEALTH: WINDOW ({h.WINDOW}) must be >= 2, PERIOD "
                                 f"({h.PERIOD}) and COLLAPSE_STD_RATIO ({h.COLLAPSE_STD_RATIO}) >= 0, "
                                 f"RANK_DROP_RATIO ({h.RANK_DROP_RATIO}) in [0, 1).")
            self._window = _EmbeddingWindow(embedding_module(m), h.WINDOW)
            self.health_period = h.PERIOD or cfg.LOG_PERIOD
            if isinstance(m, PretrainMethod):
                self.chance_level = m.chance_level

    @property
    def enabled(self) -> bool:
        return self.knn_on or self.health_on

    # ------------------------------------------------------------------ hooks of the trainer
    def before_train(self) -> None:
        if self.knn_on and self.trainer.start_iter == 0:
            metrics = self._probe(0)
            for w in self.trainer.writers:
                w.write(0, metrics)

    def after_step(self, done: int) -> None:
        last = done == self.trainer.max_iter
        if self.health_on and (done % self.health_period == 0 or last):
            self._metrics.update(self._health(done))
            self.pending = True
        period = self.cfg.MONITOR.KNN.PERIOD
        if self.knn_on and ((period and done % period == 0) or last):
            self._metrics.update(self._probe(done))
            self.pending = True

    def pop_metrics(self) -> Dict[str, float]:
        out, self._metrics, self.pending = self._metrics, {}, False
        return out

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None
        if self.enabled and self.cfg.MONITOR.PLOT and comm.is_main_process():
            path = os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")
            rows = read_metrics(path)
            if rows:
                plot_monitor_curves(rows, os.path.join(self.cfg.OUTPUT_DIR, "monitor_curves.png"),
                                    chance_level=self.chance_level, emb_dim=self._dim)

    # ------------------------------------------------------------------ work
    def _health(self, done: int) -> Dict[str, float]:
        z = _gather_matrix(self._window.matrix()).cpu()  # the one copy to the host per period
        out = {}
        if self.chance_level is not None:
            out["chance_level"] = self.chance_level
        if z.shape[0] < 2:
            return out
        self._dim = z.shape[1]
        out["rankme"] = rankme(z)
        out["emb_std"] = embedding_std(z)
        h = self.cfg.MONITOR.HEALTH
        self._peak_rank = max(self._peak_rank, out["rankme"])
        text = (collapse_warning(out["emb_std"], z.shape[1], h.COLLAPSE_STD_RATIO, out["rankme"], done)
                or rank_drop_warning(out["rankme"], self._peak_rank, h.RANK_DROP_RATIO, done))
        # once per ten checks at most, so a collapsed run does not drown its log
        if text and comm.is_main_process() and done - self._last_warned >= 10 * self.health_period:
            self._last_warned = done
            logger.warning(text)
        return out

    def _probe(self, done: int) -> Dict[str, float]:
        k = self.cfg.MONITOR.KNN
        t0 = time.perf_counter()
        if self._images is None:
            self._images = (ProbeImages(self.split.train.paths, k.IMAGE_SIZE),
                            ProbeImages(self.split.val.paths, k.IMAGE_SIZE))
            bad = comm.all_reduce_sum(torch.tensor(
                [len(self._images[0].unreadable) + len(self._images[1].unreadable)]))
            self._num_unreadable = int(bad)
        model = _unwrap(self.trainer.model)
        modes = [(mod, mod.training) for mod in model.modules()]
        device = self.trainer.device
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
                if k.BN_STATS == "train":
                    stack.enter_context(bn_statistics_of(model, self._images[0], device, k.BATCH_SIZE,
                                                         self.features))
                model.eval()
                train, train_ok = extract_features(self.features, self._images[0], device, k.BATCH_SIZE)
                val, val_ok = extract_features(self.features, self._images[1], device, k.BATCH_SIZE)
        finally:
            for mod, flag in modes:
                mod.training = flag
        out: Dict[str, float] = {}
        if comm.is_main_process():
            ytr = torch.as_tensor(self.split.train.labels)[train_ok]
            yva = torch.as_tensor(self.split.val.labels)[val_ok]
            for name in train:
                top1, top5 = weighted_knn(train[name][train_ok], ytr, val[name][val_ok], yva,
                                          len(self.split.classes), k.K, k.TEMPERATURE)
                out[f"knn_{name}_top1"], out[f"knn_{name}_top5"] = top1, top5
                num_val = int(val_ok.sum())  # beside each accuracy, its sampling noise
                out[f"knn_{name}_top1_2se"] = sampling_noise(top1, num_val)
                out[f"knn_{name}_top5_2se"] = sampling_noise(top5, num_val)
            if self._num_unreadable:
                out["knn_unreadable"] = self._num_unreadable
        took = time.perf_counter() - t0
        out["knn_time"] = took
        if done > 0 and self._last_probe_end is not None and comm.is_main_process():
            interval = t0 - self._last_probe_end
            if took > interval:
                logger.warning(
                    "The kNN probe at iteration %d took %.1f s, longer than the %.1f s of training "
                    "since the previous probe (MONITOR.KNN.PERIOD = %d iterations): raise the period "
                    "or lower MONITOR.KNN.MAX_PER_CLASS / IMAGE_SIZE.", done, took, interval, k.PERIOD)
        self._last_probe_end = time.perf_counter()
        return out


def plot_monitor_curves(rows: List[Dict], path: str, chance_level: Optional[float] = None,
                        emb_dim: Optional[int] = None) -> None:
    """A PNG of the losses (with the chance level), kNN accuracies, RankMe and embedding std
    found in the ``metrics.json`` rows; panels without data are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key):
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = sorted({k for r in rows for k in r})
    panels = []
    losses = [k for k in keys if k.startswith("loss")] + (["total_loss"] if "total_loss" in keys else [])
    if losses:
        panels.append(("losses", losses))
    terms = [k for k in keys if re.search(r"_res[2-5]$", k)]  # DetCo's unweighted InfoNCE terms
    if terms and chance_level is not None:
        panels.append(("InfoNCE terms", terms))
    knn = [k for k in keys if k.startswith("knn_") and k.endswith("_top1")]
    if knn:
        panels.append(("kNN top-1 (%)", knn))
    if "rankme" in keys:
        panels.append(("RankMe (effective rank)", ["rankme"]))
    if "emb_std" in keys:
        panels.append(("per-dimension std of normalised embeddings", ["emb_std"]))
    if not panels:
        return
    fig = Figure(figsize=(4.5 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            x, y = series(name)
            ax.plot(x, y, "o-" if len(x) < 30 else "-", markersize=3, label=name)
        if title == "InfoNCE terms":
            ax.axhline(chance_level, color="grey", ls="--", label=f"chance per term ln(Q+1) = {chance_level:.2f}")
        if title.startswith("per-dimension") and emb_dim:
            ax.axhline(1 / math.sqrt(emb_dim), color="grey", ls="--", label=f"1/sqrt({emb_dim})")
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
