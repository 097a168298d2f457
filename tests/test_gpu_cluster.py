"""Choosing how GPU workers start: dask-cuda when installed, pinned plain workers otherwise."""

from __future__ import annotations

import sys
import types

import pytest

from blockbuster import cluster
from blockbuster.cluster import choose_gpu_cluster, visible_gpu_count
from blockbuster.errors import ClusterError, InputError


@pytest.mark.parametrize(("have", "kind"), [(True, "dask-cuda"), (False, "pinned")])
def test_dask_cuda_is_used_when_installed(have: bool, kind: str) -> None:
    choice = choose_gpu_cluster([0, 2], have_dask_cuda=have, n_visible=4)
    assert choice.kind == kind and choice.gpus == (0, 2)
    assert "4 GPU(s)" in choice.message
    assert ("pip install dask-cuda" in choice.message) is not have


def test_no_visible_gpu_is_refused_with_the_cause() -> None:
    with pytest.raises(ClusterError, match="no GPU is visible"):
        choose_gpu_cluster([0], have_dask_cuda=True, n_visible=0)


def test_a_gpu_past_the_last_is_refused() -> None:
    with pytest.raises(ClusterError, match=r"shows 2 GPU\(s\) \(indices 0..1\)"):
        choose_gpu_cluster([0, 1, 2], have_dask_cuda=False, n_visible=2)


def test_unknown_count_trusts_the_indices() -> None:
    choice = choose_gpu_cluster([0, 1, 5], have_dask_cuda=False, n_visible=None)
    assert choice.kind == "pinned" and "unknown number" in choice.message


@pytest.mark.parametrize("gpus", [[], [1, 1], [-1]])
def test_bad_indices(gpus: list[int]) -> None:
    with pytest.raises(InputError):
        choose_gpu_cluster(gpus, have_dask_cuda=True, n_visible=4)


@pytest.mark.parametrize(("env", "devices", "expected"),
                         [(None, 4, 4), ("1,3", 4, 2), ("", 4, 0), ("-1", 4, 0),
                          (None, None, None)])
def test_visible_count_from_nvml_and_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                      env: str | None, devices: int | None,
                                                      expected: int | None) -> None:
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    fake = types.ModuleType("pynvml")

    def init() -> None:
        if devices is None:
            raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = init  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: devices  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name: object())
    assert visible_gpu_count() == expected


def test_local_cluster_starts_dask_cuda_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    started = {}

    class FakeCUDACluster:
        def __init__(self, **kwargs: object) -> None:
            started.update(kwargs)

    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = FakeCUDACluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(cluster, "visible_gpu_count", lambda: 8)
    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name: object())
    made = cluster.local_cluster(gpus=[3, 5], memory_limit="4GiB")
    assert isinstance(made, FakeCUDACluster)
    assert started["CUDA_VISIBLE_DEVICES"] == "3,5" and started["n_workers"] == 2
    assert started["threads_per_worker"] == 1 and started["memory_limit"] == "4GiB"


def test_local_cluster_refuses_missing_gpus_before_starting(monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    monkeypatch.setattr(cluster, "visible_gpu_count", lambda: 1)
    with pytest.raises(ClusterError, match="at most 1 worker"):
        cluster.local_cluster(gpus=[0, 1])
