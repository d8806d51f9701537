"""soco_d2's keys for a detectron2 config, and detectron2 configs built from soco_d2's."""
import copy
import logging
import os
from typing import Sequence

from detectron2.config import CfgNode
from fvcore.common.config import CfgNode as _AnyCfgNode  # soco_d2's nodes and detectron2's

from soco_d2.config import ConfigError
from soco_d2.config import get_cfg as get_soco_cfg

logger = logging.getLogger(__name__)


def add_soco_d2_config(cfg: CfgNode) -> None:
    """Add the keys :class:`~soco_d2.detectron2.D2SoCo` and :class:`~soco_d2.detectron2.D2DetCo`
    read on top of detectron2's defaults, with soco_d2's defaults (one source of truth:
    ``soco_d2.config``):

    * ``MODEL.SOCO.*``: projector / predictor sizes, the scale-aware level assignment
      (``CANONICAL_BOX_SIZE`` 96, ``CANONICAL_LEVEL`` 4, ``LEVEL_ASSIGNMENT``) and ``HEAD_MODE``.
    * ``MODEL.DETCO.*``, ``INPUT.DETCO.*`` (DetCo reads ``GRID``) and
      ``SOLVER.GRAD_ACCUM_STEPS`` (with ``SOLVER.IMS_PER_BATCH``, the queue-size check).
    * ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``: zero gamma on the last norm of every residual block.
    * ``CHANNELS_LAST``: channels-last images (set it as the soco_d2 config's ``CHANNELS_LAST``).

    The architecture itself is set with detectron2's own keys; see
    ``configs/detectron2/pretrain/*_d2arch.yaml``.
    """
    defaults = get_soco_cfg()
    cfg.MODEL.SOCO = CfgNode(defaults.MODEL.SOCO)
    cfg.MODEL.DETCO = CfgNode(defaults.MODEL.DETCO)
    cfg.INPUT.DETCO = CfgNode(defaults.INPUT.DETCO)
    cfg.SOLVER.GRAD_ACCUM_STEPS = defaults.SOLVER.GRAD_ACCUM_STEPS
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = defaults.MODEL.RESNETS.ZERO_INIT_RESIDUAL
    cfg.CHANNELS_LAST = defaults.CHANNELS_LAST


def _checkout_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_config_path(path: str, key: str) -> str:
    """``path`` as given, or relative to the working directory, else to the soco_d2 checkout
    (where ``configs/`` lives); a :class:`ConfigError` naming ``key`` when neither exists."""
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(_checkout_root(), path)]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise ConfigError(f"{key} = {path!r}: no such file (looked at {', '.join(map(repr, candidates))}).")


def _unknown_key_message(e: Exception) -> str:
    msg = str(e.args[0] if e.args else e)
    if "Non-existent" in msg:
        msg += (" (not a key of detectron2's config, detectron2/config/defaults.py, nor of the "
                "keys soco_d2 adds: MODEL.SOCO, MODEL.DETCO, INPUT.DETCO, SOLVER.GRAD_ACCUM_STEPS, "
                "MODEL.RESNETS.ZERO_INIT_RESIDUAL, CHANNELS_LAST; check its spelling)")
    return msg


def merge_d2_config(cfg: CfgNode, config_file: str = "", opts: Sequence = (), what: str = "") -> CfgNode:
    """Merge a detectron2-format file and ``KEY VALUE`` overrides into ``cfg``; an unknown key
    or a bad value raises :class:`ConfigError` naming the file (or ``what``) and the key."""
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"In detectron2 config {config_file!r}{what}: {_unknown_key_message(e)}") from e
    opts = list(opts)
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"detectron2 overrides{what} must come in KEY VALUE pairs; got {opts}.")
        try:
            cfg.merge_from_list(opts)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"In detectron2 overrides{what}: {_unknown_key_message(e)}") from e
    return cfg


def _leaves(node: CfgNode, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, _AnyCfgNode):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _lookup(node, path: str):
    for part in path.split("."):
        if not isinstance(node, _AnyCfgNode) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()
# Keys that mean different things in the two configs.
_NOT_SHARED = ("VERSION", "MODEL.META_ARCHITECTURE", "MODEL.WEIGHTS")


def pretrain_d2_config(cfg) -> CfgNode:
    """The detectron2 config of a pretraining run on detectron2's modules, from the soco_d2
    config ``cfg`` with ``MODEL.DETECTRON2.CONFIG_FILE`` set.

    detectron2's defaults + :func:`add_soco_d2_config`, then the file, then every key present
    in both configs with ``cfg``'s value (the training config is the one source of the method's
    settings, ``MODEL.SOCO`` / ``MODEL.DETCO``, and of shared ones such as
    ``MODEL.RESNETS.DEPTH``, ``MODEL.DEVICE``, ``SOLVER.IMS_PER_BATCH``), then
    ``MODEL.DETECTRON2.OPTS``. The file's ``MODEL.META_ARCHITECTURE`` must be ``"D2"`` +
    ``cfg.MODEL.META_ARCHITECTURE`` (the data pipeline follows ``cfg``).
    """
    from detectron2.config import get_cfg as get_d2_cfg

    key = "MODEL.DETECTRON2.CONFIG_FILE"
    path = resolve_config_path(cfg.MODEL.DETECTRON2.CONFIG_FILE, key)
    d2 = get_d2_cfg()
    add_soco_d2_config(d2)
    merge_d2_config(d2, path, what=f" ({key})")
    expected = "D2" + cfg.MODEL.META_ARCHITECTURE
    if d2.MODEL.META_ARCHITECTURE != expected:
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r} (data and views follow it) "
            f"but {path} builds {d2.MODEL.META_ARCHITECTURE!r}; pair it with a detectron2 file "
            f"whose MODEL.META_ARCHITECTURE is {expected!r}."
        )
    changed = []
    for name, value in _leaves(d2):
        ours = _lookup(cfg, name)
        if name in _NOT_SHARED or ours is _MISSING or isinstance(ours, _AnyCfgNode):
            continue
        if ours != value:
            changed.append(f"{name} {value!r} -> {ours!r}")
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        (_lookup(d2, parent) if parent else d2)[leaf] = copy.deepcopy(ours)
    if changed:
        logger.info("detectron2 config %s, from the training config: %s", path, "; ".join(changed))
    merge_d2_config(d2, opts=cfg.MODEL.DETECTRON2.OPTS, what=" (MODEL.DETECTRON2.OPTS)")
    return d2
