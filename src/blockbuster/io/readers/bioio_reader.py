"""CZI, ND2, LIF (and what else bioio's plugins read) through bioio, as a lazy dask array.

bioio presents every image as TCZYX with physical pixel sizes (micrometres) and channel names;
scenes are series. Install with ``pip install "blockbuster[bioio]"`` (bioio with its CZI, ND2
and LIF plugins).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError, PluginNotInstalledError
from ..location import Location
from ..model import Axis, ImageMetadata
from ..registry import Reader
from ..source import ImageSource

__all__ = ["BIOIO_PLUGINS", "BioioReader", "BioioRef"]

#: File suffix -> the bioio plugin module that reads it (and its pip name).
BIOIO_PLUGINS = {".czi": "bioio_czi", ".nd2": "bioio_nd2", ".lif": "bioio_lif"}


def _bioimage(location: Location, scene: int) -> Any:
    from bioio import BioImage

    suffix = next((s for s in BIOIO_PLUGINS if location.has_suffix((s,))), None)
    if suffix is not None and importlib.util.find_spec(BIOIO_PLUGINS[suffix]) is None:
        module = BIOIO_PLUGINS[suffix]
        raise PluginNotInstalledError(f"{location.text} needs the bioio plugin "
                                      f"{module.replace('_', '-')} (pip install "
                                      f"{module.replace('_', '-')}, or blockbuster[bioio])")
    try:
        image = BioImage(location.text if location.url else str(location.path))
    except Exception as exc:
        raise InputError(f"bioio cannot read {location.text}: {exc}") from exc
    scenes = list(image.scenes)
    if not 0 <= scene < len(scenes):
        raise InputError(f"series={scene}: {location.text} holds {len(scenes)} scene(s) "
                         f"(0..{len(scenes) - 1}): {', '.join(map(str, scenes))}")
    image.set_scene(scenes[scene])
    return image


@dataclass(frozen=True)
class BioioRef:
    """Reopens one scene of a bioio image as its lazy TCZYX dask array."""

    location: Location
    scene: int = 0

    def open(self) -> Any:
        return _bioimage(self.location, self.scene).dask_data


class BioioReader(Reader):
    """Microscope vendor formats through bioio (CZI, ND2, LIF)."""

    name = "bioio"
    description = "CZI, ND2, LIF (bioio and its plugins)"
    suffixes = tuple(BIOIO_PLUGINS)
    requires = ("bioio",)
    extra = "bioio"
    options = ("series",)

    def guess_can_open(self, location: Location) -> bool:
        return location.has_suffix(self.suffixes)

    def open(self, location: Location, series: int | None = None, **_: Any) -> ImageSource:
        scene = 0 if series is None else int(series)
        image = _bioimage(location, scene)
        data = image.dask_data
        order = str(image.dims.order)
        sizes = image.physical_pixel_sizes
        calib = {"Z": sizes.Z, "Y": sizes.Y, "X": sizes.X}
        axes = []
        for letter in order:
            if letter == "T":
                axes.append(Axis("t", "time"))
            elif letter == "C":
                axes.append(Axis("c", "channel"))
            elif letter in "ZYX":
                size = calib.get(letter)
                axes.append(Axis(letter.lower(), "space",
                                 "micrometer" if size else None, size or 1.0))
            elif letter == "S" and "C" not in order:
                axes.append(Axis("c", "channel"))
            else:
                axes.append(Axis(letter.lower(), letter.lower()))
        names = tuple(str(n) for n in image.channel_names) if image.channel_names else None
        channel = next((i for i, a in enumerate(axes) if a.type == "channel"), None)
        if names is not None and (channel is None or len(names) != data.shape[channel]):
            names = None
        meta = ImageMetadata(tuple(axes), names, reader="bioio",
                             format=f"{type(image.reader).__module__.split('.')[0]} via bioio",
                             series=scene, axes_known=True,
                             extra={"scenes": len(image.scenes)})
        return ImageSource(tuple(data.shape), np.dtype(data.dtype), channel,
                           tuple(c[0] for c in data.chunks), "bioio", path=location.path,
                           metadata=meta, url=location.url, _ref=BioioRef(location, scene),
                           _array=data)
