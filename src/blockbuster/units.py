"""Lengths in physical units: ``"6um"`` where a user thinks in micrometres, voxels for the engine.

A length is a number of voxels, or a string with a unit (``"6um"``, ``"6 µm"``, ``"0.5mm"``,
``"300nm"``). :func:`to_voxels` turns one into voxels per spatial axis with the image's
calibration, so that an anisotropic volume gets, e.g., a per-axis overlap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .io.model import normalize_unit, to_micrometers

if TYPE_CHECKING:
    from .io import ImageSource

__all__ = ["diameter_in_voxels", "is_length", "parse_length", "to_voxels"]

_LENGTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9.]+)\s*$")


def is_length(value: Any) -> bool:
    """Whether ``value`` is a string with a unit (not a plain number of voxels)."""
    return isinstance(value, str) and _LENGTH.match(value) is not None


def parse_length(value: str) -> float:
    """A length string in micrometres.

    Examples
    --------
    >>> parse_length("6um"), parse_length("6 µm"), parse_length("0.5mm"), parse_length("300nm")
    (6.0, 6.0, 500.0, 0.3)
    """
    match = _LENGTH.match(value) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"{value!r} is not a length: give voxels (a number) or a number with "
                         "a unit, e.g. '6um'")
    number, unit = float(match.group(1)), match.group(2)
    um = to_micrometers(number, normalize_unit(unit))
    if um is None:
        raise InputError(f"{value!r}: unknown length unit {unit!r}; use um, nm, mm...")
    return um


def to_voxels(length: Any, image: ImageSource | Sequence[float | None], *,
              name: str = "length") -> tuple[int, ...]:
    """A length in voxels per spatial axis of ``image`` (rounded up).

    ``length`` is voxels (a number: the same on every axis) or a string with a unit, converted
    with the voxel size of each spatial axis (``image.spacing_um``, or the sizes themselves).

    Examples
    --------
    >>> to_voxels("6um", (2.0, 0.5, 0.5))
    (3, 12, 12)
    >>> to_voxels(8, (2.0, 0.5, 0.5))
    (8, 8, 8)
    """
    spacing = _spatial_spacing(image)
    if not is_length(length):
        if isinstance(length, bool) or not isinstance(length, (int, float)):
            raise InputError(f"{name}={length!r} must be voxels (a number) or a length such "
                             "as '6um'")
        return (math.ceil(length),) * len(spacing)
    um = parse_length(length)
    if any(s is None for s in spacing):
        raise InputError(f"{name}={length!r} is a physical length, but the image's voxel size is "
                         f"not known on every axis ({_describe(spacing)}); give it in voxels")
    return tuple(max(1, math.ceil(um / s - 1e-9)) for s in spacing if s is not None)


def diameter_in_voxels(diameter: Any, image: ImageSource | Sequence[float | None],
                       ) -> tuple[float, tuple[int, ...]]:
    """A segmenter's ``diameter`` in voxels of the image's last (in-plane) axis, and the halo of
    one diameter per spatial axis.

    Segmenters take one diameter in voxels (the in-plane one for anisotropic volumes); the halo
    is per axis, so a coarse z axis gets fewer voxels of it.

    Examples
    --------
    >>> diameter_in_voxels("6um", (2.0, 0.5, 0.5))
    (12.0, (3, 12, 12))
    >>> diameter_in_voxels(12, (2.0, 0.5, 0.5))
    (12.0, (12, 12, 12))
    """
    spacing = _spatial_spacing(image)
    overlap = to_voxels(diameter, spacing, name="diameter")
    if not is_length(diameter):
        return float(diameter), overlap
    in_plane = spacing[-1]
    assert in_plane is not None  # to_voxels refused an uncalibrated image
    return parse_length(diameter) / in_plane, overlap


def _spatial_spacing(image: Any) -> tuple[float | None, ...]:
    if isinstance(image, Sequence):
        return tuple(image)
    tiled = image.spacing_um
    return tuple(s for s, t in zip(tiled, image.tiled_types, strict=True) if t == "space")


def _describe(spacing: Sequence[float | None]) -> str:
    return ", ".join("unknown" if s is None else f"{s:g} um" for s in spacing)
