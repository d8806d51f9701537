"""Config keys of detector fine-tuning (Mask R-CNN / RetinaNet) and COCO evaluation."""
from fvcore.common.config import CfgNode as CN


def add_finetune_config(cfg: CN) -> None:
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    cfg.TEST = CN()
