"""A PNG preview of one plane: the image in grey, label outlines in colour, the tile grid.

Only the chosen plane is read, in bands of rows that are reduced as they arrive, so the
inputs can be far larger than memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from .errors import InputError
from .io import ImageSource, open_image

__all__ = ["grid_boundaries", "label_colors", "save_preview"]

#: Voxels read per band (bounded memory whatever the plane size).
_BAND_VOXELS = 1 << 24
#: Percentiles mapped to black and white.
_STRETCH = (0.5, 99.8)
_GRID_RGB = np.array([255, 214, 0], np.float32)  # amber: stands out from grey and the palette
_GRID_ALPHA = 0.75


def label_colors(ids: np.ndarray) -> np.ndarray:
    """A bright, well-spread RGB colour per label id (same id, same colour, everywhere).

    Hues come from a hash of the id, so neighbouring ids get unrelated colours.

    Examples
    --------
    >>> c = label_colors(np.array([1, 2, 1]))
    >>> c.shape, c.dtype.name, bool((c[0] == c[2]).all()), bool((c[0] != c[1]).any())
    ((3, 3), 'uint8', True, True)
    """
    x = np.asarray(ids).astype(np.uint64)
    x = (x + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    hue = (x & np.uint64(0xFFFF)).astype(np.float64) / 65536.0
    # value varies a little with another part of the hash, for more distinguishable colours
    value = 0.8 + 0.2 * ((x >> np.uint64(16)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    return _hsv_to_rgb(hue, 0.9, value)


def _hsv_to_rgb(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
    rgb = table[i, np.arange(len(h))]
    return np.round(rgb * 255).astype(np.uint8)


def grid_boundaries(tile_grid: Any, shape: Sequence[int]) -> list[np.ndarray]:
    """Interior tile-boundary coordinates along each axis of ``shape``.

    ``tile_grid`` may be a chunk shape (one int per axis), dask-style chunks (a tuple of
    chunk sizes per axis), per-axis boundary coordinates (sequences starting at 0), or any
    object with a ``.chunks`` attribute (a zarr or dask array). It may cover all axes or only
    the last ``len(tile_grid)`` ones.

    Examples
    --------
    >>> [b.tolist() for b in grid_boundaries((256, 256), (600, 512))]
    [[256, 512], [256]]
    >>> [b.tolist() for b in grid_boundaries(((300, 300), (0, 200, 512)), (600, 512))]
    [[300], [200]]
    """
    grid = getattr(tile_grid, "chunks", tile_grid)
    grid = list(grid)
    if not 1 <= len(grid) <= len(shape):
        raise InputError(f"tile_grid {tile_grid!r} does not fit an image of shape {tuple(shape)}")
    shape = list(shape)[len(shape) - len(grid):]
    out = []
    for spec, size in zip(grid, shape, strict=True):
        if isinstance(spec, (int, np.integer)):
            if spec < 1:
                raise InputError(f"tile size must be positive, got {spec}")
            edges = np.arange(0, size, int(spec))
        else:
            values = np.asarray(list(spec), dtype=np.int64)
            if values.size and values[0] == 0:  # boundary coordinates
                if np.any(np.diff(values) <= 0):
                    raise InputError(f"tile boundaries must increase: {values.tolist()}")
                edges = values
            else:  # chunk sizes
                if np.any(values < 1):
                    raise InputError(f"chunk sizes must be positive: {values.tolist()}")
                edges = np.concatenate([[0], np.cumsum(values)])
        out.append(edges[(edges > 0) & (edges < size)])
    return out


def _plane_index(spatial: Sequence[int], plane: int | Sequence[int] | None) -> list[int]:
    """Indices of the leading spatial axes (all but y, x) that pick the plane."""
    lead = list(spatial[:-2])
    if plane is None:
        return [s // 2 for s in lead]
    picks = [int(plane)] if isinstance(plane, (int, np.integer)) else [int(p) for p in plane]
    if len(picks) != len(lead):
        raise InputError(f"plane {plane!r} must give {len(lead)} index(es) for shape "
                         f"{tuple(spatial)}")
    for p, s in zip(picks, lead, strict=True):
        if not 0 <= p < s:
            raise InputError(f"plane index {p} is outside 0..{s - 1}")
    return picks


def _read_plane(src: ImageSource, lead: list[int], window: tuple[slice, slice], factor: int,
                *, labels: bool, channel: int) -> np.ndarray:
    """Read one y/x window of a plane in bands and reduce it by ``factor``.

    Images are block-averaged (float32); labels are sampled (nearest neighbour: the top-left
    voxel of each block), which keeps ids intact.
    """
    ys, xs = window
    rows = factor * max(1, _BAND_VOXELS // max(1, xs.stop - xs.start) // factor)
    bands = []
    for y0 in range(ys.start, ys.stop, rows):
        region = tuple(slice(p, p + 1) for p in lead) + (slice(y0, min(y0 + rows, ys.stop)),
                                                         xs)
        block = src.read(region)
        if src.tile_channel_axis is not None:
            block = np.take(block, channel, axis=src.tile_channel_axis)
        block = block.reshape(block.shape[-2:])
        if labels:
            bands.append(block[::factor, ::factor])
        else:
            bands.append(_block_mean(block.astype(np.float32), factor))
    return np.concatenate(bands, axis=0)


def _block_mean(block: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return block
    pad = [(0, (-s) % f) for s in block.shape]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    h, w = block.shape
    return block.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _window(spatial: Sequence[int], window: Sequence[slice] | None) -> tuple[slice, slice]:
    """The y/x window as two slices with explicit, clipped bounds."""
    if window is None:
        return slice(0, spatial[-2]), slice(0, spatial[-1])
    if len(window) != 2 or not all(isinstance(w, slice) and w.step in (None, 1)
                                   for w in window):
        raise InputError(f"window must be two step-1 slices (y, x), got {window!r}")
    out = []
    for w, size in zip(window, spatial[-2:], strict=True):
        start, stop, _ = w.indices(size)
        if stop <= start:
            raise InputError(f"window {window!r} is empty for a plane of {tuple(spatial[-2:])}")
        out.append(slice(start, stop))
    return out[0], out[1]


def _grey(plane: np.ndarray) -> np.ndarray:
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return np.zeros(plane.shape, np.uint8)
    lo, hi = np.percentile(finite, _STRETCH)
    if hi <= lo:
        hi = lo + 1.0
    grey = (np.nan_to_num(plane, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(grey, 0, 255).astype(np.uint8)


def save_preview(
    image: Any,
    labels: Any,
    path: str | os.PathLike,
    *,
    tile_grid: Any = None,
    plane: int | Sequence[int] | None = None,
    window: Sequence[slice] | None = None,
    max_size: int = 1024,
    channel_axis: int | None = None,
    channel: int = 0,
    fill_alpha: float = 0.0,
    outlines: bool = True,
    caption: str | None = None,
) -> Path:
    """Save a PNG of one plane: grey image, coloured label outlines, tile grid.

    Parameters
    ----------
    image : array-like or path
        The image (NumPy, dask, zarr, or anything :func:`blockbuster.io.open_image` reads),
        2-D ``(y, x)`` or with leading axes such as ``(z, y, x)``.
    labels : array-like, path or None
        Labels with the image's spatial shape (an OME-Zarr label image path works too), or
        None for the image alone.
    path : str or os.PathLike
        Where to write the PNG (parent folders are created).
    tile_grid : optional
        Tile boundaries to draw, as accepted by :func:`grid_boundaries` (e.g. the label
        array's ``chunks``).
    plane : int or sequence of int, optional
        Index along each leading axis (z for 3-D); default the middle.
    window : (slice, slice), optional
        Show only this y/x region of the plane (a zoom, in full-resolution voxels).
    max_size : int
        The PNG is the plane (or window) reduced by the smallest integer factor ``f`` that
        makes both sides at most ``max_size``: ``ceil(y / f) x ceil(x / f)`` pixels. The image is
        block-averaged, labels sampled by nearest neighbour, grid lines drawn at
        ``floor(boundary / f)``.
    channel_axis, channel : int
        For a multichannel image: its channel axis and the channel to show.
    fill_alpha : float
        Opacity of a tint of each label's colour over its interior (0: outlines only).
    outlines : bool
        Draw each label's outline in its colour (off for overviews, where objects are a few
        pixels wide and would be all outline).
    caption : str, optional
        Text drawn in the top-left corner.

    Returns
    -------
    pathlib.Path
        The PNG path.

    Examples
    --------
    >>> import os, shutil, tempfile
    >>> from blockbuster.data import synthetic_nuclei
    >>> img, lab = synthetic_nuclei((300, 400), seed=2)
    >>> tmp = tempfile.mkdtemp()
    >>> png = save_preview(img, lab, os.path.join(tmp, "p.png"), tile_grid=(128, 128))
    >>> with Image.open(png) as picture:
    ...     picture.size  # (width, height)
    (400, 300)
    >>> shutil.rmtree(tmp)
    """
    if max_size < 1:
        raise InputError(f"max_size must be positive, got {max_size}")
    if not 0 <= fill_alpha <= 1:
        raise InputError(f"fill_alpha must be in [0, 1], got {fill_alpha}")
    src = open_image(image, channel_axis=channel_axis)
    if src.time_axis in src.tiled_axes:
        src = src.time_point(0)  # a preview shows the first time point
    spatial = src.spatial_shape
    if len(spatial) < 2:
        raise InputError(f"a preview needs at least 2 spatial axes, got shape {src.shape}")
    lead = _plane_index(spatial, plane)
    ys, xs = _window(spatial, window)
    factor = max(1, math.ceil(max(ys.stop - ys.start, xs.stop - xs.start) / max_size))
    grey = _grey(_read_plane(src, lead, (ys, xs), factor, labels=False, channel=channel))
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    if labels is not None:
        lab_src = open_image(labels)
        if lab_src.spatial_shape != spatial:
            raise InputError(f"labels of shape {lab_src.spatial_shape} do not match the image's "
                             f"spatial shape {spatial}")
        lab = _read_plane(lab_src, lead, (ys, xs), factor, labels=True, channel=0)
        _draw_labels(rgb, lab, fill_alpha, outlines)
    if tile_grid is not None:
        bounds = grid_boundaries(tile_grid, spatial)
        if len(bounds) < 2:
            raise InputError(f"tile_grid {tile_grid!r} must cover at least the y and x axes")
        _draw_grid(rgb, [bounds[-2] - ys.start, bounds[-1] - xs.start],
                   [ys.stop - ys.start, xs.stop - xs.start], factor)
    picture = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    if caption:
        draw = ImageDraw.Draw(picture)
        _, _, right, bottom = draw.textbbox((4, 2), caption)
        # a dark band behind the text keeps it legible over bright nuclei
        draw.rectangle((0, 0, right + 4, bottom + 2), fill=(0, 0, 0))
        draw.text((4, 2), caption, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _draw_labels(rgb: np.ndarray, lab: np.ndarray, fill_alpha: float,
                 outlines: bool = True) -> None:
    if fill_alpha > 0:
        inside = lab > 0
        rgb[inside] = ((1 - fill_alpha) * rgb[inside]
                       + fill_alpha * label_colors(lab[inside]).astype(np.float32))
    if not outlines:
        return
    edge = find_boundaries(lab, mode="inner") & (lab > 0)
    rgb[edge] = label_colors(lab[edge])


def _draw_grid(rgb: np.ndarray, bounds: list[np.ndarray], sizes: list[int], factor: int
               ) -> None:
    """Blend 1-pixel lines at the interior tile boundaries (window coordinates)."""
    for axis, (b, size) in enumerate(zip(bounds, sizes, strict=True)):
        pos = np.unique(b[(b > 0) & (b < size)] // factor)
        index: list[Any] = [slice(None), slice(None)]
        index[axis] = pos
        line = rgb[tuple(index)]
        rgb[tuple(index)] = (1 - _GRID_ALPHA) * line + _GRID_ALPHA * _GRID_RGB
