"""Tests of the synthetic image generators (blockbuster.data)."""

from __future__ import annotations

import time
import tracemalloc

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from blockbuster.data import (
    lazy_synthetic_nuclei,
    synthetic_mask,
    synthetic_nuclei,
    truth_path,
    write_synthetic_nuclei,
)
from blockbuster.errors import InputError, OutputExistsError


def _touching_pairs(labels: np.ndarray) -> int:
    """Number of face-adjacent voxel pairs carrying two different non-zero labels."""
    n = 0
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        n += int(np.count_nonzero((lo != hi) & (lo > 0) & (hi > 0)))
    return n


# -- synthetic_nuclei ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(200, 240), (24, 80, 96)])
def test_shapes_dtypes_and_determinism(shape):
    img, lab = synthetic_nuclei(shape, diameter=10, seed=4)
    assert img.shape == lab.shape == shape
    assert img.dtype == np.uint16 and lab.dtype == np.uint32
    img2, lab2 = synthetic_nuclei(shape, diameter=10, seed=4)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
    img3, lab3 = synthetic_nuclei(shape, diameter=10, seed=5)
    assert not np.array_equal(lab, lab3)
    assert np.mean(img != img3) > 0.5


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32"])
def test_dtypes_keep_contrast(dtype):
    img, lab = synthetic_nuclei((160, 160), dtype=dtype, seed=1)
    assert img.dtype == np.dtype(dtype)
    assert img.min() >= 0
    if np.dtype(dtype) == np.uint8:
        assert img.max() <= 255
    fg, bg = img[lab > 0].astype(float), img[lab == 0].astype(float)
    assert np.median(fg) > 3 * np.median(bg)


def test_nuclei_look_like_nuclei():
    diameter = 14
    img, lab = synthetic_nuclei((512, 512), diameter=diameter, density=0.5, seed=2)
    ids, sizes = np.unique(lab[lab > 0], return_counts=True)
    assert 300 < len(ids) < 2000
    # size: equivalent diameters cluster around the requested diameter
    eq_diam = np.sqrt(4 * sizes / np.pi)
    assert 0.75 * diameter < np.median(eq_diam) < 1.15 * diameter
    # roughly half the area is nuclei at density 0.5, and neighbours touch
    assert 0.3 < np.mean(lab > 0) < 0.6
    assert _touching_pairs(lab) > 0
    # each nucleus is one connected piece (partly touching nuclei stay separate ids)
    for i in ids[:100]:
        assert ndi.label(lab == i)[1] == 1
    # brightness varies between nuclei, and nuclei are brighter than background
    means = ndi.mean(img.astype(float), lab, ids)
    assert np.std(means) / np.mean(means) > 0.15
    assert np.median(means) > 4 * np.median(img[lab == 0])
    # nuclei are blob-shaped: not just one size and aspect ratio
    assert np.std(eq_diam) / np.mean(eq_diam) > 0.05


def test_not_touching_means_separated_by_background():
    _, lab = synthetic_nuclei((300, 300), diameter=10, touching=False, density=0.9, seed=3)
    assert _touching_pairs(lab) == 0
    # connected components of the foreground (8-connectivity) are exactly the nuclei
    cc, n = ndi.label(lab > 0, structure=np.ones((3, 3)))
    assert n == len(np.unique(lab)) - 1
    pairs = np.unique(np.stack([cc[lab > 0], lab[lab > 0]]), axis=1)
    assert pairs.shape[1] == n


def test_density_controls_the_number_of_nuclei():
    counts = [len(np.unique(synthetic_nuclei((256, 256), density=d, seed=0)[1])) - 1
              for d in (0.1, 0.5, 0.9)]
    assert counts[0] < counts[1] < counts[2]
    _, none = synthetic_nuclei((64, 64), density=0.0)
    assert not none.any()


def test_noise_level_follows_the_parameter():
    clean, lab = synthetic_nuclei((256, 256), noise=0.0, dtype="float32", seed=6)
    for noise in (0.02, 0.1):
        noisy, lab2 = synthetic_nuclei((256, 256), noise=noise, dtype="float32", seed=6)
        np.testing.assert_array_equal(lab, lab2)  # noise never moves the truth
        residual = noisy - clean
        inside = lab > 0
        # shot-like noise: sigma = noise * sqrt(intensity + floor), so larger in nuclei
        expected = noise * np.sqrt(np.maximum(clean, 0) + 0.01)
        ratio = residual / expected
        assert 0.85 < ratio.std() < 1.15
        assert abs(ratio.mean()) < 0.05
        assert residual[inside].std() > residual[~inside].std()


def test_background_is_smooth_and_uneven():
    img, lab = synthetic_nuclei((600, 600), noise=0.0, dtype="float32", density=0.0, seed=7)
    assert not lab.any()
    # no nuclei: the image is the background, varying slowly but visibly
    assert img.max() / img.min() > 1.1
    assert np.abs(np.diff(img, axis=1)).max() < 0.01 * img.mean()


def test_lazy_equals_in_memory_for_any_chunks_2d():
    img, lab = synthetic_nuclei((230, 310), diameter=9, seed=8)
    for chunks in [(64, 64), (37, 101), (230, 13)]:
        lazy = lazy_synthetic_nuclei((230, 310), chunks, diameter=9, seed=8)
        lazy_lab = lazy_synthetic_nuclei((230, 310), chunks, diameter=9, seed=8, labels=True)
        assert lazy.chunks == da.core.normalize_chunks(chunks, (230, 310))
        np.testing.assert_array_equal(lazy.compute(), img)
        np.testing.assert_array_equal(lazy_lab.compute(), lab)


def test_lazy_equals_in_memory_for_any_chunks_3d():
    img, lab = synthetic_nuclei((30, 70, 90), diameter=11, seed=9)
    lazy = lazy_synthetic_nuclei((30, 70, 90), (7, 33, 50), diameter=11, seed=9)
    lazy_lab = lazy_synthetic_nuclei((30, 70, 90), (1, 70, 20), diameter=11, seed=9,
                                     labels=True)
    np.testing.assert_array_equal(lazy.compute(), img)
    np.testing.assert_array_equal(lazy_lab.compute(), lab)


def test_generating_2048_square_is_fast():
    synthetic_nuclei((256, 256))  # warm up imports
    start = time.perf_counter()
    img, _ = synthetic_nuclei((2048, 2048))
    elapsed = time.perf_counter() - start
    assert img.shape == (2048, 2048)
    # well under a second on an idle 2-core machine; generous for loaded CI runners
    assert elapsed < 2.5


# -- write_synthetic_nuclei ------------------------------------------------------------------
def test_written_image_does_not_depend_on_chunks(tmp_path):
    shape = (20, 90, 110)
    img, lab = synthetic_nuclei(shape, diameter=10, seed=11)
    a = write_synthetic_nuclei(tmp_path / "a.zarr", shape, chunks=(8, 32, 32), diameter=10,
                               seed=11, with_labels=True, workers=2)
    b = write_synthetic_nuclei(tmp_path / "b.zarr", shape, chunks=(20, 45, 17), diameter=10,
                               seed=11, workers=1)
    assert a.chunks == (8, 32, 32) and b.chunks == (20, 45, 17)
    np.testing.assert_array_equal(a[:], img)
    np.testing.assert_array_equal(b[:], img)
    truth = zarr.open_array(str(truth_path(tmp_path / "a.zarr")), mode="r")
    np.testing.assert_array_equal(truth[:], lab)
    assert a.metadata.zarr_format == 3
    assert a.attrs["synthetic"]["seed"] == 11


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_write_streams_chunk_by_chunk(tmp_path):
    chunks = (512, 512)
    peaks = {}
    for side in (2048, 4096):
        peaks[side] = _traced_peak(lambda side=side: write_synthetic_nuclei(
            tmp_path / f"{side}.zarr", (side, side), chunks=chunks, workers=1))
    # memory is a few chunks' worth of work, flat in the image size...
    assert peaks[4096] < 1.25 * peaks[2048]
    # ...and well below the image itself (32 MB)
    assert peaks[4096] < 4096 * 4096 * 2 / 2
    arr = zarr.open_array(str(tmp_path / "4096.zarr"), mode="r")
    expected, _ = synthetic_nuclei((600, 300))
    np.testing.assert_array_equal(arr[:600, :300], expected)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "img.zarr"
    write_synthetic_nuclei(path, (64, 64), chunks=(32, 32), seed=1)
    with pytest.raises(OutputExistsError):
        write_synthetic_nuclei(path, (64, 64), chunks=(32, 32))
    arr = write_synthetic_nuclei(path, (48, 40), chunks=(16, 16), seed=2, overwrite=True)
    assert arr.shape == (48, 40)
    np.testing.assert_array_equal(arr[:], synthetic_nuclei((48, 40), seed=2)[0])


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_write_ome_image_with_pyramid_and_truth(tmp_path, zarr_format):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path = tmp_path / "img.ome.zarr"
    shape = (16, 600, 520)
    arr = write_synthetic_nuclei(path, shape, chunks=(8, 128, 128), ome=True,
                                 with_labels=True, zarr_format=zarr_format,
                                 scale=(2.0, 0.5, 0.5))
    img, lab = synthetic_nuclei(shape)
    np.testing.assert_array_equal(arr[:], img)
    nodes = list(Reader(parse_url(str(path)))())
    image = next(n for n in nodes if n.zarr.path == str(path))
    assert any(isinstance(s, Multiscales) for s in image.specs)
    shapes = [tuple(d.shape) for d in image.data]
    assert shapes == [(16, 600, 520), (16, 300, 260), (16, 150, 130)]
    # level 1 is the mean of 1x2x2 blocks of level 0
    level1 = np.asarray(image.data[1][:, :10, :10])
    block = img[:, :20, :20].reshape(16, 10, 2, 10, 2).astype(float).mean(axis=(2, 4))
    np.testing.assert_array_equal(level1, np.rint(block))
    # the truth is an NGFF label image in the image, with the same pyramid
    truth = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert truth.metadata["name"] == "truth"
    assert [tuple(d.shape) for d in truth.data] == shapes
    np.testing.assert_array_equal(np.asarray(truth.data[0]), lab)
    group = zarr.open_group(str(path), mode="r")
    meta = group.attrs["ome"] if zarr_format == 3 else group.attrs.asdict()
    version = meta["version"] if zarr_format == 3 else meta["multiscales"][0]["version"]
    assert version == {3: "0.5", 2: "0.4"}[zarr_format]
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in meta["multiscales"][0]["datasets"]]
    assert scales == [[2.0, 0.5, 0.5], [2.0, 1.0, 1.0], [2.0, 2.0, 2.0]]


def test_invalid_parameters_raise_input_error(tmp_path):
    for kwargs in [dict(shape=(10,)), dict(shape=(2, 3, 4, 5)), dict(shape=(32, 32), diameter=1),
                   dict(shape=(32, 32), density=1.5), dict(shape=(32, 32), seed=-1),
                   dict(shape=(32, 32), noise=-0.1)]:
        with pytest.raises(InputError):
            synthetic_nuclei(**kwargs)
    with pytest.raises(InputError):
        write_synthetic_nuclei(tmp_path / "x.zarr", (32, 32), chunks=(16,))
    with pytest.raises(InputError):
        write_synthetic_nuclei(tmp_path / "y.zarr", (32, 32), chunks=(16, 16), zarr_format=1)


# -- synthetic_mask --------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0.2, 0.4, 0.6])
def test_mask_fill_fraction(fill):
    mask = synthetic_mask((512, 512), fill=fill, seed=1)
    assert mask.dtype == bool
    assert abs(mask.mean() - fill) < 0.08


def test_mask_is_chunk_independent_and_lazy():
    eager = synthetic_mask((300, 420), seed=2)
    for chunks in [(100, 100), (77, 420), (3, 420)]:
        lazy = synthetic_mask((300, 420), seed=2, chunks=chunks)
        assert isinstance(lazy, da.Array)
        np.testing.assert_array_equal(lazy.compute(), eager)
    eager3 = synthetic_mask((40, 50, 60), seed=2, blob_size=12)
    lazy3 = synthetic_mask((40, 50, 60), seed=2, blob_size=12, chunks=(16, 16, 16))
    np.testing.assert_array_equal(lazy3.compute(), eager3)


def test_big_lazy_mask_is_cheap_and_blobs_cross_chunks():
    start = time.perf_counter()
    big = synthetic_mask((8192, 8192), chunks=(1024, 1024), seed=3)
    one = big.blocks[3, 5].compute()
    assert time.perf_counter() - start < 2.0  # no work beyond the one chunk
    assert big.shape == (8192, 8192) and one.shape == (1024, 1024)
    # many blobs of several sizes, and a good number of them cross chunk borders
    mask = synthetic_mask((1024, 1024), chunks=(256, 256), seed=3).compute()
    cc, n = ndi.label(mask)
    assert n > 50
    sizes = np.bincount(cc.ravel())[1:]
    assert sizes.max() > 20 * np.median(sizes)
    crossing = np.unique(np.concatenate([cc[255:257].ravel(), cc[:, 255:257].ravel()]))
    assert len(crossing) > 10
    # a different seed gives a different mask
    assert np.mean(synthetic_mask((256, 256), seed=4) != mask[:256, :256]) > 0.2


def test_mask_rejects_bad_parameters():
    with pytest.raises(InputError):
        synthetic_mask((10, 10), fill=0.0)
    with pytest.raises(InputError):
        synthetic_mask((10, 10, 10, 10))
