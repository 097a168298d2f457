"""Per-object measurements out of core: size, position and intensities of every label.

The label image (and the same region of the intensity image) is read one tile at a time. Each
tile is reduced to a few numbers per object it holds (:func:`tile_measurements`: voxel count,
bounding box, coordinate sums, and per channel the intensity sum, the sum of squared
deviations from the tile's own mean, the minimum and the maximum). :class:`MeasurementReducer`
folds those per-tile arrays into one row per final label, combining the pieces of objects that
cross tiles exactly: counts, sums and coordinate sums add, minima and maxima reduce, and the
squared deviations combine with Chan et al.'s parallel formula (numerically stable, unlike
summing squares). Memory is a few tiles plus a few numbers per label, never the image.

The per-tile pair is what the segmentation engine can call while it runs (each tile's local
labels ``0..n`` are mapped to final labels only at the end); :func:`measure` uses it on labels
that are already written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._labels import (
    LabelImage,
    axis_names,
    open_label_image,
    renumber,
    resolve_spacing,
    tile_map,
)
from .errors import InputError
from .io import ImageSource, open_image
from .tiling import TileGrid

__all__ = ["INTENSITY_STATISTICS", "MeasurementReducer", "measure", "tile_measurements"]

#: Per-channel columns: ``<statistic>_intensity_<channel>``.
INTENSITY_STATISTICS = ("mean", "min", "max", "std", "integrated")


# -- one tile -----------------------------------------------------------------------------------
def tile_measurements(labels: np.ndarray, n: int | None = None, image: np.ndarray | None = None,
                      *, origin: Sequence[int] | None = None, channel_axis: int | None = None,
                      ) -> dict[str, np.ndarray]:
    """Per-object partial statistics of one tile, indexed by local label ``0..n``.

    Parameters
    ----------
    labels : numpy.ndarray
        Local labels ``0..n`` of the tile (0 = background), any integer dtype.
    n : int, optional
        The largest local label (default: ``labels.max()``). Labels ``1..n`` absent from the
        tile get a count of 0.
    image : numpy.ndarray, optional
        Intensities of the same region: the spatial shape of ``labels``, plus a channel axis
        at ``channel_axis`` (or none, for one channel).
    origin : sequence of int, optional
        Global position of the tile's first voxel (default 0): bounding boxes and coordinate
        sums are global.
    channel_axis : int, optional
        Where the channels are in ``image``.

    Returns
    -------
    dict of str to numpy.ndarray
        ``counts`` (n+1,) int64; ``bbox_lo`` and ``bbox_hi`` (n+1, ndim) int64, half-open,
        global (0 for absent labels); ``coord_sum`` (n+1, ndim) float64. With an image, per
        channel (n+1, channels) float64: ``intensity_sum``, ``intensity_m2`` (sum of squared
        deviations from the label's mean within this tile), ``intensity_min`` (inf when
        absent) and ``intensity_max`` (-inf when absent). Index 0 is the background.

    Examples
    --------
    >>> labels = np.array([[0, 1, 1], [2, 2, 0]])
    >>> image = np.array([[9, 1, 3], [4, 6, 9]])
    >>> m = tile_measurements(labels, 2, image, origin=(10, 0))
    >>> m["counts"].tolist(), m["bbox_lo"][1].tolist(), m["bbox_hi"][1].tolist()
    ([2, 2, 2], [10, 1], [11, 3])
    >>> m["intensity_sum"][1:, 0].tolist(), m["intensity_m2"][1:, 0].tolist()
    ([4.0, 10.0], [2.0, 2.0])
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels of dtype {labels.dtype} are not integers")
    ndim = labels.ndim
    origin_t = (0,) * ndim if origin is None else tuple(int(o) for o in origin)
    if len(origin_t) != ndim:
        raise InputError(f"origin {origin_t} does not match {ndim}-D labels")
    flat = labels.ravel().astype(np.intp, copy=False)
    top = int(flat.max(initial=0))
    n = top if n is None else int(n)
    if top > n:
        raise InputError(f"the tile holds label {top} but n={n}: labels must be local 0..n")
    counts = np.bincount(flat, minlength=n + 1).astype(np.int64)
    out: dict[str, np.ndarray] = {"counts": counts}
    out.update(_geometry(labels, n, origin_t))
    if image is not None:
        out.update(_intensities(flat, counts, _channels_last(image, labels.shape, channel_axis)))
    return out


def _geometry(labels: np.ndarray, n: int, origin: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Bounding boxes (global, half-open) and coordinate sums per label."""
    from scipy import ndimage

    ndim = labels.ndim
    lo = np.zeros((n + 1, ndim), np.int64)
    hi = np.zeros((n + 1, ndim), np.int64)
    for label, box in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if box is not None:
            lo[label] = [s.start + o for s, o in zip(box, origin, strict=True)]
            hi[label] = [s.stop + o for s, o in zip(box, origin, strict=True)]
    sums = np.zeros((n + 1, ndim), np.float64)
    flat = labels.ravel().astype(np.intp, copy=False)
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = labels.shape[axis]
        coord = np.arange(labels.shape[axis], dtype=np.float64).reshape(shape) + origin[axis]
        weights = np.broadcast_to(coord, labels.shape).ravel()
        sums[:, axis] = np.bincount(flat, weights=weights, minlength=n + 1)
    return {"bbox_lo": lo, "bbox_hi": hi, "coord_sum": sums}


def _channels_last(image: np.ndarray, spatial: tuple[int, ...],
                   channel_axis: int | None) -> np.ndarray:
    image = np.asarray(image)
    if channel_axis is not None:
        image = np.moveaxis(image, channel_axis, -1)
    elif image.shape == spatial:
        image = image[..., None]
    if image.shape[:-1] != spatial:
        raise InputError(f"image tile of shape {image.shape} (channels last) does not match "
                         f"labels of shape {spatial}")
    return image


def _intensities(flat: np.ndarray, counts: np.ndarray, image: np.ndarray,
                 ) -> dict[str, np.ndarray]:
    n1, n_channels = len(counts), image.shape[-1]
    sums = np.zeros((n1, n_channels))
    m2 = np.zeros((n1, n_channels))
    mins = np.full((n1, n_channels), np.inf)
    maxs = np.full((n1, n_channels), -np.inf)
    safe = np.maximum(counts, 1)
    for c in range(n_channels):
        values = image[..., c].ravel().astype(np.float64)
        sums[:, c] = np.bincount(flat, weights=values, minlength=n1)
        # Two passes (deviations from this tile's mean), not sum of squares minus square of
        # sums, which cancels catastrophically for bright, flat objects.
        dev = values - (sums[:, c] / safe)[flat]
        dev *= dev
        m2[:, c] = np.bincount(flat, weights=dev, minlength=n1)
        del dev
        np.minimum.at(mins[:, c], flat, values)
        np.maximum.at(maxs[:, c], flat, values)
    return {"intensity_sum": sums, "intensity_m2": m2, "intensity_min": mins,
            "intensity_max": maxs}


# -- folding tiles together ----------------------------------------------------------------------
class MeasurementReducer:
    """Folds per-tile measurements, mapped to final labels, into one row per label.

    Parameters
    ----------
    ndim : int
        Spatial axes of the labels.
    n_channels : int
        Intensity channels of the per-tile arrays (0: geometry only).
    capacity : int
        Largest final label expected (the arrays grow when a larger one comes).

    Examples
    --------
    >>> labels = np.array([[1, 1, 0, 2], [1, 0, 2, 2]])
    >>> image = np.arange(8).reshape(2, 4)
    >>> reducer = MeasurementReducer(ndim=2, n_channels=1)
    >>> for cols in (slice(0, 2), slice(2, 4)):  # two tiles
    ...     local, ids = renumber(labels[:, cols])
    ...     m = tile_measurements(local, len(ids) - 1, image[:, cols], origin=(0, cols.start))
    ...     reducer.add(m, ids)
    >>> table = reducer.columns()
    >>> table["label"].tolist(), table["voxels"].tolist(), table["mean_intensity"].tolist()
    ([1, 2], [3, 3], [1.6666666666666667, 5.333333333333333])
    """

    def __init__(self, ndim: int, n_channels: int = 0, capacity: int = 0) -> None:
        self.ndim, self.n_channels = int(ndim), int(n_channels)
        size = max(int(capacity), 0) + 1
        self.count = np.zeros(size, np.int64)
        self.lo = np.full((size, ndim), np.iinfo(np.int64).max, np.int64)
        self.hi = np.full((size, ndim), np.iinfo(np.int64).min, np.int64)
        self.coord_sum = np.zeros((size, ndim))
        self.sum = np.zeros((size, n_channels))
        self.m2 = np.zeros((size, n_channels))
        self.min = np.full((size, n_channels), np.inf)
        self.max = np.full((size, n_channels), -np.inf)

    def _grow(self, top: int) -> None:
        size = len(self.count)
        if top < size:
            return
        new = max(top + 1, 2 * size)
        fills = {"count": 0, "lo": np.iinfo(np.int64).max, "hi": np.iinfo(np.int64).min,
                 "coord_sum": 0.0, "sum": 0.0, "m2": 0.0, "min": np.inf, "max": -np.inf}
        for name, fill in fills.items():
            old = getattr(self, name)
            grown = np.full((new, *old.shape[1:]), fill, old.dtype)
            grown[:size] = old
            setattr(self, name, grown)

    def add(self, arrays: dict[str, np.ndarray], ids: np.ndarray) -> None:
        """Fold one tile's arrays (from :func:`tile_measurements`) in.

        ``ids[l]`` is the final label of the tile's local label ``l`` (``ids[0]``, the
        background, is ignored). Several local labels may map to the same final label.
        """
        ids = np.asarray(ids, np.int64)
        counts = arrays["counts"]
        if len(ids) < len(counts):
            raise InputError(f"{len(ids)} final labels for a tile with {len(counts)} local ones")
        local = np.flatnonzero(counts[1:] > 0) + 1
        if not local.size:
            return
        final = ids[local]
        if final.min() < 1:
            raise InputError("a local object was mapped to the background (final label 0)")
        self._grow(int(final.max()))
        np.minimum.at(self.lo, final, arrays["bbox_lo"][local])
        np.maximum.at(self.hi, final, arrays["bbox_hi"][local])
        np.add.at(self.coord_sum, final, arrays["coord_sum"][local])
        if self.n_channels:
            np.minimum.at(self.min, final, arrays["intensity_min"][local])
            np.maximum.at(self.max, final, arrays["intensity_max"][local])
            self._fold_moments(final, counts[local], arrays["intensity_sum"][local],
                               arrays["intensity_m2"][local])
        else:
            np.add.at(self.count, final, counts[local])

    def _fold_moments(self, final: np.ndarray, n_b: np.ndarray, s_b: np.ndarray,
                      m2_b: np.ndarray) -> None:
        """Chan et al.'s pairwise combine of counts, sums and squared deviations.

        A label can occur more than once in ``final`` (pieces of one object that met in a
        neighbouring tile): each round folds the first occurrence of every label, so that no
        label is folded twice against the same old state.
        """
        while final.size:
            labels, first = np.unique(final, return_index=True)
            n_a = self.count[labels].astype(np.float64)[:, None]
            nb = n_b[first].astype(np.float64)[:, None]
            mean_a = self.sum[labels] / np.maximum(n_a, 1.0)
            delta = s_b[first] / nb - mean_a
            self.m2[labels] += m2_b[first] + delta * delta * (n_a * nb / (n_a + nb))
            self.sum[labels] += s_b[first]
            self.count[labels] += n_b[first]
            rest = np.ones(final.size, bool)
            rest[first] = False
            final, n_b, s_b, m2_b = final[rest], n_b[rest], s_b[rest], m2_b[rest]

    def columns(self, *, spacing: Sequence[float | None] | None = None,
                names: Sequence[str] | None = None,
                channel_names: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
        """One row per label with at least one voxel, in label order.

        Columns: ``label``, ``voxels``, ``bbox_min_<ax>``, ``bbox_max_<ax>`` (exclusive),
        ``centroid_<ax>`` in voxels; with ``spacing`` (µm per axis; None for an axis without a
        length, such as time) also ``volume_um3`` (``area_um2`` in 2-D), ``centroid_<ax>_um``,
        ``bbox_min_<ax>_um`` and ``bbox_max_<ax>_um``; per channel ``mean_intensity_<ch>``,
        ``min_intensity_<ch>``, ``max_intensity_<ch>``, ``std_intensity_<ch>`` (population) and
        ``integrated_intensity_<ch>`` (a channel named None gets no suffix).
        """
        rows = np.flatnonzero(self.count > 0)
        n = self.count[rows]
        names = list(names) if names is not None else axis_names(self.ndim)
        cols: dict[str, np.ndarray] = {"label": rows.astype(np.int64), "voxels": n}
        lo, hi = self.lo[rows], self.hi[rows]
        centroid = self.coord_sum[rows] / n[:, None]
        for axis, name in enumerate(names):
            cols[f"bbox_min_{name}"] = lo[:, axis]
        for axis, name in enumerate(names):
            cols[f"bbox_max_{name}"] = hi[:, axis]
        for axis, name in enumerate(names):
            cols[f"centroid_{name}"] = centroid[:, axis]
        if spacing is not None and any(v is not None for v in spacing):
            physical = [(axis, name, v) for (axis, name), v
                        in zip(enumerate(names), spacing, strict=True) if v is not None]
            cols[size_column(len(physical))] = n * float(np.prod([v for *_, v in physical]))
            for axis, name, v in physical:
                cols[f"centroid_{name}_um"] = centroid[:, axis] * v
            for axis, name, v in physical:
                cols[f"bbox_min_{name}_um"] = lo[:, axis] * v
            for axis, name, v in physical:
                cols[f"bbox_max_{name}_um"] = hi[:, axis] * v
        channel_names = (list(channel_names) if channel_names is not None else
                         [None] if self.n_channels == 1 else
                         [f"ch{c}" for c in range(self.n_channels)])
        for c, channel in enumerate(channel_names):
            suffix = f"_{channel}" if channel else ""
            total = self.sum[rows, c]
            cols[f"mean_intensity{suffix}"] = total / n
            cols[f"min_intensity{suffix}"] = self.min[rows, c]
            cols[f"max_intensity{suffix}"] = self.max[rows, c]
            cols[f"std_intensity{suffix}"] = np.sqrt(np.maximum(self.m2[rows, c] / n, 0.0))
            cols[f"integrated_intensity{suffix}"] = total
        return cols


def size_column(ndim: int) -> str:
    """Name of the physical size column: ``area_um2`` (2-D), ``volume_um3`` (3-D).

    Examples
    --------
    >>> size_column(2), size_column(3), size_column(4)
    ('area_um2', 'volume_um3', 'size_um4')
    """
    return {2: "area_um2", 3: "volume_um3"}.get(ndim, f"size_um{ndim}")


# -- the whole image -----------------------------------------------------------------------------
@dataclass
class _MeasureContext:
    labels: LabelImage
    image: ImageSource | None
    channels: list[int]
    grid: TileGrid

    def tile(self, tile_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tile = self.grid.tile(tile_id)
        local, ids = renumber(self.labels.read(tile.core))
        pixels = None
        if self.image is not None and len(ids) > 1:
            pixels = _selected(self.image, self.image.read(tile.core), self.channels)
        origin = [s.start for s in tile.core]
        return tile_measurements(local, len(ids) - 1, pixels, origin=origin,
                                 channel_axis=None if pixels is None else -1), ids


def _selected(image: ImageSource, block: np.ndarray, channels: list[int]) -> np.ndarray:
    """The picked channels of a block, channels last."""
    if image.channel_axis is None:
        return block[..., None]
    return np.moveaxis(np.take(block, channels, axis=image.channel_axis), image.channel_axis, -1)


def measure(labels: Any, image: Any = None, *, channels: Sequence[int | str] | None = None,
            spacing: float | Sequence[float] | None = None, output: str | Path | None = None,
            channel_axis: int | None = None, tile_shape: Sequence[int] | None = None,
            progress: bool | None = None) -> dict[str, np.ndarray]:
    """Measure every object of a label image, tile by tile, in voxels and micrometres.

    Parameters
    ----------
    labels : path or array
        A blockbuster output (zarr array or OME-Zarr label image), any integer zarr array, or
        an array in memory. Read one tile (chunk) at a time.
    image : path or array, optional
        The intensity image on the same grid, with or without a channel axis (OME-Zarr: the
        channel axis and channel names come from its metadata).
    channels : sequence of int or str, optional
        Channels to measure: indices, or names (OME-Zarr ``omero`` channel labels). For an
        image without channel names, as many names as it has channels name them in order.
        Default: all channels, named after the metadata, else ``ch0``, ``ch1``... (a single
        channel without a channel axis gets no suffix).
    spacing : float or sequence of float, optional
        Voxel size in µm per spatial axis. Default: the labels' OME-Zarr metadata, else the
        image's; without any, the table has no physical columns.
    output : path, optional
        Also write the table: Parquet for ``.parquet`` (needs pyarrow), CSV otherwise.
    channel_axis : int, optional
        Axis of ``image`` holding channels (OME-Zarr: from its metadata).
    tile_shape : sequence of int, optional
        Tiles to read (default: the label array's chunks).
    progress : bool, optional
        Show a progress bar (default: on a terminal).

    Returns
    -------
    dict of str to numpy.ndarray
        The columns of :meth:`MeasurementReducer.columns`, one row per label present.

    Examples
    --------
    >>> labels = np.zeros((6, 8), np.uint32); labels[1:3, 1:7] = 1; labels[4:6, 2:4] = 2
    >>> image = np.arange(48, dtype=np.uint16).reshape(6, 8)
    >>> table = measure(labels, image, spacing=0.5, tile_shape=(4, 4))
    >>> table["voxels"].tolist(), table["area_um2"].tolist(), table["centroid_x_um"].tolist()
    ([12, 4], [3.0, 1.0], [1.75, 1.25])
    >>> table["max_intensity"].tolist()
    [22.0, 43.0]
    """
    lab = open_label_image(labels)
    source = _open_intensity(image, channel_axis, lab)
    picked, names = pick_channels(source, channels)
    spacing_um = resolve_spacing(spacing, lab.ndim, lab.spacing,
                                 _image_spacing(source, lab.ndim))
    grid = lab.grid(tile_shape)
    ctx = _MeasureContext(lab, source, picked, grid)
    reducer = MeasurementReducer(lab.ndim, len(picked), capacity=lab.n_labels or 0)
    for arrays, ids in tile_map(ctx.tile, range(grid.n_tiles), desc="measuring",
                                progress=progress):
        reducer.add(arrays, ids)
    columns = reducer.columns(spacing=spacing_um, names=lab.names, channel_names=names)
    if output is not None:
        from .table import write_table

        write_table(columns, output)
    return columns


def _open_intensity(image: Any, channel_axis: int | None, lab: LabelImage) -> ImageSource | None:
    if image is None:
        if channel_axis is not None:
            raise InputError("channel_axis= needs an image=")
        return None
    source = open_image(image, channel_axis)
    if source.spatial_shape != lab.shape:
        raise InputError(f"the image's spatial shape {source.spatial_shape} differs from the "
                         f"labels' {lab.shape}; measure labels on their own image (for labels "
                         "of a lower pyramid level, upsample them first)")
    return source


def _image_spacing(source: ImageSource | None, ndim: int) -> tuple[float, ...] | None:
    if source is None:
        return None
    from ._labels import _ome_spacing

    spacing, _ = _ome_spacing(source)
    return spacing if spacing is not None and len(spacing) == ndim else None


def channel_names(source: ImageSource) -> list[str] | None:
    """Channel names of an OME-Zarr image (``omero.channels[].label``), or None."""
    if source.kind != "ome-zarr" or source.path is None:
        return None
    import zarr

    try:
        attrs = dict(zarr.open_group(str(source.path), mode="r").attrs)
    except (OSError, ValueError, KeyError, TypeError):  # no group metadata: no names
        return None
    meta = attrs.get("ome", attrs)
    omero = meta.get("omero") if isinstance(meta, dict) else None
    entries = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(entries, list) or len(entries) != source.n_channels:
        return None
    labels = [e.get("label") if isinstance(e, dict) else None for e in entries]
    names = [v for v in labels if isinstance(v, str) and v]
    return [_column_safe(v) for v in names] if len(names) == len(labels) else None


def _column_safe(name: str) -> str:
    """A channel name usable in a column name: letters, digits, ``-`` and ``_``.

    Examples
    --------
    >>> _column_safe("Alexa 488 (GFP)")
    'Alexa_488_GFP'
    """
    return re.sub(r"[^0-9A-Za-z_\-]+", "_", name).strip("_") or "channel"


def pick_channels(source: ImageSource | None, channels: Sequence[int | str] | None,
                  ) -> tuple[list[int], list[str | None]]:
    """Channel indices to measure and their column suffixes.

    Examples
    --------
    >>> img = open_image(np.zeros((3, 4, 4)), channel_axis=0)
    >>> pick_channels(img, None), pick_channels(img, [2, 0])
    (([0, 1, 2], ['ch0', 'ch1', 'ch2']), ([2, 0], ['ch2', 'ch0']))
    >>> pick_channels(img, ["DAPI", "GFP", "RFP"])
    ([0, 1, 2], ['DAPI', 'GFP', 'RFP'])
    """
    if source is None:
        if channels:
            raise InputError("channels= needs an image= to measure intensities in")
        return [], []
    n = source.n_channels
    known = channel_names(source)
    if channels is None:
        if source.channel_axis is None:
            return [0], [known[0] if known else None]
        return list(range(n)), list(known or [f"ch{c}" for c in range(n)])
    if isinstance(channels, (str, int)):
        channels = [channels]
    wanted = list(channels)
    if not wanted:
        raise InputError("channels= is empty; leave it out to measure every channel")
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in wanted):
        picked = [int(c) for c in wanted]
        bad = [c for c in picked if not 0 <= c < n]
        if bad:
            raise InputError(f"channels {bad} are out of range: the image has {n} channel(s)")
        names = [known[c] if known else (f"ch{c}" if source.channel_axis is not None else None)
                 for c in picked]
    elif all(isinstance(c, str) for c in wanted):
        text = [str(c) for c in wanted]
        if known:
            missing = [c for c in text if _column_safe(c) not in known]
            if missing:
                raise InputError(f"no channel named {', '.join(missing)}; the image's channels "
                                 f"are {', '.join(known)}")
            picked = [known.index(_column_safe(c)) for c in text]
        elif len(text) == n:
            picked = list(range(n))
        else:
            raise InputError(f"the image has {n} unnamed channel(s): give {n} names (one per "
                             f"channel, in order) or channel indices, not {len(text)} names")
        names = [_column_safe(c) for c in text]
    else:
        raise InputError(f"channels={channels!r}: give channel indices or names, not a mix")
    if len(set(picked)) != len(picked):
        raise InputError(f"channels={channels!r} names a channel twice")
    return picked, list(names)


def physical_volume(voxels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Voxel counts in µm^ndim.

    Examples
    --------
    >>> physical_volume(np.array([8]), (2.0, 0.5, 0.5)).tolist()
    [4.0]
    """
    return np.asarray(voxels) * math.prod(float(s) for s in spacing)
