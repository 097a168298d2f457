"""Surviving faults: SIGKILL at any moment + resume, failed tiles, concurrent runs, clusters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

import blockbuster
from blockbuster import tile_process
from blockbuster.engine.state import WorkDir
from blockbuster.errors import (
    IncompleteOutputError,
    OutputExistsError,
    OutputLockedError,
    ResumeMismatchError,
    TileFailures,
)
from blockbuster.output import work_dir_for

from helpers import comb_mask, same_partition

CHILD = Path(__file__).with_name("fault_child.py")
N_TILES = 16  # 120 x 120 image in 30 x 30 tiles


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((120, 120)) > 0.45).astype(np.uint8)
    for top in (0, 60):  # U shapes: two arms labelled apart, joined tiles later (rewrites)
        mask[top:top + 56, :] = 0
        mask[top + 2:top + 52, 5:9] = mask[top + 2:top + 52, 95:99] = 1
        mask[top + 48:top + 52, 5:99] = 1
        mask[top + 2:top + 40, 40:44] = mask[top + 36:top + 40, 40:70] = 1  # an inner hook
        mask[top + 2:top + 40, 66:70] = 1
    path = tmp_path_factory.mktemp("img") / "img.zarr"
    zarr.create_array(store=str(path), shape=mask.shape, chunks=(30, 30), dtype="uint8")[:] = mask
    return str(path)


def _child(image, output, log, point="none", n=0, resume=False, overwrite=False, ome=False,
           inverse=False, workers=False, whole=False, sharded=False) -> int:
    args = [sys.executable, str(CHILD), image, str(output), str(log), point, str(n)]
    flags = {"--resume": resume, "--overwrite": overwrite, "--ome": ome, "inverse": inverse,
             "--workers": workers, "--whole": whole, "--sharded": sharded}
    args += [flag for flag, on in flags.items() if on]
    return subprocess.run(args, capture_output=True).returncode


@pytest.fixture(scope="module")
def uninterrupted(image_path, tmp_path_factory) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("ref")
    assert _child(image_path, tmp / "ref.zarr", tmp / "log") == 0
    return zarr.open_array(str(tmp / "ref.zarr"))[:]


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("point, n", [
    ("segment", 1), ("segment", 7), ("segment", 16),
    ("chunk-write", 1), ("chunk-write", 9),
    ("record", 1), ("record", 12),
    ("assign", 1), ("assign", 10),
    ("fix", 1), ("fix", 2), ("fix-written", 1), ("fix-written", 2),
    ("finalize", 1),
    ("cleanup", 1), ("cleanup", 2),
])
def test_sigkill_then_resume_equals_uninterrupted(point, n, image_path, uninterrupted, tmp_path):
    out, log = tmp_path / "out.zarr", tmp_path / "calls"
    assert _child(image_path, out, log, point, n) == -signal.SIGKILL
    work = WorkDir(work_dir_for(out))
    finished = point in ("finalize", "cleanup")  # the labels were complete when it died
    done_before = len(work.done_tiles()) if not finished else N_TILES
    if out.exists() and not finished:
        with pytest.raises(IncompleteOutputError):
            blockbuster.open_labels(out)  # never looks complete
    if finished:
        assert blockbuster.output_status(out).leftover_work  # info reports the leftover
    log.unlink(missing_ok=True)
    assert _child(image_path, out, log, resume=True) == 0
    assert _calls(log) == N_TILES - done_before  # only the unfinished tiles ran again
    assert np.array_equal(blockbuster.open_labels(out)[:], uninterrupted)
    assert not work.path.exists()
    assert Path(str(out) + ".objects.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point, n", [
    ("segment", 6), ("shard-write", 1), ("shard-write", 3), ("record", 9), ("assign", 7),
    ("fix", 1), ("fix-written", 2), ("finalize", 1), ("cleanup", 1),
])
def test_sharded_output_sigkill_then_resume_equals_uninterrupted(point, n, image_path,
                                                                 uninterrupted, tmp_path):
    """A sharded output (a shard per row of tiles, written once its row is labelled) killed at
    any moment and resumed: the uninterrupted labels. (A shard is one object that zarr's
    stores write atomically; a torn one, which the "chunk-write" point makes of plain chunks,
    would stop the resume: zarr reads a shard back before replacing it.)"""
    out, log = tmp_path / "out.zarr", tmp_path / "calls"
    assert _child(image_path, out, log, point, n, sharded=True) == -signal.SIGKILL
    assert zarr.open_array(str(out)).shards is not None
    log.unlink(missing_ok=True)
    assert _child(image_path, out, log, resume=True, sharded=True) == 0
    assert np.array_equal(blockbuster.open_labels(out)[:], uninterrupted)
    assert not WorkDir(work_dir_for(out)).path.exists()


@pytest.fixture(scope="module")
def uninterrupted_whole(image_path, tmp_path_factory) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("ref-whole")
    assert _child(image_path, tmp / "ref.zarr", tmp / "log", whole=True) == 0
    return zarr.open_array(str(tmp / "ref.zarr"))[:]


@pytest.mark.slow
@pytest.mark.parametrize("point, n, first, then", [
    ("segment", 1, "serial", "serial"), ("segment", 7, "serial", "serial"),
    ("segment", 16, "serial", "serial"), ("chunk-write", 1, "serial", "serial"),
    ("chunk-write", 6, "serial", "serial"), ("record", 5, "serial", "serial"),
    ("assign", 1, "serial", "serial"), ("assign", 6, "serial", "serial"),
    ("finalize", 1, "serial", "serial"), ("segment", 9, "serial", "cluster"),
    ("assign", 4, "cluster", "serial"), ("assign", 8, "cluster", "cluster"),
])
def test_whole_objects_sigkill_then_resume_equals_uninterrupted(point, n, first, then, image_path,
                                                                uninterrupted_whole, tmp_path):
    """stitch="whole" (tiles assigned after their later neighbours, written after all of them)
    killed at any moment and resumed, on this process or a cluster: the uninterrupted labels."""
    out, log = tmp_path / "out.zarr", tmp_path / "calls"
    assert _child(image_path, out, log, point, n, whole=True,
                  workers=first == "cluster") == -signal.SIGKILL
    work = WorkDir(work_dir_for(out))
    done_before = len(work.done_tiles()) if point != "finalize" else N_TILES
    log.unlink(missing_ok=True)
    assert _child(image_path, out, log, resume=True, whole=True, workers=then == "cluster") == 0
    if then == "serial":
        assert _calls(log) == N_TILES - done_before  # only the unfinished tiles ran again
    assert np.array_equal(blockbuster.open_labels(out)[:], uninterrupted_whole)
    assert not work.path.exists()


@pytest.mark.slow
@pytest.mark.parametrize("point, n", [("segment", 1), ("segment", 9), ("assign", 3)])
def test_ome_overwrite_killed_then_resumed_gives_the_new_labels(point, n, image_path, tmp_path):
    """An OME-Zarr overwrite killed at any moment, resumed: the new labels, never the old."""
    from ome_zarr.writer import write_image

    image = tmp_path / "img.ome.zarr"
    write_image(zarr.open_array(image_path)[:], zarr.open_group(str(image), mode="w"),
                axes="yx", scaler=None, storage_options={"chunks": (30, 30)})
    labels = image / "labels" / "blockbuster"
    log = tmp_path / "calls"
    assert _child(str(image), labels, log, ome=True) == 0  # the old labels
    old = blockbuster.open_labels(labels)[:]
    assert _child(str(image), labels, log, point, n, overwrite=True, ome=True,
                  inverse=True) == -signal.SIGKILL
    with pytest.raises(IncompleteOutputError):
        blockbuster.open_labels(labels)
    assert _child(str(image), labels, log, resume=True, ome=True, inverse=True) == 0
    new = blockbuster.open_labels(labels)[:]
    mask = zarr.open_array(image_path)[:]
    assert np.array_equal(new > 0, mask == 0) and not np.array_equal(new > 0, old > 0)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("serial", "cluster"), ("cluster", "serial")])
def test_sigkill_then_resume_on_another_executor(first, then, image_path, uninterrupted,
                                                 tmp_path):
    """A run killed on one executor, finished on the other: the labels of an uninterrupted run."""
    out, log = tmp_path / "out.zarr", tmp_path / "calls"
    point, n = ("segment", 9) if first == "serial" else ("assign", 6)  # assign: in the driver
    assert _child(image_path, out, log, point, n, workers=first == "cluster") == -signal.SIGKILL
    assert 0 < len(WorkDir(work_dir_for(out)).done_tiles()) < N_TILES
    assert _child(image_path, out, log, resume=True, workers=then == "cluster") == 0
    assert np.array_equal(blockbuster.open_labels(out)[:], uninterrupted)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(image_path, uninterrupted, tmp_path):
    """Kill a slow run again and again at random times; every resume makes progress."""
    out, log = tmp_path / "out.zarr", tmp_path / "calls"
    env = {**os.environ, "BLOCKBUSTER_TEST_SLOW": "1"}
    rng = np.random.default_rng(0)
    for attempt in range(4):
        args = [sys.executable, str(CHILD), image_path, str(out), str(log), "none", "0"]
        proc = subprocess.Popen(args + (["--resume"] if attempt else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 2.5))  # import takes ~1 s; tiles take 0.1 s each
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _child(image_path, out, log, resume=True) == 0
    assert np.array_equal(blockbuster.open_labels(out)[:], uninterrupted)
    assert _calls(log) >= N_TILES  # every tile ran at least once across the attempts


# -- failing tiles --------------------------------------------------------------------------------
def _failing(flag: Path, bad_values: set[int]):
    def segment(tile):
        if not flag.exists() and int(tile.flat[0]) in bad_values:
            raise MemoryError("CUDA out of memory (simulated)")
        return ndimage.label(tile > 0)[0]

    return segment


def test_failed_tiles_are_named_kept_and_resumed(tmp_path, blobs2d):
    image = blobs2d.astype(np.uint8)
    image[0, 0] = 7
    image[100, 50] = 9  # first voxels of tiles (0, 0) and (2, 1)
    flag = tmp_path / "fixed"
    segment = _failing(flag, {7, 9})
    out = tmp_path / "out.zarr"
    with pytest.raises(TileFailures) as exc:
        tile_process(image, segment, (50, 50), stitch="faces", output=out, retries=2)
    err = exc.value
    assert sorted(e.tile_index for e in err.failures) == [(0, 0), (2, 1)]
    assert "tile (0, 0)" in str(err) and "tile (2, 1)" in str(err)
    assert "after 3 attempt(s)" in str(err) and "MemoryError" in str(err)
    work = WorkDir(work_dir_for(out))
    assert work.failed_tiles() == {0, 7}
    assert len(work.done_tiles()) == 9 - 2  # the others are kept
    flag.touch()  # "fix" the problem; same fn, so the run can be resumed
    with pytest.raises(OutputExistsError, match="resume=True"):
        tile_process(image, segment, (50, 50), stitch="faces", output=out)
    labels = tile_process(image, segment, (50, 50), stitch="faces", output=out, resume=True)
    assert same_partition(labels[:], ndimage.label(image > 0)[0])


def _run_leaving_records(tmp_path: Path, image: np.ndarray) -> tuple[Path, Path]:
    """A run whose tile (2, 1) fails: its work directory keeps the other tiles' records."""
    flag = tmp_path / "fixed"
    out = tmp_path / "out.zarr"
    with pytest.raises(TileFailures):
        tile_process(image, _flaky(flag), (50, 50), stitch="faces", output=out, retries=0)
    flag.touch()
    return out, flag


def _flaky(flag: Path):
    """Fails on the tile whose first voxel is 9 until ``flag`` exists (no out-of-memory pause)."""
    def segment(tile):
        if not flag.exists() and int(tile.flat[0]) == 9:
            raise RuntimeError("flaky storage (simulated)")
        return ndimage.label(tile > 0)[0]

    return segment


@pytest.mark.parametrize("at", [0.05, 0.3, 0.6, 0.95])
def test_a_damaged_tile_record_is_a_tile_to_redo(tmp_path, blobs2d, caplog, at):
    image = blobs2d.astype(np.uint8)
    image[100, 50] = 9
    out, flag = _run_leaving_records(tmp_path, image)
    work = WorkDir(work_dir_for(out))
    packs = [p for p in sorted(work.packs_dir.iterdir()) if p.stat().st_size]
    pack = max(packs, key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    where = int(at * (len(data) - 8))
    data[where:where + 8] = bytes(b ^ 0xFF for b in data[where:where + 8])
    pack.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="blockbuster"):
        labels = tile_process(image, _flaky(flag), (50, 50), stitch="faces", output=out,
                              resume=True)
    assert labels.attrs["blockbuster"]["complete"]
    assert same_partition(labels[:], ndimage.label(image > 0)[0])
    assert pack.name in caplog.text and "damaged" in caplog.text


def test_a_damaged_manifest_is_named_and_not_offered_for_resume(tmp_path, blobs2d):
    from blockbuster.cli.info import describe_output
    from blockbuster.errors import WorkDirError
    from blockbuster.status import output_status

    image = blobs2d.astype(np.uint8)
    image[100, 50] = 9
    out, flag = _run_leaving_records(tmp_path, image)
    work = WorkDir(work_dir_for(out))
    work.manifest_path.write_text('{"params": ')  # cut short
    with pytest.raises(WorkDirError, match=work.manifest_path.name) as exc:
        tile_process(image, _flaky(flag), (50, 50), stitch="faces", output=out,
                     resume=True)
    assert "overwrite" in str(exc.value)
    (work_status,) = output_status(out).work
    assert not work_status.resumable and "cannot be read" in (work_status.problem or "")
    shown = "\n".join(describe_output(output_status(out)))  # what `blockbuster info` prints
    assert "--resume" not in shown and "--overwrite" in shown, shown
    labels = tile_process(image, _flaky(flag), (50, 50), stitch="faces", output=out,
                          overwrite=True)
    assert same_partition(labels[:], ndimage.label(image > 0)[0])


def test_systematic_failure_stops_early(tmp_path, blobs2d):
    calls = []

    def broken(tile):
        calls.append(1)
        raise ValueError("bad model")

    with pytest.raises(TileFailures, match="first 3 tiles all failed"):
        tile_process(blobs2d, broken, (10, 10), retries=0, output=tmp_path / "o.zarr")
    assert len(calls) == 3


def test_resume_with_other_arguments_is_refused(tmp_path, blobs2d):
    out = tmp_path / "out.zarr"
    flag = tmp_path / "never"
    image = blobs2d.astype(np.uint8)
    image[0, 0] = 7
    with pytest.raises(TileFailures):
        tile_process(image, _failing(flag, {7}), (50, 50), stitch="faces", output=out, retries=0)
    with pytest.raises(ResumeMismatchError,
                       match=r"tile_chunks: \[\[50, 50, 50\], \[50, 50, 31\]\] -> \[\[40"):
        tile_process(image, _failing(flag, {7}), (40, 40), stitch="faces", output=out, resume=True)
    with pytest.raises(ResumeMismatchError, match="segmenter"):
        tile_process(image, lambda t: ndimage.label(t)[0], (50, 50), stitch="faces", output=out,
                     resume=True)


def test_resume_of_a_complete_output_does_nothing(tmp_path, blobs2d):
    out = tmp_path / "out.zarr"
    calls = []

    def segment(tile):
        calls.append(1)
        return ndimage.label(tile)[0]

    first = tile_process(blobs2d, segment, (50, 50), stitch="faces", output=out)[:]
    calls.clear()
    again = tile_process(blobs2d, segment, (50, 50), stitch="faces", output=out, resume=True)
    assert not calls and again.attrs["blockbuster"]["complete"]
    assert np.array_equal(again[:], first)


def test_a_second_concurrent_run_is_refused(tmp_path, blobs2d):
    out = tmp_path / "out.zarr"
    work = WorkDir(work_dir_for(out))
    work.path.mkdir(parents=True, exist_ok=True)  # before the holder opens its lock file
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "f.write('pid test'); f.flush(); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); "
        "time.sleep(60)"), str(work.path / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match="another blockbuster run"):
            tile_process(blobs2d, lambda t: ndimage.label(t)[0], (50, 50), output=out)
    finally:
        holder.kill()
        holder.wait()
    tile_process(blobs2d, lambda t: ndimage.label(t)[0], (50, 50), output=out, stitch="faces")


# -- working only where there is tissue -----------------------------------------------------------
def test_mask_at_low_resolution_skips_empty_tiles(blobs2d):
    calls = []

    def fn(tile):
        calls.append(tile.shape)
        return ndimage.label(tile)[0]

    low_res = np.zeros((15, 13), bool)  # 1/10 of the image: tissue only in the top-left
    low_res[:4, :4] = True  # ~ voxels 0..40 of the image
    out = tile_process(blobs2d, fn, (50, 50), stitch="faces", mask=low_res)[:]
    assert len(calls) == 1  # only tile (0, 0) is under the mask
    assert out[50:].max() == 0 and out[:, 50:].max() == 0
    expected = ndimage.label(blobs2d[:50, :50])[0]
    assert same_partition(out[:50, :50], expected)


def test_skip_empty_skips_constant_tiles():
    image = np.zeros((60, 60), np.uint8)
    image[5:20, 5:20] = 1
    calls = []

    def fn(tile):
        calls.append(1)
        return ndimage.label(tile)[0]

    out = tile_process(image, fn, (30, 30), skip_empty=True, stitch="faces")[:]
    assert len(calls) == 1 and out.max() == 1


# -- dask.distributed -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stitch", ["faces", "iou", "whole"])
def test_local_cluster_gives_identical_labels(stitch, blobs2d, tmp_path):
    from distributed import Client

    from blockbuster.cluster import local_cluster

    def segment(tile):
        return ndimage.label(tile > 0)[0]

    serial = tile_process(blobs2d, segment, (40, 40), 6, stitch=stitch,
                          output=tmp_path / "serial.zarr")[:]
    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        parallel = tile_process(blobs2d, segment, (40, 40), 6, stitch=stitch, client=client,
                                output=tmp_path / "parallel.zarr")[:]
    assert np.array_equal(serial, parallel)


@pytest.mark.slow
def test_a_run_resumes_on_another_executor_to_the_same_labels(tmp_path):
    """Objects joined after their tiles were written; a serial run finished on a cluster and a
    cluster run finished serially give the labels of an uninterrupted run, id for id."""
    from distributed import Client

    from blockbuster.cluster import local_cluster

    mask = comb_mask()
    expected = ndimage.label(mask)[0]
    flag = tmp_path / "fixed"

    def segment(tile):
        if not flag.exists() and tile[10:20, 20:30].all():  # the blobs' tiles fail at first
            raise RuntimeError("simulated")
        return ndimage.label(tile)[0]

    reference = tile_process(mask, lambda t: ndimage.label(t)[0], (30, 30), stitch="faces",
                             output=tmp_path / "reference.zarr")[:]
    serial_first, cluster_first = tmp_path / "serial-first.zarr", tmp_path / "cluster-first.zarr"
    with pytest.raises(TileFailures):
        tile_process(mask, segment, (30, 30), stitch="faces", output=serial_first)
    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
        with pytest.raises(TileFailures):
            tile_process(mask, segment, (30, 30), stitch="faces", output=cluster_first,
                         client=client)
        flag.touch()
        finished_on_cluster = tile_process(mask, segment, (30, 30), stitch="faces",
                                           output=serial_first, resume=True, client=client)[:]
    finished_serially = tile_process(mask, segment, (30, 30), stitch="faces",
                                     output=cluster_first, resume=True)[:]
    assert same_partition(reference, expected)
    assert np.array_equal(np.unique(reference), np.arange(expected.max() + 1))
    assert np.array_equal(finished_on_cluster, reference)
    assert np.array_equal(finished_serially, reference)


@pytest.mark.slow
def test_gpu_workers_are_pinned_one_device_each():
    from distributed import Client

    from blockbuster.cluster import local_cluster

    with local_cluster(gpus=[0, 1]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        nthreads = client.nthreads()
    assert sorted(seen.values()) == ["0", "1"]
    assert set(nthreads.values()) == {1}


def test_slurm_job_script_without_a_scheduler():
    from blockbuster.cluster import jobqueue_cluster

    cluster = jobqueue_cluster("slurm", cores=8, memory="64GB", walltime="04:00:00",
                               queue="gpu", account="lab", gpus_per_job=1, jobs=0)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH -t 04:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8"):
        assert line in script
    assert any(worker in script
               for worker in ("distributed.cli.dask_worker", "dask worker", "dask-worker"))


class DieOnce:
    """Kills the worker process running it, the first time only (a marker file remembers)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, tile):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)  # a hard worker death: no exception, no cleanup
        return ndimage.label(tile > 0)[0]


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_its_tile_rerun(blobs2d, tmp_path):
    from distributed import Client

    from blockbuster.cluster import local_cluster

    fn = DieOnce(tmp_path / "died")
    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
        out = tile_process(blobs2d, fn, (40, 40), stitch="faces", client=client,
                           output=tmp_path / "out.zarr")[:]
    assert (tmp_path / "died").exists()
    assert same_partition(out, ndimage.label(blobs2d)[0])


def test_resume_with_auto_tiles_reuses_the_runs_tiles(tmp_path, blobs2d, monkeypatch):
    """Free memory changes between starts; a resume must not resize the tiles (and be refused)."""
    from blockbuster import sizing
    from blockbuster.sizing import MemoryProbe

    out = tmp_path / "out.zarr"
    image = blobs2d.astype(np.uint8)
    image[0, 0] = 7
    flag = tmp_path / "fixed"
    monkeypatch.setattr(sizing, "_probe_ram", lambda: MemoryProbe(60_000, 2**30, "RAM", "test"))
    with pytest.raises(TileFailures):
        tile_process(image, _failing(flag, {7}), "auto", stitch="faces", output=out, retries=0)
    first = WorkDir(work_dir_for(out)).read_manifest()["params"]["tile_chunks"]
    assert sizing.auto_tile_shape(image.shape, image.dtype, memory=30_500) != tuple(
        max(c) for c in first)  # sizing again now would choose other tiles
    flag.touch()
    monkeypatch.setattr(sizing, "_probe_ram", lambda: MemoryProbe(61_000, 2**30, "RAM", "test"))
    labels = tile_process(image, _failing(flag, {7}), "auto", stitch="faces", output=out,
                          resume=True)
    assert labels.chunks == tuple(max(c) for c in first)
    assert same_partition(labels[:], ndimage.label(image > 0)[0])


def test_a_refused_run_leaves_nothing_behind(tmp_path, blobs2d):
    out = tmp_path / "out.zarr"
    tile_process(blobs2d, lambda t: ndimage.label(t)[0], (50, 50), stitch="faces", output=out)
    with pytest.raises(OutputExistsError):
        tile_process(blobs2d, lambda t: ndimage.label(t)[0], (50, 50), stitch="faces", output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_resume_accepts_the_input_path_in_another_form(tmp_path, blobs2d, monkeypatch):
    source = tmp_path / "img.zarr"
    zarr.create_array(store=str(source), shape=blobs2d.shape, chunks=(50, 50),
                      dtype="uint8")[:] = blobs2d
    data = zarr.open_array(str(source), mode="r+")
    data[0, 0] = 7
    flag = tmp_path / "fixed"
    out = tmp_path / "out.zarr"
    with pytest.raises(TileFailures):
        tile_process(str(source), _failing(flag, {7}), (50, 50), stitch="faces", output=out,
                     retries=0)
    flag.touch()
    monkeypatch.chdir(tmp_path)
    labels = tile_process("img.zarr", _failing(flag, {7}), (50, 50), stitch="faces",
                          output="out.zarr", resume=True)
    assert labels.attrs["blockbuster"]["complete"]
