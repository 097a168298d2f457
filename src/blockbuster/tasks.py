"""The work on one tile: read its padded region, call ``fn``, check and number the result.

These functions run wherever the tile runs (this process, a thread, a dask worker) and know
nothing of the run loop: they turn a tile id into a :class:`SegmentedTile` (labels numbered
1..n, the record stitching needs, object statistics), or an error that names the tile.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .engine.state import EntryRef, worker_writer
from .errors import BlockbusterError, InputReadError, TileError
from .io import ImageSource
from .seams import control_stats
from .stitching import Stitcher, TileBoundary, core_counts, sequential_local_labels
from .tiling import Tile, TileGrid

__all__ = ["OOM_BACKOFF_S", "OOM_RETRIES", "Handoff", "SegmentedTile", "TaskContext", "call_fn",
           "free_gpu_memory", "image_core", "is_out_of_memory", "read_tile", "segment_tile",
           "summarize"]

log = logging.getLogger("blockbuster")

#: A tile whose fn ran out of GPU memory is tried again up to this many times, after a pause
#: that starts at OOM_BACKOFF_S seconds and doubles, before the error counts as a failure
#: (on a shared GPU, other processes finish their work and free memory meanwhile).
OOM_RETRIES = 3
OOM_BACKOFF_S = 5.0


@dataclass
class TaskContext:
    """Everything a tile task needs; pickled once per run and shipped to workers."""

    source: ImageSource
    fn: Callable[[np.ndarray], Any]
    fn_label: str
    grid: TileGrid
    stitcher: Stitcher
    work_path: Path
    attempt: int
    table: bool = False
    retries: int = 1
    mask: ImageSource | None = None
    skip_empty: bool = False
    #: also measure intensities per object (the table needs ``table``)
    measure: bool = False
    #: seconds one call of fn may take before the attempt counts as failed (None: no limit)
    timeout: float | None = None


@dataclass
class SegmentedTile:
    """One tile after ``fn``: its numbered labels (or where they are kept) and its record."""

    tile_id: int
    n: int = 0
    boundary: TileBoundary | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    #: the core's labels with tile-local ids 1..n, while they are held in memory
    labels: np.ndarray | None = None
    #: where the core's labels were saved instead (a worker's pack file)
    raw: EntryRef | None = None
    skipped: bool = False
    error: TileError | None = None
    #: the control planes' figures of the seam report (:func:`blockbuster.seams.control_stats`)
    control: np.ndarray | None = None

    def record_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the tile's ``seg`` entry."""
        if self.boundary is None:
            return {"counts": np.zeros(1, np.int64)}
        arrays = {"counts": self.boundary.counts}
        arrays.update({f"b:{k}": v for k, v in self.boundary.arrays.items()})
        arrays.update({f"s:{k}": v for k, v in self.stats.items()})
        if self.control is not None:
            arrays["q:control"] = self.control
        return arrays

    @property
    def has_labels(self) -> bool:
        """Whether the tile's core holds any object."""
        return self.boundary is not None and bool(self.boundary.counts[1:].any())


def segment_tile(ctx: TaskContext, tile_id: int, keep_labels: bool = True) -> SegmentedTile:
    """Read, segment, check and number one tile.

    With ``keep_labels=False`` (a worker process) the core's labels are saved to this process's
    pack file in the work directory and only their place is returned.
    """
    try:
        tile, data = read_tile(ctx, tile_id)
    except TileError as unreadable:  # its input cannot be read: a failed tile, like a failed fn
        return SegmentedTile(tile_id, error=unreadable)
    if data is None:
        return SegmentedTile(tile_id, skipped=True)
    intensities = image_core(ctx, tile, data)
    result, error = call_fn(ctx, tile, data)
    del data
    if error is not None:
        return SegmentedTile(tile_id, error=error)
    handoff = Handoff(result)
    del result
    seg = summarize(ctx, tile, handoff, intensities)
    if not keep_labels and seg.labels is not None:
        writer = worker_writer(ctx.work_path, ctx.attempt)
        seg.raw = writer.append("raw", tile_id, {}, {"labels": seg.labels})
        seg.labels = None
    return seg


def read_tile(ctx: TaskContext, tile_id: int) -> tuple[Tile, np.ndarray | None]:
    """The tile and its padded input; None for a tile to skip (no tissue, or constant).

    The array is the tile's own: ``fn`` may change it in place without touching the image
    (an in-memory input is copied, not viewed).
    """
    tile = ctx.grid.tile(tile_id)
    for attempt in range(ctx.retries + 1):
        try:
            if ctx.mask is not None and not _has_foreground(ctx.mask, tile, ctx.grid):
                return tile, None
            data = ctx.source.read(tile.padded)
            break
        except InputReadError as exc:
            if attempt == ctx.retries:
                raise _unreadable(ctx, tile, exc, attempt + 1) from exc
    if ctx.grid.unlinked_axes:  # one time point: segmenters see space (and channels) only
        data = np.squeeze(data, axis=_time_positions(ctx))
    if not data.flags.owndata or not data.flags.writeable:
        data = data.copy()  # a view of the caller's array (NumPy, memmap, dask on NumPy)
    if ctx.skip_empty and data.size and data.min() == data.max():
        return tile, None
    return tile, data


def _unreadable(ctx: TaskContext, tile: Tile, exc: InputReadError, attempts: int) -> TileError:
    """The error of a tile whose input (or mask) cannot be read: the tile fails, not the run."""
    return TileError(f"the input of {tile.describe()} cannot be read after {attempts} "
                     f"attempt(s): {exc}", tile_index=tile.index, region=tile.padded,
                     fn_name=ctx.fn_label, tb=traceback.format_exc())


def _time_positions(ctx: TaskContext) -> tuple[int, ...]:
    """Where the (one-point) time axis is in the arrays the source reads."""
    channel = ctx.source.tile_channel_axis
    return tuple(p + (1 if channel is not None and channel <= p else 0)
                 for p in ctx.grid.unlinked_axes)


def _has_foreground(mask: ImageSource, tile: Tile, grid: TileGrid) -> bool:
    """Whether the mask (at any resolution) has foreground under the tile's core."""
    region = []
    linked = grid.linked_axes
    core_region = [tile.core[a] for a in linked]
    shape = [grid.shape[a] for a in linked]
    for core, full, small in zip(core_region, shape, mask.spatial_shape, strict=True):
        scale = small / full
        lo = min(math.floor(core.start * scale), small - 1)
        hi = max(math.ceil(core.stop * scale), lo + 1)
        region.append(slice(lo, hi))
    return bool(np.any(mask.read(tuple(region))))


def call_fn(ctx: TaskContext, tile: Tile, data: np.ndarray) -> tuple[Any, TileError | None]:
    """``fn(data)``, tried ``1 + retries`` times; the error names the tile when all fail.

    An attempt fails when fn raises, or when it has not returned after ``ctx.timeout``
    seconds. An attempt that ran out of GPU memory does not count yet: the framework's cache
    is freed and it is tried again after a pause, up to :data:`OOM_RETRIES` times.

    The result is the caller's own: an array that ``fn`` may write again on its next call (a
    reused buffer, a view of one) is copied, so the tile being stored is never overwritten.
    """
    error = None
    attempt = oom_retries = 0
    while attempt <= ctx.retries:
        try:
            return _owned(_call_within_limit(ctx, tile, data)), None
        except BlockbusterError:
            raise  # a configuration problem (no GPU, missing extra...): fails every tile alike
        except Exception as exc:  # noqa: BLE001 -- the user's fn may raise anything
            if oom_retries < OOM_RETRIES and is_out_of_memory(exc):
                _back_off_after_oom(ctx, tile, exc, oom_retries)
                oom_retries += 1
                continue
            attempt += 1
            error = TileError(
                f"{ctx.fn_label} failed on {tile.describe()} after {attempt} attempt(s): "
                f"{type(exc).__name__}: {exc}",
                tile_index=tile.index, region=tile.padded, fn_name=ctx.fn_label,
                tb=traceback.format_exc(),
            )
            error.__cause__ = exc
    return None, error


class TileTimeoutError(TimeoutError):
    """fn did not return a tile's labels within the time limit (``timeout=``)."""


def _call_within_limit(ctx: TaskContext, tile: Tile, data: np.ndarray) -> Any:
    """``ctx.fn(data)``; with a time limit, on a helper thread that is abandoned if it hangs.

    Python cannot stop a thread: a call that overruns keeps running in the background (holding
    its memory, and the GPU if it uses one) until it returns by itself; its result is then
    dropped. The thread is a daemon, so it never keeps the process from exiting.
    """
    if ctx.timeout is None:
        return ctx.fn(data)
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = ctx.fn(data)
        except BaseException as exc:  # noqa: BLE001 -- handed to the waiting thread as it is
            outcome["error"] = exc
        finally:
            finished.set()

    thread = threading.Thread(target=run, daemon=True, name=f"blockbuster-fn-{tile.id}")
    thread.start()
    if not finished.wait(ctx.timeout):
        raise TileTimeoutError(
            f"no result within the time limit of {ctx.timeout:g} s (the call goes on in the "
            "background until it returns; its result will be dropped)")
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome.pop("result")


#: Words of out-of-memory errors of GPU frameworks that do not raise a type of their own
#: (or wrap it): PyTorch/CUDA, cuBLAS/cuDNN, TensorFlow, Apple MPS.
_OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "cudaErrorMemoryAllocation",
                 "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "OOM when allocating", "MPS backend out of memory")
#: Exception types of GPU frameworks that mean "out of memory", by name (never imported here):
#: torch.cuda.OutOfMemoryError, TensorFlow's ResourceExhaustedError, JAX's XlaRuntimeError
#: says RESOURCE_EXHAUSTED in its message.
_OOM_TYPES = ("OutOfMemoryError", "ResourceExhaustedError")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a GPU out-of-memory error.

    Examples
    --------
    >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> is_out_of_memory(ValueError("bad tile")), is_out_of_memory(MemoryError())
    (False, False)
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _OOM_TYPES:
            return True
        text = str(current)
        if any(words in text for words in _OOM_MESSAGES) or (
                "RESOURCE_EXHAUSTED" in text and "memory" in text.lower()):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_gpu_memory() -> list[str]:
    """Free what the GPU frameworks loaded in this process cache; returns what was freed.

    PyTorch returns its cached blocks to the driver (``torch.cuda.empty_cache``). TensorFlow
    has no such call: it keeps its memory pool, and only the garbage collection helps.
    Nothing is imported: a framework that is not loaded holds no GPU memory.
    """
    gc.collect()  # tensors of the failed call that only reference cycles still hold
    freed: list[str] = []
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            cuda.empty_cache()
            freed.append("torch's CUDA cache")
        mps = getattr(torch, "mps", None)
        mps_backend = getattr(getattr(torch, "backends", None), "mps", None)
        if mps is not None and mps_backend is not None and mps_backend.is_available():
            mps.empty_cache()
            freed.append("torch's MPS cache")
    except Exception as exc:  # noqa: BLE001 -- freeing is a courtesy; the retry tells
        log.debug("freeing the GPU cache failed: %s", exc)
    return freed


def _back_off_after_oom(ctx: TaskContext, tile: Tile, exc: BaseException, retry: int) -> None:
    """Free the framework's cache and wait before the same tile is tried again."""
    wait = OOM_BACKOFF_S * 2**retry
    freed = free_gpu_memory()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = f"freed {' and '.join(freed)}" if freed else "collected garbage (no GPU cache loaded)"
    log.warning("%s ran out of GPU memory on %s (%s: %s); %s, trying again in %g s (%d of %d)",
                ctx.fn_label, tile.describe(), type(exc).__name__, first[:200], what, wait,
                retry + 1, OOM_RETRIES)
    time.sleep(wait)


def _owned(result: Any) -> Any:
    """``result``, or a copy of it when ``fn`` may still hold and write its memory."""
    if isinstance(result, np.ndarray) and (
            not result.flags.owndata or sys.getrefcount(result) > _FRESH_REFCOUNT):
        return result.copy()
    return result


def _refcount_of_fresh(result: Any) -> int:
    """What :func:`_owned` counts for an array that nothing else holds (same call depth)."""
    return sys.getrefcount(result)


_FRESH_REFCOUNT = _refcount_of_fresh(np.zeros(1))


def check_result(ctx: TaskContext, tile: Tile, result: Any) -> np.ndarray:
    """The fn's result must be a non-negative integer label image of the tile's spatial shape."""

    def fail(problem: str) -> TileError:
        return TileError(f"{ctx.fn_label} returned {problem} for {tile.describe()}",
                         tile_index=tile.index, region=tile.padded, fn_name=ctx.fn_label)

    if result is None:
        raise fail("None instead of a label image")
    if isinstance(result, tuple):
        raise fail(f"a tuple of {len(result)} items instead of a label image (scipy.ndimage.label "
                   "returns (labels, count): use its first item)")
    try:
        labels = np.asarray(result)
    except Exception as exc:
        raise fail(f"a {type(result).__name__} that is not an array ({exc})") from exc
    expected = tuple(n for a, n in enumerate(tile.padded_shape)
                     if a not in ctx.grid.unlinked_axes)
    if labels.shape != expected:
        raise fail(f"an array of shape {labels.shape}; expected the tile's spatial shape "
                   f"{expected}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise fail(f"dtype {labels.dtype}; labels must be integers (0 = background). If this is "
                   "a mask, label it first, e.g. with scipy.ndimage.label")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise fail("negative labels; labels must be >= 0 (0 = background)")
    return labels.reshape(tile.padded_shape)  # the time point's axis back (length 1)


class Handoff:
    """The only reference to a large value, given up by the one who takes it: a value passed
    as an argument stays alive until the call returns, one taken from a handoff does not."""

    __slots__ = ("_value",)

    def __init__(self, value: Any):
        self._value = value

    def take(self) -> Any:
        value, self._value = self._value, None
        return value


def summarize(ctx: TaskContext, tile: Tile, result: Any,
              image_core: np.ndarray | None = None) -> SegmentedTile:
    """Check fn's result, number its objects 1..n and build the tile's record.

    ``result``: fn's result, or a :class:`Handoff` holding it, which summarize empties so that
    the padded result is freed once numbered, before the record is built and stored.
    ``image_core``: the input's core (see :func:`image_core`) for intensity measurements.
    """
    if isinstance(result, Handoff):
        result = result.take()
    labels = check_result(ctx, tile, result)
    stitcher = ctx.stitcher
    if stitcher.numbers_padded:  # halo objects are kept for matching: number the padded tile
        local, n, padded_counts = sequential_local_labels(labels)
        core = local[tile.inner]
        counts = core_counts(local, tile.inner, padded_counts)
        arrays = stitcher.boundary_arrays(tile, local)
    else:
        core, n, counts = sequential_local_labels(labels[tile.inner])
        arrays = stitcher.boundary_arrays(tile, core)
    del labels, result
    control = control_stats(core, ctx.grid.linked_axes, stitcher.iou_threshold, tile.id) \
        if stitcher.offsets() else None
    stats: dict[str, np.ndarray] = {}
    if ctx.table and stitcher.whole_objects:
        # stitch="whole": an object the tile keeps is written whole from its padded prediction,
        # so it is measured whole here (``image_core`` is then the padded region's intensities)
        from .measurements import tile_measurements

        stats = tile_measurements(local, n, image_core, origin=[s.start for s in tile.padded],
                                  channel_axis=None if image_core is None else -1)
        stats["whole_counts"] = stats.pop("counts")
    elif ctx.table:
        from .measurements import tile_measurements

        stats = tile_measurements(core, n, image_core, origin=[s.start for s in tile.core],
                                  channel_axis=None if image_core is None else -1)
        del stats["counts"]  # the record's own counts
    return SegmentedTile(tile.id, n, TileBoundary(counts, arrays), stats, labels=core,
                         control=control)


def image_core(ctx: TaskContext, tile: Tile, data: np.ndarray) -> np.ndarray | None:
    """The tile's core of the input, channels last, for intensity measurements (a copy: fn
    may change its tile); its whole padded region with ``stitch="whole"``."""
    if not ctx.measure:
        return None
    whole = ctx.stitcher.whole_objects
    index: list[Any] = [slice(None) if whole else tile.inner[a] for a in ctx.grid.linked_axes]
    channel = ctx.source.segment_channel_axis
    if channel is not None:
        index.insert(channel, slice(None))
    core = np.array(data[tuple(index)], copy=True)
    core = np.moveaxis(core, channel, -1) if channel is not None else core[..., None]
    for axis in ctx.grid.unlinked_axes:  # the time point's axis, as the labels have it
        core = np.expand_dims(core, axis)
    return core
