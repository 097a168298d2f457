"""OME-Zarr output: labels inside the image (NGFF image-label) or standalone, with a pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

import blockbuster
from blockbuster import tile_process
from blockbuster.data import write_synthetic_nuclei
from blockbuster.errors import IncompleteOutputError


def threshold_label(tile):
    from scipy import ndimage

    return ndimage.label(tile > np.percentile(tile, 60))[0]


@pytest.fixture(params=[3, 2], ids=["zarr-v3", "zarr-v2"])
def ome_image(request, tmp_path):
    path = tmp_path / "nuclei.ome.zarr"
    write_synthetic_nuclei(path, (512, 512), chunks=(128, 128), ome=True,
                           zarr_format=request.param)
    return path


def label_nodes(path):
    """The label images the ome-zarr reader (what napari uses) finds from ``path``."""
    return [node for node in Reader(parse_url(str(path)))()
            if any(type(spec).__name__ == "Label" for spec in node.specs)]


def test_ome_input_gets_labels_inside_the_image(ome_image):
    out = tile_process(ome_image, threshold_label, (128, 128), 8, stitch="iou", progress=False)
    group = ome_image / "labels" / "blockbuster"
    assert out.shape == (512, 512)
    np.testing.assert_array_equal(blockbuster.open_labels(group)[:], out[:])
    # opening the image, the ome-zarr reader finds the label image and its pyramid
    (label,) = label_nodes(ome_image)
    assert "labels/blockbuster" in str(label.zarr)
    levels = label.data
    assert len(levels) >= 2
    assert [tuple(lv.shape) for lv in levels][:2] == [(512, 512), (256, 256)]
    assert set(np.unique(np.asarray(levels[1]))) <= set(np.unique(out[:]))
    listed = zarr.open_group(str(ome_image / "labels"), mode="r").attrs
    labels_attr = listed.get("ome", listed).get("labels")
    assert labels_attr == ["blockbuster"]


def test_standalone_ome_output(tmp_path):
    image = np.zeros((200, 180), np.uint8)
    image[20:60, 30:170] = 9
    target = tmp_path / "cells.ome.zarr"
    out = tile_process(image, threshold_label, (64, 64), 4, stitch="iou", output=target,
                       progress=False)
    assert out.attrs["blockbuster"]["complete"]
    (label,) = label_nodes(target)
    assert np.asarray(label.data[0]).max() == 1


def test_open_labels_refuses_an_unfinished_ome_label_image(ome_image):
    def broken(tile):
        raise RuntimeError("out of memory")

    with pytest.raises(blockbuster.TileFailures):
        tile_process(ome_image, broken, (128, 128), retries=0, progress=False)
    group = ome_image / "labels" / "blockbuster"
    if group.exists():
        with pytest.raises(IncompleteOutputError):
            blockbuster.open_labels(group)
