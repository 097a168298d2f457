"""Opening images (zarr v2/v3, OME-Zarr, TIFF, in-memory arrays) and reading tile regions.

Every input becomes an :class:`ImageSource`: a picklable description that reads any region on
demand. Path-backed sources reopen their file lazily in each process, so a source can be shipped
to dask workers without carrying file handles or data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .errors import InputError

__all__ = ["ImageSource", "open_image", "default_output_path"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


@dataclass
class ImageSource:
    """An image that tiles are read from.

    Attributes
    ----------
    shape : tuple of int
        Full shape, channel axis included.
    dtype : numpy.dtype
    channel_axis : int or None
        Non-negative index of the channel axis, or None.
    storage_chunks : tuple of int or None
        The chunk (or shard) shape the data is stored in, over all axes; None for NumPy input.
    kind : str
        "zarr", "ome-zarr", "tiff", "numpy", "dask" or "zarr-array".
    path : pathlib.Path or None
        Where the image lives, for path inputs.
    ome : dict or None
        For OME-Zarr: ``{"group": path, "dataset": "0", "axes": [...], "scale": [...]}``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None
    storage_chunks: tuple[int, ...] | None
    kind: str
    path: Path | None = None
    dataset: str | None = None
    ome: dict[str, Any] | None = None
    _array: Any = field(default=None, repr=False)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a != self.channel_axis)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.spatial_axes)

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else self.shape[self.channel_axis]

    @property
    def spatial_storage_chunks(self) -> tuple[int, ...] | None:
        if self.storage_chunks is None:
            return None
        return tuple(self.storage_chunks[a] for a in self.spatial_axes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def full_region(self, spatial_region: tuple[slice, ...]) -> tuple[slice, ...]:
        """Insert the whole channel axis into a spatial region."""
        region = list(spatial_region)
        if self.channel_axis is not None:
            region.insert(self.channel_axis, slice(None))
        return tuple(region)

    # -- data -------------------------------------------------------------------------------
    @property
    def array(self) -> Any:
        """The underlying array-like (opened lazily, once per process)."""
        if self._array is None:
            self._array = _reopen(self)
        return self._array

    def read(self, spatial_region: tuple[slice, ...]) -> np.ndarray:
        """Read a spatial region (all channels) into a NumPy array."""
        region = self.full_region(spatial_region)
        if self.kind == "dask":
            return np.asarray(self.array[region].compute(scheduler="synchronous"))
        return np.asarray(self.array[region])

    def to_dask(self, chunks: Any = None) -> da.Array:
        """A lazy dask view of the image, chunked like its storage unless ``chunks`` is given."""
        if self.kind == "dask":
            arr = self.array
        else:
            default = self.storage_chunks or "auto"
            arr = da.from_array(self.array, chunks=default, asarray=True, lock=False,
                                name=f"blockbuster-source-{id(self)}" if self.path is None else None)
        return arr if chunks is None else arr.rechunk(chunks)

    def sample(self, max_voxels: int = 2_000_000, seed: int = 0) -> np.ndarray:
        """A streamed, spread-out subsample of the image for global statistics.

        Reads a few whole storage-aligned blocks spread over the image (never the whole image)
        and returns their voxels as ``(n, channels)``; channels is 1 without a channel axis.
        """
        rng = np.random.default_rng(seed)
        spatial = self.spatial_shape
        block = _sample_block_shape(spatial, self.spatial_storage_chunks, max_voxels)
        grid = [max(1, s // b) for s, b in zip(spatial, block)]
        n_blocks = max(1, min(math.prod(grid), max_voxels // max(1, math.prod(block))))
        flat = rng.choice(math.prod(grid), size=n_blocks, replace=False)
        pieces = []
        for idx in zip(*np.unravel_index(np.sort(flat), grid)):
            region = tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, block, spatial))
            tile = self.read(region)
            if self.channel_axis is not None:
                tile = np.moveaxis(tile, self.channel_axis, -1).reshape(-1, self.n_channels)
            else:
                tile = tile.reshape(-1, 1)
            pieces.append(tile)
        return np.concatenate(pieces, axis=0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_array"] = None  # reopened lazily in the receiving process
        return state


def _sample_block_shape(spatial, storage, max_voxels):
    """Storage-aligned block of at most ~max_voxels/8 voxels, so that several blocks are read."""
    target = max(1, max_voxels // 8)
    base = list(storage) if storage else [min(s, 64) for s in spatial]
    base = [max(1, min(b, s)) for b, s in zip(base, spatial)]
    while math.prod(base) > target and max(base) > 1:
        i = int(np.argmax(base))
        base[i] = max(1, base[i] // 2)
    return tuple(base)


# -- opening ---------------------------------------------------------------------------------
def open_image(image: Any, channel_axis: int | None = None) -> ImageSource:
    """Open any supported input as an :class:`ImageSource`.

    Parameters
    ----------
    image : str, os.PathLike, numpy.ndarray, dask.array.Array or zarr.Array
        A path to a zarr array (v2 or v3), an OME-Zarr image (its full-resolution level is
        used), or a TIFF / OME-TIFF (streamed, never read whole); or an array in memory.
    channel_axis : int, optional
        Axis holding channels. For OME-Zarr it defaults to the axis of type "channel".

    Examples
    --------
    >>> import numpy as np
    >>> src = open_image(np.zeros((4, 10, 12), np.uint8), channel_axis=0)
    >>> src.spatial_shape, src.n_channels, src.kind
    ((10, 12), 4, 'numpy')
    """
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, os.PathLike)):
        src = _open_path(Path(image))
    elif isinstance(image, da.Array):
        src = ImageSource(tuple(image.shape), np.dtype(image.dtype), None,
                          tuple(c[0] for c in image.chunks), "dask", _array=image)
    elif isinstance(image, zarr.Array):
        src = ImageSource(tuple(image.shape), np.dtype(image.dtype), None,
                          _zarr_chunks(image), "zarr-array", _array=image)
    elif isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        arr = np.asarray(image)
        src = ImageSource(tuple(arr.shape), arr.dtype, None, None, "numpy", _array=arr)
    else:
        raise InputError(
            f"cannot read an image from {type(image).__name__}: pass a path (zarr, OME-Zarr, "
            "TIFF) or a numpy, dask or zarr array"
        )
    _check_dtype(src)
    if channel_axis is not None:
        src.channel_axis = _normalise_axis(channel_axis, src.ndim)
    if src.ndim - (src.channel_axis is not None) < 1:
        raise InputError(f"image of shape {src.shape} has no spatial axis")
    if 0 in src.shape:
        raise InputError(f"image of shape {src.shape} is empty")
    return src


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise InputError(f"channel_axis={axis} is out of range for an image with {ndim} axes")
    return axis % ndim


def _check_dtype(src: ImageSource) -> None:
    if not (np.issubdtype(src.dtype, np.number) or src.dtype == bool):
        raise InputError(f"image dtype {src.dtype} is not numeric")


def _zarr_chunks(arr: zarr.Array) -> tuple[int, ...]:
    """Read granularity of a zarr array: its shard shape when sharded, else its chunk shape."""
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)


def _open_path(path: Path) -> ImageSource:
    if not path.exists():
        raise InputError(f"input not found: {path}") from FileNotFoundError(path)
    name = path.name.lower()
    if path.is_file() and name.endswith(TIFF_SUFFIXES):
        return _open_tiff(path)
    if _is_zarr_dir(path):
        return _open_zarr(path)
    raise InputError(
        f"{path} is neither a zarr store (no zarr.json/.zarray/.zgroup inside) nor a TIFF file "
        f"(suffix {', '.join(TIFF_SUFFIXES)})"
    )


def _open_tiff(path: Path) -> ImageSource:
    arr = _open_tiff_array(path)
    return ImageSource(tuple(arr.shape), np.dtype(arr.dtype), None, tuple(arr.chunks), "tiff",
                       path=path, _array=arr)


def _open_tiff_array(path: Path) -> zarr.Array:
    import tifffile

    try:
        store = tifffile.imread(path, aszarr=True, level=0)
    except Exception as exc:  # tifffile raises several types for broken files
        raise InputError(f"cannot read TIFF {path}: {exc}") from exc
    node = zarr.open(store, mode="r")
    if isinstance(node, zarr.Group):  # multi-level (pyramidal) TIFF: level 0 is full resolution
        node = node["0"]
    return node


def _open_zarr(path: Path) -> ImageSource:
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise InputError(f"cannot open zarr store {path}: {exc}") from exc
    if isinstance(node, zarr.Array):
        return ImageSource(tuple(node.shape), np.dtype(node.dtype), None, _zarr_chunks(node),
                           "zarr", path=path, _array=node)
    ome = _ome_multiscale(node)
    if ome is not None:
        arr = node[ome["dataset"]]
        axes = ome.get("axes") or []
        channel = next((i for i, a in enumerate(axes) if _axis_type(a) == "channel"), None)
        src = ImageSource(tuple(arr.shape), np.dtype(arr.dtype), channel, _zarr_chunks(arr),
                          "ome-zarr", path=path, dataset=ome["dataset"], ome=ome, _array=arr)
        return src
    arrays = sorted(name for name, _ in node.arrays())
    if len(arrays) == 1:
        arr = node[arrays[0]]
        return ImageSource(tuple(arr.shape), np.dtype(arr.dtype), None, _zarr_chunks(arr),
                           "zarr", path=path, dataset=arrays[0], _array=arr)
    raise InputError(
        f"{path} is a zarr group without OME-Zarr multiscales metadata; point to one of its "
        f"arrays instead: {', '.join(arrays) or '(it has none)'}"
    )


def _axis_type(axis: Any) -> str | None:
    return axis.get("type") if isinstance(axis, dict) else None


def _ome_multiscale(group: zarr.Group) -> dict[str, Any] | None:
    """The first multiscale of an OME-Zarr image group (NGFF 0.4 or 0.5), or None."""
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)  # NGFF 0.5 nests everything under "ome"
    multiscales = meta.get("multiscales")
    if not multiscales:
        return None
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        return None
    first = datasets[0]
    scale = next((t.get("scale") for t in first.get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    return {"dataset": first["path"], "axes": ms.get("axes"), "scale": scale,
            "version": meta.get("version") or ms.get("version"), "name": ms.get("name")}


def _reopen(src: ImageSource) -> Any:
    if src.kind == "tiff":
        return _open_tiff_array(src.path)
    node = zarr.open(store=str(src.path), mode="r")
    return node[src.dataset] if src.dataset is not None else node


def default_output_path(path: Path) -> Path:
    """``<dir>/<name>.labels.zarr`` next to the input path.

    Examples
    --------
    >>> default_output_path(Path("/data/brain.ome.zarr")).as_posix()
    '/data/brain.labels.zarr'
    >>> default_output_path(Path("scan.tif")).as_posix()
    'scan.labels.zarr'
    """
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif") + TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.labels.zarr")
