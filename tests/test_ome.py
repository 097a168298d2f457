"""Tests of NGFF label images (blockbuster.ome), read back with the ome-zarr reader."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from blockbuster.data import synthetic_nuclei, write_synthetic_nuclei
from blockbuster.errors import InputError, OutputExistsError
from blockbuster.ome import (
    create_label_level0,
    downsample_block,
    finalize_ome_labels,
    label_group_path,
    pyramid_factors,
    write_ome_labels,
)

SHAPE = (12, 300, 260)
CHUNKS = (6, 64, 64)


@pytest.fixture(params=[3, 2], ids=["zarr3-ngff0.5", "zarr2-ngff0.4"])
def ome_image(request, tmp_path) -> tuple[Path, np.ndarray]:
    """A synthetic OME-Zarr image and its true labels."""
    path = tmp_path / "img.ome.zarr"
    write_synthetic_nuclei(path, SHAPE, chunks=CHUNKS, ome=True, zarr_format=request.param,
                           scale=(2.0, 0.5, 0.5), diameter=10)
    _, labels = synthetic_nuclei(SHAPE, diameter=10)
    return path, labels


def _nodes(path: Path) -> list:
    return list(Reader(parse_url(str(path)))())


def _label_node(path: Path, name: str):
    for node in _nodes(path):
        if any(isinstance(s, Label) for s in node.specs) and node.metadata["name"] == name:
            return node
    raise AssertionError(f"the ome-zarr reader found no label image {name!r} in {path}")


def _ome(group: zarr.Group) -> dict:
    attrs = group.attrs.asdict()
    return attrs.get("ome", {}) if group.metadata.zarr_format == 3 else attrs


def _check_pyramid(node, labels: np.ndarray, image_shapes: list[tuple[int, ...]]) -> None:
    shapes = [tuple(d.shape) for d in node.data]
    assert shapes == image_shapes
    assert all(d.dtype == labels.dtype for d in node.data)
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    ids = set(np.unique(labels).tolist())
    for level in node.data[1:]:
        assert set(np.unique(np.asarray(level)).tolist()) <= ids


def test_engine_path_create_fill_finalize(ome_image):
    """The way tile_process uses it: write level 0 in place, then finalize."""
    path, labels = ome_image
    level0 = create_label_level0(path, "cells", labels.shape, (6, 64, 64), labels.dtype)
    assert level0.shape == SHAPE and level0.chunks == (6, 64, 64)
    # not listed (so invisible to readers) until finalized
    assert "cells" not in _ome(zarr.open_group(str(path / "labels"))).get("labels", [])
    for z in range(0, SHAPE[0], 6):  # chunk by chunk, as the engine does
        level0[z:z + 6] = labels[z:z + 6]
    out = finalize_ome_labels(path, "cells")
    assert out == path / "labels" / "cells"

    image = next(n for n in _nodes(path) if any(isinstance(s, Multiscales) for s in n.specs)
                 and n.zarr.path == str(path))
    image_shapes = [tuple(d.shape) for d in image.data]
    assert len(image_shapes) >= 2  # the image has a pyramid, and so must the labels
    node = _label_node(path, "cells")
    _check_pyramid(node, labels, image_shapes)
    # the label image's transformations are the image's
    assert node.metadata["coordinateTransformations"] == image.metadata[
        "coordinateTransformations"]
    meta = _ome(zarr.open_group(str(out)))
    assert meta["image-label"]["source"] == {"image": "../../"}
    assert meta["multiscales"][0]["axes"] == [{"name": n, "type": "space"} for n in "zyx"]
    fmt = zarr.open_group(str(path)).metadata.zarr_format
    assert meta["image-label"]["version"] == {3: "0.5", 2: "0.4"}[fmt]
    if fmt == 3:
        assert zarr.open_array(str(out / "1")).metadata.dimension_names == ("z", "y", "x")
    # no longer provisional, still marked as blockbuster's own
    assert zarr.open_group(str(out)).attrs["blockbuster"] == {"complete": True}


def test_write_ome_labels_from_memory_and_keeps_other_labels(ome_image):
    path, labels = ome_image
    write_ome_labels(labels, path, name="a")
    write_ome_labels(labels.astype(np.uint16), path, name="b")
    listed = _ome(zarr.open_group(str(path / "labels")))["labels"]
    assert listed == ["a", "b"]
    node = _label_node(path, "b")
    assert node.data[0].dtype == np.uint16
    with pytest.raises(OutputExistsError):
        write_ome_labels(labels, path, name="a")
    shifted = np.where(labels > 0, labels + 1, 0).astype(labels.dtype)
    write_ome_labels(shifted, path, name="a", overwrite=True)
    listed = _ome(zarr.open_group(str(path / "labels")))["labels"]
    assert sorted(listed) == ["a", "b"]  # replaced, not duplicated
    np.testing.assert_array_equal(np.asarray(_label_node(path, "a").data[0]), shifted)


def test_write_ome_labels_streams_a_zarr_array(tmp_path):
    path = tmp_path / "img.ome.zarr"
    shape = (2048, 2048)
    write_synthetic_nuclei(path, shape, chunks=(256, 256), ome=True, noise=0.0)
    _, labels = synthetic_nuclei(shape)
    src = zarr.create_array(str(tmp_path / "labels.zarr"), shape=shape, chunks=(256, 256),
                            dtype=labels.dtype)
    src[:] = labels
    del labels
    tracemalloc.start()
    try:
        write_ome_labels(src, path, name="seg", workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < src.nbytes / 2  # 16 MB of labels, never loaded whole
    node = _label_node(path, "seg")
    assert [tuple(d.shape) for d in node.data] == [(2048, 2048), (1024, 1024), (512, 512),
                                                   (256, 256)]
    np.testing.assert_array_equal(np.asarray(node.data[0][::7, ::5]), src[::7, ::5])


def test_write_ome_labels_on_its_own_level0_does_not_copy(ome_image):
    path, labels = ome_image
    level0 = create_label_level0(path, "inplace", labels.shape, CHUNKS, labels.dtype)
    level0[:] = labels
    chunk_files = sorted(p for p in (path / "labels" / "inplace" / "0").rglob("*")
                         if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))
    stamps = [p.stat().st_mtime_ns for p in chunk_files]
    write_ome_labels(level0, path, name="inplace")
    assert [p.stat().st_mtime_ns for p in chunk_files] == stamps
    _check_pyramid(_label_node(path, "inplace"), labels,
                   [tuple(d.shape) for d in _label_node(path, "inplace").data])


def test_standalone_label_image(tmp_path):
    _, labels = synthetic_nuclei((700, 900), diameter=10)
    out = tmp_path / "seg.ome.zarr"
    result = write_ome_labels(labels, None, name="seg", standalone_path=out)
    assert result == out
    nodes = _nodes(out)
    node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert any(isinstance(s, Multiscales) for s in node.specs)
    # default chunks are zarr's; the pyramid goes down to about a tile (<= 256 here)
    shapes = [tuple(d.shape) for d in node.data]
    assert shapes[0] == (700, 900)
    assert all(b == (-(-a[0] // 2), -(-a[1] // 2)) for a, b in itertools.pairwise(shapes))
    assert max(shapes[-1]) <= max(256, *zarr.open_array(str(out / "0")).chunks)
    assert len(shapes) >= 2
    _check_pyramid(node, labels, shapes)
    meta = _ome(zarr.open_group(str(out)))
    assert meta["version"] == "0.5"
    assert "source" not in meta["image-label"]
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in meta["multiscales"][0]["datasets"]]
    assert scales[:3] == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]


def test_standalone_labels_point_to_their_image(ome_image, tmp_path):
    path, labels = ome_image
    out = tmp_path / "elsewhere" / "cells.ome.zarr"
    write_ome_labels(labels, path, name="cells", standalone_path=out)
    meta = _ome(zarr.open_group(str(out)))
    source = meta["image-label"]["source"]["image"]
    assert (out / source).resolve() == path.resolve()
    assert meta["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        2.0, 0.5, 0.5]
    # the reader follows the source to the image
    paths = [n.zarr.path for n in _nodes(out)]
    assert str(path.resolve()) in paths
    # and the image itself got no labels entry
    assert not (path / "labels" / "cells").exists()


def test_metadata_validates_with_ome_zarr_models(ome_image):
    models = pytest.importorskip("ome_zarr_models")
    path, labels = ome_image
    write_ome_labels(labels, path, name="cells")
    fmt = zarr.open_group(str(path)).metadata.zarr_format
    version = {3: "v05", 2: "v04"}[fmt]
    kinds = {
        path: "Image",
        path / "labels": "Labels",
        path / "labels" / "cells": "ImageLabel",
    }
    for where, kind in kinds.items():
        model = models.open_ome_zarr(zarr.open_group(str(where), mode="r"))
        assert type(model).__name__ == kind
        assert type(model).__module__.split(".")[1] == version


def test_multichannel_parent_drops_the_channel_axis(tmp_path):
    from ome_zarr.writer import write_image

    path = tmp_path / "cyx.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    write_image(rng.integers(0, 100, (2, 128, 96), dtype=np.uint16), group, axes="cyx",
                scale_factors=[2], storage_options={"chunks": (1, 64, 64)})
    labels = (rng.random((128, 96)) > 0.5).astype(np.uint8) * 3
    write_ome_labels(labels, path, name="mask")
    meta = _ome(zarr.open_group(str(path / "labels" / "mask")))
    ms = meta["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(len(t["scale"]) == 2 for d in ms["datasets"] for t in d["coordinateTransformations"]
               if t["type"] == "scale")
    node = _label_node(path, "mask")
    assert [tuple(d.shape) for d in node.data] == [(128, 96), (64, 48)]


def test_labels_must_fit_the_image(ome_image):
    path, _ = ome_image
    with pytest.raises(InputError, match="do not fit"):
        create_label_level0(path, "bad", (12, 300, 259), CHUNKS, "uint32")
    with pytest.raises(InputError, match="integer"):
        create_label_level0(path, "bad", SHAPE, CHUNKS, "float32")
    with pytest.raises(InputError, match="name"):
        create_label_level0(path, "a/b", SHAPE, CHUNKS, "uint32")
    with pytest.raises(InputError, match="create_label_level0"):
        finalize_ome_labels(path, "never-created")
    with pytest.raises(InputError, match="not an OME-Zarr image"):
        create_label_level0(path / "0", "x", SHAPE, CHUNKS, "uint32")
    with pytest.raises(InputError):
        label_group_path(None)


def test_overwrite_unlists_while_rewriting(ome_image):
    path, labels = ome_image
    write_ome_labels(labels, path, name="cells")
    create_label_level0(path, "cells", SHAPE, CHUNKS, labels.dtype, overwrite=True)
    listed = _ome(zarr.open_group(str(path / "labels"))).get("labels", [])
    assert "cells" not in listed  # a reader must not open a half-written label image


# -- downsampling ----------------------------------------------------------------------------
def _reference_mode(arr: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Plain-Python statement of the documented rule, voxel by voxel."""
    pad = [(0, (-s) % f) for s, f in zip(arr.shape, factors, strict=True)]
    arr = np.pad(arr, pad, mode="edge")
    out_shape = tuple(s // f for s, f in zip(arr.shape, factors, strict=True))
    out = np.empty(out_shape, arr.dtype)
    for idx in np.ndindex(*out_shape):
        region = tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors, strict=True))
        block = arr[region].ravel()
        score = {v: 2 * int((block == v).sum()) + int(v != 0) for v in block.tolist()}
        best = max(score.values())
        out[idx] = next(v for v in block.tolist() if score[v] == best)
    return out


@pytest.mark.parametrize("shape,factors", [((9, 11), (2, 2)), ((5, 7, 6), (2, 2, 2)),
                                           ((5, 7, 6), (1, 2, 2)), ((8, 9), (3, 1))])
def test_mode_downsampling_matches_the_rule(shape, factors):
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, 4, shape).astype(np.int32)
    arr[: shape[0] // 2] = 7  # uniform blocks take the fast path
    got = downsample_block(arr, factors)
    np.testing.assert_array_equal(got, _reference_mode(arr, factors))
    assert set(np.unique(got)) <= set(np.unique(arr))


def test_mean_downsampling_rounds_integers():
    arr = np.array([[1, 2, 10, 10], [2, 2, 10, 11]], dtype=np.uint16)
    out = downsample_block(arr, (2, 2), "mean")
    assert out.dtype == np.uint16
    assert out.tolist() == [[2, 10]]  # 1.75 -> 2, 10.25 -> 10
    with pytest.raises(InputError):
        downsample_block(arr, (2, 2), "median")


# -- pyramid rule ----------------------------------------------------------------------------
def test_pyramid_rule():
    # in-plane axes are halved until the level fits in max(chunk, 256)
    assert pyramid_factors((5000, 300), "yx", (512, 512)) == [(2, 2), (2, 2), (2, 2), (2, 2)]
    assert pyramid_factors((200, 200), "yx", (64, 64)) == []
    # z is halved only once it is not much thinner than the plane
    assert pyramid_factors((256, 2048, 2048), "zyx", (64, 128, 128)) == [
        (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pyramid_factors((64, 4096, 4096), "zyx", (64, 128, 128)) == [(1, 2, 2)] * 4
    # ... and not while its voxels are coarser than the plane's
    assert all(x[0] == 1 for x in pyramid_factors((256, 1024, 1024), "zyx", (64, 64, 64),
                                                  scale=(8.0, 1.0, 1.0)))
    # time and channel axes are never downsampled
    f = pyramid_factors((3, 2, 64, 2048, 2048), "tczyx", (1, 1, 64, 256, 256))
    assert all(x[:2] == (1, 1) for x in f)
    # n_levels wins, but never shrinks a 1-voxel axis
    assert pyramid_factors((4, 4), "yx", (4, 4), n_levels=5) == [(2, 2), (2, 2)]


def test_level_metadata_is_plain_json(ome_image):
    path, labels = ome_image
    out = write_ome_labels(labels, path, name="cells")
    doc = (out / ("zarr.json" if (out / "zarr.json").exists() else ".zattrs")).read_text()
    meta = json.loads(doc)
    assert "multiscales" in json.dumps(meta)
