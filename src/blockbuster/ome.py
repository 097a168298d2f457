"""Label images the OME-Zarr (NGFF) way: a multiscale label pyramid with its metadata.

A label image is a zarr group holding resolution levels ``"0"``, ``"1"``, ... and NGFF
``multiscales`` + ``image-label`` metadata. It lives either inside an OME-Zarr image, at
``<image>/labels/<name>`` and listed in ``<image>/labels``' ``labels`` attribute (napari and the
``ome-zarr`` reader then show it over the image), or on its own as a standalone label image.

The NGFF version follows the zarr format of the hierarchy, as ``ome-zarr`` reads it: zarr v3
gives NGFF 0.5 (metadata under the ``"ome"`` attribute), zarr v2 gives NGFF 0.4.

Writing is split in two so that a segmentation can write its labels straight into place:

1. :func:`create_label_level0` makes the (empty) full-resolution array, which the caller fills
   chunk by chunk;
2. :func:`finalize_ome_labels` then streams the downsampled levels out of it and writes the
   metadata; only then is the label image listed, so readers never see a half-written one.

:func:`write_ome_labels` does both for a label array that already exists elsewhere (it streams
a copy, chunk by chunk). Nothing ever loads a whole level.

Label axes are the parent image's axes without its channel axis (labels of a multichannel
image are per voxel, not per channel).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr

from .errors import InputError, OutputExistsError

__all__ = [
    "axes_calibration",
    "build_pyramid",
    "create_label_level0",
    "downsample_block",
    "finalize_ome_labels",
    "label_group_path",
    "level_transforms",
    "ngff_version",
    "pyramid_factors",
    "write_multiscales",
    "write_ome_labels",
]

#: Downsampled levels stop once the image fits within this many voxels in y and x (or one
#: chunk, if chunks are larger): about one screen, so napari always has a cheap overview.
MIN_OVERVIEW = 256
#: Largest chunk (bytes) of a downsampled level, so one streamed block stays small.
MAX_LEVEL_CHUNK_BYTES = 4 * 2**20

_NGFF_BY_ZARR = {2: "0.4", 3: "0.5"}
#: Attribute of a label group blockbuster writes: ``complete`` is False while it is written.
#: It stays once complete, so that an overwrite can tell blockbuster's own label images from
#: anyone else's (which are never replaced).
_PROVISIONAL = "blockbuster"


# -- small metadata helpers ------------------------------------------------------------------
def ngff_version(zarr_format: int) -> str:
    """NGFF version blockbuster writes for a zarr format (the one ``ome-zarr`` reads there).

    Examples
    --------
    >>> ngff_version(3), ngff_version(2)
    ('0.5', '0.4')
    """
    try:
        return _NGFF_BY_ZARR[zarr_format]
    except KeyError:
        raise InputError(f"unsupported zarr format {zarr_format}") from None


def _zarr_format(node: zarr.Group | zarr.Array) -> Literal[2, 3]:
    return 3 if node.metadata.zarr_format == 3 else 2


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, which must be an array."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise InputError(f"{group.store_path}/{name} is a group, expected an array")
    return node


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    """The NGFF metadata of a group: ``attributes["ome"]`` for 0.5, the attributes for 0.4."""
    attrs: dict[str, Any] = group.attrs.asdict()
    if _zarr_format(group) == 3:
        ome = attrs.get("ome", {})
        return dict(ome) if isinstance(ome, dict) else {}
    return attrs


def _update_ome_attrs(group: zarr.Group, updates: dict[str, Any],
                      drop: Sequence[str] = ()) -> None:
    if _zarr_format(group) == 3:
        ome = _ome_attrs(group)
        ome.update(updates)
        ome["version"] = "0.5"
        attrs = group.attrs.asdict()
        attrs["ome"] = dict(sorted(ome.items(), key=lambda kv: kv[0] != "version"))
    else:
        attrs = group.attrs.asdict()
        attrs.update(updates)
    for key in drop:
        attrs.pop(key, None)
    group.attrs.put(attrs)  # one write of the whole document


def _normalise_axes(axes: Sequence[Any]) -> list[dict[str, Any]]:
    """NGFF axis dicts from names, dicts or :class:`blockbuster.io.Axis` objects.

    Names map ``"c"`` to channel, ``"t"`` to time, anything else to space; an ``Axis`` keeps its
    type and unit.
    """
    out = []
    for axis in axes:
        if hasattr(axis, "to_ngff"):
            out.append(dict(axis.to_ngff()))
        elif isinstance(axis, str):
            kind = {"c": "channel", "t": "time"}.get(axis, "space")
            out.append({"name": axis, "type": kind})
        elif isinstance(axis, dict) and "name" in axis:
            out.append(dict(axis))
        else:
            raise InputError(f"invalid axis {axis!r}: give a name or an NGFF axis dict")
    names = [a["name"] for a in out]
    if len(set(names)) != len(names):
        raise InputError(f"axis names must be unique, got {names}")
    return out


def _default_axes(ndim: int) -> list[dict[str, Any]]:
    if not 2 <= ndim <= 3:
        raise InputError(f"give axes for a {ndim}-D label image (only 2-D/3-D have defaults)")
    return _normalise_axes(["z", "y", "x"][-ndim:])


def _spatial(axes: list[dict[str, Any]]) -> list[int]:
    return [i for i, a in enumerate(axes)
            if a.get("type") == "space" or (a.get("type") is None and a["name"] in "zyx")]


def axes_calibration(axes: Sequence[Any] | None
                     ) -> tuple[list[float] | None, list[float] | None]:
    """Scale and translation carried by :class:`blockbuster.io.Axis` objects, else None.

    Examples
    --------
    >>> from blockbuster.io import Axis
    >>> axes_calibration([Axis("z", "space", "micrometer", 2.0, 10.0), Axis("y"), Axis("x")])
    ([2.0, 1.0, 1.0], [10.0, 0.0, 0.0])
    >>> axes_calibration(["y", "x"])
    (None, None)
    """
    if not axes or not all(hasattr(a, "scale") and hasattr(a, "translation") for a in axes):
        return None, None
    scale = [float(a.scale) for a in axes]
    translation = [float(a.translation) for a in axes]
    return scale, translation if any(translation) else None


# -- pyramid geometry ------------------------------------------------------------------------
def pyramid_factors(
    shape: Sequence[int],
    axes: Sequence[Any],
    chunks: Sequence[int],
    scale: Sequence[float] | None = None,
    *,
    n_levels: int | None = None,
) -> list[tuple[int, ...]]:
    """Downsampling factor of each pyramid level relative to the one before it.

    The rule, applied level by level:

    * the two in-plane axes (the last two spatial axes, y and x) are halved while longer
      than one voxel;
    * a third spatial axis (z) is halved with them only when it is not much thinner than the
      plane (``4 * z >= min(y, x)`` at that level) and its physical voxel size is at most 1.5x
      the in-plane one (so thick sections are not made thicker while y/x catch up);
    * other axes (time, channel) are never downsampled;
    * levels are added until y and x both fit in ``max(chunk, 256)`` voxels, so the coarsest
      level is about one tile (or ``n_levels`` levels in total, when given).

    Parameters
    ----------
    shape, chunks : sequence of int
        Level-0 shape and chunk shape.
    axes : sequence of str or dict
        Axis names or NGFF axis dicts.
    scale : sequence of float, optional
        Level-0 physical voxel size per axis (default 1).
    n_levels : int, optional
        Total number of levels wanted, including level 0.

    Returns
    -------
    list of tuple of int
        One factor tuple per level after level 0 (empty when no pyramid is needed).

    Examples
    --------
    >>> pyramid_factors((4096, 4096), "yx", (1024, 1024))  # down to one 1024 chunk
    [(2, 2), (2, 2)]
    >>> pyramid_factors((16, 2048, 2048), "zyx", (16, 256, 256))  # a thin stack keeps its z
    [(1, 2, 2), (1, 2, 2), (1, 2, 2)]
    >>> pyramid_factors((128, 1024, 1024), "zyx", (128, 128, 128))  # z joins once comparable
    [(1, 2, 2), (2, 2, 2)]
    >>> pyramid_factors((128, 1024, 1024), "zyx", (128, 128, 128), scale=(4.0, 1.0, 1.0))
    [(1, 2, 2), (1, 2, 2)]
    >>> pyramid_factors((100, 100), "yx", (64, 64), n_levels=3)
    [(2, 2), (2, 2)]
    """
    axes_d = _normalise_axes(list(axes))
    shape = [int(s) for s in shape]
    if len(axes_d) != len(shape) or len(chunks) != len(shape):
        raise InputError(f"axes {axes} and chunks {chunks} must match shape {shape}")
    spacing = [1.0] * len(shape) if scale is None else [float(s) for s in scale]
    spatial = _spatial(axes_d)
    plane, depth = spatial[-2:], spatial[:-2]
    target = [max(int(chunks[i]), MIN_OVERVIEW) for i in plane]
    factors: list[tuple[int, ...]] = []
    while True:
        if n_levels is not None:
            if len(factors) + 1 >= n_levels:
                break
        elif all(shape[i] <= t for i, t in zip(plane, target, strict=True)):
            break
        f = [1] * len(shape)
        for i in plane:
            f[i] = 2 if shape[i] > 1 else 1
        thinnest = min((shape[i] for i in plane), default=1)
        finest = min((spacing[i] for i in plane), default=1.0)
        for i in depth:
            if shape[i] > 1 and 4 * shape[i] >= thinnest and spacing[i] <= 1.5 * finest:
                f[i] = 2
        if all(x == 1 for x in f):
            break
        factors.append(tuple(f))
        shape = [-(-s // x) for s, x in zip(shape, f, strict=True)]
        spacing = [s * x for s, x in zip(spacing, f, strict=True)]
    return factors


def level_transforms(
    scale: Sequence[float],
    factors: Sequence[Sequence[int]],
    translation: Sequence[float] | None = None,
) -> list[list[dict[str, Any]]]:
    """NGFF ``coordinateTransformations`` of every level of a pyramid.

    Level k has voxel size ``scale * F_k`` (``F_k`` the product of the factors so far) and is
    shifted by half its voxel minus half a level-0 voxel: a downsampled voxel sits at the
    centre of the block it summarises.

    Examples
    --------
    >>> t = level_transforms([1.0, 0.5, 0.5], [(1, 2, 2)])
    >>> t[0]
    [{'type': 'scale', 'scale': [1.0, 0.5, 0.5]}]
    >>> t[1][0]["scale"], t[1][1]["translation"]
    ([1.0, 1.0, 1.0], [0.0, 0.25, 0.25])
    """
    scale = [float(s) for s in scale]
    base = [0.0] * len(scale) if translation is None else [float(t) for t in translation]
    cumulative = [1] * len(scale)
    out: list[list[dict[str, Any]]] = []
    for level in range(len(factors) + 1):
        if level:
            cumulative = [c * f for c, f in zip(cumulative, factors[level - 1], strict=True)]
        ts: list[dict[str, Any]] = [
            {"type": "scale", "scale": [s * c for s, c in zip(scale, cumulative, strict=True)]}]
        shift = [b + (c - 1) * s / 2 for b, c, s in zip(base, cumulative, scale, strict=True)]
        if any(shift):
            ts.append({"type": "translation", "translation": shift})
        out.append(ts)
    return out


def _level_chunks(chunks: Sequence[int], shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Level-0 chunk shape clipped to the level and capped at MAX_LEVEL_CHUNK_BYTES."""
    out = [max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True)]
    while math.prod(out) * itemsize > MAX_LEVEL_CHUNK_BYTES and max(out) > 1:
        i = int(np.argmax(out))
        out[i] = max(1, out[i] // 2)
    return tuple(out)


# -- downsampling ----------------------------------------------------------------------------
def downsample_block(block: np.ndarray, factors: Sequence[int], method: str = "mode"
                     ) -> np.ndarray:
    """Downsample an array by integer factors, block by block.

    ``method="mode"`` keeps labels as labels: every output voxel takes the most frequent
    value of its block (ties go to non-zero values, so thin objects survive, then to the
    first in C order); it never invents ids. ``"mean"`` averages (for intensity images).
    Blocks at an odd edge are completed by repeating the edge.

    Examples
    --------
    >>> labels = np.array([[1, 1, 2, 0],
    ...                    [1, 3, 0, 0],
    ...                    [5, 5, 0, 0]])
    >>> downsample_block(labels, (2, 2))
    array([[1, 0],
           [5, 0]])
    >>> downsample_block(np.array([[0, 7], [0, 0]]), (2, 2)).tolist()  # outvoted
    [[0]]
    >>> downsample_block(np.array([[0, 7], [0, 7]]), (2, 2)).tolist()  # a tie goes to the label
    [[7]]
    >>> downsample_block(np.array([[1., 3.], [5., 7.]]), (2, 2), "mean").tolist()
    [[4.0]]
    """
    factors = tuple(int(f) for f in factors)
    if all(f == 1 for f in factors):
        return block
    pad = [(0, (-s) % f) for s, f in zip(block.shape, factors, strict=True)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    nd = block.ndim
    split = []
    for s, f in zip(block.shape, factors, strict=True):
        split += [s // f, f]
    blocks = block.reshape(split).transpose([*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)])
    values = blocks.reshape(blocks.shape[:nd] + (-1,))
    if method == "mean":
        # float32 is exact enough for <= 16-bit data and halves the memory of a block
        acc = np.float32 if block.dtype.itemsize <= 2 else np.float64
        mean = values.mean(axis=-1, dtype=acc)
        if np.issubdtype(block.dtype, np.integer):
            mean = np.rint(mean)
        return mean.astype(block.dtype)
    if method != "mode":
        raise InputError(f"unknown downsampling method {method!r}")
    return _mode_last_axis(values)


def _mode_last_axis(values: np.ndarray) -> np.ndarray:
    k = values.shape[-1]
    first = np.ascontiguousarray(values[..., 0])
    mixed = np.zeros(first.shape, bool)
    for i in range(1, k):
        mixed |= values[..., i] != first
    # Most blocks of a label image are uniform (inside one object or background): only the
    # mixed ones need the k^2 vote.
    if not mixed.any():
        return first
    where = np.flatnonzero(mixed)
    flat = values.reshape(-1, k)
    out = first.copy()
    out.reshape(-1)[where] = _vote([flat[where, i] for i in range(k)])
    return out


def _vote(columns: list[np.ndarray]) -> np.ndarray:
    k = len(columns)
    best = columns[0].copy()
    best_score = np.full(best.shape, -1, np.int16)
    count = np.empty(best.shape, np.int16)
    for j in range(k):
        count.fill(0)
        for i in range(k):
            count += columns[i] == columns[j]
        count *= 2
        count += columns[j] != 0  # prefer objects over background on ties
        better = count > best_score
        best[better] = columns[j][better]
        best_score[better] = count[better]
    return best


def build_pyramid(
    group: zarr.Group,
    factors: Sequence[Sequence[int]],
    *,
    method: str = "mode",
    workers: int | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[zarr.Array]:
    """Stream levels ``"1"``, ``"2"``, ... of ``group`` out of its level ``"0"``.

    Each level is made from the previous one by :func:`downsample_block`, one output chunk per
    task (a dask graph run on ``workers`` threads), so memory stays at a few chunks. Existing
    levels above 0 are replaced.

    Parameters
    ----------
    group : zarr.Group
        Group holding the level-0 array ``"0"``.
    factors : sequence of sequence of int
        Factor of each new level relative to the previous one (see :func:`pyramid_factors`).
    method : {"mode", "mean"}
        "mode" for labels, "mean" for images.
    workers : int, optional
        Threads (default: number of CPUs).
    shapes : sequence of sequence of int, optional
        Exact shape of each new level (e.g. to match a parent image whose pyramid rounded
        down); each must be the previous shape divided by the factor, rounded up or down.
        Default: rounded up.

    Returns
    -------
    list of zarr.Array
        The new levels.
    """
    prev = _array(group, "0")
    level0 = prev
    _remove_levels(group, start=1)
    out = []
    for level, f in enumerate(factors, start=1):
        ceil_shape = tuple(-(-s // x) for s, x in zip(prev.shape, f, strict=True))
        shape = ceil_shape if shapes is None else tuple(int(s) for s in shapes[level - 1])
        floor_shape = tuple(max(1, s // x) for s, x in zip(prev.shape, f, strict=True))
        if not all(a in (b, c) for a, b, c in zip(shape, floor_shape, ceil_shape, strict=True)):
            raise InputError(f"level {level} shape {shape} is not {prev.shape} / {tuple(f)}")
        dst = _create_like(group, str(level), level0, shape)
        _downsample_into(prev, dst, tuple(f), method, workers)
        out.append(dst)
        prev = dst
    return out


def _remove_levels(group: zarr.Group, start: int) -> None:
    for name in list(group.array_keys()):
        if name.isdigit() and int(name) >= start:
            del group[name]


def _create_like(group: zarr.Group, name: str, like: zarr.Array, shape: tuple[int, ...]
                 ) -> zarr.Array:
    chunks = _level_chunks(like.chunks, shape, like.dtype.itemsize)
    kwargs: dict[str, Any] = {"shape": shape, "chunks": chunks, "dtype": like.dtype,
                              "fill_value": like.fill_value, "overwrite": True}
    if _zarr_format(like) == 3:
        kwargs["compressors"] = like.compressors or None
        kwargs["dimension_names"] = getattr(like.metadata, "dimension_names", None)
    else:
        kwargs["compressors"] = like.compressors[0] if like.compressors else None
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return group.create_array(name, **kwargs)


def _downsample_into(src: zarr.Array, dst: zarr.Array, factors: tuple[int, ...], method: str,
                     workers: int | None) -> None:
    # One dask block per output chunk: writes never share a chunk, so no lock is needed.
    in_chunks = tuple(c * f for c, f in zip(dst.chunks, factors, strict=True))
    x = da.from_zarr(src, chunks=in_chunks)
    out_chunks = tuple(tuple(-(-c // f) for c in cs)
                       for cs, f in zip(x.chunks, factors, strict=True))
    y = x.map_blocks(downsample_block, factors, method, chunks=out_chunks, dtype=src.dtype)
    y = y[tuple(slice(0, s) for s in dst.shape)]
    with dask.config.set(scheduler="threads", num_workers=workers or os.cpu_count() or 1):
        da.store(y, dst, lock=False)  # type: ignore[arg-type]  # zarr arrays are targets


# -- the parent image ------------------------------------------------------------------------
@dataclass
class _Parent:
    """What a label image takes from its OME-Zarr parent image."""

    path: Path
    zarr_format: Literal[2, 3]
    axes: list[dict[str, Any]]  # label axes: the image's without the channel axis
    shapes: list[tuple[int, ...]]  # per image level, label axes only
    transforms: list[list[dict[str, Any]]]  # per level, label axes only
    common: list[dict[str, Any]] | None  # multiscale-wide transforms, label axes only
    chunks: tuple[int, ...]  # level-0 chunks, label axes only


def _read_parent(image_group: str | os.PathLike, level: int = 0) -> _Parent:
    """What a label image takes from its image; ``level``: the image level that is the label
    image's level 0 (labels segmented at a lower resolution line up with it)."""
    path = Path(image_group)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path} is not an OME-Zarr image (not a zarr group)") from exc
    meta = _ome_attrs(group)
    multiscales = meta.get("multiscales")
    if not multiscales:
        raise InputError(f"{path} is not an OME-Zarr image (no multiscales metadata)")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise InputError(f"{path}: multiscales lists no datasets")
    first = _array(group, datasets[0]["path"])
    axes = _normalise_axes(ms.get("axes") or list("tczyx"[-first.ndim:]))
    keep = [i for i, a in enumerate(axes) if a.get("type") != "channel"]
    shapes, transforms = [], []
    for ds in datasets:
        arr = _array(group, ds["path"])
        shapes.append(tuple(int(arr.shape[i]) for i in keep))
        transforms.append(_select_transforms(ds.get("coordinateTransformations"), keep))
    common = ms.get("coordinateTransformations")
    if not 0 <= level < len(datasets):
        raise InputError(f"{path} has {len(datasets)} resolution level(s); level {level} does "
                         "not exist")
    base = _array(group, datasets[level]["path"])
    return _Parent(path, _zarr_format(group), [axes[i] for i in keep], shapes[level:],
                   transforms[level:], _select_transforms(common, keep) if common else None,
                   tuple(int(base.chunks[i]) for i in keep))


def _select_transforms(transforms: list[dict[str, Any]] | None, keep: list[int]
                       ) -> list[dict[str, Any]]:
    out = []
    for t in transforms or []:
        t = dict(t)
        for key in ("scale", "translation"):
            if isinstance(t.get(key), list):
                t[key] = [float(t[key][i]) for i in keep]
        out.append(t)
    return out or [{"type": "scale", "scale": [1.0] * len(keep)}]


def _scale_of(transforms: list[dict[str, Any]], key: str) -> list[float] | None:
    for t in transforms:
        if t.get("type") == key and isinstance(t.get(key), list):
            return [float(v) for v in t[key]]
    return None


def _parent_factors(parent: _Parent) -> list[tuple[int, ...]] | None:
    """Integer factors between the parent's levels, or None if they are not integers."""
    factors = []
    for prev, cur in itertools.pairwise(parent.shapes):
        f = tuple(max(1, round(p / c)) if c else 0 for p, c in zip(prev, cur, strict=True))
        ok = all(x >= 1 and c in (max(1, p // x), -(-p // x))
                 for p, c, x in zip(prev, cur, f, strict=True))
        if not ok:
            return None
        factors.append(f)
    return factors


# -- label images ----------------------------------------------------------------------------
def label_group_path(
    image_group: str | os.PathLike | None,
    name: str = "blockbuster",
    standalone_path: str | os.PathLike | None = None,
) -> Path:
    """Where a label image goes: ``standalone_path``, else ``<image_group>/labels/<name>``.

    Examples
    --------
    >>> label_group_path("/data/img.ome.zarr", "cells").as_posix()
    '/data/img.ome.zarr/labels/cells'
    >>> label_group_path(None, standalone_path="/data/cells.ome.zarr").as_posix()
    '/data/cells.ome.zarr'
    """
    if standalone_path is not None:
        return Path(standalone_path)
    if image_group is None:
        raise InputError("give an OME-Zarr image group or a standalone_path for the labels")
    _check_name(name)
    return Path(image_group) / "labels" / name


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"invalid label name {name!r}: use a plain name like 'cells'")


def create_label_level0(
    image_group: str | os.PathLike | None,
    name: str = "blockbuster",
    shape: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    dtype: Any = "uint32",
    *,
    standalone_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    compressors: Any = "auto",
    shards: Sequence[int] | None = None,
    zarr_format: int | None = None,
    axes: Sequence[Any] | None = None,
    level: int = 0,
) -> zarr.Array:
    """Create the empty full-resolution array of a label image, to be written in place.

    Fill the returned array (any order, chunk by chunk), then call
    :func:`finalize_ome_labels` with the same location to add the pyramid and metadata. Until
    then the label image is not listed in the parent image, so readers ignore it.

    Parameters
    ----------
    image_group : str, os.PathLike or None
        An OME-Zarr image group. The labels go to ``<image_group>/labels/<name>`` unless
        ``standalone_path`` is given; their shape must then equal the image's level-0 shape
        without the channel axis, and their zarr format is the image's.
    name : str
        Label image name (also the multiscale name of a standalone label image).
    shape : sequence of int
        Label shape (spatial axes only). Defaults to the parent image's.
    chunks : sequence of int, optional
        Chunk shape (default: the parent image's level-0 chunks, else zarr's choice).
    dtype : numpy dtype
        An integer dtype.
    standalone_path : str or os.PathLike, optional
        Write a standalone OME-Zarr label image here instead; ``image_group`` (if given) is
        then only its source image (``image-label.source``, axes, voxel size).
    overwrite : bool
        Replace an existing label image of that name; otherwise raise OutputExistsError.
    compressors : zarr compressors
        Passed to zarr (default: zarr's default, zstd).
    shards : sequence of int, optional
        Shard shape (zarr v3 only), for very many chunks.
    zarr_format : {3, 2}, optional
        For a standalone label image without source image (default 3 -> NGFF 0.5).
    axes : sequence of str, dict or blockbuster.io.Axis, optional
        Label axes (default: the image's without its channel axis, else z/y/x names), e.g.
        ``source.label_axes`` of the :class:`blockbuster.io.ImageSource` segmented. Inside an
        image they must have the image's names.
    level : int
        The image's resolution level the labels were made at: their level 0 lines up with it
        (its shape, its scale), their pyramid with the image's levels below it.

    Returns
    -------
    zarr.Array
        The level-0 array ``<label group>/0``, filled with 0.
    """
    parent = _read_parent(image_group, level) if image_group is not None else None
    group_path = label_group_path(image_group, name, standalone_path)
    fmt: Literal[2, 3]
    if parent is not None:
        fmt = parent.zarr_format
        expected = parent.shapes[0]
        shape = expected if shape is None else tuple(int(s) for s in shape)
        if standalone_path is None and tuple(shape) != expected:
            raise InputError(f"labels of shape {tuple(shape)} do not fit image {parent.path} "
                             f"whose spatial shape is {expected}")
        if chunks is None:
            chunks = parent.chunks
    else:
        if zarr_format not in (None, 2, 3):
            raise InputError(f"zarr_format must be 2 or 3, got {zarr_format}")
        fmt = 2 if zarr_format == 2 else 3
        if shape is None:
            raise InputError("give the label shape (no image group to take it from)")
    ngff_version(fmt)  # validates the format
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise InputError(f"NGFF label images must have an integer dtype, not {dtype}")
    if axes is not None:
        axes = _normalise_axes(axes)
        if parent is not None and standalone_path is None and (
                [a["name"] for a in axes] != [a["name"] for a in parent.axes]):
            raise InputError(f"label axes {[a['name'] for a in axes]} differ from the image's "
                             f"{[a['name'] for a in parent.axes]}")
    else:
        axes = parent.axes if parent is not None else _default_axes(len(shape))
    if len(axes) != len(shape):
        raise InputError(f"labels of shape {shape} do not match axes "
                         f"{[a['name'] for a in axes]}")

    _prepare_location(group_path, image_group, name, standalone_path, overwrite)
    source: str | None = None
    if standalone_path is None:
        image = zarr.open_group(str(image_group), mode="r+")
        group = image.require_group("labels").create_group(name)
        source = "../../"
    else:
        group = zarr.open_group(str(group_path), mode="w", zarr_format=fmt)
        if image_group is not None:
            source = os.path.relpath(Path(image_group).resolve(), group_path.resolve())
    group.attrs[_PROVISIONAL] = {"complete": False, "source_image": source}
    kwargs: dict[str, Any] = {"shape": shape, "dtype": dtype, "fill_value": 0,
                              "compressors": compressors,
                              "chunks": "auto" if chunks is None else tuple(chunks)}
    if fmt == 3:
        kwargs["dimension_names"] = [a["name"] for a in axes]
        if shards is not None:
            kwargs["shards"] = tuple(shards)
    else:
        if shards is not None:
            raise InputError("shards need zarr format 3")
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return group.create_array("0", **kwargs)


def _prepare_location(group_path: Path, image_group: str | os.PathLike | None, name: str,
                      standalone_path: str | os.PathLike | None, overwrite: bool) -> None:
    """Make room for a new label image, or refuse if one exists and overwrite is False.

    Only a label image that blockbuster wrote is ever replaced; anything else at that place (a
    label image from another tool, a user's annotations) is refused, with or without overwrite.
    """
    if not group_path.exists() or (group_path.is_dir() and not any(group_path.iterdir())):
        return
    if not _written_by_blockbuster(group_path):
        raise OutputExistsError(
            f"{group_path} exists and was not written by blockbuster; it is never replaced. "
            "Choose another label name (or output path)")
    if not overwrite:
        raise OutputExistsError(f"{group_path} exists; pass $overwrite to replace it")
    if standalone_path is None:
        _unlist_label(group_path.parent.parent, name)  # never list a half-written label image
    shutil.rmtree(group_path)


def _written_by_blockbuster(group_path: Path) -> bool:
    from .output import is_blockbuster_output

    return is_blockbuster_output(group_path)


def remove_label_image(image_group: str | os.PathLike, name: str) -> None:
    """Unlist and delete ``<image_group>/labels/<name>``, a label image blockbuster wrote."""
    group_path = label_group_path(image_group, name)
    if group_path.exists():
        _prepare_location(group_path, image_group, name, None, overwrite=True)


def _unlist_label(image_path: Path, name: str) -> None:
    labels_path = image_path / "labels"
    if not labels_path.exists():
        return
    labels = zarr.open_group(str(labels_path), mode="r+")
    listed = _ome_attrs(labels).get("labels", [])
    if name in listed:
        _update_ome_attrs(labels, {"labels": [n for n in listed if n != name]})


def finalize_ome_labels(
    image_group: str | os.PathLike | None,
    name: str = "blockbuster",
    *,
    standalone_path: str | os.PathLike | None = None,
    axes: Sequence[Any] | None = None,
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    n_levels: int | None = None,
    colors: list[dict[str, Any]] | None = None,
    properties: list[dict[str, Any]] | None = None,
    workers: int | None = None,
    level: int = 0,
) -> Path:
    """Build the pyramid and NGFF metadata of a label image whose level 0 is written.

    Inside an image, the levels match the image's own pyramid (same number of levels and
    shapes, and the image's coordinate transformations), as NGFF requires. A standalone label
    image follows :func:`pyramid_factors`. Downsampling is by mode (:func:`downsample_block`):
    every id in a coarse level is an id of level 0. Finally the label image is listed in the
    image's ``labels`` group (existing entries are kept).

    Parameters
    ----------
    image_group, name, standalone_path
        The same location as given to :func:`create_label_level0`.
    axes : sequence of str, dict or blockbuster.io.Axis, optional
        Label axes (default: the image's without channel, else z/y/x names). For a standalone
        label image, :class:`blockbuster.io.Axis` objects (``source.label_axes``) also give
        the units, and the voxel size and offset unless ``scale``/``translation`` are given;
        inside an image, the image's own transformations are kept.
    scale, translation : sequence of float, optional
        Level-0 voxel size and offset (default: the image's level 0, else 1 and 0). Giving
        either replaces the image's transformations.
    n_levels : int, optional
        Number of levels (default: the image's; for standalone labels, down to about a tile).
    colors, properties : list of dict, optional
        NGFF ``image-label`` colours (``{"label-value": 1, "rgba": [r, g, b, a]}``) and
        properties (``{"label-value": 1, ...}``).
    workers : int, optional
        Threads used to build the pyramid.
    level : int
        As given to :func:`create_label_level0`.

    Returns
    -------
    pathlib.Path
        The label image group.
    """
    group_path = label_group_path(image_group, name, standalone_path)
    if not (group_path / "0").exists():
        raise InputError(f"{group_path} has no level 0: call create_label_level0 first")
    group = zarr.open_group(str(group_path), mode="r+")
    level0 = _array(group, "0")
    parent = _read_parent(image_group, level) if image_group is not None else None
    label_axes = _normalise_axes(axes) if axes is not None else (
        parent.axes if parent is not None else _default_axes(level0.ndim))
    if len(label_axes) != level0.ndim:
        raise InputError(f"axes {[a['name'] for a in label_axes]} do not match labels of "
                         f"shape {level0.shape}")

    if standalone_path is not None or parent is None:
        axis_scale, axis_translation = axes_calibration(axes)
        if scale is None and translation is None and axis_scale is not None:
            scale, translation = axis_scale, axis_translation
    factors, shapes, transforms, common = _plan(level0, parent, label_axes, scale, translation,
                                                n_levels, inside=standalone_path is None)
    build_pyramid(group, factors, method="mode", workers=workers, shapes=shapes)

    image_label: dict[str, Any] = {"version": ngff_version(_zarr_format(group))}
    source = _source_image(group, group_path, image_group, standalone_path)
    if source is not None:
        image_label["source"] = {"image": source}
    if colors is not None:
        image_label["colors"] = _check_label_entries(colors, "colors")
    if properties is not None:
        image_label["properties"] = _check_label_entries(properties, "properties")
    write_multiscales(group, axes=label_axes, transforms=transforms, name=name, method="mode",
                      common=common, extra={"image-label": image_label})
    group.attrs[_PROVISIONAL] = {"complete": True}  # no longer provisional; still ours
    if standalone_path is None:
        _list_label(group_path.parent.parent, name)  # <image>/labels/<name>
    return group_path


def _source_image(group: zarr.Group, group_path: Path,
                  image_group: str | os.PathLike | None,
                  standalone_path: str | os.PathLike | None) -> str | None:
    """Relative path from the label image to its image (NGFF ``image-label.source.image``)."""
    if standalone_path is None:
        return "../../"
    provisional = group.attrs.asdict().get(_PROVISIONAL, {})
    if isinstance(provisional, dict) and "source_image" in provisional:
        source = provisional["source_image"]
        return source if isinstance(source, str) else None
    if image_group is None:
        return None
    return os.path.relpath(Path(image_group).resolve(), group_path.resolve())


_Plan = tuple[list[tuple[int, ...]], list[tuple[int, ...]] | None, list[list[dict[str, Any]]],
              list[dict[str, Any]] | None]


def _plan(level0: zarr.Array, parent: _Parent | None, axes: list[dict[str, Any]],
          scale: Sequence[float] | None, translation: Sequence[float] | None,
          n_levels: int | None, inside: bool) -> _Plan:
    """Factors, exact shapes, per-level transforms and common transforms of the pyramid."""
    use_parent = parent if scale is None and translation is None else None
    if use_parent is not None and inside and n_levels in (None, len(use_parent.shapes)):
        factors = _parent_factors(use_parent)
        if factors is not None:
            return factors, use_parent.shapes[1:], use_parent.transforms, use_parent.common
    if use_parent is not None:
        scale = _scale_of(use_parent.transforms[0], "scale")
        translation = _scale_of(use_parent.transforms[0], "translation")
    if scale is None:
        scale = [1.0] * level0.ndim
    if n_levels is None and parent is not None and inside:
        n_levels = len(parent.shapes)  # NGFF: as many levels as the image
    factors = pyramid_factors(level0.shape, axes, level0.chunks, scale, n_levels=n_levels)
    common = use_parent.common if use_parent is not None else None
    return factors, None, level_transforms(scale, factors, translation), common


def _check_label_entries(entries: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("label-value"), (int, np.integer)):
            raise InputError(f"each entry of {what} needs an integer 'label-value': {e!r}")
        out.append({**e, "label-value": int(e["label-value"])})
    return out


def _list_label(image_path: Path, name: str) -> None:
    labels = zarr.open_group(str(image_path), mode="r+").require_group("labels")
    listed = list(_ome_attrs(labels).get("labels", []))
    if name not in listed:
        listed.append(name)
    _update_ome_attrs(labels, {"labels": listed})


def write_multiscales(
    group: zarr.Group,
    *,
    axes: Sequence[Any],
    transforms: list[list[dict[str, Any]]] | None = None,
    scale: Sequence[float] | None = None,
    factors: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
    method: str = "mode",
    common: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    drop: Sequence[str] = (),
) -> None:
    """Write NGFF ``multiscales`` metadata for the levels ``"0"``, ``"1"``, ... of a group.

    The NGFF version follows the group's zarr format (0.5 for v3, 0.4 for v2). Give either
    per-level ``transforms`` or ``scale`` and ``factors`` (see :func:`level_transforms`).
    ``extra`` adds sibling keys (e.g. ``image-label``); ``drop`` removes attributes.
    """
    axes_d = _normalise_axes(list(axes))
    if transforms is None:
        if factors is None:
            raise InputError("give transforms, or scale and factors")
        transforms = level_transforms(scale or [1.0] * len(axes_d), factors)
    version = ngff_version(_zarr_format(group))
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    if levels != list(range(len(transforms))):
        raise InputError(f"group has levels {levels}, metadata describes {len(transforms)}")
    multiscale: dict[str, Any] = {}
    if version == "0.4":
        multiscale["version"] = version
    multiscale.update({
        "name": name or Path(str(group.path or "image")).name,
        "axes": axes_d,
        "datasets": [{"path": str(i), "coordinateTransformations": t}
                     for i, t in enumerate(transforms)],
        "type": method,
        "metadata": {"description": f"{method} downsampling by blockbuster",
                     "method": "blockbuster.ome.downsample_block"},
    })
    if common:
        multiscale["coordinateTransformations"] = common
    multiscale = _validated_multiscale(multiscale, version)
    _update_ome_attrs(group, {"multiscales": [multiscale], **(extra or {})}, drop=drop)


def _validated_multiscale(multiscale: dict[str, Any], version: str) -> dict[str, Any]:
    """The multiscale as ome-zarr-models validates and writes it (NGFF 0.4 or 0.5)."""
    if version == "0.5":
        from ome_zarr_models.v05.multiscales import Multiscale as Model
    else:
        from ome_zarr_models.v04.multiscales import Multiscale as Model  # type: ignore[assignment]
    try:
        model = Model.model_validate(multiscale)
    except Exception as exc:  # pydantic's ValidationError lists every problem
        raise InputError(f"the label image metadata would not be valid NGFF {version}: "
                         f"{exc}") from exc
    dumped: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return dumped


def write_ome_labels(
    labels: Any,
    image_group: str | os.PathLike | None,
    *,
    name: str = "blockbuster",
    standalone_path: str | os.PathLike | None = None,
    axes: Sequence[Any] | None = None,
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    n_levels: int | None = None,
    colors: list[dict[str, Any]] | None = None,
    properties: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a finished label array as an NGFF label image, with pyramid and metadata.

    The labels are streamed chunk by chunk into level 0 (skipped if ``labels`` already is
    that level 0, as made by :func:`create_label_level0`), then :func:`finalize_ome_labels`
    builds the rest. The array is never loaded whole.

    Parameters
    ----------
    labels : zarr.Array, dask.array.Array or numpy.ndarray
        Integer labels with the image's spatial shape (bool is stored as uint8).
    image_group : str, os.PathLike or None
        OME-Zarr image to put the labels in (``<image>/labels/<name>``), or the source image
        of a standalone label image.
    name, standalone_path, axes, scale, translation, n_levels, colors, properties, workers
        See :func:`create_label_level0` and :func:`finalize_ome_labels`. ``axes`` may be
        ``source.label_axes`` (:class:`blockbuster.io.Axis`, with units and calibration).
    overwrite : bool
        Replace an existing label image of that name.

    Returns
    -------
    pathlib.Path
        The label image group.

    Examples
    --------
    >>> import os, shutil, tempfile
    >>> from blockbuster.data import synthetic_nuclei, write_synthetic_nuclei
    >>> tmp = tempfile.mkdtemp()
    >>> img = os.path.join(tmp, "img.ome.zarr")
    >>> _ = write_synthetic_nuclei(img, (512, 512), chunks=(128, 128), ome=True)
    >>> _, truth = synthetic_nuclei((512, 512))
    >>> path = write_ome_labels(truth, img, name="truth")
    >>> path.relative_to(img).as_posix()
    'labels/truth'
    >>> g = zarr.open_group(str(path), mode="r")
    >>> [g[k].shape for k in ("0", "1")]
    [(512, 512), (256, 256)]
    >>> shutil.rmtree(tmp)
    """
    if isinstance(labels, zarr.Array) and _is_level0_of(labels, image_group, name,
                                                        standalone_path):
        return finalize_ome_labels(image_group, name, standalone_path=standalone_path,
                                   axes=axes, scale=scale, translation=translation,
                                   n_levels=n_levels, colors=colors, properties=properties,
                                   workers=workers)
    source = labels if isinstance(labels, da.Array) else None
    dtype = np.dtype(labels.dtype)
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    chunks = _source_chunks(labels)
    level0 = create_label_level0(image_group, name, tuple(labels.shape), chunks, dtype,
                                 standalone_path=standalone_path, overwrite=overwrite,
                                 axes=axes)
    if source is None:
        source = da.from_array(labels, chunks=level0.chunks, asarray=True, lock=False)
    source = source.astype(dtype).rechunk(level0.chunks)
    with dask.config.set(scheduler="threads", num_workers=workers or os.cpu_count() or 1):
        da.store(source, level0, lock=False)  # type: ignore[arg-type]
    return finalize_ome_labels(image_group, name, standalone_path=standalone_path, axes=axes,
                               scale=scale, translation=translation, n_levels=n_levels,
                               colors=colors, properties=properties, workers=workers)


def _source_chunks(labels: Any) -> tuple[int, ...] | None:
    if isinstance(labels, da.Array):
        return tuple(c[0] for c in labels.chunks)
    chunks = getattr(labels, "chunks", None)
    if isinstance(chunks, tuple) and all(isinstance(c, int) for c in chunks):
        return chunks
    return None


def _is_level0_of(arr: zarr.Array, image_group: str | os.PathLike | None, name: str,
                  standalone_path: str | os.PathLike | None) -> bool:
    """Whether ``arr`` already is the level 0 of that label image (so no copy is needed)."""
    root = getattr(arr.store, "root", None)
    if root is None:
        return False
    where = (Path(root) / arr.path).resolve()
    return where == (label_group_path(image_group, name, standalone_path) / "0").resolve()
