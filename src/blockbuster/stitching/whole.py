"""``stitch="whole"``: an object crossing a tile border takes all its voxels from one tile.

Learned models (StarDist, Cellpose) predict an object that crosses a tile border slightly
differently in the two tiles that read it. The other modes give each voxel the label of the
tile whose core holds it, so such an object is a patchwork of two predictions along the seam.
Here, as in StarDist's ``predict_instances_big``, every object is taken whole from the one tile
that saw it best; the other tiles' versions of it are dropped.

How it works (all of it decided from the tiles' records, never from the image):

- each tile numbers its whole padded prediction, and keeps the slabs its neighbours also read
  (as ``"iou"`` does) plus, per object, its *margins*: how far its bounding box stays from each
  side of the tile's read region (a side on the image border does not count);
- the versions of one object in two neighbouring tiles are found as in ``"iou"``: IoU above
  ``iou_threshold`` where both tiles read, both versions reaching their tile's core;
- a tile *keeps* an object that reaches its core unless a matched version in a neighbouring
  tile saw it better: margins sorted from the smallest up and compared in that order (the
  version whose closest cut is farthest away wins; for two face neighbours this is the tile
  whose core holds the centre of the object's box), ties to the lower tile id. Every tile
  compares with the same data, so the decision is one total order: each object keeps exactly
  its best version, whichever tile decides;
- a version that no neighbour's version matches (the tiles disagree there: one sees an object
  the other does not, or another shape) is kept only by the tile whose core holds the centre of
  its box, the tile that saw that place from farthest inside. Kept anywhere else it would be cut
  to the few voxels the other tile's objects leave empty: a fragment that neither prediction
  has (seen with Cellpose in 3-D);
- a tile's core is written from its kept objects, then, on voxels they leave empty, from the
  kept objects of its neighbours that spill into it (their slabs), in grid order. Voxels of a
  dropped version that the kept one does not cover become background.

So the Committer (:mod:`blockbuster.engine.commit`) assigns a tile's labels once its neighbours
*after* it in grid order are segmented too (each kept object gets a new label: there is nothing
to merge), and writes its core once all its neighbours are assigned: a tile waits for about
one row (2-D) or one plane (3-D) of tiles ahead of it, kept meanwhile as its record and its
core's raw labels, the memory of a boundary. Every output chunk is written once. The cost: every
tile's raw core labels pass through the work directory's pack files (compressed, deleted with it
at the end), where the other modes keep only the tiles that finish ahead of their turn.

Exact results need an overlap of at least one object diameter on every axis: an object then
lies whole inside the read region of the tile whose core holds its centre. With less, large
objects are cut in every tile that sees them and the least cut version is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ..tiling import Tile, TileGrid
from .base import TileBoundary, local_region
from .iou import IouStitcher

__all__ = ["FAR", "WholeStitcher", "better_versions", "centred_in_core", "object_margins",
           "spill"]

#: The margin of a side on the image border (no cut there): larger than any image.
FAR = 2**40


def object_margins(tile: Tile, grid: TileGrid, labels: np.ndarray,
                   boxes: list[tuple[slice, ...] | None] | None = None) -> np.ndarray:
    """Per local label, its bounding box's distances to the sides of the read region.

    Row ``l`` holds the ``2 x (linked axes)`` distances of label ``l``, sorted from the
    smallest up; a side on the image border counts as :data:`FAR` (row 0: background, zeros).

    Examples
    --------
    >>> grid = TileGrid((12,), (4,), depth=(2,))
    >>> labels = np.array([0, 1, 1, 0, 0, 0, 2, 2])  # the middle tile, padded [2:10]
    >>> object_margins(grid.tile(1), grid, labels).tolist()
    [[0, 0], [1, 5], [0, 6]]
    """
    axes = grid.linked_axes
    n = int(labels.max(initial=0))
    out = np.zeros((n + 1, 2 * len(axes)), np.int64)
    for label, box in enumerate(ndimage.find_objects(labels) if boxes is None else boxes,
                                start=1):
        if box is None:
            continue
        row = []
        for axis in axes:
            padded, size = tile.padded[axis], labels.shape[axis]
            row.append(box[axis].start if padded.start > 0 else FAR)
            row.append(size - box[axis].stop if padded.stop < grid.shape[axis] else FAR)
        out[label] = sorted(row)
    return out


def centred_in_core(tile: Tile, labels: np.ndarray,
                    boxes: list[tuple[slice, ...] | None] | None = None) -> np.ndarray:
    """Per local label of a padded tile, whether its box's centre voxel lies in the core.

    The centre voxel of a box ``[start, stop)`` is ``(start + stop - 1) // 2``.

    Examples
    --------
    >>> grid = TileGrid((12,), (4,), depth=(2,))
    >>> labels = np.array([0, 1, 1, 0, 2, 2, 0, 0])  # the middle tile, padded [2:10], core [4:8]
    >>> centred_in_core(grid.tile(1), labels).tolist()
    [False, False, True]
    """
    out = np.zeros(int(labels.max(initial=0)) + 1, bool)
    lows = [c.start - p.start for c, p in zip(tile.core, tile.padded, strict=True)]
    highs = [c.stop - p.start for c, p in zip(tile.core, tile.padded, strict=True)]
    for label, box in enumerate(ndimage.find_objects(labels) if boxes is None else boxes,
                                start=1):
        if box is not None:
            out[label] = all(lo <= (b.start + b.stop - 1) // 2 < hi
                             for b, lo, hi in zip(box, lows, highs, strict=True))
    return out


def better_versions(ma: np.ndarray, mb: np.ndarray, a_wins_ties: bool) -> np.ndarray:
    """Per row, whether margins ``ma`` beat ``mb`` (compared from the smallest up).

    Examples
    --------
    >>> better_versions(np.array([[3, 9], [3, 9], [3, 9]]),
    ...                 np.array([[2, 99], [3, 8], [3, 9]]), a_wins_ties=False).tolist()
    [True, True, False]
    """
    diff = ma - mb
    differs = diff != 0
    first = np.argmax(differs, axis=1)
    decided = differs.any(axis=1)
    sign = diff[np.arange(len(diff)), first] > 0
    return np.where(decided, sign, a_wins_ties)


class WholeStitcher(IouStitcher):
    """Keep every object whole, from the tile that saw it best (see the module)."""

    mode = "whole"
    numbers_padded = True
    #: the Committer assigns a tile after its later neighbours and writes it after all of them
    whole_objects = True

    def boundary_arrays(self, tile: Tile, labels: np.ndarray) -> dict[str, np.ndarray]:
        out = super().boundary_arrays(tile, labels)
        boxes = ndimage.find_objects(labels)
        out["margins"] = object_margins(tile, self.grid, labels, boxes)
        out["centred"] = centred_in_core(tile, labels, boxes)
        return out

    def all_neighbours(self, tile: Tile) -> list[Tile]:
        """Every tile whose read region meets this one's, in grid order."""
        found = [other for backward in (True, False)
                 for other, _ in self.neighbours(tile, backward=backward)]
        return sorted(found, key=lambda t: t.id)

    def kept(self, tile: Tile, rec: TileBoundary,
             record_of: Callable[[int], TileBoundary]) -> np.ndarray:
        """Per local label of ``tile``, whether this tile's version of the object is kept.

        ``record_of(tile_id)``: the record of a neighbour (every neighbour must be segmented).
        """
        keep = rec.in_core
        margins = rec.arrays.get("margins")
        if margins is None or not keep.any():
            return keep
        matched = np.zeros_like(keep)
        for backward in (True, False):
            for other, off in self.neighbours(tile, backward=backward):
                o_rec = record_of(other.id)
                o_margins = o_rec.arrays.get("margins")
                if o_margins is None:
                    continue
                if backward:
                    lo, lt = self.match(other, tile, off, o_rec, rec)
                else:
                    lt, lo = self.match(tile, other, off, rec, o_rec)
                if lt.size:
                    lost = better_versions(o_margins[lo], margins[lt], other.id < tile.id)
                    keep[lt[lost]] = False
                    matched[lt] = True
        centred = rec.arrays.get("centred")
        if centred is not None:  # (records of runs started before it have none)
            keep &= matched | centred
        return keep


def spill(grid: TileGrid, tile: Tile, other: Tile, slabs: Callable[[str], np.ndarray | None],
          ) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Where ``other``'s prediction covers ``tile``'s core, and its local labels there.

    ``slabs(name)``: ``other``'s boundary array ``name`` (None when it kept none). Returns the
    region relative to ``tile``'s core and the labels, or None when nothing spills.
    """
    region = []
    for core, padded in zip(tile.core, other.padded, strict=True):
        lo, hi = max(core.start, padded.start), min(core.stop, padded.stop)
        if hi <= lo:
            return None
        region.append(slice(lo, hi))
    offset = [t - o for t, o in zip(tile.index, other.index, strict=True)]
    axis = next(a for a, o in enumerate(offset) if o)
    side = 1 if offset[axis] > 0 else 0
    slab_region = grid.boundary_slab(other, axis, side)
    slab = slabs(f"{axis}_{side}")
    if slab is None or slab_region is None:
        return None
    values = slab[local_region(tuple(region), slab_region)]
    return local_region(tuple(region), tile.core), values
