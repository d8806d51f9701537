"""Registry of pretraining meta-architectures."""
from fvcore.common.registry import Registry

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """
Registry for pretraining meta-architectures (SoCo, DetCo). A registered class is called as
``cls(cfg)`` and its ``forward(batch)`` returns a dict of scalar loss tensors.
"""


def build_model(cfg):
    """Build the meta-architecture named by ``cfg.MODEL.META_ARCHITECTURE`` (on CPU); with
    ``MODEL.DETECTRON2.CONFIG_FILE``, its detectron2-module version (``D2SoCo``, ``D2DetCo``)."""
    if cfg.MODEL.DETECTRON2.CONFIG_FILE:
        # Only this path needs detectron2; the import fails with the install instructions.
        from soco_d2.detectron2 import build_pretrain_model

        return build_pretrain_model(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError as e:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE {name!r} is not registered; "
            f"known: {sorted(k for k, _ in META_ARCH_REGISTRY)}"
        ) from e
    return cls(cfg)
