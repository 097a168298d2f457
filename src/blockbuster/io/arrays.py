"""Arrays passed in Python: NumPy, memmaps, dask, zarr, h5py datasets, xarray, TensorStore.

Every one of them is read region by region (a memmap or an h5py dataset is never loaded whole),
and file-backed ones (memmap, h5py) pickle as a recipe to reopen the file, not as data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ..errors import InputError
from .model import Axis, ImageMetadata, axis_type_of_name
from .source import ImageSource

__all__ = ["MemmapRef", "source_from_array"]


@dataclass(frozen=True)
class MemmapRef:
    """Reopens a NumPy memmap (read only)."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    order: str

    def open(self) -> np.memmap:
        return np.memmap(self.filename, dtype=np.dtype(self.dtype), mode="r", shape=self.shape,
                         offset=self.offset, order=self.order)  # type: ignore[call-overload]


def _named_meta(names: list[str], kind: str) -> ImageMetadata:
    axes = [Axis(str(n), axis_type_of_name(str(n))) for n in names]
    channels = [i for i, a in enumerate(axes) if a.type == "channel"]
    for i in channels[1:]:
        axes[i] = Axis(axes[i].name, "space")
    return ImageMetadata(tuple(axes), reader=kind, format=kind, axes_known=True)


def _is_h5py_dataset(image: Any) -> bool:
    h5py = sys.modules.get("h5py")
    return h5py is not None and isinstance(image, h5py.Dataset)


def source_from_array(image: Any) -> ImageSource:
    """An :class:`ImageSource` over an array-like, streamed where the array allows it."""
    if isinstance(image, np.memmap) and getattr(image, "filename", None):
        mref: MemmapRef | None = MemmapRef(
            str(image.filename), image.dtype.str, tuple(image.shape), int(image.offset),
            "F" if image.flags.f_contiguous and not image.flags.c_contiguous else "C")
        base = image.base if isinstance(image.base, np.memmap) else image
        if image.shape != base.shape:  # a view of a memmap: reopening would lose the view
            mref = None
        return ImageSource(tuple(image.shape), image.dtype, None, None, "memmap",
                           _ref=mref, _array=image)
    if _is_h5py_dataset(image):
        from .location import as_location
        from .readers.hdf5_reader import H5Ref

        filename = image.file.filename
        ref = H5Ref(as_location(filename), (image.name,)) if filename else None
        return ImageSource(tuple(image.shape), np.dtype(image.dtype), None,
                           tuple(image.chunks) if image.chunks else None, "h5py",
                           dataset=image.name, _ref=ref, _array=image)
    if isinstance(image, da.Array):
        return ImageSource(tuple(image.shape), np.dtype(image.dtype), None,
                           tuple(c[0] for c in image.chunks), "dask", _array=image)
    if isinstance(image, zarr.Array):
        from .readers.zarr_reader import _dimension_names, zarr_chunks

        names = _dimension_names(image)
        meta = _named_meta(names, "zarr-array") if names else None
        return ImageSource(tuple(image.shape), np.dtype(image.dtype),
                           meta.channel_axis if meta else None, zarr_chunks(image),
                           "zarr-array", metadata=meta, _array=image)
    module = type(image).__module__.split(".")[0]
    if module == "xarray" and hasattr(image, "dims"):
        inner = source_from_array(image.data)
        meta = _named_meta([str(d) for d in image.dims], "xarray")
        return ImageSource(inner.shape, inner.dtype, meta.channel_axis, inner.storage_chunks,
                           inner.kind, metadata=meta, _ref=inner._ref, _array=inner._array)
    if module == "tensorstore":
        from .readers.n5_reader import TensorStoreArray

        store = TensorStoreArray(image)
        return ImageSource(store.shape, store.dtype, None, store.chunks, "array", _array=store)
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        arr = np.asarray(image)
        return ImageSource(tuple(arr.shape), arr.dtype, None, None, "numpy", _array=arr)
    raise InputError(
        f"cannot read an image from {type(image).__name__}: pass a path or URL (zarr, "
        "OME-Zarr, TIFF, HDF5, N5, CZI/ND2/LIF) or a numpy, dask, zarr or h5py array")

