"""Who runs the tiles: this process, a pool of threads, or a dask.distributed cluster.

An executor only decides where :func:`~blockbuster.tasks.segment_tile` runs and hands every
finished tile to the run's :class:`~blockbuster.engine.commit.Committer`, which alone decides
the labels. So every executor gives the same labels, and a run started on one can be resumed
on another.

* :class:`InProcess` (default): one tile at a time, in grid order, in this process (one model,
  one GPU, easy to debug); a reader thread fetches the next tile and a store thread stores the
  last one while ``fn`` runs.
* :class:`ThreadPool`: a ``concurrent.futures.Executor`` of this process (``fn`` must be
  thread-safe, e.g. a GIL-releasing function); tiles finish in any order.
* :class:`Dask`: a ``distributed.Client``; every tile is a task, a worker keeps the labels of
  the tiles it segmented in its own pack file, and the cores are written by tasks too, on the
  workers. dask reruns the tasks of a worker that dies.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from ..errors import TileError
from ..progress import Progress
from ..tasks import (
    Handoff,
    SegmentedTile,
    TaskContext,
    call_fn,
    image_core,
    read_tile,
    segment_tile,
    summarize,
)
from .commit import Committer, WriteJob, write_jobs

__all__ = ["Dask", "Executor", "InProcess", "ThreadPool", "executor_for"]

log = logging.getLogger("blockbuster")

#: Write tasks go in batches of about this many per worker thread and round (on a cluster,
#: each task costs the scheduler and this process a few milliseconds).
WRITE_BATCHES_PER_THREAD = 4


class Executor(ABC):
    """Runs the segment tasks of a run and feeds their results to the committer."""

    #: Whether tiles keep their labels where they ran (workers), written by remote tasks.
    remote_writes = False
    name = "executor"

    @abstractmethod
    def run(self, ctx: TaskContext, todo: Sequence[int], committer: Committer,
            progress: Progress) -> None:
        """Segment every tile of ``todo`` and hand each to ``committer.accept``."""


def _hand_over(committer: Committer, progress: Progress, seg: SegmentedTile) -> list[WriteJob]:
    """Give a finished tile to the committer and count it (a failure before the committer
    sees it: stopping early after the first failures must still count them)."""
    if seg.error is not None:
        progress.fail()
        progress.update()
        return committer.accept(seg)
    jobs = committer.accept(seg)
    if seg.skipped:
        progress.skip()
    progress.update()
    return jobs


class InProcess(Executor):
    """One tile at a time, in grid order, in this process, read ahead and stored behind.

    ``fn`` runs on the calling thread. Reading (decompression, file I/O) and storing
    (numbering, compression) mostly release the GIL, and so does a GPU or a well-behaved fn, so
    the engine's own work hides behind fn's. At most one tile is read ahead and one is being
    stored: memory stays near one tile. Under a memory budget that one tile fills
    (``pipelined=False``, see :meth:`RunPlan.second_tile_fits`), tiles go one at a time.
    """

    name = "this process"

    def __init__(self, pipelined: bool = True):
        #: read the next tile and store the last one while fn runs; off when a memory budget
        #: has no room for a second tile: one tile at a time, fn's the only one in memory
        self.pipelined = pipelined

    def run(self, ctx: TaskContext, todo: Sequence[int], committer: Committer,
            progress: Progress) -> None:
        committer.rewrite_jobs()
        if not todo:
            return

        def store(seg: SegmentedTile) -> None:
            _hand_over(committer, progress, seg)

        def summarize_and_store(tile: Any, result: Handoff, intensities: Any) -> None:
            store(summarize(ctx, tile, result, intensities))

        with ThreadPoolExecutor(1, thread_name_prefix="blockbuster-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="blockbuster-store") as writer:
            ahead = reader.submit(read_tile, ctx, todo[0])
            storing: Future[None] | None = None
            try:
                for i, tile_id in enumerate(todo):
                    data, error = None, None
                    try:
                        tile, data = ahead.result()
                    except TileError as unreadable:  # its input cannot be read: it fails
                        error = unreadable
                    if i + 1 < len(todo) and self.pipelined:
                        ahead = reader.submit(read_tile, ctx, todo[i + 1])
                    skipped = data is None and error is None
                    intensities, result = None, None
                    if storing is not None and not self.pipelined:
                        storing.result()
                        storing = None
                    if data is not None:
                        intensities = image_core(ctx, tile, data)
                        result, error = call_fn(ctx, tile, data)
                    del data
                    if i + 1 < len(todo) and not self.pipelined:
                        ahead = reader.submit(read_tile, ctx, todo[i + 1])
                    if storing is not None:
                        storing.result()  # in order; re-raises what the store thread raised
                        storing = None
                    if error is not None:  # recorded at once: fail-fast sees it before next fn
                        _hand_over(committer, progress, SegmentedTile(tile_id, error=error))
                        continue
                    if skipped:
                        storing = writer.submit(store, SegmentedTile(tile_id, skipped=True))
                    else:
                        # fn's result handed off: freed once numbered, not after it is stored
                        storing = writer.submit(summarize_and_store, tile, Handoff(result),
                                                intensities)
                    del result, intensities
                if storing is not None:
                    storing.result()
            finally:
                ahead.cancel()


class ThreadPool(Executor):
    """Tiles on a ``concurrent.futures.Executor`` of this process; any order."""

    name = "threads"

    def __init__(self, pool: FuturesExecutor, in_flight: int | None = None):
        self.pool = pool
        workers = getattr(pool, "_max_workers", 2)
        #: tiles segmented but not stored at once (their labels are in memory)
        self.in_flight = in_flight or 2 * workers

    def run(self, ctx: TaskContext, todo: Sequence[int], committer: Committer,
            progress: Progress) -> None:
        committer.rewrite_jobs()
        queue = iter(todo)
        running: set[Future[SegmentedTile]] = set()
        try:
            for tile_id in _take(queue, self.in_flight):
                running.add(self.pool.submit(segment_tile, ctx, tile_id, True))
            while running:
                done, running = wait(running, return_when="FIRST_COMPLETED")
                for future in sorted(done, key=lambda f: f.result().tile_id):
                    _hand_over(committer, progress, future.result())
                for tile_id in _take(queue, len(done)):
                    running.add(self.pool.submit(segment_tile, ctx, tile_id, True))
        finally:
            for future in running:
                future.cancel()


def _take(items: Iterable[int], n: int) -> list[int]:
    out = []
    for item in items:
        out.append(item)
        if len(out) >= n:
            break
    return out


class Dask(Executor):
    """Tiles as tasks on a dask.distributed cluster (see the module docstring)."""

    remote_writes = True
    name = "dask"

    def __init__(self, client: Any):
        self.client = client

    def _threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def run(self, ctx: TaskContext, todo: Sequence[int], committer: Committer,
            progress: Progress) -> None:
        from distributed import as_completed

        client = self.client
        prefix = f"blockbuster-{uuid.uuid4().hex[:8]}"
        # The context is a task's result rather than scattered data: if the worker holding it
        # dies, the scheduler recomputes it instead of cancelling every tile that needs it.
        ctx_future = client.submit(_identity, ctx, key=f"{prefix}-context", pure=False)
        spread = _Spread(client, ctx_future)
        batch = max(1, min(64, len(todo) // (self._threads() * WRITE_BATCHES_PER_THREAD)))
        futures = as_completed(with_results=True, raise_errors=False)
        # Only the futures not done yet: a finished one is let go at once, so that workers do
        # not keep every tile's result until the end of the run.
        outstanding: dict[str, Any] = {}
        pending: list[WriteJob] = list(committer.rewrite_jobs())
        segments_left = len(todo)

        def submit_writes(force: bool) -> None:
            while pending and (force or len(pending) >= batch):
                group = pending[:batch]
                del pending[:batch]
                future = client.submit(write_jobs, committer.output, ctx.grid, ctx.work_path,
                                       group, key=f"{prefix}-write-{group[0].tile_id}",
                                       priority=1, pure=False)
                outstanding[future.key] = future
                futures.add(future)

        segment_of: dict[str, int] = {}
        for tile_id in todo:  # earlier tiles first, so that the frontier moves early
            future = client.submit(segment_tile, ctx_future, tile_id, False,
                                   key=f"{prefix}-segment-{tile_id}", priority=-tile_id,
                                   pure=False)
            segment_of[future.key] = tile_id
            outstanding[future.key] = future
            futures.add(future)
        submit_writes(force=segments_left == 0)
        try:
            for future, result in futures:
                outstanding.pop(future.key, None)
                spread.check()
                failure = _failure(future, result)
                if failure is not None and future.key in segment_of:
                    # The cluster gave up on the tile (its worker kept dying): a failed tile,
                    # not a failed run; the others go on and a resume redoes it.
                    tile_id = segment_of[future.key]
                    result = SegmentedTile(tile_id, error=_lost_tile(ctx, tile_id, failure))
                elif failure is not None:
                    raise failure
                if isinstance(result, SegmentedTile):
                    segments_left -= 1
                    pending.extend(_hand_over(committer, progress, result))
                else:
                    for tile_id in result:
                        committer.written(tile_id)
                submit_writes(force=segments_left == 0)
        except BaseException:
            client.cancel(list(outstanding.values()))
            raise


class _Spread:
    """Keeps a copy of the run's context on every worker, workers that join later included.

    Every tile task needs the context, and the scheduler sends a task where its data is: with
    one copy, every tile would run on the worker that holds it.
    """

    #: Seconds between two looks for new workers.
    INTERVAL = 5.0

    def __init__(self, client: Any, future: Any):
        from distributed import wait

        self.client, self.future = client, future
        wait([future])
        self.workers: set[str] = set()
        self.last = -math.inf
        self.check()

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last = now
        workers = set(self.client.nthreads())
        if workers - self.workers:
            try:
                self.client.replicate([self.future])
            except Exception as exc:  # noqa: BLE001 -- copies only spread the tiles out
                # A worker dying while the scheduler copies the context fails an internal
                # assertion in distributed; tasks still get the context from where it is, and
                # the next look copies it again.
                log.debug("could not copy the run's context to every worker: %r", exc)
                return
        self.workers = workers


def _failure(future: Any, result: Any) -> BaseException | None:
    """The exception of a failed or cancelled dask future (``as_completed`` result), or None."""
    if future.status == "error":
        return result[1] if isinstance(result, tuple) else result
    if future.status == "cancelled":
        if isinstance(result, BaseException):
            return result
        from concurrent.futures import CancelledError

        return CancelledError(f"the cluster cancelled task {future.key}")
    return None


def _lost_tile(ctx: TaskContext, tile_id: int, exc: BaseException) -> TileError:
    """The error of a tile whose task the cluster gave up on (e.g. its worker kept dying)."""
    if isinstance(exc, TileError):
        return exc
    tile = ctx.grid.tile(tile_id)
    hint = ""
    if type(exc).__name__ == "KilledWorker":
        hint = (" (every worker that ran it died: out of memory? give the workers more memory "
                "or use smaller tiles)")
    error = TileError(f"{ctx.fn_label} could not run {tile.describe()}: {type(exc).__name__}: "
                      f"{exc}{hint}", tile_index=tile.index, region=tile.padded,
                      fn_name=ctx.fn_label)
    error.__cause__ = exc
    return error


def _identity(value: Any) -> Any:
    return value


def executor_for(client: Any) -> Executor:
    """The executor for ``tile_process(client=...)``: None, a dask Client or an Executor."""
    if client is None:
        return InProcess()
    if isinstance(client, Executor):
        return client
    if isinstance(client, FuturesExecutor):
        return ThreadPool(client)
    return Dask(client)
