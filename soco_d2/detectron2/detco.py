"""DetCo over detectron2's ResNet: the ``D2DetCo`` meta-architecture.

``D2DetCo`` is :class:`soco_d2.modeling.meta_arch.detco.DetCo` (forward, the three InfoNCE terms
per level, the queues, shuffle-BN, the momentum update and the batch format are DetCo's) with one
module changed: the ResNet body of the query / key encoders is detectron2's ``ResNet``
(``build_resnet_backbone``) instead of torchvision's. Its state dict therefore carries
detectron2's names::

    encoder_q.body.stem.conv1.weight, encoder_q.body.stem.conv1.norm.*,
    encoder_q.body.res2.0.conv1.weight, encoder_q.body.res2.0.shortcut.norm.*, ...

the names of ``backbone.bottom_up.*`` in detectron2's FPN / RetinaNet models and of
``backbone.*`` + ``roi_heads.res5.*`` in its C4 models. ``tools/convert_to_d2.py`` converts the
checkpoint (``--parts backbone``); :meth:`D2DetCo.detection_state_dict` gives the full names for
either detector.
"""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone import build_resnet_backbone
from torch import Tensor

from soco_d2.modeling.meta_arch.detco import DetCo, DetCoEncoder

from .modeling import zero_init_residual

__all__ = ["D2DetCo"]

_LAYOUTS = ("FPN", "C4")


@META_ARCH_REGISTRY.register()
class D2DetCo(DetCo):
    """DetCo (see :class:`soco_d2.modeling.meta_arch.detco.DetCo`) over detectron2's ResNet.

    Reads a detectron2 config with :func:`~soco_d2.detectron2.add_soco_d2_config`'s keys:
    ``MODEL.RESNETS`` (``DEPTH``, ``NORM`` "BN", ``STRIDE_IN_1X1``, ``RES2_OUT_CHANNELS``,
    ``WIDTH_PER_GROUP``, ``NUM_GROUPS``, ``ZERO_INIT_RESIDUAL``...), ``MODEL.BACKBONE.FREEZE_AT``
    (must be 0), ``MODEL.DETCO``, ``INPUT.DETCO.GRID``, ``SOLVER.IMS_PER_BATCH`` /
    ``GRAD_ACCUM_STEPS``, ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``. The ResNet outputs the stages of
    ``MODEL.DETCO.LEVELS`` (``MODEL.RESNETS.OUT_FEATURES`` must name the same stages).
    """

    def build_encoder(self, cfg) -> DetCoEncoder:
        if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT}: pretraining trains every "
                "layer; set it to 0 (detectron2's default, 2, freezes the stem and res2)."
            )
        levels = list(cfg.MODEL.DETCO.LEVELS)
        if sorted(cfg.MODEL.RESNETS.OUT_FEATURES) != sorted(levels):
            raise ValueError(
                f"MODEL.RESNETS.OUT_FEATURES = {list(cfg.MODEL.RESNETS.OUT_FEATURES)} but "
                f"MODEL.DETCO.LEVELS = {levels}: the ResNet must output exactly the stages DetCo "
                "contrasts; set both to the same stages."
            )
        body = build_resnet_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        if cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL:
            zero_init_residual(body)
        channels = {lvl: body.output_shape()[lvl].channels for lvl in levels}
        return DetCoEncoder(cfg, body=body, channels=channels)

    def detection_state_dict(self, layout: str = "FPN") -> Dict[str, Tensor]:
        """The query ResNet under the full names of a detectron2 detector: ``"FPN"`` (FPN and
        RetinaNet models: ``backbone.bottom_up.*``) or ``"C4"`` (``backbone.stem/res2-4.*``,
        ``roi_heads.res5.*``)."""
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}.")
        out = {}
        for k, v in self.encoder_q.body.state_dict().items():
            if layout == "FPN":
                out["backbone.bottom_up." + k] = v
            else:
                out[("roi_heads." if k.startswith("res5.") else "backbone.") + k] = v
        return out
