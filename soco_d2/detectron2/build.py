"""Pretraining models on detectron2's modules from a soco_d2 config."""
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from soco_d2.modeling.meta_arch import register_detectron2_builder

from .config import pretrain_d2_config

__all__ = ["build_pretrain_model"]


def build_pretrain_model(cfg) -> nn.Module:
    """``D2SoCo`` / ``D2DetCo`` (on CPU, as soco_d2's ``build_model``) from the soco_d2 config
    ``cfg`` with ``MODEL.DETECTRON2.CONFIG_FILE`` set (see :func:`pretrain_d2_config`)."""
    d2_cfg = pretrain_d2_config(cfg)
    return META_ARCH_REGISTRY.get(d2_cfg.MODEL.META_ARCHITECTURE)(d2_cfg)


# soco_d2's build_model (and so PretrainTrainer) builds configs with MODEL.DETECTRON2.CONFIG_FILE
# through this module once it is imported; the core never imports the adapter.
register_detectron2_builder(build_pretrain_model)
