"""Post-processing out of core: the tiled result equals the whole-image one, for any tiling."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from blockbuster.errors import InputError, OutputExistsError
from blockbuster.measurements import measure
from blockbuster.postprocess import (
    expand_block,
    expand_labels,
    fill_holes,
    filter_by_size,
    upsample_labels,
)

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def blocky(rng, shape, n, block, empty):
    coarse = [max(1, -(-s // block)) for s in shape]
    labels = rng.integers(1, n + 1, coarse) * (rng.random(coarse) >= empty)
    for axis in range(len(shape)):
        labels = np.repeat(labels, block, axis=axis)
    return labels[tuple(slice(0, s) for s in shape)].astype(np.uint32)


@st.composite
def cases(draw, empty=(0.2, 0.5, 0.9), max_2d=24, max_3d=9):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(2, max_2d if ndim == 2 else max_3d)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = blocky(rng, shape, draw(st.integers(1, 15)), draw(st.integers(1, 3)),
                    draw(st.sampled_from(empty)))
    tile = tuple(draw(st.integers(1, s)) for s in shape)
    return labels, tile


# -- size filter --------------------------------------------------------------------------------
@SETTINGS
@given(cases(), st.integers(0, 30), st.one_of(st.none(), st.integers(0, 60)))
def test_size_filter_equals_the_whole_image_answer(tmp_path_factory, case, low, high):
    labels, tile = case
    out = filter_by_size(labels, min_size=low, max_size=high, tile_shape=tile,
                         output=tmp_path_factory.mktemp("f") / "out.zarr", progress=False)
    sizes = np.bincount(labels.ravel())
    keep = (sizes >= low) & (sizes > 0)
    if high is not None:
        keep &= sizes <= high
    keep[0] = False
    lut = np.zeros(len(sizes), np.int64)
    lut[keep] = np.arange(1, keep.sum() + 1)
    np.testing.assert_array_equal(out[:], lut[labels])
    assert out.attrs["blockbuster"]["n_labels"] == keep.sum()


def test_size_filter_in_cubic_micrometres_reads_the_voxel_size_back(tmp_path):
    labels = np.zeros((4, 10, 10), np.uint16)
    labels[0, :2, :2] = 3  # 4 voxels = 4 * 2 * 0.5 * 0.5 = 2 µm³
    labels[1:4, 4:8, 4:8] = 9  # 48 voxels = 24 µm³
    path = tmp_path / "big.ome.zarr"
    out = filter_by_size(labels, min_size=3, unit="um3", spacing=(2, 0.5, 0.5), output=path,
                         tile_shape=(2, 5, 5), progress=False)
    assert np.unique(out[:]).tolist() == [0, 1]
    table = measure(path, progress=False)  # the voxel size travels in the OME metadata
    np.testing.assert_allclose(table["volume_um3"], [24.0])
    with pytest.raises(InputError, match="needs the voxel size"):
        filter_by_size(labels, min_size=3, unit="um3", progress=False)


# -- expansion ----------------------------------------------------------------------------------
def expanded_reference(labels, distance, spacing):
    """The definition on the whole image: nearest object within distance, ties to the smaller."""
    out = labels.copy()
    ids = np.unique(labels[labels > 0])
    if not ids.size:
        return out
    dist = np.stack([ndi.distance_transform_edt(labels != i, sampling=spacing) for i in ids])
    nearest = dist.min(axis=0)
    first = np.argmax(dist == nearest, axis=0)  # the smallest label among the nearest
    grow = (labels == 0) & (nearest <= distance)
    out[grow] = ids[first][grow]
    return out


@SETTINGS
@given(cases(empty=(0.6, 0.9)), st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.2]), st.booleans())
def test_expansion_equals_the_whole_image_answer(case, distance, physical):
    labels, tile = case
    spacing = (2.0, 1.0, 0.5)[-labels.ndim:] if physical else None
    unit = "um" if physical else "voxels"
    out = expand_labels(labels, distance, unit=unit, spacing=spacing, tile_shape=tile,
                        progress=False)
    expected = expanded_reference(labels, distance, spacing or (1.0,) * labels.ndim)
    np.testing.assert_array_equal(out[:], expected)


def test_expansion_matches_scikit_image_away_from_ties():
    from skimage.segmentation import expand_labels as skimage_expand

    rng = np.random.default_rng(5)
    labels = blocky(rng, (60, 70), 30, 3, 0.85)
    ours = expand_block(labels, 4)
    theirs = skimage_expand(labels, 4)
    ids = np.unique(labels[labels > 0])
    dist = np.stack([ndi.distance_transform_edt(labels != i) for i in ids])
    tie = ((dist == dist.min(axis=0)).sum(axis=0) > 1) & (labels == 0)
    assert (ours != theirs).any() or not tie.any()
    np.testing.assert_array_equal(ours[~tie], theirs[~tie])
    assert (ours != labels).sum() > 100  # it did grow


def test_expansion_never_overwrites_or_merges_objects():
    labels = np.zeros((9, 9), np.uint8)
    labels[:, 4] = 2
    labels[4, 0] = 1
    out = expand_labels(labels, 10, tile_shape=(4, 4), progress=False)[:]
    assert (out[:, 4] == 2).all() and out[4, 0] == 1  # objects keep their voxels
    assert (out[:, 5:] == 2).all()  # 1 does not reach through 2
    assert out[0, 0] == 1  # 4 voxels from both: the tie goes to the smaller label
    assert out[0, 1] == 2 and out[4, 2] == 1  # otherwise the nearest wins


# -- holes --------------------------------------------------------------------------------------
def filled_reference(labels):
    comps, n = ndi.label(labels == 0)
    out = labels.copy()
    border = np.zeros(n + 1, bool)
    for axis in range(labels.ndim):
        border[np.take(comps, 0, axis=axis)] = True
        border[np.take(comps, -1, axis=axis)] = True
    for c in range(1, n + 1):
        if border[c]:
            continue
        mask = comps == c
        around = labels[ndi.binary_dilation(mask) & ~mask]
        if len(np.unique(around)) == 1:
            out[mask] = around[0]
    return out


@SETTINGS
@given(cases(empty=(0.2, 0.4)))
def test_filled_holes_equal_the_whole_image_answer(case):
    labels, tile = case
    out = fill_holes(labels, tile_shape=tile, progress=False)
    np.testing.assert_array_equal(out[:], filled_reference(labels))


def test_holes_are_filled_like_binary_fill_holes_per_object():
    labels = np.zeros((12, 20), np.uint8)
    labels[1:8, 1:8] = 1
    labels[3:5, 3:5] = 0  # a hole of object 1
    labels[2:11, 10:19] = 2
    labels[4:9, 12:17] = 0  # a hole of object 2, holding object 3 with background around
    labels[6, 14] = 3
    out = fill_holes(labels, tile_shape=(5, 5), progress=False)[:]
    assert (out[1:8, 1:8] == 1).all()
    np.testing.assert_array_equal(out == 1, ndi.binary_fill_holes(labels == 1))
    # the ring between 2 and 3 touches two objects: not a hole of either
    assert out[5, 13] == 0 and out[6, 14] == 3


# -- upsampling ---------------------------------------------------------------------------------
@SETTINGS
@given(cases(empty=(0.3,), max_2d=12, max_3d=6), st.data())
def test_upsampling_by_factors_equals_repeat(case, data):
    labels, _ = case
    factors = tuple(data.draw(st.integers(1, 3)) for _ in labels.shape)
    chunks = tuple(data.draw(st.integers(1, s * f))
                   for s, f in zip(labels.shape, factors, strict=True))
    out = upsample_labels(labels, factors, chunks=chunks, progress=False)
    expected = labels
    for axis, f in enumerate(factors):
        expected = np.repeat(expected, f, axis=axis)
    np.testing.assert_array_equal(out[:], expected)
    assert out.chunks == tuple(min(c, s) for c, s in zip(chunks, expected.shape, strict=True))


def test_upsampling_a_pyramid_level_restores_level_zero_on_odd_shapes():
    from blockbuster.ome import downsample_block

    rng = np.random.default_rng(1)
    full = np.repeat(np.repeat(rng.integers(0, 9, (6, 5)), 2, 0), 2, 1)[:11, :9]
    level1 = downsample_block(full, (2, 2))
    assert level1.shape == (6, 5)
    out = upsample_labels(level1.astype(np.uint16), shape=full.shape, chunks=(4, 4),
                          progress=False)
    np.testing.assert_array_equal(out[:], full)


def test_upsampling_to_any_shape_matches_scikit_image_resize():
    from skimage.transform import resize

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 20, (7, 5)).astype(np.uint16)
    out = upsample_labels(labels, shape=(17, 12), chunks=(5, 5), progress=False)
    ref = resize(labels, (17, 12), order=0, preserve_range=True, anti_aliasing=False)
    np.testing.assert_array_equal(out[:], ref.astype(np.uint16))


def test_upsampling_divides_the_voxel_size(tmp_path):
    from blockbuster.data import write_synthetic_nuclei

    image = tmp_path / "img.ome.zarr"
    write_synthetic_nuclei(image, (512, 512), chunks=(256, 256), diameter=8, ome=True,
                           with_labels=True, scale=(0.5, 0.5))
    low = image / "labels" / "truth"
    level1 = zarr.open_array(str(low / "1"), mode="r")
    small = tmp_path / "small.zarr"
    zarr.create_array(store=str(small), data=level1[:], chunks=(128, 128))
    out = upsample_labels(small, 2, output=tmp_path / "big.ome.zarr", progress=False)
    assert out.shape == (512, 512)
    table = measure(tmp_path / "big.ome.zarr", spacing=None, progress=False)
    assert "area_um2" not in table  # the small array had no voxel size: none is invented
    out2 = upsample_labels(low, shape=(1024, 1024), output=tmp_path / "x.ome.zarr",
                           progress=False)
    assert out2.attrs["blockbuster"]["spacing_um"] == [0.25, 0.25]


# -- outputs ------------------------------------------------------------------------------------
def test_the_input_is_never_modified_and_outputs_are_not_replaced_silently(tmp_path):
    labels = np.zeros((8, 8), np.uint32)
    labels[2:6, 2:6] = 4
    labels[3, 3] = 0
    src = tmp_path / "labels.zarr"
    zarr.create_array(store=str(src), data=labels, chunks=(4, 4))
    out = fill_holes(src, progress=False)
    assert str(out.store).endswith("labels.filled.zarr") or out.shape == labels.shape
    np.testing.assert_array_equal(zarr.open_array(str(src), mode="r")[:], labels)
    assert (tmp_path / "labels.filled.zarr").exists()
    with pytest.raises(OutputExistsError):
        fill_holes(src, progress=False)
    fill_holes(src, overwrite=True, progress=False)
    with pytest.raises(InputError, match="input labels"):
        filter_by_size(src, min_size=2, output=src, overwrite=True, progress=False)
