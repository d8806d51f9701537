"""Configuration: fvcore CfgNode with ``_BASE_`` inheritance and ``KEY VALUE`` overrides."""
from .config import ConfigError, get_cfg, get_finetune_cfg, is_detectron2_config, load_config

__all__ = ["ConfigError", "get_cfg", "get_finetune_cfg", "is_detectron2_config", "load_config"]
