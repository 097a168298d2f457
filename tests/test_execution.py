"""run_tasks: serial, threads and dask.distributed give the same results, in item order."""

from __future__ import annotations

import pytest

from blockbuster.execution import _batch_size, run_tasks
from blockbuster.progress import Progress


class Counted(Progress):
    """A progress bar (not shown) that counts its updates."""

    def __init__(self, total: int) -> None:
        super().__init__(total, "test", enabled=False)
        self.done = 0

    def update(self, n: int = 1) -> None:
        super().update(n)
        self.done += n


def _offset_square(offset: int, item: int) -> int:
    return offset + item * item


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize("batches_per_thread", [None, 1, 2, 100])
def test_distributed_batches_keep_item_order_and_report_every_item(client, batches_per_thread):
    items = list(range(23))
    seen: list[int] = []
    bar = Counted(len(items))
    out = run_tasks(_offset_square, items, 10, client=client, progress=bar,
                    on_result=seen.append, batches_per_thread=batches_per_thread)
    assert bar.done == len(items)
    expected = [10 + i * i for i in items]
    assert out == expected
    assert sorted(seen) == expected  # one call per item, in completion order


def test_batch_size_gives_about_that_many_tasks_per_worker_thread(client):
    assert _batch_size(client, 23, None) == 1
    assert _batch_size(client, 23, 2) == 6  # 2 threads x 2 batches: 4 tasks of <= 6 items
    assert _batch_size(client, 3, 4) == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_local_paths_match(threads):
    items = list(range(9))
    assert run_tasks(_offset_square, items, 1, threads=threads) == [1 + i * i for i in items]
