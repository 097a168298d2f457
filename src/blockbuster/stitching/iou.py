"""``stitch="iou"``: objects predicted alike in the overlap of two tiles are one object.

Needs a halo. Neighbouring tiles (diagonals included) both predicted the region where their
padded regions overlap; objects whose predictions there have an IoU above ``iou_threshold``
(0.5: one-to-one) are the same object. Each tile numbers its whole padded prediction and keeps
the slab its neighbour across each side also reads. Each voxel keeps the label of the tile
whose core holds it.
"""

from __future__ import annotations

import numpy as np

from ..tiling import Tile
from .base import Stitcher, TileBoundary, local_region, no_pairs

__all__ = ["IouStitcher", "match_iou"]


def match_iou(va: np.ndarray, vb: np.ndarray, threshold: float,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs of two co-registered label arrays whose IoU (over them) exceeds ``threshold``.

    Examples
    --------
    >>> a = np.array([1, 1, 1, 2, 2, 0])
    >>> b = np.array([5, 5, 0, 0, 3, 3])
    >>> match_iou(a, b, 0.5)
    (array([1]), array([5]))
    """
    va = va.ravel().astype(np.int64)
    vb = vb.ravel().astype(np.int64)
    both = (va > 0) & (vb > 0)
    if not both.any():
        return no_pairs()
    size_a = np.bincount(va)
    size_b = np.bincount(vb)
    key = va[both] * len(size_b) + vb[both]
    keys, inter = np.unique(key, return_counts=True)
    la, lb = np.divmod(keys, len(size_b))
    iou = inter / (size_a[la] + size_b[lb] - inter)
    keep = iou > threshold
    return la[keep], lb[keep]


class IouStitcher(Stitcher):
    """Match objects by their IoU in the overlap of neighbouring tiles (see the module)."""

    mode = "iou"
    numbers_padded = True

    def boundary_arrays(self, tile: Tile, labels: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for axis in self.grid.linked_axes:
            for side in (0, 1):
                slab = self.grid.boundary_slab(tile, axis, side)
                if slab is not None:
                    out[f"{axis}_{side}"] = labels[local_region(slab, tile.padded)]
        return out

    def offsets(self) -> list[tuple[int, ...]]:
        return self.grid.forward_offsets()

    def _touches(self, a: Tile, b: Tile) -> bool:
        return self.grid.overlap_region(a, b) is not None

    def _pairs(self, a: Tile, b: Tile, offset: tuple[int, ...], a_rec: TileBoundary,
               b_rec: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        side_a, side_b = self._sides(offset)
        a_slab, b_slab = a_rec.arrays.get(side_a), b_rec.arrays.get(side_b)
        region = self.grid.overlap_region(a, b)
        if a_slab is None or b_slab is None or region is None:
            return no_pairs()
        first = int(side_a.split("_")[0])
        a_origin = self.grid.boundary_slab(a, first, 1)
        b_origin = self.grid.boundary_slab(b, first, 0)
        assert a_origin is not None and b_origin is not None  # the slabs exist (checked above)
        return match_iou(a_slab[local_region(region, a_origin)],
                         b_slab[local_region(region, b_origin)], self.iou_threshold)
