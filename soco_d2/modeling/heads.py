"""RoI box head and the projector / predictor MLPs of SoCo."""
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

_NORMS = {"BN": nn.BatchNorm2d, "": None}


def build_box_head(cfg, in_channels: int) -> FastRCNNConvFCHead:
    """The R-CNN box head: ``NUM_CONV`` x [3x3 conv, BN, ReLU], flatten, ``NUM_FC`` x [fc, ReLU].

    torchvision's ``FastRCNNConvFCHead``, the head of ``maskrcnn_resnet50_fpn_v2`` (4conv1fc with
    BN), so its state-dict keys are those of that detector's ``roi_heads.box_head``.
    """
    h = cfg.MODEL.ROI_BOX_HEAD
    if h.NORM not in _NORMS:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.NORM = {h.NORM!r} is not supported; use 'BN' or ''.")
    return FastRCNNConvFCHead(
        (in_channels, h.POOLER_RESOLUTION, h.POOLER_RESOLUTION),
        [h.CONV_DIM] * h.NUM_CONV,
        [h.FC_DIM] * h.NUM_FC,
        norm_layer=_NORMS[h.NORM],
    )


def box_head_output_dim(cfg, in_channels: int) -> int:
    h = cfg.MODEL.ROI_BOX_HEAD
    if h.NUM_FC > 0:
        return h.FC_DIM
    channels = h.CONV_DIM if h.NUM_CONV > 0 else in_channels
    return channels * h.POOLER_RESOLUTION**2


class MLP(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> Linear (BYOL / SoCo projector and predictor)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


def build_projector(cfg, in_dim: int) -> MLP:
    s = cfg.MODEL.SOCO
    return MLP(in_dim, s.PROJECTOR_HIDDEN_DIM, s.PROJECTOR_OUT_DIM)


def build_predictor(cfg) -> MLP:
    s = cfg.MODEL.SOCO
    return MLP(s.PROJECTOR_OUT_DIM, s.PREDICTOR_HIDDEN_DIM, s.PROJECTOR_OUT_DIM)
