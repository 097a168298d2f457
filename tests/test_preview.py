"""Tests of the PNG preview (blockbuster.preview)."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import zarr
from PIL import Image
from skimage.segmentation import find_boundaries

from blockbuster.data import synthetic_nuclei
from blockbuster.errors import InputError
from blockbuster.preview import grid_boundaries, label_colors, save_preview


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def _is_grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


def _toy_labels() -> np.ndarray:
    lab = np.zeros((60, 80), np.uint32)
    lab[5:20, 5:25] = 3  # a rectangle
    lab[30:50, 10:30] = 7  # two touching objects
    lab[30:50, 30:45] = 8
    yy, xx = np.mgrid[:60, :80]
    lab[(yy - 20) ** 2 + (xx - 60) ** 2 < 100] = 12  # a disc
    return lab


@pytest.mark.parametrize("shape,max_size,expected", [
    ((300, 400), 1024, (300, 400)),  # small planes are kept 1:1
    ((300, 400), 100, (75, 100)),  # f = 4
    ((301, 401), 200, (101, 134)),  # f = 3, sizes rounded up
    ((9, 120, 90), 50, (40, 30)),  # 3-D: one plane, f = 3
])
def test_png_size(tmp_path, shape, max_size, expected):
    img, lab = synthetic_nuclei(shape, diameter=8)
    png = save_preview(img, lab, tmp_path / "sub" / "p.png", max_size=max_size)
    assert png == tmp_path / "sub" / "p.png" and png.exists()
    rgb = _png(png)
    assert rgb.shape == (*expected, 3)
    f = max(1, math.ceil(max(shape[-2:]) / max_size))
    assert rgb.shape[:2] == (math.ceil(shape[-2] / f), math.ceil(shape[-1] / f))


def test_outlines_are_exactly_on_label_boundaries(tmp_path):
    lab = _toy_labels()
    img = np.random.default_rng(0).integers(100, 200, lab.shape).astype(np.uint16)
    rgb = _png(save_preview(img, lab, tmp_path / "p.png"))
    edge = find_boundaries(lab, mode="inner") & (lab > 0)
    # every boundary pixel has its label's colour, every other pixel is grey
    np.testing.assert_array_equal(rgb[edge], label_colors(lab[edge]))
    assert _is_grey(rgb[~edge]).all()
    # touching objects keep their own outlines, in different colours
    assert (rgb[40, 29] != rgb[40, 30]).any()
    assert edge[40, 29] and edge[40, 30]


def test_fill_tints_interiors_only(tmp_path):
    lab = _toy_labels()
    img = np.full(lab.shape, 50, np.uint16)
    rgb = _png(save_preview(img, lab, tmp_path / "p.png", fill_alpha=0.5))
    edge = find_boundaries(lab, mode="inner") & (lab > 0)
    interior = (lab > 0) & ~edge
    assert not _is_grey(rgb[interior]).any()
    assert _is_grey(rgb[lab == 0]).all()


def test_grid_lines_at_tile_borders(tmp_path):
    img = np.zeros((100, 130), np.uint8)
    rgb = _png(save_preview(img, None, tmp_path / "p.png", tile_grid=(40, 50)))
    coloured = ~_is_grey(rgb)
    rows = np.flatnonzero(coloured.all(axis=1))
    cols = np.flatnonzero(coloured.all(axis=0))
    assert rows.tolist() == [40, 80]
    assert cols.tolist() == [50, 100]
    assert coloured.sum() == 2 * 130 + 2 * 100 - 4
    # reduced by f = 2: lines move to floor(boundary / 2)
    rgb = _png(save_preview(img, None, tmp_path / "q.png", tile_grid=(40, 50), max_size=65))
    coloured = ~_is_grey(rgb)
    assert rgb.shape[:2] == (50, 65)
    assert np.flatnonzero(coloured.all(axis=1)).tolist() == [20, 40]
    assert np.flatnonzero(coloured.all(axis=0)).tolist() == [25, 50]


def test_grid_from_a_label_arrays_chunks(tmp_path):
    lab = zarr.create_array(str(tmp_path / "lab.zarr"), shape=(8, 64, 96), chunks=(4, 32, 48),
                            dtype="uint32")
    img = np.zeros(lab.shape, np.uint16)
    rgb = _png(save_preview(img, lab, tmp_path / "p.png", tile_grid=lab.chunks))
    coloured = ~_is_grey(rgb)
    assert np.flatnonzero(coloured.all(axis=1)).tolist() == [32]
    assert np.flatnonzero(coloured.all(axis=0)).tolist() == [48]


def test_window_zooms_and_shifts_the_grid(tmp_path):
    img, lab = synthetic_nuclei((400, 500), seed=3)
    window = (slice(100, 260), slice(150, 330))
    rgb = _png(save_preview(img, lab, tmp_path / "p.png", window=window, tile_grid=(128, 128)))
    assert rgb.shape[:2] == (160, 180)
    sub = lab[window]
    edge = find_boundaries(sub, mode="inner") & (sub > 0)
    grid = np.zeros(sub.shape, bool)
    grid[[128 - 100, 256 - 100]] = True  # boundaries at y=128, 256 and x=256 fall inside
    grid[:, 256 - 150] = True
    np.testing.assert_array_equal(rgb[edge & ~grid], label_colors(sub[edge & ~grid]))
    assert _is_grey(rgb[~edge & ~grid]).all()
    assert not _is_grey(rgb[grid]).any()


def test_plane_selection_reads_only_that_plane(tmp_path):
    lab = np.zeros((5, 40, 40), np.uint32)
    for z in range(5):
        lab[z, 5 + 5 * z: 15 + 5 * z, 10:20] = z + 1  # a square that moves with z
    touched = []

    def block(block_info=None):
        z = block_info[None]["array-location"][0][0]
        touched.append(z)
        return lab[z:z + 1].astype(np.uint16) * 100

    img = da.map_blocks(block, chunks=((1,) * 5, (40,), (40,)), dtype=np.uint16)
    rgb = _png(save_preview(img, lab, tmp_path / "p.png", plane=3))
    assert set(touched) == {3}
    edge = find_boundaries(lab[3], mode="inner") & (lab[3] > 0)
    np.testing.assert_array_equal(rgb[edge], label_colors(lab[3][edge]))
    assert _is_grey(rgb[~edge]).all()
    touched.clear()
    save_preview(img, None, tmp_path / "mid.png")
    assert set(touched) == {2}  # the middle plane by default


def test_grey_is_percentile_stretched(tmp_path):
    img = np.linspace(1000, 2000, 200 * 200).reshape(200, 200)
    rgb = _png(save_preview(img, None, tmp_path / "p.png"))
    grey = rgb[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert 100 < np.median(grey) < 155
    flat = _png(save_preview(np.full((20, 20), 7.0), None, tmp_path / "flat.png"))
    assert flat.min() == flat.max()  # a constant image does not divide by zero


def test_label_colours_are_distinct_and_stable():
    ids = np.arange(1, 2001)
    colours = label_colors(ids)
    assert len(np.unique(colours, axis=0)) > 1900
    np.testing.assert_array_equal(label_colors(ids[::-1]), colours[::-1])
    assert colours.max(axis=1).min() >= 0.8 * 255 - 1  # bright on a dark image


def test_grid_boundary_forms():
    shape = (10, 600, 512)
    assert [b.tolist() for b in grid_boundaries((5, 256, 256), shape)] == [[5], [256, 512],
                                                                          [256]]
    assert [b.tolist() for b in grid_boundaries((256, 256), shape)] == [[256, 512], [256]]
    dask_chunks = da.zeros(shape, chunks=(10, 250, 200)).chunks
    assert [b.tolist() for b in grid_boundaries(dask_chunks, shape)] == [[], [250, 500],
                                                                         [200, 400]]
    assert [b.tolist() for b in grid_boundaries(([0, 100, 600], [0, 1, 2, 512]), shape)] == [
        [100], [1, 2]]
    with pytest.raises(InputError):
        grid_boundaries(([0, 5, 3], [0, 1]), shape)
    with pytest.raises(InputError):
        grid_boundaries((0, 10), shape)


def test_bad_inputs(tmp_path):
    img = np.zeros((4, 30, 30), np.uint16)
    with pytest.raises(InputError, match="do not match"):
        save_preview(img, np.zeros((4, 30, 31), np.uint32), tmp_path / "p.png")
    with pytest.raises(InputError):
        save_preview(img, None, tmp_path / "p.png", plane=4)
    with pytest.raises(InputError):
        save_preview(img, None, tmp_path / "p.png", plane=(1, 2))
    with pytest.raises(InputError):
        save_preview(img, None, tmp_path / "p.png", max_size=0)
    with pytest.raises(InputError):
        save_preview(img, None, tmp_path / "p.png", window=(slice(5, 5), slice(None)))
    with pytest.raises(InputError):
        save_preview(np.zeros(30), None, tmp_path / "p.png")


def test_multichannel_image_shows_the_chosen_channel(tmp_path):
    img = np.zeros((2, 20, 30), np.uint16)
    img[0, :, :15] = 1000  # channel 0: left half bright
    img[1, :, 15:] = 1000  # channel 1: right half bright
    left = _png(save_preview(img, None, tmp_path / "a.png", channel_axis=0, channel=0))
    right = _png(save_preview(img, None, tmp_path / "b.png", channel_axis=0, channel=1))
    assert left[:, :15].min() == 255 and left[:, 15:].max() == 0
    assert right[:, 15:].min() == 255 and right[:, :15].max() == 0
