"""One engine: the same labels, id for id, whoever runs the tiles and in whatever order.

Executors: this process (the default), a pool of threads (tiles finish in any order), and a
dask LocalCluster of worker processes. U shapes and hooks make labels join after the tiles
holding them were written, the hardest case for numbering in a fixed order.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.engine import commit

from helpers import comb_mask, same_partition


@st.composite
def tilings(draw):
    """A mask with U shapes and random blobs, a tiling, an overlap, a stitching mode."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = comb_mask((120, 120)) | (rng.random((120, 120)) < draw(st.floats(0.0, 0.5)))
    tile_shape = (draw(st.integers(9, 60)), draw(st.integers(9, 60)))
    mode = draw(st.sampled_from(["faces", "iou"]))
    overlap = draw(st.integers(1 if mode == "iou" else 0, 8))
    return mask, tile_shape, overlap, mode, seed


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


class Jittery:
    """Connected components after a random pause: threads finish tiles in a random order."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        with self.lock:
            pause = self.rng.random() * 0.004
        time.sleep(pause)
        return label(tile)


def run(mask, tile_shape, overlap, mode, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overlap .* reduced", UserWarning)
        return tile_process(mask, kwargs.pop("fn", label), tile_shape, overlap, stitch=mode,
                            progress=False, **kwargs)[:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tilings())
def test_threads_in_any_order_give_the_serial_labels_id_for_id(case):
    mask, tile_shape, overlap, mode, seed = case
    serial = run(mask, tile_shape, overlap, mode)
    with ThreadPoolExecutor(4) as pool:
        threaded = run(mask, tile_shape, overlap, mode, fn=Jittery(seed), client=pool)
    assert np.array_equal(threaded, serial)
    assert np.array_equal(np.unique(serial), np.arange(serial.max() + 1))  # 1..N, no gap
    if mode == "faces":
        assert same_partition(serial, ndimage.label(mask)[0])


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client

    from blockbuster.cluster import local_cluster

    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
        yield client


@pytest.mark.slow
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=tilings())
def test_a_local_cluster_gives_the_serial_labels_id_for_id(case, cluster_client):
    mask, tile_shape, overlap, mode, _ = case
    serial = run(mask, tile_shape, overlap, mode)
    parallel = run(mask, tile_shape, overlap, mode, client=cluster_client)
    assert np.array_equal(parallel, serial)


def _label_and_sign(folder: str):
    """``label``, writing the pid of the process that ran each tile into ``folder``."""
    def segment(tile: np.ndarray) -> np.ndarray:
        import os

        time.sleep(0.02)  # long enough for the scheduler to see both workers busy
        with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as f:
            f.write("tile\n")
        return label(tile)

    return segment


@pytest.mark.slow
def test_tiles_are_spread_over_the_workers(cluster_client, tmp_path):
    """Every tile needs the run's context: the tiles must not all go where its one copy is."""
    mask = comb_mask((240, 240))
    signed = tmp_path / "signed"
    signed.mkdir()
    tile_process(mask, _label_and_sign(str(signed)), (30, 30), client=cluster_client,
                 output=tmp_path / "out.zarr", progress=False)
    per_worker = [len(p.read_text().splitlines()) for p in signed.iterdir()]
    assert sum(per_worker) == 64
    assert len(per_worker) == 2 and min(per_worker) >= 8, per_worker


def test_past_the_uint32_limit_the_output_becomes_uint64(tmp_path, monkeypatch):
    """The output is converted (chunk by chunk, swapped in) when the labels outgrow it."""
    mask = comb_mask((120, 120)) | (np.random.default_rng(1).random((120, 120)) < 0.3)
    reference = run(mask, (30, 30), 0, "faces")
    assert reference.max() > 40
    monkeypatch.setattr(commit, "UINT32_LIMIT", 40)  # as if uint32 ended at 40
    out = tile_process(mask, label, (30, 30), stitch="faces", output=tmp_path / "o.zarr",
                       progress=False)
    assert out.dtype == np.uint64
    assert np.array_equal(out[:], reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]  # nothing left beside it


def test_a_segmenter_that_reuses_its_output_buffer(blobs2d):
    """fn returns the same array object every time; the stored tiles are not overwritten."""

    class Reusing:
        def __init__(self):
            self.buffer = None

        def __call__(self, tile):
            labels, _ = ndimage.label(tile > 0)
            if self.buffer is None or self.buffer.shape != labels.shape:
                self.buffer = np.zeros(labels.shape, np.int32)
            self.buffer[...] = labels
            time.sleep(0.002)  # give the store thread time to read the previous tile
            return self.buffer

    out = tile_process(blobs2d, Reusing(), (50, 50), stitch="faces", progress=False)[:]
    assert same_partition(out, ndimage.label(blobs2d)[0])


def test_a_segmenter_that_edits_its_tile_in_place(blobs2d):
    """fn owns its tile: the caller's array never changes, and tiles see unedited borders."""
    image = blobs2d.astype(np.uint8)
    before = image.copy()

    def destructive(tile):
        labels = ndimage.label(tile > 0)[0]
        tile[...] = 0  # e.g. normalisation in place
        return labels

    out = tile_process(image, destructive, (50, 50), 8, stitch="iou", progress=False)[:]
    assert np.array_equal(image, before)
    reference = tile_process(image, label, (50, 50), 8, stitch="iou", progress=False)[:]
    assert np.array_equal(out, reference)


class AlwaysDies:
    """Kills every worker that runs the tile whose first voxel is 7."""

    def __call__(self, tile):
        import os

        if tile.flat[0] == 7:
            os._exit(1)
        return label(tile)


@pytest.mark.slow
def test_a_tile_that_kills_every_worker_is_a_failed_tile_not_a_crash(blobs2d, tmp_path):
    from distributed import Client

    from blockbuster.cluster import local_cluster
    from blockbuster.errors import TileFailures

    image = blobs2d.astype(np.uint8)
    image[50, 50] = 7  # the first voxel of tile (1, 1)
    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
        import dask

        with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
                pytest.raises(TileFailures, match="KilledWorker") as exc:
            tile_process(image, AlwaysDies(), (50, 50), stitch="faces", client=client,
                         output=tmp_path / "o.zarr")
    # tiles that shared a dying worker may be given up too (dask's rule); the others are kept
    assert (1, 1) in [e.tile_index for e in exc.value.failures]
    assert len(exc.value.failures) < 9
    image[50, 50] = 1  # "fixed"; the same fn finishes the run, in this process
    out = tile_process(image, AlwaysDies(), (50, 50), stitch="faces", output=tmp_path / "o.zarr",
                       resume=True)
    assert same_partition(out[:], ndimage.label(image > 0)[0])
