"""Running one task per tile with dask: the synchronous scheduler, or a distributed Client.

The sequential path (default) streams tiles one at a time through one process: one GPU, one
model, peak memory near one tile. With a ``distributed.Client`` the same tasks are submitted to
the cluster; dask reschedules the tasks of a worker that dies.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import dask
from dask.callbacks import Callback

from .progress import Progress

__all__ = ["run_tasks", "active_client"]

T = TypeVar("T")


def active_client(client: Any = None) -> Any:
    """The given client, or None. ``client="active"`` picks the current distributed client."""
    if client != "active":
        return client
    from distributed import get_client

    return get_client()


class _TaskProgress(Callback):
    """Advance a progress bar each time one of our tile tasks finishes."""

    def __init__(self, prefix: str, progress: Progress, on_result: Callable[[Any], None] | None):
        super().__init__()
        self._prefix = prefix
        self._progress = progress
        self._on_result = on_result

    def _posttask(self, key, result, dsk, state, worker_id):  # noqa: D401 - dask hook
        if isinstance(key, tuple) and key and key[0] == self._prefix:
            if self._on_result is not None:
                self._on_result(result)
            self._progress.update()


def run_tasks(func: Callable[[Any, Any], T], items: Sequence[Any], shared: Any, *,
              client: Any = None, progress: Progress | None = None, name: str = "tile",
              on_result: Callable[[T], None] | None = None) -> list[T]:
    """Compute ``func(shared, item)`` for every item, in order, and return the results.

    ``shared`` (the run context: image source, segmenter, grid) goes into the graph once, not
    once per task. Results should be small (summaries): the labels go to disk inside ``func``.
    """
    if not items:
        return []
    prefix = f"blockbuster-{name}-{uuid.uuid4().hex[:8]}"
    shared_d = dask.delayed(shared, name=f"{prefix}-context", traverse=False)
    tasks = [dask.delayed(func, pure=False)(shared_d, item, dask_key_name=(prefix, i))
             for i, item in enumerate(items)]
    if client is None:
        callbacks = [_TaskProgress(prefix, progress, on_result)] if progress else []
        if on_result is not None and not progress:
            callbacks = [_TaskProgress(prefix, _NullProgress(), on_result)]
        with dask.config.set(scheduler="synchronous"):
            with _callbacks(callbacks):
                return list(dask.compute(*tasks, optimize_graph=False))
    return _run_distributed(client, tasks, progress, on_result)


def _run_distributed(client: Any, tasks: list, progress: Progress | None,
                     on_result: Callable[[Any], None] | None) -> list:
    from distributed import as_completed

    futures = client.compute(tasks, optimize_graph=False)
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    for future, result in as_completed(futures, with_results=True):
        results[index[future.key]] = result
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress.update()
    return results


class _NullProgress:
    def update(self, n: int = 1) -> None:
        pass


class _callbacks:
    """Enter several dask callbacks at once (a no-op for an empty list)."""

    def __init__(self, callbacks: Iterable[Callback]):
        self._callbacks = list(callbacks)

    def __enter__(self) -> None:
        for cb in self._callbacks:
            cb.__enter__()

    def __exit__(self, *exc: object) -> None:
        for cb in reversed(self._callbacks):
            cb.__exit__(*exc)
