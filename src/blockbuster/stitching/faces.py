"""``stitch="faces"``: labels that touch across a tile border are one object.

Voxel adjacency is given by ``connectivity``, as in
:func:`scipy.ndimage.generate_binary_structure`: 1 = faces, up to ndim = corners. Each tile keeps
the outermost layer of its core on every side that has a neighbour. With a connected components
``fn`` this reproduces the whole-image result exactly, for any tiling.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..tiling import Tile
from .base import Stitcher, TileBoundary, no_pairs

__all__ = ["FacesStitcher"]


def _face(arr: np.ndarray, axis: int, side: int) -> np.ndarray:
    index = [slice(None)] * arr.ndim
    index[axis] = slice(-1, None) if side else slice(0, 1)
    return arr[tuple(index)]


def _shifted_pairs(a: np.ndarray, b: np.ndarray, axes: list[int], max_moves: int,
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label pairs ``(a[x], b[x + delta])`` for every in-plane shift ``delta`` allowed."""
    pairs = []
    for delta in itertools.product((-1, 0, 1), repeat=len(axes)):
        if sum(1 for d in delta if d) > max_moves:
            continue
        sa = [slice(None)] * a.ndim
        sb = [slice(None)] * b.ndim
        for axis, d in zip(axes, delta, strict=True):
            n = a.shape[axis]
            sa[axis] = slice(max(0, -d), n - max(0, d))
            sb[axis] = slice(max(0, d), n - max(0, -d))
        va, vb = a[tuple(sa)].ravel(), b[tuple(sb)].ravel()
        keep = (va > 0) & (vb > 0)
        pairs.append((va[keep], vb[keep]))
    return pairs


def unique_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(a, b)`` pairs, as two int64 arrays."""
    if not pairs:
        return no_pairs()
    va = np.concatenate([p[0] for p in pairs]).astype(np.int64)
    vb = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    if va.size == 0:
        return va, vb
    # one int64 key per pair (labels are local: far below 2**31), sorted as (a, b) pairs are
    span = int(vb.max()) + 1
    a, b = np.divmod(np.unique(va * span + vb), span)
    return a, b


class FacesStitcher(Stitcher):
    """Merge labels that touch across a tile border (see the module docstring)."""

    mode = "faces"
    numbers_padded = False

    def boundary_arrays(self, tile: Tile, labels: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for axis in self.grid.linked_axes:
            for side in (0, 1):
                j = tile.index[axis] + (1 if side else -1)
                if 0 <= j < self.grid.grid_shape[axis]:
                    out[f"{axis}_{side}"] = _face(labels, axis, side)
        return out

    def offsets(self) -> list[tuple[int, ...]]:
        return self.grid.forward_offsets(self.connectivity)

    def _pairs(self, a: Tile, b: Tile, offset: tuple[int, ...], a_rec: TileBoundary,
               b_rec: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        side_a, side_b = self._sides(offset)
        a_face, b_face = a_rec.arrays.get(side_a), b_rec.arrays.get(side_b)
        if a_face is None or b_face is None:
            return no_pairs()
        moved = [ax for ax, o in enumerate(offset) if o]
        if len(moved) > self.connectivity:
            return no_pairs()
        # Both faces are one layer thick along the first moved axis. Along the other moved axes
        # keep only the layer that touches the other tile (a's last and b's first, or reverse).
        sa = [slice(None)] * a_face.ndim
        sb = [slice(None)] * b_face.ndim
        for ax in moved[1:]:
            sa[ax] = slice(-1, None) if offset[ax] > 0 else slice(0, 1)
            sb[ax] = slice(0, 1) if offset[ax] > 0 else slice(-1, None)
        fa, fb = a_face[tuple(sa)], b_face[tuple(sb)]
        free = [ax for ax in range(fa.ndim) if ax not in moved]
        return unique_pairs(_shifted_pairs(fa, fb, free, self.connectivity - len(moved)))
