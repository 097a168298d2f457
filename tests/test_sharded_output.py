"""Small tiles are stored sharded: one file per shard of tiles, the labels as unsharded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from blockbuster import output as output_module
from blockbuster import tile_process
from blockbuster.output import shard_tiles
from blockbuster.tiling import TileGrid


@pytest.fixture(autouse=True)
def shard_small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These runs have tens of tiles: shard them anyway (runs below 1024 tiles are not)."""
    monkeypatch.setattr(output_module, "SHARD_MIN_TILES", 2)


def _blobs(shape: tuple[int, ...] = (96, 160), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 2.5)
    return (field > np.quantile(field, 0.6)).astype(np.uint8)


def _label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _unsharded(monkeypatch: pytest.MonkeyPatch, image: np.ndarray, out: Path,
               **kwargs: object) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(output_module, "SHARD_MAX_TILE_VOXELS", 0)
        overlap = kwargs.pop("overlap", 0)
        arr = tile_process(image, _label, (16, 16), overlap, output=out, progress=False,
                           **kwargs)
        assert arr.shards is None
        return arr[:]


@pytest.mark.parametrize("stitch", ["faces", "iou"])
def test_sharded_labels_are_the_unsharded_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               stitch: str) -> None:
    image = _blobs()
    overlap = 4 if stitch == "iou" else 0
    reference = _unsharded(monkeypatch, image, tmp_path / "plain.zarr", stitch=stitch,
                           overlap=overlap)
    arr = tile_process(image, _label, (16, 16), overlap, output=tmp_path / "sharded.zarr",
                       stitch=stitch, progress=False)
    assert arr.shards is not None and arr.chunks == (16, 16)
    np.testing.assert_array_equal(arr[:], reference)
    tiles = 6 * 10
    assert _files(tmp_path / "sharded.zarr") < tiles / 5
    assert _files(tmp_path / "plain.zarr") > tiles / 2


def test_threads_write_each_shard_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    image = _blobs((128, 128), seed=4)
    reference = _unsharded(monkeypatch, image, tmp_path / "plain.zarr")
    with ThreadPoolExecutor(3) as pool:
        arr = tile_process(image, _label, (16, 16), 0, output=tmp_path / "sharded.zarr",
                           client=pool, progress=False)
    np.testing.assert_array_equal(arr[:], reference)


class _Interrupt:
    """Label tiles; stop the run (like Ctrl-C) at the given call."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.calls = 0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return _label(tile)


@pytest.mark.parametrize("stop_at", [5, 23, 41])
def test_a_run_stopped_mid_shard_resumes_to_the_same_labels(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path, stop_at: int,
                                                             ) -> None:
    image = _blobs(seed=2)
    reference = _unsharded(monkeypatch, image, tmp_path / "plain.zarr")
    out = tmp_path / "sharded.zarr"
    with monkeypatch.context() as m:
        m.setattr(output_module, "SHARD_TILES", 8)  # several shards per tile row
        with pytest.raises(KeyboardInterrupt):
            tile_process(image, _Interrupt(stop_at), (16, 16), 0, output=out, progress=False)
        arr = tile_process(image, _Interrupt(None), (16, 16), 0, output=out, resume=True,
                           progress=False)
    assert arr.shards == (16, 128)
    np.testing.assert_array_equal(arr[:], reference)


def test_shards_follow_grid_order() -> None:
    assert shard_tiles(TileGrid((100, 4096), (16, 16), (0, 0))) == (1, 256)
    assert shard_tiles(TileGrid((4096, 64), (16, 16), (0, 0))) == (64, 4)
    assert shard_tiles(TileGrid((16, 16), (16, 16), (0, 0))) is None
    assert zarr.__version__ >= "3"


def test_a_resumed_failed_tile_keeps_the_tiles_of_its_shard(tmp_path: Path) -> None:
    from blockbuster.errors import TileFailures

    image = _blobs((64, 64), seed=5)
    failing = {"on": True}

    def flaky(tile: np.ndarray) -> np.ndarray:
        if failing["on"] and tile.shape == (16, 16) and tile.sum() == image[48:, 48:].sum():
            raise RuntimeError("this tile fails")
        return _label(tile)

    out = tmp_path / "sharded.zarr"
    with pytest.raises(TileFailures):
        tile_process(image, flaky, (16, 16), 0, output=out, progress=False, retries=0)
    failing["on"] = False
    arr = tile_process(image, flaky, (16, 16), 0, output=out, resume=True, progress=False)
    assert arr.shards is not None
    np.testing.assert_array_equal(arr[:] > 0, image > 0)
    np.testing.assert_array_equal(arr[:], tile_process(image, _label, (16, 16), 0,
                                                       output=tmp_path / "ref.zarr",
                                                       progress=False)[:])
