"""Config keys of the SoCo meta-architecture and its view mapper."""
from fvcore.common.config import CfgNode as CN


def add_soco_config(cfg: CN) -> None:
    cfg.MODEL.SOCO = CN()
    cfg.MODEL.SOCO.PROJECTOR_HIDDEN_DIM = 4096
    cfg.MODEL.SOCO.PROJECTOR_OUT_DIM = 256
    cfg.MODEL.SOCO.PREDICTOR_HIDDEN_DIM = 4096
    # FPN level of each box, in pixels of its view, with boundaries 48 / 96 / 192 (canonical size 96
    # at level 4): "official" (the official code: integer corners, sqrt((w + 1)(h + 1)), s <= 48 ->
    # P2, ...) or "torchvision" (torchvision's LevelMapper: sqrt(wh), s < 48 -> P2, ...). See
    # modeling/pooler.py.
    cfg.MODEL.SOCO.CANONICAL_BOX_SIZE = 96
    cfg.MODEL.SOCO.CANONICAL_LEVEL = 4
    cfg.MODEL.SOCO.LEVEL_ASSIGNMENT = "official"
    # RoI head / projector / predictor computation (see modeling/meta_arch/soco.py):
    # "faithful" (the official objective in train mode: every box pooled on all four levels, BN
    # statistics per view, box set and level, loss on the assigned level); "per_view" (faster:
    # each box pooled on its level only, BN statistics per view); "all" (as per_view, but BN
    # statistics over the boxes of all views).
    cfg.MODEL.SOCO.HEAD_MODE = "faithful"

    cfg.INPUT.SOCO = CN()
    cfg.INPUT.SOCO.VIEW1_SIZE = 224  # whole image resized (aspect not kept)
    cfg.INPUT.SOCO.VIEW2_SIZE = 224  # random resized crop
    cfg.INPUT.SOCO.VIEW3_SIZE = 112  # random resized crop (see V3_MODE)
    # "independent": V3 is its own random crop (official code); "downsample": V2 resized (paper).
    cfg.INPUT.SOCO.V3_MODE = "independent"
    # SoCo*: a fourth view, V2 downsampled to this size (0 disables).
    cfg.INPUT.SOCO.VIEW4_SIZE = 0
    cfg.INPUT.SOCO.CROP_SCALE = (0.5, 1.0)
    cfg.INPUT.SOCO.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    cfg.INPUT.SOCO.NUM_PROPOSALS = 4  # K
    # Crop draws: a draw needs >= max(K // 2, 1) candidates in every pair; the requirement is
    # halved after each rejected draw, never below 1; the last draw is used anyway (official).
    cfg.INPUT.SOCO.MAX_TRIES = 5
    cfg.INPUT.SOCO.JITTER_PROB = 0.5
    cfg.INPUT.SOCO.JITTER_RATIO = 0.1
    cfg.INPUT.SOCO.FLIP_PROB = 0.5
    # Cutout inside boxes (official FPN-100ep recipe only).
    cfg.INPUT.SOCO.CUTOUT = False
    cfg.INPUT.SOCO.CUTOUT_RATIO = (0.1, 0.3)  # square area as a fraction of the box area
    cfg.INPUT.SOCO.CUTOUT_PROB = 0.5  # per box
    # Proposals whose part inside a view is narrower or shorter than this (original-image pixels)
    # are not used for that view (the official code kept any positive overlap: 0).
    cfg.INPUT.SOCO.MIN_BOX_SIZE = 1.0
    # BYOL asymmetric colour augmentation: index 0 is V1, index 1 is V2/V3/V4.
    cfg.INPUT.SOCO.COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
    cfg.INPUT.SOCO.COLOR_JITTER_PROB = 0.8
    cfg.INPUT.SOCO.GRAYSCALE_PROB = 0.2
    cfg.INPUT.SOCO.BLUR_PROB = (1.0, 0.1)
    cfg.INPUT.SOCO.SOLARIZE_PROB = (0.0, 0.2)
    cfg.INPUT.SOCO.BLUR_SIGMA = (0.1, 2.0)  # Gaussian blur standard deviation range, pixels
