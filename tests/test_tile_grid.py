"""TileGrid.tile: the same tile by id and by index, what NumPy's index arithmetic gives, and the
tiles it keeps made change nothing (nor do they travel with a pickled grid)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockbuster import tiling
from blockbuster.tiling import TileGrid


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    depth = tuple(draw(st.integers(0, 5)) for _ in shape)
    return TileGrid(shape, chunks, depth)


@settings(max_examples=60, deadline=None)
@given(grid=grids(), data=st.data())
def test_a_tile_by_id_or_index_is_numpys_arithmetic(grid: TileGrid, data: st.DataObject) -> None:
    tile_id = data.draw(st.integers(0, grid.n_tiles - 1))
    index = tuple(int(i) for i in np.unravel_index(tile_id, grid.grid_shape))
    by_id, by_index = grid.tile(tile_id), grid.tile(index)
    assert by_id == by_index and by_id.index == index and by_id.id == tile_id
    for axis, i in enumerate(index):
        lo, hi = int(np.sum(grid.chunks[axis][:i])), int(np.sum(grid.chunks[axis][:i + 1]))
        d = grid.depth[axis]
        assert by_id.core[axis] == slice(lo, hi)
        assert by_id.padded[axis] == slice(max(0, lo - d), min(grid.shape[axis], hi + d))
    assert grid.tile(np.int64(tile_id)) == by_id


def test_tiles_outside_the_grid_are_refused() -> None:
    grid = TileGrid((10, 7), (4, 4))
    for bad in (6, -1, (3, 0), (0, -1), (1,)):
        with pytest.raises(IndexError):
            grid.tile(bad)


def test_kept_tiles_are_bounded_and_not_pickled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiling, "RECENT_TILES", 8)
    grid = TileGrid((64, 64), (4, 4), (1, 1))
    made = [grid.tile(t) for t in range(grid.n_tiles)]
    assert len(grid._recent) <= 8
    assert [grid.tile(t) for t in range(grid.n_tiles)] == made
    assert grid.forward_offsets(1) == grid.forward_offsets(1) == [(0, 1), (1, 0)]
    copy = pickle.loads(pickle.dumps(grid))
    assert "_recent" not in copy.__dict__ and copy.tile(5) == made[5]
