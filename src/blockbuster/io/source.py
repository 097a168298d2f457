"""ImageSource: an image that knows its axes and reads any region on demand, streamed.

The engine tiles an image over its *tiled axes*: the time axis (when it has more than one time
point) and the spatial axes, in storage order. Singleton axes whose meaning is known (a
bioformats2raw plane ``(1, 1, 1, Y, X)``) are dropped, and the channel axis is never tiled: each
read returns all the selected channels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import numpy as np

from ..errors import BlockbusterError, InputError, InputReadError
from .blocks import BlockCache, read_through, small_read
from .model import Axis, ImageMetadata, guessed_axes

__all__ = ["SAMPLE_BOXES", "ArrayRef", "ImageSource"]

#: Number of boxes :meth:`ImageSource.sample` reads for global statistics (at most).
SAMPLE_BOXES = 64


class ArrayRef(Protocol):
    """A picklable recipe that (re)opens the array behind an :class:`ImageSource`."""

    def open(self) -> Any:  # pragma: no cover - protocol
        ...


@dataclass
class ImageSource:
    """An image that tiles are read from.

    Build one with :func:`blockbuster.io.open_image`. Sources pickle without their data: file
    backed ones reopen their file lazily in each process.

    Attributes
    ----------
    shape : tuple of int
        Stored shape, every axis included.
    dtype : numpy.dtype
    channel_axis : int or None
        Stored index of the channel axis (in ``shape``), or None. Where the channels are in
        the arrays :meth:`read` returns is :attr:`tile_channel_axis`.
    storage_chunks : tuple of int or None
        The chunk (or shard) shape the data is stored in, over all stored axes; None for NumPy.
    kind : str
        ``"zarr"``, ``"ome-zarr"``, ``"tiff"``, ``"hdf5"``, ``"n5"``, ``"bioio"`` for files;
        ``"numpy"``, ``"memmap"``, ``"dask"``, ``"zarr-array"``, ``"h5py"``, ``"array"`` for
        arrays passed in Python.
    path : pathlib.Path or None
        The local file or directory (for OME-Zarr: the image group, also inside a
        bioformats2raw tree); None for arrays and remote URLs.
    dataset : str or None
        Array inside the container (zarr array or OME-Zarr level path, HDF5 dataset).
    ome : dict or None
        For OME-Zarr: ``{"dataset", "axes", "scale", "version", "name"}`` of the multiscale.
    metadata : ImageMetadata
        Axes (names, types, units, scale, translation), channel names, reader and format.
    channels : tuple of int or None
        Stored indices of the selected channels, in the order given (None: all of them).
    url : str or None
        The location as given, for remote (fsspec) inputs.
    fixed : tuple of (int, int)
        Stored axes read at one index only (``(axis, index)``), e.g. after
        :meth:`time_point`; they are not tiled.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None
    storage_chunks: tuple[int, ...] | None
    kind: str
    path: Path | None = None
    dataset: str | None = None
    ome: dict[str, Any] | None = None
    metadata: ImageMetadata | None = None
    channels: tuple[int, ...] | None = None
    url: str | None = None
    #: Stored axes fixed at one index (e.g. one time point), besides the dropped singletons.
    fixed: tuple[tuple[int, int], ...] = ()
    _ref: Any = field(default=None, repr=False)
    _array: Any = field(default=None, repr=False)
    _blocks: BlockCache | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.dtype = np.dtype(self.dtype)
        if self.metadata is None:
            self.metadata = ImageMetadata(guessed_axes(len(self.shape), self.channel_axis),
                                          reader=self.kind, format=self.kind)
        if len(self.metadata.axes) != len(self.shape):
            raise InputError(f"{len(self.metadata.axes)} axes {self.axis_names} for an image "
                             f"of shape {self.shape}")
        if self.channel_axis != self.metadata.channel_axis:
            self.metadata = self.metadata.with_channel_axis(self.channel_axis)

    def describe(self) -> str:
        """The image for messages: its file or URL (with the dataset inside), or what array.

        Examples
        --------
        >>> import numpy as np
        >>> from blockbuster.io import open_image
        >>> open_image(np.zeros((4, 5), np.uint8)).describe()
        'the in-memory numpy image (4, 5)'
        """
        where = str(self.path) if self.path is not None else self.url
        if where is None:
            return f"the in-memory {self.kind} image {self.shape}"
        return f"{where} (dataset {self.dataset})" if self.dataset else where

    # -- axes -------------------------------------------------------------------------------
    @property
    def meta(self) -> ImageMetadata:
        assert self.metadata is not None  # set in __post_init__
        return self.metadata

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def axes(self) -> tuple[Axis, ...]:
        """One :class:`Axis` per stored axis."""
        return self.meta.axes

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.meta.axes)

    @property
    def time_axis(self) -> int | None:
        """Stored index of the time axis, or None."""
        return self.meta.time_axis

    @property
    def channel_indices(self) -> tuple[int, ...]:
        """Stored indices of the channels read (all of them unless ``channels`` chose some)."""
        if self.channel_axis is None:
            return ()
        if self.channels is not None:
            return self.channels
        return tuple(range(self.shape[self.channel_axis]))

    @property
    def n_channels(self) -> int:
        """Channels in every tile (1 without a channel axis)."""
        return max(1, len(self.channel_indices))

    @property
    def channel_names(self) -> tuple[str, ...] | None:
        """Names of the channels read, when the format names them."""
        names = self.meta.channel_names
        if names is None or self.channel_axis is None:
            return None
        return tuple(names[i] for i in self.channel_indices)

    def _dropped(self) -> dict[int, int]:
        """Stored axes that are not tiled and not the channel axis, with the index read."""
        fixed = dict(self.fixed)
        known = self.meta.axes_known
        for i, (axis, size) in enumerate(zip(self.axes, self.shape, strict=True)):
            if i == self.channel_axis or i in fixed:
                continue
            if axis.type in ("time", "space"):
                if size == 1 and (known or axis.type == "time"):
                    fixed[i] = 0
            elif size == 1:
                fixed[i] = 0
            else:
                raise InputError(
                    f"axis {axis.name!r} (type {axis.type!r}) has {size} entries; blockbuster "
                    "tiles time and space axes only. Open one entry as an array in Python, e.g. "
                    "open_image(array[..., k, ...]) with its axes")
        spatial = [i for i, a in enumerate(self.axes) if a.type == "space"]
        if spatial and all(i in fixed for i in spatial):
            fixed.pop(spatial[-1])  # a 1x1 image keeps one spatial axis
        return fixed

    @property
    def squeezed_axes(self) -> tuple[int, ...]:
        """Stored indices of the axes dropped from tiles (singletons, or a fixed time point).

        The channel axis is not listed (see :attr:`tile_channel_axis`).
        """
        return tuple(sorted(self._dropped()))

    @property
    def tiled_axes(self) -> tuple[int, ...]:
        """Stored indices of the axes tiles are cut along: time (if > 1 point) and space."""
        dropped = self._dropped()
        return tuple(i for i in range(self.ndim) if i != self.channel_axis and i not in dropped)

    @property
    def tiled_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.tiled_axes)

    @property
    def tiled_types(self) -> tuple[str, ...]:
        """``"time"`` or ``"space"`` per tiled axis."""
        return tuple(self.axes[a].type for a in self.tiled_axes)

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """Stored indices of the tiled spatial axes (no time, no channel, no dropped singleton).

        Without a time axis these are :attr:`tiled_axes`.
        """
        return tuple(a for a in self.tiled_axes if self.axes[a].type == "space")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.spatial_axes)

    @property
    def tile_channel_axis(self) -> int | None:
        """Where the channel axis is in the arrays :meth:`read` returns (None: no channel axis).

        A single channel gives tiles without a channel axis when it was chosen with
        ``channels=``, or when the metadata says the axis holds channels (an array's
        ``channel_axis`` of size 1 is kept, as given).
        """
        if self.channel_axis is None or self._single_channel():
            return None
        return sum(1 for a in self.tiled_axes if a < self.channel_axis)

    @property
    def segment_channel_axis(self) -> int | None:
        """Where the channel axis is in the tiles a segmenter gets.

        As :attr:`tile_channel_axis`, less the time axis: each time point is segmented on its
        own, so segmenters see space (and channels) only.
        """
        c = self.tile_channel_axis
        if c is None:
            return None
        return c - sum(1 for a in self.tiled_axes[:c] if self.axes[a].type == "time")

    @property
    def time_positions(self) -> tuple[int, ...]:
        """Positions of the time axis among :attr:`tiled_axes` (empty, or one)."""
        return tuple(i for i, t in enumerate(self.tiled_types) if t == "time")

    def _single_channel(self) -> bool:
        """Whether the one channel read is dropped from tiles (see tile_channel_axis)."""
        return len(self.channel_indices) == 1 and (self.channels is not None
                                                   or self.meta.axes_known)

    @property
    def spatial_storage_chunks(self) -> tuple[int, ...] | None:
        if self.storage_chunks is None:
            return None
        return tuple(self.storage_chunks[a] for a in self.spatial_axes)

    @property
    def tiled_storage_chunks(self) -> tuple[int, ...] | None:
        if self.storage_chunks is None:
            return None
        return tuple(self.storage_chunks[a] for a in self.tiled_axes)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole stored image (every axis and channel)."""
        return math.prod(self.shape) * self.dtype.itemsize

    # -- calibration ------------------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, ...]:
        """Physical step per stored axis (1.0 where unknown)."""
        return tuple(a.scale for a in self.axes)

    @property
    def translation(self) -> tuple[float, ...]:
        """Physical position of the first voxel per stored axis (0.0 where unknown)."""
        return tuple(a.translation for a in self.axes)

    @property
    def units(self) -> tuple[str | None, ...]:
        """UDUNITS-2 unit per stored axis (None: voxels / unknown)."""
        return tuple(a.unit for a in self.axes)

    @property
    def spatial_scale(self) -> tuple[float, ...]:
        """Voxel size along each tiled spatial axis (:attr:`spatial_axes`)."""
        return tuple(self.axes[a].scale for a in self.spatial_axes)

    @property
    def spatial_units(self) -> tuple[str | None, ...]:
        return tuple(self.axes[a].unit for a in self.spatial_axes)

    @property
    def spatial_translation(self) -> tuple[float, ...]:
        return tuple(self.axes[a].translation for a in self.spatial_axes)

    @property
    def spacing_um(self) -> tuple[float | None, ...]:
        """Voxel size in micrometres per tiled axis; None where unknown (or for time)."""
        from .model import to_micrometers

        return tuple(to_micrometers(self.axes[a].scale, self.axes[a].unit)
                     if self.axes[a].type == "space" else None for a in self.tiled_axes)

    @property
    def label_axes(self) -> tuple[Axis, ...]:
        """Axes of a label image of this source: the stored axes without the channel axis.

        Singleton and fixed axes are kept (with their calibration), so that labels written with
        :attr:`label_shape` line up with the image in viewers.
        """
        return tuple(a for i, a in enumerate(self.axes) if i != self.channel_axis)

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of a label image over :attr:`label_axes` (fixed axes keep their full size)."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.channel_axis)

    def label_index(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """Where a tile's labels (over :attr:`tiled_axes`) go in a :attr:`label_shape` array.

        Use ``out[source.label_index(region)] = labels.reshape(shape)`` with ``shape`` the
        index's extent; dropped axes get a one-voxel slice at the index read.

        Examples
        --------
        >>> import zarr
        >>> from blockbuster.io import open_image
        >>> arr = zarr.create_array({}, shape=(2, 1, 8, 8), dtype="uint8",
        ...                         dimension_names=("c", "z", "y", "x"))
        >>> src = open_image(arr)
        >>> src.tiled_axes, src.tile_channel_axis
        ((2, 3), 0)
        >>> src.label_index((slice(0, 4), slice(2, 6)))
        (slice(0, 1, None), slice(0, 4, None), slice(2, 6, None))
        """
        region = self._check_region(region)
        dropped = self._dropped()
        tiled = iter(region)
        out = []
        for i in range(self.ndim):
            if i == self.channel_axis:
                continue
            if i in dropped:
                out.append(slice(dropped[i], dropped[i] + 1))
            else:
                s = next(tiled)
                out.append(slice(*s.indices(self.shape[i])[:2]))
        return tuple(out)

    # -- views ------------------------------------------------------------------------------
    def time_point(self, t: int) -> ImageSource:
        """The same image at one time point: its time axis is no longer tiled.

        The engine can segment each time point on its own (no stitching across time).
        """
        if self.time_axis is None:
            raise InputError("the image has no time axis")
        n = self.shape[self.time_axis]
        if not -n <= t < n:
            raise InputError(f"time point {t} is out of range for {n} time point(s)")
        fixed = dict(self.fixed)
        fixed[self.time_axis] = t % n
        return replace(self, fixed=tuple(sorted(fixed.items())), _array=self._array)

    def select_channels(self, channels: Any) -> ImageSource:
        """The same image reading only some channels, by stored index or by name."""
        from .channels import resolve_channels

        return replace(self, channels=resolve_channels(self, channels), _array=self._array)

    # -- data -------------------------------------------------------------------------------
    @property
    def array(self) -> Any:
        """The underlying array-like (opened lazily, once per process)."""
        if self._array is None:
            if self._ref is None:
                raise InputError(f"the {self.kind} source has no data to reopen")
            self._array = self._ref.open()
        return self._array

    def full_region(self, region: Sequence[slice]) -> tuple[Any, ...]:
        """The stored index of a region over :attr:`tiled_axes`, with all selected channels.

        Dropped axes get an integer index (so they disappear from the result); a channel axis
        with all channels, or a contiguous run of them, gets a slice.
        """
        region = self._check_region(region)
        dropped = self._dropped()
        tiled = iter(region)
        index: list[Any] = []
        for i in range(self.ndim):
            if i == self.channel_axis:
                index.append(self._channel_index())
            elif i in dropped:
                index.append(dropped[i])
            else:
                index.append(next(tiled))
        return tuple(index)

    def _channel_index(self) -> Any:
        chosen = self.channel_indices
        if self._single_channel():
            return chosen[0]
        if self.channels is None:
            return slice(None)
        if all(b - a == 1 for a, b in itertools.pairwise(chosen)):
            return slice(chosen[0], chosen[-1] + 1)
        return None  # scattered channels: read one by one

    def _check_region(self, region: Sequence[slice]) -> tuple[slice, ...]:
        region = tuple(region)
        tiled = self.tiled_axes
        if len(region) != len(tiled):
            names = ", ".join(self.axes[a].name for a in tiled)
            hint = ""
            if self.time_axis is not None and self.time_axis in tiled:
                hint = ("; a time series is tiled per time point: read (t, space) regions, or "
                        "use source.time_point(t)")
            raise InputError(f"a region of {len(region)} axes for an image tiled over "
                             f"{len(tiled)} axes ({names}){hint}")
        for s in region:
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise InputError(f"regions are tuples of contiguous slices, got {region!r}")
        return region

    def read(self, region: Sequence[slice]) -> np.ndarray:
        """Read a region into a NumPy array, streamed (only what the region covers is read).

        Parameters
        ----------
        region : tuple of slice
            One slice per :attr:`tiled_axes`.

        Returns
        -------
        numpy.ndarray
            Axes: the tiled axes in storage order, plus the selected channels at
            :attr:`tile_channel_axis` (none for a single channel); dropped singleton axes are
            squeezed.

        Examples
        --------
        >>> import numpy as np
        >>> from blockbuster.io import open_image
        >>> src = open_image(np.arange(2 * 3 * 4).reshape(2, 3, 4), channel_axis=0)
        >>> src.read((slice(0, 2), slice(1, 3))).shape, src.tile_channel_axis
        ((2, 2, 2), 0)
        """
        index = self.full_region(region)
        if self.channel_axis is not None and index[self.channel_axis] is None:
            planes = []
            for c in self.channel_indices:
                one = list(index)
                one[self.channel_axis] = c
                planes.append(self._read(tuple(one)))
            axis = self.tile_channel_axis
            assert axis is not None
            return np.stack(planes, axis=axis)
        return self._read(index)

    def _read(self, index: tuple[Any, ...]) -> np.ndarray:
        """``_get``, with a failure of the storage (a corrupt chunk, a truncated file, a lost
        connection) turned into an :class:`InputReadError` naming the file, region and chunk."""
        try:
            return self._get(index)
        except (BlockbusterError, MemoryError):
            raise
        except Exception as exc:
            raise self._read_error(index, exc) from exc

    def _get(self, index: tuple[Any, ...]) -> np.ndarray:
        arr = self.array
        if isinstance(arr, da.Array):
            return np.asarray(arr[index].compute(scheduler="synchronous"))
        chunks = small_read(index, self.shape, self.storage_chunks, self.dtype.itemsize)
        if chunks is None:
            return np.asarray(arr[index])
        # A read much smaller than its storage chunks (tiny tiles): the chunks are decoded
        # once and kept for the next tiles, which read the same chunks in grid order.
        if self._blocks is None:
            self._blocks = BlockCache()
        return read_through(self._blocks, arr, chunks)

    def _read_error(self, index: tuple[Any, ...], exc: Exception) -> InputReadError:
        voxels = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s)
                           for s in index)
        chunk = self._failing_chunk(index)
        where = f"chunk {chunk} of " if chunk else ""
        return InputReadError(f"cannot read {where}{self.describe()} (voxels [{voxels}]): "
                              f"{type(exc).__name__}: {exc}")

    def _failing_chunk(self, index: tuple[Any, ...], limit: int = 256) -> str | None:
        """The first storage chunk under ``index`` that fails on its own (its key for zarr),
        found by reading the chunks one by one; None when unknown or all read."""
        chunks = self.storage_chunks
        if chunks is None:
            return None
        ranges = []
        for s, c, n in zip(index, chunks, self.shape, strict=True):
            if isinstance(s, slice):
                start, stop = s.start or 0, n if s.stop is None else s.stop
            else:
                start, stop = int(s), int(s) + 1
            ranges.append(range(start // c, (max(stop, start + 1) - 1) // c + 1))
        arr = self.array
        for position in itertools.islice(itertools.product(*ranges), limit):
            box = tuple(slice(i * c, min((i + 1) * c, n))
                        for i, c, n in zip(position, chunks, self.shape, strict=True))
            try:
                self._get(box)
            except (BlockbusterError, MemoryError):
                raise
            except Exception:  # noqa: BLE001 -- the chunk that fails, whatever it raises
                return _chunk_name(arr, position)
        return None

    def to_dask(self, chunks: Any = None) -> da.Array:
        """A lazy dask view of the stored image (every axis), chunked like its storage."""
        if isinstance(self.array, da.Array):
            arr = self.array
        else:
            default = self.storage_chunks or "auto"
            arr = da.from_array(self.array, chunks=default, asarray=True, lock=False,
                                name=f"blockbuster-source-{id(self)}" if self._ref is None
                                else None)
        return arr if chunks is None else arr.rechunk(chunks)

    def sample(self, max_voxels: int = 2_000_000, seed: int = 0) -> np.ndarray:
        """A streamed subsample of the image for global statistics, the same in any container.

        The sample is a fixed grid of at most :data:`SAMPLE_BOXES` boxes spread evenly over the
        tiled axes, placed from the image's shape alone: the same pixels give the same sample
        (and so the same threshold or percentiles) whatever the file format or chunking. An
        image of at most ``max_voxels`` voxels is taken whole. Each box is read on its own, so
        only the storage chunks under the boxes are read.

        Parameters
        ----------
        max_voxels : int
            Upper bound on the voxels (per channel) sampled.
        seed : int
            Unused (kept for compatibility: the grid is deterministic).

        Returns
        -------
        numpy.ndarray
            ``(n, channels)``: the selected channels, 1 without a channel axis.
        """
        del seed
        pieces = [self._voxels_by_channel(self.read(box))
                  for box in sample_boxes(self.tiled_shape, self.tiled_types, max_voxels)]
        return np.concatenate(pieces, axis=0)

    def sample_info(self, max_voxels: int = 2_000_000) -> dict[str, Any]:
        """How :meth:`sample` samples this image (for run metadata)."""
        boxes = sample_boxes(self.tiled_shape, self.tiled_types, max_voxels)
        return {"boxes": len(boxes), "voxels": int(sum(math.prod(s.stop - s.start for s in b)
                                                       for b in boxes)),
                "box_shape": [s.stop - s.start for s in boxes[0]]}

    def _voxels_by_channel(self, tile: np.ndarray) -> np.ndarray:
        axis = self.tile_channel_axis
        if axis is None:
            return tile.reshape(-1, 1)
        return np.moveaxis(tile, axis, -1).reshape(-1, tile.shape[axis])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_blocks"] = None  # decoded chunks stay in the process that read them
        if self._ref is not None:
            state["_array"] = None  # reopened lazily in the receiving process
        return state


def _chunk_name(arr: Any, position: tuple[int, ...]) -> str:
    """A chunk's key in its store (zarr: ``c/1/1`` or ``1.1``), else its grid position."""
    encode = getattr(getattr(arr, "metadata", None), "encode_chunk_key", None)
    if callable(encode):
        try:
            return str(encode(position))
        except Exception:  # noqa: BLE001 -- a store without keys: the position says enough
            pass
    return str(tuple(position))


def sample_boxes(shape: Sequence[int], types: Sequence[str], max_voxels: int
                 ) -> list[tuple[slice, ...]]:
    """The fixed grid of boxes :meth:`ImageSource.sample` reads, from the shape alone.

    Boxes are one voxel deep along time and about cubic in space, at most
    :data:`SAMPLE_BOXES` of them, centred on an even lattice.

    Examples
    --------
    >>> boxes = sample_boxes((1000, 1000), ("space", "space"), 64 * 100)
    >>> len(boxes), boxes[0]
    (64, (slice(57, 67, None), slice(57, 67, None)))
    >>> sample_boxes((10, 10), ("space", "space"), 1000)
    [(slice(0, 10, None), slice(0, 10, None))]
    """
    shape = [int(s) for s in shape]
    if max_voxels < 1:
        raise InputError(f"max_voxels={max_voxels} must be >= 1")
    if math.prod(shape) <= max_voxels:
        return [tuple(slice(0, s) for s in shape)]
    extent = _box_extent(shape, types, max(1, max_voxels // SAMPLE_BOXES))
    # Time points are not a lattice axis: box k goes to time point k*T/n, so that every box
    # sits at another place in space and the boxes still cover the time series evenly.
    timed = [i for i, t in enumerate(types) if t == "time"]
    positions = [1 if i in timed else max(1, s // e)
                 for i, (s, e) in enumerate(zip(shape, extent, strict=True))]
    wanted = max(1, min(SAMPLE_BOXES, max_voxels // math.prod(extent)))
    counts = _spread(positions, wanted)
    starts = [[0] if i in timed else
              [min(s - e, max(0, int((k + 0.5) * s / n - e / 2))) for k in range(n)]
              for i, (s, e, n) in enumerate(zip(shape, extent, counts, strict=True))]
    grid = np.stack(np.meshgrid(*[np.asarray(st) for st in starts], indexing="ij"), -1)
    corners = grid.reshape(-1, len(shape))
    for i in timed:
        corners[:, i] = ((np.arange(len(corners)) + 0.5) * shape[i] / len(corners)).astype(int)
    return [tuple(slice(int(a), int(a) + e) for a, e in zip(corner, extent, strict=True))
            for corner in corners]


def _box_extent(shape: list[int], types: Sequence[str], voxels: int) -> list[int]:
    """About cubic box of ``voxels`` over the spatial axes longer than one voxel."""
    extent = [1] * len(shape)
    free = [i for i, (s, t) in enumerate(zip(shape, types, strict=True)) if t == "space" and s > 1]
    budget = float(voxels)
    while free:
        side = budget ** (1 / len(free))
        short = [i for i in free if shape[i] <= side]
        if not short:
            for i in free:
                extent[i] = max(1, int(side))
            break
        for i in short:  # axes shorter than the side are taken whole
            extent[i] = shape[i]
            budget /= shape[i]
            free.remove(i)
    return extent


def _spread(positions: list[int], wanted: int) -> list[int]:
    """Boxes per axis: about ``wanted`` in all, in proportion to the room on each axis."""
    counts = [1] * len(positions)
    while math.prod(counts) < wanted:
        # Grow the axis with the most room per box, while the total stays within wanted.
        room = [(p / c, i) for i, (p, c) in enumerate(zip(positions, counts, strict=True)) if c < p]
        if not room:
            break
        _, i = max(room)
        if math.prod(counts) // counts[i] * (counts[i] + 1) > wanted:
            break
        counts[i] += 1
    return counts
