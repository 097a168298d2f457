"""TIFF, OME-TIFF, ImageJ hyperstacks and pyramidal TIFFs, streamed through tifffile.

Axes come from tifffile's series axes (OME and ImageJ metadata name them); calibration from the
OME ``Pixels`` (``PhysicalSizeX/Y/Z`` and units, ``TimeIncrement``), the ImageJ description
(``spacing``, ``unit``, ``finterval``) with the resolution tags, or, for a plain TIFF, the
resolution tags in centimetres/millimetres/micrometres (a resolution in inches is a print
setting, not a pixel size, and is ignored).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ...errors import InputError
from ..location import Location
from ..model import Axis, ImageMetadata
from ..registry import Reader
from ..source import ImageSource

__all__ = ["TIFF_SUFFIXES", "TiffReader", "TiffRef"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

# Resolution units (TIFF tag 296, with tifffile's extensions) in micrometres per unit.
_RESUNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}


@dataclass(frozen=True)
class TiffRef:
    """Reopens one series and level of a TIFF file as a zarr array (streamed reads)."""

    location: Location
    series: int = 0
    level: int = 0

    def open(self) -> zarr.Array:
        import tifffile

        try:
            # The TiffFile stays open as long as the array (its store holds it).
            tif = tifffile.TiffFile(self.location.open_file() if self.location.is_remote
                                    else str(self.location.path))
            store = tif.series[self.series].aszarr(level=self.level)
            node = zarr.open(store=store, mode="r")
        except Exception as exc:  # tifffile raises several types for broken files
            raise InputError(f"cannot read TIFF {self.location.text}: {exc}") from exc
        if isinstance(node, zarr.Group):
            node = node[str(self.level)] if str(self.level) in node else node["0"]
        return node  # type: ignore[return-value]


class TiffReader(Reader):
    """TIFF / OME-TIFF / ImageJ hyperstack reader."""

    name = "tiff"
    description = "TIFF, OME-TIFF, ImageJ hyperstacks, pyramidal TIFF (tifffile)"
    suffixes = TIFF_SUFFIXES
    requires = ("tifffile",)
    options = ("series", "level")

    def guess_can_open(self, location: Location) -> bool:
        return location.has_suffix(TIFF_SUFFIXES) and location.is_file()

    def open(self, location: Location, series: int | None = None, level: int | None = None,
             **_: Any) -> ImageSource:
        import tifffile

        series_i = 0 if series is None else int(series)
        level_i = 0 if level is None else int(level)
        try:
            fh = location.open_file() if location.is_remote else str(location.path)
            with tifffile.TiffFile(fh) as tif:
                meta, shape0 = _metadata(tif, series_i, level_i, location)
                _check_not_truncated(tif, series_i, level_i, location)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read TIFF {location.text}: {exc}") from exc
        ref = TiffRef(location, series_i, level_i)
        arr = ref.open()
        if tuple(arr.shape) != shape0:
            raise InputError(f"TIFF {location.text}: series {series_i} has shape {shape0} but "
                             f"reads as {tuple(arr.shape)}")
        return ImageSource(tuple(arr.shape), np.dtype(arr.dtype), meta.channel_axis,
                           tuple(arr.chunks), "tiff", path=location.path, metadata=meta,
                           url=location.url, _ref=ref, _array=arr)


def _metadata(tif: Any, series: int, level: int, location: Location
              ) -> tuple[ImageMetadata, tuple[int, ...]]:
    if not tif.series:
        raise InputError(f"TIFF {location.text} holds no image (no series): is it damaged or "
                         "cut short?")
    if not 0 <= series < len(tif.series):
        raise InputError(f"series={series}: {location.text} holds {len(tif.series)} series "
                         f"(0..{len(tif.series) - 1})")
    s = tif.series[series]
    levels = list(getattr(s, "levels", [s])) or [s]
    if not 0 <= level < len(levels):
        raise InputError(f"level={level}: series {series} of {location.text} has levels "
                         f"0..{len(levels) - 1}")
    letters = str(s.axes).upper()
    shape = tuple(int(n) for n in levels[level].shape)
    full = tuple(int(n) for n in s.shape)
    if tif.is_ome:
        kind, known = "OME-TIFF", True
        calib, names = _ome_calibration(tif.ome_metadata, series)
    elif tif.is_imagej:
        kind, known = "ImageJ hyperstack TIFF", True
        calib, names = _imagej_calibration(tif), None
    else:
        kind, known = "TIFF", False
        calib, names = _resolution_calibration(tif.pages.first), None
    axes = []
    has_c = "C" in letters
    for i, letter in enumerate(letters):
        size_ratio = full[i] / shape[i] if shape[i] else 1.0
        scale, unit = calib.get(letter, (1.0, None))
        if letter in "ZYX" and size_ratio != 1:
            scale *= size_ratio  # a lower pyramid level has larger voxels
        axes.append(Axis(*_name_and_type(letter, has_c, letters), unit, scale))
    channel = next((i for i, a in enumerate(axes) if a.type == "channel"), None)
    if names is not None and (channel is None or len(names) != shape[channel]):
        names = None
    extra = {"tiff_axes": letters, "series_count": len(tif.series), "levels": len(levels)}
    meta = ImageMetadata(tuple(axes), names, reader="tiff", format=kind, series=series,
                         level=level, axes_known=known, extra=extra)
    return meta, shape


def _check_not_truncated(tif: Any, series: int, level: int, location: Location) -> None:
    """Refuse a file cut short (an interrupted copy or download) before any tile reads it:
    the image data must end within the file. Only the last page is looked at (a cut removes
    the end), so that large stacks open as fast as before."""
    lvl = list(getattr(tif.series[series], "levels", [tif.series[series]]))[level]
    size = int(tif.filehandle.size)
    ends = []
    if getattr(lvl, "dataoffset", None):
        ends.append(int(lvl.dataoffset) + int(lvl.nbytes))
    pages = lvl.pages
    last = pages[-1] if len(pages) else None
    if last is not None:
        offsets = getattr(last, "dataoffsets", ()) or ()
        counts = getattr(last, "databytecounts", ()) or ()
        ends += [int(o) + int(n) for o, n in zip(offsets, counts, strict=False) if n]
    if ends and max(ends) > size:
        raise InputError(f"TIFF {location.text} is truncated: its image data end at byte "
                         f"{max(ends)} but the file has {size} bytes (an interrupted copy or "
                         "download?); copy it again")


def _name_and_type(letter: str, has_c: bool, letters: str) -> tuple[str, str]:
    if letter == "T":
        return "t", "time"
    if letter == "C" or (letter == "S" and not has_c):
        return "c", "channel"
    if letter in "ZYX":
        return letter.lower(), "space"
    if letter in "QI" and "Z" not in letters:  # an unnamed stack: a z-stack, as before
        return "z", "space"
    if letter in "QI":
        return letter.lower(), "space"
    return letter.lower(), letter.lower()


def _ome_calibration(xml: str | None, series: int
                     ) -> tuple[dict[str, tuple[float, str | None]], tuple[str, ...] | None]:
    """Voxel sizes (``{"X": (size, unit)}``) and channel names of one OME image."""
    if not xml:
        return {}, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}, None
    images = [e for e in root if e.tag.endswith("Image")]
    if series >= len(images):
        return {}, None
    pixels = next((e for e in images[series] if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return {}, None
    calib: dict[str, tuple[float, str | None]] = {}
    for letter in "XYZ":
        size = pixels.get(f"PhysicalSize{letter}")
        if size is not None:
            calib[letter] = (float(size), pixels.get(f"PhysicalSize{letter}Unit", "µm"))
    step = pixels.get("TimeIncrement")
    if step is not None:
        calib["T"] = (float(step), pixels.get("TimeIncrementUnit", "s"))
    names = [c.get("Name") for c in pixels if c.tag.endswith("Channel")]
    good = bool(names) and all(names)
    return calib, tuple(str(n) for n in names) if good else None


def _pixel_size(page: Any, tag: str) -> float | None:
    value = page.tags.get(tag)
    if value is None:
        return None
    num, den = value.value if isinstance(value.value, tuple) else (value.value, 1)
    return float(den) / float(num) if num else None


def _imagej_calibration(tif: Any) -> dict[str, tuple[float, str | None]]:
    ij = tif.imagej_metadata or {}
    unit = ij.get("unit")
    page = tif.pages.first
    calib: dict[str, tuple[float, str | None]] = {}
    for letter, tag in (("X", "XResolution"), ("Y", "YResolution")):
        size = _pixel_size(page, tag)
        if size is not None:
            calib[letter] = (size, unit)
    if ij.get("spacing"):
        calib["Z"] = (float(ij["spacing"]), unit)
    if ij.get("finterval"):
        calib["T"] = (float(ij["finterval"]), ij.get("tunit", "s"))
    return calib


def _resolution_calibration(page: Any) -> dict[str, tuple[float, str | None]]:
    tag = page.tags.get("ResolutionUnit")
    factor = _RESUNIT_UM.get(int(tag.value)) if tag is not None else None
    if factor is None:
        return {}
    calib: dict[str, tuple[float, str | None]] = {}
    for letter, name in (("X", "XResolution"), ("Y", "YResolution")):
        size = _pixel_size(page, name)
        if size is not None:
            calib[letter] = (size * factor, "micrometer")
    return calib
