"""The stitcher interface: what a tile keeps of its border, and how neighbours are matched.

A stitcher knows the tile grid and nothing of who runs the tiles. For every tile it says which
labels are numbered (the core, or the whole padded tile), what boundary data the tile keeps in
its record (:meth:`Stitcher.boundary`), and which local labels of two neighbouring tiles are the
same object (:meth:`Stitcher.match`). One rule holds for every mode: only objects that reach
their tile's core are matched. A halo-only object is a fragment cut by the padded edge, where
``fn`` saw too little context; linking through it could chain two distinct objects together,
and it never appears in the output anyway.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..tiling import Region, Tile, TileGrid

__all__ = ["Stitcher", "TileBoundary", "local_region", "no_pairs"]


def local_region(region: Region, origin: Region) -> Region:
    """``region`` in coordinates relative to ``origin``'s start."""
    return tuple(slice(r.start - o.start, r.stop - o.start)
                 for r, o in zip(region, origin, strict=True))


def no_pairs() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64)


@dataclass
class TileBoundary:
    """What one tile keeps for stitching: core voxel counts and boundary arrays.

    ``counts[l]`` is the number of voxels of local label ``l`` inside the tile's core
    (``counts[0]``: background); ``arrays`` are keyed ``"<axis>_<side>"`` (side 0: the low
    neighbour, 1: the high one), in the layout of the stitcher that made them.
    """

    counts: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def in_core(self) -> np.ndarray:
        """Per local label: whether it reaches the core (label 0 never does)."""
        inside = self.counts > 0
        inside[0] = False
        return inside


class Stitcher(ABC):
    """Matches the objects of neighbouring tiles; one subclass per stitching mode."""

    mode: str = ""
    #: Whether the tile's whole padded prediction is numbered (its halo objects are kept for
    #: matching), rather than only its core.
    numbers_padded: bool = False
    #: Whether each object is taken whole from one tile (``"whole"``): the Committer then
    #: assigns a tile after its later neighbours and writes it after all of them.
    whole_objects: bool = False

    def __init__(self, grid: TileGrid, *, connectivity: int = 1, iou_threshold: float = 0.5):
        self.grid = grid
        self.connectivity = connectivity
        self.iou_threshold = iou_threshold

    # -- what a tile keeps ---------------------------------------------------------------
    @abstractmethod
    def boundary_arrays(self, tile: Tile, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The boundary arrays of a tile, from its numbered labels (core or padded)."""

    # -- matching ------------------------------------------------------------------------
    @abstractmethod
    def offsets(self) -> list[tuple[int, ...]]:
        """Forward neighbour offsets this mode matches (first non-zero entry +1)."""

    def neighbours(self, tile: Tile, *, backward: bool) -> list[tuple[Tile, tuple[int, ...]]]:
        """The neighbours a tile is matched with, and the forward offset of each pair.

        ``backward``: the neighbours that come before the tile in grid order (the pair is
        ``(other, tile)``); else those after it (the pair is ``(tile, other)``).
        """
        sign = -1 if backward else 1
        found = []
        for off in self.offsets():
            j = self.grid.neighbour(tile.index, tuple(sign * o for o in off))
            if j is not None:
                other = self.grid.tile(j)
                if self._touches(tile, other):
                    found.append((other, off))
        return found

    def _touches(self, a: Tile, b: Tile) -> bool:
        return True

    def match(self, a: Tile, b: Tile, offset: tuple[int, ...], a_rec: TileBoundary,
              b_rec: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        """Local label pairs ``(la, lb)`` of tiles ``a`` and ``b`` that are one object.

        ``offset`` is ``b.index - a.index`` (see :meth:`TileGrid.forward_offsets`). Only
        objects that reach their tile's core are matched (see the module docstring).
        """
        la, lb = self._pairs(a, b, offset, a_rec, b_rec)
        keep = a_rec.in_core[la] & b_rec.in_core[lb]
        return la[keep], lb[keep]

    @abstractmethod
    def _pairs(self, a: Tile, b: Tile, offset: tuple[int, ...], a_rec: TileBoundary,
               b_rec: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        """Every pair the mode's rule links (before the core rule)."""

    @staticmethod
    def _sides(offset: tuple[int, ...]) -> tuple[str, str]:
        """The boundary arrays of ``a`` and ``b`` that face each other across ``offset``."""
        first = next(ax for ax, o in enumerate(offset) if o)
        return f"{first}_1", f"{first}_0"


class NoStitcher(Stitcher):
    """``stitch="none"``: every tile's objects stay distinct."""

    mode = "none"

    def boundary_arrays(self, tile: Tile, labels: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def offsets(self) -> list[tuple[int, ...]]:
        return []

    def _pairs(self, a: Tile, b: Tile, offset: tuple[int, ...], a_rec: TileBoundary,
               b_rec: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        return no_pairs()
