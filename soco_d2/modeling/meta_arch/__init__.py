from .build import META_ARCH_REGISTRY, build_model, register_detectron2_builder
from . import soco  # noqa: F401 (registers SoCo)
from . import detco  # noqa: F401 (registers DetCo)

from .method import PretrainMethod

__all__ = ["META_ARCH_REGISTRY", "PretrainMethod", "build_model", "register_detectron2_builder"]
