"""Optional detectron2 adapter: SoCo built from detectron2's own modules.

``import soco_d2.detectron2`` registers, in detectron2's registries:

* ``META_ARCH_REGISTRY``: :class:`D2SoCo`, the SoCo meta-architecture of
  :mod:`soco_d2.modeling.meta_arch.soco` (same forward, loss, EMA and batch format) over
  detectron2's ResNet + FPN, ``ROIPooler`` and ``FastRCNNConvFCHead``. Its online weights carry
  the names of detectron2's ``GeneralizedRCNN`` (``backbone.bottom_up.*``, ``backbone.fpn_*``,
  ``roi_heads.box_head.*``).
* ``META_ARCH_REGISTRY``: :class:`D2DetCo`, the DetCo meta-architecture of
  :mod:`soco_d2.modeling.meta_arch.detco` (same forward, losses, queues, shuffle-BN) over
  detectron2's ResNet; its query ResNet carries detectron2's names (``stem.*``, ``res2.*``...).
* ``BACKBONE_REGISTRY``: :func:`build_soco_resnet_fpn_backbone` (ResNet + FPN P2-P5).

and, in soco_d2, :func:`build_pretrain_model` as the builder that ``soco_d2.modeling.build_model``
(and so ``PretrainTrainer``) uses for configs with ``MODEL.DETECTRON2.CONFIG_FILE``.

:func:`add_soco_d2_config` adds the SoCo keys to a detectron2 config. detectron2 is not on PyPI
(see docs/DETECTRON2.md); nothing else in soco_d2 imports it.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "soco_d2.detectron2 needs detectron2, which is not on PyPI: build it from source "
        "(pip install --no-build-isolation -e <detectron2 checkout>), see docs/DETECTRON2.md."
    ) from e

from .build import build_pretrain_model
from .config import add_soco_d2_config, merge_d2_config, pretrain_d2_config
from .detco import D2DetCo
from .modeling import D2SoCo, SoCoROIPooler, build_soco_resnet_fpn_backbone

__all__ = [
    "D2DetCo",
    "D2SoCo",
    "SoCoROIPooler",
    "add_soco_d2_config",
    "build_pretrain_model",
    "build_soco_resnet_fpn_backbone",
    "merge_d2_config",
    "pretrain_d2_config",
]
