"""ResNet + FPN (P2-P5) built from torchvision, as in the official SoCo code.

* ResNet: torchvision's ``resnet{18,34,50,101,152}`` (stride in the 3x3 conv, "pytorch" style),
  conv init N(0, sqrt(2 / (k^2 C_out))), BN gamma 1 / beta 0, zero gamma on the last BN of every
  residual block when ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``.
* FPN: torchvision's ``FeaturePyramidNetwork`` over layer1..layer4 -> P2..P5 (keys ``"0".."3"``),
  ``MODEL.FPN.OUT_CHANNELS`` channels, BN after both the lateral 1x1 and the output 3x3 convs
  (conv without bias) when ``MODEL.FPN.NORM == "BN"``, nearest top-down upsampling, and no extra
  level (no P6): the official mmdet FPN with ``start_level 0, num_outs 4``.

The state-dict keys (``body.conv1.weight``, ``body.layer1.0...``, ``fpn.inner_blocks.0.0.weight``,
``fpn.inner_blocks.0.1.weight`` ...) are those of torchvision's ``maskrcnn_resnet50_fpn_v2``
backbone, so pretrained weights load into that detector without renaming.
"""
from typing import List, Tuple

import torchvision
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
_NORMS = {"BN": nn.BatchNorm2d}

# FPN level names in the backbone output, P2..P5.
FPN_LEVEL_NAMES = ["0", "1", "2", "3"]


class NoExtraLevel(ExtraFPNBlock):
    """FPN extra block that adds nothing: the pyramid is P2-P5 only (torchvision adds a P6 max
    pool by default, which SoCo does not have)."""

    def forward(
        self, results: List[Tensor], x: List[Tensor], names: List[str]
    ) -> Tuple[List[Tensor], List[str]]:
        return results, names


def _norm_layer(key: str, value: str, allow_none: bool):
    if allow_none and value == "":
        return None
    if value not in _NORMS:
        allowed = sorted(_NORMS) + ([""] if allow_none else [])
        raise ValueError(
            f"{key} = {value!r} is not supported; use one of {allowed} "
            "(BN becomes SyncBN automatically in multi-process training)."
        )
    return _NORMS[value]


def build_resnet_fpn_backbone(cfg) -> BackboneWithFPN:
    """Build the ResNet-FPN backbone from ``cfg.MODEL.RESNETS`` and ``cfg.MODEL.FPN``.

    ``backbone(images)`` returns an ordered dict ``{"0": P2, "1": P3, "2": P4, "3": P5}`` with
    strides 4, 8, 16, 32; ``backbone.out_channels`` is the FPN width.
    """
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNETS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH = {depth} is not supported; use one of {sorted(_RESNETS)}."
        )
    resnet = _RESNETS[depth](
        weights=None,
        norm_layer=_norm_layer("MODEL.RESNETS.NORM", cfg.MODEL.RESNETS.NORM, allow_none=False),
        zero_init_residual=cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL,
    )
    expansion = 4 if depth >= 50 else 1
    in_channels = [64 * 2**i * expansion for i in range(4)]
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f"layer{i + 1}": name for i, name in enumerate(FPN_LEVEL_NAMES)},
        in_channels_list=in_channels,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        extra_blocks=NoExtraLevel(),
        norm_layer=_norm_layer("MODEL.FPN.NORM", cfg.MODEL.FPN.NORM, allow_none=True),
    )
    # The official FPN (mmcv ConvModule) initialises its convs with Kaiming-normal, fan_out,
    # ReLU gain; torchvision's FPN uses Kaiming-uniform(a=1). Follow the official code.
    for m in backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return backbone

