"""Opening images (zarr, OME-Zarr, TIFF, HDF5, N5, CZI/ND2/LIF, in-memory arrays).

Every input becomes an :class:`ImageSource`: a picklable description that knows its axes
(time, channel, space), calibration and channel names, and reads any region on demand.
File-backed sources reopen their file lazily in each process, so a source can be shipped to
dask workers without carrying file handles or data.

Formats are read by *readers* (:class:`Reader`), found through the ``blockbuster.readers``
entry-point group; :func:`reader_table` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .channels import describe_channels
from .location import Location, as_location
from .model import Axis, ImageMetadata
from .registry import Reader, available_readers, open_location, reader_table
from .source import SAMPLE_BOXES, ImageSource, sample_boxes

__all__ = [
    "SAMPLE_BOXES",
    "Axis",
    "ImageMetadata",
    "ImageSource",
    "Location",
    "Reader",
    "available_readers",
    "default_output_path",
    "describe_channels",
    "open_image",
    "reader_table",
    "sample_boxes",
]

#: Suffixes stripped from an input's name to name its default output.
_INPUT_SUFFIXES = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".ome.btf", ".tiff", ".tif",
                   ".btf", ".tf8", ".tf2", ".h5", ".hdf5", ".hdf", ".he5", ".ims", ".n5",
                   ".czi", ".nd2", ".lif", ".xml")


def open_image(
    image: Any,
    channel_axis: int | None = None,
    *,
    channels: Any = None,
    series: int | None = None,
    dataset: str | None = None,
    level: int = 0,
    reader: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ImageSource:
    """Open any supported input as an :class:`ImageSource`.

    Parameters
    ----------
    image : str, os.PathLike, array or ImageSource
        A path or URL (``file://``, ``http(s)://``, ``s3://``) to a zarr array or group,
        an OME-Zarr image or bioformats2raw tree, a TIFF / OME-TIFF / ImageJ TIFF, an HDF5
        file (``file.h5``, ``file.h5/path/to/dataset``, Imaris ``.ims``, BigDataViewer
        ``.xml``/``.h5``), an N5 dataset, or CZI/ND2/LIF (bioio extra); or an array in
        memory: NumPy (memmaps included), dask, zarr, h5py dataset, xarray, TensorStore.
    channel_axis : int, optional
        Stored axis holding channels, for inputs whose metadata does not say (it is read from
        OME-Zarr, OME-TIFF, ImageJ, Imaris, BigDataViewer and bioio metadata).
    channels : int, str or sequence of them, optional
        Channels to read, by index or by name (names from the file's metadata). Default: all.
        A single channel gives tiles without a channel axis.
    series : int, optional
        Series of a multi-series file (bioformats2raw, multi-series TIFF, CZI/LIF scenes).
    dataset : str, optional
        Array inside a container (zarr group member, HDF5 dataset path, N5 dataset).
    level : int
        Pyramid level (OME-Zarr, pyramidal TIFF, N5 ``s<level>``), with its own voxel size.
    reader : str, optional
        Force a reader by name (see :func:`reader_table`) instead of guessing.
    storage_options : dict, optional
        fsspec options for URLs (e.g. ``{"anon": True}`` for a public S3 bucket).

    Examples
    --------
    >>> import numpy as np
    >>> src = open_image(np.zeros((4, 10, 12), np.uint8), channel_axis=0)
    >>> src.spatial_shape, src.n_channels, src.kind
    ((10, 12), 4, 'numpy')
    >>> open_image(np.zeros((4, 10, 12), np.uint8), channel_axis=0, channels=[2, 0]).n_channels
    2
    """
    options = {"series": series, "dataset": dataset, "level": level or None}
    if isinstance(image, ImageSource):
        src = image
    elif isinstance(image, (str, os.PathLike)):
        src = open_location(as_location(image, storage_options), reader, **options)
    else:
        given = [f"{k}=" for k, v in options.items() if v is not None]
        if given or reader is not None:
            raise InputError(f"{', '.join(given + (['reader='] if reader else []))} only apply "
                             "to paths and URLs, not to arrays")
        from .arrays import source_from_array

        src = source_from_array(image)
    _check_dtype(src)
    if channel_axis is not None:
        axis = _normalise_axis(channel_axis, src.ndim)
        if axis != src.channel_axis:
            from dataclasses import replace

            src = replace(src, channel_axis=axis, channels=None,
                          metadata=src.meta.with_channel_axis(axis), _array=src._array)
    if channels is not None:
        src = src.select_channels(channels)
    if 0 in src.shape:
        raise InputError(f"image of shape {src.shape} is empty")
    if not src.spatial_axes:
        raise InputError(f"image of shape {src.shape} (axes {', '.join(src.axis_names)}) has "
                         "no spatial axis")
    src.tiled_axes  # noqa: B018 - raises for an axis that can be neither tiled nor dropped
    return src


def _normalise_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise InputError(f"channel_axis={axis!r} must be an int (the index of the axis holding "
                         "channels)")
    if not -ndim <= axis < ndim:
        raise InputError(f"channel_axis={axis} is out of range for an image with {ndim} axes")
    return axis % ndim


def _check_dtype(src: ImageSource) -> None:
    if not (np.issubdtype(src.dtype, np.number) or src.dtype == bool):
        raise InputError(f"image dtype {src.dtype} is not numeric")
    if np.issubdtype(src.dtype, np.complexfloating):
        raise InputError(f"image dtype {src.dtype} is complex; segmenters take real "
                         "intensities: pass its magnitude (numpy.abs) or one part (.real)")


def default_output_path(path: Path) -> Path:
    """``<dir>/<name>.labels.zarr`` next to the input path.

    Examples
    --------
    >>> default_output_path(Path("/data/brain.ome.zarr")).as_posix()
    '/data/brain.labels.zarr'
    >>> default_output_path(Path("scan.tif")).as_posix()
    'scan.labels.zarr'
    >>> default_output_path(Path("run.ims")).as_posix()
    'run.labels.zarr'
    """
    name = path.name
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.labels.zarr")

