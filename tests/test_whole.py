"""``stitch="whole"``: every object taken whole from the tile that saw it best.

The segmenter here predicts like a learned model near a cut: it redraws every object it sees as
a disc around the centre of the part it sees, so an object cut by a tile's read region comes
out shifted, in a different place in each tile. Only the tile that saw an object whole predicts
it right; "whole" must take it from there, voxel for voxel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.errors import InputError
from blockbuster.stitching.whole import better_versions, object_margins
from blockbuster.tiling import TileGrid

from helpers import same_partition

R = 5  # disc radius: objects are 11 px across


def discs(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """``n`` discs of radius R, at least 3 px apart."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.uint8)
    centres: list[np.ndarray] = []
    while len(centres) < n:
        c = rng.integers(R, np.array(shape) - R)
        if all(np.abs(c - d).max() > 2 * R + 3 for d in centres):
            centres.append(c)
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    for y, x in centres:
        img[(yy - y) ** 2 + (xx - x) ** 2 <= R * R] = 1
    return img


def redraw(tile: np.ndarray) -> np.ndarray:
    """Each object as a disc of radius R around the centre of what the tile sees of it."""
    lab, n = ndimage.label(tile > 0)
    out = np.zeros(lab.shape, np.int32)
    yy, xx = np.ogrid[:lab.shape[0], :lab.shape[1]]
    centres = ndimage.center_of_mass(lab > 0, lab, range(1, n + 1)) if n else []
    for i, (cy, cx) in enumerate(centres, start=1):
        out[((yy - round(cy)) ** 2 + (xx - round(cx)) ** 2 <= R * R) & (out == 0)] = i
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return discs((150, 150), 60, seed=1)


def test_each_object_comes_whole_from_the_tile_that_saw_it_whole(image):
    reference = redraw(image)  # the whole image seen at once: every disc where it is
    # objects cut by a border reach at most R + 1 into the next tile's core: the tile whose core
    # holds an object's centre sees it whole with an overlap of 8 (not the neighbour)
    whole = tile_process(image, redraw, (40, 40), 8, stitch="whole", progress=False)[:]
    iou = tile_process(image, redraw, (40, 40), 8, stitch="iou", progress=False)[:]
    assert same_partition(whole, reference)
    assert np.array_equal(np.unique(whole), np.arange(reference.max() + 1))  # 1..N
    # the cell-by-cell mode mixes two tiles' versions of the objects on a border
    assert not same_partition(iou, reference)


def test_a_version_is_dropped_where_the_kept_one_does_not_reach():
    """One object across the border of two tiles; the right tile sees it cut and predicts it 3 px
    too wide, into its own core: those voxels become background, the left tile's version (seen
    whole) is the object, on both sides of the border."""
    img = np.zeros((20, 40), np.uint8)
    img[5:15, 14:24] = 1  # 10 px wide, across the border at x = 20, centre in the left tile

    def wider_when_cut(tile: np.ndarray) -> np.ndarray:
        lab = ndimage.label(tile > 0)[0]
        if lab[:, 0].any():  # cut by the left edge of the read region: 3 px too wide
            lab[:, 3:] = np.maximum(lab[:, 3:], lab[:, :-3])
        return lab

    for mode, right_edge in (("whole", 24), ("iou", 27)):
        out = tile_process(img, wider_when_cut, (20, 20), 6, stitch=mode, progress=False)[:]
        expected = np.zeros_like(img)
        expected[5:15, 14:right_edge] = 1
        assert np.array_equal(out, expected), mode


@pytest.mark.parametrize("right_tile_sees", [None, (12, 20)])
def test_where_tiles_disagree_the_tile_holding_the_centre_decides(right_tile_sees):
    """Two tiles (cores x < 12 and x >= 12, halo 6) disagree about the place x = 10..16: the
    left one sees an object there, centred at x = 12 in the right one's core; the right one sees
    nothing, or an object of another shape (IoU 0.5, not matched). The right tile decides: no
    fragment of the left tile's version stays on its side of the border."""
    img = np.tile(np.arange(1, 25, dtype=np.uint8), (4, 1))  # each voxel holds x + 1

    def disagreeing(tile: np.ndarray) -> np.ndarray:
        out = np.zeros(tile.shape, np.int32)
        start = int(tile[0, 0]) - 1  # where the tile's read region starts
        seen = (10, 16) if start == 0 else right_tile_sees
        if seen is not None:
            out[:, seen[0] - start:seen[1] - start] = 1
        return out

    expected = np.zeros(img.shape, np.int32)
    if right_tile_sees is not None:
        expected[:, right_tile_sees[0]:right_tile_sees[1]] = 1
    out = tile_process(img, disagreeing, (4, 12), 6, stitch="whole", progress=False)[:]
    assert np.array_equal(out, expected)


def test_identical_labels_with_threads_in_any_order(image):
    serial = tile_process(image, redraw, (30, 30), 8, stitch="whole", progress=False)[:]
    with ThreadPoolExecutor(4) as pool:
        threaded = tile_process(image, redraw, (30, 30), 8, stitch="whole", client=pool,
                                progress=False)[:]
    assert np.array_equal(serial, threaded)


def test_the_object_table_measures_each_object_whole(image, tmp_path):
    import pandas as pd

    out = tile_process(image, redraw, (40, 40), 8, stitch="whole", output=tmp_path / "o.zarr",
                       table=True, progress=False)
    labels = out[:]
    table = pd.read_csv(str(tmp_path / "o.zarr") + ".objects.csv")
    sizes = np.bincount(labels.ravel())[1:]
    assert table["label"].tolist() == list(range(1, len(sizes) + 1))
    assert table[next(c for c in table.columns if "area" in c or "voxels" in c)].tolist() \
        == sizes.tolist()


def test_overlap_zero_is_refused():
    with pytest.raises(InputError, match=r"stitch='whole'.*overlap is 0"):
        tile_process(np.zeros((40, 40), np.uint8), redraw, (20, 20), 0, stitch="whole")


def test_margins_and_the_order_of_versions():
    grid = TileGrid((12,), (4,), depth=(2,))
    labels = np.array([0, 1, 1, 0, 0, 0, 2, 2])  # tile 1 reads [2:10]
    assert object_margins(grid.tile(1), grid, labels).tolist() == [[0, 0], [1, 5], [0, 6]]
    # the first tile reads from the image border: that side is never a cut
    first = object_margins(grid.tile(0), grid, np.array([1, 1, 0, 0, 0, 0]))
    assert first[1, 0] == 4 and first[1, 1] > 10**9
    ma, mb = np.array([[1, 5], [1, 5]]), np.array([[0, 9], [1, 5]])
    assert better_versions(ma, mb, a_wins_ties=False).tolist() == [True, False]
    assert better_versions(ma, mb, a_wins_ties=True).tolist() == [True, True]


def test_an_overlap_short_of_the_segmenters_is_named(caplog):
    from blockbuster import Segmenter

    class Discs(Segmenter):
        preferred_overlap = 12
        preferred_stitch = "whole"

        def segment(self, tile: np.ndarray) -> np.ndarray:
            return redraw(tile)

    img = np.zeros((40, 40), np.uint8)
    with caplog.at_level("WARNING", logger="blockbuster"):
        tile_process(img, Discs(), (20, 20), (12, 4), progress=False)
    assert "overlap (12, 4) is less than the segmenter's (12, 12) on axis/axes 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="blockbuster"):
        tile_process(img, Discs(), (20, 20), progress=False)  # its own overlap, its own mode
    assert "stitch='whole'" not in caplog.text
