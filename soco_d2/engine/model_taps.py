"""Where the monitors read a model (:mod:`soco_d2.engine.monitors`): the features the kNN probe
classifies, the module whose outputs are the embeddings the loss uses, and a window of that
module's recent outputs (a forward hook).

A :class:`~soco_d2.modeling.meta_arch.method.PretrainMethod` (SoCo, DetCo) is asked only through
its contract: ``normalize``, ``probe_features``, ``embedding_module``. Any other model can define
``probe_features(images) -> {name: (B, D)}`` (``images`` normalised with ``MODEL.PIXEL_MEAN`` /
``PIXEL_STD``) and a ``projector`` module.
"""
from __future__ import annotations

import collections
from typing import Callable, Dict

import torch
from torch import nn

from soco_d2.modeling.meta_arch.method import PretrainMethod
from soco_d2.utils.comm import unwrap

__all__ = ["probe_feature_fn", "embedding_module", "EmbeddingWindow"]


def probe_feature_fn(model: nn.Module, pixel_mean, pixel_std) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """``fn(uint8 images (B, 3, H, W)) -> {feature name: (B, D)}`` for the online network of
    ``model``: a :class:`~soco_d2.modeling.meta_arch.method.PretrainMethod`'s ``probe_features``
    of its ``normalize``; any other model's ``probe_features`` of images normalised with
    ``pixel_mean`` / ``pixel_std``."""
    m = unwrap(model)
    if isinstance(m, PretrainMethod):
        return lambda images: m.probe_features(m.normalize(images))
    channels_last = getattr(m, "channels_last", False)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        x = (images.float() - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if callable(getattr(m, "probe_features", None)):
        return lambda images: m.probe_features(normalize(images))
    raise ValueError(
        f"MONITOR.KNN: no probe features for a {type(m).__name__} model: it is no PretrainMethod "
        "(soco_d2.modeling.meta_arch.method) and has no probe_features(images) -> {name: (B, D)}; "
        "implement the method contract or turn MONITOR.KNN.ENABLED off.")


def embedding_module(model: nn.Module) -> nn.Module:
    """The module whose outputs are the embeddings the loss uses: a
    :class:`~soco_d2.modeling.meta_arch.method.PretrainMethod`'s ``embedding_module()``, else
    the last layer of the model's ``projector`` (so the hook fires however the model runs the
    projector: as a whole or layer by layer)."""
    m = unwrap(model)
    if isinstance(m, PretrainMethod):
        return m.embedding_module()
    proj = getattr(m, "projector", None)
    if proj is None:
        raise ValueError(
            f"MONITOR.HEALTH: a {type(m).__name__} model is no PretrainMethod "
            "(soco_d2.modeling.meta_arch.method) and has no 'projector' module; implement the "
            "method contract or turn MONITOR.HEALTH.ENABLED off.")
    leaves = [mod for mod in proj.modules() if not list(mod.children())]
    return leaves[-1] if leaves else proj


class EmbeddingWindow:
    """Keeps the last ``rows`` output rows of a module (forward hook, detached float32 copies on
    the module's device: a copy to the host per forward would wait for the GPU every step)."""

    def __init__(self, module: nn.Module, rows: int):
        self.rows = rows
        self.parts: collections.deque = collections.deque()
        self.count = 0
        self.dim = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        z = output.detach().reshape(-1, output.shape[-1])[-self.rows:].to(torch.float32, copy=True)
        self.dim = z.shape[1]
        self.parts.append(z)
        self.count += z.shape[0]
        while self.parts and self.count - self.parts[0].shape[0] >= self.rows:
            self.count -= self.parts.popleft().shape[0]

    def matrix(self) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(0, self.dim or 0)
        return torch.cat(list(self.parts))[-self.rows:]

    def close(self):
        self.handle.remove()
