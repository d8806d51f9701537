"""Default configuration shared by pretraining (SoCo, DetCo) and fine-tuning.

Every key a YAML file or a command-line override may set must exist here (or in one of the
``add_*_config`` functions called by :func:`get_cfg`); an unknown key is an error.
"""
from fvcore.common.config import CfgNode as CN

_C = CN()
_C.VERSION = 1

# ---------------------------------------------------------------------------------------------
# Model (common parts)
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.META_ARCHITECTURE = "SoCo"
_C.MODEL.DEVICE = "cuda"
# Initial weights: a detectron2 .pkl, a torchvision / soco_d2 .pth, or "" (random init).
_C.MODEL.WEIGHTS = ""
# Pixel statistics in RGB order on the 0-255 scale (torchvision's ImageNet statistics).
# Images travel as uint8 and are normalised on the model's device.
_C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
_C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]

_C.MODEL.RESNETS = CN()
_C.MODEL.RESNETS.DEPTH = 50  # 18, 34, 50, 101, 152
# "BN" becomes SyncBN automatically when the world size is > 1 (see engine.build).
_C.MODEL.RESNETS.NORM = "BN"
# Zero-initialise the last BN gamma of every residual block (as the official SoCo code).
_C.MODEL.RESNETS.ZERO_INIT_RESIDUAL = True

_C.MODEL.FPN = CN()
_C.MODEL.FPN.OUT_CHANNELS = 256
_C.MODEL.FPN.NORM = "BN"  # "" for no norm

_C.MODEL.ROI_BOX_HEAD = CN()
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 4
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 1
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
_C.MODEL.ROI_BOX_HEAD.NORM = "BN"
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
# 0 means adaptive sampling (torchvision's -1), as detectron2's ROIAlignV2 and the official code.
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0

# Pretraining on detectron2's modules (soco_d2.detectron2: D2SoCo, D2DetCo; needs detectron2).
# CONFIG_FILE: a detectron2-format file with the network (configs/detectron2/pretrain/*_d2arch.yaml;
# a relative path is looked up in the working directory, then in the soco_d2 checkout); "" builds
# the torchvision model. Keys present in both configs take this config's values (MODEL.SOCO,
# MODEL.DETCO, MODEL.RESNETS.DEPTH, MODEL.DEVICE, SOLVER.IMS_PER_BATCH...); OPTS are KEY VALUE
# overrides of the detectron2 config, applied last.
_C.MODEL.DETECTRON2 = CN()
_C.MODEL.DETECTRON2.CONFIG_FILE = ""
_C.MODEL.DETECTRON2.OPTS = []

# Target (momentum / EMA) network: m_k = 1 - (1 - BASE) * (cos(pi k / K) + 1) / 2 for "cosine".
_C.MODEL.EMA = CN()
_C.MODEL.EMA.BASE_MOMENTUM = 0.99
_C.MODEL.EMA.SCHEDULE = "cosine"  # "cosine" or "constant"

# ---------------------------------------------------------------------------------------------
# Input / augmentation (common parts; SoCo and DetCo views have their own sections)
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Name of the view mapper in soco_d2.data.MAPPER_REGISTRY used for pretraining.
_C.INPUT.MAPPER = "SoCoViewMapper"
# Images whose header declares more pixels are skipped as unreadable before decoding (a
# decompression bomb, or a scan too large to hold); 0: no limit besides the decoders' own.
_C.INPUT.MAX_IMAGE_PIXELS = 178_956_970

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.PRETRAIN = CN()
# A registered name (e.g. "imagenet_train", found under $SOCO_DATASETS) or "" to use IMAGE_ROOT.
_C.DATASETS.PRETRAIN.NAME = ""
# A folder tree, a plain folder, a text file listing image paths, or a COCO json.
_C.DATASETS.PRETRAIN.IMAGE_ROOT = ""
# A proposals file written by tools/generate_proposals.py. A method that trains on proposals
# (SoCo) refuses to start without one unless WHOLE_IMAGE_BOXES is True.
_C.DATASETS.PRETRAIN.PROPOSALS = ""
# True: with PROPOSALS empty, every image gets one whole-image box (image-level pretraining, not
# SoCo's objective). False (default): a SoCo run without a proposals file is refused.
_C.DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES = False
# Fail when more than this fraction of the images has no entry in the proposals file.
_C.DATASETS.PRETRAIN.MAX_MISSING_PROPOSALS = 0.05

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
# Loader workers hand batches over in shared memory (/dev/shm): about batch bytes x workers x 2
# (prefetch) x processes per machine. A container's default (Docker: 64 MB) is far less; the
# workers then die with a bus error. Checked before the first step: "error" stops with the
# bytes needed and the fix (--shm-size / --ipc=host), "warn" logs the same and trains, "off".
_C.DATALOADER.SHM_CHECK = "error"
# Stop the run when more than this fraction of the images read so far were unreadable.
_C.DATALOADER.MAX_BAD_IMAGE_FRACTION = 0.01
# ... checked once this many images (over all processes) have been read.
_C.DATALOADER.BAD_IMAGE_MIN_SAMPLES = 1000

# ---------------------------------------------------------------------------------------------
# Solver (pretraining)
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "LARS"  # "LARS" or "SGD"
# Linear scaling rule: lr = BASE_LR * IMS_PER_BATCH / BASE_LR_BATCH_SIZE.
_C.SOLVER.BASE_LR = 1.0
_C.SOLVER.BASE_LR_BATCH_SIZE = 256
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.WEIGHT_DECAY = 1e-5
# Parameters with one dimension (biases, norm weights) get no weight decay and no LARS scaling.
_C.SOLVER.EXCLUDE_BIAS_AND_NORM = True
_C.SOLVER.LARS_TRUST_COEF = 0.001
_C.SOLVER.LARS_EPS = 1e-8
# Schedule: linear warmup from WARMUP_FACTOR * lr over WARMUP_EPOCHS, then cosine to MIN_LR.
_C.SOLVER.LR_SCHEDULER = "WarmupCosine"
_C.SOLVER.EPOCHS = 100
_C.SOLVER.WARMUP_EPOCHS = 10
_C.SOLVER.WARMUP_FACTOR = 0.01
_C.SOLVER.MIN_LR = 1e-6
# Total images per optimizer step over all processes (and accumulation steps).
_C.SOLVER.IMS_PER_BATCH = 2048
# 0: derived from EPOCHS and the dataset size. Otherwise the schedule (warmup included, as a
# fraction WARMUP_EPOCHS / EPOCHS) is stretched over MAX_ITER iterations.
_C.SOLVER.MAX_ITER = 0
# Split each step into this many micro-batches (for small GPU counts). BN statistics are then
# computed over the micro-batch.
_C.SOLVER.GRAD_ACCUM_STEPS = 1
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Keep at most this many periodic checkpoints (0 keeps all).
_C.SOLVER.MAX_TO_KEEP = 3
_C.SOLVER.CLIP_GRAD_NORM = 0.0  # 0 disables
# A periodic checkpoint that cannot be written (disk full): "continue" training (the previous
# checkpoint stays the last one) or "stop". The final and preemption checkpoints always stop.
_C.SOLVER.ON_CHECKPOINT_ERROR = "continue"
# Hang watchdog: no finished step, evaluation batch or checkpoint for this many seconds dumps
# every thread's stack into the log and ends the run (exit code 3); 0 disables it. Longer than
# any step, kNN probe or checkpoint write of a healthy run (see docs/TRAINING.md).
_C.SOLVER.WATCHDOG_TIMEOUT = 1800

_C.SOLVER.AMP = CN()
_C.SOLVER.AMP.ENABLED = False
_C.SOLVER.AMP.DTYPE = "bfloat16"  # "bfloat16" or "float16" (with a gradient scaler)
# float16 only: a non-finite loss makes the gradient scaler skip that step and lower the loss
# scale (as apex O1 does), and training goes on; this many consecutive iterations with a
# non-finite loss stop the run. Without a scaler (fp32, bfloat16) the step of a non-finite loss
# was applied to the weights: the first one stops the run.
_C.SOLVER.AMP.MAX_CONSECUTIVE_NONFINITE = 8

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
_C.OUTPUT_DIR = "./output"
_C.SEED = 0
# cudnn.benchmark (GPU): pretraining's views have fixed sizes, so each algorithm is tuned once.
# Fine-tuning configs turn it off (configs/finetune/Base-Finetune.yaml): their input shapes vary.
_C.CUDNN_BENCHMARK = True
_C.CHANNELS_LAST = False
# Print a progress line (and write metrics) every this many iterations.
_C.LOG_PERIOD = 20
# On SIGTERM / SIGUSR1 the run saves a checkpoint and exits with code 75; with this, the main
# process also runs `scontrol requeue $SLURM_JOB_ID` first (docs/TRAINING.md).
_C.REQUEUE_ON_PREEMPTION = False

# ---------------------------------------------------------------------------------------------
# Weights & Biases (optional: pip install -e ".[wandb]"; docs/TRAINING.md)
# ---------------------------------------------------------------------------------------------
_C.WANDB = CN()
# Log the scalars of metrics.json / TensorBoard, the config and the monitor PNGs to W&B.
_C.WANDB.ENABLED = False
_C.WANDB.PROJECT = "soco_d2"
_C.WANDB.ENTITY = ""  # "" = the default entity of the W&B login
_C.WANDB.NAME = ""  # "" = the last folder of OUTPUT_DIR
_C.WANDB.GROUP = ""
_C.WANDB.TAGS = ()
# "online", or "offline" (written under OUTPUT_DIR/wandb, upload later with `wandb sync`).
_C.WANDB.MODE = "online"
