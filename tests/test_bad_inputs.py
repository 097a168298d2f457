"""Bad inputs: a blockbuster error that names the cause, and nothing left behind.

The contract of issue 13: every bad input gets an error of a :class:`BlockbusterError` class
that names its cause (the argument, path, dataset, tile or chunk), raised before any tile runs
where it can be; nothing that looks complete is left behind, and a corrected rerun is never
blocked by the failed one. Each row of :data:`CASES` is one bad input: the error class, words
the message must hold, and what may stay on disk (by default nothing: the inputs untouched and
no output, work directory or lock).

Inputs are made in ``<tmp>/in``, outputs go to ``<tmp>/out``; :class:`Inputs` remembers the
tree after making each input so that a case can check that the run changed nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.errors import (
    BlockbusterError,
    IncompleteOutputError,
    InputError,
    InputReadError,
    OutputExistsError,
    OutputWriteError,
    TileError,
    TileFailures,
    TileSizeError,
)
from blockbuster.plugins import get_segmenter
from blockbuster.plugins.cells import CellsSegmenter
from blockbuster.plugins.watershed import WatershedSegmenter
from blockbuster.status import open_labels

TILE = (32, 32)


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


def blobs(shape: tuple[int, ...] = (64, 64), dtype: Any = np.uint8) -> np.ndarray:
    """Round bright objects on a dark background, the same every time."""
    rng = np.random.default_rng(7)
    image = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    return (image * 200).astype(dtype)


class Inputs:
    """Inputs of one case in ``<tmp>/in`` and its output location ``<tmp>/out/labels.zarr``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dir = tmp / "in"
        self.dir.mkdir()
        self.arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self._tree = self.tree()

    @property
    def out(self) -> Path:
        return self.tmp / "out" / "labels.zarr"

    # -- making inputs ----------------------------------------------------------------------
    def array(self, data: np.ndarray) -> np.ndarray:
        """An array given in memory (checked unchanged afterwards)."""
        self.arrays.append((data, data.copy()))
        return data

    def zarr(self, data: np.ndarray | None = None, name: str = "img.zarr",
             chunks: tuple[int, ...] = TILE) -> Path:
        data = blobs() if data is None else data
        path = self.dir / name
        zarr.create_array(store=str(path), shape=data.shape, chunks=chunks[:data.ndim],
                          dtype=data.dtype)[:] = data
        return self._made(path)

    def ome(self, edit: Callable[[dict[str, Any]], None] | None = None,
            data: np.ndarray | None = None, name: str = "img.ome.zarr") -> Path:
        """An NGFF 0.5 image (level ``s0``); ``edit`` changes its ``ome`` attributes first."""
        data = blobs() if data is None else data
        path = self.dir / name
        root = zarr.open_group(str(path), mode="w")
        root.create_array("s0", shape=data.shape, chunks=TILE[:data.ndim] + (1,) * (
            data.ndim - 2), dtype=data.dtype)[:] = data
        axes = [{"name": n, "type": "space"} for n in "zyx"[-data.ndim:]]
        ome = {"version": "0.5", "multiscales": [{
            "axes": axes,
            "datasets": [{"path": "s0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] * data.ndim}]}]}]}
        if edit is not None:
            edit(ome)
        root.attrs["ome"] = ome
        return self._made(path)

    def tiff(self, data: np.ndarray | None = None, name: str = "img.tif",
             keep: float | None = None) -> Path:
        """A tiled TIFF; ``keep``: cut the file to that fraction of its size."""
        import tifffile

        path = self.dir / name
        tifffile.imwrite(path, blobs() if data is None else data, tile=(32, 32))
        if keep is not None:
            raw = path.read_bytes()
            path.write_bytes(raw[:int(len(raw) * keep)])
        return self._made(path)

    def file(self, name: str, content: bytes = b"not an image") -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return self._made(path)

    def folder(self, name: str) -> Path:
        (self.dir / name).mkdir()
        return self._made(self.dir / name)

    def corrupt_chunk(self, path: Path, key: str) -> Path:
        (path / key).write_bytes(b"garbage, not a compressed chunk")
        return self._made(path)

    def _made(self, path: Path) -> Path:
        self._tree = self.tree()
        return path

    # -- what changed -------------------------------------------------------------------------
    def tree(self) -> dict[str, bytes | None]:
        """Every file (with its bytes) and folder under the case's tmp folder."""
        return {str(p.relative_to(self.tmp)): (p.read_bytes() if p.is_file() else None)
                for p in sorted(self.tmp.rglob("*"))}

    def changes(self) -> list[str]:
        """What differs from the tree after the last input was made."""
        now = self.tree()
        changed = [f"+{k}" for k in now if k not in self._tree]
        changed += [f"-{k}" for k in self._tree if k not in now]
        changed += [f"~{k}" for k in now if k in self._tree and now[k] != self._tree[k]]
        changed += [f"~array {i}" for i, (given, copy) in enumerate(self.arrays)
                    if not np.array_equal(given, copy, equal_nan=given.dtype.kind in "fc")]
        return sorted(changed)


@dataclass(frozen=True)
class Bad:
    """One bad input: what to call, the error it must raise and what its message must name."""

    id: str
    call: Callable[[Inputs], Any]
    error: type[BaseException]
    names: tuple[str, ...]
    #: what may stay on disk, as prefixes of paths under tmp ("out/": an unfinished output)
    leaves: tuple[str, ...] = ()
    marks: tuple[Any, ...] = ()


def run(image: Any, fn: Any = label, tile_shape: Any = TILE, **kwargs: Any) -> Callable:
    """A case's call: ``tile_process`` with ``image`` (a function of the inputs) and ``kwargs``
    (values may be functions of the inputs too), writing to the case's output."""
    def call(i: Inputs) -> Any:
        given = {k: (v(i) if callable(v) and k in _LAZY else v) for k, v in kwargs.items()}
        given.setdefault("output", i.out)
        return tile_process(image(i), fn() if _is_factory(fn) else fn, tile_shape, **given)

    return call


_LAZY = {"mask", "output", "work_dir", "table", "seam_table"}


def _is_factory(fn: Any) -> bool:
    return isinstance(fn, type(lambda: None)) and fn.__name__ == "<lambda>" and \
        fn.__code__.co_argcount == 0


def zarr_in(i: Inputs) -> Path:
    return i.zarr()


def numpy_in(data: np.ndarray | None = None) -> Callable[[Inputs], np.ndarray]:
    return lambda i: i.array(blobs() if data is None else data)


def ome_with(edit: Callable[[dict[str, Any]], None]) -> Callable[[Inputs], Path]:
    return lambda i: i.ome(edit)


def first(ome: dict[str, Any]) -> dict[str, Any]:
    return ome["multiscales"][0]


def returning(value: Any) -> Callable[[np.ndarray], Any]:
    """A segmenter returning ``value(tile)``: a bad result."""
    def bad_fn(tile: np.ndarray) -> Any:
        return value(tile)

    return bad_fn


def corrupt_zarr(i: Inputs) -> Path:
    """A zarr image whose chunk (1, 1) is garbage: tile (1, 1) cannot be read."""
    path = i.zarr()
    return i.corrupt_chunk(path, "c/1/1")


def _needs(module: str) -> tuple[Any, ...]:
    """Marks of a case that imports a heavy optional plugin (slow; skipped without it)."""
    import importlib.util

    return (pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                                 reason=f"{module} is not installed"))


def cellpose(**kwargs: Any) -> Any:
    from blockbuster.plugins.cellpose import cellpose_fn

    return cellpose_fn("cpsam", **kwargs)


def stardist(model: str, **kwargs: Any) -> Any:
    from blockbuster.plugins.stardist import stardist_fn

    return stardist_fn(model, **kwargs)


def cells_image(i: Inputs) -> np.ndarray:
    return i.array(np.stack([blobs(), blobs()[::-1]]))


# -- the table ------------------------------------------------------------------------------------
CASES: list[Bad] = [
    # 8. parameters that cannot make sense for the image: refused before any tile
    Bad("watershed-diameter-1e9", run(zarr_in, lambda: WatershedSegmenter(diameter=1e9)),
        InputError, ("diameter=1000000000", "image")),
    Bad("watershed-kernel-larger-than-tile",
        run(zarr_in, lambda: WatershedSegmenter(diameter=60), (16, 16), overlap=0),
        InputError, ("diameter=60", "tile", "tile_shape")),
    Bad("watershed-sigma-larger-than-image",
        run(zarr_in, lambda: WatershedSegmenter(diameter=8, sigma=200)),
        InputError, ("sigma=200", "image")),
    Bad("watershed-min-distance-larger-than-image",
        run(zarr_in, lambda: WatershedSegmenter(diameter=8, min_distance=500)),
        InputError, ("min_distance=500", "image")),
    Bad("watershed-diameter-on-a-1-voxel-image",
        run(numpy_in(np.ones((1, 1), np.uint8)), "watershed", "auto"),
        InputError, ("diameter=12", "(1, 1)")),
    Bad("cells-diameter-larger-than-image",
        run(cells_image, lambda: CellsSegmenter(diameter=1e6), channel_axis=0),
        InputError, ("diameter", "image")),
    Bad("cells-sigma-larger-than-tile",
        run(cells_image, lambda: CellsSegmenter(diameter=8, sigma=5), (16, 16),
            channel_axis=0, overlap=0),
        InputError, ("sigma=5", "tile")),
    Bad("cellpose-diameter-larger-than-image", run(zarr_in, lambda: cellpose(diameter=200)),
        InputError, ("diameter=200", "(64, 64)"), marks=_needs("cellpose")),
    Bad("cellpose-diameter-larger-than-tile",
        run(zarr_in, lambda: cellpose(diameter=40), (16, 16), overlap=0),
        InputError, ("diameter=40", "tile", "tile_shape"), marks=_needs("cellpose")),
    Bad("cellpose-do-3d-on-a-2d-image", run(zarr_in, lambda: cellpose(do_3D=True)),
        InputError, ("do_3D=True", "(64, 64)"), marks=_needs("cellpose")),
    Bad("stardist-3d-model-on-a-2d-image", run(zarr_in, lambda: stardist("3D_demo")),
        InputError, ("3D_demo", "(64, 64)"), marks=_needs("stardist")),
    Bad("stardist-n-tiles-larger-than-tile",
        run(zarr_in, lambda: stardist("2D_versatile_fluo", n_tiles=(64, 1)), (16, 16),
            overlap=0), InputError, ("n_tiles=(64, 1)", "16 voxels"), marks=_needs("stardist")),
    Bad("overlap-larger-than-image", run(zarr_in, overlap=1000),
        InputError, ("overlap=1000", "(64, 64)")),
    Bad("overlap-tuple-larger-than-image", run(zarr_in, overlap=(100, 500)),
        InputError, ("overlap=(100, 500)", "(64, 64)")),
    Bad("overlap-huge", run(zarr_in, overlap=10**12), InputError, ("overlap=",)),
    # plugins' own arguments
    Bad("watershed-diameter-str", lambda i: WatershedSegmenter(diameter="12"),
        InputError, ("diameter='12'", "number")),
    Bad("watershed-diameter-nan", lambda i: WatershedSegmenter(diameter=float("nan")),
        InputError, ("diameter=nan", "finite")),
    Bad("watershed-diameter-negative", lambda i: WatershedSegmenter(diameter=-3),
        InputError, ("diameter=-3",)),
    Bad("watershed-threshold-method", lambda i: WatershedSegmenter(threshold_method="magic"),
        InputError, ("threshold_method='magic'", "otsu")),
    Bad("watershed-min-size-float", lambda i: WatershedSegmenter(min_size=2.5),
        InputError, ("min_size=2.5",)),
    Bad("watershed-channel-negative", lambda i: WatershedSegmenter(channel=-1),
        InputError, ("channel=-1",)),
    Bad("watershed-channel-out-of-range", run(zarr_in, lambda: WatershedSegmenter(channel=2)),
        InputError, ("channel=2", "1 channel")),
    Bad("segmenter-unknown-argument", lambda i: get_segmenter("watershed", diamter=12),
        InputError, ("diamter", "diameter", "watershed")),
    Bad("segmenter-unknown-name", run(zarr_in, "watershedd"), InputError,
        ("watershedd", "installed segmenters")),
    Bad("cells-stain", lambda i: CellsSegmenter(stain="dna"), InputError, ("stain='dna'",)),
    Bad("cells-same-channels", lambda i: CellsSegmenter(nuclei_channel=1, membrane_channel=1),
        InputError, ("nuclei_channel", "membrane_channel")),
    Bad("cells-compactness-negative", lambda i: CellsSegmenter(compactness=-1),
        InputError, ("compactness=-1",)),
    Bad("cells-without-channel-axis", run(zarr_in, lambda: CellsSegmenter(diameter=8)),
        InputError, ("channel axis", "channel_axis=")),

    # 9. metadata naming what is not there, or not of the right kind
    Bad("ome-dataset-missing", lambda i: tile_process(
        i.ome(lambda o: first(o)["datasets"][0].update(path="0")), label, TILE, output=i.out),
        InputError, ("img.ome.zarr", "'0'", "dataset")),
    Bad("ome-datasets-not-a-list", run(ome_with(lambda o: first(o).update(
        datasets={"path": "s0"}))), InputError, ("img.ome.zarr", "datasets", "list")),
    Bad("ome-dataset-without-path", run(ome_with(lambda o: first(o).update(
        datasets=[{"coordinateTransformations": []}]))), InputError,
        ("img.ome.zarr", "path")),
    Bad("ome-multiscales-not-a-list", run(ome_with(lambda o: o.update(multiscales={"a": 1}))),
        InputError, ("img.ome.zarr", "multiscales")),
    Bad("ome-multiscales-empty", run(ome_with(lambda o: o.update(multiscales=[]))),
        InputError, ("img.ome.zarr", "multiscales")),
    Bad("ome-multiscale-not-an-object", run(ome_with(lambda o: o.update(multiscales=["s0"]))),
        InputError, ("img.ome.zarr", "multiscales")),
    Bad("ome-axes-not-a-list", run(ome_with(lambda o: first(o).update(axes="yx"))),
        InputError, ("img.ome.zarr", "axes")),
    Bad("ome-too-few-axes", run(ome_with(lambda o: first(o).update(
        axes=[{"name": "x", "type": "space"}]))), InputError,
        ("img.ome.zarr", "1 axes", "(64, 64)")),
    Bad("ome-one-space-axis-300-channels", run(ome_with(lambda o: first(o).update(
        axes=[{"name": "c", "type": "channel"}, {"name": "x", "type": "space"}]))),
        InputError, ("img.ome.zarr", "space axes", "c, x")),
    Bad("ome-duplicate-axis-names", run(ome_with(lambda o: first(o).update(
        axes=[{"name": "y", "type": "space"}, {"name": "y", "type": "space"}]))),
        InputError, ("img.ome.zarr", "'y'")),
    Bad("ome-axis-without-name", run(ome_with(lambda o: first(o).update(
        axes=[{"type": "space"}, {"name": "x", "type": "space"}]))),
        InputError, ("img.ome.zarr", "name")),
    Bad("ome-scale-wrong-length", run(ome_with(lambda o: first(o)["datasets"][0].update(
        coordinateTransformations=[{"type": "scale", "scale": [1.0, 1.0, 1.0]}]))),
        InputError, ("img.ome.zarr", "scale", "3")),
    Bad("ome-scale-not-numbers", run(ome_with(lambda o: first(o)["datasets"][0].update(
        coordinateTransformations=[{"type": "scale", "scale": ["a", "b"]}]))),
        InputError, ("img.ome.zarr", "scale")),
    Bad("zarr-metadata-not-json",
        run(lambda i: i.file("img.zarr/zarr.json", b"{not json").parent),
        InputError, ("img.zarr",)),
    Bad("corrupt-chunk-under-watershed", run(corrupt_zarr, "watershed"),
        InputReadError, ("img.zarr", "c/1/1")),
    Bad("corrupt-chunk-is-a-failed-tile", run(corrupt_zarr), TileFailures,
        ("tile (1, 1)", "img.zarr", "c/1/1", "resume=True"),
        leaves=("out",)),

    # 10. messages
    Bad("nan-under-watershed",
        run(numpy_in(np.where(blobs() > 0, np.nan, 1.0).astype(np.float32)), "watershed"),
        InputError, ("NaN", "watershed", "in-memory")),
    Bad("inf-under-watershed",
        run(lambda i: i.zarr(np.where(blobs() > 0, np.inf, 1.0).astype(np.float32)),
            "watershed"), InputError, ("infinite", "img.zarr")),
    Bad("truncated-tiff", run(lambda i: i.tiff(keep=0.5)), InputError,
        ("img.tif", "truncated")),
    Bad("tiff-header-only", run(lambda i: i.tiff(keep=0.002)), InputError,
        ("img.tif", "no image")),
    Bad("tif-that-is-not-a-tiff", run(lambda i: i.file("img.tif")), InputError, ("img.tif",)),
    Bad("overlap-float", run(zarr_in, overlap=4.5), InputError, ("overlap=4.5", "int")),
    Bad("overlap-float-in-tuple", run(zarr_in, overlap=(4, 4.5)), InputError,
        ("overlap=(4, 4.5)",)),
    Bad("overlap-str", run(zarr_in, overlap="8"), InputError, ("overlap='8'",)),
    Bad("overlap-bool", run(zarr_in, overlap=True), InputError, ("overlap=True",)),
    Bad("overlap-negative", run(zarr_in, overlap=-1), InputError, ("overlap=-1",)),
    Bad("overlap-wrong-length", run(zarr_in, overlap=(1, 2, 3)), InputError,
        ("overlap=(1, 2, 3)", "2")),
    Bad("iou-threshold-str", run(zarr_in, iou_threshold="0.5"), InputError,
        ("iou_threshold='0.5'",)),
    Bad("iou-threshold-1.5", run(zarr_in, iou_threshold=1.5), InputError,
        ("iou_threshold=1.5",)),
    Bad("iou-threshold-nan", run(zarr_in, iou_threshold=float("nan")), InputError,
        ("iou_threshold=nan",)),
    Bad("memory-lots", run(zarr_in, tile_shape="auto", memory="lots"), InputError,
        ("memory='lots'",)),
    Bad("memory-negative", run(zarr_in, tile_shape="auto", memory=-5), InputError,
        ("memory=-5",)),
    Bad("memory-list", run(zarr_in, tile_shape="auto", memory=[8]), InputError,
        ("memory=[8]",)),

    # dtypes and shapes
    Bad("dtype-complex", run(numpy_in(blobs().astype(np.complex64))), InputError,
        ("complex64",)),
    Bad("dtype-object", run(numpy_in(blobs().astype(object))), InputError, ("object",)),
    Bad("dtype-str", run(numpy_in(np.full((8, 8), "a"))), InputError, ("<U1",)),
    Bad("dtype-datetime", run(numpy_in(np.zeros((8, 8), "datetime64[s]"))), InputError,
        ("datetime64",)),
    Bad("zero-size-axis", run(numpy_in(np.zeros((0, 8), np.uint8))), InputError,
        ("(0, 8)", "empty")),
    Bad("zero-d-array", run(numpy_in(np.array(5))), InputError, ("no spatial axis",)),
    Bad("a-list-not-an-array", run(lambda i: [[1, 2], [3, 4]]), InputError, ("list",)),

    # tile shapes
    Bad("tile-shape-zero", run(zarr_in, tile_shape=(0, 32)), InputError,
        ("tile_shape=(0, 32)", "axis 0")),
    Bad("tile-shape-negative", run(zarr_in, tile_shape=(-5, 32)), InputError,
        ("tile_shape=(-5, 32)",)),
    Bad("tile-shape-wrong-length", run(zarr_in, tile_shape=(32,)), InputError,
        ("tile_shape=(32,)", "2 sizes")),
    Bad("tile-shape-float", run(zarr_in, tile_shape=(32.5, 32)), InputError,
        ("tile_shape=(32.5, 32)", "int")),
    Bad("tile-shape-bool", run(zarr_in, tile_shape=True), InputError, ("tile_shape=True",)),
    Bad("tile-shape-str", run(zarr_in, tile_shape="big"), InputError, ("tile_shape='big'",)),
    Bad("tile-shape-none-for-numpy", run(numpy_in(), tile_shape=None), InputError,
        ("tile_shape=None", "NumPy")),
    Bad("tile-shape-callable-nonsense", run(zarr_in, tile_shape=lambda shape, dtype: "x"),
        TileSizeError, ("tile_shape callable",)),

    # channel axes and channels
    Bad("channel-axis-out-of-range", run(numpy_in(), channel_axis=5), InputError,
        ("channel_axis=5", "2 axes")),
    Bad("channel-axis-float", run(numpy_in(), channel_axis=1.0), InputError,
        ("channel_axis=1.0",)),
    Bad("channel-axis-str", run(numpy_in(), channel_axis="c"), InputError,
        ("channel_axis='c'",)),
    Bad("channel-axis-leaves-no-space", run(numpy_in(np.zeros(5, np.uint8)), tile_shape=(5,),
                                            channel_axis=0), InputError, ("no spatial axis",)),

    # the segmentation function and its results (named per tile; no tile succeeded: nothing
    # is kept, so a corrected rerun needs no flag)
    Bad("fn-not-callable", run(zarr_in, 5), InputError, ("callable", "int")),
    Bad("fn-returns-wrong-shape", run(zarr_in, returning(lambda t: t[:-1])), TileError,
        ("tile (0, 0)", "shape")),
    Bad("fn-returns-float", run(zarr_in, returning(lambda t: t.astype(float))), TileError,
        ("tile (0, 0)", "float64")),
    Bad("fn-returns-float-nan", run(zarr_in, returning(lambda t: np.full(t.shape, np.nan))),
        TileError, ("tile (0, 0)", "float64")),
    Bad("fn-returns-bool", run(zarr_in, returning(lambda t: t > 0)), TileError,
        ("tile (0, 0)", "bool", "label it")),
    Bad("fn-returns-negative", run(zarr_in, returning(lambda t: -label(t))), TileError,
        ("tile (0, 0)", "negative")),
    Bad("fn-returns-none", run(zarr_in, returning(lambda t: None)), TileError,
        ("tile (0, 0)", "None")),
    Bad("fn-returns-tuple", run(zarr_in, returning(lambda t: ndimage.label(t))), TileError,
        ("tile (0, 0)", "tuple", "first item")),
    Bad("fn-returns-ragged-list", run(zarr_in, returning(lambda t: [[1, 2], [3]])),
        TileError, ("tile (0, 0)", "list")),
    Bad("fn-returns-str", run(zarr_in, returning(lambda t: "labels")), TileError,
        ("tile (0, 0)",)),
    Bad("fn-raises", run(zarr_in, returning(lambda t: 1 / 0)), TileFailures,
        ("tile (0, 0)", "ZeroDivisionError")),

    # paths and URLs
    Bad("input-missing", run(lambda i: i.dir / "nope.zarr"), InputError,
        ("input not found", "nope.zarr")),
    Bad("input-unknown-format", run(lambda i: i.file("notes.txt")), InputError,
        ("notes.txt", "no reader")),
    Bad("input-empty-folder", run(lambda i: i.folder("empty.zarr")), InputError,
        ("empty.zarr",)),
    Bad("url-connection-refused", run(lambda i: "http://127.0.0.1:9/img.zarr"), InputError,
        ("http://127.0.0.1:9/img.zarr", "cannot reach")),
    Bad("url-unknown-host", run(lambda i: "http://blockbuster-test.invalid/img.zarr"),
        InputError, ("blockbuster-test.invalid", "cannot reach")),
    Bad("output-is-a-file", run(zarr_in, output=lambda i: i.file("labels.zarr")),
        OutputExistsError, ("labels.zarr", "file")),
    Bad("output-inside-a-file", run(zarr_in, output=lambda i: i.file("f") / "labels.zarr"),
        InputError, ("output", "f/labels.zarr cannot be created", "not a folder")),
    Bad("output-is-the-input", run(zarr_in, output=lambda i: i.dir / "img.zarr"),
        InputError, ("img.zarr", "is the input")),
    Bad("output-user-folder", run(zarr_in, output=lambda i: i.file("res/keep.txt").parent),
        OutputExistsError, ("res", "keep.txt")),

    # masks
    Bad("mask-wrong-dimensionality", run(zarr_in, mask=lambda i: np.ones((4, 4, 4), bool)),
        InputError, ("mask", "spatial axes")),
    Bad("mask-float-values", run(zarr_in, mask=lambda i: np.full((8, 8), 0.3)), InputError,
        ("mask", "float64")),
    Bad("mask-complex", run(zarr_in, mask=lambda i: np.ones((8, 8), complex)), InputError,
        ("mask", "complex128")),
    Bad("mask-empty", run(zarr_in, mask=lambda i: np.zeros((0, 8), bool)), InputError,
        ("mask", "(0, 8)")),
    Bad("mask-path-missing", run(zarr_in, mask=lambda i: i.dir / "mask.zarr"), InputError,
        ("mask.zarr", "not found")),

    # tables
    Bad("table-folder-missing", run(zarr_in, table=lambda i: i.dir / "no" / "t.csv"),
        InputError, ("t.csv", "does not exist")),
    Bad("table-suffix", run(zarr_in, table=lambda i: i.dir / "t.xlsx"), InputError,
        ("t.xlsx", ".csv")),
    Bad("table-exists", run(zarr_in, table=lambda i: i.file("t.csv", b"keep")),
        OutputExistsError, ("t.csv", "overwrite=True")),
    Bad("table-int", run(zarr_in, table=5), InputError, ("table=5",)),
    # 12. every output location checked before the first tile: the seam table too
    Bad("seam-table-folder-missing", run(zarr_in, seam_table=lambda i: i.dir / "no" / "s.tsv"),
        InputError, ("the seam table", "s.tsv", "does not exist")),
    Bad("seam-table-exists", run(zarr_in, seam_table=lambda i: i.file("s.tsv", b"keep")),
        OutputExistsError, ("the seam table", "s.tsv", "seam_table=")),
    Bad("seam-table-is-the-input", run(lambda i: i.tiff(), seam_table=lambda i: i.dir /
                                       "img.tif", overwrite=True),
        InputError, ("the seam table", "img.tif", "the input")),
    Bad("table-inside-the-input", run(zarr_in, table=lambda i: i.dir / "img.zarr" / "t.csv"),
        InputError, ("the object table", "t.csv", "the input")),

    # work directories
    Bad("work-dir-is-a-file", run(zarr_in, work_dir=lambda i: i.file("work")),
        OutputExistsError, ("work", "file")),
    Bad("work-dir-of-user-files", run(zarr_in, work_dir=lambda i: i.file("w/mine.txt").parent),
        OutputExistsError, ("mine.txt",)),
    Bad("work-dir-inside-input", run(zarr_in, work_dir=lambda i: i.dir / "img.zarr" / "w"),
        InputError, ("work directory", "img.zarr")),
    Bad("work-dir-int", run(zarr_in, work_dir=5), InputError, ("work_dir=5",)),

    # clients
    Bad("client-str", run(zarr_in, client="cluster"), InputError, ("client='cluster'",)),
    Bad("client-int", run(zarr_in, client=5), InputError, ("client=5",)),

    # stitching, retries and the rest
    Bad("stitch-unknown", run(zarr_in, stitch="glue"), InputError, ("glue", "faces")),
    Bad("connectivity-zero", run(zarr_in, stitch="faces", connectivity=0), InputError,
        ("connectivity=0",)),
    Bad("connectivity-too-large", run(zarr_in, stitch="faces", connectivity=3), InputError,
        ("connectivity=3",)),
    Bad("connectivity-str", run(zarr_in, stitch="faces", connectivity="1"), InputError,
        ("connectivity='1'",)),
    Bad("retries-negative", run(zarr_in, retries=-1), InputError, ("retries=-1",)),
    Bad("retries-float", run(zarr_in, retries=1.5), InputError, ("retries=1.5",)),
    Bad("overwrite-and-resume", run(zarr_in, overwrite=True, resume=True), InputError,
        ("overwrite=True", "resume=True")),
    Bad("label-name-with-slash", run(zarr_in, ome=True, label_name="a/b"), InputError,
        ("label_name='a/b'",)),
    Bad("label-name-empty", run(zarr_in, ome=True, label_name=""), InputError,
        ("label_name=''",)),
    Bad("measure-without-table", run(zarr_in, measure=True), InputError,
        ("measure=True", "table")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_a_bad_input_is_named_and_leaves_nothing(case: Bad, tmp_path: Path) -> None:
    inputs = Inputs(tmp_path)
    with pytest.raises(case.error) as info:
        case.call(inputs)
    err = info.value
    assert isinstance(err, BlockbusterError), f"{type(err).__name__}: {err}"
    message = str(err)
    assert "internal error" not in message
    for name in case.names:
        assert name in message, f"{name!r} is not named in: {message}"
    assert "\n" not in message.split("Traceback")[0].strip() or isinstance(err, TileFailures)
    left = [c for c in inputs.changes()
            if not any(c[1:].startswith(prefix) for prefix in case.leaves)]
    assert left == [], f"left on disk: {left}"


def test_the_table_holds_at_least_60_bad_inputs() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


# -- leftovers: a failed run never blocks the corrected one ------------------------------------
@pytest.mark.parametrize("threads", [False, True], ids=["in-process", "threads"])
def test_an_unreadable_chunk_fails_its_tile_only(tmp_path: Path, threads: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    inputs = Inputs(tmp_path)
    image = corrupt_zarr(inputs)
    with ThreadPoolExecutor(2) as pool:
        client = pool if threads else None
        with pytest.raises(TileFailures) as info:
            tile_process(image, label, TILE, output=inputs.out, client=client)
        assert [e.tile_index for e in info.value.failures] == [(1, 1)]
        assert isinstance(info.value.failures[0].__cause__, InputReadError)
        with pytest.raises(IncompleteOutputError):
            open_labels(inputs.out)
        # the chunk is repaired (here: rewritten): a resume redoes only the failed tile
        good = blobs()
        zarr.open_array(str(image), mode="r+")[32:, 32:] = good[32:, 32:]
        labels = tile_process(image, label, TILE, output=inputs.out, resume=True, client=client)
    assert np.array_equal(labels[:] > 0, good > 0)


@pytest.mark.parametrize("bad", [
    dict(fn=WatershedSegmenter(channel=3)),
    dict(fn="watershed", image=np.where(blobs() > 0, np.nan, 1.0)),
    dict(fn=returning(lambda t: None)),
], ids=["segmenter-argument", "nan-image", "fn-result"])
def test_a_run_failing_on_its_arguments_does_not_block_the_corrected_rerun(
        tmp_path: Path, bad: dict[str, Any]) -> None:
    out = tmp_path / "labels.zarr"
    image = bad.get("image", blobs())
    with pytest.raises(BlockbusterError):
        tile_process(image, bad["fn"], TILE, output=out)
    assert list(tmp_path.iterdir()) == []  # no output, work directory or lock
    labels = tile_process(blobs(), "watershed", TILE, output=out)
    assert labels[:].max() > 0


# -- disk full ------------------------------------------------------------------------------------
def test_a_full_disk_is_a_failed_write_naming_the_path(tmp_path: Path, monkeypatch) -> None:
    """The output's store runs out of space in the middle of the run."""
    import errno

    from zarr.storage import LocalStore

    real_set = LocalStore.set
    writes = {"n": 0}

    async def full_after_two(self, key, value, *args, **kwargs):
        if key.startswith("c/"):
            writes["n"] += 1
            if writes["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", full_after_two)
    out = tmp_path / "labels.zarr"
    with pytest.raises(OutputWriteError) as info:
        tile_process(blobs((96, 96)), label, TILE, output=out)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(out) in str(err) and "No space left" in str(err)
    with pytest.raises(IncompleteOutputError):
        open_labels(out)


def test_a_file_size_limit_is_a_failed_write_naming_the_path(tmp_path: Path) -> None:
    """A real write failure from the kernel (RLIMIT_FSIZE), in a child process."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        import numpy as np
        from scipy import ndimage
        from blockbuster import tile_process
        image = ndimage.gaussian_filter(np.random.default_rng(1).random((256, 256)), 2) > 0.5
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        try:
            tile_process(image, lambda t: ndimage.label(t)[0], (32, 32),
                         output={str(tmp_path / "labels.zarr")!r})
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc), getattr(exc, "errno", None)]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    name, message, code = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "OutputWriteError", message
    assert str(tmp_path) in message and "File too large" in message
    assert code == 27  # EFBIG


# -- the CLI: the same errors, one line each ---------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--diameter", "1e9"], ["diameter"]),
    (["--overlap", "100000"], ["overlap"]),
])
def test_the_cli_refuses_bad_arguments_before_any_tile(tmp_path: Path, capsys, argv, words):
    from blockbuster.cli import main

    inputs = Inputs(tmp_path)
    image = inputs.zarr()
    code = main(["segment", str(image), str(inputs.out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "internal error" not in err
    assert any(w in err for w in words), err
    assert inputs.changes() == []


def test_unreadable_input_is_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    inputs = Inputs(tmp_path)
    image = inputs.zarr()
    os.chmod(image / "zarr.json", 0)
    try:
        with pytest.raises(InputError, match=r"img\.zarr"):
            tile_process(image, label, TILE, output=inputs.out)
    finally:
        os.chmod(image / "zarr.json", 0o644)
    shutil.rmtree(image)


def test_metadata_that_is_only_slightly_off_the_spec_still_opens(tmp_path: Path) -> None:
    """The checks refuse what would be misread, not what is merely incomplete: NGFF 0.4 axes
    without types, no coordinate transformations."""
    from blockbuster.io import open_image

    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 40, 50), dtype="u1")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}]}]
    source = open_image(tmp_path / "img.ome.zarr")
    assert (source.axis_names, source.channel_axis, source.spatial_shape) == (
        ("c", "y", "x"), 0, (40, 50))
