"""Fine-tuning trainer for the torchvision detectors, on the loop of
:mod:`soco_d2.engine.train_loop` (metrics flush, checkpoints, preemption stop and closing).

The engine provides the process launch, logging and writers (``metrics.json``, TensorBoard,
console progress line), atomic checkpoints with RNG states and the synchronised BN; this module
adds the detection recipe: SGD with momentum, linear scaling of the learning rate
(``BASE_LR * IMS_PER_BATCH / BASE_LR_BATCH_SIZE``), linear warmup then step decay (fvcore's
param schedulers), periodic and final COCO evaluation, optional precise BN before evaluating.

The step does what a bare torchvision training step does and little else: the per-step losses
stay on the device; they are read (one host sync) every ``LOG_PERIOD`` iterations, before a
checkpoint and at the end, and checked there (:class:`~soco_d2.engine.train_loop.NonFiniteLossGuard`:
with float16 the steps the gradient scaler skipped are tolerated up to
``SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE`` in a row).
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
)
from torch import nn

from soco_d2.checkpoint.io import load_checkpoint_file
from soco_d2.engine.checkpoint import Checkpointer
from soco_d2.engine.train_loop import NonFiniteLossGuard, TrainLoop
from soco_d2.engine.trainer import setup_run
from soco_d2.engine.writers import ConsolePrinter, build_writers
from soco_d2.evaluation.coco_evaluation import (
    COCOEvaluator,
    check_coco_eval_backend,
    flatten_results,
    inference_on_dataset,
)
from soco_d2.utils import comm

from .coco_data import build_dataset, build_test_loader, build_train_loader
from .detectors import backbone_prefix, build_detector, first_label

__all__ = [
    "FinetuneTrainer",
    "WarmupMultiStepLR",
    "resolve_steps",
    "build_finetune_optimizer",
    "load_detector_weights",
    "WeightsLoadingError",
]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
               nn.modules.instancenorm._InstanceNorm)


class WeightsLoadingError(RuntimeError):
    """``MODEL.WEIGHTS`` that cannot initialise the detector (missing file, nothing matching)."""


# ---------------------------------------------------------------------------------------------
# Schedule and optimizer
# ---------------------------------------------------------------------------------------------


def resolve_steps(steps, max_iter: int) -> List[int]:
    """``SOLVER.STEPS`` as iterations: values in (0, 1) are fractions of ``max_iter``.

    Steps at or beyond ``max_iter`` (or rounding to 0) are dropped with a warning (as detectron2
    drops steps beyond ``MAX_ITER``).
    """
    out = []
    for s in steps:
        if s <= 0:
            raise ValueError(f"SOLVER.STEPS must be positive, got {tuple(steps)}.")
        out.append(int(round(s * max_iter)) if s < 1 else int(s))
    if out != sorted(out) or len(set(out)) != len(out):
        raise ValueError(f"SOLVER.STEPS must increase strictly; got {tuple(steps)} -> {out}.")
    kept = [s for s in out if 0 < s < max_iter]
    if len(kept) < len(out):
        logger.warning("SOLVER.STEPS %s -> %s: only steps within 1..%d are used (SOLVER.MAX_ITER=%d).",
                       tuple(steps), out, max_iter - 1, max_iter)
    return kept


class WarmupMultiStepLR:
    """Learning rate per iteration: warmup from ``warmup_factor * lr`` (linear, or constant) over
    ``warmup_iters``, then ``lr * gamma ** k`` after the k-th step (fvcore schedulers, evaluated
    at ``iteration / max_iter`` as detectron2's ``LRMultiplier``)."""

    def __init__(self, lr: float, max_iter: int, steps: List[int], gamma: float,
                 warmup_iters: int, warmup_factor: float, warmup_method: str = "linear"):
        if max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive for fine-tuning, got {max_iter}.")
        self.max_iter, self.base_lr = max_iter, lr
        decay = MultiStepParamScheduler(
            [lr * gamma**k for k in range(len(steps) + 1)], num_updates=max_iter, milestones=steps
        ) if steps else ConstantParamScheduler(lr)
        warmup_iters = min(max(int(warmup_iters), 0), max_iter)
        if warmup_iters == 0:
            self._sched = decay
            return
        if warmup_method == "linear":
            warmup = LinearParamScheduler(warmup_factor * lr, lr)
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(warmup_factor * lr)
        else:
            raise ValueError(f"SOLVER.WARMUP_METHOD must be 'linear' or 'constant', got {warmup_method!r}.")
        frac = warmup_iters / max_iter
        if frac >= 1.0:
            self._sched = warmup
            return
        # "fixed": the decay scheduler sees the global position, so milestones stay absolute.
        self._sched = CompositeParamScheduler(
            [warmup, decay], lengths=[frac, 1.0 - frac], interval_scaling=["rescaled", "fixed"]
        )

    def lr_at(self, it: int) -> float:
        return float(self._sched(min(max(it, 0), self.max_iter - 1) / self.max_iter))


def build_lr_scheduler(cfg, max_iter: int) -> WarmupMultiStepLR:
    s = cfg.SOLVER
    if s.LR_SCHEDULER != "WarmupMultiStep":
        raise ValueError(
            f"Fine-tuning needs SOLVER.LR_SCHEDULER 'WarmupMultiStep', got {s.LR_SCHEDULER!r} "
            "(the shared default is the pretraining schedule; see configs/finetune/Base-Finetune.yaml)."
        )
    lr = s.BASE_LR * s.IMS_PER_BATCH / s.BASE_LR_BATCH_SIZE
    return WarmupMultiStepLR(lr, max_iter, resolve_steps(s.STEPS, max_iter), s.GAMMA,
                             s.WARMUP_ITERS, s.WARMUP_FACTOR, s.WARMUP_METHOD)


def build_finetune_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD; parameters of normalisation layers get ``WEIGHT_DECAY_NORM``, all others (biases
    included) ``WEIGHT_DECAY``, as detectron2's default optimizer."""
    s = cfg.SOLVER
    if s.OPTIMIZER != "SGD":
        raise ValueError(
            f"Fine-tuning uses SOLVER.OPTIMIZER 'SGD', got {s.OPTIMIZER!r} (the shared default is "
            "the pretraining optimizer; see configs/finetune/Base-Finetune.yaml)."
        )
    norm, other, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm if isinstance(module, _NORM_TYPES) else other).append(p)
    groups = [{"params": other, "weight_decay": s.WEIGHT_DECAY}]
    if norm:
        groups.append({"params": norm, "weight_decay": s.WEIGHT_DECAY_NORM})
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)


# ---------------------------------------------------------------------------------------------
# Initial weights
# ---------------------------------------------------------------------------------------------


def _is_detectron2_names(keys) -> bool:
    return any(k.startswith(("stem.", "res2.", "backbone.bottom_up.", "backbone.res2."))
               for k in keys)


def _is_bare_resnet_names(keys) -> bool:
    return any(k.startswith(("conv1.", "layer1.")) for k in keys)


def _to_detector_names(state: Dict, path: str, fpn_levels) -> Dict[str, torch.Tensor]:
    """Rename a loaded state dict to the detector's (torchvision) names."""
    if _is_detectron2_names(state):
        from soco_d2.checkpoint.convert import d2_to_torchvision

        state, skipped = d2_to_torchvision(state, fpn_levels)
        logger.info("%s: detectron2 names converted to torchvision's (%d entries have no "
                    "counterpart in the detector).", path, len(skipped))
    elif _is_bare_resnet_names(state):
        state = {backbone_prefix() + k: v for k, v in state.items()}
        logger.info("%s: a bare ResNet state dict; loaded into %s*.", path, backbone_prefix())
    return {k: torch.as_tensor(v) for k, v in state.items()}


def _fpn_levels(model: nn.Module):
    """Pyramid levels of the detector's FPN inputs: (2, 3, 4, 5) Mask R-CNN, (3, 4, 5) RetinaNet."""
    n = len(model.backbone.fpn.inner_blocks)
    return tuple(range(6 - n, 6))


def _group(name: str) -> str:
    return ".".join(name.split(".")[:2])  # backbone.body, backbone.fpn, rpn.head, roi_heads.box_head


def load_detector_weights(model: nn.Module, path: str, trust: bool = False) -> Dict[str, List[str]]:
    """Initialise ``model`` from ``path`` (detectron2 ``.pkl``, torchvision / soco_d2 ``.pth``).

    Every detector tensor whose name and shape are in the file is loaded; the others stay at
    their random init. A summary (loaded / left at init per module, unused file entries) is
    logged. Raises :class:`WeightsLoadingError` if the file does not exist or no backbone tensor
    matched (a wrong or mis-converted file would otherwise train silently from scratch).
    Returns ``{"loaded", "missing", "unused", "shape_mismatch"}`` name lists.
    """
    if not os.path.isfile(path):
        raise WeightsLoadingError(
            f"MODEL.WEIGHTS {path!r} does not exist. Give a detectron2 .pkl (tools/convert_to_d2.py),"
            " a torchvision / soco_d2 .pth, or \"\" to train from random init."
        )
    state = _to_detector_names(load_checkpoint_file(path, trust=trust), path, _fpn_levels(model))
    own = model.state_dict()
    loaded, mismatch = [], []
    for k, v in state.items():
        if k not in own:
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            mismatch.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            continue
        own[k] = v.to(own[k].dtype)
        loaded.append(k)
    model.load_state_dict(own)
    missing = sorted(set(own) - set(loaded) - {m.split(":")[0] for m in mismatch})
    unused = sorted(set(state) - set(own))
    report = {"loaded": loaded, "missing": missing, "unused": unused, "shape_mismatch": mismatch}
    _log_weights_report(path, report)
    prefix = backbone_prefix()
    if not any(k.startswith(prefix) and not k.endswith("num_batches_tracked") for k in loaded):
        raise WeightsLoadingError(
            f"No backbone weight of MODEL.WEIGHTS {path!r} matches the detector ({len(state)} "
            f"entries in the file, e.g. {sorted(state)[:3]}; the detector's backbone keys look like "
            f"{prefix}layer1.0.conv1.weight). Convert the checkpoint with tools/convert_to_d2.py "
            "first, or check MODEL.RESNETS.DEPTH."
        )
    # The backbone must load completely: a partial match means another architecture or depth.
    partial = [k for k in report["missing"]
               if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    partial += [k for k in report["unused"] if k.startswith(prefix) and not k.startswith(prefix + "fc.")]
    partial += [m for m in mismatch if m.startswith(prefix)]
    if partial:
        raise WeightsLoadingError(
            f"The backbone in MODEL.WEIGHTS {path!r} matches the detector's only in part "
            f"({len(partial)} tensors missing, extra or of another shape, e.g. {partial[:3]}): "
            f"check MODEL.RESNETS.DEPTH (now {_depth_hint(model)})."
        )
    return report


def _depth_hint(model: nn.Module) -> str:
    body = model.backbone.body
    blocks = [len(getattr(body, f"layer{i}", [])) for i in (1, 2, 3, 4)]
    return f"blocks per stage {blocks}"


def _log_weights_report(path: str, report: Dict[str, List[str]]) -> None:
    def per_group(names):
        counts = defaultdict(int)
        for n in names:
            if not n.endswith("num_batches_tracked"):
                counts[_group(n.split(":")[0])] += 1
        return ", ".join(f"{g} ({c})" for g, c in sorted(counts.items())) or "none"

    logger.info("Loaded from %s: %s", path, per_group(report["loaded"]))
    logger.info("Left at initialisation: %s", per_group(report["missing"]))
    if report["shape_mismatch"]:
        logger.warning("Not loaded (shape differs):\n  %s", "\n  ".join(report["shape_mismatch"]))
    if report["unused"]:
        shown = report["unused"][:20]
        logger.info("Entries of the file not used (%d): %s%s", len(report["unused"]),
                    ", ".join(shown), " ..." if len(report["unused"]) > 20 else "")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def _targets_to(targets: List[dict], device: torch.device) -> List[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
             for k, v in t.items()} for t in targets]


class _LossForward(nn.Module):
    """``batch -> model(images, targets)``: the one-argument forward fvcore's precise BN calls."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, batch):
        images, targets = batch
        return self.model([im.to(self.device).float() for im in images],
                          _targets_to(targets, self.device))


class FinetuneTrainer(TrainLoop):
    """Fine-tunes ``MODEL.DETECTOR`` on ``DATASETS.TRAIN`` and evaluates on ``DATASETS.TEST``.

    Typical use::

        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    """

    def __init__(self, cfg, model: Optional[nn.Module] = None, train: bool = True):
        s = cfg.SOLVER
        if s.GRAD_ACCUM_STEPS != 1:
            raise ValueError("SOLVER.GRAD_ACCUM_STEPS must be 1 for fine-tuning; scale "
                             "SOLVER.IMS_PER_BATCH (the learning rate follows linearly).")
        super().__init__(cfg, setup_run(cfg))
        check_coco_eval_backend(cfg.TEST.COCO_EVAL_BACKEND)  # at start, not after training

        self.model = model if model is not None else build_detector(cfg, self.device)
        self.amp_dtype = (torch.bfloat16 if s.AMP.DTYPE == "bfloat16" else torch.float16) \
            if s.AMP.ENABLED else None
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=s.AMP.ENABLED and s.AMP.DTYPE == "float16")
        self.nonfinite = NonFiniteLossGuard(
            cfg, self.scaler, "Lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS or set "
            "SOLVER.CLIP_GRAD_NORM.")
        self.max_iter = int(s.MAX_ITER)
        self.optimizer = None
        self.train_dataset = None
        self.results: Dict = {}  # the last evaluation's
        if train:
            if not cfg.DATASETS.TRAIN:
                raise ValueError("DATASETS.TRAIN is empty: name at least one training dataset.")
            self.optimizer = build_finetune_optimizer(cfg, self.model)
            self.scheduler = build_lr_scheduler(cfg, self.max_iter)
            self.train_dataset = self._build_train_dataset()
            if self.world_size > 1:
                self.model = comm.wrap_ddp(self.model, self.device)
        self.checkpointer = Checkpointer(comm.unwrap(self.model), cfg.OUTPUT_DIR, self.optimizer,
                                         self.scaler, max_to_keep=s.MAX_TO_KEEP, config=cfg.dump())

    def _build_train_dataset(self):
        names = self.cfg.DATASETS.TRAIN
        datasets = [build_dataset(self.cfg, n, True, first_label(self.cfg)) for n in names]
        ncls = {len(d.category_ids) for d in datasets}
        if ncls != {self.cfg.MODEL.NUM_CLASSES}:
            raise ValueError(
                f"DATASETS.TRAIN {tuple(names)} have {sorted(ncls)} categories but "
                f"MODEL.NUM_CLASSES is {self.cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES to match."
            )
        if len(datasets) == 1:
            return datasets[0]
        return torch.utils.data.ConcatDataset(datasets)

    # ------------------------------------------------------------------ weights
    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from ``OUTPUT_DIR/last_checkpoint`` (with ``resume``, when it exists: full
        state); otherwise initialise from ``MODEL.WEIGHTS`` (matching tensors only); otherwise
        keep the random init. ``MODEL.WEIGHTS`` is ignored when resuming."""
        if resume:
            path = self.checkpointer.last_checkpoint()
            if path is not None:
                logger.info("Resuming from %s.", path)
                data = self.checkpointer.load(path)
                self.start_iter = int(data.get("iteration", 0))
                self._writers_state = data.get("writers", {})  # the W&B run to continue
                return
            logger.info("No checkpoint in %s: starting a new run.", self.cfg.OUTPUT_DIR)
        if self.cfg.MODEL.WEIGHTS:
            load_detector_weights(comm.unwrap(self.model), self.cfg.MODEL.WEIGHTS)
        else:
            logger.info("MODEL.WEIGHTS is empty: training from random initialisation.")

    def load_for_eval(self, resume: bool = False) -> int:
        """Weights to evaluate: ``MODEL.WEIGHTS`` if set (and not ``resume``), else the last
        checkpoint of ``OUTPUT_DIR``. Returns the iteration the weights come from (0 if unknown)."""
        if self.cfg.MODEL.WEIGHTS and not resume:
            path = self.cfg.MODEL.WEIGHTS
            report = load_detector_weights(comm.unwrap(self.model), path)
            if report["missing"]:
                logger.warning("Evaluating with %d detector tensors left at random init.",
                               len(report["missing"]))
            return self._iteration_in(path)
        path = self.checkpointer.last_checkpoint()
        if path is None:
            raise WeightsLoadingError(
                f"--eval-only needs MODEL.WEIGHTS or a checkpoint in OUTPUT_DIR "
                f"({self.cfg.OUTPUT_DIR!r} has no last_checkpoint)."
            )
        data = self.checkpointer.load(path, model_only=True)
        del data
        return self._iteration_in(path)

    @staticmethod
    def _iteration_in(path: str) -> int:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return int(obj.get("iteration", 0)) if isinstance(obj, dict) else 0
        except Exception:  # a .pkl or a bare state dict carries no iteration
            return 0

    # ------------------------------------------------------------------ training
    def train(self) -> Dict:
        """Train to ``SOLVER.MAX_ITER`` (evaluating every ``TEST.EVAL_PERIOD``) and evaluate the
        final model. Returns the last evaluation results (``{}`` on non-main processes)."""
        self.results = {}
        super().train()
        return self.results

    def start_message(self) -> str:
        return (f"Fine-tuning {self.cfg.MODEL.DETECTOR} for {self.max_iter} iterations from "
                f"iteration {self.start_iter}: {self.world_size} process(es), "
                f"{self.cfg.SOLVER.IMS_PER_BATCH} images per step, lr {self.scheduler.base_lr:.5g}.")

    def build_train_loader(self):
        return build_train_loader(self.cfg, self.train_dataset, self.start_iter)

    def evaluate(self, done: int) -> None:
        period = self.cfg.TEST.EVAL_PERIOD
        if self.cfg.DATASETS.TEST and period > 0 and done % period == 0:
            self.results = self.test(done)
            self.model.train()

    def after_train(self) -> None:
        if self.cfg.DATASETS.TEST:
            self.results = self.test(self.max_iter)

    def run_step(self, it: int) -> None:
        """One optimizer step on the next batch (no host sync)."""
        t0 = time.perf_counter()
        images, targets = next(self._data)
        data_time = time.perf_counter() - t0
        lr = self.scheduler.lr_at(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = [im.to(self.device, non_blocking=True).float() for im in images]
        targets = _targets_to(targets, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            loss_dict = self.model(images, targets)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses).backward()
        clip = self.cfg.SOLVER.CLIP_GRAD_NORM
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.record(it, loss_dict, lr=lr, data_time=data_time)

    def window_metrics(self, done: int, window: List[Dict], losses: Dict[str, float],
                       elapsed: float) -> Dict:
        steps = len(window)
        iter_time = elapsed / steps
        return {"total_loss": sum(losses.values()), "lr": window[-1]["lr"],
                "data_time": sum(w["data_time"] for w in window) / steps, "iter_time": iter_time,
                "images_per_sec": self.cfg.SOLVER.IMS_PER_BATCH / max(iter_time, 1e-9),
                "eta_seconds": iter_time * (self.max_iter - done)}

    # ------------------------------------------------------------------ evaluation
    def _precise_bn(self) -> None:
        cfg = self.cfg
        if not cfg.TEST.PRECISE_BN.ENABLED or self.train_dataset is None:
            return
        from fvcore.nn.precise_bn import update_bn_stats

        loader = build_train_loader(cfg, self.train_dataset, start_iter=0)
        model = comm.unwrap(self.model)
        model.train()
        update_bn_stats(_LossForward(model, self.device), loader, cfg.TEST.PRECISE_BN.NUM_ITER)

    def test(self, iteration: int) -> Dict:
        """Evaluate on every ``DATASETS.TEST`` set; write ``bbox/AP``... (``<name>/bbox/AP``...
        with several sets) to ``metrics.json`` / TensorBoard at ``iteration``."""
        cfg = self.cfg
        if not cfg.DATASETS.TEST:
            logger.warning("DATASETS.TEST is empty: nothing to evaluate.")
            return {}
        self._precise_bn()
        model = comm.unwrap(self.model)
        results = {}
        for name in cfg.DATASETS.TEST:
            dataset = build_dataset(cfg, name, False, first_label(cfg))
            evaluator = COCOEvaluator(
                dataset, tasks=("bbox", "segm") if _has_masks(model) else ("bbox",),
                backend=cfg.TEST.COCO_EVAL_BACKEND)
            results[name] = inference_on_dataset(model, build_test_loader(cfg, dataset),
                                                 evaluator, self.device, self.amp_dtype)
        if len(results) == 1:
            results = next(iter(results.values()))
        if comm.is_main_process():
            flat = flatten_results(results) if len(cfg.DATASETS.TEST) == 1 else {
                f"{n}/{k}": v for n, r in results.items() for k, v in flatten_results(r).items()}
            writers = getattr(self, "writers", None) or build_writers(cfg.OUTPUT_DIR, self.max_iter, cfg)
            for w in writers:
                if not isinstance(w, ConsolePrinter):
                    w.write(iteration, flat)
            if writers is not getattr(self, "writers", None):
                for w in writers:
                    w.close()
        comm.synchronize()
        return results


def _has_masks(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return heads is not None and getattr(heads, "mask_head", None) is not None
