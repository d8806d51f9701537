from .registry import MAPPER_REGISTRY, build_mapper
from . import soco_views  # noqa: F401  (registers SoCoViewMapper)
from . import detco_views  # noqa: F401  (registers DetCoViewMapper)

__all__ = ["MAPPER_REGISTRY", "build_mapper"]
