"""Fine-tuning and evaluation with detectron2's trainer and soco_d2's registrations.

``tools/train_net.py`` comes here for a detectron2-format config (``configs/detectron2/*.yaml``)
or ``--backend detectron2``. On top of detectron2's ``DefaultTrainer`` (its data loader, models,
schedule, hooks, precise BN, checkpoints, ``metrics.json``) this adds:

* ``Res5ROIHeadsExtraNorm`` in ``ROI_HEADS_REGISTRY``: detectron2's ``Res5ROIHeads`` with one
  more norm (``MODEL.RESNETS.NORM``) after res5, the C4 head of MoCo's / SoCo's C4 recipe;
* datasets: soco_d2's builtin names (:mod:`soco_d2.finetune.coco_data`, under
  ``$SOCO_DATASETS``) and any COCO ``.json`` path in ``DATASETS.TRAIN`` / ``TEST`` are
  registered in detectron2's ``DatasetCatalog``; detectron2's own names (``coco_2017_*``) stay
  detectron2's, under ``$DETECTRON2_DATASETS``, which defaults to ``$SOCO_DATASETS``;
* ``SyncBN`` becomes ``BN`` (one log line) when the run has a single process; on several CPU
  processes (gloo) torch's SyncBatchNorm, which needs CUDA, becomes soco_d2's
  ``AllReduceBatchNorm`` and the model is wrapped in DistributedDataParallel without
  ``device_ids`` (detectron2 passes the local rank, which torch refuses for a CPU model); on
  GPUs with the device soco_d2's launcher chose (not the local rank, which is not the device
  under SLURM's per-task GPU binding);
* COCO evaluation (``COCOEvaluator``) of every ``DATASETS.TEST`` entry, written to
  ``OUTPUT_DIR/metrics.json`` (``bbox/AP``, ``segm/AP``...) that ``tools/check_ap.py`` reads, also
  with ``--eval-only``;
* ``MODEL.WEIGHTS`` must cover the model's ResNet: a file whose tensors miss any of it is an
  error naming the keys (detectron2 alone would leave them randomly initialised with a warning).
"""
import functools
import json
import logging
import os
import re
from typing import Dict, List, Sequence

import detectron2.engine.defaults as d2_defaults
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.config import get_cfg as get_d2_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils import comm as d2_comm
from detectron2.utils.logger import setup_logger

from soco_d2.modeling.sync_bn import sync_batchnorm_to_gloo
from soco_d2.finetune.coco_data import get_dataset_paths
from soco_d2.utils import comm
from soco_d2.utils.env import write_run_record

from .config import merge_d2_config

__all__ = [
    "D2Trainer",
    "Res5ROIHeadsExtraNorm",
    "WeightsError",
    "finetune_main",
    "register_datasets",
    "setup_finetune_cfg",
    "sync_bn_to_bn",
]

logger = logging.getLogger(__name__)


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` whose res5 stage ends with a norm layer of type ``MODEL.RESNETS.NORM``
    (``roi_heads.res5.norm.*``): the C4 head of the MoCo / SoCo / DetCo C4 recipes."""

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def sync_bn_to_bn(cfg: CfgNode, world_size: int) -> List[str]:
    """With one process, every ``*.NORM`` key set to ``"SyncBN"`` becomes ``"BN"`` (torch's
    SyncBatchNorm needs a process group); returns the keys changed (logged in one line)."""
    if world_size > 1:
        return []
    changed = []

    def walk(node: CfgNode, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, CfgNode):
                walk(v, f"{prefix}{k}.")
            elif k == "NORM" and v == "SyncBN":
                node[k] = "BN"
                changed.append(prefix + k)

    walk(cfg, "")
    if changed:
        logger.info("One process: SyncBN -> BN for %s.", ", ".join(changed))
    return changed


def setup_finetune_cfg(config_file: str, opts: Sequence = (), world_size: int = 1,
                       log_dir: bool = False) -> CfgNode:
    """detectron2's config from ``config_file`` and ``KEY VALUE`` overrides (an unknown key is a
    :class:`~soco_d2.config.ConfigError` naming it), with :func:`sync_bn_to_bn` applied. With
    ``log_dir``, soco_d2's log lines also go to detectron2's ``OUTPUT_DIR/log.txt``."""
    cfg = get_d2_cfg()
    merge_d2_config(cfg, config_file, opts)
    if log_dir:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="soco_d2", abbrev_name="soco_d2")
    sync_bn_to_bn(cfg, world_size)
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
def register_datasets(names: Sequence[str]) -> List[str]:
    """Register in detectron2's ``DatasetCatalog`` every name of ``names`` it does not know and
    soco_d2 does (a builtin name under ``$SOCO_DATASETS``, a name given to
    ``soco_d2.finetune.register_coco_instances``, or the path of a COCO json). Returns the names
    registered. An unknown name raises ``KeyError`` listing what both catalogs know."""
    registered = []
    for name in names:
        if name in DatasetCatalog.list():
            continue
        try:
            json_file, image_root = get_dataset_paths(name)
        except KeyError as e:
            raise KeyError(
                f"{e.args[0]} detectron2 knows: {sorted(DatasetCatalog.list())}."
            ) from None
        register_coco_instances(name, {}, json_file, image_root)
        registered.append(name)
    return registered


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
class WeightsError(ValueError):
    """``MODEL.WEIGHTS`` does not hold the model's backbone."""


_RESNET_KEY = re.compile(r"(?:^|\.)(?:stem\.conv1|res[2-5]\.\d+\.(?:conv\d|shortcut))\.")


class _CheckedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses initial weights missing part of the ResNet."""

    check_backbone = False

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.check_backbone:
            missing = [k for k in incompatible.missing_keys
                       if _RESNET_KEY.search(k) and not k.endswith("num_batches_tracked")]
            if missing:
                given = sorted(checkpoint.get("model", {}))
                raise WeightsError(
                    f"MODEL.WEIGHTS = {self._weights!r} does not hold {len(missing)} tensors of the "
                    f"model's ResNet, e.g. {missing[:6]}; the file has {len(given)} tensors, e.g. "
                    f"{given[:6]}. Convert a pretraining checkpoint with tools/convert_to_d2.py "
                    "(whose names fit detectron2's FPN, RetinaNet and C4 models) and check that "
                    "MODEL.RESNETS.DEPTH matches it."
                )
        return incompatible

    def load_initial(self, path: str):
        self.check_backbone, self._weights = True, path
        try:
            return self.load(path, checkpointables=[])
        finally:
            self.check_backbone = False


def _multi_process_cpu(cfg) -> bool:
    return comm.get_world_size() > 1 and torch.device(cfg.MODEL.DEVICE).type == "cpu"


class D2Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with COCO evaluation, the checked weight loading and
    multi-process CPU (gloo) runs."""

    def __init__(self, cfg):
        if comm.get_world_size() == 1:
            super().__init__(cfg)
            return
        # DefaultTrainer.__init__ wraps the model with create_ddp_model(model, ...), which adds
        # device_ids=[local rank]: torch refuses device_ids for a CPU model, and under SLURM's
        # per-task GPU binding the local rank is not the device (each task sees device 0). For
        # the duration of the constructor, the module's function gets this process's device (set
        # by soco_d2's launcher), or None on CPU.
        device_ids = None if _multi_process_cpu(cfg) else [torch.cuda.current_device()]
        create_ddp_model = d2_defaults.create_ddp_model
        d2_defaults.create_ddp_model = functools.partial(create_ddp_model, device_ids=device_ids)
        try:
            super().__init__(cfg)
        finally:
            d2_defaults.create_ddp_model = create_ddp_model

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if _multi_process_cpu(cfg):
            n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            if n:
                model = sync_batchnorm_to_gloo(model)
                logger.info("%d CPU processes: %d SyncBatchNorm layers -> AllReduceBatchNorm.",
                            comm.get_world_size(), n)
        return model

    def resume_or_load(self, resume: bool = True):
        """Resume from ``OUTPUT_DIR/last_checkpoint`` (detectron2's behaviour), else load
        ``MODEL.WEIGHTS`` into the model, refusing a file that misses part of its ResNet."""
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        self.start_iter = 0
        weights = self.cfg.MODEL.WEIGHTS
        if not weights:
            logger.warning("MODEL.WEIGHTS is empty: training from random initialisation.")
            return
        _CheckedCheckpointer(self.checkpointer.model).load_initial(weights)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # a COCO json given by its path gets a folder named after the file
        folder = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(dataset_name))[0])
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", folder)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def _write_eval_metrics(cfg, results: Dict, iteration: int) -> None:
    """Append the evaluation of ``--eval-only`` to ``OUTPUT_DIR/metrics.json`` as training
    writes it (``bbox/AP``...; ``<dataset>/bbox/AP`` with several test sets)."""
    if not comm.is_main_process() or not results:
        return
    record = {"iteration": iteration, **flatten_results_dict(results)}
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _ensure_local_group() -> None:
    """detectron2's ``comm.get_local_rank()`` needs its per-machine group, which its own
    ``launch`` creates; soco_d2's launcher (torchrun / SLURM / --num-gpus) creates it here."""
    if comm.get_world_size() > 1 and d2_comm._LOCAL_PROCESS_GROUP is None:
        d2_comm.create_local_process_group(comm.get_local_world_size())


def finetune_main(args):
    """One process of a detectron2 fine-tuning run (the ``main`` that soco_d2's launcher calls)."""
    _ensure_local_group()
    cfg = setup_finetune_cfg(args.config_file, args.opts, comm.get_world_size(), log_dir=True)
    register_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    default_setup(cfg, args)  # logs detectron2's environment and the config
    if comm.is_main_process():
        write_run_record(cfg.OUTPUT_DIR)  # env.json beside config.yaml, with the git commit
    if args.eval_only:
        model = D2Trainer.build_model(cfg)
        checkpointer = _CheckedCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            data = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        else:
            data = checkpointer.load_initial(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else {}
        results = D2Trainer.test(cfg, model)
        _write_eval_metrics(cfg, results, int(data.get("iteration", 0)) if data else 0)
        return results
    trainer = D2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_finetune(args):
    """Check the config and the dataset names in this process (bad input fails before any
    process starts), then run :func:`finetune_main` in each process with soco_d2's launcher
    (``--num-gpus``, ``--num-machines``, torchrun / SLURM environments)."""
    from soco_d2.engine.launch import launch_from_args

    cfg = setup_finetune_cfg(args.config_file, args.opts)
    register_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return launch_from_args(finetune_main, args, cfg.MODEL.DEVICE)
