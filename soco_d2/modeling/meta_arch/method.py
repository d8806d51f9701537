"""The method contract: what the engine, the monitors and the tools may ask of a pretraining model.

A pretraining method (SoCo, DetCo, ...) is a :class:`PretrainMethod`, registered in
``META_ARCH_REGISTRY`` and built as ``cls(cfg)``. Nothing outside the method reads its
attributes; everything goes through these members:

=======================  =============================================================================
member                   used by
=======================  =============================================================================
``forward(batch)``       the trainer: a dict of scalar tensors; keys ``loss*`` are summed and
                         back-propagated, the others are logged
``normalize(images)``    the method itself and the kNN probe: uint8 (..., 3, H, W) -> normalised float
                         on the model's device
``momentum_pairs()``     ``momentum_update(m)`` (the trainer, once per iteration): the (online, target)
                         module pairs moved by EMA, ``target = m target + (1 - m) online``
``probe_features(x)``    the kNN probe: ``{name: (B, D)}`` from normalised images ``x``
``embedding_module()``   the health monitor: the module whose outputs are the embeddings the loss uses
``chance_level``         the health monitor: the loss of a term at chance (``None``: not reported)
``sync_batchnorm``       the trainer: ``False`` keeps every BN per process (MoCo's shuffle-BN)
=======================  =============================================================================

Conversion (``tools/convert_to_d2.py``) reads the saved state dict by key layout
(:mod:`soco_d2.checkpoint.layout`): a method's ResNet is exported when it carries torchvision
(``conv1``, ``layer1.0.conv1``) or detectron2 (``stem``, ``res2``) names under any prefix, and its
target network is told apart by a ``target*`` / ``momentum*`` / ``*_k`` prefix component.
How a method's views look is its view mapper's job (:class:`soco_d2.data.view_mapper.ViewMapper`).
docs/ARCHITECTURE.md, "Adding a method", lists the files a new method touches.
"""
from __future__ import annotations

import abc
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ema import momentum_update

__all__ = ["PretrainMethod"]


class PretrainMethod(nn.Module, abc.ABC):
    """Base class of the pretraining methods (see the module docstring). Subclasses implement
    ``forward``, :meth:`normalize`, :meth:`momentum_pairs`, :meth:`probe_features` and
    :meth:`embedding_module`; :attr:`chance_level` and :attr:`sync_batchnorm` have defaults."""

    #: ``False``: the trainer keeps every BN layer per process (no SyncBN conversion).
    sync_batchnorm: bool = True

    @abc.abstractmethod
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0-255 float) images ``(..., 3, H, W)`` -> normalised float on the model's device."""

    @abc.abstractmethod
    def momentum_pairs(self) -> Sequence[Tuple[nn.Module, nn.Module]]:
        """The ``(online, target)`` module pairs that :meth:`momentum_update` moves (same structure)."""

    @abc.abstractmethod
    def probe_features(self, images: Tensor) -> Dict[str, Tensor]:
        """``{feature name: (B, D)}`` of the online network for normalised images ``(B, 3, H, W)``
        (the kNN probe; the model is in eval mode, under no_grad)."""

    @abc.abstractmethod
    def embedding_module(self) -> nn.Module:
        """The module whose forward outputs (rows ``(..., D)``) are the embeddings the loss uses;
        the health monitor hooks it."""

    @property
    def chance_level(self) -> Optional[float]:
        """The value of one loss term at chance, drawn beside the losses; ``None`` if it has none."""
        return None

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """``target = m * target + (1 - m) * online`` for every parameter of :meth:`momentum_pairs`
        (one fused update; buffers are not averaged)."""
        pairs: List[Tuple[nn.Module, nn.Module]] = list(self.momentum_pairs())
        momentum_update([o for o, _ in pairs], [t for _, t in pairs], m)
