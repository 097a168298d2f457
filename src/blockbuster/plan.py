"""The run plan: every decision made before the first tile, in one frozen object.

:func:`make_plan` resolves the overlap, the tile shape (fixed, ``"auto"`` from the memory
budget, a callable, or the input's chunks), the tile grid and the stitching mode, and checks
them against the image. The same :class:`RunPlan` drives :func:`~blockbuster.tile_process`,
``blockbuster info`` (what a run would do) and ``segment --dry-run``; :meth:`RunPlan.params`
are the parameters that define the result (a resumed run must have the same ones) and
:meth:`RunPlan.summary` is what a user reads. The planner knows no plugin: the segmenter
arrives as a callable and its declared preferences (:class:`SegmenterInfo`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .io import ImageSource
from .segmenter import Segmenter, SegmenterInfo, fn_name, grid_per_axis
from .stitching import STITCH_MODES, Stitcher, check_mode, make_stitcher
from .tiling import TileGrid, clip_depth, normalize_overlap

__all__ = ["RunPlan", "StitchOptions", "make_plan", "parse_memory"]

log = logging.getLogger("blockbuster")

TileChunks = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class StitchOptions:
    """How labels are joined across tile borders (see :mod:`blockbuster.stitching`)."""

    mode: str = "auto"
    iou_threshold: float = 0.5
    connectivity: int = 1

    def check(self) -> None:
        if self.mode != "auto" and self.mode not in STITCH_MODES:
            raise InputError(f"unknown stitch mode {self.mode!r}; choose one of auto, "
                             f"{', '.join(STITCH_MODES)}")
        threshold = self.iou_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold < 1.0:
            raise InputError(f"iou_threshold={threshold!r} must be a number in [0, 1)")


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the first tile (see the module docstring)."""

    source: ImageSource
    fn: Callable[[np.ndarray], Any]
    segmenter: SegmenterInfo
    grid: TileGrid
    stitch: StitchOptions
    mask: ImageSource | None = None
    skip_empty: bool = False
    table: bool = False
    #: also measure each object's intensities, per channel, in the table
    measure: bool = False
    retries: int = 1
    #: seconds one call of fn may take on a tile before the attempt counts as failed
    timeout: float | None = None
    #: how the tile shape was chosen (``"auto"``), for the log and ``info``
    sizing_note: str | None = None
    requested_overlap: tuple[int, ...] = field(default=())

    @property
    def fn_label(self) -> str:
        return fn_name(self.fn)

    def stitcher(self) -> Stitcher:
        return make_stitcher(self.stitch.mode, self.grid, connectivity=self.stitch.connectivity,
                             iou_threshold=self.stitch.iou_threshold)

    def params(self) -> dict[str, Any]:
        """The parameters that define the result: a resumed run must have the same."""
        source, mode = self.source, self.stitch.mode
        mask = self.mask
        meta = source.meta
        return {
            "input": (str(source.path.resolve()) if source.path else source.url
                      or f"<in-memory {source.kind}>"),
            "dataset": meta.dataset,
            "series": meta.series,
            "level": meta.level,
            "channels": list(source.channels) if source.channels is not None else None,
            "fixed": [list(f) for f in source.fixed],
            "shape": list(source.shape),
            "dtype": source.dtype.str,
            "channel_axis": source.channel_axis,
            "segmenter": self.segmenter.identity,
            "tile_chunks": [list(c) for c in self.grid.chunks],
            "depth": list(self.grid.depth),
            "stitch": mode,
            "connectivity": self.stitch.connectivity if mode == "faces" else None,
            "iou_threshold": self.stitch.iou_threshold if mode in ("iou", "whole") else None,
            "table": bool(self.table),
            "measure": bool(self.measure),
            "mask": None if mask is None else (
                str(mask.path) if mask.path else f"<in-memory {mask.shape}>"),
            "skip_empty": bool(self.skip_empty),
        }

    def predicted_peak_bytes(self) -> int:
        from .sizing import predict_peak_bytes

        linked = self.grid.linked_axes
        return predict_peak_bytes(tuple(self.grid.tile_shape[a] for a in linked),
                                  self.source.dtype,
                                  overlap=tuple(self.grid.depth[a] for a in linked),
                                  channels=self.source.n_channels,
                                  memory_model=self.segmenter.memory_model,
                                  image_shape=self.source.spatial_shape)

    def second_tile_fits(self, memory: int) -> bool:
        """Whether a budget of ``memory`` bytes holds a second tile (the next one read, or the
        last one stored, while fn runs) besides the predicted peak of one tile."""
        linked = self.grid.linked_axes
        padded = math.prod(min(self.grid.tile_shape[a] + 2 * self.grid.depth[a],
                               self.grid.shape[a]) for a in linked)
        # its input, and its labels (uint32) being numbered and written
        second = padded * (self.source.dtype.itemsize * self.source.n_channels + 4)
        return self.predicted_peak_bytes() + second <= memory

    def describe(self) -> str:
        """The one line every run logs before its first tile."""
        from .sizing import format_bytes

        grid, source = self.grid, self.source
        linked = grid.linked_axes
        line = (f"tile shape {tuple(grid.tile_shape[a] for a in linked)}, overlap "
                f"{tuple(grid.depth[a] for a in linked)}, {grid.n_tiles} "
                f"tile{'' if grid.n_tiles == 1 else 's'}, stitch={self.stitch.mode}, predicted "
                f"peak memory {format_bytes(self.predicted_peak_bytes())}")
        if grid.unlinked_axes:
            line += f"; {grid.shape[grid.unlinked_axes[0]]} time points, each on its own"
        if source.channel_axis is not None:
            names = source.channel_names or tuple(str(i) for i in source.channel_indices)
            line += f"; channel(s) {', '.join(map(str, names))}"
        return line

    def summary(self) -> dict[str, Any]:
        """The plan as plain data (``info --json``, ``segment --dry-run``)."""
        grid = self.grid
        return {
            "input": self.params()["input"],
            "shape": list(self.source.shape),
            "spatial_shape": list(self.source.spatial_shape),
            "dtype": str(self.source.dtype),
            "channel_axis": self.source.channel_axis,
            "segmenter": self.segmenter.identity,
            "tile_shape": list(grid.tile_shape),
            "grid_shape": list(grid.grid_shape),
            "n_tiles": grid.n_tiles,
            "overlap": list(grid.depth),
            "stitch": self.stitch.mode,
            "network_grid": list(grid_per_axis(self.segmenter.grid,
                                               len(self.source.spatial_shape))),
            "predicted_peak_bytes": self.predicted_peak_bytes(),
            "sizing": self.sizing_note,
        }


def parse_memory(memory: Any) -> int | None:
    """A memory budget in bytes from an int or a string such as ``"8GB"``.

    Examples
    --------
    >>> parse_memory("2GiB"), parse_memory(None)
    (2147483648, None)
    """
    if memory is None:
        return None
    if isinstance(memory, str):
        from dask.utils import parse_bytes

        try:
            memory = parse_bytes(memory)
        except (ValueError, TypeError) as exc:
            raise InputError(f"memory={memory!r} is not a size; give bytes or a string such "
                             "as '8GB'") from exc
    if isinstance(memory, bool) or not isinstance(memory, (int, float, np.integer)) \
            or memory <= 0:
        raise InputError(f"memory={memory!r} must be a positive number of bytes or a string "
                         "such as '8GB'")
    return int(memory)


def make_plan(
    source: ImageSource,
    fn: Callable[[np.ndarray], Any],
    info: SegmenterInfo,
    *,
    tile_shape: Sequence[int] | str | Callable[..., Any] | None = "auto",
    overlap: int | str | Sequence[int | str] | None = None,
    stitch: StitchOptions | None = None,
    use_gpu: bool = False,
    memory: int | None = None,
    mask: ImageSource | None = None,
    skip_empty: bool = False,
    table: bool = False,
    measure: bool = False,
    retries: int = 1,
    timeout: float | None = None,
    tile_chunks: TileChunks | None = None,
) -> RunPlan:
    """Resolve every choice of a run and check it against the image (nothing is written).

    ``tile_chunks``: the tiles of the run being resumed (``"auto"`` and callable sizing are not
    redone: free memory differs from one start to the next).
    """
    stitch = stitch or StitchOptions()
    stitch.check()
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise InputError(f"retries={retries!r} must be an integer >= 0")
    timeout = check_timeout(timeout)
    if mask is not None and mask.ndim != len(source.spatial_shape):
        raise InputError(f"mask of shape {mask.shape} must have the image's "
                         f"{len(source.spatial_shape)} spatial axes (image "
                         f"{source.spatial_shape})")
    ndim = len(source.spatial_shape)
    if isinstance(overlap, str) and overlap.strip().lower() == "auto":
        # measured by tile_process before it plans (tilecheck.choose_overlap); a plan made
        # without running anything (info, --dry-run) shows the segmenter's default
        log.info("overlap='auto' is measured when the run starts; planned here with the "
                 "segmenter's default overlap")
        overlap = None
    overlap = _overlap_in_voxels(overlap, source)
    overlap_t = normalize_overlap(  # lengths left here (wrong count) are refused by it
        info.preferred_overlap or 0 if overlap is None else overlap, ndim)  # type: ignore[arg-type]
    if overlap is not None:
        _check_overlap_fits(overlap, overlap_t, source.spatial_shape)
    else:  # a preference is only a preference: never more than the image
        overlap_t = tuple(min(o, n) for o, n in zip(overlap_t, source.spatial_shape, strict=True))
    step = grid_per_axis(info.grid, ndim)
    overlap_t = _overlap_on_grid(overlap_t, step)
    note = None
    if tile_chunks is None:
        spatial_chunks, note = _tile_chunks(tile_shape, source, overlap_t, info, use_gpu, memory)
        spatial_chunks = _tiles_on_grid(spatial_chunks, step, source.spatial_shape,
                                        explicit=not (isinstance(tile_shape, str)
                                                      or callable(tile_shape)))
        grid = _grid(source, spatial_chunks, overlap_t, step)
    else:
        log.info("resuming with the run's tile shape (tile_shape=%r is not sized again)",
                 tile_shape)
        grid = _grid(source, _spatial_part(source, tile_chunks), overlap_t, step)
    _check_segmenter_plan(fn, grid)
    _report_clipped_overlap(overlap_t, grid)
    mode = _stitch_mode(stitch.mode, info, grid)
    check_mode(mode, grid.depth, stitch.connectivity, len(grid.linked_axes))
    resolved = StitchOptions(mode, float(stitch.iou_threshold), stitch.connectivity)
    if mode == "whole":
        _warn_whole_overlap(grid, info)
    if measure and not table:
        raise InputError("measure=True measures intensities for the object table: pass table=True "
                         "(or a table path) too")
    return RunPlan(source, fn, info, grid, resolved, mask=mask, skip_empty=bool(skip_empty),
                   table=bool(table), measure=bool(measure), retries=int(retries),
                   timeout=timeout, sizing_note=note, requested_overlap=overlap_t)


def check_timeout(timeout: Any) -> float | None:
    """A per-tile time limit in seconds: a positive number, or None for no limit.

    Examples
    --------
    >>> check_timeout(90), check_timeout(None)
    (90.0, None)
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer,
                                                             np.floating)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise InputError(f"${{timeout}}{timeout!r} must be a positive number of seconds (or None "
                         "for no limit)")
    return float(timeout)


def _overlap_in_voxels(overlap: Any, source: ImageSource) -> Any:
    """An overlap given in physical units (``"6um"``, or per axis) in voxels per axis."""
    from .units import is_length, to_voxels

    if is_length(overlap):
        voxels = to_voxels(overlap, source, name="overlap")
        log.info("overlap=%r is %s voxels", overlap, voxels)
        return voxels
    if isinstance(overlap, (tuple, list)) and any(is_length(o) for o in overlap):
        if len(overlap) != len(source.spatial_shape):
            return overlap  # normalize_overlap says what is wrong
        spacing = source.spacing_um
        spatial = [s for s, t in zip(spacing, source.tiled_types, strict=True) if t == "space"]
        return tuple(to_voxels(o, [s], name="overlap")[0] for o, s in zip(overlap, spatial,
                                                                            strict=True))
    return overlap


def _check_overlap_fits(given: Any, overlap: tuple[int, ...], spatial: tuple[int, ...]) -> None:
    """An overlap larger than the whole image cannot make sense (a unit mistake: µm for
    voxels, a typo); refused before anything runs.

    Larger than the image on some axes only is fine: a thin z-stack or 2-D tiles of a volume
    simply get less halo there (it is clipped to the tile, as documented).
    """
    long_axes = [a for a, n in enumerate(spatial) if n > 1] or list(range(len(spatial)))
    if all(overlap[a] > spatial[a] for a in long_axes):
        raise InputError(f"overlap={given!r} is larger than the image {spatial}: give a halo in "
                         "voxels of about one object diameter")


def _check_segmenter_plan(fn: Callable[..., Any], grid: TileGrid) -> None:
    """Let the segmenter refuse tiles it cannot make sense of (see Segmenter.check_plan)."""
    if not isinstance(fn, Segmenter):
        return
    linked = grid.linked_axes
    fn.check_plan(tuple(grid.shape[a] for a in linked), tuple(grid.tile_shape[a] for a in linked),
                  tuple(grid.depth[a] for a in linked))


def _tile_chunks(tile_shape: Any, source: ImageSource, overlap: tuple[int, ...],
                 info: SegmenterInfo, use_gpu: bool, memory: int | None,
                 ) -> tuple[Any, str | None]:
    """Tile chunks (dask style) from a tuple, "auto", a callable, or None (the input's chunks)."""
    from . import sizing

    spatial = source.spatial_shape
    if isinstance(tile_shape, str):
        if tile_shape != "auto":
            raise InputError(f"tile_shape={tile_shape!r}: use a tuple, 'auto' or a callable")
        plan = sizing.plan_tile_shape(
            spatial, source.dtype, overlap=overlap, use_gpu=use_gpu, memory=memory,
            memory_model=info.memory_model, channels=source.n_channels,
            chunks=source.spatial_storage_chunks, spatial_ndim=info.spatial_ndim)
        log.info("tile_shape='auto': %s", plan.reason)
        return plan.shape, plan.reason
    if use_gpu:
        sizing.available_memory(use_gpu=True)  # fail early and clearly when there is no GPU
    if tile_shape is None:
        if source.kind == "dask":
            return tuple(source.array.chunks[a] for a in source.spatial_axes), None
        if source.spatial_storage_chunks is None:
            raise InputError("tile_shape=None uses the input's own chunks, but a NumPy array has "
                             "none; pass a tuple or 'auto'")
        return source.spatial_storage_chunks, None
    if callable(tile_shape):
        result = tile_shape(spatial, source.dtype)
        return sizing.validate_tile_shape(result, spatial,
                                          source=f"tile_shape callable {fn_name(tile_shape)}"), None
    return sizing.validate_tile_shape(tile_shape, spatial), None


def _overlap_on_grid(overlap: tuple[int, ...], step: tuple[int, ...]) -> tuple[int, ...]:
    """The overlap rounded up to whole steps of the segmenter's grid, with a logged note."""
    rounded = tuple(-(-o // s) * s for o, s in zip(overlap, step, strict=True))
    if rounded != overlap:
        log.info("overlap %s rounded up to %s: the segmenter's network works on a grid of %s "
                 "voxels, and tiles only see the image as the whole image does when they start "
                 "on it", overlap, rounded, step)
    return rounded


def _tiles_on_grid(chunks: Any, step: tuple[int, ...], shape: tuple[int, ...], *,
                   explicit: bool) -> Any:
    """Tile shapes rounded to whole steps of the segmenter's grid (so tiles start on it).

    A regular tile shape is rounded down (to at least one step; the image edge stays where it
    is); a tile shape the user gave is rounded too, with a note in the log.
    """
    if all(s == 1 for s in step) or not all(isinstance(c, (int, np.integer)) for c in chunks):
        return chunks  # nothing declared, or irregular (dask) chunks kept as given
    rounded = tuple(min(n, max(s, c // s * s)) for c, s, n in zip(chunks, step, shape,
                                                                   strict=True))
    if rounded != tuple(chunks):
        (log.info if explicit else log.debug)(
            "tile shape %s rounded to %s: the segmenter's network works on a grid of %s voxels "
            "and tiles must start on it", tuple(chunks), rounded, step)
    return rounded


def _grid(source: ImageSource, spatial_chunks: Any, overlap: tuple[int, ...],
          step: tuple[int, ...] | None = None) -> TileGrid:
    """The grid over the image's tiled axes: space as planned, time one point per tile."""
    spatial = source.spatial_shape
    grid = TileGrid(spatial, spatial_chunks)
    depth = clip_depth(overlap, grid.chunks, step)
    times = source.time_positions
    chunks, depths, space = [], [], iter(zip(grid.chunks, depth, strict=True))
    for position, size in enumerate(source.tiled_shape):
        if position in times:  # each time point on its own, never stitched to the next
            chunks.append((1,) * size)
            depths.append(0)
        else:
            c, d = next(space)
            chunks.append(c)
            depths.append(d)
    return TileGrid(source.tiled_shape, tuple(chunks), tuple(depths), unlinked_axes=times)


def _report_clipped_overlap(overlap: tuple[int, ...], grid: TileGrid) -> None:
    """Say when the halo had to be reduced to stay smaller than the tiles."""
    linked = grid.linked_axes
    depth = tuple(grid.depth[a] for a in linked)
    chunks = [grid.chunks[a] for a in linked]
    tile_shape = tuple(grid.tile_shape[a] for a in linked)
    clipped = [ax for ax, (o, d) in enumerate(zip(overlap, depth, strict=True))
               if d < o and len(chunks[ax]) > 1]
    if any(tile_shape[ax] > 1 for ax in clipped):
        warnings.warn(
            f"overlap {overlap} reduced to {depth}: the halo must be smaller than the tile on "
            f"every axis (tile shape {tile_shape}); use larger tiles to keep the overlap",
            UserWarning, stacklevel=4)
    elif clipped:
        log.info("overlap %s reduced to %s on axes with tiles one voxel deep", overlap, depth)


def _spatial_part(source: ImageSource, tile_chunks: TileChunks) -> TileChunks:
    """The spatial axes' chunks of a grid over the tiled axes (a resumed run's tiles)."""
    times = source.time_positions
    return tuple(c for i, c in enumerate(tile_chunks) if i not in times)


def _stitch_mode(stitch: str, info: SegmenterInfo, grid: TileGrid) -> str:
    if stitch == "auto":
        preferred = info.preferred_stitch
        if preferred in ("iou", "whole") and not any(grid.depth):
            preferred = "faces"
        return preferred or ("iou" if any(grid.depth) else "faces")
    if grid.n_tiles == 1 and stitch in STITCH_MODES:
        return stitch if stitch not in ("iou", "whole") or any(grid.depth) else "faces"
    return stitch


def _warn_whole_overlap(grid: TileGrid, info: SegmenterInfo) -> None:
    """``stitch="whole"`` is exact when the overlap holds an object: say when it may not."""
    linked = grid.linked_axes
    try:
        wanted = normalize_overlap(info.preferred_overlap or 0, len(linked))
    except InputError:  # declared for other axes (e.g. per plane): nothing to compare with
        return
    depth = tuple(grid.depth[a] for a in linked)
    planes = [grid.tile_shape[a] == 1 for a in linked]  # one plane per tile: never stitched
    short = [i for i, (d, w, p) in enumerate(zip(depth, wanted, planes, strict=True))
             if not p and (d < w or d == 0)]
    if short and grid.n_tiles > 1:
        than = f"the segmenter's {wanted}" if any(wanted) else "one object diameter"
        log.warning("stitch='whole' takes each object from the one tile that saw it whole, which "
                    "needs an overlap of about one object diameter; the overlap %s is less than "
                    "%s on axis/axes %s: objects crossing tile borders there may be cut in every "
                    "tile that reads them", depth, than, ", ".join(str(i) for i in short))


def n_tiles_of(tile_chunks: TileChunks) -> int:
    return math.prod(len(c) for c in tile_chunks)
