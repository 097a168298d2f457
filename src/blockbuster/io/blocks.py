"""Decoded storage chunks kept between reads much smaller than the chunks.

A run of tiny tiles (16 x 16 tiles of an image stored in 256 x 256 chunks) would otherwise
decode every chunk once per tile it holds: 256 times. Tiles are read in grid order, so a tile
row reuses the chunks of the row before; the cache keeps the most recently used chunks up to
:data:`MAX_CACHE_BYTES`, which holds one row of chunks of images up to ~100,000 voxels wide. A
read that crosses chunk borders (a tile's overlap) is assembled from the chunks it covers.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_BLOCK_BYTES", "MAX_CACHE_BYTES", "BlockCache", "read_through", "small_read"]

#: Go through the cache only when a chunk holds at least this many times the voxels read.
MIN_BLOCK_RATIO = 4
#: Chunks larger than this are never kept: reads go to the store directly.
MAX_BLOCK_BYTES = 4 << 20
#: The cache's size (least recently used chunks leave first).
MAX_CACHE_BYTES = 32 << 20

#: A chunk: per stored axis, an index (an axis read at one index) or ``(start, stop)``.
BlockKey = tuple[int | tuple[int, int], ...]
#: What :func:`small_read` finds: the voxels read, the chunks per axis.
SmallRead = tuple[list[tuple[int, int]], list[list[int | tuple[int, int]]]]


def small_read(index: Sequence[Any], shape: Sequence[int], chunks: Sequence[int] | None,
               itemsize: int) -> SmallRead | None:
    """The voxels read per sliced axis ``(start, stop)`` and the storage chunks under them per
    stored axis, for a read much smaller than one chunk; None when
    the read should go to the store directly (no chunks, a fancy index, a read near a chunk's
    size, or chunks too large to keep).

    Examples
    --------
    >>> small_read((slice(16, 32), slice(250, 266)), (512, 512), (256, 256), 1)
    ([(16, 32), (250, 266)], [[(0, 256)], [(0, 256), (256, 512)]])
    >>> small_read((slice(0, 200), slice(0, 200)), (512, 512), (256, 256), 1) is None
    True
    """
    if chunks is None or len(chunks) != len(index):
        return None
    per_axis: list[list[int | tuple[int, int]]] = []
    region: list[tuple[int, int]] = []
    read = chunk = 1
    for s, c, n in zip(index, chunks, shape, strict=True):
        if isinstance(s, (int, np.integer)):
            per_axis.append([int(s)])
            continue
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        start, stop = s.start or 0, n if s.stop is None else s.stop
        if not 0 <= start < stop <= n:
            return None
        per_axis.append([(lo, min(n, lo + c)) for lo in range(start // c * c, stop, c)])
        region.append((start, stop))
        read *= stop - start
        chunk *= c
    if chunk < MIN_BLOCK_RATIO * read or chunk * itemsize > MAX_BLOCK_BYTES:
        return None
    return region, per_axis


def read_through(cache: BlockCache, array: Any, plan: SmallRead) -> np.ndarray:
    """The read ``index`` of ``array``, assembled from its chunks (:func:`small_read`), each
    decoded once and kept in ``cache``; a new array the caller owns (fn may write into it)."""
    region, per_axis = plan
    out: np.ndarray | None = None
    for key in itertools.product(*per_axis):
        block = cache.get(key, _loader(array, key))
        if out is None:
            out = np.empty([stop - start for start, stop in region], block.dtype)
        src, dst = [], []
        spans = [k for k in key if isinstance(k, tuple)]
        for (lo, hi), (start, stop) in zip(spans, region, strict=True):
            a, b = max(lo, start), min(hi, stop)
            src.append(slice(a - lo, b - lo))
            dst.append(slice(a - start, b - start))
        out[tuple(dst)] = block[tuple(src)]
    assert out is not None, "a read covers at least one chunk"
    return out


def _loader(array: Any, key: BlockKey) -> Callable[[], np.ndarray]:
    index = tuple(k if isinstance(k, int) else slice(*k) for k in key)
    return lambda: np.asarray(array[index])


class BlockCache:
    """Chunks by key, least recently used out first, thread-safe (a chunk read by two
    threads at once is decoded twice: wasted work, never a wrong read)."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[BlockKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: BlockKey, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk ``key``, loaded with ``load`` unless kept; read-only."""
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        block = load()
        block.flags.writeable = False
        with self._lock:
            if key not in self._blocks:
                self._blocks[key] = block
                self._bytes += block.nbytes
            while self._bytes > self.max_bytes and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= old.nbytes
        return block

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)
