"""Config keys of the DetCo meta-architecture and its view mapper (see docs/DETCO.md)."""
from fvcore.common.config import CfgNode as CN


def add_detco_config(cfg: CN) -> None:
    cfg.MODEL.DETCO = CN()
    # Backbone stages that get a contrastive loss, and their loss weights (res2..res5 as the paper).
    cfg.MODEL.DETCO.LEVELS = ("res2", "res3", "res4", "res5")
    cfg.MODEL.DETCO.LEVEL_WEIGHTS = (0.1, 0.4, 0.7, 1.0)
    # Weights of the three terms inside a level: global-global, local-local, local-global.
    cfg.MODEL.DETCO.LOSS_WEIGHTS = (1.0, 1.0, 1.0)
    # Projection: 2-layer MLP (MoCo v2) to FEATURE_DIM; hidden width 0 = the level's channels.
    cfg.MODEL.DETCO.FEATURE_DIM = 128
    cfg.MODEL.DETCO.HEAD_HIDDEN_DIM = 0
    # How the 9 patch features of a set become one: "concat_shuffled" (concatenated in the order
    # the patches were shuffled into, as the paper and PIRL), "concat_grid" (in cell order, after
    # un-shuffling; ours) or "mean".
    cfg.MODEL.DETCO.LOCAL_COMBINE = "concat_shuffled"
    # Negatives per queue (one global and one local queue per level). Must be a multiple of the
    # keys enqueued per step, SOLVER.IMS_PER_BATCH / SOLVER.GRAD_ACCUM_STEPS.
    cfg.MODEL.DETCO.QUEUE_SIZE = 65536
    cfg.MODEL.DETCO.TEMPERATURE = 0.2
    # Key-encoder BN: "shuffle" (MoCo's shuffle-BN) or "sync" (SyncBN across processes).
    cfg.MODEL.DETCO.KEY_BN = "shuffle"
    # Shuffle-BN in a one-process run: both encoders' BN normalise this many sub-batches
    # separately and the key batch is shuffled across them (8: MoCo's 8 GPUs; 256 images per
    # step -> 32 per sub-batch as the paper). The images per step must be a multiple with at
    # least 2 per sub-batch, else a warning and no shuffle-BN; 1 turns it off.
    cfg.MODEL.DETCO.SHUFFLE_BN_SPLITS = 8

    cfg.INPUT.DETCO = CN()
    # Global views (MoCo v2 "aug+").
    cfg.INPUT.DETCO.GLOBAL_SIZE = 224
    cfg.INPUT.DETCO.GLOBAL_CROP_SCALE = (0.2, 1.0)
    cfg.INPUT.DETCO.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # Local patch sets (PIRL jigsaw): crop >= 60% of the image, resize to LOCAL_CROP_SIZE, split
    # into GRID x GRID cells, take a random PATCH_SIZE crop inside each cell, shuffle.
    cfg.INPUT.DETCO.LOCAL_CROP_SIZE = 255
    cfg.INPUT.DETCO.LOCAL_CROP_SCALE = (0.6, 1.0)
    cfg.INPUT.DETCO.GRID = 3
    cfg.INPUT.DETCO.PATCH_SIZE = 64
    # Colour of a patch set: "set" (one draw shared by the 9 patches, as the paper) or "patch"
    # (an independent draw per patch, as PIRL).
    cfg.INPUT.DETCO.LOCAL_COLOR = "set"
    # Colour / blur / flip (shared by global views and patch sets).
    cfg.INPUT.DETCO.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    cfg.INPUT.DETCO.COLOR_JITTER_PROB = 0.8
    cfg.INPUT.DETCO.GRAYSCALE_PROB = 0.2
    cfg.INPUT.DETCO.BLUR_PROB = 0.5
    cfg.INPUT.DETCO.BLUR_SIGMA = (0.1, 2.0)
    cfg.INPUT.DETCO.FLIP_PROB = 0.5
    # Extra policy on the global views (the "AA" models): "mocov2" (none), "randaugment" or
    # "autoaugment" (torchvision's ImageNet policy).
    cfg.INPUT.DETCO.AUGMENT = "mocov2"
    cfg.INPUT.DETCO.RANDAUGMENT_NUM_OPS = 2
    cfg.INPUT.DETCO.RANDAUGMENT_MAGNITUDE = 9
