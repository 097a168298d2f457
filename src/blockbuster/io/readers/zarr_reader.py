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
    #: per level, a scale or translation whose length is not the number of axes
    transform_problems: dict[int, str] = field(default_factory=dict)


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
def _parse_multiscale(attrs: dict[str, Any], where: str = "the image") -> _Multiscale:
    """The first multiscale, validated by ome-zarr-models (leniently parsed if it is invalid).

    Leniency stops where the metadata would be misread: datasets, paths, axes and transforms
    must have the types NGFF gives them, and the axes must be consistent (see
    :func:`_check_axes`); anything else is an :class:`InputError` naming ``where`` and the
    field.
    """
    def bad(problem: str) -> InputError:
        return InputError(f"{where}: the OME-Zarr metadata {problem}")

    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list):
        raise bad(f"has 'multiscales' of type {type(multiscales).__name__}, not a list")
    if not multiscales:
        raise bad("lists no image ('multiscales' is empty)")
    raw = multiscales[0]
    if not isinstance(raw, dict):
        raise bad(f"has a multiscales entry of type {type(raw).__name__}, not an object")
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
        problem = f"not valid NGFF {version}: {_first_error(exc)}"
    axes_raw = raw.get("axes") or []
    if not isinstance(axes_raw, list):
        raise bad(f"has 'axes' of type {type(axes_raw).__name__}, not a list")
    axes = [_axis_dict(a, where) for a in axes_raw]
    datasets = raw.get("datasets")
    if not isinstance(datasets, list):
        raise bad(f"has 'datasets' of type {type(datasets).__name__}, not a list")
    if not datasets:
        raise bad("lists no datasets (no resolution level)")
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or not ds["path"]:
            raise bad(f"has a dataset (level {i}) without a 'path' naming its array: {ds!r}")
    ndim = len(axes) if axes else None
    scales: list[list[float]] = []
    translations: list[list[float]] = []
    mismatch: dict[int, str] = {}
    common = _transforms(raw.get("coordinateTransformations"), "the multiscale", bad)
    for ds in datasets:
        transforms = _transforms(ds.get("coordinateTransformations"),
                                 f"dataset {ds['path']!r}", bad)
        n = ndim or _transform_ndim(transforms) or 0
        s = _vector(transforms, "scale", n, 1.0, bad)
        t = _vector(transforms, "translation", n, 0.0, bad)
        gs = _vector(common, "scale", n, 1.0, bad)
        gt = _vector(common, "translation", n, 0.0, bad)
        wrong = next(((kind, len(v)) for kind, v in (("scale", s), ("translation", t),
                                                    ("scale", gs), ("translation", gt))
                      if len(v) != n), None)
        if wrong is not None:  # reported with the array's shape, once the axes are checked
            mismatch.setdefault(len(scales), f"gives dataset {ds['path']!r} a {wrong[0]} of "
                                             f"{wrong[1]} values")
            s, t, gs, gt = [1.0] * n, [0.0] * n, [1.0] * n, [0.0] * n
        scales.append([a * b for a, b in zip(s, gs, strict=True)])
        translations.append([a * b + c for a, b, c in zip(t, gs, gt, strict=True)])
    return _Multiscale(axes, [str(d["path"]) for d in datasets], scales, translations,
                       version, raw.get("name"), problem, transform_problems=mismatch)


def _first_error(exc: Exception) -> str:
    """The first problem a pydantic validation error lists (its field and message)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ()))
            return f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        except Exception:  # noqa: BLE001 -- fall back on the text
            pass
    return str(exc).splitlines()[0]


def _check_axes(axes: list[dict[str, Any]], shape: tuple[int, ...], where: str) -> None:
    """Axes as NGFF requires them, so that the image is never read with the wrong meaning: one
    per array axis, distinct names, 2 or 3 space axes, at most one channel and one time axis."""
    names = [a["name"] for a in axes]
    listed = ", ".join(names)
    if len(axes) != len(shape):
        raise InputError(f"{where}: the OME-Zarr metadata lists {len(axes)} axes ({listed}) for "
                         f"an array of shape {shape}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{where}: the OME-Zarr metadata names axis {twice[0]!r} more than once "
                         f"(axes {listed})")
    types = [a.get("type") or axis_type_of_name(str(a["name"])) for a in axes]
    space = types.count("space")
    if not 2 <= space <= 3:
        raise InputError(f"{where}: the OME-Zarr metadata gives {space} space axes (axes "
                         f"{listed}, shape {shape}); NGFF images have 2 or 3, so the array "
                         "would be misread. Fix the axes in the metadata")
    for kind in ("channel", "time"):
        if types.count(kind) > 1:
            raise InputError(f"{where}: the OME-Zarr metadata gives {types.count(kind)} {kind} "
                             f"axes (axes {listed}); NGFF allows one")


def _axis_dict(axis: Any, where: str = "the image") -> dict[str, Any]:
    if isinstance(axis, str):  # NGFF 0.3 wrote names only
        return {"name": axis, "type": axis_type_of_name(axis)}
    if not isinstance(axis, dict) or not isinstance(axis.get("name"), str) or not axis["name"]:
        raise InputError(f"{where}: the OME-Zarr metadata has an axis without a name: {axis!r}")
    return dict(axis)


def _transforms(value: Any, what: str, bad: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise bad(f"has coordinateTransformations of {what} that are not a list of objects")
    return value


def _transform_ndim(transforms: list[dict[str, Any]]) -> int | None:
    for t in transforms:
        for key in ("scale", "translation"):
            if isinstance(t.get(key), list):
                return len(t[key])
    return None


def _vector(transforms: list[dict[str, Any]], kind: str, n: int, default: float, bad: Any
            ) -> list[float]:
    for t in transforms:
        if t.get("type") == kind and isinstance(t.get(kind), list):
            values = t[kind]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise bad(f"has a {kind} that is not a list of numbers: {values!r}")
            return [float(v) for v in values]
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
    ms = _parse_multiscale(attrs, base.text)
    level = 0 if level is None else int(level)
    if not 0 <= level < len(ms.paths):
        raise InputError(f"level={level}: {base.text} has levels 0..{len(ms.paths) - 1}")
    path = ms.paths[level]
    try:
        arr = open_zarr_node(base, path)
    except InputError as exc:
        raise InputError(f"{base.text}: the OME-Zarr metadata names dataset {path!r} (level "
                         f"{level}), but there is no array there ({exc})") from exc
    if not isinstance(arr, zarr.Array):
        raise InputError(f"{base.text}: the OME-Zarr metadata names dataset {path!r} (level "
                         f"{level}), which is a group, not an array")
    if not ms.axes:
        ms.axes = [a.to_ngff() for a in guessed_axes(arr.ndim)]
    _check_axes(ms.axes, tuple(arr.shape), base.text)
    if level in ms.transform_problems:
        raise InputError(f"{base.text}: the OME-Zarr metadata {ms.transform_problems[level]} "
                         f"for an array of shape {tuple(arr.shape)}")
    if not ms.scales[level]:  # neither axes nor transforms in the metadata: unit voxels
        ms.scales[level], ms.translations[level] = [1.0] * arr.ndim, [0.0] * arr.ndim
    if len(ms.scales[level]) != arr.ndim:  # no axes listed, transforms of another length
        raise InputError(f"{base.text}: the OME-Zarr metadata gives dataset {path!r} a scale of "
                         f"{len(ms.scales[level])} values for an array of shape "
                         f"{tuple(arr.shape)}")
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


