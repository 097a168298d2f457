"""Child -> parent relations out of core equal the whole-image answer, for any tiling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbuster.errors import InputError
from blockbuster.relations import relate
from blockbuster.table import read_object_table


def sparse_blocky(rng: np.random.Generator, shape, n: int, block: int, empty: float):
    coarse = [max(1, -(-s // block)) for s in shape]
    labels = rng.integers(1, n + 1, coarse) * (rng.random(coarse) >= empty)
    for axis in range(len(shape)):
        labels = np.repeat(labels, block, axis=axis)
    return labels[tuple(slice(0, s) for s in shape)].astype(np.uint16)


def whole_image_relations(children, parents, max_distance, spacing):
    """The definition, by brute force on the whole image."""
    scale = np.asarray(spacing, float)
    parent_at = np.argwhere(parents > 0)
    parent_label = parents[parents > 0]
    rows = {}
    for child in np.unique(children[children > 0]):
        mask = children == child
        under = parents[mask]
        under = under[under > 0]
        if under.size:
            values, counts = np.unique(under, return_counts=True)
            best = values[counts == counts.max()].min()  # ties: the smaller label
            rows[int(child)] = (int(best), int(counts.max()), 0.0)
            continue
        rows[int(child)] = (0, 0, np.nan)
        if max_distance is None or not parent_label.size:
            continue
        at = np.argwhere(mask)
        d = np.sqrt(((((at[:, None, :] - parent_at[None, :, :]) * scale) ** 2)).sum(-1))
        nearest = d.min()
        if nearest <= max_distance:
            winner = parent_label[(d == nearest).any(axis=0)].min()
            rows[int(child)] = (int(winner), 0, float(nearest))
    return rows


@st.composite
def label_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 20 if ndim == 2 else 9)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    children = sparse_blocky(rng, shape, draw(st.integers(1, 10)), draw(st.integers(1, 3)), 0.6)
    parents = sparse_blocky(rng, shape, draw(st.integers(1, 6)), draw(st.integers(1, 4)),
                            draw(st.sampled_from([0.3, 0.85])))
    tile = tuple(draw(st.integers(2, s)) for s in shape)
    spacing = draw(st.sampled_from([(1.0,) * ndim, (2.0, 0.5, 0.5)[-ndim:]]))
    max_distance = draw(st.sampled_from([None, 1.0, 2.5, 6.0]))
    return children, parents, tile, spacing, max_distance


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pairs())
def test_tiled_relations_equal_the_whole_image_answer(case):
    children, parents, tile, spacing, max_distance = case
    result = relate(children, parents, max_distance=max_distance, spacing=spacing,
                    tile_shape=tile, progress=False)
    expected = whole_image_relations(children, parents, max_distance, spacing)
    table = result.children
    assert table["label"].tolist() == sorted(expected)
    for i, child in enumerate(table["label"]):
        parent, shared, distance = expected[int(child)]
        assert table["parent"][i] == parent, f"child {child}"
        assert table["overlap_voxels"][i] == shared
        np.testing.assert_equal(table["distance_um"][i], distance)
        assert table["voxels"][i] == (children == child).sum()
    parent_labels = np.unique(parents[parents > 0])
    assert result.parents["label"].tolist() == parent_labels.tolist()
    counts = [sum(1 for p, _, _ in expected.values() if p == label) for label in parent_labels]
    assert result.parents["n_children"].tolist() == counts


def test_overlap_ties_go_to_the_smaller_parent_whatever_the_tiling():
    children = np.zeros((4, 8), np.uint8)
    children[1:3, 2:6] = 1  # 4 voxels over parent 9, 4 over parent 3
    parents = np.zeros((4, 8), np.uint8)
    parents[:, :4] = 9
    parents[:, 4:] = 3
    for tile in [(4, 8), (2, 3), (1, 1)]:
        r = relate(children, parents, tile_shape=tile, progress=False)
        assert r.children["parent"].tolist() == [3]
        assert r.children["overlap_voxels"].tolist() == [4]


def test_nearest_parent_in_micrometres_and_tables_on_disk(tmp_path):
    children = np.zeros((1, 20, 20), np.uint8)
    children[0, 10, 2] = 1  # 3 voxels = 1.5 µm from parent 4 along x
    children[0, 10, 18] = 2  # 6 voxels from parent 4: too far at 2 µm
    parents = np.zeros((1, 20, 20), np.uint8)
    parents[0, 5:15, 5:12] = 4
    r = relate(children, parents, max_distance=2.0, spacing=(1.0, 0.5, 0.5),
               output=tmp_path / "rel.csv", tile_shape=(1, 7, 7), progress=False)
    assert r.children["parent"].tolist() == [4, 0]
    np.testing.assert_allclose(r.children["distance_um"], [1.5, np.nan])
    assert r.parents["n_children"].tolist() == [1]
    back = read_object_table(tmp_path / "rel.csv")
    assert back["parent"].tolist() == [4, 0]
    assert read_object_table(tmp_path / "rel.parents.csv")["n_children"].tolist() == [1]


def test_inputs_on_different_grids_are_refused():
    with pytest.raises(InputError, match="same grid"):
        relate(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), progress=False)
    with pytest.raises(InputError, match="max_distance"):
        relate(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), max_distance=-1,
               progress=False)
