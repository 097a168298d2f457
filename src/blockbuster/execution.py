"""Running one task per tile: serially in this process, or on a dask.distributed cluster.

The serial path (default) streams tiles one at a time, in grid order, through one process: one
GPU, one model, peak memory near one tile. With a ``distributed.Client`` the same tasks become a
dask graph (one task per tile, the shared context stored once) that the cluster runs; dask
reschedules the tasks of a worker that dies.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dask

from .progress import Progress

__all__ = ["run_tasks", "active_client"]

T = TypeVar("T")


def active_client(client: Any = None) -> Any:
    """The given client, or None. ``client="active"`` picks the current distributed client."""
    if client != "active":
        return client
    from distributed import get_client

    return get_client()


def run_tasks(func: Callable[[Any, Any], T], items: Sequence[Any], shared: Any, *,
              client: Any = None, progress: Progress | None = None, name: str = "tile",
              on_result: Callable[[T], None] | None = None, threads: int = 1,
              batches_per_thread: int | None = None) -> list[T]:
    """Compute ``func(shared, item)`` for every item and return the results in item order.

    ``shared`` (the run context: image source, segmenter, grid) goes into the graph once, not
    once per task. Results should be small (summaries): the labels go to disk inside ``func``.
    Without a client, ``threads > 1`` runs the tasks on a thread pool (for tasks that never call
    the user's fn and spend their time in I/O and compression). With a client,
    ``batches_per_thread`` groups short items into about that many dask tasks per worker
    thread: each task costs the scheduler and this process a few milliseconds of CPU, as much
    as a short item itself. Tasks that call the user's fn stay one per item (a worker that
    dies loses one tile).
    """
    if not items:
        return []
    if client is None and threads > 1:
        return _run_threads(func, items, shared, progress, on_result, threads)
    if client is None:
        return _run_serial(func, items, shared, progress, on_result)
    prefix = f"blockbuster-{name}-{uuid.uuid4().hex[:8]}"
    shared_d = dask.delayed(shared, name=f"{prefix}-context", traverse=False)
    size = _batch_size(client, len(items), batches_per_thread)
    groups = [list(items[i:i + size]) for i in range(0, len(items), size)]
    tasks = [dask.delayed(_run_batch, pure=False)(func, shared_d, group, dask_key_name=(prefix, i))
             for i, group in enumerate(groups)]

    def each(results: list[T]) -> None:
        for result in results:
            if on_result is not None:
                on_result(result)
            if progress is not None:
                progress.update()

    return [r for group in _run_distributed(client, tasks, each) for r in group]


def _run_batch(func: Callable[[Any, Any], T], shared: Any, items: list[Any]) -> list[T]:
    return [func(shared, item) for item in items]


def _batch_size(client: Any, n_items: int, batches_per_thread: int | None) -> int:
    """Items per dask task: 1, or enough for about ``batches_per_thread`` tasks per thread."""
    if not batches_per_thread:
        return 1
    threads = max(1, sum(client.nthreads().values()))
    return max(1, -(-n_items // (threads * batches_per_thread)))


def _run_serial(func, items, shared, progress, on_result) -> list:
    """The default: one tile at a time, in grid order, in this process (like a debugger would).

    One model, one GPU and one padded tile in memory at a time; exceptions surface directly.
    """
    results = []
    for item in items:
        result = func(shared, item)
        results.append(result)
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress.update()
    return results


def _run_threads(func, items, shared, progress, on_result, threads: int) -> list:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: list[Any] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blockbuster") as pool:
        futures = {pool.submit(func, shared, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if on_result is not None:
                on_result(result)
            if progress is not None:
                progress.update()
    return results


def _run_distributed(client: Any, tasks: list, on_result: Callable[[Any], None]) -> list:
    from distributed import as_completed

    futures = client.compute(tasks, optimize_graph=False)
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    for future, result in as_completed(futures, with_results=True):
        results[index[future.key]] = result
        on_result(result)
    return results
