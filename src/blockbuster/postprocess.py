"""Post-processing of label images out of core, without seams: the tiled result is the
whole-image result, voxel for voxel.

Every function reads the labels one tile at a time and writes a *new* label image (the input is
never modified):

* :func:`filter_by_size` -- drop objects outside a size range (voxels or µm³); the labels left
  are renumbered 1..N. Two passes: sizes, then relabelling.
* :func:`expand_labels` -- grow every object into the background by a distance without
  merging touching objects, like :func:`skimage.segmentation.expand_labels`. Each tile reads a
  halo of that distance, which holds every voxel that can reach its core.
* :func:`fill_holes` -- fill background enclosed by a single object. The background's
  connected components across tiles come from :func:`blockbuster.tile_process` (stitched on
  tile faces); a component is a hole when it does not touch the image border and touches one
  label only.
* :func:`upsample_labels` -- labels of a lower pyramid level at full resolution (nearest
  neighbour), one output chunk at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ._labels import (
    LabelImage,
    LabelOutput,
    count_labels,
    create_label_output,
    label_dtype,
    open_label_image,
    renumber,
    resolve_spacing,
    tile_map,
)
from .errors import InputError
from .tiling import TileGrid

__all__ = ["expand_block", "expand_labels", "fill_holes", "filter_by_size", "upsample_labels"]

log = logging.getLogger("blockbuster")

SIZE_UNITS = ("voxels", "um3", "um2")
DISTANCE_UNITS = ("voxels", "um")


def _regular_grid(lab: LabelImage, tile_shape: Sequence[int] | None,
                  depth: Sequence[int] | None = None) -> TileGrid:
    """Tiles of one shape (the last ones clipped), so each tile writes whole output chunks."""
    grid = lab.grid(tile_shape)
    return TileGrid(lab.shape, grid.tile_shape, depth)


def _write_tiles(out: LabelOutput, grid: TileGrid, block, desc: str,
                 progress: bool | None) -> None:
    """``out[tile.core] = block(tile)`` for every tile, a few tiles at a time."""

    def write(tile_id: int) -> None:
        tile = grid.tile(tile_id)
        out.array[tile.core] = block(tile)

    for _ in tile_map(write, range(grid.n_tiles), desc=desc, progress=progress):
        pass


# -- size filter --------------------------------------------------------------------------------
def filter_by_size(labels: Any, *, min_size: float | None = None, max_size: float | None = None,
                   unit: str = "voxels", spacing: float | Sequence[float] | None = None,
                   output: Any = None, overwrite: bool = False,
                   tile_shape: Sequence[int] | None = None,
                   progress: bool | None = None) -> zarr.Array:
    """Keep the objects whose size is within ``[min_size, max_size]``, numbered 1..N.

    Parameters
    ----------
    labels : path or array
        A label image (blockbuster output, integer zarr array, array in memory).
    min_size, max_size : float, optional
        Inclusive bounds; None leaves that side open.
    unit : {"voxels", "um3", "um2"}
        Unit of the bounds; physical units need a voxel size (``spacing`` or OME-Zarr
        metadata); "um3" and "um2" are the same (µm to the number of axes).
    spacing : float or sequence of float, optional
        Voxel size in µm per axis (default: from the labels' metadata).
    output : path or zarr store, optional
        Where to write (``.ome.zarr``: an OME-Zarr label image). Default:
        ``<labels>.filtered.zarr`` next to the labels.
    overwrite : bool
        Replace an existing output.
    tile_shape : sequence of int, optional
        Tiles (default: the labels' chunks); also the output's chunks.
    progress : bool, optional
        Show progress bars (default: on a terminal).

    Returns
    -------
    zarr.Array
        The kept objects, relabelled 1..N in the order of their old labels.

    Examples
    --------
    >>> labels = np.array([[1, 1, 0, 2], [1, 0, 0, 3], [0, 0, 3, 3]])
    >>> out = filter_by_size(labels, min_size=2, tile_shape=(2, 2), progress=False)
    >>> out[:].tolist()
    [[1, 1, 0, 0], [1, 0, 0, 2], [0, 0, 2, 2]]
    """
    lab = open_label_image(labels)
    if unit not in SIZE_UNITS:
        raise InputError(f"unit={unit!r} must be one of {', '.join(SIZE_UNITS)}")
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name}={value!r} must be a size >= 0")
    spacing_um = resolve_spacing(spacing, lab.ndim, lab.spacing)
    scale = 1.0
    if unit != "voxels":
        if spacing_um is None:
            raise InputError(f"unit={unit!r} needs the voxel size: pass spacing= (µm per axis) "
                             "or use labels with OME-Zarr metadata")
        scale = math.prod(spacing_um)
    grid = _regular_grid(lab, tile_shape)
    sizes = count_labels(lab, grid, progress).values * scale
    keep = sizes > 0
    keep[0] = False
    if min_size is not None:
        keep &= sizes >= min_size
    if max_size is not None:
        keep &= sizes <= max_size
    n = int(keep.sum())
    lut = np.zeros(len(keep), label_dtype(n))
    lut[keep] = np.arange(1, n + 1)
    log.info("keeping %d of %d objects", n, int((sizes > 0).sum()) - int(sizes[0] > 0))
    out = create_label_output(output, lab, dtype=lut.dtype, chunks=grid.tile_shape,
                              spacing=spacing_um, overwrite=overwrite, suffix="filtered")
    _write_tiles(out, grid, lambda tile: lut[lab.read(tile.core)], "filtering", progress)
    return out.finish(n, {"postprocess": "filter_by_size", "min_size": min_size,
                          "max_size": max_size, "unit": unit, "source": _name(lab)})


def _name(lab: LabelImage) -> str:
    return str(lab.path) if lab.path is not None else f"<in-memory {lab.source.kind}>"


# -- expansion ----------------------------------------------------------------------------------
def expand_block(labels: np.ndarray, distance: float,
                 spacing: Sequence[float] | None = None) -> np.ndarray:
    """Grow every label of an array into the background by up to ``distance``.

    Each background voxel within ``distance`` of an object takes the label of the nearest one;
    when several objects are equally near, the smaller label wins (scikit-image leaves ties
    undefined, which would make tiles disagree). Objects never overwrite each other.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels, 0 = background.
    distance : float
        In the units of ``spacing`` (voxels by default).
    spacing : sequence of float, optional
        Voxel size per axis.

    Examples
    --------
    >>> expand_block(np.array([[1, 0, 0, 0, 2]]), 2).tolist()  # the middle voxel is a tie
    [[1, 1, 1, 2, 2]]
    """
    from scipy import ndimage as ndi

    out = np.array(labels, copy=True)
    background = out == 0
    if distance <= 0 or not background.any() or background.all():
        return out
    sampling = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * out.ndim
    reach = [math.ceil(distance / s) for s in sampling]
    local, ids = renumber(out)
    best = np.full(out.shape, np.inf)
    # Smallest label first: a strictly nearer object replaces it, an equally near one does not.
    for label, box in enumerate(ndi.find_objects(local), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(0, b.start - r), min(n, b.stop + r))
                      for b, r, n in zip(box, reach, out.shape, strict=True))
        near = ndi.distance_transform_edt(local[grown] != label, sampling=sampling)
        closer = background[grown] & (near <= distance) & (near < best[grown])
        best[grown][closer] = near[closer]
        out[grown][closer] = ids[label]
    return out


def expand_labels(labels: Any, distance: float, *, unit: str = "voxels",
                  spacing: float | Sequence[float] | None = None, output: Any = None,
                  overwrite: bool = False, tile_shape: Sequence[int] | None = None,
                  progress: bool | None = None) -> zarr.Array:
    """Grow every object into the background by ``distance`` without merging touching ones.

    As :func:`skimage.segmentation.expand_labels` (each background voxel within ``distance`` of
    an object takes the nearest object's label), out of core: each tile reads a halo of
    ``distance``, so the result is the whole-image one. Ties (a voxel equally near two objects)
    go to the smaller label.

    Parameters
    ----------
    labels : path or array
        A label image.
    distance : float
        How far to grow, in ``unit``.
    unit : {"voxels", "um"}
        "um" uses the voxel size (``spacing`` or metadata), so anisotropic voxels grow by the
        same physical distance along every axis.
    spacing, output, overwrite, tile_shape, progress
        As for :func:`filter_by_size` (default output ``<labels>.expanded.zarr``).

    Returns
    -------
    zarr.Array
        The expanded labels (same label values and dtype as the input).

    Examples
    --------
    >>> labels = np.zeros((5, 9), np.uint16); labels[2, 1] = 1; labels[2, 6] = 2
    >>> expand_labels(labels, 2, tile_shape=(3, 3), progress=False)[2].tolist()
    [1, 1, 1, 1, 2, 2, 2, 2, 2]
    """
    lab = open_label_image(labels)
    if unit not in DISTANCE_UNITS:
        raise InputError(f"unit={unit!r} must be one of {', '.join(DISTANCE_UNITS)}")
    if not (math.isfinite(distance) and distance >= 0):
        raise InputError(f"distance={distance!r} must be >= 0")
    spacing_um = resolve_spacing(spacing, lab.ndim, lab.spacing)
    if unit == "um" and spacing_um is None:
        raise InputError("unit='um' needs the voxel size: pass spacing= (µm per axis) or use "
                         "labels with OME-Zarr metadata")
    sampling = spacing_um if unit == "um" else None
    reach = [math.ceil(distance / s) for s in (sampling or (1.0,) * lab.ndim)]
    grid = _regular_grid(lab, tile_shape, depth=reach)
    out = create_label_output(output, lab, dtype=lab.dtype, chunks=grid.tile_shape,
                              spacing=spacing_um, overwrite=overwrite, suffix="expanded")

    def block(tile: Any) -> np.ndarray:
        return expand_block(lab.read(tile.padded), distance, sampling)[tile.inner]

    _write_tiles(out, grid, block, "expanding", progress)
    top = lab.n_labels if lab.n_labels is not None else _max_label(out.array, grid, progress)
    return out.finish(top, {"postprocess": "expand_labels", "distance": distance,
                            "unit": unit, "source": _name(lab)})


def _max_label(arr: zarr.Array, grid: TileGrid, progress: bool | None) -> int:
    tops = tile_map(lambda t: int(np.asarray(arr[grid.tile(t).core]).max(initial=0)),
                    range(grid.n_tiles), desc="checking", progress=progress)
    return max(tops, default=0)


# -- holes --------------------------------------------------------------------------------------
def _label_background(tile: np.ndarray) -> np.ndarray:
    """Connected components (faces) of a tile's background."""
    from scipy import ndimage as ndi

    return ndi.label(tile == 0)[0]


@dataclass
class _HoleScan:
    labels: LabelImage
    components: zarr.Array
    grid: TileGrid  # halo of 1

    def tile(self, tile_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Background components on the image border, and (component, label) face contacts."""
        tile = self.grid.tile(tile_id)
        labels = self.labels.read(tile.padded).astype(np.int64, copy=False)
        comps = np.asarray(self.components[tile.padded]).astype(np.int64, copy=False)
        core = comps[tile.inner]
        border = []
        for axis in range(core.ndim):
            if tile.core[axis].start == 0:
                border.append(np.take(core, 0, axis=axis).ravel())
            if tile.core[axis].stop == self.grid.shape[axis]:
                border.append(np.take(core, -1, axis=axis).ravel())
        on_border = np.unique(np.concatenate(border)) if border else np.zeros(0, np.int64)
        touch_c, touch_l = [], []
        for axis in range(labels.ndim):
            lo = [slice(None)] * labels.ndim
            hi = [slice(None)] * labels.ndim
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            for a, b in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):
                meet = (comps[a] > 0) & (labels[b] > 0)
                touch_c.append(comps[a][meet])
                touch_l.append(labels[b][meet])
        pairs = np.unique(np.stack([np.concatenate(touch_c), np.concatenate(touch_l)]), axis=1)
        return on_border[on_border > 0], pairs[0], pairs[1]


def fill_holes(labels: Any, *, output: Any = None, overwrite: bool = False,
               tile_shape: Sequence[int] | None = None,
               progress: bool | None = None) -> zarr.Array:
    """Fill every hole of every object: background enclosed by that object alone.

    A hole is a connected component of the background (face connectivity, as
    :func:`scipy.ndimage.binary_fill_holes`) that does not touch the image border and whose
    face neighbours all belong to one object. Background between two objects (a ring around
    a nucleus in a cell, say) is not a hole of either and stays background; objects are never
    overwritten.

    Parameters
    ----------
    labels : path or array
        A label image.
    output, overwrite, tile_shape, progress
        As for :func:`filter_by_size` (default output ``<labels>.filled.zarr``).

    Returns
    -------
    zarr.Array
        The labels with their holes filled (same values and dtype as the input).

    Examples
    --------
    >>> ring = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0]])
    >>> fill_holes(ring, tile_shape=(2, 2), progress=False)[:].tolist()
    [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    """
    from .api import tile_process

    lab = open_label_image(labels)
    grid = _regular_grid(lab, tile_shape)
    out = create_label_output(output, lab, dtype=lab.dtype, chunks=grid.tile_shape,
                              spacing=lab.spacing, overwrite=overwrite, suffix="filled")
    with tempfile.TemporaryDirectory(prefix="blockbuster-holes-") as tmp:
        # Background components, stitched across tile faces by the engine itself (its
        # messages are about a temporary array, not the user's output: kept to warnings).
        with _quiet(log):
            comps = tile_process(lab.source, _label_background, grid.tile_shape, 0,
                                 stitch="faces", connectivity=1,
                                 output=Path(tmp) / "background.zarr", progress=progress)
        n_comps = _n_labels(comps)
        scan = _HoleScan(lab, comps, TileGrid(lab.shape, grid.tile_shape, (1,) * lab.ndim))
        border = np.zeros(n_comps + 1, bool)
        contacts_c, contacts_l = [], []
        for on_border, c, lbl in tile_map(scan.tile, range(grid.n_tiles), desc="holes",
                                          progress=progress):
            border[on_border] = True
            contacts_c.append(c)
            contacts_l.append(lbl)
        fill = _hole_labels(border, np.concatenate(contacts_c), np.concatenate(contacts_l))
        log.info("filling %d hole(s)", int((fill > 0).sum()))

        def block(tile: Any) -> np.ndarray:
            data = lab.read(tile.core)
            filled = fill[np.asarray(comps[tile.core])]
            return np.where(filled > 0, filled.astype(data.dtype), data)

        _write_tiles(out, grid, block, "filling", progress)
    top = lab.n_labels if lab.n_labels is not None else _max_label(out.array, grid, progress)
    return out.finish(top, {"postprocess": "fill_holes", "source": _name(lab)})


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _n_labels(arr: zarr.Array) -> int:
    """The number of labels a finished tile_process output records."""
    meta = arr.attrs.get("blockbuster")
    n = meta.get("n_labels") if isinstance(meta, dict) else None
    if not isinstance(n, int):
        raise InputError(f"{arr} does not record its number of labels")
    return n


def _hole_labels(border: np.ndarray, comp: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per background component: the label that fills it (0: not a hole).

    Examples
    --------
    >>> _hole_labels(np.array([False, True, False, False]),
    ...              np.array([1, 2, 2, 3, 3]), np.array([5, 5, 5, 5, 6])).tolist()
    [0, 0, 5, 0]
    """
    fill = np.zeros(len(border), np.int64)
    if not comp.size:
        return fill
    pairs = np.unique(np.stack([comp, label]), axis=1)
    comps, first, n = np.unique(pairs[0], return_index=True, return_counts=True)
    single = (n == 1) & ~border[comps]
    fill[comps[single]] = pairs[1][first[single]]
    return fill


# -- upsampling ---------------------------------------------------------------------------------
def source_indices(size_in: int, size_out: int, factor: int | None) -> np.ndarray:
    """For each output index along an axis, the input index it copies (nearest neighbour).

    With an integer ``factor`` (a pyramid level made by ``factor`` x ``factor`` blocks),
    output ``i`` copies input ``i // factor``, the exact inverse of block downsampling.
    Otherwise voxel centres are matched, as :func:`skimage.transform.resize` with ``order=0``.

    Examples
    --------
    >>> source_indices(3, 6, 2).tolist(), source_indices(3, 5, None).tolist()
    ([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2])
    """
    i = np.arange(size_out, dtype=np.int64)
    if factor is not None:
        return np.minimum(i // factor, size_in - 1)
    return np.minimum(((2 * i + 1) * size_in) // (2 * size_out), size_in - 1)


def _pyramid_factor(size_in: int, size_out: int) -> int | None:
    """The integer factor a level of ``size_in`` was downsampled by from ``size_out``, if any."""
    factor = max(1, round(size_out / size_in))
    if size_in in (size_out // factor, -(-size_out // factor)):
        return factor
    return None


def upsample_labels(labels: Any, factors: int | Sequence[int] | None = None, *,
                    shape: Sequence[int] | None = None, output: Any = None,
                    chunks: Sequence[int] | None = None, overwrite: bool = False,
                    progress: bool | None = None) -> zarr.Array:
    """Labels of a lower-resolution level, at full resolution (nearest neighbour), out of core.

    Give either ``factors`` (per axis, or one for all) or the target ``shape`` (e.g. the
    full-resolution image's). A target shape that a pyramid would downsample to these labels
    by integer factors (size ``ceil(n / f)`` or ``n // f``) is treated as such: every
    full-resolution voxel copies the label of the block it was downsampled into.

    Parameters
    ----------
    labels : path or array
        The low-resolution labels.
    factors : int or sequence of int, optional
        Integer upsampling factor per axis.
    shape : sequence of int, optional
        Target shape instead of factors.
    output : path or zarr store, optional
        Where to write (default ``<labels>.upsampled.zarr``).
    chunks : sequence of int, optional
        Chunks of the output (default: the input's chunk shape).
    overwrite, progress
        As for :func:`filter_by_size`.

    Returns
    -------
    zarr.Array
        Labels of the target shape, same dtype; the voxel size (when known) divided by the
        factors.

    Examples
    --------
    >>> small = np.array([[1, 2], [0, 3]], np.uint8)
    >>> upsample_labels(small, 2, progress=False)[:].tolist()
    [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3], [0, 0, 3, 3]]
    >>> upsample_labels(small, shape=(3, 4), progress=False)[:].tolist()
    [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]]
    """
    lab = open_label_image(labels)
    target, per_axis = _target(lab.shape, factors, shape)
    index = [source_indices(s_in, s_out, f)
             for s_in, s_out, f in zip(lab.shape, target, per_axis, strict=True)]
    spacing = None
    if lab.spacing is not None:
        spacing = tuple(s * n_in / n_out
                        for s, n_in, n_out in zip(lab.spacing, lab.shape, target, strict=True))
    chunk_shape = tuple(chunks) if chunks is not None else lab.grid().tile_shape
    grid = TileGrid(target, tuple(min(int(c), t) for c, t in zip(chunk_shape, target, strict=True)))
    out = create_label_output(output, lab, dtype=lab.dtype, shape=target, chunks=grid.tile_shape,
                              spacing=spacing, overwrite=overwrite, suffix="upsampled")

    def block(tile: Any) -> np.ndarray:
        picks = [idx[c] for idx, c in zip(index, tile.core, strict=True)]
        region = tuple(slice(int(p[0]), int(p[-1]) + 1) for p in picks)
        data = lab.read(region)
        return data[np.ix_(*(p - r.start for p, r in zip(picks, region, strict=True)))]

    _write_tiles(out, grid, block, "upsampling", progress)
    top = lab.n_labels if lab.n_labels is not None else _max_label(out.array, grid, progress)
    return out.finish(top, {"postprocess": "upsample_labels", "shape": list(target),
                            "source": _name(lab)})


def _target(shape: tuple[int, ...], factors: Any, target: Any,
            ) -> tuple[tuple[int, ...], list[int | None]]:
    if (factors is None) == (target is None):
        raise InputError("give either factors= or shape= (the full-resolution shape)")
    if factors is not None:
        values: tuple[Any, ...] = ((factors,) * len(shape) if np.isscalar(factors)
                                   else tuple(factors))
        if len(values) != len(shape) or not all(
                isinstance(f, (int, np.integer)) and not isinstance(f, bool) and f >= 1
                for f in values):
            raise InputError(f"factors={factors!r} must be {len(shape)} integers >= 1")
        scaled = tuple(s * int(f) for s, f in zip(shape, values, strict=True))
        return scaled, [int(f) for f in values]
    out = tuple(int(t) for t in target)
    if len(out) != len(shape) or any(t < s for t, s in zip(out, shape, strict=True)):
        raise InputError(f"shape={target!r} must have {len(shape)} sizes, each at least the "
                         f"labels' {shape}")
    return out, [_pyramid_factor(s, t) for s, t in zip(shape, out, strict=True)]
