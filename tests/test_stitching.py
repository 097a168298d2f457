"""Stitching: exact connected components for any tiling, IoU fidelity on dense nuclei."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.errors import BlockbusterError, InputError, TileFailures
from blockbuster.stitching import LabelBook, apply_changes

from helpers import comb_mask, same_partition


@st.composite
def tiled_masks(draw, ndim):
    shape = tuple(draw(st.integers(1, 24 if ndim == 2 else 12)) for _ in range(ndim))
    fill = draw(st.floats(0.2, 0.8))
    seed = draw(st.integers(0, 2**31 - 1))
    mask = np.random.default_rng(seed).random(shape) < fill
    tile_shape = tuple(draw(st.integers(1, s)) for s in shape)
    overlap = tuple(draw(st.integers(0, min(4, s))) for s in shape)  # never beyond the image
    connectivity = draw(st.integers(1, ndim))
    return mask, tile_shape, overlap, connectivity


def _check_faces_equals_whole_image(case):
    mask, tile_shape, overlap, connectivity = case
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    expected = ndimage.label(mask, structure)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overlap .* reduced", UserWarning)  # tiny random tiles
        out = tile_process(mask, lambda t: ndimage.label(t, structure)[0], tile_shape, overlap,
                           stitch="faces", connectivity=connectivity, progress=False)
    assert same_partition(out[:], expected), (tile_shape, overlap, connectivity)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_masks(2))
def test_faces_is_exact_connected_components_2d(case):
    _check_faces_equals_whole_image(case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_masks(3))
def test_faces_is_exact_connected_components_3d(case):
    _check_faces_equals_whole_image(case)


# -- IoU mode ------------------------------------------------------------------------------------
def local_threshold_watershed(tile: np.ndarray, diameter: int = 12) -> np.ndarray:
    """A classical nuclei segmenter: local threshold + distance-transform watershed."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_local
    from skimage.segmentation import watershed

    smooth = ndimage.gaussian_filter(tile.astype(np.float32), 1.0)
    local = threshold_local(smooth, block_size=2 * diameter + 1, offset=0)
    mask = (smooth > local) & (smooth > np.float32(0.25 * 65535 / 4))
    mask = ndimage.binary_opening(mask, iterations=1)
    dist = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=diameter // 3, threshold_abs=1.5,
                           exclude_border=False, labels=ndimage.label(mask)[0])
    markers = np.zeros(tile.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def match_objects(truth: np.ndarray, test: np.ndarray):
    """IoU matching (> 0.5) of two label images: f1, identical fraction, fused count."""
    t, s = truth.ravel().astype(np.int64), test.ravel().astype(np.int64)
    both = (t > 0) & (s > 0)
    key = t[both] * (s.max() + 1) + s[both]
    keys, inter = np.unique(key, return_counts=True)
    lt, ls = np.divmod(keys, s.max() + 1)
    size_t, size_s = np.bincount(t), np.bincount(s)
    iou = inter / (size_t[lt] + size_s[ls] - inter)
    matched = iou > 0.5
    n_true, n_test, tp = len(np.unique(t[t > 0])), len(np.unique(s[s > 0])), int(matched.sum())
    f1 = 2 * tp / (n_true + n_test)
    identical = int(np.sum(matched & (inter == size_t[lt]) & (inter == size_s[ls])))
    # a tiled object that holds the majority of two whole-image objects fused them
    majority = inter > 0.5 * size_t[lt]
    fused = int(np.sum(np.bincount(ls[majority]) > 1))
    return f1, identical / max(n_true, 1), fused


@pytest.mark.slow
@pytest.mark.parametrize("ndim", [2, 3])
def test_iou_fidelity_on_dense_touching_nuclei(ndim):
    """Tiled = whole-image segmentation, up to what one diameter of context allows.

    Regression: halo-only fragments at a tile's padded edge once chained two touching nuclei
    together across three tiles (fixed by matching only objects that reach their cores).
    """
    from blockbuster.data import synthetic_nuclei

    shape = (768, 768) if ndim == 2 else (64, 160, 160)
    image, _ = synthetic_nuclei(shape, diameter=12, density=0.6, touching=True, seed=3)
    whole = local_threshold_watershed(image)
    tile_shape = (128, 128) if ndim == 2 else (32, 64, 64)
    out = tile_process(image, local_threshold_watershed, tile_shape, overlap=14, stitch="iou",
                       progress=False)[:]
    f1, identical, fused = match_objects(whole, out)
    assert whole.max() > (300 if ndim == 2 else 100)  # the image really is dense
    assert f1 >= 0.995
    assert identical >= 0.99
    assert fused == 0


def test_object_larger_than_overlap_is_stitched_not_dropped():
    """A long bar crosses many tiles and is far larger than the 4-voxel overlap."""
    image = np.zeros((40, 300), np.uint8)
    image[10:30, 5:295] = 1
    image[2:6, 100:140] = 1
    out = tile_process(image, lambda t: ndimage.label(t)[0], (16, 32), 4, stitch="iou",
                       progress=False)[:]
    assert len(np.unique(out[10:30, 5:295])) == 1  # one object
    assert out.max() == 2
    assert same_partition(out, ndimage.label(image)[0])


def test_distinct_touching_objects_stay_distinct_in_iou_mode():
    """Two objects that touch along a tile border keep their own ids (faces mode would fuse)."""
    labels = np.zeros((40, 40), np.int32)
    labels[5:35, 5:20] = 1
    labels[5:35, 20:35] = 2  # touches object 1 exactly at x = 20, a tile border
    fn = lambda t: t.astype(np.int32)
    iou = tile_process(labels, fn, (20, 20), 5, stitch="iou", progress=False)[:]
    assert same_partition(iou, labels)
    faces = tile_process(labels, fn, (20, 20), 5, stitch="faces", progress=False)[:]
    assert faces.max() == 1  # merging everything that touches fuses them: why iou exists


def test_iou_diagonal_neighbours_are_matched():
    """An object centred on a tile corner lands in four tiles and comes out as one."""
    image = np.zeros((60, 60), np.uint8)
    yy, xx = np.mgrid[:60, :60]
    image[(yy - 30) ** 2 + (xx - 30) ** 2 < 64] = 1
    out = tile_process(image, lambda t: ndimage.label(t)[0], (30, 30), 10, stitch="iou",
                       progress=False)[:]
    assert out.max() == 1


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_stitch_mode_fails_before_any_tile():
    calls = []
    with pytest.raises(InputError, match="unknown stitch mode 'seams'"):
        tile_process(np.ones((8, 8)), lambda t: calls.append(1), (4, 4), stitch="seams")
    assert not calls


def test_iou_without_overlap_fails_before_any_tile():
    calls = []
    with pytest.raises(InputError, match="overlap is 0 on every axis"):
        tile_process(np.ones((8, 8)), lambda t: calls.append(1), (4, 4), 0, stitch="iou")
    assert not calls


def test_bad_connectivity():
    with pytest.raises(InputError, match="connectivity"):
        tile_process(np.ones((8, 8)), lambda t: t, (4, 4), stitch="faces", connectivity=3)


def test_stitch_none_keeps_every_tile_object_unique():
    image = np.ones((20, 20), np.uint8)
    out = tile_process(image, lambda t: t.astype(np.int32), (10, 10), stitch="none",
                       progress=False)[:]
    assert sorted(np.unique(out)) == [1, 2, 3, 4]


# -- labels handed out in grid order -------------------------------------------------------------
def test_labels_joined_after_they_were_written_are_rewritten_consecutively(caplog):
    mask = comb_mask()
    expected = ndimage.label(mask)[0]
    with caplog.at_level("INFO", logger="blockbuster"):
        out = tile_process(mask, lambda t: ndimage.label(t)[0], (30, 30), stitch="faces",
                           progress=False)
    labels = out[:]
    assert same_partition(labels, expected)
    assert np.array_equal(np.unique(labels), np.arange(expected.max() + 1))  # 1..N, no gap
    assert out.attrs["blockbuster"]["n_labels"] == expected.max()
    rewritten = [r.getMessage() for r in caplog.records if "joined or moved" in r.getMessage()]
    assert rewritten and not rewritten[0].split("; ")[1].startswith("0 ")  # the case under test


def _random_tiles(seed: int, n_tiles: int = 12):
    """A book's inputs for tiles in order: which local labels continue which earlier labels."""
    rng = np.random.default_rng(seed)
    book, inputs = LabelBook(), []
    for _ in range(n_tiles):
        n = int(rng.integers(0, 6))
        has_core = np.concatenate([[False], rng.random(n) < 0.8])
        known = book.next_label - 1
        k = int(rng.integers(0, 4)) if known and has_core.any() else 0
        local = rng.choice(np.flatnonzero(has_core), k) if k else np.empty(0, np.int64)
        matched = rng.integers(1, known + 1, k) if k else np.empty(0, np.int64)
        glabels, merges = book.assign(has_core, local, matched)
        inputs.append((glabels, merges))
    return book, inputs


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.randoms(use_true_random=False))
def test_label_book_rebuilt_from_records_in_any_order_is_the_same(seed, shuffle):
    book, records = _random_tiles(seed)
    shuffle.shuffle(records)
    replayed = LabelBook()
    for glabels, merges in records:
        replayed.replay(glabels, merges)
    assert replayed.n_labels == book.n_labels
    for a, b in zip(replayed.final_changes(), book.final_changes(), strict=True):
        assert np.array_equal(a, b)
    # the final labels of every tile are exactly 1..N
    old, new = book.final_changes()
    final = np.concatenate([apply_changes(g, old, new) for g, _ in records])
    assert set(final[final > 0].tolist()) == set(range(1, book.n_labels + 1))


def test_label_book_refuses_to_overflow_its_dtype():
    book = LabelBook(max_label=3)
    book.assign(np.array([False, True, True]), np.empty(0, int), np.empty(0, int))
    with pytest.raises(BlockbusterError, match="more than 3 objects"):
        book.assign(np.array([False, True, True]), np.empty(0, int), np.empty(0, int))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiled_masks(2), seed=st.integers(0, 2**31 - 1))
def test_tiles_resumed_out_of_order_still_give_whole_image_components(case, seed, tmp_path_factory):
    """Tiles that failed run after their later neighbours: labels already written get joined."""
    mask, tile_shape, overlap, connectivity = case
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    n_tiles = int(np.prod([-(-s // t) for s, t in zip(mask.shape, tile_shape, strict=True)]))
    failing = set(np.random.default_rng(seed).choice(n_tiles, n_tiles // 2, replace=False).tolist())
    calls, first_run = [0], [True]

    def flaky(tile):
        calls[0] += 1
        if first_run[0] and calls[0] - 1 in failing:
            raise RuntimeError("simulated")
        return ndimage.label(tile, structure)[0]

    out = tmp_path_factory.mktemp("resume") / "out.zarr"
    kwargs = dict(stitch="faces", connectivity=connectivity, output=out, retries=0,
                  progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overlap .* reduced", UserWarning)
        if failing:
            with pytest.raises(TileFailures):
                tile_process(mask, flaky, tile_shape, overlap, **kwargs)
        first_run[0] = False
        labels = tile_process(mask, flaky, tile_shape, overlap, resume=True, **kwargs)[:]
    expected = ndimage.label(mask, structure)[0]
    assert same_partition(labels, expected)
    assert np.array_equal(np.unique(labels[labels > 0]), np.arange(1, expected.max() + 1))


def test_object_table_describes_the_labels_written(tmp_path):
    """Labels joined and moved at the end: the table follows them (counts, boxes, centroids)."""
    from blockbuster import read_object_table

    out = tile_process(comb_mask(), lambda t: ndimage.label(t)[0], (30, 30), stitch="faces",
                       output=tmp_path / "o.zarr", table=True, progress=False)
    labels = out[:]
    ids = np.arange(1, labels.max() + 1)
    table = read_object_table(tmp_path / "o.zarr.objects.csv")
    assert np.array_equal(table["label"], ids)
    assert np.array_equal(table["voxels"], np.bincount(labels.ravel())[1:])
    boxes = ndimage.find_objects(labels)
    for axis, name in enumerate("yx"):
        assert np.array_equal(table[f"bbox_min_{name}"], [b[axis].start for b in boxes])
        assert np.array_equal(table[f"bbox_max_{name}"], [b[axis].stop for b in boxes])
    centroids = np.array(ndimage.center_of_mass(labels > 0, labels, ids))
    np.testing.assert_allclose(np.stack([table["centroid_y"], table["centroid_x"]], 1),
                               centroids, atol=1e-3)


# -- stitch_tiles: labels made tile by tile elsewhere ---------------------------------------------
def _labelled_per_tile(mask: np.ndarray, tile_shape: tuple[int, ...],
                       structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Each tile labelled on its own, 1..n (ids repeat from tile to tile), and the sum of n."""
    labels, total = np.zeros(mask.shape, np.int32), 0
    for corner in np.ndindex(*(-(-s // t) for s, t in zip(mask.shape, tile_shape, strict=True))):
        box = tuple(slice(c * t, (c + 1) * t) for c, t in zip(corner, tile_shape, strict=True))
        labels[box], n = ndimage.label(mask[box], structure)
        total += n
    return labels, total


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_masks(2), st.booleans())
def test_stitch_tiles_equals_whole_image_components(case, as_zarr):
    """A zarr array (or dask array) whose chunks are tiles labelled apart: stitch_tiles gives
    the whole image's connected components, numbered 1..N."""
    import dask.array as da
    import zarr

    from blockbuster import stitch_tiles

    mask, tile_shape, _, connectivity = case
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    tiles, n_pieces = _labelled_per_tile(mask, tile_shape, structure)
    if as_zarr:
        labels = zarr.create_array(zarr.storage.MemoryStore(), shape=tiles.shape,
                                   chunks=tile_shape, dtype=tiles.dtype)
        labels[:] = tiles
    else:
        labels = da.from_array(tiles, chunks=tile_shape)
    out = stitch_tiles(labels, connectivity=connectivity, progress=False)[:]
    assert same_partition(out, ndimage.label(mask, structure)[0]), (tile_shape, connectivity)
    assert np.array_equal(np.unique(out[out > 0]), np.arange(1, out.max() + 1))  # 1..N
    apart = stitch_tiles(da.from_array(tiles, chunks=tile_shape), stitch="none",
                         progress=False)[:]
    assert apart.max() == n_pieces and np.array_equal(apart > 0, mask)  # every piece its own
