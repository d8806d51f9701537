"""Config keys of detector fine-tuning (Mask R-CNN / RetinaNet) and COCO evaluation, and the
fine-tuning values of the keys it shares with pretraining.

Names follow detectron2's where detectron2 has the key, so a detectron2 fine-tuning recipe reads
the same here. ``defaults.py`` holds pretraining's values of the shared keys (LARS, cosine,
batch 2048); :func:`set_finetune_defaults` replaces them with fine-tuning's (SGD, warmup and
steps, batch 16), which :func:`~soco_d2.config.get_finetune_cfg` starts from.
"""
from fvcore.common.config import CfgNode as CN


def add_finetune_config(cfg: CN) -> None:
    # ------------------------------------------------------------------------------------------
    # Datasets: names registered in soco_d2.finetune.coco_data (coco_2017_train, ...).
    # ------------------------------------------------------------------------------------------
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    # Drop training images without any usable (non-crowd, non-degenerate) annotation, as
    # detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS. False keeps them as negative images.
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    # Images named by a dataset json but absent on disk are an error; True skips them (logged).
    cfg.DATALOADER.SKIP_MISSING_IMAGES = False

    # ------------------------------------------------------------------------------------------
    # Input: resizing is done by the detector (torchvision's GeneralizedRCNNTransform), which
    # picks the short side at random from MIN_SIZE_TRAIN for every training image.
    # ------------------------------------------------------------------------------------------
    cfg.INPUT.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.RANDOM_FLIP = "horizontal"  # "horizontal" or "none"

    # ------------------------------------------------------------------------------------------
    # Detector
    # ------------------------------------------------------------------------------------------
    cfg.MODEL.DETECTOR = "mask_rcnn"  # "mask_rcnn" | "retinanet"
    cfg.MODEL.NUM_CLASSES = 80  # foreground classes
    cfg.MODEL.MASK_ON = True  # Mask R-CNN only
    cfg.MODEL.BACKBONE = CN()
    # detectron2's meaning: 0 trains every layer (the SoCo/MoCo recipes), 1 freezes the stem,
    # k freezes the stem and res2..res(k). Frozen layers get requires_grad=False.
    cfg.MODEL.BACKBONE.FREEZE_AT = 0

    # Anchors: sizes and aspect ratios as detectron2's Base-RCNN-FPN / Base-RetinaNet. Two
    # choices, True is torchvision's, False detectron2's (the reproduction configs select both):
    # ROUND_CELL_ANCHORS: torchvision rounds the cell anchors to whole pixels (a 32 px, ratio 0.5
    #   anchor is 46 x 22; detectron2: 45.25 x 22.63), truncates RetinaNet's octave sizes
    #   (40, 50, 80, 101, ...; detectron2: 40.32, 50.80, ...) and lists a level's anchors
    #   ratio-major (detectron2: size-major, which fixes the meaning of RetinaNet's head outputs).
    # STRIDE_FROM_IMAGE_SIZE: torchvision spaces a level's anchors by padded image size // feature
    #   size, which is not the level's stride where the padded image is no multiple of it (P6 of
    #   an 800 x 1344 input: 61 px apart instead of 64); detectron2 uses the stride.
    cfg.MODEL.ANCHOR_GENERATOR = CN()
    cfg.MODEL.ANCHOR_GENERATOR.ROUND_CELL_ANCHORS = True
    cfg.MODEL.ANCHOR_GENERATOR.STRIDE_FROM_IMAGE_SIZE = True

    cfg.MODEL.RPN = CN()
    cfg.MODEL.RPN.NUM_CONV = 2  # torchvision's v2 RPN head (detectron2's has 1)
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000  # per FPN level
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000  # per image
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    # Box losses: smooth L1 with this beta, 0 an L1 loss (detectron2's defaults are 0;
    # torchvision fixes 1/9 for the RPN and the RoI box head).
    cfg.MODEL.RPN.SMOOTH_L1_BETA = 1.0 / 9

    cfg.MODEL.ROI_HEADS = CN()
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5

    # The box head uses MODEL.ROI_BOX_HEAD (shared with SoCo's pretraining head: 4conv1fc, BN).
    # RoIAlign of the box and mask heads: "ROIAlign" (torchvision's MultiScaleRoIAlign,
    # aligned=False) or "ROIAlignV2" (aligned=True: the half-pixel shift, detectron2's default).
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlign"
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 1.0 / 9  # see MODEL.RPN.SMOOTH_L1_BETA
    cfg.MODEL.ROI_MASK_HEAD = CN()
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlign"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
    cfg.MODEL.ROI_MASK_HEAD.NORM = "BN"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14

    cfg.MODEL.RETINANET = CN()
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.RETINANET.NMS_THRESH_TEST = 0.5
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 1000
    # Box loss: smooth L1 with this beta, 0 an L1 loss (torchvision's; detectron2's
    # Base-RetinaNet sets 0 too, its default is 0.1).
    cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA = 0.0
    # "per_image" (torchvision): each image's focal and box losses are divided by its own number
    # of foreground anchors, then averaged over the images. "ema" (detectron2): the batch's
    # losses are divided by an EMA (momentum 0.9, starting at 100) of the batch's number of
    # foreground anchors, kept per process and not saved in checkpoints.
    cfg.MODEL.RETINANET.LOSS_NORMALIZER = "per_image"
    # True (torchvision): decoded boxes are clipped to the image, then NMS runs. False
    # (detectron2): NMS on the decoded boxes, then the kept boxes are clipped and empty ones dropped.
    cfg.MODEL.RETINANET.NMS_ON_CLIPPED_BOXES = True

    # ------------------------------------------------------------------------------------------
    # Solver (fine-tuning). Shared keys reused: OPTIMIZER ("SGD"), BASE_LR, BASE_LR_BATCH_SIZE
    # (lr = BASE_LR * IMS_PER_BATCH / BASE_LR_BATCH_SIZE), IMS_PER_BATCH, MAX_ITER, MOMENTUM,
    # NESTEROV, WEIGHT_DECAY, WARMUP_FACTOR, CHECKPOINT_PERIOD, MAX_TO_KEEP, CLIP_GRAD_NORM, AMP.
    # ------------------------------------------------------------------------------------------
    # LR decay points for LR_SCHEDULER "WarmupMultiStep". A value >= 1 is an iteration (as in
    # detectron2: 60000, 80000 of 90000); a value in (0, 1) is a fraction of MAX_ITER, so a
    # shortened run keeps its shape: (0.6667, 0.8889) = 60k/80k of 90k = 120k/160k of 180k.
    cfg.SOLVER.STEPS = (60000, 80000)
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.WARMUP_METHOD = "linear"  # "linear" or "constant"
    # Weight decay of normalisation-layer parameters (detectron2's WEIGHT_DECAY_NORM); every
    # other parameter, biases included, gets SOLVER.WEIGHT_DECAY.
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0

    # ------------------------------------------------------------------------------------------
    # Test / evaluation
    # ------------------------------------------------------------------------------------------
    cfg.TEST = CN()
    # Evaluate every this many iterations (0: only at the end of training).
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.TEST.IMS_PER_BATCH = 1  # images per process at inference
    # "pycocotools", or "faster_coco_eval" (pip install -e ".[faster-coco-eval]"): the same AP,
    # computed faster (BENCHMARKS.md, COCO evaluation).
    cfg.TEST.COCO_EVAL_BACKEND = "pycocotools"
    # Re-estimate BN statistics on NUM_ITER training batches before each evaluation
    # (fvcore's precise BN), as the SoCo / MoCo fine-tuning recipes do.
    cfg.TEST.PRECISE_BN = CN()
    cfg.TEST.PRECISE_BN.ENABLED = False
    cfg.TEST.PRECISE_BN.NUM_ITER = 200


def set_finetune_defaults(cfg: CN) -> None:
    """Fine-tuning's defaults of the keys shared with pretraining: detectron2's 1x COCO recipe
    (SGD, lr 0.02 at batch 16 with linear scaling, 1000 warmup iterations from 0.001 of it,
    steps at 60k / 80k of 90k, weight decay 1e-4) and no cuDNN autotuning (the input shapes vary
    from batch to batch). Pretraining-only keys (LARS_*, EPOCHS, MIN_LR, MODEL.EMA) are unused."""
    s = cfg.SOLVER
    s.OPTIMIZER = "SGD"
    s.LR_SCHEDULER = "WarmupMultiStep"
    s.BASE_LR = 0.02
    s.BASE_LR_BATCH_SIZE = 16
    s.IMS_PER_BATCH = 16
    s.MAX_ITER = 90000
    s.WEIGHT_DECAY = 1e-4
    s.WARMUP_FACTOR = 0.001
    cfg.CUDNN_BENCHMARK = False
