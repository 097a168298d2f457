"""The image model: what each stored axis means, its calibration, and the channel names.

A reader parses its format's metadata once into one frozen :class:`ImageMetadata`; everything
else (which axes are tiled, the physical size of a voxel, the axes of the label output) is
derived from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InputError

__all__ = [
    "AXIS_TYPES",
    "Axis",
    "ImageMetadata",
    "axis_type_of_name",
    "guessed_axes",
    "normalize_unit",
]

#: The axis types blockbuster understands (NGFF's); any other string is an "other" axis.
AXIS_TYPES = ("time", "channel", "space")

# Unit spellings met in TIFF, ImageJ, BigDataViewer and Imaris metadata, mapped to the UDUNITS-2
# names NGFF asks for.
_UNITS = {
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "micrometer": "micrometer", "micrometre": "micrometer",
    "\\u00b5m": "micrometer", "nm": "nanometer", "nanometer": "nanometer",
    "nanometre": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
    "millimetre": "millimeter", "cm": "centimeter", "centimeter": "centimeter",
    "m": "meter", "meter": "meter", "metre": "meter", "pm": "picometer",
    "picometer": "picometer", "å": "angstrom", "angstrom": "angstrom", "inch": "inch",
    "s": "second", "sec": "second", "second": "second", "seconds": "second",
    "ms": "millisecond", "millisecond": "millisecond", "us": "microsecond",
    "µs": "microsecond", "microsecond": "microsecond", "ns": "nanosecond",
    "nanosecond": "nanosecond", "min": "minute", "minute": "minute", "h": "hour",
    "hr": "hour", "hour": "hour",
}
_NO_UNIT = {"", "pixel", "pixels", "px", "none", "unknown"}

#: Length units (NGFF names) in micrometres.
UNIT_TO_UM = {
    "picometer": 1e-6, "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0,
    "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6, "inch": 25_400.0,
}


def to_micrometers(scale: float, unit: str | None) -> float | None:
    """A voxel size in micrometres, or None when its unit is not a known length.

    Examples
    --------
    >>> to_micrometers(0.5, "micrometer"), to_micrometers(2, "nanometer"), to_micrometers(1, None)
    (0.5, 0.002, None)
    """
    factor = UNIT_TO_UM.get(normalize_unit(unit) or "")
    return None if factor is None else float(scale) * factor


def normalize_unit(unit: Any) -> str | None:
    """The NGFF (UDUNITS-2) name of a unit as microscopy formats spell it; None for pixels.

    Unknown spellings are kept as they are.

    Examples
    --------
    >>> normalize_unit("µm"), normalize_unit("micron"), normalize_unit("pixel")
    ('micrometer', 'micrometer', None)
    >>> normalize_unit("sec"), normalize_unit("furlong")
    ('second', 'furlong')
    """
    if unit is None:
        return None
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    text = str(unit).strip()
    if text.lower() in _NO_UNIT:
        return None
    return _UNITS.get(text.lower(), _UNITS.get(text, text))


def axis_type_of_name(name: str) -> str:
    """The axis type an axis name implies: ``t`` time, ``c`` channel, else space.

    Examples
    --------
    >>> [axis_type_of_name(n) for n in ("t", "C", "z", "y", "x", "time", "channel")]
    ['time', 'channel', 'space', 'space', 'space', 'time', 'channel']
    """
    lowered = name.lower()
    if lowered in ("t", "time", "frame", "frames"):
        return "time"
    if lowered in ("c", "ch", "channel", "channels", "s", "sample", "samples", "rgb"):
        return "channel"
    return "space"


@dataclass(frozen=True)
class Axis:
    """One stored axis of an image.

    Attributes
    ----------
    name : str
        Short name (``"t"``, ``"c"``, ``"z"``, ``"y"``, ``"x"`` for most formats).
    type : str
        ``"time"``, ``"channel"``, ``"space"``, or another (NGFF custom) type.
    unit : str or None
        UDUNITS-2 name (``"micrometer"``, ``"second"``); None when the size is in voxels.
    scale : float
        Physical size of one voxel step along the axis (1.0 when unknown).
    translation : float
        Physical position of the first voxel's centre (0.0 when unknown).

    Examples
    --------
    >>> Axis("z", "space", "micrometer", 2.0).to_ngff()
    {'name': 'z', 'type': 'space', 'unit': 'micrometer'}
    """

    name: str
    type: str = "space"
    unit: str | None = None
    scale: float = 1.0
    translation: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"axis name {self.name!r} must be a non-empty string")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale <= 0:
            # Some writers store 0 or NaN for "unknown": that is no calibration.
            object.__setattr__(self, "scale", 1.0)
        else:
            object.__setattr__(self, "scale", scale)
        translation = float(self.translation)
        object.__setattr__(self, "translation", translation if math.isfinite(translation)
                           else 0.0)
        object.__setattr__(self, "unit", normalize_unit(self.unit))

    @property
    def is_spatial(self) -> bool:
        return self.type == "space"

    def as_dict(self) -> dict[str, Any]:
        """Name, type, unit, scale and translation, for JSON (``info --json``, output attrs)."""
        return {"name": self.name, "type": self.type, "unit": self.unit, "scale": self.scale,
                "translation": self.translation}

    def to_ngff(self) -> dict[str, Any]:
        """The NGFF ``axes`` entry (name, type and, when known, unit)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.unit is not None:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class ImageMetadata:
    """What a reader learnt about an image, parsed once.

    Attributes
    ----------
    axes : tuple of Axis
        One per stored axis, in storage order.
    channel_names : tuple of str or None
        One name per entry of the channel axis, when the format names them.
    reader : str
        Name of the reader that opened the image (``"zarr"``, ``"tiff"``, ``"numpy"``...).
    format : str
        Human-readable format (``"OME-Zarr (NGFF 0.4)"``, ``"ImageJ hyperstack TIFF"``...).
    series : int or None
        Series (scene, image) of a multi-series file.
    dataset : str or None
        Array inside a container (zarr array path, HDF5 dataset, OME-Zarr level path).
    level : int
        Pyramid level (0: full resolution).
    axes_known : bool
        Whether the axes come from the file's metadata (True) or were guessed from the shape
        (False). Singleton axes are dropped from tiling only when their meaning is known.
    extra : mapping
        Format-specific facts worth showing (e.g. ``{"ngff_version": "0.5"}``).
    """

    axes: tuple[Axis, ...]
    channel_names: tuple[str, ...] | None = None
    reader: str = "numpy"
    format: str = "array"
    series: int | None = None
    dataset: str | None = None
    level: int = 0
    axes_known: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def channel_axis(self) -> int | None:
        return next((i for i, a in enumerate(self.axes) if a.type == "channel"), None)

    @property
    def time_axis(self) -> int | None:
        return next((i for i, a in enumerate(self.axes) if a.type == "time"), None)

    def with_channel_axis(self, axis: int | None) -> ImageMetadata:
        """The same metadata with ``axis`` (a stored index) as the channel axis."""
        current = self.channel_axis
        if axis == current:
            return self
        if current is not None and self.axes_known:
            raise InputError(
                f"channel_axis={axis} but the {self.format} metadata says axis {current} "
                f"({self.axes[current].name!r}) holds the channels; leave channel_axis out")
        axes = list(self.axes)
        if current is not None:
            axes[current] = replace(axes[current], type="space")
        if axis is not None:
            axes[axis] = Axis(axes[axis].name if self.axes_known else "c", "channel")
        return replace(self, axes=_unique_names(axes), channel_names=None)


def _unique_names(axes: Sequence[Axis]) -> tuple[Axis, ...]:
    """Rename repeated axis names (``z`` twice after a change of channel axis) to stay unique."""
    seen: set[str] = set()
    out = []
    for axis in axes:
        name, k = axis.name, 1
        while name in seen:
            name, k = f"{axis.name}{k}", k + 1
        seen.add(name)
        out.append(replace(axis, name=name) if name != axis.name else axis)
    return tuple(out)


def guessed_axes(ndim: int, channel_axis: int | None = None) -> tuple[Axis, ...]:
    """Axes of an array without metadata: all spatial (z, y, x last), optionally one channel.

    Examples
    --------
    >>> [a.name for a in guessed_axes(3)], [a.name for a in guessed_axes(3, channel_axis=0)]
    (['z', 'y', 'x'], ['c', 'y', 'x'])
    >>> [a.name for a in guessed_axes(5)]
    ['d0', 'd1', 'z', 'y', 'x']
    """
    n_spatial = ndim - (channel_axis is not None)
    names = ["zyx"[3 - k] if k <= 3 else f"d{n_spatial - k}" for k in range(n_spatial, 0, -1)]
    axes: list[Axis] = [Axis(n, "space") for n in names]
    if channel_axis is not None:
        axes.insert(channel_axis, Axis("c", "channel"))
    return tuple(axes)
