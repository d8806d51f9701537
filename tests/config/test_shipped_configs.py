"""Every value of a shipped config that a paper, the official code or a reference recipe fixes,
one row per value, each naming its source.

soco_d2 configs (configs/soco, configs/detco, configs/finetune, configs/demo) are read through
:func:`soco_d2.config.load_config` (``_BASE_`` chain, defaults, validation); the detectron2-format
files (configs/detectron2, for detectron2's own tools) through fvcore's ``_BASE_`` merge, with
tuple strings decoded as detectron2 does. A row lists the files it applies to; a deliberate
deviation from a source is not a row (it is documented where the key is defined).

Sources:
  official X   hologerry/SoCo @2be1229 file X (the tools/*.sh flags override contrast/option.py)
  MoCo v2      facebookresearch/moco main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos
  detectron2   detectron2 v0.6 config/defaults.py and configs/Base-RCNN-FPN.yaml, Base-RetinaNet.yaml
"""
import ast
import glob
import math
import os
from functools import lru_cache

import pytest
from fvcore.common.config import CfgNode

from soco_d2.config import is_detectron2_config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ------------------------------------------------------------------------------------ files
SOCO_100 = "configs/soco/soco_fpn_r50_100ep.yaml"
SOCO_400 = "configs/soco/soco_fpn_r50_400ep.yaml"
SOCO_STAR = "configs/soco/soco_star_fpn_r50_400ep.yaml"
# soco_d2-format configs that pretrain on detectron2's modules (configs/detectron2/pretrain)
D2_SOCO_100 = "configs/detectron2/pretrain/soco_fpn_r50_100ep.yaml"
D2_DETCO_200 = "configs/detectron2/pretrain/detco_r50_200ep.yaml"
SOCO_FPN = ("configs/soco/Base-SoCo-FPN.yaml", SOCO_100, SOCO_400, D2_SOCO_100)
SOCO = SOCO_FPN + (SOCO_STAR,)
SOCO_DEMO = "configs/demo/soco_demo.yaml"
BENCH_SOCO = "configs/benchmark/soco_r18_learning_cpu.yaml"
BENCH_DETCO = "configs/benchmark/detco_r18_learning_cpu.yaml"

DETCO_200 = "configs/detco/detco_r50_200ep.yaml"
DETCO_AA = "configs/detco/detco_r50_200ep_aa.yaml"
DETCO_800 = "configs/detco/detco_r50_800ep.yaml"
DETCO = (DETCO_200, DETCO_AA, DETCO_800, D2_DETCO_200)

FT_BASE = "configs/finetune/Base-Finetune.yaml"
FT_1X = "configs/finetune/mask_rcnn_R50_FPN_1x.yaml"
FT_2X = "configs/finetune/mask_rcnn_R50_FPN_2x.yaml"
FT_RETINA = "configs/finetune/retinanet_R50_FPN_1x.yaml"
FT_PENNFUDAN = "configs/finetune/mask_rcnn_R18_FPN_pennfudan_cpu.yaml"
FT_COCO = (FT_BASE, FT_1X, FT_2X, FT_RETINA)
FT_MASK = (FT_BASE, FT_1X, FT_2X)
FT_ALL = FT_COCO + (FT_PENNFUDAN,)
DEMO_FT = "configs/demo/mask_rcnn_demo.yaml"

D2_1X = "configs/detectron2/mask_rcnn_R50_FPN_1x.yaml"
D2_2X = "configs/detectron2/mask_rcnn_R50_FPN_2x.yaml"
D2_C4 = "configs/detectron2/mask_rcnn_R50_C4_1x.yaml"
D2_RETINA = "configs/detectron2/retinanet_R50_FPN_1x.yaml"
D2_BASE = "configs/detectron2/Base-RCNN-FPN-SoCo.yaml"
D2_ARCH = "configs/detectron2/pretrain/soco_fpn_r50_d2arch.yaml"
D2_DETCO_ARCH = "configs/detectron2/pretrain/detco_r50_d2arch.yaml"
D2_DETCO_FPN = "configs/detectron2/mask_rcnn_R50_FPN_1x_detco.yaml"
DETCO_RECIPE = "DetCo README COCO 1x rows (MoCo detection recipe, soco_d2.evaluation.reported_ap)"
D2_FT = (D2_1X, D2_2X, D2_C4, D2_RETINA)
D2_SOCO_FPN = (D2_1X, D2_2X)

# ------------------------------------------------------------------------------------ sources
FPN_SH = "official tools/SoCo_FPN_{100,400}ep.sh, SoCo_FPN_Star_400ep.sh"
TRANSFORM = "official contrast/data/transform.py get_transform"
OPTION = "official contrast/option.py default (not overridden by tools/*.sh)"
TORCHVISION_STATS = "official transform.py Normalize(0.485/0.456/0.406, 0.229/0.224/0.225) x 255"
SOCO_D2_CFG = "official detectron2_configs/SoCo_FPN_*.yaml"
SOCO_C4_CFG = "official detectron2_configs/SoCo_C4_*.yaml (MoCo Base-RCNN-C4-BN)"
MOCO_V2 = "MoCo v2 recipe, which DetCo trains with"
MOCO_AUG = "MoCo v2 aug+ (moco main_moco.py), DetCo's global views"
PIRL = "DetCo's local patches: PIRL jigsaw (VISSL img_pil_to_patches_and_image)"
D2 = "detectron2 v0.6 defaults"
D2_FPN_BASE = "detectron2 configs/Base-RCNN-FPN.yaml"
D2_1X_SCHED = "detectron2 1x schedule (90k iterations, steps 60k / 80k, batch 16, lr 0.02)"
D2_2X_SCHED = "detectron2 2x schedule (180k iterations, steps 120k / 160k)"
D2_RETINA_BASE = "detectron2 configs/Base-RetinaNet.yaml"
STATS = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]

# (files, key, expected value, source)
ROWS = [
    # ---------------------------------------------------------------- SoCo pretraining: model
    (SOCO, "MODEL.META_ARCHITECTURE", "SoCo", FPN_SH + " --model SoCo_FPN[_Star]"),
    (SOCO, "MODEL.PIXEL_MEAN", STATS[0], TORCHVISION_STATS),
    (SOCO, "MODEL.PIXEL_STD", STATS[1], TORCHVISION_STATS),
    (SOCO, "MODEL.RESNETS.DEPTH", 50, FPN_SH + " --arch resnet50"),
    (SOCO, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", True, "official contrast/resnet.py: zero gamma of bn3"),
    (SOCO, "MODEL.FPN.OUT_CHANNELS", 256, OPTION + " --out_channels 256"),
    (SOCO, "MODEL.FPN.NORM", "BN", "official contrast/models/fpn.py norm_cfg BN (SyncBN)"),
    (SOCO + (D2_ARCH,), "MODEL.SOCO.HEAD_MODE", "faithful",
     "official contrast/models/SoCo_FPN.py forward: head / projector / predictor called per view, box set and level"),
    (SOCO + (D2_ARCH,), "MODEL.SOCO.LEVEL_ASSIGNMENT", "official",
     "official contrast/data/bboxs_utils.py assign_bboxs_to_feature_map, option.py --aware_range 48 96 192 224"),
    (SOCO, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "official fast_rcnn_conv_fc_head.py: 4 convs"),
    (SOCO, "MODEL.ROI_BOX_HEAD.CONV_DIM", 256, "official fast_rcnn_conv_fc_head.py: 256 channels"),
    (SOCO, "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "official fast_rcnn_conv_fc_head.py: 1 fc"),
    (SOCO, "MODEL.ROI_BOX_HEAD.FC_DIM", 1024, "official fast_rcnn_conv_fc_head.py: fc 12544 -> 1024"),
    (SOCO, "MODEL.ROI_BOX_HEAD.NORM", "BN", "official fast_rcnn_conv_fc_head.py: BN after each conv"),
    (SOCO, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, FPN_SH + " --output_size 7"),
    (SOCO, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 0, "official roi_align sampling_ratio -1 (adaptive)"),
    (SOCO, "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 4096, "official contrast/models/mlps.py: 1024 -> 4096 -> 256"),
    (SOCO, "MODEL.SOCO.PROJECTOR_OUT_DIM", 256, "official contrast/models/mlps.py: 1024 -> 4096 -> 256"),
    (SOCO, "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 4096, "official contrast/models/mlps.py: 256 -> 4096 -> 256"),
    (SOCO, "MODEL.EMA.BASE_MOMENTUM", 0.99, FPN_SH + " --contrast_momentum 0.99"),
    (SOCO, "MODEL.EMA.SCHEDULE", "cosine", "official SoCo_FPN.py _momentum_update: 1 - (1 - m)(cos(pi k/K) + 1)/2"),
    # ---------------------------------------------------------------- SoCo pretraining: views
    (SOCO, "INPUT.MAPPER", "SoCoViewMapper", FPN_SH + " --aug ImageAsymBboxAware* dataset classes"),
    (SOCO, "INPUT.SOCO.VIEW1_SIZE", 224, OPTION + " --image_size 224 (WholeImageResizedParams)"),
    (SOCO, "INPUT.SOCO.VIEW2_SIZE", 224, OPTION + " --image_size 224 (RandomResizedCropParams)"),
    (SOCO_FPN, "INPUT.SOCO.VIEW3_SIZE", 112, TRANSFORM + ": V3 crop at image_size // 2"),
    (SOCO_FPN, "INPUT.SOCO.VIEW4_SIZE", 0, TRANSFORM + ": ...Jitter1[Cutout] have no V4"),
    ((SOCO_STAR,), "INPUT.SOCO.VIEW3_SIZE", 192, "official tools/SoCo_FPN_Star_400ep.sh --image3_size 192"),
    ((SOCO_STAR,), "INPUT.SOCO.VIEW4_SIZE", 112, "official tools/SoCo_FPN_Star_400ep.sh --image4_size 112"),
    (SOCO, "INPUT.SOCO.V3_MODE", "independent", TRANSFORM + ": V3 is its own RandomResizedCropParams"),
    (SOCO, "INPUT.SOCO.CROP_SCALE", (0.5, 1.0), FPN_SH + " --crop 0.5"),
    (SOCO, "INPUT.SOCO.CROP_RATIO", (3 / 4, 4 / 3), "official transform_ops.RandomResizedCropParams ratio"),
    (SOCO, "INPUT.SOCO.NUM_PROPOSALS", 4, FPN_SH + " --select_k 4 --padding_k 4"),
    (SOCO, "INPUT.SOCO.MAX_TRIES", 5, OPTION + " --max_tries 5"),
    (SOCO, "INPUT.SOCO.JITTER_PROB", 0.5, FPN_SH + " --jitter_prob 0.5"),
    (SOCO, "INPUT.SOCO.JITTER_RATIO", 0.1, FPN_SH + " --jitter_ratio 0.1"),
    (SOCO, "INPUT.SOCO.FLIP_PROB", 0.5, "official transform_ops.RandomHorizontalFlipImageBbox p=0.5"),
    ((SOCO_100,), "INPUT.SOCO.CUTOUT", True, "official tools/SoCo_FPN_100ep.sh --aug ...Jitter1Cutout"),
    ((SOCO_400,), "INPUT.SOCO.CUTOUT", False, "official tools/SoCo_FPN_400ep.sh --aug ...Jitter1 (no cutout)"),
    ((SOCO_STAR,), "INPUT.SOCO.CUTOUT", False, "official tools/SoCo_FPN_Star_400ep.sh --aug ...ExtraJitter1"),
    (SOCO, "INPUT.SOCO.CUTOUT_RATIO", (0.1, 0.3), FPN_SH + " --cutout_ratio_min 0.1 --cutout_ratio_max 0.3"),
    (SOCO, "INPUT.SOCO.CUTOUT_PROB", 0.5, FPN_SH + " --cutout_prob 0.5"),
    (SOCO, "INPUT.SOCO.COLOR_JITTER", (0.4, 0.4, 0.2, 0.1), TRANSFORM + ": ColorJitter(0.4, 0.4, 0.2, 0.1)"),
    (SOCO, "INPUT.SOCO.COLOR_JITTER_PROB", 0.8, TRANSFORM + ": RandomApply(ColorJitter, p=0.8)"),
    (SOCO, "INPUT.SOCO.GRAYSCALE_PROB", 0.2, TRANSFORM + ": RandomGrayscale(p=0.2)"),
    (SOCO, "INPUT.SOCO.BLUR_PROB", (1.0, 0.1), TRANSFORM + ": blur p 1.0 (post_1), 0.1 (post_2)"),
    (SOCO, "INPUT.SOCO.BLUR_SIGMA", (0.1, 2.0), "official transform.py GaussianBlur sigma U(0.1, 2.0)"),
    (SOCO, "INPUT.SOCO.SOLARIZE_PROB", (0.0, 0.2), TRANSFORM + ": solarize p 0 (post_1), 0.2 (post_2)"),
    # ---------------------------------------------------------------- SoCo pretraining: solver
    (SOCO, "SOLVER.OPTIMIZER", "LARS", FPN_SH + " --optimizer lars"),
    (SOCO, "SOLVER.BASE_LR", 1.0, FPN_SH + " --base_lr 1.0"),
    (SOCO, "SOLVER.BASE_LR_BATCH_SIZE", 256, "official main_pretrain.py: lr = batch * world / 256 * base_lr"),
    (SOCO, "SOLVER.IMS_PER_BATCH", 2048, "official runs: 16 GPUs x --batch_size 128 (official issue #16)"),
    (SOCO, "SOLVER.MOMENTUM", 0.9, OPTION + " --momentum 0.9"),
    (SOCO, "SOLVER.NESTEROV", False, "official contrast/lars.py wraps SGD without Nesterov"),
    (SOCO, "SOLVER.WEIGHT_DECAY", 1e-5, FPN_SH + " --weight_decay 1e-5"),
    (SOCO, "SOLVER.EXCLUDE_BIAS_AND_NORM", True, "official contrast/lars.py add_weight_decay: 1-D params"),
    (SOCO, "SOLVER.LARS_TRUST_COEF", 0.001, "official contrast/lars.py trust_coefficient 0.001"),
    (SOCO, "SOLVER.LARS_EPS", 1e-8, "official contrast/lars.py eps 1e-8"),
    (SOCO, "SOLVER.LR_SCHEDULER", "WarmupCosine", "official contrast/lr_scheduler.py warmup + cosine"),
    (SOCO, "SOLVER.WARMUP_EPOCHS", 10, FPN_SH + " warmup=10"),
    (SOCO, "SOLVER.WARMUP_FACTOR", 0.01, OPTION + " --warmup_multiplier 100"),
    (SOCO, "SOLVER.MIN_LR", 1e-6, "official contrast/lr_scheduler.py eta_min 1e-6"),
    ((SOCO_100,), "SOLVER.EPOCHS", 100, "official tools/SoCo_FPN_100ep.sh epochs=100"),
    ((SOCO_400,), "SOLVER.EPOCHS", 400, "official tools/SoCo_FPN_400ep.sh epochs=400"),
    ((SOCO_STAR,), "SOLVER.EPOCHS", 400, "official tools/SoCo_FPN_Star_400ep.sh epochs=400"),
    (SOCO, "SOLVER.AMP.ENABLED", True, FPN_SH + " --amp_opt_level O1"),
    (SOCO, "SOLVER.AMP.DTYPE", "float16", FPN_SH + " --amp_opt_level O1 (fp16, dynamic loss scale)"),
    # The CPU demo keeps the recipe's views logic but not its sizes; it inherits these.
    ((SOCO_DEMO,), "MODEL.EMA.BASE_MOMENTUM", 0.99, FPN_SH + " --contrast_momentum 0.99"),
    ((SOCO_DEMO,), "INPUT.SOCO.NUM_PROPOSALS", 4, FPN_SH + " --select_k 4 --padding_k 4"),
    ((SOCO_DEMO,), "SOLVER.BASE_LR", 1.0, FPN_SH + " --base_lr 1.0"),
    # The CPU learning benchmark (benchmarks/bench_learning.py) keeps the recipe, not the sizes.
    ((BENCH_SOCO,), "SOLVER.OPTIMIZER", "LARS", FPN_SH + " --optimizer lars"),
    ((BENCH_SOCO,), "SOLVER.BASE_LR", 1.0, FPN_SH + " --base_lr 1.0"),
    ((BENCH_SOCO,), "SOLVER.BASE_LR_BATCH_SIZE", 256, "official main_pretrain.py: lr = batch * world / 256 * base_lr"),
    ((BENCH_SOCO,), "SOLVER.WARMUP_EPOCHS", 10, FPN_SH + " warmup=10"),
    ((BENCH_SOCO,), "MODEL.EMA.BASE_MOMENTUM", 0.99, FPN_SH + " --contrast_momentum 0.99"),
    ((BENCH_SOCO,), "INPUT.SOCO.NUM_PROPOSALS", 4, FPN_SH + " --select_k 4 --padding_k 4"),
    ((BENCH_DETCO,), "SOLVER.OPTIMIZER", "SGD", MOCO_V2 + ": SGD"),
    ((BENCH_DETCO,), "SOLVER.BASE_LR", 0.03, MOCO_V2 + ": lr 0.03 at batch 256"),
    ((BENCH_DETCO,), "SOLVER.BASE_LR_BATCH_SIZE", 256, MOCO_V2 + ": lr 0.03 at batch 256"),
    ((BENCH_DETCO,), "SOLVER.WARMUP_EPOCHS", 0, MOCO_V2 + ": no warmup"),
    ((BENCH_DETCO,), "MODEL.DETCO.TEMPERATURE", 0.2, MOCO_V2 + ": temperature 0.2"),
    ((BENCH_DETCO,), "MODEL.EMA.BASE_MOMENTUM", 0.999, MOCO_V2 + ": key encoder momentum 0.999"),
    ((BENCH_DETCO,), "MODEL.DETCO.LEVEL_WEIGHTS", (0.1, 0.4, 0.7, 1.0),
     "DetCo paper level weights (res2..res5), as shuuchen/DetCo.pytorch main_detco.py"),
    # ---------------------------------------------------------------- DetCo pretraining
    (DETCO, "MODEL.META_ARCHITECTURE", "DetCo", "DetCo paper (Xie et al., ICCV 2021)"),
    (DETCO, "MODEL.RESNETS.DEPTH", 50, "DetCo README: released R50 models"),
    (DETCO, "MODEL.DETCO.LEVELS", ("res2", "res3", "res4", "res5"), "DetCo paper Fig. 2: 4 stages supervised"),
    (DETCO, "MODEL.DETCO.LEVEL_WEIGHTS", (0.1, 0.4, 0.7, 1.0),
     "DetCo paper level weights (res2..res5), as shuuchen/DetCo.pytorch main_detco.py"),
    (DETCO, "MODEL.DETCO.FEATURE_DIM", 128, MOCO_V2 + ": 128-d projection"),
    (DETCO, "MODEL.DETCO.QUEUE_SIZE", 65536, MOCO_V2 + ": 65536 negatives per queue"),
    (DETCO, "MODEL.DETCO.TEMPERATURE", 0.2, MOCO_V2 + ": temperature 0.2"),
    (DETCO, "MODEL.DETCO.LOCAL_COMBINE", "concat_shuffled",
     "DetCo paper Sec. 3: the shuffled patches' features concatenated (both unofficial versions)"),
    (DETCO, "MODEL.DETCO.KEY_BN", "shuffle", MOCO_V2 + ": shuffle-BN of the key encoder"),
    (DETCO, "MODEL.DETCO.SHUFFLE_BN_SPLITS", 8,
     MOCO_V2 + ": per-GPU BN over 32 images, 8 GPUs (one process: 8 sub-batches of 32)"),
    (DETCO, "MODEL.EMA.BASE_MOMENTUM", 0.999, MOCO_V2 + ": key encoder momentum 0.999"),
    (DETCO, "MODEL.EMA.SCHEDULE", "constant", MOCO_V2 + ": constant momentum"),
    (DETCO, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", False, "MoCo v2: torchvision ResNet-50 init"),
    (DETCO, "INPUT.MAPPER", "DetCoViewMapper", "DetCo paper Fig. 2: global views and local patches"),
    (DETCO, "INPUT.DETCO.GLOBAL_SIZE", 224, MOCO_AUG + ": RandomResizedCrop(224)"),
    (DETCO, "INPUT.DETCO.GLOBAL_CROP_SCALE", (0.2, 1.0), MOCO_AUG + ": scale (0.2, 1.0)"),
    (DETCO, "INPUT.DETCO.CROP_RATIO", (3 / 4, 4 / 3), "torchvision RandomResizedCrop ratio default"),
    (DETCO, "INPUT.DETCO.COLOR_JITTER", (0.4, 0.4, 0.4, 0.1), MOCO_AUG + ": ColorJitter(0.4, 0.4, 0.4, 0.1)"),
    (DETCO, "INPUT.DETCO.COLOR_JITTER_PROB", 0.8, MOCO_AUG + ": p=0.8"),
    (DETCO, "INPUT.DETCO.GRAYSCALE_PROB", 0.2, MOCO_AUG + ": RandomGrayscale(p=0.2)"),
    (DETCO, "INPUT.DETCO.BLUR_PROB", 0.5, MOCO_AUG + ": GaussianBlur p=0.5"),
    (DETCO, "INPUT.DETCO.BLUR_SIGMA", (0.1, 2.0), MOCO_AUG + ": GaussianBlur sigma [0.1, 2.0]"),
    (DETCO, "INPUT.DETCO.FLIP_PROB", 0.5, MOCO_AUG + ": RandomHorizontalFlip"),
    (DETCO, "INPUT.DETCO.LOCAL_CROP_SIZE", 255, PIRL + ": crop resized to 255"),
    (DETCO, "INPUT.DETCO.LOCAL_CROP_SCALE", (0.6, 1.0), PIRL + ": crop scale (0.6, 1.0)"),
    (DETCO, "INPUT.DETCO.GRID", 3, PIRL + ": 3 x 3 patches"),
    (DETCO, "INPUT.DETCO.PATCH_SIZE", 64, PIRL + ": 64 px patch in each 85 px cell"),
    ((DETCO_200, DETCO_800), "INPUT.DETCO.AUGMENT", "mocov2", MOCO_AUG),
    ((DETCO_AA,), "INPUT.DETCO.AUGMENT", "randaugment", "DetCo paper Sec. 3.4 (RandAugment) for the AA model"),
    (DETCO, "SOLVER.OPTIMIZER", "SGD", MOCO_V2 + ": SGD"),
    (DETCO, "SOLVER.BASE_LR", 0.03, MOCO_V2 + ": lr 0.03 at batch 256"),
    (DETCO, "SOLVER.BASE_LR_BATCH_SIZE", 256, MOCO_V2 + ": lr 0.03 at batch 256"),
    (DETCO, "SOLVER.IMS_PER_BATCH", 256, MOCO_V2 + ": batch 256 (8 GPUs x 32)"),
    (DETCO, "SOLVER.MOMENTUM", 0.9, MOCO_V2 + ": momentum 0.9"),
    (DETCO, "SOLVER.WEIGHT_DECAY", 1e-4, MOCO_V2 + ": weight decay 1e-4"),
    (DETCO, "SOLVER.EXCLUDE_BIAS_AND_NORM", False, MOCO_V2 + ": decay on every parameter"),
    (DETCO, "SOLVER.LR_SCHEDULER", "WarmupCosine", MOCO_V2 + ": --cos"),
    (DETCO, "SOLVER.WARMUP_EPOCHS", 0, MOCO_V2 + ": no warmup"),
    (DETCO, "SOLVER.MIN_LR", 0.0, MOCO_V2 + ": cosine to 0"),
    ((DETCO_200, DETCO_AA), "SOLVER.EPOCHS", 200, "DetCo README: DetCo-200ep, DetCo-200ep-AA"),
    ((DETCO_800,), "SOLVER.EPOCHS", 800, "DetCo paper VOC table: DetCo-800ep"),
    # ---------------------------------------------------------------- fine-tuning (soco_d2 format)
    (FT_ALL + (DEMO_FT,), "MODEL.PIXEL_MEAN", STATS[0], SOCO_D2_CFG + " PIXEL_MEAN (RGB)"),
    (FT_ALL + (DEMO_FT,), "MODEL.PIXEL_STD", STATS[1], SOCO_D2_CFG + " PIXEL_STD (RGB)"),
    (FT_ALL + (DEMO_FT,), "MODEL.BACKBONE.FREEZE_AT", 0, SOCO_D2_CFG + " BACKBONE.FREEZE_AT 0"),
    (FT_ALL + (DEMO_FT,), "CUDNN_BENCHMARK", False,
     D2 + " CUDNN_BENCHMARK False (multi-scale training: input shapes vary with each batch)"),
    (FT_COCO, "MODEL.RESNETS.DEPTH", 50, SOCO_D2_CFG + " RESNETS.DEPTH 50"),
    (FT_COCO, "MODEL.RESNETS.NORM", "BN", SOCO_D2_CFG + " SyncBN (BN becomes SyncBN with > 1 process)"),
    (FT_COCO, "MODEL.FPN.NORM", "BN", SOCO_D2_CFG + " FPN.NORM SyncBN"),
    (FT_MASK, "MODEL.MASK_ON", True, SOCO_D2_CFG + " MASK_ON"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, SOCO_D2_CFG + " 4conv1fc box head"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.NUM_FC", 1, SOCO_D2_CFG + " 4conv1fc box head"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.CONV_DIM", 256, D2 + " ROI_BOX_HEAD.CONV_DIM"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.FC_DIM", 1024, D2 + " ROI_BOX_HEAD.FC_DIM"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.NORM", "BN", SOCO_D2_CFG + " ROI_BOX_HEAD.NORM SyncBN"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, D2_FPN_BASE + " box pooler 7"),
    (FT_MASK, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 0, D2 + " POOLER_SAMPLING_RATIO 0"),
    (FT_MASK, "MODEL.ROI_MASK_HEAD.NUM_CONV", 4, D2_FPN_BASE + " mask head 4 convs"),
    ((FT_1X, FT_2X), "MODEL.RPN.NUM_CONV", 1, D2 + ": StandardRPNHead, one 3x3 conv (RPN.CONV_DIMS [-1])"),
    ((FT_1X, FT_2X, FT_RETINA), "MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS", False,
     D2 + ": DefaultAnchorGenerator cell anchors are not rounded"),
    ((FT_1X, FT_2X, FT_RETINA), "MODEL.ANCHOR_GENERATOR.STRIDE_FROM_IMAGE_SIZE", False,
     D2 + ": DefaultAnchorGenerator spaces anchors by the feature's stride"),
    ((FT_1X, FT_2X), "MODEL.RPN.SMOOTH_L1_BETA", 0.0, D2 + ": RPN.SMOOTH_L1_BETA 0.0"),
    ((FT_1X, FT_2X), "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.0, D2 + ": ROI_BOX_HEAD.SMOOTH_L1_BETA 0.0"),
    ((FT_1X, FT_2X), "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2", D2 + ": ROI_BOX_HEAD.POOLER_TYPE ROIAlignV2"),
    ((FT_1X, FT_2X), "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlignV2", D2 + ": ROI_MASK_HEAD.POOLER_TYPE ROIAlignV2"),
    (FT_MASK, "MODEL.ROI_MASK_HEAD.CONV_DIM", 256, D2 + " ROI_MASK_HEAD.CONV_DIM"),
    (FT_MASK, "MODEL.ROI_MASK_HEAD.NORM", "BN", SOCO_D2_CFG + " ROI_MASK_HEAD.NORM SyncBN"),
    (FT_MASK, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, D2_FPN_BASE + " mask pooler 14"),
    (FT_COCO, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 2000, D2_FPN_BASE),
    (FT_COCO, "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000, D2_FPN_BASE),
    (FT_COCO, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000, D2_FPN_BASE),
    (FT_COCO, "MODEL.RPN.POST_NMS_TOPK_TEST", 1000, D2_FPN_BASE),
    (FT_COCO, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512, D2),
    (FT_COCO, "MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.25, D2),
    (FT_COCO, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05, D2),
    (FT_COCO, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5, D2),
    (FT_COCO, "MODEL.NUM_CLASSES", 80, "COCO 2017: 80 classes"),
    (FT_COCO, "DATASETS.TRAIN", ("coco_2017_train",), SOCO_D2_CFG + " via R_50_FPN_1x"),
    (FT_COCO, "DATASETS.TEST", ("coco_2017_val",), SOCO_D2_CFG + " via R_50_FPN_1x"),
    (FT_COCO, "INPUT.MIN_SIZE_TRAIN", (640, 672, 704, 736, 768, 800), SOCO_D2_CFG + " multi-scale train"),
    (FT_COCO, "INPUT.MAX_SIZE_TRAIN", 1333, D2),
    (FT_COCO, "INPUT.MIN_SIZE_TEST", 800, D2),
    (FT_COCO, "INPUT.MAX_SIZE_TEST", 1333, D2),
    (FT_COCO, "INPUT.RANDOM_FLIP", "horizontal", D2),
    (FT_COCO, "SOLVER.OPTIMIZER", "SGD", D2),
    (FT_COCO, "SOLVER.LR_SCHEDULER", "WarmupMultiStep", D2),
    (FT_COCO, "SOLVER.IMS_PER_BATCH", 16, D2_1X_SCHED),
    (FT_MASK, "SOLVER.BASE_LR", 0.02, D2_1X_SCHED),
    (FT_COCO, "SOLVER.MOMENTUM", 0.9, D2),
    (FT_COCO, "SOLVER.NESTEROV", False, D2),
    (FT_MASK, "SOLVER.WEIGHT_DECAY", 2.5e-5, SOCO_D2_CFG + " SOLVER.WEIGHT_DECAY 0.000025"),
    (FT_COCO, "SOLVER.WEIGHT_DECAY_NORM", 0.0, D2),
    (FT_COCO, "SOLVER.WARMUP_METHOD", "linear", D2),
    (FT_COCO, "SOLVER.WARMUP_ITERS", 1000, D2),
    (FT_COCO, "SOLVER.WARMUP_FACTOR", 0.001, D2),
    (FT_COCO, "SOLVER.GAMMA", 0.1, D2),
    ((FT_BASE, FT_1X, FT_RETINA), "SOLVER.STEPS", (60000, 80000), D2_1X_SCHED),
    ((FT_BASE, FT_1X, FT_RETINA), "SOLVER.MAX_ITER", 90000, D2_1X_SCHED),
    ((FT_2X,), "SOLVER.STEPS", (120000, 160000), D2_2X_SCHED),
    ((FT_2X,), "SOLVER.MAX_ITER", 180000, D2_2X_SCHED),
    (FT_COCO, "TEST.DETECTIONS_PER_IMAGE", 100, D2),
    (FT_COCO, "TEST.PRECISE_BN.ENABLED", True, SOCO_D2_CFG + " TEST.PRECISE_BN.ENABLED"),
    (FT_COCO, "TEST.PRECISE_BN.NUM_ITER", 200, D2),
    ((FT_RETINA,), "MODEL.DETECTOR", "retinanet", D2_RETINA_BASE),
    ((FT_RETINA,), "MODEL.MASK_ON", False, D2_RETINA_BASE),
    ((FT_RETINA,), "SOLVER.BASE_LR", 0.01, D2_RETINA_BASE + " BASE_LR 0.01"),
    ((FT_RETINA,), "SOLVER.WEIGHT_DECAY", 1e-4, "DetCo coco_R_50_RetinaNet_1x_moco.yaml (detectron2 default)"),
    ((FT_RETINA,), "MODEL.RETINANET.SCORE_THRESH_TEST", 0.05, D2),
    ((FT_RETINA,), "MODEL.RETINANET.NMS_THRESH_TEST", 0.5, D2),
    ((FT_RETINA,), "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 1000, D2),
    ((FT_RETINA,), "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0, D2_RETINA_BASE),
    ((FT_RETINA,), "MODEL.RETINANET.LOSS_NORMALIZER", "ema",
     "detectron2 RetinaNet.losses: normalizer = DenseDetector._ema_update(num_pos_anchors, 100)"),
    ((FT_RETINA,), "MODEL.RETINANET.NMS_ON_CLIPPED_BOXES", False,
     "detectron2 RetinaNet.inference_single_image: NMS, then detector_postprocess clips"),
    # ---------------------------------------------------------------- detectron2-format files
    (D2_FT + (D2_BASE,), "MODEL.PIXEL_MEAN", STATS[0], SOCO_D2_CFG + " PIXEL_MEAN (RGB)"),
    (D2_FT + (D2_BASE,), "MODEL.PIXEL_STD", STATS[1], SOCO_D2_CFG + " PIXEL_STD (RGB)"),
    (D2_FT + (D2_BASE,), "INPUT.FORMAT", "RGB", SOCO_D2_CFG + " INPUT.FORMAT RGB"),
    (D2_FT + (D2_BASE,), "MODEL.RESNETS.STRIDE_IN_1X1", False, SOCO_D2_CFG + " STRIDE_IN_1X1 False"),
    (D2_FT + (D2_BASE,), "MODEL.BACKBONE.FREEZE_AT", 0, SOCO_D2_CFG + " FREEZE_AT 0"),
    (D2_FT + (D2_BASE,), "MODEL.RESNETS.NORM", "SyncBN", SOCO_D2_CFG + " RESNETS.NORM SyncBN"),
    (D2_FT + (D2_BASE,), "TEST.PRECISE_BN.ENABLED", True, SOCO_D2_CFG + " PRECISE_BN"),
    (D2_FT, "SOLVER.IMS_PER_BATCH", 16, D2_1X_SCHED),
    (D2_FT, "INPUT.MIN_SIZE_TRAIN", (640, 672, 704, 736, 768, 800), SOCO_D2_CFG + " multi-scale train"),
    (D2_FT, "DATASETS.TRAIN", ("coco_2017_train",), SOCO_D2_CFG),
    (D2_SOCO_FPN, "MODEL.MASK_ON", True, SOCO_D2_CFG + " MASK_ON"),
    (D2_SOCO_FPN, "MODEL.FPN.NORM", "SyncBN", SOCO_D2_CFG + " FPN.NORM SyncBN"),
    (D2_SOCO_FPN, "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", SOCO_D2_CFG),
    (D2_SOCO_FPN, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, SOCO_D2_CFG + " 4conv1fc"),
    (D2_SOCO_FPN, "MODEL.ROI_BOX_HEAD.NUM_FC", 1, SOCO_D2_CFG + " 4conv1fc"),
    (D2_SOCO_FPN, "MODEL.ROI_BOX_HEAD.NORM", "SyncBN", SOCO_D2_CFG + " ROI_BOX_HEAD.NORM SyncBN"),
    (D2_SOCO_FPN, "MODEL.ROI_MASK_HEAD.NORM", "SyncBN", SOCO_D2_CFG + " ROI_MASK_HEAD.NORM SyncBN"),
    (D2_SOCO_FPN + (D2_C4,), "SOLVER.WEIGHT_DECAY", 2.5e-5, SOCO_D2_CFG + " SOLVER.WEIGHT_DECAY 0.000025"),
    (D2_SOCO_FPN, "SOLVER.BASE_LR", 0.02, D2_1X_SCHED),
    ((D2_1X, D2_C4), "SOLVER.STEPS", (60000, 80000), D2_1X_SCHED),
    ((D2_1X, D2_C4), "SOLVER.MAX_ITER", 90000, D2_1X_SCHED),
    ((D2_2X,), "SOLVER.STEPS", (120000, 160000), D2_2X_SCHED),
    ((D2_2X,), "SOLVER.MAX_ITER", 180000, D2_2X_SCHED),
    ((D2_C4,), "MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm", SOCO_C4_CFG),
    ((D2_C4,), "MODEL.RPN.PRE_NMS_TOPK_TEST", 6000, SOCO_C4_CFG),
    ((D2_C4,), "MODEL.RPN.POST_NMS_TOPK_TEST", 1000, SOCO_C4_CFG),
    ((D2_RETINA,), "MODEL.META_ARCHITECTURE", "RetinaNet", D2_RETINA_BASE),
    ((D2_RETINA,), "SOLVER.BASE_LR", 0.01, D2_RETINA_BASE + " BASE_LR 0.01"),
    ((D2_RETINA,), "SOLVER.WEIGHT_DECAY", 1e-4, "DetCo coco_R_50_RetinaNet_1x_moco.yaml (detectron2 default)"),
    ((D2_RETINA,), "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0, D2_RETINA_BASE),
    ((D2_ARCH,), "MODEL.PIXEL_MEAN", STATS[0], TORCHVISION_STATS),
    ((D2_ARCH,), "MODEL.PIXEL_STD", STATS[1], TORCHVISION_STATS),
    ((D2_ARCH,), "MODEL.RESNETS.DEPTH", 50, FPN_SH + " --arch resnet50"),
    ((D2_ARCH,), "MODEL.RESNETS.STRIDE_IN_1X1", False, "official contrast/resnet.py: stride in the 3x3 conv"),
    ((D2_ARCH,), "MODEL.RESNETS.ZERO_INIT_RESIDUAL", True, "official contrast/resnet.py: zero gamma of bn3"),
    ((D2_ARCH,), "MODEL.FPN.OUT_CHANNELS", 256, OPTION + " --out_channels 256"),
    ((D2_ARCH,), "MODEL.FPN.NORM", "BN", "official contrast/models/fpn.py norm_cfg BN (SyncBN)"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "official fast_rcnn_conv_fc_head.py: 4 convs"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.CONV_DIM", 256, "official fast_rcnn_conv_fc_head.py: 256 channels"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "official fast_rcnn_conv_fc_head.py: 1 fc"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.FC_DIM", 1024, "official fast_rcnn_conv_fc_head.py: fc 12544 -> 1024"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.NORM", "BN", "official fast_rcnn_conv_fc_head.py: BN after each conv"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, FPN_SH + " --output_size 7"),
    ((D2_ARCH,), "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2", FPN_SH + " --aligned (roi_align aligned=True)"),
    ((D2_DETCO_FPN,), "MODEL.ROI_BOX_HEAD.NUM_CONV", 0, DETCO_RECIPE + ": 2fc box head"),
    ((D2_DETCO_FPN,), "MODEL.ROI_BOX_HEAD.NUM_FC", 2, DETCO_RECIPE + ": 2fc box head"),
    ((D2_DETCO_FPN,), "MODEL.ROI_BOX_HEAD.NORM", "", DETCO_RECIPE + ": box head without norm"),
    ((D2_DETCO_FPN,), "MODEL.ROI_MASK_HEAD.NORM", "", DETCO_RECIPE + ": mask head without norm"),
    ((D2_DETCO_FPN,), "MODEL.RESNETS.NORM", "SyncBN", DETCO_RECIPE + ": SyncBN in the backbone"),
    ((D2_DETCO_FPN,), "MODEL.FPN.NORM", "SyncBN", DETCO_RECIPE + ": SyncBN in the FPN"),
    ((D2_DETCO_FPN,), "SOLVER.WEIGHT_DECAY", 1e-4, DETCO_RECIPE + ": weight decay 1e-4"),
    ((D2_DETCO_FPN,), "SOLVER.MAX_ITER", 90000, D2_1X_SCHED),
    ((D2_DETCO_ARCH,), "MODEL.META_ARCHITECTURE", "D2DetCo", "DetCo paper (Xie et al., ICCV 2021)"),
    ((D2_DETCO_ARCH,), "MODEL.PIXEL_MEAN", STATS[0], TORCHVISION_STATS),
    ((D2_DETCO_ARCH,), "MODEL.PIXEL_STD", STATS[1], TORCHVISION_STATS),
    ((D2_DETCO_ARCH,), "MODEL.RESNETS.DEPTH", 50, "DetCo README: released R50 models"),
    ((D2_DETCO_ARCH,), "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
     "DetCo paper Fig. 2: 4 stages supervised"),
    ((D2_DETCO_ARCH,), "MODEL.RESNETS.STRIDE_IN_1X1", False, "MoCo v2: torchvision ResNet-50 (stride in the 3x3 conv)"),
    ((D2_DETCO_ARCH,), "MODEL.RESNETS.ZERO_INIT_RESIDUAL", False, "MoCo v2: torchvision ResNet-50 init"),
]


def _shipped_files():
    pattern = [os.path.join(REPO, "configs", "*", "*.yaml"), os.path.join(REPO, "configs", "*", "*", "*.yaml")]
    return sorted(os.path.relpath(p, REPO) for pat in pattern for p in glob.glob(pat))


def _decode(value):
    # detectron2 (yacs) reads strings such as "(60000, 80000)" as Python literals.
    if isinstance(value, str) and value.startswith(("(", "[")):
        return ast.literal_eval(value)
    return value


@lru_cache(maxsize=None)
def _load(rel_path):
    path = os.path.join(REPO, rel_path)
    if is_detectron2_config(path):
        return CfgNode(CfgNode.load_yaml_with_base(path, allow_unsafe=False))
    return load_config(path)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise KeyError(f"no key {key!r} (missing {part!r})")
        node = node[part]
    return _decode(node)


def _same(got, expected):
    if isinstance(expected, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(expected) and all(
            _same(g, e) for g, e in zip(got, expected)
        )
    if isinstance(expected, bool) or isinstance(got, bool):
        return got is expected
    if isinstance(expected, float):
        return isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-9, abs_tol=0.0)
    return type(got) is type(expected) and got == expected


def check_row(cfg, path, key, expected, source):
    got = _get(cfg, key)
    assert _same(got, expected), f"{path}: {key} = {got!r}, but {source} fixes {expected!r}"


CASES = [(path, key, value, source) for files, key, value, source in ROWS for path in files]


@pytest.mark.parametrize(
    "path, key, expected, source", CASES, ids=[f"{os.path.basename(c[0])}:{c[1]}" for c in CASES]
)
def test_shipped_value_matches_its_source(path, key, expected, source):
    check_row(_load(path), path, key, expected, source)


def test_every_shipped_config_is_pinned():
    covered = {path for files, *_ in ROWS for path in files}
    missing = set(_shipped_files()) - covered
    assert not missing, f"shipped configs without rows: {sorted(missing)}"
    assert covered <= set(_shipped_files()), sorted(covered - set(_shipped_files()))


def test_rows_are_unique_and_name_a_source():
    seen = set()
    for path, key, _, source in CASES:
        assert (path, key) not in seen, f"two rows pin {key} in {path}"
        seen.add((path, key))
        assert source.strip(), (path, key)


def test_a_changed_value_is_reported_with_its_source():
    cfg = load_config(os.path.join(REPO, SOCO_100), ["SOLVER.AMP.DTYPE", "bfloat16", "INPUT.SOCO.MAX_TRIES", "3"])
    rows = {key: (value, source) for files, key, value, source in ROWS if SOCO_100 in files}
    for key in ("SOLVER.AMP.DTYPE", "INPUT.SOCO.MAX_TRIES"):
        with pytest.raises(AssertionError, match="amp_opt_level O1|max_tries 5"):
            check_row(cfg, SOCO_100, key, *rows[key])
    # Type and tolerance: an int is not a bool, a tuple entry off by 1e-6 is a change.
    assert not _same(1, True) and not _same((0.5, 1.0 + 1e-6), (0.5, 1.0)) and _same([0.5, 1.0], (0.5, 1.0))
