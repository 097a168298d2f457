"""A tile's time limit and GPU out-of-memory retries, with fake functions (no GPU needed)."""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from blockbuster import tasks, tile_process
from blockbuster.errors import InputError, TileFailures
from blockbuster.tasks import free_gpu_memory, is_out_of_memory


def image() -> np.ndarray:
    """Blobs on a 4 x 4 grid of 16 x 16 tiles; tile (1, 2) is marked by a 7 at its corner."""
    rng = np.random.default_rng(1)
    img = (rng.random((64, 64)) > 0.7).astype(np.uint8)
    img[16, 32] = 7
    return img


def marked(tile: np.ndarray) -> bool:
    return bool(tile[0, 0] == 7)


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


# -- time limit -------------------------------------------------------------------------------
class HangsOnTheMarkedTile:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.hung = 0
        self.calls = 0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        self.calls += 1
        if marked(tile):
            self.hung += 1
            self.release.wait(60)  # a hung GPU or network call
        return label(tile)


@pytest.mark.parametrize("client", [None, "threads"])
def test_a_tile_over_its_time_limit_fails_and_is_retried(client, tmp_path) -> None:
    fn = HangsOnTheMarkedTile()
    pool = ThreadPoolExecutor(2) if client == "threads" else None
    try:
        with pytest.raises(TileFailures) as failed:
            tile_process(image(), fn, (16, 16), 0, stitch="faces", output=tmp_path / "o.zarr",
                         timeout=0.5, retries=1, progress=False, client=pool)
    finally:
        fn.release.set()  # let the abandoned calls end
        if pool is not None:
            pool.shutdown()
    error = failed.value
    assert len(error.failures) == 1 and error.tile_index == (1, 2)
    assert "after 2 attempt(s)" in str(error) and "time limit of 0.5 s" in str(error)
    assert fn.hung == 2  # tried again, as a failure is
    assert error.report.tiles["failed"] == 1 and error.report.tiles["run"] == 16
    # the hang over (the call returns at once now), a resume runs only that tile again
    calls = fn.calls
    out = tile_process(image(), fn, (16, 16), 0, stitch="faces", output=tmp_path / "o.zarr",
                       timeout=0.5, retries=1, resume=True, progress=False)
    assert fn.calls == calls + 1 and fn.hung == 3
    expected = ndimage.label(image() > 0)[0]
    assert out[:].max() == expected.max()


def test_a_time_limit_that_is_not_reached_changes_nothing(tmp_path) -> None:
    with_limit = tile_process(image(), label, (16, 16), 0, stitch="faces", timeout=60,
                              output=tmp_path / "a.zarr", progress=False)
    without = tile_process(image(), label, (16, 16), 0, stitch="faces",
                           output=tmp_path / "b.zarr", progress=False)
    np.testing.assert_array_equal(with_limit[:], without[:])


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "10", True])
def test_bad_time_limits(timeout, tmp_path) -> None:
    with pytest.raises(InputError, match="timeout="):
        tile_process(image(), label, (16, 16), 0, timeout=timeout, output=tmp_path / "o.zarr")


def test_errors_raised_by_fn_within_the_limit_keep_their_type(tmp_path) -> None:
    def fails(tile):
        raise ValueError("no good")

    with pytest.raises(TileFailures) as failed:
        tile_process(image(), fails, (16, 16), 0, timeout=30, output=tmp_path / "o.zarr",
                     progress=False)
    assert isinstance(failed.value.failures[0].__cause__, ValueError)
    assert "ValueError: no good" in str(failed.value)


# -- out of GPU memory --------------------------------------------------------------------------
class OutOfMemoryError(RuntimeError):
    """What torch.cuda.OutOfMemoryError is called (a RuntimeError subclass)."""


class ResourceExhaustedError(Exception):
    """TensorFlow's out-of-memory error, by name."""


@pytest.mark.parametrize("error, expected", [
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (ResourceExhaustedError("OOM when allocating tensor with shape[1,64,512,512]"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"), True),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), True),
    (MemoryError(), False),  # the host's RAM: retrying the same tile does not help
    (RuntimeError("CUDA error: device-side assert triggered"), False),
    (ValueError("bad input"), False),
])
def test_out_of_memory_errors_are_recognised(error, expected) -> None:
    assert is_out_of_memory(error) is expected


def test_an_out_of_memory_error_as_the_cause_counts() -> None:
    try:
        try:
            raise OutOfMemoryError("CUDA out of memory")
        except OutOfMemoryError as inner:
            raise RuntimeError("model.eval failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)


def test_a_real_torch_out_of_memory_error_is_recognised() -> None:
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))


class OutOfMemoryFirst:
    """Raises a GPU out-of-memory error on the marked tile's first ``n`` calls."""

    def __init__(self, n: int, error: type[BaseException] = OutOfMemoryError) -> None:
        self.n = n
        self.error = error
        self.calls = 0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if marked(tile):
            self.calls += 1
            if self.calls <= self.n:
                raise self.error("CUDA out of memory. Tried to allocate 20.00 MiB")
        return label(tile)


@pytest.fixture
def no_pause(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(tasks.time, "sleep", pauses.append)
    return pauses


def test_out_of_memory_is_retried_after_a_pause_without_counting(no_pause, caplog,
                                                                 tmp_path) -> None:
    caplog.set_level(logging.WARNING, logger="blockbuster")
    fn = OutOfMemoryFirst(2)
    out = tile_process(image(), fn, (16, 16), 0, stitch="faces", retries=0,
                       output=tmp_path / "o.zarr", progress=False)
    assert fn.calls == 3
    assert no_pause == [tasks.OOM_BACKOFF_S, 2 * tasks.OOM_BACKOFF_S]
    np.testing.assert_array_equal(out[:] > 0, image() > 0)
    said = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(said) == 2
    assert "tile (1, 2)" in said[0] and "OutOfMemoryError" in said[0]
    assert "trying again in" in said[0] and "(1 of 3)" in said[0]


def test_out_of_memory_that_persists_fails_the_tile(no_pause, tmp_path) -> None:
    fn = OutOfMemoryFirst(100, ResourceExhaustedError)
    with pytest.raises(TileFailures) as failed:
        tile_process(image(), fn, (16, 16), 0, stitch="faces", retries=1,
                     output=tmp_path / "o.zarr", progress=False)
    # each of the 2 attempts is tried again OOM_RETRIES times in all (the retries are shared)
    assert fn.calls == tasks.OOM_RETRIES + 2
    assert "ResourceExhaustedError" in str(failed.value)
    assert failed.value.tile_index == (1, 2)


def test_freeing_calls_the_loaded_frameworks_cache(monkeypatch) -> None:
    emptied = []
    cuda = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                           empty_cache=lambda: emptied.append("cuda"))
    fake_torch = SimpleNamespace(cuda=cuda, backends=SimpleNamespace(mps=None))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert free_gpu_memory() == ["torch's CUDA cache"]
    assert emptied == ["cuda"]
    monkeypatch.delitem(sys.modules, "torch")
    assert free_gpu_memory() == []  # nothing loaded, nothing imported
    assert "torch" not in sys.modules or sys.modules["torch"] is not fake_torch
