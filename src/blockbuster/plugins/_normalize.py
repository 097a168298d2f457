"""Percentile normalisation shared by the learned segmenters, computed once for the whole image.

Cellpose and StarDist map each input to roughly [0, 1] by its low and high intensity
percentiles. Done per tile, neighbouring tiles get different mappings (a tile with only
background stretches its noise to full contrast) and the labels show seams along tile borders.
Here the percentiles are computed once from a streamed subsample of the whole image
(:meth:`blockbuster.io.ImageSource.sample`) and every tile is mapped with the same values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ..io import ImageSource

__all__ = [
    "NormalizeMode",
    "Percentiles",
    "check_mode",
    "check_percentiles",
    "image_or_tile_percentiles",
    "network_input",
    "normalize_tile",
    "tile_has_contrast",
]

NormalizeMode = Literal["global", "tile", "none"]
_MODES = ("global", "tile", "none")


def check_mode(normalize: str) -> str:
    """Validate a ``normalize=`` argument.

    Examples
    --------
    >>> check_mode("global")
    'global'
    """
    if normalize not in _MODES:
        raise InputError(f"normalize={normalize!r} must be one of {', '.join(map(repr, _MODES))}: "
                         "'global' (same percentiles for every tile, no seams), 'tile' (each "
                         "tile by itself) or 'none' (input already normalised)")
    return normalize


def check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    """Validate a ``(low, high)`` pair of percentiles.

    Examples
    --------
    >>> check_percentiles((1, 99.8))
    (1.0, 99.8)
    """
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise InputError(f"percentiles={percentiles!r} must be two numbers (low, high)") from None
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"percentiles={percentiles!r} must satisfy 0 <= low < high <= 100")
    return low, high


@dataclass(frozen=True)
class Percentiles:
    """Per-channel intensities that map to 0 and 1.

    Attributes
    ----------
    low, high : tuple of float
        One value per channel of the image (one entry without a channel axis).
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def from_values(cls, values: np.ndarray, percentiles: tuple[float, float]) -> Percentiles:
        """Percentiles of ``values`` of shape ``(n, channels)``, as ``ImageSource.sample`` returns.

        A channel whose high percentile does not exceed its low one (a mostly empty image) uses
        its maximum instead, so that the few bright voxels are not blown up to huge values.

        Examples
        --------
        >>> values = np.arange(101, dtype=float)[:, None]
        >>> Percentiles.from_values(values, (1, 99))
        Percentiles(low=(1.0,), high=(99.0,))
        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise InputError("cannot compute normalisation percentiles from an empty sample")
        low = np.percentile(values, percentiles[0], axis=0)
        high = np.percentile(values, percentiles[1], axis=0)
        flat = high <= low
        if flat.any():
            high = np.where(flat, values.max(axis=0), high)
        return cls(tuple(float(v) for v in low), tuple(float(v) for v in high))

    @classmethod
    def from_image(cls, image: ImageSource, percentiles: tuple[float, float],
                   max_voxels: int = 2_000_000) -> Percentiles:
        """Percentiles of a streamed subsample of the whole image (never read whole)."""
        from .watershed import check_finite_sample

        values = check_finite_sample(image.sample(max_voxels=max_voxels), image,
                                     "the normalisation percentiles",
                                     'pass normalize="none" with intensities already in [0, 1]')
        return cls.from_values(values, percentiles)

    def statistics(self, image: ImageSource, percentiles: tuple[float, float]
                   ) -> dict[str, Any]:
        """What the segmenters report in ``statistics`` (JSON-serialisable)."""
        return {"normalize": "global", "percentiles": list(percentiles),
                "low": list(self.low), "high": list(self.high),
                "channels": list(image.channel_names or range(image.n_channels)),
                "sample": image.sample_info()}

    @classmethod
    def from_tile(cls, tile: np.ndarray, channel_axis: int | None,
                  percentiles: tuple[float, float]) -> Percentiles:
        """Percentiles of one tile (the per-tile mode)."""
        return cls.from_values(_as_voxels_by_channel(tile, channel_axis), percentiles)


def image_or_tile_percentiles(segmenter: Any, tile: np.ndarray) -> Percentiles:
    """The image-wide percentiles that ``prepare()`` computed, else the tile's own.

    ``segmenter`` has ``norm``, ``percentiles``, ``channel_axis`` and ``_warned_per_tile``.
    Falling back per tile can leave seams, so it warns (once per segmenter).
    """
    if segmenter.norm is not None:
        return segmenter.norm
    if not segmenter._warned_per_tile:
        segmenter._warned_per_tile = True
        warnings.warn(f"{type(segmenter).__name__}.prepare() was not called, so normalisation "
                      "percentiles are computed per tile, which can leave seams; "
                      "tile_process calls prepare() itself", RuntimeWarning, stacklevel=5)
    return Percentiles.from_tile(tile, segmenter.channel_axis, segmenter.percentiles)


def _as_voxels_by_channel(tile: np.ndarray, channel_axis: int | None) -> np.ndarray:
    if channel_axis is None:
        return tile.reshape(-1, 1)
    return np.moveaxis(tile, channel_axis, -1).reshape(-1, tile.shape[channel_axis])


def normalize_tile(tile: np.ndarray, norm: Percentiles, channel_axis: int | None) -> np.ndarray:
    """Map ``tile`` to float32 with ``(x - low) / (high - low)`` per channel.

    Parameters
    ----------
    tile : numpy.ndarray
        Raw tile, channel axis (if any) at ``channel_axis``.
    norm : Percentiles
        One ``low``/``high`` per channel of the tile.
    channel_axis : int or None
        Where the channels are.

    Returns
    -------
    numpy.ndarray
        float32, same shape and axis order as ``tile``.

    Examples
    --------
    >>> tile = np.array([[0, 50], [100, 150]], dtype=np.uint16)
    >>> normalize_tile(tile, Percentiles((50.0,), (150.0,)), None).tolist()
    [[-0.5, 0.0], [0.5, 1.0]]
    """
    n_channels = 1 if channel_axis is None else tile.shape[channel_axis]
    if len(norm.low) != n_channels:
        raise InputError(f"normalisation has {len(norm.low)} channel(s) but the tile has "
                         f"{n_channels}; was prepare() run on a different image?")
    low = np.asarray(norm.low, dtype=np.float32)
    # A channel with no contrast at all maps to 0 everywhere instead of dividing by zero.
    span = np.asarray(norm.high, dtype=np.float32) - low
    scale = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
    if channel_axis is not None:
        shape = [1] * tile.ndim
        shape[channel_axis] = n_channels
        low, scale = low.reshape(shape), scale.reshape(shape)
    out = tile.astype(np.float32, copy=True)
    out -= low
    out *= scale
    return out


def tile_has_contrast(tile: np.ndarray, channel_axis: int | None = None) -> bool:
    """Whether any channel of ``tile`` varies at all.

    A constant tile (empty background, padding of a sparse volume) holds no objects; the learned
    plugins skip the network for it, as Cellpose itself blanks an input without contrast.

    Examples
    --------
    >>> tile_has_contrast(np.zeros((4, 4))), tile_has_contrast(np.eye(4))
    (False, True)
    >>> tile_has_contrast(np.stack([np.zeros((4, 4)), np.ones((4, 4))]), channel_axis=0)
    False
    """
    if tile.size == 0:
        return False
    voxels = _as_voxels_by_channel(tile, channel_axis)
    return bool((voxels.max(axis=0) > voxels.min(axis=0)).any())


def network_input(tile: np.ndarray, channel_axis: int | None,
                  normalized: Callable[[np.ndarray], np.ndarray],
                  ) -> tuple[tuple[int, ...], np.ndarray | None]:
    """A tile's spatial shape, and ``normalized(tile)`` with its channels last (one if none).

    The input is None for a constant tile: it holds no objects, and the network is skipped.

    Examples
    --------
    >>> tile = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)  # channels first
    >>> spatial, x = network_input(tile, 0, lambda t: t / 23)
    >>> spatial, x.shape
    ((3, 4), (3, 4, 2))
    >>> network_input(np.zeros((3, 4)), None, lambda t: t)
    ((3, 4), None)
    """
    spatial = tuple(s for a, s in enumerate(tile.shape) if a != channel_axis)
    if not tile_has_contrast(tile, channel_axis):
        return spatial, None
    x = normalized(tile)
    return spatial, (np.moveaxis(x, channel_axis, -1) if channel_axis is not None
                     else x[..., None])
