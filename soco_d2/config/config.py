"""Building, loading and validating configs."""
import difflib
import os
from typing import Callable, List

import yaml
from fvcore.common.config import CfgNode

from .defaults import _C
from .detco import add_detco_config
from .finetune import add_finetune_config, set_finetune_defaults
from .monitor import add_monitor_config
from .soco import add_soco_config


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type, bad value)."""


def get_cfg() -> CfgNode:
    """Return a fresh copy of the full default config (pretraining and fine-tuning keys), with
    pretraining's values of the keys both share (solver: LARS, warmup + cosine, batch 2048)."""
    cfg = _C.clone()
    add_soco_config(cfg)
    add_detco_config(cfg)
    add_finetune_config(cfg)
    add_monitor_config(cfg)
    return cfg


def get_finetune_cfg() -> CfgNode:
    """:func:`get_cfg` with fine-tuning's values of the shared keys (solver: SGD, warmup +
    steps, batch 16; see :func:`~soco_d2.config.finetune.set_finetune_defaults`): the defaults
    ``tools/train_net.py`` loads fine-tuning configs on."""
    cfg = get_cfg()
    set_finetune_defaults(cfg)
    return cfg


def load_config(config_file: str = "", overrides=(), freeze: bool = True,
                defaults: Callable[[], CfgNode] = get_cfg) -> CfgNode:
    """Load ``config_file`` (with ``_BASE_`` inheritance) and apply ``KEY VALUE`` overrides, on
    the config ``defaults()`` returns (:func:`get_finetune_cfg` for fine-tuning).

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the file or
    override and the key.
    """
    cfg = defaults()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"Config file {config_file!r} does not exist (check the path).")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"In config file {config_file!r}: {_explain(e)}") from None
    overrides = list(overrides)
    if overrides:
        if len(overrides) % 2:
            raise ConfigError(
                f"Overrides must come in KEY VALUE pairs; got an odd number: {overrides} "
                "(options such as --resume go before the KEY VALUE pairs)"
            )
        try:
            cfg.merge_from_list(overrides)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"In command-line overrides: {_explain(e)}") from None
    validate_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def validate_config(cfg: CfgNode) -> None:
    """Check values that a type check cannot catch."""
    s = cfg.SOLVER
    if s.IMS_PER_BATCH <= 0:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH must be positive, got {s.IMS_PER_BATCH}.")
    if s.GRAD_ACCUM_STEPS < 1:
        raise ConfigError(f"SOLVER.GRAD_ACCUM_STEPS must be >= 1, got {s.GRAD_ACCUM_STEPS}.")
    if s.AMP.DTYPE not in ("bfloat16", "float16"):
        raise ConfigError(f"SOLVER.AMP.DTYPE must be 'bfloat16' or 'float16', got {s.AMP.DTYPE!r}.")
    if s.ON_CHECKPOINT_ERROR not in ("continue", "stop"):
        raise ConfigError(
            f"SOLVER.ON_CHECKPOINT_ERROR must be 'continue' or 'stop', got {s.ON_CHECKPOINT_ERROR!r}."
        )
    if cfg.MODEL.EMA.SCHEDULE not in ("cosine", "constant"):
        raise ConfigError(
            f"MODEL.EMA.SCHEDULE must be 'cosine' or 'constant', got {cfg.MODEL.EMA.SCHEDULE!r}."
        )
    if cfg.MODEL.RESNETS.DEPTH not in (18, 34, 50, 101, 152):
        raise ConfigError(
            f"MODEL.RESNETS.DEPTH must be one of 18, 34, 50, 101, 152; got {cfg.MODEL.RESNETS.DEPTH}."
        )


def _all_keys(node: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        keys += _all_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [f"{prefix}{k}"]
    return keys


def _explain(e: Exception) -> str:
    msg = e.args[0] if e.args else str(e)
    msg = str(msg)
    if "Non-existent" in msg:
        key = msg.rsplit(":", 1)[-1].strip()
        close = difflib.get_close_matches(key, _all_keys(get_cfg()), n=3, cutoff=0.85)
        if close:
            msg += f" (no such key; did you mean {' or '.join(close)}?)"
        else:
            msg += " (no such key: see soco_d2/config/ for the valid keys, or check its spelling)"
    elif "Type mismatch" in msg:
        msg += " (give a value of the key's default type)"
    return msg


# Meta-architectures of detectron2's own META_ARCH_REGISTRY.
_DETECTRON2_META_ARCHS = ("GeneralizedRCNN", "RetinaNet", "ProposalNetwork", "SemanticSegmentor", "PanopticFPN")


def is_detectron2_config(config_file: str) -> bool:
    """Whether ``config_file`` is in detectron2's format (for detectron2's ``get_cfg``) rather
    than soco_d2's: it, or a file of its ``_BASE_`` chain, sets ``VERSION: 2`` (every detectron2
    config does; soco_d2's are version 1) or a ``MODEL.META_ARCHITECTURE`` of detectron2's.
    Reads the YAML only (detectron2 is not imported)."""
    seen = set()
    path = config_file
    while path and os.path.isfile(path) and path not in seen:
        seen.add(path)
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError:
                return False  # not ours either; loading it reports the problem
        if not isinstance(data, dict):
            return False
        if data.get("VERSION") == 2:
            return True
        if (data.get("MODEL") or {}).get("META_ARCHITECTURE") in _DETECTRON2_META_ARCHS:
            return True
        base = data.get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if isinstance(base, str) else None
    return False
