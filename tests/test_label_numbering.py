"""The fastremap label numbering is the NumPy reference's, id for id, on any label image."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from blockbuster.stitching import labels as labels_module
from blockbuster.stitching.labels import (
    apply_changes,
    apply_changes_numpy,
    sequential_local_labels,
    sequential_local_labels_numpy,
)

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64]


def _same_numbering(labels: np.ndarray) -> None:
    fast, n_fast, counts_fast = sequential_local_labels(labels)
    ref, n_ref, counts_ref = sequential_local_labels_numpy(labels)
    assert n_fast == n_ref
    assert fast.dtype == ref.dtype
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(counts_fast, counts_ref)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_numbering_matches_the_numpy_reference(data: st.DataObject, dtype: type) -> None:
    top = int(min(np.iinfo(dtype).max, 2**40))
    values = st.integers(0, data.draw(st.sampled_from([3, 50, top])))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    labels = data.draw(hnp.arrays(dtype, shape, elements=values))
    _same_numbering(labels)


@pytest.mark.parametrize("case", ["sequential", "gaps", "no background", "empty", "huge ids",
                                  "view"])
def test_numbering_of_typical_tiles(case: str) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, (64, 48)).astype(np.int32)
    if case == "gaps":
        labels = labels * 7
    elif case == "no background":
        labels = labels + 3
    elif case == "empty":
        labels = np.zeros((5, 5), np.uint16)
    elif case == "huge ids":
        labels = (labels.astype(np.uint64) * 2**40)
    elif case == "view":
        labels = (labels * 5)[3:50:2, 7:40]
    _same_numbering(labels)
    local, n, counts = sequential_local_labels(labels)
    assert local.max(initial=0) == n and counts.sum() == labels.size


@settings(max_examples=100, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.uint32, np.uint64, np.int64]))
def test_changes_match_the_numpy_reference(data: st.DataObject, dtype: type) -> None:
    labels = data.draw(hnp.arrays(dtype, st.integers(1, 60), elements=st.integers(0, 30)))
    old = np.array(sorted(data.draw(st.sets(st.integers(1, 35), max_size=10))), np.int64)
    new = np.array(data.draw(st.lists(st.integers(1, 30), min_size=len(old),
                                      max_size=len(old))), np.int64)
    with mock.patch.object(labels_module, "FASTREMAP_MIN_VOXELS", 0):  # fastremap at any size
        fast = apply_changes(labels, old, new)
    ref = apply_changes_numpy(labels, old, new)
    assert fast.dtype == labels.dtype
    np.testing.assert_array_equal(fast, ref)


def test_changes_of_a_large_tile_go_through_fastremap_and_match_the_reference() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 400, (128, 96)).astype(np.uint32)
    old = np.arange(1, 100_000, 7, dtype=np.int64)  # far more changes than labels present
    new = old // 3 + 1
    assert labels.size >= labels_module.FASTREMAP_MIN_VOXELS
    with mock.patch.object(labels_module, "apply_changes_numpy",
                           side_effect=AssertionError("the NumPy path was taken")):
        fast = apply_changes(labels, old, new)
    np.testing.assert_array_equal(fast, apply_changes_numpy(labels, old, new))


def test_changes_leave_the_input_alone_and_keep_views() -> None:
    labels = np.arange(30, dtype=np.uint32).reshape(5, 6)
    view = labels[1:4, 2:5]
    out = apply_changes(view, np.array([8, 15]), np.array([1, 2]))
    assert labels[1, 2] == 8 and out[0, 0] == 1 and out[1, 1] == 2
    np.testing.assert_array_equal(out, apply_changes_numpy(view, np.array([8, 15]),
                                                           np.array([1, 2])))


@settings(max_examples=60, deadline=None)
@given(mask=hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12)))
def test_watershed_components_are_scipys_id_for_id(mask: np.ndarray) -> None:
    from scipy import ndimage

    from blockbuster.plugins.watershed import _face_components

    np.testing.assert_array_equal(_face_components(mask), ndimage.label(mask)[0])


@pytest.mark.parametrize("min_size", [1, 4, 30])
def test_watershed_small_objects_removed_as_scikit_image_numbers(min_size: int) -> None:
    from skimage.segmentation import relabel_sequential

    from blockbuster.plugins.watershed import _remove_small

    labels = (np.random.default_rng(3).integers(0, 60, (40, 50)) * 3).astype(np.int32)
    sizes = np.bincount(labels.ravel())
    expected = labels.copy()
    small = sizes < min_size
    small[0] = False
    expected[small[expected]] = 0
    expected = relabel_sequential(expected)[0]
    out = _remove_small(labels.copy(), min_size)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)
