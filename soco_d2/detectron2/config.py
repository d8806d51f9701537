"""SoCo keys for a detectron2 config."""
from detectron2.config import CfgNode

from soco_d2.config import get_cfg as get_soco_cfg


def add_soco_d2_config(cfg: CfgNode) -> None:
    """Add the keys :class:`~soco_d2.detectron2.D2SoCo` reads on top of detectron2's defaults.

    * ``MODEL.SOCO.*``: projector / predictor sizes, the scale-aware level assignment
      (``CANONICAL_BOX_SIZE`` 96, ``CANONICAL_LEVEL`` 4, ``LEVEL_ASSIGNMENT``) and ``HEAD_MODE``, with soco_d2's
      defaults (one source of truth: ``soco_d2.config``).
    * ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``: zero gamma on the last norm of every residual block.
    * ``CHANNELS_LAST``: channels-last images (set it as the soco_d2 config's ``CHANNELS_LAST``).

    The architecture itself is set with detectron2's own keys; see
    ``configs/detectron2/pretrain/soco_fpn_r50_d2arch.yaml``.
    """
    defaults = get_soco_cfg()
    cfg.MODEL.SOCO = CfgNode(defaults.MODEL.SOCO)
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = defaults.MODEL.RESNETS.ZERO_INIT_RESIDUAL
    cfg.CHANNELS_LAST = defaults.CHANNELS_LAST
