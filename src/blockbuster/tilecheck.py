"""Try a tiling before a long run: a small window segmented tiled and untiled, compared.

:func:`preview_tiling` takes a window of K x K (x K) tiles of the run's real tile grid (the
busiest part of the image by default), segments it once through the engine, tiled exactly as
the run would tile it, and once as a single tile, and compares the two object by object
(:func:`blockbuster.compare.compare`): where tiling changes the result, the run would change
it too. It writes a PNG (the image, both labellings, the tile borders, the disagreements in
red) and returns the figures.

:func:`choose_overlap` (``overlap="auto"``) runs the same comparison for increasing overlaps
and keeps the smallest at which the tiled result equals the untiled one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compare import compare, disagreement
from .errors import InputError
from .io import ImageSource, open_image

__all__ = ["OverlapChoice", "TilingCheck", "busiest_window", "choose_overlap",
           "preview_tiling"]

log = logging.getLogger("blockbuster")

#: At most this many tiles are sampled to find the busiest window.
SAMPLED_TILES = 4096
#: Voxels per axis of the patch read from the middle of each sampled tile.
PATCH = 32
#: A window smaller than this (pixels) is drawn enlarged.
_MIN_SIDE = 512
_DISAGREE_RGB = np.array([255, 40, 40], np.float32)


@dataclass
class TilingCheck:
    """Tiled against untiled on one window (see :func:`preview_tiling`).

    Attributes
    ----------
    window : list of [start, stop]
        The window, per tiled spatial axis, in voxels of the image.
    tile_shape, overlap : list of int
        The tiling tried (the run's, unless given).
    stitch : str
        The stitch mode.
    figures : dict
        :func:`blockbuster.compare.compare` of the tiled labels against the untiled ones
        (``f1``, ``fused``, ``split``, ``voxels_one_to_one``, ...).
    seams : dict or None
        The seam report of the tiled run.
    seconds : dict
        Time of the tiled and the untiled run.
    png : str or None
        The picture written.
    """

    window: list[list[int]]
    tile_shape: list[int]
    overlap: list[int]
    stitch: str
    method: str
    figures: dict[str, Any]
    seams: dict[str, Any] | None
    seconds: dict[str, float]
    png: str | None = None
    #: with ``overlap="auto"``: what :func:`choose_overlap` tried and chose
    overlap_auto: dict[str, Any] | None = None
    tiled: np.ndarray | None = field(default=None, repr=False)
    untiled: np.ndarray | None = field(default=None, repr=False)

    @property
    def identical(self) -> bool:
        """Whether tiling changed no object (F1 1, nothing fused or split)."""
        f = self.figures
        return f["f1"] == 1.0 and f["fused"] == 0 and f["split"] == 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tiled")
        out.pop("untiled")
        out["identical"] = self.identical
        return out


def _spatial_source(image: Any, channel_axis: int | None, channels: Any) -> ImageSource:
    source = open_image(image, channel_axis, channels=channels)
    if source.time_axis is not None and source.time_axis in source.tiled_axes:
        source = source.time_point(0)  # one time point is enough to judge a tiling
    return source


def _plan(source: ImageSource, fn: Any, *, tile_shape: Any, overlap: Any, stitch: str,
          iou_threshold: float, connectivity: int, use_gpu: bool, memory: Any) -> Any:
    from .api import _resolve_fn
    from .plan import StitchOptions, make_plan, parse_memory
    from .segmenter import describe_segmenter

    fn = _resolve_fn(fn, source.segment_channel_axis)
    return make_plan(source, fn, describe_segmenter(fn), tile_shape=tile_shape,
                     overlap=overlap, stitch=StitchOptions(stitch, iou_threshold, connectivity),
                     use_gpu=use_gpu, memory=parse_memory(memory))


def busiest_window(source: ImageSource, starts: Sequence[np.ndarray], tiles: int
                   ) -> tuple[int, ...]:
    """The first tile index, per axis, of the K x K (x K) tiles with the most structure.

    Each tile (up to :data:`SAMPLED_TILES` of them, evenly spread) is scored by the
    coefficient of variation (std / mean) of a small patch at its middle, a cheap low-resolution
    sample of the image; the window with the highest total wins.

    ``starts``: per axis, the tile starts plus the image's end (``TileGrid.starts``).
    """
    grid_shape = tuple(len(s) - 1 for s in starts)
    per_axis = max(1, math.floor(SAMPLED_TILES ** (1 / len(grid_shape))))
    stride = tuple(max(1, math.ceil(g / per_axis)) for g in grid_shape)
    sampled = tuple(range(0, g, s) for g, s in zip(grid_shape, stride, strict=True))
    scores = np.zeros(tuple(len(r) for r in sampled))
    for pos in np.ndindex(*scores.shape):
        index = [r[p] for r, p in zip(sampled, pos, strict=True)]
        region = []
        for axis, i in enumerate(index):
            lo, hi = int(starts[axis][i]), int(starts[axis][i + 1])
            mid, half = (lo + hi) // 2, min(PATCH, hi - lo) // 2
            region.append(slice(mid - half, max(mid - half + 1, mid + half)))
        patch = source.read(tuple(region)).astype(np.float64)
        mean = abs(float(patch.mean()))
        scores[pos] = float(patch.std()) / mean if mean > 0 else 0.0
    # back to one score per tile (a sampled tile stands for the ones it skipped)
    for axis, s in enumerate(stride):
        scores = np.repeat(scores, s, axis=axis)
    scores = scores[tuple(slice(0, g) for g in grid_shape)]
    k = tuple(min(tiles, g) for g in grid_shape)
    windows = _window_sums(scores, k)
    best = np.unravel_index(int(np.argmax(windows)), windows.shape)
    return tuple(int(b) for b in best)


def _window_sums(scores: np.ndarray, k: tuple[int, ...]) -> np.ndarray:
    """Sum of ``scores`` over every k-sized window (valid positions only)."""
    out = scores
    for axis, n in enumerate(k):
        c = np.cumsum(np.insert(out, 0, 0.0, axis=axis), axis=axis)
        hi = np.take(c, np.arange(n, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - n), axis=axis)
        out = hi - lo
    return out


def _window_start(grid: Any, source: ImageSource, at: Sequence[int] | None, tiles: int,
                  ) -> tuple[int, ...]:
    starts = [grid.starts[a] for a in grid.linked_axes]
    grid_shape = [len(s) - 1 for s in starts]
    if at is None:
        return busiest_window(source, starts, tiles)
    at = [int(v) for v in at]
    spatial = source.spatial_shape
    if len(at) != len(spatial) or not all(0 <= v < n for v, n in zip(at, spatial, strict=True)):
        raise InputError(f"at={tuple(at)} must be a voxel inside the image {spatial}, one index "
                         "per spatial axis")
    first = []
    for v, s, g in zip(at, starts, grid_shape, strict=True):
        k = min(tiles, g)
        i = int(np.searchsorted(s, v, side="right")) - 1  # the tile holding the voxel
        # k even: one more tile on the side of the tile's half that holds the voxel
        low_half = k % 2 == 0 and v - s[i] < (s[i + 1] - s[i]) / 2
        first.append(min(max(0, i - (k // 2 if low_half else (k - 1) // 2)), g - k))
    return tuple(first)


def preview_tiling(
    image: Any,
    fn: Callable[[np.ndarray], Any] | Any,
    *,
    at: Sequence[int] | None = None,
    tiles: int = 3,
    tile_shape: Sequence[int] | str | None = "auto",
    overlap: int | str | Sequence[int | str] | None = None,
    stitch: str = "auto",
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    channel_axis: int | None = None,
    channels: Any = None,
    use_gpu: bool = False,
    memory: int | str | None = None,
    png: str | Path | None = None,
    keep_labels: bool = True,
) -> TilingCheck:
    """Segment a window of K x K (x K) tiles tiled and untiled, and compare (before a long run).

    The tiles are those the run would use (:func:`~blockbuster.tile_process`'s planning:
    tile shape, overlap on the segmenter's grid, stitch mode), aligned with the run's tile
    grid. Both runs go through the engine: the tiled one as the real run tiles, the untiled
    one as a single tile of the whole window. Where tiling changes the result here, the run
    would change it there too (the window's outer edges are the same for both, so only the
    inner tile borders differ).

    Parameters
    ----------
    image, fn
        As for :func:`~blockbuster.tile_process` (an image of any size; only the window is
        read).
    at : sequence of int, optional
        A voxel (one index per spatial axis) the window is centred on. Default: the busiest
        window (:func:`busiest_window`).
    tiles : int
        Tiles per axis in the window (fewer where the image has fewer).
    tile_shape, overlap, stitch, iou_threshold, connectivity, channel_axis, channels, use_gpu,
    memory
        As for :func:`~blockbuster.tile_process` (``overlap="auto"``: chosen first by
        :func:`choose_overlap`, on the same window).
    png : path, optional
        Write a picture: the untiled labels beside the tiled ones, the tile borders, and the
        voxels where the two disagree in red (the middle plane of a 3-D window).
    keep_labels : bool
        Keep both label images on the result (``.tiled``, ``.untiled``).

    Returns
    -------
    TilingCheck
        The window, the tiling, the figures (``.as_dict()`` is JSON).

    Examples
    --------
    >>> from scipy import ndimage
    >>> from blockbuster.data import synthetic_nuclei
    >>> img, _ = synthetic_nuclei((256, 256), seed=1)
    >>> label = lambda t: ndimage.label(t > 20000)[0]
    >>> check = preview_tiling(img, label, tile_shape=(64, 64), stitch="faces", at=(200, 200))
    >>> check.window, check.identical  # connected components: tiling changes nothing
    ([[64, 256], [64, 256]], True)
    """
    if isinstance(tiles, bool) or not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise InputError(f"tiles={tiles!r} must be a positive integer (tiles per axis)")
    choice = None
    if isinstance(overlap, str) and overlap.strip().lower() == "auto":
        choice = choose_overlap(image, fn, tile_shape=tile_shape, stitch=stitch,
                                iou_threshold=iou_threshold, connectivity=connectivity,
                                channel_axis=channel_axis, channels=channels, use_gpu=use_gpu,
                                memory=memory, tiles=tiles, at=at)
        overlap = tuple(choice.chosen)
    win = _prepare(image, fn, at=at, tiles=tiles, tile_shape=tile_shape, overlap=overlap,
                   stitch=stitch, iou_threshold=iou_threshold, connectivity=connectivity,
                   channel_axis=channel_axis, channels=channels, use_gpu=use_gpu, memory=memory)
    with tempfile.TemporaryDirectory(prefix="blockbuster-preview-") as tmp:
        whole, untiled_s = win.untiled(Path(tmp))
        tiled, seams, tiled_s = win.tiled(Path(tmp), win.depth)
    figures = _figures(whole, tiled)
    check = TilingCheck([[w.start, w.stop] for w in win.window], win.tile, list(win.depth),
                        win.mode, win.plan.fn_label, figures, seams,
                        {"tiled": tiled_s, "untiled": untiled_s},
                        overlap_auto=None if choice is None else choice.as_dict())
    log.debug("preview of %s on %s: %s", win.plan.fn_label, _describe(check.window),
             _verdict(check))
    if png is not None:
        check.png = str(_draw(png, win, whole, tiled, check))
    if keep_labels:
        check.tiled, check.untiled = tiled, whole
    return check


def _figures(whole: np.ndarray, tiled: np.ndarray) -> dict[str, Any]:
    figures = compare(whole, tiled)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}


@dataclass
class _Window:
    """A window of the run's tile grid, read, with the plan it is segmented with."""

    source: ImageSource
    plan: Any
    window: list[slice]
    data: np.ndarray
    tile: list[int]
    depth: tuple[int, ...]
    step: tuple[int, ...]

    @property
    def mode(self) -> str:
        return str(self.plan.stitch.mode)

    def _common(self) -> dict[str, Any]:
        stitch = self.plan.stitch
        return {"channel_axis": self.source.tile_channel_axis, "progress": False,
                "iou_threshold": stitch.iou_threshold, "connectivity": stitch.connectivity}

    def tiled(self, tmp: Path, depth: Sequence[int], mode: str | None = None,
              ) -> tuple[np.ndarray, dict[str, Any] | None, float]:
        """The window segmented in the run's tiles with halo ``depth``."""
        from .api import tile_process
        from .report import run_report

        start = time.perf_counter()
        name = "tiled-" + "-".join(map(str, depth)) + ".zarr"
        with _quiet_runs():
            out = tile_process(self.data, self.plan.fn, tuple(self.tile), tuple(depth),
                               stitch=mode or self.mode, output=tmp / name, **self._common())
        return np.asarray(out[:]), run_report(out).seams, round(time.perf_counter() - start, 3)

    def untiled(self, tmp: Path) -> tuple[np.ndarray, float]:
        """The window segmented as one tile (its shape rounded up to the segmenter's grid, so
        that rounding never cuts it in two)."""
        from .api import tile_process

        start = time.perf_counter()
        shape = [n for a, n in enumerate(self.data.shape) if a != self.source.tile_channel_axis]
        whole = [-(-n // s) * s for n, s in zip(shape, self.step, strict=True)]
        with _quiet_runs():
            out = tile_process(self.data, self.plan.fn, tuple(whole), 0, stitch="faces",
                               output=tmp / "untiled.zarr", **self._common())
        return np.asarray(out[:]), round(time.perf_counter() - start, 3)


@contextlib.contextmanager
def _quiet_runs() -> Iterator[None]:
    """The window's runs log warnings only, and not the seam warning (the caller reports the
    comparison, seams included)."""
    def no_seams(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("the tile borders look worse")

    level = log.level
    log.setLevel(max(level, logging.WARNING))
    log.addFilter(no_seams)
    try:
        yield
    finally:
        log.removeFilter(no_seams)
        log.setLevel(level)


def _prepare(image: Any, fn: Any, *, at: Sequence[int] | None, tiles: int, tile_shape: Any,
             overlap: Any, stitch: str, iou_threshold: float, connectivity: int,
             channel_axis: int | None, channels: Any, use_gpu: bool, memory: Any,
             one_tile_ok: bool = False) -> _Window:
    from .segmenter import grid_per_axis

    source = _spatial_source(image, channel_axis, channels)
    plan = _plan(source, fn, tile_shape=tile_shape, overlap=overlap, stitch=stitch,
                 iou_threshold=iou_threshold, connectivity=connectivity, use_gpu=use_gpu,
                 memory=memory)
    grid = plan.grid
    linked = grid.linked_axes
    if one_tile_ok is False and all(grid.grid_shape[a] == 1 for a in linked):
        # Comparing a single tile with itself would take as long as the run and prove nothing.
        raise InputError(
            f"the tiling puts the whole image {tuple(source.spatial_shape)} in one tile "
            f"(tile_shape={tile_shape!r} chose {tuple(grid.tile_shape[a] for a in linked)}): "
            "there is no tile border to check. Pass the tile shape of your run ($tile_shape)")
    first = _window_start(grid, source, at, tiles)
    window = []
    for axis, i in zip(linked, first, strict=True):
        k = min(tiles, grid.grid_shape[axis])
        window.append(slice(int(grid.starts[axis][i]), int(grid.starts[axis][i + k])))
    return _Window(source, plan, window, source.read(tuple(window)),
                   [grid.tile_shape[a] for a in linked], tuple(grid.depth[a] for a in linked),
                   grid_per_axis(plan.segmenter.grid, len(linked)))


def _describe(window: list[list[int]]) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in window) + "]"


def _verdict(check: TilingCheck) -> str:
    f = check.figures
    head = "tiled = untiled" if check.identical else "tiling CHANGES the result"
    return (f"{head}: F1 {f['f1']:.3f}, {f['fused']} fused, {f['split']} split, "
            f"{100 * f['voxels_one_to_one']:.1f}% of the voxels agree ({f['n_ref']} objects "
            f"untiled, {f['n_out']} tiled; tile shape {tuple(check.tile_shape)}, overlap "
            f"{tuple(check.overlap)}, stitch={check.stitch})")


def _draw(path: str | Path, win: _Window, whole: np.ndarray, tiled: np.ndarray,
          check: TilingCheck) -> Path:
    """Two panels of the middle plane: untiled labels, and tiled ones with disagreements."""
    from PIL import Image, ImageDraw

    from .preview import _draw_grid, _draw_labels, _grey

    channel_axis, grid, window = win.source.tile_channel_axis, win.plan.grid, win.window
    image = np.take(win.data, 0, axis=channel_axis) if channel_axis is not None else win.data
    lead = tuple(n // 2 for n in whole.shape[:-2])
    plane = np.asarray(image[lead], np.float32)
    grey = np.repeat(_grey(plane)[..., None], 3, axis=-1).astype(np.float32)
    left, right = grey.copy(), grey.copy()
    _draw_labels(left, whole[lead], 0.0)
    bad = disagreement(whole, tiled)[lead]
    _draw_labels(right, tiled[lead], 0.0)
    right[bad] = 0.3 * right[bad] + 0.7 * _DISAGREE_RGB  # over the outlines: it must stand out
    linked = grid.linked_axes
    bounds = [grid.starts[a][1:-1] - w.start for a, w in zip(linked[-2:], window[-2:],
                                                                strict=True)]
    _draw_grid(right, bounds, list(plane.shape), 1)
    gap = np.full((plane.shape[0], 8, 3), 255, np.float32)
    picture = Image.fromarray(np.round(np.concatenate([left, gap, right], axis=1))
                              .astype(np.uint8), mode="RGB")
    zoom = max(1, _MIN_SIDE // max(plane.shape))  # a small window is shown larger
    if zoom > 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom),
                                 Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    f = check.figures
    title = f"tiled: F1 {f['f1']:.3f}, {f['fused']} fused, {f['split']} split (red: disagree)"
    for x, text in ((4, "untiled"), (zoom * (plane.shape[1] + 8) + 4, title)):
        _, _, r, b = draw.textbbox((x, 2), text)
        draw.rectangle((x - 2, 0, r + 2, b + 2), fill=(0, 0, 0))
        draw.text((x, 2), text, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


# -- overlap="auto" ---------------------------------------------------------------------------
@dataclass
class OverlapChoice:
    """What ``overlap="auto"`` tried and chose (stored in the run report)."""

    chosen: list[int]
    found: bool
    curve: list[dict[str, Any]]
    window: list[list[int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def overlap_candidates(tile: Sequence[int], step: Sequence[int], mode: str,
                       largest: int | None = None) -> list[tuple[int, ...]]:
    """The overlaps ``overlap="auto"`` tries, smallest first: 0 (when the stitch mode can do
    without a halo), then 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128 voxels, each rounded up to
    the segmenter's grid and kept below the tile (the halo must be smaller than the tile).

    Examples
    --------
    >>> overlap_candidates((64, 64), (1, 1), "iou")[:4]
    [(2, 2), (4, 4), (8, 8), (12, 12)]
    >>> overlap_candidates((32, 32), (16, 16), "faces")
    [(0, 0), (16, 16)]
    """
    values = [0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    if largest is not None:
        values = [v for v in values if v <= largest] or [largest]
    out: list[tuple[int, ...]] = []
    for v in values:
        if v == 0 and mode == "iou":
            continue
        cand = tuple(min(-(-v // s) * s, max(0, (t - s) // s * s)) if t > 1 else 0
                     for t, s in zip(tile, step, strict=True))
        if cand not in out and (v == 0 or any(cand)):
            out.append(cand)
    return out


def choose_overlap(
    image: Any,
    fn: Callable[[np.ndarray], Any] | Any,
    *,
    tile_shape: Sequence[int] | str | None = "auto",
    stitch: str = "auto",
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    channel_axis: int | None = None,
    channels: Any = None,
    use_gpu: bool = False,
    memory: int | str | None = None,
    tiles: int = 3,
    at: Sequence[int] | None = None,
    largest: int | None = None,
) -> OverlapChoice:
    """The smallest overlap at which tiling changes nothing on a sample window.

    The busiest window of K x K (x K) tiles (or the one around ``at``) is segmented once
    untiled, then tiled with increasing overlaps (:func:`overlap_candidates`, on the
    segmenter's grid) until the tiled labels equal the untiled ones: F1 1.000, no object fused
    or split. Without such an overlap the largest tried is chosen, with ``found=False``.

    Returns
    -------
    OverlapChoice
        ``chosen`` (voxels per spatial axis), ``found``, the ``curve`` (figures per overlap
        tried) and the ``window``.
    """
    win = _prepare(image, fn, at=at, tiles=tiles, tile_shape=tile_shape, overlap=0,
                   stitch="faces" if stitch == "iou" else stitch, iou_threshold=iou_threshold,
                   connectivity=connectivity, channel_axis=channel_axis, channels=channels,
                   use_gpu=use_gpu, memory=memory, one_tile_ok=True)
    grid = win.plan.grid
    if all(grid.grid_shape[a] == 1 for a in grid.linked_axes):
        log.info("overlap auto: the image is one tile, so no overlap is needed")
        return OverlapChoice([0] * len(win.tile), True, [], [[w.start, w.stop] for w in win.window])
    mode = stitch if stitch != "auto" else _auto_mode(win)
    curve: list[dict[str, Any]] = []
    chosen: tuple[int, ...] | None = None
    candidates = overlap_candidates(win.tile, win.step, mode, largest)
    with tempfile.TemporaryDirectory(prefix="blockbuster-overlap-") as tmp:
        whole, _ = win.untiled(Path(tmp))
        for depth in candidates:
            run_mode = mode if any(depth) or mode != "iou" else "faces"
            tiled, seams, seconds = win.tiled(Path(tmp), depth, run_mode)
            figures = _figures(whole, tiled)
            same = figures["f1"] == 1.0 and figures["fused"] == 0 and figures["split"] == 0
            curve.append({"overlap": list(depth), "stitch": run_mode, **figures,
                          "seams": None if seams is None else seams["verdict"],
                          "seconds": seconds, "identical": same})
            log.info("overlap %s: F1 %.3f, %d fused, %d split", depth, figures["f1"],
                     figures["fused"], figures["split"])
            if same:
                chosen = depth
                break
    found = chosen is not None
    if chosen is None:
        chosen = candidates[-1] if candidates else tuple(0 for _ in win.tile)
    return OverlapChoice(list(chosen), found, curve, [[w.start, w.stop] for w in win.window])


def _auto_mode(win: _Window) -> str:
    """The stitch mode ``"auto"`` gives a run with a halo (the segmenter's preference)."""
    preferred = win.plan.segmenter.preferred_stitch
    return str(preferred or "iou")
