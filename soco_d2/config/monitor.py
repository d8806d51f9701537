"""Config keys of the representation monitors of a pretraining run (soco_d2/engine/monitors.py).

Both monitors are off by default; the demo and benchmark configs turn them on.
"""
from fvcore.common.config import CfgNode as CN


def add_monitor_config(cfg: CN) -> None:
    cfg.MONITOR = CN()
    # Weighted kNN probe (k nearest neighbours, cosine, weights exp(sim / T)) on a labelled image
    # folder, at iteration 0, every PERIOD iterations and at the end of the run.
    cfg.MONITOR.KNN = CN()
    cfg.MONITOR.KNN.ENABLED = False
    # One sub-folder per class (ImageNet layout). VAL_ROOT "" splits TRAIN_ROOT per class into
    # VAL_FRACTION validation images and the rest (deterministic, seeded by SPLIT_SEED).
    cfg.MONITOR.KNN.TRAIN_ROOT = ""
    cfg.MONITOR.KNN.VAL_ROOT = ""
    cfg.MONITOR.KNN.VAL_FRACTION = 0.5
    cfg.MONITOR.KNN.SPLIT_SEED = 0
    cfg.MONITOR.KNN.MAX_PER_CLASS = 0  # per side; 0 keeps every image
    cfg.MONITOR.KNN.PERIOD = 1000  # iterations; 0: at the start and the end only
    cfg.MONITOR.KNN.IMAGE_SIZE = 224  # centre crop after resizing the shorter side to SIZE / 0.875
    cfg.MONITOR.KNN.K = 20
    cfg.MONITOR.KNN.TEMPERATURE = 0.07
    cfg.MONITOR.KNN.BATCH_SIZE = 64  # images per forward pass of the probe (per process)
    # BN running statistics the probe uses: "weights" those the model carries; "train" recomputed
    # over the probe's training images before each probe (the model's own restored after), so that
    # every point of the curve, iteration 0 included, is probed with statistics of the same data.
    # A new network's statistics (mean 0, variance 1) make every BN an identity in evaluation:
    # with "weights" the iteration-0 probe measures another function than the later ones.
    cfg.MONITOR.KNN.BN_STATS = "weights"

    # Label-free health: RankMe (effective rank) and the per-dimension std of the L2-normalised
    # projector outputs over the last WINDOW rows (embeddings of boxes for SoCo, of images for
    # DetCo), every PERIOD iterations (0: every LOG_PERIOD); DetCo's chance level ln(Q + 1).
    cfg.MONITOR.HEALTH = CN()
    cfg.MONITOR.HEALTH.ENABLED = False
    cfg.MONITOR.HEALTH.PERIOD = 0
    cfg.MONITOR.HEALTH.WINDOW = 2048
    # Collapse warning when the std falls below this fraction of 1 / sqrt(dim), the std of
    # embeddings spread evenly over the sphere.
    cfg.MONITOR.HEALTH.COLLAPSE_STD_RATIO = 0.1
    # Dimensional-collapse warning when RankMe falls below this fraction of its highest value in
    # the run (0: off; a resumed run counts from its restart). SoCo runs whose RankMe fell to
    # 0.13-0.32 of its peak lost 4.6-7.5 box-head kNN points; those at 0.55-0.79 (the recipe's
    # 0.79) lost 1.1-2.0 (docs/notes/learning.md).
    cfg.MONITOR.HEALTH.RANK_DROP_RATIO = 0.4

    # OUTPUT_DIR/monitor_curves.png at the end of a run with a monitor on.
    cfg.MONITOR.PLOT = True
