from .build import META_ARCH_REGISTRY, build_model
from . import soco  # noqa: F401 (registers SoCo)
from . import detco  # noqa: F401 (registers DetCo)

__all__ = ["META_ARCH_REGISTRY", "build_model"]
