"""Config keys of the DetCo meta-architecture and its view mapper."""
from fvcore.common.config import CfgNode as CN


def add_detco_config(cfg: CN) -> None:
    cfg.MODEL.DETCO = CN()
    cfg.INPUT.DETCO = CN()
