"""Registry of pretraining view mappers."""
from fvcore.common.registry import Registry

MAPPER_REGISTRY = Registry("MAPPER")
MAPPER_REGISTRY.__doc__ = """
Registry for pretraining view mappers. A registered class is called as ``cls(cfg)``; calling the
instance as ``mapper(image, proposals, rng)`` returns one training sample (a dict of tensors).
"""


def build_mapper(cfg):
    name = cfg.INPUT.MAPPER
    try:
        cls = MAPPER_REGISTRY.get(name)
    except KeyError as e:
        raise KeyError(
            f"INPUT.MAPPER {name!r} is not registered; known: {sorted(k for k, _ in MAPPER_REGISTRY)}"
        ) from e
    return cls(cfg)
