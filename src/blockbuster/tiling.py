"""The tile grid: core regions (written), padded regions (read, with halo) and neighbours.

A tile's *core* is the block of the output it owns: cores partition the image and are exactly the
chunks of the output array. Its *padded* region is the core grown by the halo ``depth`` on every
side, clipped at the image border; that is what the segmentation function sees.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from dask.array.core import normalize_chunks

from .errors import InputError

__all__ = ["Tile", "TileGrid", "clip_depth", "normalize_overlap"]

#: Tiles a grid keeps made (a tile and its neighbours are asked for several times each).
RECENT_TILES = 4096

Region = tuple[slice, ...]


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position, the region it owns and the region it reads."""

    index: tuple[int, ...]
    id: int
    core: Region
    padded: Region

    @property
    def inner(self) -> Region:
        """The core, in coordinates relative to the padded region."""
        return tuple(slice(c.start - p.start, c.stop - p.start)
                     for c, p in zip(self.core, self.padded, strict=True))

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.padded)

    def describe(self) -> str:
        """Human-readable position, e.g. ``tile (0, 2) [0:64, 128:192]``."""
        region = ", ".join(f"{s.start}:{s.stop}" for s in self.padded)
        return f"tile {self.index} (voxels [{region}] with halo)"


def normalize_overlap(overlap: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """Per-axis overlap from an int or a sequence of ints; anything else is an error.

    Examples
    --------
    >>> normalize_overlap(5, 3)
    (5, 5, 5)
    >>> normalize_overlap((0, 8), 2)
    (0, 8)
    >>> normalize_overlap(4.5, 2)
    Traceback (most recent call last):
    blockbuster.errors.InputError: overlap=4.5 must be an int or 2 ints (one per spatial axis), \
in voxels
    """
    if overlap is None:
        return (0,) * ndim
    what = f"overlap={overlap!r} must be an int or {ndim} ints (one per spatial axis), in voxels"
    if _is_int(overlap):
        values = (int(overlap),) * ndim  # type: ignore[arg-type]
    elif isinstance(overlap, (str, bytes)) or not isinstance(overlap, Sequence | np.ndarray):
        raise InputError(what)
    else:
        values = tuple(overlap)
        if len(values) != ndim or not all(_is_int(v) for v in values):
            raise InputError(what)
        values = tuple(int(v) for v in values)
    if any(v < 0 for v in values):
        raise InputError(f"overlap={overlap!r} is negative; it must be >= 0 voxels")
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def clip_depth(overlap: tuple[int, ...], chunks: tuple[tuple[int, ...], ...],
               grid: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Clip the overlap per axis so the halo is always smaller than the tiles it reaches into.

    Only the last tile along an axis may be smaller than the others, and nothing lies beyond it,
    so the limit is the smallest of the other tiles, less one voxel, or less one step of the
    segmenter's ``grid`` (a halo clipped to a multiple of the grid keeps every read region on
    it). A z-tile of 1 gets depth 0.

    Examples
    --------
    >>> clip_depth((20, 20, 20), ((1, 1, 1), (64, 64, 10), (300,)))
    (0, 20, 20)
    >>> clip_depth((16, 32, 32), ((16, 15), (32, 29), (32, 25)), grid=(4, 8, 8))
    (12, 24, 24)
    """
    steps = grid or (1,) * len(overlap)
    depth = []
    for o, sizes, step in zip(overlap, chunks, steps, strict=True):
        limit = min(sizes[:-1]) if len(sizes) > 1 else sizes[0]
        depth.append(max(0, min(o, limit - step)))
    return tuple(depth)


class TileGrid:
    """A regular (or dask-irregular) grid of tiles over a spatial shape.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the image.
    chunks : tuple of int, or dask-style tuple of tuples
        Core shape of the tiles (one dask chunk = one tile).
    depth : tuple of int
        Halo per axis, already clipped (see :func:`clip_depth`).

    Examples
    --------
    >>> grid = TileGrid((10, 7), (4, 4), depth=(1, 1))
    >>> grid.grid_shape, grid.n_tiles
    ((3, 2), 6)
    >>> t = grid.tile((1, 1))
    >>> t.core, t.padded
    ((slice(4, 8, None), slice(4, 7, None)), (slice(3, 9, None), slice(3, 7, None)))
    """

    def __init__(self, shape: Sequence[int], chunks: Any, depth: Sequence[int] | None = None,
                 unlinked_axes: Sequence[int] = ()):
        self.shape = tuple(int(s) for s in shape)
        self.chunks: tuple[tuple[int, ...], ...] = normalize_chunks(chunks, self.shape)
        self.depth = tuple(depth) if depth is not None else (0,) * len(self.shape)
        if len(self.depth) != len(self.shape):
            raise InputError(f"depth {self.depth} does not match {len(self.shape)} axes")
        #: axes tiles are never stitched across (time: each time point is segmented on its own)
        self.unlinked_axes = tuple(sorted(int(a) for a in unlinked_axes))
        for axis in self.unlinked_axes:
            if self.depth[axis] or max(self.chunks[axis]) != 1:
                raise InputError(f"axis {axis} is not stitched: its tiles must be one voxel deep "
                                 "with no halo")

    def __getstate__(self) -> dict[str, Any]:
        # what the grid remembers is rebuilt where it is used, not shipped to every worker
        return {k: v for k, v in self.__dict__.items() if k not in ("_recent", "_offsets")}

    # -- geometry ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @cached_property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.chunks)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.grid_shape)

    @cached_property
    def tile_shape(self) -> tuple[int, ...]:
        """The regular (largest) core shape: the output's chunk shape."""
        return tuple(max(c) for c in self.chunks)

    @cached_property
    def starts(self) -> tuple[np.ndarray, ...]:
        """Per axis, the start of every tile plus the end of the image."""
        return tuple(np.concatenate([[0], np.cumsum(c)]) for c in self.chunks)

    @cached_property
    def _strides(self) -> tuple[int, ...]:
        """Tile-id steps per grid axis (C order)."""
        return tuple(math.prod(self.grid_shape[a + 1:]) for a in range(self.ndim))

    @cached_property
    def _bounds(self) -> tuple[list[int], ...]:
        return tuple(s.tolist() for s in self.starts)

    def tile(self, index: Sequence[int] | int) -> Tile:
        """The tile at a grid index, or with a tile id (C order over the grid).

        The engine asks for the same few tiles several times each (a tile and its neighbours),
        a few million times in a run of a million tiles: the arithmetic is plain Python and the
        last tiles are kept.
        """
        if isinstance(index, (int, np.integer)):
            tile_id = int(index)
            if not 0 <= tile_id < self.n_tiles:
                raise IndexError(f"tile {tile_id} is outside the grid of {self.n_tiles}")
        else:
            index = tuple(int(i) for i in index)
            if len(index) != self.ndim or not all(0 <= i < n for i, n in
                                                  zip(index, self.grid_shape, strict=True)):
                raise IndexError(f"tile {index} is outside the grid {self.grid_shape}")
            tile_id = sum(i * s for i, s in zip(index, self._strides, strict=True))
        found = self._recent.get(tile_id)
        if found is not None:
            return found
        index = tuple((tile_id // s) % n for s, n in zip(self._strides, self.grid_shape,
                                                          strict=True))
        core, padded = [], []
        for axis, i in enumerate(index):
            lo, hi = self._bounds[axis][i], self._bounds[axis][i + 1]
            d = self.depth[axis]
            core.append(slice(lo, hi))
            padded.append(slice(max(0, lo - d), min(self.shape[axis], hi + d)))
        tile = Tile(index, tile_id, tuple(core), tuple(padded))
        if len(self._recent) >= RECENT_TILES:
            self._recent.clear()  # a plain bound: tiles are cheap to make again
        self._recent[tile_id] = tile
        return tile

    @cached_property
    def _recent(self) -> dict[int, Tile]:
        return {}

    def __iter__(self) -> Iterator[Tile]:
        for index in np.ndindex(*self.grid_shape):
            yield self.tile(index)

    def __len__(self) -> int:
        return self.n_tiles

    # -- neighbours -------------------------------------------------------------------------
    def forward_offsets(self, max_nonzero: int | None = None) -> list[tuple[int, ...]]:
        """Neighbour offsets with a positive first non-zero entry: every pair of tiles once.

        ``max_nonzero`` limits how many axes an offset moves along (1 = face neighbours only).
        """
        limit = self.ndim if max_nonzero is None else max_nonzero
        known = self._offsets.get(limit)
        if known is not None:
            return list(known)
        offsets = []
        for off in itertools.product((-1, 0, 1), repeat=self.ndim):
            nz = [o for o in off if o]
            if any(off[a] for a in self.unlinked_axes):
                continue
            if nz and nz[0] > 0 and len(nz) <= limit:
                offsets.append(off)
        self._offsets[limit] = tuple(offsets)
        return offsets

    @cached_property
    def _offsets(self) -> dict[int, tuple[tuple[int, ...], ...]]:
        return {}

    @property
    def linked_axes(self) -> tuple[int, ...]:
        """The axes tiles are stitched across (the spatial ones)."""
        return tuple(a for a in range(self.ndim) if a not in self.unlinked_axes)

    def neighbour(self, index: tuple[int, ...], offset: tuple[int, ...]) -> tuple[int, ...] | None:
        other = tuple(i + o for i, o in zip(index, offset, strict=True))
        if all(0 <= j < n for j, n in zip(other, self.grid_shape, strict=True)):
            return other
        return None

    def overlap_region(self, a: Tile, b: Tile) -> Region | None:
        """Where the padded regions of two tiles intersect (None if they don't)."""
        region = []
        for pa, pb in zip(a.padded, b.padded, strict=True):
            lo, hi = max(pa.start, pb.start), min(pa.stop, pb.stop)
            if hi <= lo:
                return None
            region.append(slice(lo, hi))
        return tuple(region)

    def boundary_slab(self, tile: Tile, axis: int, side: int) -> Region | None:
        """The part of a tile's padded region that its neighbour across ``axis`` also reads.

        ``side`` 0 is the low neighbour, 1 the high one. The slab spans the tile's whole padded
        extent on the other axes, so it covers the overlap with diagonal neighbours as well.
        """
        step = -1 if side == 0 else 1
        index = list(tile.index)
        index[axis] += step
        if not 0 <= index[axis] < self.grid_shape[axis]:
            return None
        other = self.tile(tuple(index))
        lo = max(tile.padded[axis].start, other.padded[axis].start)
        hi = min(tile.padded[axis].stop, other.padded[axis].stop)
        if hi <= lo:
            return None
        slab = list(tile.padded)
        slab[axis] = slice(lo, hi)
        return tuple(slab)
