"""Shared plumbing of the analysis modules: open a label image, its voxel size, its tiles, and
write a new label image.

A *label image* here is anything integer with spatial axes only: labels written by
:func:`blockbuster.tile_process` (a zarr array or an OME-Zarr label image), any other integer
zarr array, or an array in memory. Physical sizes are in micrometres: the voxel size comes
from ``spacing=``, else from what a blockbuster analysis recorded when it wrote the labels
(``attrs["blockbuster"]["spacing_um"]``, None when it was unknown), else from the OME-Zarr
metadata (converted to µm from the axes' units; an axis without unit is taken as µm).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr

from .errors import IncompleteOutputError, InputError, OutputExistsError
from .io import ImageSource, open_image
from .io.model import to_micrometers
from .tiling import TileGrid

__all__ = [
    "LabelCounts",
    "LabelImage",
    "LabelOutput",
    "axis_names",
    "count_labels",
    "create_label_output",
    "label_dtype",
    "open_label_image",
    "renumber",
    "resolve_spacing",
    "tile_map",
]

log = logging.getLogger("blockbuster")

T = TypeVar("T")


#: Default tile of arrays in memory (they have no chunks): per number of spatial axes.
_DEFAULT_TILE = {1: 1 << 20, 2: 1024, 3: 128}


def axis_names(ndim: int) -> list[str]:
    """``z, y, x`` names for up to 3 axes, ``axis0...`` beyond.

    Examples
    --------
    >>> axis_names(2), axis_names(4)
    (['y', 'x'], ['axis0', 'axis1', 'axis2', 'axis3'])
    """
    return list("zyx"[-ndim:]) if ndim <= 3 else [f"axis{i}" for i in range(ndim)]


@dataclass
class LabelImage:
    """A label image opened for reading tile by tile.

    Attributes
    ----------
    source : ImageSource
        Reads any region.
    spacing : tuple of float or None
        Voxel size in µm per axis, when known.
    names : list of str
        Axis names (``z``, ``y``, ``x``, or the OME-Zarr names).
    n_labels : int or None
        The number of labels a blockbuster output says it holds (labels are then 1..n).
    """

    source: ImageSource
    spacing: tuple[float, ...] | None
    names: list[str]
    n_labels: int | None = None
    _attrs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.spatial_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def path(self) -> Path | None:
        return self.source.path

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.source.read(region)

    def grid(self, tile_shape: Sequence[int] | None = None,
             depth: Sequence[int] | None = None) -> TileGrid:
        """Tiles on the array's chunks (or ``tile_shape``), with an optional halo."""
        chunks: Any = tile_shape
        if chunks is None:
            chunks = _native_chunks(self.source)
        else:
            chunks = tuple(int(c) for c in chunks)
            if len(chunks) != self.ndim or min(chunks) < 1:
                raise InputError(f"tile_shape={tile_shape!r} must be {self.ndim} positive ints")
        return TileGrid(self.shape, chunks, depth)


def _native_chunks(source: ImageSource) -> Any:
    if source.kind == "dask":
        return tuple(source.array.chunks[a] for a in source.spatial_axes)
    chunks = source.spatial_storage_chunks
    if chunks is not None:
        return chunks
    tile = _DEFAULT_TILE.get(len(source.spatial_shape), 64)
    return tuple(min(tile, s) for s in source.spatial_shape)


def open_label_image(labels: Any, *, allow_incomplete: bool = False,
                     what: str = "labels") -> LabelImage:
    """Open a label image: a path (zarr array, OME-Zarr label image), a zarr/dask/NumPy array.

    Raises
    ------
    IncompleteOutputError
        ``labels`` were written by a blockbuster run that has not finished.
    InputError
        Not an integer image, or it has a channel axis.
    """
    if isinstance(labels, LabelImage):
        return labels
    source = open_image(labels)
    if source.channel_axis is not None:
        raise InputError(f"{what} have a channel axis ({source.shape}); a label image has "
                         "spatial axes only")
    if not np.issubdtype(source.dtype, np.integer):
        raise InputError(f"{what} have dtype {source.dtype}; a label image holds integers "
                         "(0 = background)")
    attrs = _blockbuster_attrs(source)
    if attrs.get("complete") is False and not allow_incomplete:
        raise IncompleteOutputError(
            f"{source.path or what} is not a complete blockbuster output (the run that writes "
            "it did not finish); rerun it with $resume to finish it")
    spacing, names = _ome_spacing(source)
    if "spacing_um" in attrs:  # written by blockbuster's analyses: None when it was unknown
        known = attrs["spacing_um"]
        spacing = tuple(float(s) for s in known) if isinstance(known, list) else None
    n = attrs.get("n_labels")
    return LabelImage(source, spacing, names or axis_names(len(source.spatial_shape)),
                      int(n) if isinstance(n, int) else None, attrs)


def _blockbuster_attrs(source: ImageSource) -> dict[str, Any]:
    if source.kind not in ("zarr", "ome-zarr", "zarr-array"):
        return {}
    meta = source.array.attrs.get("blockbuster")
    return dict(meta) if isinstance(meta, dict) else {}


def _ome_spacing(source: ImageSource) -> tuple[tuple[float, ...] | None, list[str] | None]:
    """Voxel size in µm and axis names of the spatial axes, from OME-Zarr metadata."""
    ome = source.ome
    if not ome or not ome.get("axes"):
        return None, None
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in ome["axes"]]
    spatial = [i for i in source.spatial_axes if i < len(axes)]
    names = [str(axes[i].get("name", f"axis{i}")) for i in spatial]
    scale = ome.get("scale")
    if not scale or len(scale) != len(axes):
        return None, names
    values = []
    for i in spatial:
        unit = axes[i].get("unit")
        values.append(to_micrometers(float(scale[i]), unit) or float(scale[i]))
    return tuple(values), names


def resolve_spacing(spacing: Any, ndim: int, *known: tuple[float, ...] | None,
                    ) -> tuple[float, ...] | None:
    """``spacing=`` as a tuple of µm per axis, else the first known voxel size, else None.

    Examples
    --------
    >>> resolve_spacing(0.5, 3), resolve_spacing(None, 2, None, (0.3, 0.3))
    ((0.5, 0.5, 0.5), (0.3, 0.3))
    """
    if spacing is None:
        for value in known:
            if value is not None and len(value) == ndim:
                return value
        return None
    values: tuple[Any, ...] = (spacing,) * ndim if np.isscalar(spacing) else tuple(spacing)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"spacing={spacing!r} must be a number or {ndim} numbers") from None
    if len(out) != ndim or not all(math.isfinite(v) and v > 0 for v in out):
        raise InputError(f"spacing={spacing!r} must be {ndim} positive numbers (µm per voxel, "
                         "one per spatial axis)")
    return out


def renumber(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local labels 0..n of a block and the original label of each: ``ids[local] == block``.

    A lookup table when the largest label is not much larger than the block (linear time),
    sorting otherwise.

    Examples
    --------
    >>> local, ids = renumber(np.array([[0, 7, 7], [3, 0, 9]]))
    >>> local.tolist(), ids.tolist()
    ([[0, 2, 2], [1, 0, 3]], [0, 3, 7, 9])
    """
    flat = block.ravel()
    top = int(flat.max(initial=0))
    if top == 0:
        return np.zeros(block.shape, np.int64), np.zeros(1, np.int64)
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(len(ids))
        return lut[block], ids.astype(np.int64)
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(block.shape).astype(np.int64), ids.astype(np.int64)


class LabelCounts:
    """Voxels per label, dense by label value, growing as larger labels come.

    Examples
    --------
    >>> counts = LabelCounts()
    >>> counts.add(np.array([0, 3, 5]), np.array([10, 2, 1]))
    >>> counts.add(np.array([0, 3]), np.array([4, 1]))
    >>> counts.labels().tolist(), counts.values[3]
    ([3, 5], np.int64(3))
    """

    def __init__(self) -> None:
        self.values = np.zeros(1, np.int64)

    def add(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts[i]`` voxels to label ``ids[i]`` (``ids[0]``, the background, is skipped)."""
        top = int(ids.max(initial=0))
        if top >= len(self.values):
            grown = np.zeros(max(top + 1, 2 * len(self.values)), np.int64)
            grown[: len(self.values)] = self.values
            self.values = grown
        np.add.at(self.values, ids[1:], counts[1:])

    def labels(self) -> np.ndarray:
        """The labels with at least one voxel, in order."""
        found = np.flatnonzero(self.values > 0)
        return found[found > 0]


def count_labels(labels: LabelImage, grid: TileGrid, progress: bool | None = None,
                 ) -> LabelCounts:
    """Voxels of every label, one tile at a time."""
    counts = LabelCounts()

    def tile_counts(tile_id: int) -> tuple[np.ndarray, np.ndarray]:
        local, ids = renumber(labels.read(grid.tile(tile_id).core))
        return ids, np.bincount(local.ravel(), minlength=len(ids))

    for ids, n in tile_map(tile_counts, range(grid.n_tiles), desc="counting", progress=progress):
        counts.add(ids, n)
    return counts


def label_dtype(max_label: int) -> np.dtype:
    return np.dtype(np.uint32 if max_label < 2**32 else np.uint64)


# -- writing a new label image ------------------------------------------------------------------
@dataclass
class LabelOutput:
    """A label image being written; :meth:`finish` marks it complete (and adds OME metadata)."""

    array: zarr.Array
    path: Path | None
    ome_name: str | None
    spacing: tuple[float, ...] | None
    names: list[str]

    def finish(self, n_labels: int, params: dict[str, Any]) -> zarr.Array:
        if self.ome_name is not None:
            from .ome import finalize_ome_labels

            axes = [{"name": n, "type": "space", "unit": "micrometer"} if self.spacing else
                    {"name": n, "type": "space"} for n in self.names]
            finalize_ome_labels(None, self.ome_name, standalone_path=self.path, axes=axes,
                                scale=list(self.spacing) if self.spacing else None)
        meta: dict[str, Any] = {"complete": True, "params": params, "n_labels": int(n_labels),
                                "format": 1}
        # Recorded even when unknown: the OME metadata must carry some scale (1), which
        # must not later pass for a voxel size of 1 µm.
        meta["spacing_um"] = list(self.spacing) if self.spacing is not None else None
        self.array.attrs["blockbuster"] = meta  # last: its presence marks a finished output
        return self.array


def default_output(source: LabelImage, suffix: str) -> Path:
    """``<labels>.<suffix>.zarr`` next to a path input; a temporary folder otherwise."""
    path = source.path
    if path is None:
        folder = Path(tempfile.mkdtemp(prefix="blockbuster-"))
        out = folder / f"labels.{suffix}.zarr"
        log.info("in-memory labels: writing the result to %s", out)
        return out
    return sibling_path(path, suffix, "zarr", ome_labels=source.source.kind == "ome-zarr")


def sibling_path(labels: Path, suffix: str, extension: str, *, ome_labels: bool = True) -> Path:
    """``<labels>.<suffix>.<extension>`` next to the labels (next to the image for OME labels).

    Examples
    --------
    >>> sibling_path(Path("data/nuclei.labels.zarr"), "measurements", "csv").as_posix()
    'data/nuclei.labels.measurements.csv'
    >>> sibling_path(Path("img.ome.zarr/labels/cells"), "filtered", "zarr").as_posix()
    'img.ome.zarr.cells.filtered.zarr'
    """
    if ome_labels and labels.parent.name == "labels":
        # <image>/labels/<name> -> <image>.<name>.<suffix>.<extension> next to the image
        image = labels.parent.parent
        return image.with_name(f"{image.name}.{labels.name}.{suffix}.{extension}")
    name = labels.name
    for ending in (".ome.zarr", ".zarr"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return labels.with_name(f"{name}.{suffix}.{extension}")


def create_label_output(output: Any, like: LabelImage, *, dtype: Any,
                        shape: Sequence[int] | None = None, chunks: Sequence[int] | None = None,
                        spacing: tuple[float, ...] | None = None, overwrite: bool = False,
                        suffix: str = "out") -> LabelOutput:
    """A new, empty label array for a result computed from ``like``.

    ``output`` is a path (an OME-Zarr label image if it ends in ``.ome.zarr``, a zarr array
    otherwise), a zarr store, or None for :func:`default_output`. The input is never replaced.
    """
    shape = tuple(like.shape if shape is None else shape)
    if chunks is None:
        grid = like.grid()
        chunks = grid.tile_shape if shape == like.shape else None
    chunks = tuple(min(int(c), s) for c, s in zip(chunks or (_DEFAULT_TILE.get(len(shape), 64),)
                                                   * len(shape), shape, strict=True))
    if output is None:
        output = default_output(like, suffix)
    if not isinstance(output, (str, Path)):
        try:
            arr = zarr.create_array(store=output, shape=shape, chunks=chunks, dtype=dtype,
                                    fill_value=0, overwrite=overwrite)
        except Exception as exc:
            if not overwrite:
                raise OutputExistsError(f"the output store holds an array; pass $overwrite "
                                        f"to replace it ({exc})") from exc
            raise
        return LabelOutput(arr, None, None, spacing, like.names)
    path = Path(output)
    if like.path is not None and _same_or_inside(path, like.path):
        raise InputError(f"output {path} is the input labels (or inside them); choose another "
                         "path: the input is never modified")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists; pass $overwrite to replace it")
    attrs: dict[str, Any] = {"blockbuster": {"complete": False}}
    if path.name.lower().endswith(".ome.zarr"):
        from .ome import create_label_level0

        name = path.name[: -len(".ome.zarr")] or "labels"
        arr = create_label_level0(None, name, shape, chunks, dtype, standalone_path=path,
                                  overwrite=overwrite)
        arr.attrs.update(attrs)
        return LabelOutput(arr, path, name, spacing, like.names)
    if path.exists():
        import shutil

        shutil.rmtree(path) if path.is_dir() else path.unlink()
    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                            fill_value=0, attributes=attrs)
    return LabelOutput(arr, path, None, spacing, like.names)


def _same_or_inside(path: Path, source: Path) -> bool:
    a, b = path.resolve(), source.resolve()
    return a == b or b in a.parents or a in b.parents


# -- running over tiles -------------------------------------------------------------------------
#: Tiles read and reduced at once: decompression and most NumPy reductions release the GIL.
THREADS = min(2, os.cpu_count() or 1)


def tile_map(func: Callable[[int], T], items: Sequence[int], *, desc: str,
             progress: bool | None = None, threads: int = THREADS) -> Iterator[T]:
    """``func(item)`` for every item, in order, with at most ``2 * threads`` results pending.

    Unlike collecting every result first, the caller folds each one as it comes, so memory
    stays a few tiles whatever the number of tiles.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .progress import make_progress

    with make_progress(len(items), desc, progress) as bar:
        if threads <= 1 or len(items) <= 1:
            for item in items:
                yield func(item)
                bar.update()
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="blockbuster") as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
                    bar.update()
            while pending:
                yield pending.popleft().result()
                bar.update()
