"""HDF5 through h5py: one image dataset, ``file.h5/path/to/dataset``, Imaris ``.ims`` and
BigDataViewer (``.xml`` + ``.h5``) layouts at full resolution, streamed chunk by chunk.

Calibration: Imaris ``DataSetInfo/Image`` extents and unit; BigDataViewer ``voxelSize`` of the
XML's view setups; for a plain dataset, ``element_size_um`` (ilastik, Fiji) and dimension labels.
BigDataViewer stores 16-bit data as signed integers: it is read back as uint16, as BDV shows it.
Setups of a BigDataViewer dataset (channels, but also angles or tiles) are the channel axis.
"""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from ..location import Location, as_location
from ..model import Axis, ImageMetadata, axis_type_of_name, guessed_axes
from ..registry import Reader
from ..source import ImageSource

__all__ = ["HDF5_SUFFIXES", "H5Ref", "HDF5Reader", "StackedArray", "split_hdf5_path"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".ims")
_SPLIT = re.compile(r"^(.*?\.(?:h5|hdf5|hdf|he5|ims))(/.*)?$", re.IGNORECASE)
_BDV_TIME = re.compile(r"^t(\d{5})$")
_BDV_SETUP = re.compile(r"^s(\d{2,})$")


def split_hdf5_path(text: str) -> tuple[str, str | None]:
    """``("file.h5", "/path/to/dataset")`` from ``"file.h5/path/to/dataset"``.

    Examples
    --------
    >>> split_hdf5_path("/data/run.h5/raw/volume")
    ('/data/run.h5', '/raw/volume')
    >>> split_hdf5_path("scan.ims")
    ('scan.ims', None)
    """
    match = _SPLIT.match(text.rstrip("/"))
    if match is None:
        return text, None
    inner = match.group(2)
    return match.group(1), inner if inner and inner != "/" else None


class StackedArray:
    """Same-shaped datasets on a grid of leading axes (time points x setups), read lazily.

    Indexing takes ints and contiguous slices; only the datasets and regions indexed are read.
    """

    def __init__(self, grid: tuple[int, ...], datasets: Sequence[Any],
                 inner_shape: tuple[int, ...], dtype: np.dtype, keep: Any = None) -> None:
        self.grid = grid
        self.datasets = list(datasets)  # flattened in C order over the grid
        self.inner_shape = inner_shape
        self.dtype = np.dtype(dtype)
        self.shape = grid + inner_shape
        self.ndim = len(self.shape)
        inner_chunks = getattr(self.datasets[0], "chunks", None) or inner_shape
        self.chunks = (1,) * len(grid) + tuple(
            min(c, s) for c, s in zip(inner_chunks, inner_shape, strict=True))
        self._keep = keep  # the open h5py.File

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        ng = len(self.grid)
        picks: list[list[int]] = []
        keep_axis: list[bool] = []
        for k, size in zip(index[:ng], self.grid, strict=True):
            if isinstance(k, slice):
                picks.append(list(range(*k.indices(size))))
                keep_axis.append(True)
            else:
                picks.append([int(k) % size])
                keep_axis.append(False)
        inner: list[Any] = []
        for k, size in zip(index[ng:], self.inner_shape, strict=True):
            if isinstance(k, slice):
                inner.append(slice(*k.indices(size)))
            else:
                inner.append(int(k) % size)
        inner_t = tuple(inner)
        blocks = []
        for cell in itertools.product(*picks):
            flat = int(np.ravel_multi_index(cell, self.grid))
            block = np.asarray(self.datasets[flat][inner_t])
            blocks.append(block.view(self.dtype) if block.dtype != self.dtype else block)
        counts = [len(p) for p, kept in zip(picks, keep_axis, strict=True) if kept]
        out = np.stack(blocks).reshape(counts + list(blocks[0].shape))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class H5Ref:
    """Reopens an HDF5 image: one dataset, or a grid of datasets (BigDataViewer, Imaris)."""

    location: Location
    paths: tuple[str, ...]
    grid: tuple[int, ...] = ()
    inner_shape: tuple[int, ...] | None = None
    dtype: str | None = None

    def open(self) -> Any:
        import h5py

        try:
            f = h5py.File(self.location.open_file() if self.location.is_remote
                          else str(self.location.path), "r")
        except Exception as exc:
            raise InputError(f"cannot open HDF5 file {self.location.text}: {exc}") from exc
        if not self.grid:
            return f[self.paths[0]]
        assert self.inner_shape is not None and self.dtype is not None
        return StackedArray(self.grid, [f[p] for p in self.paths], self.inner_shape,
                            np.dtype(self.dtype), keep=f)


class HDF5Reader(Reader):
    """HDF5 files (plain, Imaris, BigDataViewer) through h5py."""

    name = "hdf5"
    description = "HDF5 (one dataset, file.h5/dataset), Imaris .ims, BigDataViewer .xml/.h5"
    suffixes = HDF5_SUFFIXES + (".xml",)
    requires = ("h5py",)
    extra = "hdf5"
    options = ("dataset", "series")

    def guess_can_open(self, location: Location) -> bool:
        if location.has_suffix((".xml",)):
            return _is_bdv_xml(location)
        file_text, _ = split_hdf5_path(location.text)
        return file_text != location.text.rstrip("/") or location.has_suffix(HDF5_SUFFIXES)

    def open(self, location: Location, dataset: str | None = None, series: int | None = None,
             **_: Any) -> ImageSource:
        import h5py

        if location.has_suffix((".xml",)):
            return _open_bdv(*_bdv_from_xml(location), series)
        file_text, inner = split_hdf5_path(location.text)
        if dataset is not None:
            inner = "/" + dataset.strip("/") if inner is None else f"{inner}/{dataset.strip('/')}"
        file_loc = as_location(file_text, location.storage_options or None)
        if not file_loc.exists():
            raise InputError(f"input not found: {file_loc.text}") from FileNotFoundError(
                file_loc.text)
        f = H5Ref(file_loc, ("/",)).open()
        if not isinstance(f, h5py.Group):
            f = f.file
        if inner is not None:
            if inner not in f:
                raise InputError(f"{file_loc.text} has no dataset {inner!r}; datasets: "
                                 f"{', '.join(_image_datasets(f)) or '(none)'}")
            node = f[inner]
            if isinstance(node, h5py.Dataset):
                return _open_dataset(file_loc, node)
            f = node
        if "DataSet" in f and "DataSetInfo" in f:
            return _open_imaris(file_loc, f, series)
        if _bdv_setups(f):
            xml = _bdv_xml_for(file_loc)
            return _open_bdv(file_loc, xml, series)
        candidates = _image_datasets(f)
        if len(candidates) == 1:
            return _open_dataset(file_loc, f[candidates[0]])
        raise InputError(
            f"{file_loc.text} holds {len(candidates)} image datasets; choose one with "
            f"{file_loc.text}/<dataset> or dataset=: {', '.join(candidates) or '(none)'}")


def _image_datasets(group: Any) -> list[str]:
    import h5py

    found: list[str] = []

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset) and node.ndim >= 2 and (
                np.issubdtype(node.dtype, np.number) or node.dtype == bool):
            found.append(node.name)

    group.visititems(visit)
    return sorted(found)


def _text_attr(value: Any) -> str:
    """An HDF5 string attribute, including Imaris' arrays of one-byte strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            return b"".join(value.ravel().tolist()).decode("utf-8", "replace")
        if value.size == 1:
            return str(value.ravel()[0])
    return str(value)


def _open_dataset(file_loc: Location, ds: Any) -> ImageSource:
    """One dataset, with dimension labels and ``element_size_um`` when present."""
    names = [str(d.label) for d in ds.dims] if ds.ndim else []
    if not all(names):
        attr = ds.attrs.get("axes")
        names = list(_text_attr(attr)) if attr is not None else []
    known = len(names) == ds.ndim and len(set(names)) == ds.ndim and all(names)
    if known:
        axes = [Axis(n.lower(), axis_type_of_name(n)) for n in names]
    else:
        axes = list(guessed_axes(ds.ndim))
    sizes = ds.attrs.get("element_size_um")
    if sizes is not None:
        sizes = [float(v) for v in np.ravel(sizes)]
        spatial = [i for i, a in enumerate(axes) if a.type == "space"]
        targets = range(ds.ndim) if len(sizes) == ds.ndim else spatial[-len(sizes):]
        if len(sizes) in (ds.ndim, len(spatial)):
            for i, size in zip(targets, sizes, strict=True):
                if axes[i].type == "space":
                    axes[i] = Axis(axes[i].name, "space", "micrometer", size)
    meta = ImageMetadata(tuple(axes), reader="hdf5", format="HDF5 dataset",
                         dataset=ds.name, axes_known=known)
    return ImageSource(tuple(ds.shape), np.dtype(ds.dtype), meta.channel_axis,
                       tuple(ds.chunks) if ds.chunks else None, "hdf5", path=file_loc.path,
                       dataset=ds.name, metadata=meta, url=file_loc.url,
                       _ref=H5Ref(file_loc, (ds.name,)), _array=ds)


# -- Imaris ---------------------------------------------------------------------------------
def _open_imaris(file_loc: Location, f: Any, series: int | None) -> ImageSource:
    if series not in (None, 0):
        raise InputError("an Imaris file holds one image: series= must be 0")
    info = f["DataSetInfo/Image"].attrs
    size = [int(_text_attr(info[k])) for k in ("Z", "Y", "X")]
    level = f["DataSet/ResolutionLevel 0"]
    times = sorted((k for k in level if k.startswith("TimePoint ")), key=lambda k: int(k[10:]))
    channels = sorted((k for k in level[times[0]] if k.startswith("Channel ")),
                      key=lambda k: int(k[8:]))
    paths = tuple(f"/DataSet/ResolutionLevel 0/{t}/{c}/Data" for t in times for c in channels)
    first = f[paths[0]]
    unit = _text_attr(info["Unit"]) if "Unit" in info else "um"
    axes = [Axis("t", "time"), Axis("c", "channel")]
    for i, name in zip((2, 1, 0), "zyx", strict=True):
        lo = float(_text_attr(info[f"ExtMin{i}"]))
        hi = float(_text_attr(info[f"ExtMax{i}"]))
        n = size["zyx".index(name)]
        axes.append(Axis(name, "space", unit, (hi - lo) / n if n else 1.0, lo))
    names = []
    for k in range(len(channels)):
        group = f.get(f"DataSetInfo/Channel {k}")
        names.append(_text_attr(group.attrs["Name"]) if group is not None
                     and "Name" in group.attrs else "")
    inner = tuple(size)
    ref = H5Ref(file_loc, paths, (len(times), len(channels)), inner, first.dtype.str)
    arr = StackedArray((len(times), len(channels)), [f[p] for p in paths], inner, first.dtype,
                       keep=f)
    meta = ImageMetadata(tuple(axes), tuple(names) if all(names) else None, reader="hdf5",
                         format="Imaris", dataset="DataSet/ResolutionLevel 0", axes_known=True,
                         extra={"time_points": len(times)})
    return ImageSource(arr.shape, arr.dtype, 1, arr.chunks, "hdf5", path=file_loc.path,
                       dataset=meta.dataset, metadata=meta, url=file_loc.url, _ref=ref,
                       _array=arr)


# -- BigDataViewer --------------------------------------------------------------------------
def _is_bdv_xml(location: Location) -> bool:
    try:
        with location.open_file() as f:
            head = f.read(4096)
    except Exception:  # noqa: BLE001 -- unreadable: not an HDF5 file this reader can open
        return False
    return b"<SpimData" in head


def _bdv_from_xml(location: Location) -> tuple[Location, ET.Element]:
    with location.open_file() as f:
        root = ET.fromstring(f.read())
    loader = root.find(".//ImageLoader")
    if loader is None or not str(loader.get("format", "")).startswith("bdv.hdf5"):
        fmt = loader.get("format") if loader is not None else "none"
        raise InputError(f"{location.text}: BigDataViewer image loader {fmt!r} is not "
                         "supported (only bdv.hdf5)")
    node = loader.find("hdf5")
    if node is None or not node.text:
        raise InputError(f"{location.text}: no <hdf5> file in the image loader")
    target = node.text.strip()
    if node.get("type", "relative") == "relative":
        if location.path is not None:
            target = str(location.path.parent / target)
        else:
            assert location.url is not None
            target = location.url.rsplit("/", 1)[0] + "/" + target
    return as_location(target, location.storage_options or None), root


def _bdv_xml_for(file_loc: Location) -> ET.Element | None:
    """The BigDataViewer XML next to an .h5 (same name, .xml), when it exists."""
    if file_loc.path is None:
        return None
    xml = file_loc.path.with_suffix(".xml")
    if not xml.exists():
        return None
    try:
        return _bdv_from_xml(as_location(str(xml)))[1]
    except (InputError, ET.ParseError):
        return None


def _bdv_setups(f: Any) -> list[str]:
    return sorted((k for k in f if _BDV_SETUP.match(k) and "resolutions" in f[k]),
                  key=lambda k: int(k[1:]))


def _open_bdv(file_loc: Location, xml: ET.Element | None, series: int | None) -> ImageSource:
    import h5py

    if series not in (None, 0):
        raise InputError("series= is not used for BigDataViewer files: setups are channels "
                         "(choose them with channels=)")
    f = h5py.File(file_loc.open_file() if file_loc.is_remote else str(file_loc.path), "r")
    setups = _bdv_setups(f)
    times = sorted((k for k in f if _BDV_TIME.match(k)), key=lambda k: int(k[1:]))
    if not setups or not times:
        raise InputError(f"{file_loc.text} is not a BigDataViewer HDF5 file (no t*/s* groups)")
    paths = tuple(f"/{t}/{s}/0/cells" for t in times for s in setups)
    missing = [p for p in paths if p not in f]
    if missing:
        raise InputError(f"{file_loc.text}: BigDataViewer datasets missing: {missing[:3]}")
    first = f[paths[0]]
    dtype = np.dtype(np.uint16) if first.dtype == np.int16 else first.dtype
    inner = tuple(int(s) for s in first.shape)
    grid = (len(times), len(setups))
    voxel, unit, names = _bdv_calibration(xml, [int(s[1:]) for s in setups])
    axes = [Axis("t", "time"), Axis("c", "channel")]
    axes += [Axis(n, "space", unit, v) for n, v in zip("zyx", voxel, strict=True)]
    ref = H5Ref(file_loc, paths, grid, inner, dtype.str)
    arr = StackedArray(grid, [f[p] for p in paths], inner, dtype, keep=f)
    meta = ImageMetadata(tuple(axes), names, reader="hdf5", format="BigDataViewer HDF5",
                         dataset="t*/s*/0/cells", axes_known=True,
                         extra={"setups": len(setups), "time_points": len(times),
                                "xml": xml is not None})
    return ImageSource(arr.shape, dtype, 1, arr.chunks, "hdf5", path=file_loc.path,
                       dataset=meta.dataset, metadata=meta, url=file_loc.url, _ref=ref,
                       _array=arr)


def _bdv_calibration(xml: ET.Element | None, setup_ids: list[int]
                     ) -> tuple[tuple[float, float, float], str | None, tuple[str, ...] | None]:
    """Voxel size (z, y, x), unit and setup names from the XML's first view setups."""
    if xml is None:
        return (1.0, 1.0, 1.0), None, None
    setups = {int(s.findtext("id", "-1")): s for s in xml.iter("ViewSetup")}
    voxel: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit = None
    names = []
    for sid in setup_ids:
        setup = setups.get(sid)
        if setup is None:
            return voxel, unit, None
        size = setup.find("voxelSize")
        if size is not None and voxel == (1.0, 1.0, 1.0):
            x, y, z = (float(v) for v in str(size.findtext("size", "1 1 1")).split())
            voxel, unit = (z, y, x), size.findtext("unit")
        names.append(setup.findtext("name") or f"setup {sid}")
    return voxel, unit, tuple(names) if len(set(names)) == len(names) else None


