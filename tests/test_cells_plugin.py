"""The ``cells`` segmenter: one cell per nucleus, by a seeded watershed, tiled like any plugin."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest

from blockbuster import plugins, tile_process
from blockbuster.data import synthetic_cells
from blockbuster.errors import InputError
from blockbuster.plugins import get_segmenter
from blockbuster.plugins.cells import CellsSegmenter
from blockbuster.testing import SegmenterConformance

from helpers import prepared


def mean_matched_iou(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean over true objects of the IoU with the found object overlapping them most."""
    ious = []
    for label in np.unique(truth[truth > 0]):
        mask = truth == label
        under = found[mask]
        under = under[under > 0]
        if not under.size:
            ious.append(0.0)
            continue
        other = found == np.bincount(under).argmax()
        ious.append((mask & other).sum() / (mask | other).sum())
    return float(np.mean(ious))


class TestCellsConformance(SegmenterConformance):
    channel_axis = 0
    n_channels = 2
    diameter = 16

    @pytest.fixture
    def make_segmenter(self):
        return lambda: CellsSegmenter(diameter=16, nucleus_diameter=8)

    def make_image(self, ndim: int) -> np.ndarray:
        shape = (64, 80) if ndim == 2 else (12, 48, 56)
        return synthetic_cells(shape, nucleus_diameter=8, seed=1)[0]


@pytest.mark.parametrize("shape", [(160, 144), (20, 72, 64)])
@pytest.mark.parametrize("stain", ["membrane", "cytoplasm"])
def test_one_cell_per_nucleus_close_to_the_truth(shape, stain):
    image, nuclei, cells = synthetic_cells(shape, nucleus_diameter=10, seed=3, stain=stain,
                                           density=0.6)
    seg = prepared(CellsSegmenter(diameter=20, stain=stain), image, channel_axis=0)
    labels = seg(image)
    assert labels.max() == len(np.unique(nuclei)) - 1
    assert mean_matched_iou(cells, labels) > 0.9
    # every found cell holds exactly one nucleus
    for label in range(1, labels.max() + 1):
        held = np.unique(nuclei[labels == label])
        assert len(held[held > 0]) == 1


def test_tiled_cells_are_stitched_whole():
    image, nuclei, cells = synthetic_cells((256, 240), nucleus_diameter=10, seed=4)
    seg = CellsSegmenter(diameter=20)
    out = tile_process(image, seg, tile_shape=(64, 64), channel_axis=0, progress=False)[:]
    assert seg.preferred_stitch == "iou" and seg.preferred_overlap == 20
    whole = prepared(CellsSegmenter(diameter=20), image, channel_axis=0)(image)
    assert out.max() == whole.max()  # no cell split or lost at a tile border
    assert abs(int(out.max()) - (len(np.unique(nuclei)) - 1)) <= 2
    assert mean_matched_iou(whole, out) > 0.97
    assert mean_matched_iou(cells, out) > 0.95


def test_nucleus_labels_as_a_channel_seed_the_cells_as_they_are():
    image, nuclei, cells = synthetic_cells((128, 128), nucleus_diameter=10, seed=5)
    stacked = np.stack([nuclei, image[1].astype(np.uint32)])  # labels + membrane
    seg = prepared(CellsSegmenter(diameter=20, nuclei="labels"), stacked, channel_axis=0)
    labels = seg(stacked)
    assert labels.max() == len(np.unique(nuclei)) - 1
    assert mean_matched_iou(cells, labels) > 0.95
    with pytest.raises(InputError, match="fractions"):
        seg(stacked.astype(np.float32) / 2)


def test_arguments_and_inputs_are_checked():
    with pytest.raises(InputError, match="two channels"):
        CellsSegmenter(nuclei_channel=1, membrane_channel=1)
    with pytest.raises(InputError, match="stain"):
        CellsSegmenter(stain="golgi")
    seg = CellsSegmenter()
    with pytest.raises(InputError, match="channel axis"):
        prepared(seg, np.zeros((32, 32), np.uint16))
    with pytest.raises(InputError, match="channel 3"):
        prepared(CellsSegmenter(membrane_channel=3), np.zeros((2, 32, 32), np.uint16), 0)


def test_registered_as_cells():
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    entries = tomllib.loads(pyproject.read_text())["project"]["entry-points"]
    assert entries["blockbuster.segmenters"]["cells"] == \
        "blockbuster.plugins.cells:CellsSegmenter"


def test_get_segmenter_builds_it(monkeypatch):
    names = {ep.name for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    if "cells" not in names:  # an install made before the entry point was added
        real = plugins.entry_points
        extra = importlib.metadata.EntryPoint("cells", "blockbuster.plugins.cells:CellsSegmenter",
                                              plugins.ENTRY_POINT_GROUP)
        monkeypatch.setattr(plugins, "entry_points",
                            lambda group: [*real(group=group), extra])
    seg = get_segmenter("cells", diameter=24)
    assert isinstance(seg, CellsSegmenter) and seg.preferred_overlap == 24
    assert "blockbuster.plugins.cells" in sys.modules
