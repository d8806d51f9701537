"""Registry of pretraining meta-architectures."""
from typing import Callable, Optional

from fvcore.common.registry import Registry
from torch import nn

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """
Registry for pretraining meta-architectures (SoCo, DetCo): :class:`~.method.PretrainMethod`
subclasses, called as ``cls(cfg)``; ``forward(batch)`` returns a dict of scalar loss tensors.
"""

# The builder of the models on detectron2's modules, registered by the optional adapter
# (soco_d2.detectron2) when it is imported: the core never imports it.
_detectron2_builder: Optional[Callable[..., nn.Module]] = None


def register_detectron2_builder(builder: Callable[..., nn.Module]) -> None:
    """Let :func:`build_model` hand every config with ``MODEL.DETECTRON2.CONFIG_FILE`` to
    ``builder(cfg)`` (called by ``soco_d2.detectron2`` on import)."""
    global _detectron2_builder
    _detectron2_builder = builder


def build_model(cfg) -> nn.Module:
    """Build the meta-architecture named by ``cfg.MODEL.META_ARCHITECTURE`` (on CPU); with
    ``MODEL.DETECTRON2.CONFIG_FILE``, its detectron2-module version (``D2SoCo``, ``D2DetCo``),
    which needs ``import soco_d2.detectron2`` first (``tools/pretrain_net.py`` does it)."""
    if cfg.MODEL.DETECTRON2.CONFIG_FILE:
        if _detectron2_builder is None:
            raise ImportError(
                f"MODEL.DETECTRON2.CONFIG_FILE = {cfg.MODEL.DETECTRON2.CONFIG_FILE!r} asks for a model "
                "on detectron2's modules, which the optional adapter builds: `import soco_d2.detectron2` "
                "before building the model (tools/pretrain_net.py does). It needs detectron2, which is "
                "not on PyPI: see docs/DETECTRON2.md."
            )
        return _detectron2_builder(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError as e:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} is not registered; "
            f"known: {sorted(k for k, _ in META_ARCH_REGISTRY)}"
        ) from e
    return cls(cfg)
