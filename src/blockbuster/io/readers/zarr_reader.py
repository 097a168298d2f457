"""zarr v2/v3 arrays and groups, OME-Zarr images (NGFF 0.4 and 0.5), bioformats2raw trees.

OME-Zarr metadata is validated and parsed with ``ome-zarr-models``. A bioformats2raw root opens
its series 0 (``series=`` chooses another); ``level=`` opens a lower-resolution level with its
own scale. Local paths and fsspec URLs (``http(s)://``, ``s3://``) are read alike.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ...errors import InputError, PluginNotInstalledError
from ..location import Location
from ..model import Axis, ImageMetadata, axis_type_of_name, guessed_axes
from ..registry import Reader
from ..source import ImageSource

__all__ = ["ZarrReader", "ZarrRef", "open_zarr_node", "zarr_chunks"]

ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def zarr_chunks(arr: zarr.Array) -> tuple[int, ...]:
    """Read granularity of a zarr array: its shard shape when sharded, else its chunk shape."""
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def open_zarr_node(location: Location, path: str | None = None) -> zarr.Array | zarr.Group:
    """The zarr array or group at ``location`` (``path`` inside it), read only."""
    try:
        if location.url is not None:
            from zarr.storage import FsspecStore

            location.fs()  # names the extra to install when the filesystem's package is missing

            store: Any = FsspecStore.from_url(location.url, read_only=True,
                                              storage_options=location.storage_options or None)
        else:
            store = str(location.path)
        node = zarr.open(store=store, mode="r")
        if not path:
            return node
        if not isinstance(node, zarr.Group):
            raise InputError(f"{location.text} is a zarr array: it has no {path!r} inside")
        return node[path]
    except (KeyError, FileNotFoundError) as exc:
        where = f"{location.text}/{path}" if path else location.text
        raise InputError(f"no zarr array or group at {where}") from exc
    except (InputError, PluginNotInstalledError):
        raise
    except Exception as exc:
        raise InputError(f"cannot open zarr store {location.text}: {exc}") from exc


@dataclass(frozen=True)
class ZarrRef:
    """Reopens one zarr array: its store location and the path inside it."""

    location: Location
    path: str | None = None

    def open(self) -> zarr.Array:
        node = open_zarr_node(self.location, self.path)
        if not isinstance(node, zarr.Array):
            raise InputError(f"{self.location.text}/{self.path} is a group, not an array")
        return node


@dataclass
class _Multiscale:
    """One multiscale image parsed from NGFF metadata."""

    axes: list[dict[str, Any]]
    paths: list[str]
    scales: list[list[float]]
    translations: list[list[float]]
    version: str
    name: str | None
    problem: str | None = None
    channel_names: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ZarrReader(Reader):
    """zarr v2/v3 (any codec, sharded, ``dimension_separator="/"``), OME-Zarr, bioformats2raw."""

    name = "zarr"
    description = "zarr v2/v3 arrays, OME-Zarr NGFF 0.4/0.5 images, bioformats2raw trees"
    suffixes = (".zarr", ".zarr/")
    requires = ("zarr",)
    options = ("series", "dataset", "level")

    def guess_can_open(self, location: Location) -> bool:
        if location.path is not None and not location.path.is_dir():
            return False
        return any(location.child_exists(m) for m in ZARR_MARKERS)

    def open(self, location: Location, series: int | None = None, dataset: str | None = None,
             level: int | None = None, **_: Any) -> ImageSource:
        node = open_zarr_node(location, dataset)
        base = location.join(dataset) if dataset else location
        if isinstance(node, zarr.Array):
            if series is not None or level is not None:
                raise InputError(f"{base.text} is a plain zarr array: series= and level= are "
                                 "for OME-Zarr images")
            return _plain_array(base, node, location, dataset)
        attrs = _ome_attrs(node)
        if "bioformats2raw.layout" in attrs:
            return _bioformats2raw(base, node, attrs, series, level)
        if series is not None:
            raise InputError(f"series={series}: {base.text} is not a bioformats2raw tree")
        if "multiscales" in attrs:
            return _ome_image(base, node, attrs, level)
        if "plate" in attrs or "well" in attrs:
            raise InputError(f"{base.text} is an OME-Zarr HCS plate/well; open one of its "
                             "images (e.g. <plate>/A/1/0) instead")
        if level is not None:
            raise InputError(f"level={level}: {base.text} has no OME-Zarr multiscales metadata")
        arrays = sorted(name for name, _ in node.arrays())
        if len(arrays) == 1:
            inner = f"{dataset}/{arrays[0]}" if dataset else arrays[0]
            array = node[arrays[0]]
            assert isinstance(array, zarr.Array)
            return _plain_array(base.join(arrays[0]), array, location, inner)
        raise InputError(
            f"{base.text} is a zarr group without OME-Zarr multiscales metadata; choose one of "
            f"its arrays with dataset= (--dataset) or in the path: "
            f"{', '.join(arrays) or '(it has none)'}")


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    if isinstance(ome, dict):  # NGFF 0.5 keeps everything under "ome"
        return {**ome, "_ngff_nested": True}
    return attrs


def _dimension_names(arr: zarr.Array) -> list[str] | None:
    names: Any = getattr(arr.metadata, "dimension_names", None)
    if names is None:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")  # xarray's convention for zarr v2
    if names is None or len(names) != arr.ndim or not all(isinstance(n, str) and n
                                                            for n in names):
        return None
    return list(names)


def _plain_array(base: Location, arr: zarr.Array, store: Location, inner: str | None
                 ) -> ImageSource:
    names = _dimension_names(arr)
    if names is not None:
        axes = tuple(Axis(n, axis_type_of_name(n)) for n in names)
        channels = [i for i, a in enumerate(axes) if a.type == "channel"]
        if len(channels) > 1:
            axes = tuple(Axis(a.name, "space") if i in channels[1:] else a
                         for i, a in enumerate(axes))
        known = True
    else:
        axes, known = guessed_axes(arr.ndim), False
    meta = ImageMetadata(axes, reader="zarr", format=f"zarr v{arr.metadata.zarr_format} array",
                         dataset=inner, axes_known=known)
    return ImageSource(tuple(arr.shape), np.dtype(arr.dtype), meta.channel_axis,
                       zarr_chunks(arr), "zarr", path=store.path, dataset=inner,
                       metadata=meta, url=store.url, _ref=ZarrRef(store, inner), _array=arr)


# -- OME-Zarr ---------------------------------------------------------------------------------
def _parse_multiscale(attrs: dict[str, Any]) -> _Multiscale:
    """The first multiscale, validated by ome-zarr-models (leniently parsed if it is invalid)."""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise InputError("OME-Zarr multiscales metadata is empty")
    raw = multiscales[0]
    nested = attrs.get("_ngff_nested", False)
    version = str(attrs.get("version") if nested else raw.get("version", "0.4"))
    problem = None
    try:
        if nested:
            from ome_zarr_models.v05.multiscales import Multiscale as Model
        else:
            from ome_zarr_models.v04.multiscales import Multiscale as Model  # type: ignore[assignment]
        clean = {k: v for k, v in raw.items() if not (nested and k == "version")}
        raw = Model.model_validate(clean).model_dump(mode="json", exclude_none=True)
    except Exception as exc:  # noqa: BLE001 -- real files are often slightly off the spec
        problem = f"not valid NGFF {version}: {str(exc).splitlines()[0]}"
    axes = [_axis_dict(a) for a in raw.get("axes") or []]
    datasets = raw.get("datasets") or []
    if not datasets:
        raise InputError("OME-Zarr multiscales metadata lists no datasets")
    ndim = len(axes) if axes else None
    scales, translations = [], []
    common = raw.get("coordinateTransformations") or []
    for ds in datasets:
        transforms = ds.get("coordinateTransformations") or []
        n = ndim or _transform_ndim(transforms) or 0
        s = _vector(transforms, "scale", n, 1.0)
        t = _vector(transforms, "translation", n, 0.0)
        gs = _vector(common, "scale", n, 1.0)
        gt = _vector(common, "translation", n, 0.0)
        scales.append([a * b for a, b in zip(s, gs, strict=True)])
        translations.append([a * b + c for a, b, c in zip(t, gs, gt, strict=True)])
    return _Multiscale(axes, [str(d["path"]) for d in datasets], scales, translations,
                       version, raw.get("name"), problem)


def _axis_dict(axis: Any) -> dict[str, Any]:
    if isinstance(axis, str):  # NGFF 0.3 wrote names only
        return {"name": axis, "type": axis_type_of_name(axis)}
    return dict(axis)


def _transform_ndim(transforms: list[dict[str, Any]]) -> int | None:
    for t in transforms:
        for key in ("scale", "translation"):
            if isinstance(t.get(key), list):
                return len(t[key])
    return None


def _vector(transforms: list[dict[str, Any]], kind: str, n: int, default: float
            ) -> list[float]:
    for t in transforms:
        if t.get("type") == kind and isinstance(t.get(kind), list):
            return [float(v) for v in t[kind]]
    return [default] * n


def _omero_names(attrs: dict[str, Any]) -> tuple[str, ...] | None:
    omero = attrs.get("omero")
    if not isinstance(omero, dict):
        return None
    channels = omero.get("channels")
    if not isinstance(channels, list) or not channels:
        return None
    names = [c.get("label") if isinstance(c, dict) else None for c in channels]
    if not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)  # type: ignore[arg-type]


def _ome_image(base: Location, group: zarr.Group, attrs: dict[str, Any], level: int | None,
               series: int | None = None, format_prefix: str = "OME-Zarr",
               channel_names: tuple[str, ...] | None = None) -> ImageSource:
    ms = _parse_multiscale(attrs)
    level = 0 if level is None else int(level)
    if not 0 <= level < len(ms.paths):
        raise InputError(f"level={level}: {base.text} has levels 0..{len(ms.paths) - 1}")
    path = ms.paths[level]
    arr = open_zarr_node(base, path)
    if not isinstance(arr, zarr.Array):
        raise InputError(f"{base.text}/{path} is not an array")
    if not ms.axes:
        ms.axes = [a.to_ngff() for a in guessed_axes(arr.ndim)]
    if len(ms.axes) != arr.ndim:
        raise InputError(f"{base.text}: {len(ms.axes)} axes in the metadata for an array of "
                         f"shape {tuple(arr.shape)}")
    names = _omero_names(attrs) or channel_names
    axes = tuple(Axis(str(a.get("name")), str(a.get("type") or axis_type_of_name(
        str(a.get("name")))), a.get("unit"), s, t)
        for a, s, t in zip(ms.axes, ms.scales[level], ms.translations[level], strict=True))
    channel = next((i for i, a in enumerate(axes) if a.type == "channel"), None)
    if names is not None and (channel is None or len(names) != arr.shape[channel]):
        names = None
    extra: dict[str, Any] = {"ngff_version": ms.version, "levels": len(ms.paths)}
    if ms.problem:
        extra["metadata_problem"] = ms.problem
    meta = ImageMetadata(axes, names, reader="zarr",
                         format=f"{format_prefix} (NGFF {ms.version})", series=series,
                         dataset=path, level=level, axes_known=True, extra=extra)
    ome = {"dataset": path, "axes": ms.axes, "scale": ms.scales[level],
           "version": ms.version, "name": ms.name}
    return ImageSource(tuple(arr.shape), np.dtype(arr.dtype), channel, zarr_chunks(arr),
                       "ome-zarr", path=base.path, dataset=path, ome=ome, metadata=meta,
                       url=base.url, _ref=ZarrRef(base, path), _array=arr)


# -- bioformats2raw ---------------------------------------------------------------------------
def _bioformats2raw(base: Location, root: zarr.Group, attrs: dict[str, Any],
                    series: int | None, level: int | None) -> ImageSource:
    paths = _series_paths(base, root)
    index = 0 if series is None else int(series)
    if not 0 <= index < len(paths):
        raise InputError(f"series={series}: {base.text} holds {len(paths)} series "
                         f"(0..{len(paths) - 1})")
    image_loc = base.join(paths[index])
    group = open_zarr_node(base, paths[index])
    if not isinstance(group, zarr.Group):
        raise InputError(f"series {index} of {base.text} is not an OME-Zarr image group")
    image_attrs = _ome_attrs(group)
    if "multiscales" not in image_attrs:
        raise InputError(f"series {index} ({image_loc.text}) has no multiscales metadata")
    names = _ome_xml_channel_names(base, index)
    return _ome_image(image_loc, group, image_attrs, level, series=index,
                      format_prefix=f"bioformats2raw series {index} of {len(paths)}",
                      channel_names=names)


def _series_paths(base: Location, root: zarr.Group) -> list[str]:
    """Series image paths: the OME group's ``series`` list, else "0", "1", ... as found."""
    try:
        ome = open_zarr_node(base, "OME")
        listed = _ome_attrs(ome).get("series") if isinstance(ome, zarr.Group) else None
        if isinstance(listed, list) and listed:
            return [str(p) for p in listed]
    except InputError:
        pass
    paths: list[str] = []
    while base.child_exists(str(len(paths))):
        paths.append(str(len(paths)))
    if not paths:
        raise InputError(f"{base.text} is a bioformats2raw tree without any series")
    return paths


def _ome_xml_channel_names(base: Location, series: int) -> tuple[str, ...] | None:
    """Channel names of one series from ``OME/METADATA.ome.xml``, when there is one."""
    xml = base.join("OME", "METADATA.ome.xml")
    try:
        with xml.open_file() as f:
            text = f.read()
    except Exception:  # noqa: BLE001 -- no readable OME-XML: channels stay unnamed
        return None
    return ome_xml_channel_names(text, series)


def ome_xml_channel_names(text: str | bytes, series: int) -> tuple[str, ...] | None:
    """``Channel/@Name`` of the ``series``-th ``Image`` of an OME-XML document."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    images = [e for e in root if e.tag.endswith("Image")]
    if series >= len(images):
        return None
    pixels = next((e for e in images[series] if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    names = [c.get("Name") for c in pixels if c.tag.endswith("Channel")]
    if not names or not all(names):
        return None
    return tuple(str(n) for n in names)


