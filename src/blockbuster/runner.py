"""``tile_process``: open the image -> plan tiles -> run fn per tile -> stitch -> write.

Every tile reads its padded region, calls ``fn``, checks the result, numbers the tile's objects
1..n and saves a small record (label counts and the boundary data stitching needs). The output's
chunks are exactly the tile cores. Two engines share that:

* Serial (no dask client): one pass. As each tile is stored, it is matched with its finished
  neighbours (from their records) and its objects get their global labels at once
  (:class:`~blockbuster.stitching.LabelBook`), so its core goes straight to the output. At the
  end only the few tiles holding labels that a later tile joined are rewritten.
* Distributed (``client=``): tiles run in any order on the cluster, so each writes its local
  labels to ``raw.zarr`` in the work directory; stitching then matches all neighbour pairs,
  solves the label graph, and a last pass maps every tile's core to its final labels.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import stitching
from .errors import (
    BlockbusterError,
    InputError,
    OutputExistsError,
    ResumeMismatchError,
    TileError,
    TileFailures,
)
from .execution import active_client, run_tasks
from .io import ImageSource, open_image
from .output import (
    FORMAT_VERSION,
    OutputTarget,
    completion,
    mark_complete,
    resolve_output,
    verify_output,
)
from .progress import make_progress
from .segmenter import Segmenter, SegmenterInfo, describe_segmenter, fn_name
from .store import TileRecord, WorkDir, check_same_params
from .tiling import Tile, TileGrid, clip_depth, normalize_overlap

__all__ = ["tile_process"]

log = logging.getLogger("blockbuster")

#: Stop early when this many tiles failed before any succeeded: the fn is broken, not the data.
FAIL_FAST_AFTER = 3
#: The phases that never call fn (stitching, writing) use two threads (decompression,
#: compression and file I/O release the GIL) while a tile's buffers are small; larger tiles run
#: one at a time, because a second thread's buffers (and allocator arena) would then exceed what
#: "auto" sizing reserved for one segmentation tile. Segmentation is always one tile at a time.
IO_THREADS = min(2, os.cpu_count() or 1)
IO_THREADS_MAX_TILE_VOXELS = 2**20
#: On a cluster, stitching and writing (no fn, milliseconds per tile) go in batches of tiles,
#: about this many per worker thread: enough to balance the load, few enough that the
#: scheduler's cost per task stays small next to the work.
BATCHES_PER_THREAD = 4


def _io_threads(grid: TileGrid) -> int:
    return IO_THREADS if math.prod(grid.tile_shape) <= IO_THREADS_MAX_TILE_VOXELS else 1


# -- the per-tile work (runs in the worker) ---------------------------------------------------
@dataclass
class RunContext:
    """Everything a tile task needs; pickled once per run and shipped to workers."""

    source: ImageSource
    fn: Callable[[np.ndarray], np.ndarray]
    fn_label: str
    grid: TileGrid
    mode: str
    work_path: Path
    table: bool
    retries: int
    mask: ImageSource | None = None
    skip_empty: bool = False
    connectivity: int = 1
    iou_threshold: float = 0.5
    #: serial engine only: the global labels so far, and the output the tiles go to
    book: stitching.LabelBook | None = None
    output: zarr.Array | None = None
    _raw: Any = field(default=None, repr=False)

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.work_path)

    @property
    def raw(self) -> zarr.Array:
        if self._raw is None:
            self._raw = self.work.open_raw()
        return self._raw

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_raw": None}


@dataclass
class TileOutcome:
    tile_id: int
    n_labels: int = 0
    error: TileError | None = None
    skipped: bool = False


def segment_tile(ctx: RunContext, tile_id: int) -> TileOutcome:
    """Pass 1 for one tile: read, segment, check, number, save core and record."""
    tile, data = read_tile(ctx, tile_id)
    if data is None:
        return _skip(ctx, tile_id)
    result, error = _call_with_retries(ctx, tile, data)
    del data
    return store_tile(ctx, tile, result, error)


def read_tile(ctx: RunContext, tile_id: int) -> tuple[Tile, np.ndarray | None]:
    """The tile and its padded input; None for a tile to skip (no tissue, or constant)."""
    tile = ctx.grid.tile(tile_id)
    if ctx.mask is not None and not _has_foreground(ctx.mask, tile, ctx.grid.shape):
        return tile, None
    data = ctx.source.read(tile.padded)
    if ctx.skip_empty and data.size and data.min() == data.max():
        return tile, None
    return tile, data


def store_tile(ctx: RunContext, tile: Tile, result: Any, error: TileError | None) -> TileOutcome:
    """Check fn's result, number it 1..n, save the core and the record (last)."""
    tile_id = tile.id
    if error is not None:
        ctx.work.save_failure(tile_id, error.traceback_text or str(error))
        return TileOutcome(tile_id, error=error)
    labels = _check_result(ctx, tile, result)
    if ctx.mode == "iou":  # halo labels are kept for matching: number the padded tile
        local, n, padded_counts = stitching.sequential_local_labels(labels)
        core = local[tile.inner]
        counts = stitching.core_counts(local, tile.inner, padded_counts)
        boundary = stitching.boundary_arrays(ctx.grid, tile, local, ctx.mode)
    else:
        core, n, counts = stitching.sequential_local_labels(labels[tile.inner])
        boundary = stitching.boundary_arrays(ctx.grid, tile, core, ctx.mode)
    del labels, result
    arrays = {"counts": counts, **boundary}
    if ctx.table:
        arrays.update(_object_stats(core, n, tile))
    if ctx.book is None:
        ctx.raw[tile.core] = core.astype(ctx.raw.dtype, copy=False)
    else:
        glabels, merges = assign_tile(ctx, tile, TileRecord({"n": n}, arrays))
        arrays.update(glabels=glabels, merges=merges)
        ctx.output[tile.core] = glabels.astype(ctx.output.dtype)[core]
    # The record is written last: its presence is what marks the tile as done.
    ctx.work.save_record(tile_id, TileRecord({"tile": tile_id, "n": n}, arrays))
    return TileOutcome(tile_id, n)


def _skip(ctx: RunContext, tile_id: int) -> TileOutcome:
    """A tile with nothing to segment: background, recorded as done without calling fn."""
    arrays = {"counts": np.zeros(1, np.int64)}
    if ctx.book is not None:
        arrays.update(glabels=np.zeros(1, np.int64), merges=np.zeros((0, 2), np.int64))
    ctx.work.save_record(tile_id, TileRecord({"tile": tile_id, "n": 0, "skipped": True}, arrays))
    return TileOutcome(tile_id, 0, skipped=True)


def _has_foreground(mask: ImageSource, tile: Tile, shape: tuple[int, ...]) -> bool:
    """Whether the mask (at any resolution) has foreground under the tile's core."""
    region = []
    for core, full, small in zip(tile.core, shape, mask.spatial_shape):
        scale = small / full
        lo = min(int(math.floor(core.start * scale)), small - 1)
        hi = max(int(math.ceil(core.stop * scale)), lo + 1)
        region.append(slice(lo, hi))
    return bool(np.any(mask.read(tuple(region))))


def _call_with_retries(ctx: RunContext, tile: Tile, data: np.ndarray):
    error = None
    for attempt in range(ctx.retries + 1):
        try:
            return ctx.fn(data), None
        except BlockbusterError:
            raise  # a configuration problem (no GPU, missing extra...): fails every tile alike
        except Exception as exc:  # the user's fn may raise anything; report it with the tile
            tb = traceback.format_exc()
            error = TileError(
                f"{ctx.fn_label} failed on {tile.describe()} after {attempt + 1} attempt(s): "
                f"{type(exc).__name__}: {exc}",
                tile_index=tile.index, region=tile.padded, fn_name=ctx.fn_label, tb=tb,
            )
            error.__cause__ = exc
    return None, error


def _check_result(ctx: RunContext, tile: Tile, result: Any) -> np.ndarray:
    """The fn's result must be a non-negative integer label image of the tile's spatial shape."""

    def fail(problem: str) -> TileError:
        return TileError(f"{ctx.fn_label} returned {problem} for {tile.describe()}",
                         tile_index=tile.index, region=tile.padded, fn_name=ctx.fn_label)

    if result is None:
        raise fail("None instead of a label image")
    if isinstance(result, tuple):
        raise fail(f"a tuple of {len(result)} items instead of a label image (scipy.ndimage.label "
                   "returns (labels, count): use its first item)")
    labels = np.asarray(result)
    if labels.shape != tile.padded_shape:
        raise fail(f"an array of shape {labels.shape}; expected the tile's spatial shape "
                   f"{tile.padded_shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise fail(f"dtype {labels.dtype}; labels must be integers (0 = background). If this is "
                   "a mask, label it first, e.g. with scipy.ndimage.label")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise fail("negative labels; labels must be >= 0 (0 = background)")
    return labels


def _object_stats(core: np.ndarray, n: int, tile: Tile) -> dict[str, np.ndarray]:
    """Per local label: bounding box (global, half-open) and coordinate sums, for the table."""
    from scipy import ndimage

    ndim = core.ndim
    lo = np.zeros((n + 1, ndim), np.int64)
    hi = np.zeros((n + 1, ndim), np.int64)
    for label, box in enumerate(ndimage.find_objects(core, max_label=n), start=1):
        if box is not None:
            lo[label] = [s.start + c.start for s, c in zip(box, tile.core)]
            hi[label] = [s.stop + c.start for s, c in zip(box, tile.core)]
    sums = np.zeros((n + 1, ndim), np.float64)
    flat = core.ravel()
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = core.shape[axis]
        coord = np.arange(core.shape[axis], dtype=np.float64).reshape(shape) + tile.core[axis].start
        sums[:, axis] = np.bincount(flat, weights=np.broadcast_to(coord, core.shape).ravel(),
                                    minlength=n + 1)[: n + 1]
    return {"bbox_lo": lo, "bbox_hi": hi, "coord_sum": sums}


# -- stitching tasks --------------------------------------------------------------------------
@dataclass
class StitchContext:
    grid: TileGrid
    mode: str
    work_path: Path
    connectivity: int
    iou_threshold: float


def _neighbours(ctx: StitchContext | RunContext, tile: Tile, backward: bool = False,
                ) -> list[tuple[Tile, tuple[int, ...]]]:
    """The neighbours a tile is matched with, and their offsets (see ``forward_offsets``)."""
    grid = ctx.grid
    sign = -1 if backward else 1
    found = []
    for off in grid.forward_offsets(ctx.connectivity if ctx.mode == "faces" else None):
        j = grid.neighbour(tile.index, tuple(sign * o for o in off))
        if j is None:
            continue
        other = grid.tile(j)
        if ctx.mode != "iou" or grid.overlap_region(tile, other) is not None:
            found.append((other, off))
    return found


def _matched(ctx: StitchContext | RunContext, a: Tile, b: Tile, off: tuple[int, ...],
             a_rec: TileRecord, b_rec: TileRecord) -> tuple[np.ndarray, np.ndarray]:
    """Local label pairs of ``a`` and ``b`` (``b`` at forward offset ``off``) that are one."""
    la, lb = stitching.match_pair(ctx.grid, a, b, off, a_rec, b_rec, ctx.mode,
                                  connectivity=ctx.connectivity, iou_threshold=ctx.iou_threshold)
    # Only objects that reach their tile's core appear in the output. A halo-only object is a
    # fragment cut by the padded edge, where the fn saw too little context: linking through it
    # could chain two distinct objects together, and it adds nothing.
    in_core = (a_rec.get("counts")[la] > 0) & (b_rec.get("counts")[lb] > 0)
    return la[in_core], lb[in_core]


def match_tile(ctx: StitchContext, tile_id: int) -> tuple[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Match one tile with each of its forward neighbours; returns local label pairs."""
    work = WorkDir(ctx.work_path)
    a = ctx.grid.tile(tile_id)
    a_rec = None
    found = []
    for b, off in _neighbours(ctx, a):
        a_rec = a_rec or work.load_record(tile_id)
        la, lb = _matched(ctx, a, b, off, a_rec, work.load_record(b.id))
        if la.size:
            found.append((b.id, la, lb))
    return tile_id, found


def assign_tile(ctx: RunContext, tile: Tile, rec: TileRecord) -> tuple[np.ndarray, np.ndarray]:
    """Serial engine: match a tile with its finished neighbours, give its objects global labels.

    Returns the global label of each local label and the merges of earlier labels it caused.
    """
    work = ctx.work
    local, matched = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    if ctx.mode != "none" and rec.meta["n"]:
        for backward in (True, False):  # forward neighbours are finished only on a resume
            for other, off in _neighbours(ctx, tile, backward):
                if not work.record_path(other.id).exists():
                    continue
                o_rec = work.load_record(other.id)
                if backward:
                    lo, la = _matched(ctx, other, tile, off, o_rec, rec)
                else:
                    la, lo = _matched(ctx, tile, other, off, rec, o_rec)
                local.append(la)
                matched.append(o_rec.get("glabels")[lo])
    return ctx.book.assign(rec.get("counts") > 0, np.concatenate(local),
                           np.concatenate(matched))


@dataclass
class RelabelContext:
    grid: TileGrid
    work_path: Path
    output: zarr.Array
    offsets: np.ndarray
    n_local: np.ndarray
    _arrays: Any = field(default=None, repr=False)

    def arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """The final map and the raw labels, opened once per process (threads share them)."""
        if self._arrays is None:
            work = WorkDir(self.work_path)
            self._arrays = (work.open_final_map(), work.open_raw())  # one atomic assignment
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}


def relabel_tile(ctx: RelabelContext, tile_id: int) -> int:
    """Write one tile's final labels: its raw core through its own slice of the final map."""
    final, raw = ctx.arrays()
    tile = ctx.grid.tile(tile_id)
    start = int(ctx.offsets[tile_id])
    lut = final[start: start + int(ctx.n_local[tile_id]) + 1]
    ctx.output[tile.core] = stitching.relabel(raw[tile.core], lut)
    return tile_id


@dataclass
class FixContext:
    grid: TileGrid
    work_path: Path
    output: zarr.Array


def fix_tile(ctx: FixContext, item: tuple[int, np.ndarray, np.ndarray]) -> int:
    """Serial engine, at the end: rewrite a tile whose labels were joined or moved later.

    The tile's labels are saved first, and a retry starts from that copy, so a crash at any
    moment followed by a resume gives the same result (the change is not idempotent by itself:
    a label moved into a gap has the value an absorbed label had).
    """
    tile_id, old, new = item
    tile = ctx.grid.tile(tile_id)
    work = WorkDir(ctx.work_path)
    backup = work.before_fix_path(tile_id)
    if backup.exists():
        labels = TileRecord.load(backup).get("labels")
    else:
        labels = ctx.output[tile.core]
        TileRecord({"tile": tile_id}, {"labels": labels}).save(backup)
    ctx.output[tile.core] = stitching.apply_changes(labels, old, new)
    return tile_id


# -- planning ---------------------------------------------------------------------------------
def _resolve_fn(fn: Any, channel_axis: int | None) -> Callable:
    if isinstance(fn, str):
        from .plugins import get_segmenter

        fn = get_segmenter(fn)
    if not callable(fn):
        raise InputError(f"fn must be a callable, a Segmenter or a registered segmenter name; "
                         f"got {type(fn).__name__}")
    if isinstance(fn, Segmenter):
        fn.channel_axis = channel_axis
    return fn


def _resolve_tile_shape(tile_shape: Any, source: ImageSource, overlap: tuple[int, ...],
                        info: SegmenterInfo, use_gpu: bool, memory: int | None):
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
        return plan.shape
    if use_gpu:
        sizing.available_memory(use_gpu=True)  # fail early and clearly when there is no GPU
    if tile_shape is None:
        if source.kind == "dask":
            return tuple(source.array.chunks[a] for a in source.spatial_axes)
        if source.spatial_storage_chunks is None:
            raise InputError("tile_shape=None uses the input's own chunks, but a NumPy array has "
                             "none; pass a tuple or 'auto'")
        return source.spatial_storage_chunks
    if callable(tile_shape):
        result = tile_shape(spatial, source.dtype)
        return sizing.validate_tile_shape(result, spatial,
                                          source=f"tile_shape callable {fn_name(tile_shape)}")
    return sizing.validate_tile_shape(tile_shape, spatial)


def _plan_grid(spatial: tuple[int, ...], chunks, overlap: tuple[int, ...]) -> TileGrid:
    grid = TileGrid(spatial, chunks)
    depth = clip_depth(overlap, grid.chunks)
    clipped = [ax for ax, (o, d) in enumerate(zip(overlap, depth)) if d < o and len(grid.chunks[ax]) > 1]
    surprising = [ax for ax in clipped if grid.tile_shape[ax] > 1]
    if surprising:
        warnings.warn(
            f"overlap {overlap} reduced to {depth}: the halo must be smaller than the tile on "
            f"every axis (tile shape {grid.tile_shape}); use larger tiles to keep the overlap",
            UserWarning, stacklevel=3)
    elif clipped:
        log.info("overlap %s reduced to %s on axes with tiles one voxel deep", overlap, depth)
    return TileGrid(spatial, grid.chunks, depth)


def _resolve_stitch(stitch: str, info: SegmenterInfo, grid: TileGrid) -> str:
    if stitch == "auto":
        preferred = info.preferred_stitch
        if preferred == "iou" and not any(grid.depth):
            preferred = "faces"
        return preferred or ("iou" if any(grid.depth) else "faces")
    if grid.n_tiles == 1 and stitch in stitching.STITCH_MODES:
        return stitch if stitch != "iou" or any(grid.depth) else "faces"
    return stitch


# -- the run ----------------------------------------------------------------------------------
def tile_process(
    image: Any,
    fn: Callable[[np.ndarray], np.ndarray] | Segmenter | str,
    tile_shape: Sequence[int] | str | Callable | None = "auto",
    overlap: int | Sequence[int] | None = None,
    *,
    output: str | Path | Any | None = None,
    channel_axis: int | None = None,
    stitch: str = "auto",
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    use_gpu: bool = False,
    memory: int | str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    progress: bool | None = None,
    table: bool | str | Path = False,
    retries: int = 1,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    mask: Any = None,
    skip_empty: bool = False,
    ome: bool | None = None,
    label_name: str = "blockbuster",
) -> zarr.Array:
    """Segment an image of any size tile by tile and write one seamless labelling to zarr.

    Parameters
    ----------
    image : path, numpy.ndarray, dask.array.Array or zarr.Array
        A zarr array (v2 or v3), an OME-Zarr image (full resolution is used), a TIFF/OME-TIFF
        (streamed, never read whole), or an array in memory.
    fn : callable, Segmenter or str
        ``fn(tile) -> labels``: takes one NumPy tile with its halo (axes in the input's order)
        and returns integer labels of the tile's spatial shape, 0 = background. A registered
        segmenter name (e.g. ``"watershed"``) is looked up among the installed plugins.
    tile_shape : tuple of int, "auto", callable or None
        Core size of a tile per spatial axis (``(1, 512, 512)``: 2-D per slice;
        ``(120, 512, 512)``: 3-D). ``"auto"`` sizes cubic tiles from free RAM (or GPU memory with
        ``use_gpu``); a callable is called as ``tile_shape(shape, dtype)``; None uses the
        input's own chunks.
    overlap : int or tuple of int, optional
        Halo added on every side of each tile, per axis. Clipped per axis to stay smaller than
        the tile (a z-tile of 1 gets 0). Default: the segmenter's preferred overlap, else 0.
    output : path or zarr store, optional
        Where to write the labels. Default: ``<input>.labels.zarr`` next to a path input, or a
        temporary directory for in-memory input.
    channel_axis : int, optional
        Axis of the input holding channels: never tiled, absent from the output.
    stitch : {"auto", "faces", "iou", "none"}
        How labels are joined across tile borders (see :mod:`blockbuster.stitching`). "auto":
        the segmenter's preference, else "iou" with an overlap and "faces" without.
    iou_threshold : float
        For ``stitch="iou"``: merge objects whose IoU in the shared region exceeds this.
    connectivity : int
        For ``stitch="faces"``: 1 = faces only, up to ndim = corners too (as scipy.ndimage).
    use_gpu : bool
        Size ``"auto"`` tiles from free GPU memory; fails clearly when no GPU is present.
    memory : int or str, optional
        Memory budget for ``"auto"`` (bytes, or a string like ``"8GB"``), instead of probing
        the machine.
    overwrite : bool
        Replace an existing output (and any unfinished run's work directory).
    resume : bool
        Continue an unfinished run on the same output with the same arguments: finished tiles
        are not run again.
    client : distributed.Client or "active", optional
        Run tiles on a dask.distributed cluster instead of sequentially in this process. Without
        a client, each tile's labels are final when it is stored (one pass over the output);
        with one, tiles finish in any order and a second pass writes the final labels. A run
        started without a client is resumed without one.
    progress : bool, optional
        Show progress bars; default: only on a terminal.
    table : bool or path
        Also compute an object table (voxel count, bounding box, centroid per label). True
        writes ``<output>.objects.csv`` (or Parquet for a ``.parquet`` path).
    retries : int
        How many times a tile whose fn raised is tried again before it counts as failed.
    work_dir : path, optional
        Where the run keeps its state; default ``<output>.blockbuster-work`` next to the output.
    keep_work : bool
        Keep the work directory after success (for debugging).
    mask : path or array, optional
        Foreground (tissue) mask at any resolution with the image's spatial axes, e.g. a
        thresholded low-resolution level. Tiles with no foreground under their core are written
        as background without calling ``fn``.
    skip_empty : bool
        Also skip tiles whose input is constant (e.g. zero padding around a light-sheet volume).
    ome : bool, optional
        Write an OME-Zarr label image (multiscale pyramid + NGFF ``image-label`` metadata) that
        napari and other OME-Zarr readers open. Default: yes for OME-Zarr input (the labels go
        into the image, at ``<image>/labels/<label_name>``, unless ``output`` is given) and for
        an output path ending in ``.ome.zarr``; a plain zarr array otherwise.
    label_name : str
        Name of the label image inside an OME-Zarr image.

    Returns
    -------
    zarr.Array
        The labels, consecutive 1..N, chunked on the tile cores; uint32 (with a client: uint64
        beyond 4 billion objects).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage
    >>> mask = np.zeros((6, 6), np.uint8); mask[1:5, 2] = 1; mask[1, 2:5] = 1
    >>> label = lambda tile: ndimage.label(tile)[0]
    >>> out = tile_process(mask, label, tile_shape=(3, 3), stitch="faces")
    >>> int(out[:].max())  # one object although it crosses four tiles
    1
    """
    source = open_image(image, channel_axis)
    mask_source = _open_mask(mask, source)
    fn = _resolve_fn(fn, source.channel_axis)
    info = describe_segmenter(fn)
    if overlap is None:
        overlap = info.preferred_overlap or 0
    overlap_t = normalize_overlap(overlap, len(source.spatial_shape))
    if not 0.0 <= iou_threshold < 1.0:
        raise InputError(f"iou_threshold={iou_threshold} must be in [0, 1)")
    if retries < 0:
        raise InputError(f"retries={retries} must be >= 0")
    if isinstance(memory, str):
        from dask.utils import parse_bytes

        memory = parse_bytes(memory)
    client = active_client(client)
    target = resolve_output(output, source, work_dir, ome, label_name)
    chunks = _previous_tiles(target, tile_shape) if resume else None
    if chunks is None:
        chunks = _resolve_tile_shape(tile_shape, source, overlap_t, info, use_gpu, memory)
    grid = _plan_grid(source.spatial_shape, chunks, overlap_t)
    mode = _resolve_stitch(stitch, info, grid)
    stitching.check_mode(mode, grid.depth, connectivity, grid.ndim)
    manifest = _manifest(source, info, grid, mode, connectivity, iou_threshold, table,
                         mask_source, skip_empty)
    manifest["engine"] = "serial" if client is None else "distributed"
    manifest["output"] = target.describe()
    work = WorkDir(target.work_path)
    _check_locations(target, work, [source.path, mask_source.path if mask_source else None])
    locks = [lock for lock in (target.lock(), work.lock) if lock is not None]
    try:
        done = _prepare_work(target, work, manifest, overwrite=overwrite, resume=resume,
                             locks=locks)
        if done is not None:
            return done
        ctx = RunContext(source, fn, fn_name(fn), grid, mode, work.path, bool(table), retries,
                         mask=mask_source, skip_empty=skip_empty, connectivity=connectivity,
                         iou_threshold=iou_threshold)
        engine = _engine_of(work, client)
        return _run(ctx, info, target, work, manifest, engine=engine, client=client,
                    progress=progress, table=table, keep_work=keep_work)
    finally:
        for lock in reversed(locks):
            lock.release()
        work.release_lock()  # removes the work directory when nothing is left in it


def _previous_tiles(target: OutputTarget, tile_shape: Any) -> tuple[tuple[int, ...], ...] | None:
    """On resume, "auto" and callable sizing reuse the tiles the run started with.

    Free memory differs from one start to the next, so sizing again would pick other tiles and
    the resume would be refused for a difference the user never asked for.
    """
    if not (isinstance(tile_shape, str) or callable(tile_shape)):
        return None
    params = None
    work = WorkDir(target.work_path)
    if work.exists():
        params = work.read_manifest()["params"]
    elif target.exists():
        params = (completion(target.open()) or {}).get("params")
    if not params or "tile_chunks" not in params:
        return None
    log.info("resuming with the run's tile shape (tile_shape=%r is not sized again)", tile_shape)
    return tuple(tuple(c) for c in params["tile_chunks"])


def _engine_of(work: WorkDir, client: Any) -> str:
    """The engine a run started with; a resumed run keeps it (its tiles are stored its way)."""
    engine = work.read_manifest().get("engine", "distributed")  # older runs: two-pass only
    if engine == "serial" and client is not None:
        raise ResumeMismatchError(
            f"the run in {work.path} started without a dask client: its finished tiles are "
            "already in the output with their final labels, which only the serial engine can "
            "continue. Resume it without client=, or pass overwrite=True to start again on the "
            "cluster")
    return engine


def _open_mask(mask: Any, source: ImageSource) -> ImageSource | None:
    if mask is None:
        return None
    mask_source = open_image(mask)
    if mask_source.ndim != len(source.spatial_shape):
        raise InputError(f"mask of shape {mask_source.shape} must have the image's "
                         f"{len(source.spatial_shape)} spatial axes (image {source.spatial_shape})")
    return mask_source


def _manifest(source: ImageSource, info: SegmenterInfo, grid: TileGrid, mode: str,
              connectivity: int, iou_threshold: float, table: Any, mask: ImageSource | None,
              skip_empty: bool) -> dict[str, Any]:
    """The parameters that define the result: a resumed run must have the same."""
    params = {
        "input": str(source.path.resolve()) if source.path else f"<in-memory {source.kind}>",
        "shape": list(source.shape),
        "dtype": source.dtype.str,
        "channel_axis": source.channel_axis,
        "segmenter": info.identity,
        "tile_chunks": [list(c) for c in grid.chunks],
        "depth": list(grid.depth),
        "stitch": mode,
        "connectivity": connectivity if mode == "faces" else None,
        "iou_threshold": iou_threshold if mode == "iou" else None,
        "table": bool(table),
        "mask": None if mask is None else (str(mask.path) if mask.path else f"<in-memory {mask.shape}>"),
        "skip_empty": bool(skip_empty),
    }
    return {"format": FORMAT_VERSION, "params": params}


def _prepare_work(target: OutputTarget, work: WorkDir, manifest: dict[str, Any], *,
                  overwrite: bool, resume: bool, locks: list[Any]) -> zarr.Array | None:
    """Decide between a fresh run, a resumed one, or refusing; take the locks.

    Returns the existing output when it is already complete with the same parameters. A
    refused run leaves nothing behind (the locks are released by the caller).
    """
    for lock in locks:
        lock.acquire()
    if work.exists() and not overwrite:
        if not resume:
            raise OutputExistsError(
                f"an unfinished run left {work.path}; pass resume=True to continue it, or "
                "overwrite=True to start again")
        work.check_same_run(manifest)
        finished = _complete_output(target, manifest)
        if finished is not None:
            work.remove()
        # else the output is this run's own unfinished one, or a stale one that an
        # overwrite=True run (the one being resumed) had not replaced yet: the run goes on
        return finished
    if target.exists() and not overwrite:
        existing = completion(target.open())
        if resume and existing and existing.get("complete"):
            check_same_params(existing.get("params", {}), manifest["params"], target.describe())
            return target.open()
        raise OutputExistsError(
            f"output {target.describe()} already exists; pass overwrite=True to "
            "replace it (or choose another output)")
    if overwrite:
        # The old labels go first: a run stopped before its first tile must not leave them
        # looking like the result of the new arguments.
        target.remove()
        work.clear()
    work.create(manifest)
    return None


def _complete_output(target: OutputTarget, manifest: dict[str, Any]) -> zarr.Array | None:
    """The output, when it is complete and was made with exactly these parameters."""
    if not target.exists():
        return None
    out = target.open()
    meta = completion(out) or {}
    return out if meta.get("complete") and meta.get("params") == manifest["params"] else None


def _check_locations(target: OutputTarget, work: WorkDir, inputs: list[Path | None]) -> None:
    """Refuse, before anything is written, an output or work directory that is not safe."""
    work.check_usable()
    # A run's own unfinished output may have lost its metadata (deleted during the run, then
    # partly written again); its work directory names it, which proves it is ours to replace.
    claimed = work.exists() and work.read_manifest().get("output") == target.describe()
    target.check_location(inputs, claimed=claimed)
    paths = [p for p in (*inputs, target.path) if p is not None]
    w = work.path.resolve()
    for path in paths:
        p = Path(path).resolve()
        if w == p or w.is_relative_to(p) or p.is_relative_to(w):
            raise InputError(f"the work directory {work.path} would be inside, or hold, {path}; "
                             "pass a work_dir outside the input and the output")


def _run(ctx: RunContext, info: SegmenterInfo, target: OutputTarget, work: WorkDir,
         manifest: dict[str, Any], *, engine: str, client: Any, progress: bool | None,
         table: Any, keep_work: bool) -> zarr.Array:
    grid, mode = ctx.grid, ctx.mode
    _log_plan(ctx.source, info, grid, mode)
    if isinstance(ctx.fn, Segmenter):
        ctx.fn.prepare(ctx.source)
    if engine == "serial":
        ctx.output = _open_serial_output(target, work, grid, manifest)
        ctx.book = _replay_book(work, grid)
    elif not work.raw_path.exists():  # local ids fit uint32 unless a tile has 2**32 voxels
        padded_voxels = math.prod(t + 2 * d for t, d in zip(grid.tile_shape, grid.depth))
        work.create_raw(grid.shape, grid.tile_shape,
                        np.uint32 if padded_voxels < 2**32 else np.uint64)
    _segment_all(ctx, work, client, progress)
    if engine == "serial":
        stitched = _finish_serial(ctx, target, work, progress, keep_map=bool(table))
        out = ctx.output
    else:
        stitched = _stitch(grid, mode, work, ctx.connectivity, ctx.iou_threshold, client,
                           progress)
        out = _write_output(target, grid, work, stitched, manifest, client, progress)
    verify_output(target, grid, manifest, stitched.has_labels)
    if table:
        from .table import write_object_table

        write_object_table(work, grid, stitched, _table_path(table, target))
    mark_complete(out, manifest, stitched.n_labels,
                  table=str(_table_path(table, target)) if table else None)
    if not keep_work:
        work.remove()
    log.info("wrote %d objects to %s", stitched.n_labels, target.describe())
    return out


def _log_plan(source: ImageSource, info: SegmenterInfo, grid: TileGrid, mode: str) -> None:
    from .sizing import format_bytes, predict_peak_bytes

    peak = predict_peak_bytes(grid.tile_shape, source.dtype, overlap=grid.depth,
                              channels=source.n_channels, memory_model=info.memory_model,
                              image_shape=source.spatial_shape)
    log.info("tile shape %s, overlap %s, %d tile%s, stitch=%s, predicted peak memory %s",
             grid.tile_shape, grid.depth, grid.n_tiles, "" if grid.n_tiles == 1 else "s", mode,
             format_bytes(peak))


def _segment_pipelined(ctx: RunContext, todo: list[int], bar: Any,
                       watch: Callable[[TileOutcome], None]) -> None:
    """The serial path, pipelined: fn runs one tile at a time, in grid order, on this thread,
    while a reader thread fetches the next tile and a writer thread stores the previous one.

    Reading (decompression, file I/O) and storing (numbering, compression) mostly release the
    GIL, and so does a GPU or a well-behaved fn, so the engine's own work hides behind fn's.
    At most one tile is read ahead and one is being stored: memory stays near one tile.
    """
    from concurrent.futures import ThreadPoolExecutor

    def finish(outcome: TileOutcome) -> None:
        watch(outcome)
        bar.update()

    with ThreadPoolExecutor(1, thread_name_prefix="blockbuster-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="blockbuster-store") as writer:
        ahead = reader.submit(read_tile, ctx, todo[0])
        storing = None
        for i, tile_id in enumerate(todo):
            tile, data = ahead.result()
            ahead = reader.submit(read_tile, ctx, todo[i + 1]) if i + 1 < len(todo) else None
            skip = data is None
            result, error = (None, None) if skip else _call_with_retries(ctx, tile, data)
            del data
            if storing is not None:
                finish(storing.result())  # in order; re-raises what the writer raised
                storing = None
            if error is not None:  # cheap to record, and fail-fast must see it before next fn
                finish(store_tile(ctx, tile, None, error))
                continue
            storing = (writer.submit(_skip, ctx, tile_id) if skip
                       else writer.submit(store_tile, ctx, tile, result, None))
            del result
        if storing is not None:
            finish(storing.result())


def _segment_all(ctx: RunContext, work: WorkDir, client: Any, progress: bool | None) -> None:
    done = work.done_tiles()
    todo = [t for t in range(ctx.grid.n_tiles) if t not in done]
    if done:
        log.info("resuming: %d of %d tiles already done", len(done), ctx.grid.n_tiles)
    failures: list[TileError] = []
    succeeded = [0]
    bar = make_progress(ctx.grid.n_tiles, "segmenting", progress, initial=len(done))

    def watch(outcome: TileOutcome) -> None:
        if outcome.skipped:
            bar.skip()
        if outcome.error is None:
            succeeded[0] += 1
            return
        failures.append(outcome.error)
        if succeeded[0] == 0 and len(failures) >= FAIL_FAST_AFTER:
            raise _failures(failures, stopped_early=True)

    with bar:
        if client is None and todo:
            _segment_pipelined(ctx, todo, bar, watch)
        else:
            run_tasks(segment_tile, todo, ctx, client=client, progress=bar, name="segment",
                      on_result=watch)
    if failures:
        raise _failures(failures, stopped_early=False)


def _failures(failures: list[TileError], stopped_early: bool) -> TileFailures:
    listed = "\n".join(f"  - {e}" for e in failures[:10])
    more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
    head = (f"stopped after the first {len(failures)} tiles all failed" if stopped_early
            else f"{len(failures)} tile(s) failed; the other tiles are kept")
    tail = ("\nThe output is incomplete. Fix the cause and rerun with resume=True: only the "
            "unfinished tiles run again.")
    if failures[0].traceback_text:
        tail += f"\nTraceback of the first failure:\n{failures[0].traceback_text}"
    err = TileFailures(f"{head}:\n{listed}{more}{tail}", failures)
    err.__cause__ = failures[0].__cause__
    return err


def _open_serial_output(target: OutputTarget, work: WorkDir, grid: TileGrid,
                        manifest: dict[str, Any]) -> zarr.Array:
    """The output the serial engine writes into: this run's own, or a new one."""
    if target.exists():
        meta = completion(target.open()) or {}
        if meta.get("params") == manifest["params"] and not meta.get("complete"):
            return target.open("r+")
    if work.done_tiles():  # their labels were in an output that is gone: do them again
        log.warning("the output of the unfinished run in %s is missing; its tiles run again",
                    work.path)
        work.clear_tiles()
    attrs = {"blockbuster": {"complete": False, "params": manifest["params"]}}
    # uint32 from the start: labels are written as tiles arrive (LabelBook refuses to overflow)
    return target.create(grid.shape, grid.tile_shape, np.dtype(np.uint32), attrs)


def _replay_book(work: WorkDir, grid: TileGrid) -> stitching.LabelBook:
    """The labels handed out so far, rebuilt from the records of finished tiles (on resume)."""
    book = stitching.LabelBook()
    for t in sorted(work.done_tiles()):
        rec = work.load_record(t)
        book.replay(rec.get("glabels"), rec.get("merges"))
    return book


def _finish_serial(ctx: RunContext, target: OutputTarget, work: WorkDir,
                   progress: bool | None, keep_map: bool) -> stitching.Stitched:
    """Rewrite the tiles whose labels changed after they were written; finalize the output.

    Returns the final labelling of every tile's local labels (``final`` only with ``keep_map``,
    for the object table).
    """
    grid, book = ctx.grid, ctx.book
    old, new = book.final_changes()
    n_local = np.zeros(grid.n_tiles, np.int64)
    has_labels = np.zeros(grid.n_tiles, bool)
    finals, todo = [], []
    for t in range(grid.n_tiles):
        rec = work.load_record(t)
        n_local[t] = rec.meta["n"]
        has_labels[t] = bool(rec.get("counts")[1:].any())
        glabels = rec.get("glabels")
        final = stitching.apply_changes(glabels, old, new)
        changed = final != glabels
        if changed.any():
            order = np.argsort(glabels[changed])
            todo.append((t, glabels[changed][order], final[changed][order]))
        if keep_map:
            finals.append(final)
    log.info("%d objects; %d tile(s) hold labels joined or moved after they were written",
             book.n_labels, len(todo))
    fctx = FixContext(grid, work.path, ctx.output)
    with make_progress(len(todo), "merging", progress) as bar:
        run_tasks(fix_tile, todo, fctx, progress=bar, name="fix", threads=_io_threads(grid))
    target.finalize()
    offsets = np.concatenate([[0], np.cumsum(n_local + 1)[:-1]])
    final_map = np.concatenate(finals) if keep_map else np.zeros(0, np.int64)
    return stitching.Stitched(offsets, final_map, book.n_labels, n_local, has_labels)


def _stitch(grid: TileGrid, mode: str, work: WorkDir, connectivity: int, iou_threshold: float,
            client: Any, progress: bool | None) -> stitching.Stitched:
    n_local = np.zeros(grid.n_tiles, np.int64)
    counts = []
    for t in range(grid.n_tiles):
        rec = work.load_record(t)
        n_local[t] = rec.meta["n"]
        counts.append(rec.get("counts"))
    has_labels = np.array([c[1:].any() for c in counts], bool)
    offsets = np.concatenate([[0], np.cumsum(n_local + 1)[:-1]])
    has_core = np.concatenate(counts) > 0
    has_core[offsets] = False  # each tile's local 0 is background
    sctx = StitchContext(grid, mode, work.path, connectivity, iou_threshold)
    edges_a, edges_b = [], []
    if mode != "none" and grid.n_tiles > 1:
        with make_progress(grid.n_tiles, "stitching", progress) as bar:
            for tile_id, found in run_tasks(match_tile, list(range(grid.n_tiles)), sctx,
                                            client=client, progress=bar, name="stitch",
                                            threads=_io_threads(grid),
                                            batches_per_thread=BATCHES_PER_THREAD):
                for other, la, lb in found:
                    edges_a.append(offsets[tile_id] + la)
                    edges_b.append(offsets[other] + lb)
    ea = np.concatenate(edges_a) if edges_a else np.empty(0, np.int64)
    eb = np.concatenate(edges_b) if edges_b else np.empty(0, np.int64)
    stitched = stitching.solve_labels(n_local, has_core, ea, eb)
    stitched.has_labels = has_labels
    work.save_final_map(stitched.final)
    return stitched


def _write_output(target: OutputTarget, grid: TileGrid, work: WorkDir,
                  stitched: stitching.Stitched, manifest: dict[str, Any], client: Any,
                  progress: bool | None) -> zarr.Array:
    attrs = {"blockbuster": {"complete": False, "params": manifest["params"]}}
    out = target.create(grid.shape, grid.tile_shape, stitched.dtype, attrs)
    n_local = stitched.n_local
    todo = [t for t in range(grid.n_tiles) if n_local[t] > 0]
    rctx = RelabelContext(grid, work.path, out, stitched.offsets, n_local)
    with make_progress(len(todo), "writing", progress) as bar:
        run_tasks(relabel_tile, todo, rctx, client=client, progress=bar, name="relabel",
                  threads=_io_threads(grid), batches_per_thread=BATCHES_PER_THREAD)
    target.finalize()
    return out


def _table_path(table: Any, target: OutputTarget) -> Path:
    if isinstance(table, (str, Path)) and not isinstance(table, bool):
        return Path(table)
    if target.is_ome and not target.ome_standalone:  # next to the image, not inside it
        base = target.ome_image.with_name(f"{target.ome_image.name}.{target.ome_name}")
    elif target.path is not None:
        base = target.path
    else:
        base = target.work_path.parent / "labels"
    return base.with_name(base.name + ".objects.csv")
