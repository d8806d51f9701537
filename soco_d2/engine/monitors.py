"""Representation monitors of a pretraining run: is the representation improving, or collapsing?

* **kNN probe** (``MONITOR.KNN``): weighted kNN top-1 / top-5 on a labelled image folder, from
  res5 features (and, for SoCo, the box-head embedding of the whole-image box), at iteration 0,
  every ``PERIOD`` iterations and at the end; the training stream is the same with it on or off.
* **Health** (``MONITOR.HEALTH``), label-free: RankMe and the embedding std of the projector
  outputs, with collapse warnings; for DetCo the chance level ``ln(Q + 1)`` of each InfoNCE term.

This module runs them in the training loop; where they read the model is
:mod:`soco_d2.engine.model_taps`, the health figures :mod:`soco_d2.engine.health_metrics`, the plot
:mod:`soco_d2.engine.monitor_plots`. Keys, warnings, the probe's BN statistics and what the
monitors ask of a model: docs/TRAINING.md, "Is it learning? Monitors".
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Dict, Optional

import torch

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

from .health_metrics import collapse_warning, embedding_std, gather_rows, rank_drop_warning, rankme
from .model_taps import EmbeddingWindow, embedding_module, probe_feature_fn
from .monitor_plots import plot_monitor_curves
from .writers import read_metrics

__all__ = ["Monitors"]

logger = logging.getLogger(__name__)


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
        self._window: Optional[EmbeddingWindow] = None
        self._images = None
        self._last_probe_end: Optional[float] = None
        self._last_warned = -10**9
        self._peak_rank = 0.0
        self.chance_level = None
        self._dim: Optional[int] = None
        m = comm.unwrap(trainer.model)
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
            self._window = EmbeddingWindow(embedding_module(m), h.WINDOW)
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
        z = gather_rows(self._window.matrix()).cpu()  # the one copy to the host per period
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
        model = comm.unwrap(self.trainer.model)
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
