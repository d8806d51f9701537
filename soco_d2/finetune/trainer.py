"""The fine-tuning trainer of the torchvision detectors, on the loop of
:mod:`soco_d2.engine.train_loop` (metrics flush with its non-finite check, checkpoints,
preemption stop and closing are the loop's).

This module adds the detection step, what a bare torchvision training step does and little
else (the per-step losses stay on the device until the loop's flush), the periodic and final
COCO evaluation (the loop's ``evaluate`` and ``after_train`` hooks) and optional precise BN
before evaluating. The solver is :mod:`soco_d2.finetune.solver`'s, the initial weights
:mod:`soco_d2.finetune.weights`'.
"""
import logging
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from soco_d2.data.loader import stop_loader_workers
from soco_d2.engine.checkpoint import Checkpointer
from soco_d2.engine.train_loop import NonFiniteLossGuard, TrainLoop
from soco_d2.engine.run_setup import setup_run
from soco_d2.engine.writers import ConsolePrinter, build_writers
from soco_d2.evaluation.coco_evaluation import (
    COCOEvaluator,
    check_coco_eval_backend,
    flatten_results,
    inference_on_dataset,
)
from soco_d2.utils import comm

from .coco_data import build_dataset, build_test_loader, build_train_loader
from .detectors import build_detector, first_label
from .solver import build_finetune_optimizer, build_lr_scheduler
from .weights import WeightsLoadingError, load_detector_weights

__all__ = ["FinetuneTrainer"]

logger = logging.getLogger(__name__)


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

        batches = iter(build_train_loader(cfg, self.train_dataset, start_iter=0))
        model = comm.unwrap(self.model)
        model.train()
        try:
            update_bn_stats(_LossForward(model, self.device), batches, cfg.TEST.PRECISE_BN.NUM_ITER)
        finally:
            stop_loader_workers(batches)  # now, not when the iterator is collected

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
