"""The view-mapper contract: what the dataset and the views visualiser may ask of a method's mapper.

A view mapper (registered in :data:`~soco_d2.data.registry.MAPPER_REGISTRY`, built as
``cls(cfg)``) makes one training sample of one image (docs/ARCHITECTURE.md, "View mappers"):

* ``mapper(image, proposals, rng) -> dict`` (the dataset);
* :attr:`ViewMapper.uses_proposals`: whether it reads the proposals (the dataset refuses a run
  without a proposals file when it does; the visualiser computes them only then);
* :meth:`ViewMapper.view_sheet` and :attr:`ViewMapper.sheet_name`: the PNG sheet of what it makes
  of an image, and the prefix of the sheet's file name (:func:`~soco_d2.data.visualize.write_view_sheets`).
"""
from __future__ import annotations

import abc
from typing import Dict, Optional

import numpy as np

__all__ = ["ViewMapper"]


class ViewMapper(abc.ABC):
    """Base class of the view mappers (see the module docstring)."""

    #: Whether ``__call__`` reads its ``proposals`` argument.
    uses_proposals: bool = True
    #: Prefix of the sheets' file names (``<sheet_name>_views_<n>_<image>.png``).
    sheet_name: str = "views"

    @abc.abstractmethod
    def __call__(self, image: np.ndarray, proposals: Optional[np.ndarray], rng: np.random.Generator) -> Dict:
        """One training sample of the RGB uint8 ``image`` (H, W, 3); every random choice from ``rng``."""

    @abc.abstractmethod
    def view_sheet(self, image: np.ndarray, rng: np.random.Generator, panel: int = 224,
                   proposals: Optional[np.ndarray] = None, filtered: Optional[np.ndarray] = None) -> np.ndarray:
        """An RGB uint8 sheet of the views this mapper makes of ``image`` (random choices from
        ``rng``), panels about ``panel`` px. ``proposals`` (float32 (N, 4), the boxes the mapper
        gets) and ``filtered`` (the selective-search boxes the proposal filter dropped) are given
        when :attr:`uses_proposals`, else None."""
