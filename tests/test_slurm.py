"""blockbuster on a real SLURM cluster, run as the README shows a user doing it.

These tests submit jobs: they need a SLURM node that takes jobs, e.g. the one-node cluster of
``bash .ci/slurm.sh start`` (CI starts it). Without one they are skipped with the reason. The
partition is ``BLOCKBUSTER_SLURM_PARTITION`` (default ``debug``, as the script makes it).

A test plugin, installed through PYTHONPATH (which the jobs inherit, like a user's environment),
records in which job, with which interpreter and which blockbuster every tile ran, and can slow
tiles down so that a run can be cancelled half-way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

import blockbuster
from blockbuster.data import write_synthetic_nuclei

from helpers import comb_mask, same_partition, write_plugin_dist

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PARTITION = os.environ.get("BLOCKBUSTER_SLURM_PARTITION", "debug")
COMMANDS = ("sinfo", "sbatch", "squeue", "scancel", "scontrol")
#: How long a run may take before the test gives up on it (a hang, not a slow machine).
RUN_TIMEOUT = 300

PLUGIN = '''
"""Segmenters for the SLURM tests: each tile leaves a record of where it ran."""
import json
import os
import sys
import time
import uuid

from scipy import ndimage

import blockbuster
from blockbuster import Segmenter
from blockbuster.plugins.watershed import WatershedSegmenter


def record_tile():
    folder = os.environ.get("BLOCKBUSTER_TEST_TRACE")
    if folder and os.path.isdir(folder):
        record = {"job": os.environ.get("SLURM_JOB_ID"), "python": sys.executable,
                  "blockbuster": blockbuster.__file__}
        # Written under another name and renamed: scancel may kill the job mid-write, and a
        # half-written record must not be read as one.
        path = os.path.join(folder, uuid.uuid4().hex)
        with open(path + ".part", "w") as f:
            json.dump(record, f)
        os.replace(path + ".part", path + ".json")
    time.sleep(float(os.environ.get("BLOCKBUSTER_TEST_DELAY", "0")))


class TracedWatershed(WatershedSegmenter):
    """The built-in watershed, leaving a record per tile."""

    name = "traced-watershed"

    def segment(self, tile):
        record_tile()
        return super().segment(tile)


class Threshold(Segmenter):
    """Connected components of the bright voxels: U shapes stay whole objects."""

    name = "threshold"

    def segment(self, tile):
        record_tile()
        return ndimage.label(tile > 500)[0]
'''


def _slurm_unavailable() -> str | None:
    """Why no SLURM job can run here, or None when a node of PARTITION takes jobs."""
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not on PATH)"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed"
    try:
        proc = subprocess.run(["sinfo", "--noheader", f"--partition={PARTITION}", "--format=%T"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s in ("idle", "mixed") for s in states):
        said = (proc.stderr.strip() or " ".join(states) or "no node").splitlines()[0]
        return (f"no node of SLURM partition {PARTITION!r} takes jobs (sinfo: {said}); "
                "start one with: bash .ci/slurm.sh start")
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skip, saying why, where no SLURM partition takes jobs."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def data(tmp_path_factory, slurm: None) -> Path:
    """The inputs, the test plugin, and serial reference runs (read-only for the tests)."""
    root = tmp_path_factory.mktemp("slurm-data")
    write_synthetic_nuclei(root / "img.zarr", (256, 256), chunks=(128, 128))
    mask = np.tile(comb_mask(), (2, 2))  # U shapes and hooks crossing the tile borders
    comb = zarr.create_array(store=str(root / "comb.zarr"), shape=mask.shape, chunks=(60, 60),
                             dtype="uint16", fill_value=0)
    comb[:] = np.where(mask, 1000, 100).astype("uint16")
    site = root / "site"
    site.mkdir()
    write_plugin_dist(site, "slurm-test-plugins",
                      {"traced-watershed": "slurm_test_plugins:TracedWatershed",
                       "threshold": "slurm_test_plugins:Threshold"},
                      {"slurm_test_plugins": PLUGIN})
    for tiles in ("64,64", "32,32"):
        _check_run(segment(root, "img.zarr", f"serial-{tiles}.zarr", "--tile-shape", tiles))
    _check_run(segment(root, "comb.zarr", "comb-serial.zarr", "--method", "threshold",
                       "--tile-shape", "30,30", "--overlap", "0", "--stitch", "faces"))
    return root


@pytest.fixture
def work(tmp_path: Path, data: Path) -> Path:
    """A fresh working directory (the jobs' output files land here) with the inputs linked."""
    for item in data.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "trace").mkdir()
    return tmp_path


def _env(cwd: Path, delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd / "site"),
                                                      env.get("PYTHONPATH")]))
    env["BLOCKBUSTER_TEST_TRACE"] = str(cwd / "trace")
    env["BLOCKBUSTER_TEST_DELAY"] = str(delay)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockbuster", "segment", *args]


def segment(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``blockbuster segment ARGS`` in ``cwd``, to its end."""
    return subprocess.run(_command(*args), cwd=cwd, env=_env(cwd), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)


def on_slurm(jobs: int, queue: str = PARTITION) -> list[str]:
    """The README's cluster options, sized for a small node."""
    return ["--cluster", "slurm", "--jobs", str(jobs), "--cores", "1", "--memory", "2GB",
            "--walltime", "00:10:00", "--queue", queue]


def _check_run(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def labels(path: Path) -> np.ndarray:
    return zarr.open_array(str(path), mode="r")[:]


def submitted_jobs(log: str) -> list[str]:
    """The job ids the run says it submitted."""
    found = re.search(r"submitted \d+ SLURM job\(s\) ([\d, ]+);", log)
    assert found, log
    return found.group(1).replace(",", " ").split()


def traces(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (cwd / "trace").glob("*.json")]


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (SLURM keeps finished jobs for MinJobAge, 300 s)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def queued_jobs() -> set[str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return set(out.split())


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll until ``condition()`` holds; fail naming ``what`` if it never does (a hang)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"still waiting after {timeout} s for {what}"
        time.sleep(0.2)


def start(cwd: Path, *args: str, delay: float) -> tuple[subprocess.Popen, Path]:
    """Start ``blockbuster segment ARGS`` in the background; returns it and its stderr file."""
    log = cwd / f"run-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(_command(*args), cwd=cwd, env=_env(cwd, delay),
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    return proc, log


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, log.read_text()


def jobs_started(log: Path, count: int = 1) -> list[str]:
    wait_until(lambda: "SLURM job(s)" in log.read_text(), "the jobs' submission")
    return submitted_jobs(log.read_text())[:count]


# -- tests ------------------------------------------------------------------------------------
def test_segment_on_slurm_equals_the_serial_run(work: Path) -> None:
    proc = segment(work, "img.zarr", "out.zarr", "--tile-shape", "64,64", *on_slurm(2))
    _check_run(proc)
    jobs = submitted_jobs(proc.stderr)
    assert len(jobs) == 2
    for job in jobs:
        info = job_info(job)
        assert info["Partition"] == PARTITION and info["TimeLimit"] == "00:10:00", info
        assert info["MinMemoryNode"] == "2G", info  # --memory 2GB became --mem
        # the job's worker joined the run's scheduler (its log is the job's output file)
        assert "Registered to" in (work / f"slurm-{job}.out").read_text()
    assert np.array_equal(labels(work / "out.zarr"), labels(work / "serial-64,64.zarr"))


@pytest.fixture(scope="module")
def u_shapes(data: Path, tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """The U-shape image segmented serially and on SLURM (objects joined after the fact)."""
    work = tmp_path_factory.mktemp("u-shapes")
    for item in data.iterdir():
        (work / item.name).symlink_to(item)
    (work / "trace").mkdir()
    proc = segment(work, "comb.zarr", "comb.zarr.out", "--method", "threshold", "--tile-shape",
                   "30,30", "--overlap", "0", "--stitch", "faces", *on_slurm(2))
    _check_run(proc)
    assert {t["job"] for t in traces(work)} <= set(submitted_jobs(proc.stderr))
    return labels(work / "comb-serial.zarr"), labels(work / "comb.zarr.out")


def test_u_shapes_on_slurm_are_the_serial_runs_objects(u_shapes, data: Path) -> None:
    serial, on_cluster = u_shapes
    truth = ndimage.label(labels(data / "comb.zarr") > 500)[0]
    assert same_partition(serial, truth)
    assert same_partition(on_cluster, truth)
    assert np.array_equal(np.unique(on_cluster), np.arange(truth.max() + 1))


def test_u_shapes_on_slurm_have_the_serial_runs_ids(u_shapes) -> None:
    """Objects joined after their tiles were written: the same ids, whoever ran the tiles."""
    serial, on_cluster = u_shapes
    assert np.array_equal(serial, on_cluster)


def test_a_cancelled_job_is_replaced_and_the_run_finishes(work: Path) -> None:
    """scancel of the only job: a new job is submitted, its worker reruns the lost tiles."""
    proc, log = start(work, "img.zarr", "out.zarr", "--method", "traced-watershed",
                      "--tile-shape", "32,32", *on_slurm(1), delay=0.15)
    (job,) = jobs_started(log)
    wait_until(lambda: len(traces(work)) >= 3, "the first tiles")
    # What the job runs is what --job-script prints (up to the run's scheduler address).
    submitted = subprocess.run(["scontrol", "write", "batch_script", job, "-"],
                               capture_output=True, text=True, check=True).stdout
    subprocess.run(["scancel", job], check=True)
    code, stderr = finish(proc, log)
    assert code == 0, stderr
    assert re.search(rf"SLURM job {job} ended \((CANCELLED|COMPLETING)\) while the run still "
                     "needs it", stderr), stderr
    replacement = re.search(r"submitted replacement job\(s\) (\d+)", stderr)
    assert replacement, stderr
    ran_in = {t["job"] for t in traces(work)}
    assert ran_in == {job, replacement.group(1)}  # tiles ran in both jobs, nowhere else
    assert np.array_equal(labels(work / "out.zarr"), labels(work / "serial-32,32.zarr"))

    printed = segment(work, "img.zarr", "--job-script", *on_slurm(1)).stdout
    address = re.compile(r"tcp://\S+|--name \S+")
    assert address.sub("", submitted).strip() == address.sub("", printed).strip()
    # The workers ran this interpreter and imported this blockbuster.
    assert f"\n{sys.executable} -m distributed.cli.dask_worker" in submitted
    assert {(t["python"], t["blockbuster"]) for t in traces(work)} == {
        (sys.executable, blockbuster.__file__)}


def test_a_stopped_run_cancels_its_jobs_and_resume_finishes_it(work: Path) -> None:
    """SIGTERM (kill, a driver job's wall time) stops the run and its jobs; --resume ends it."""
    args = ("img.zarr", "out.zarr", "--method", "traced-watershed", "--tile-shape", "32,32",
            *on_slurm(2))
    proc, log = start(work, *args, delay=0.25)
    jobs = jobs_started(log, 2)
    wait_until(lambda: len(traces(work)) >= 4, "the first tiles")
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc, log)
    assert code == 130, stderr
    wait_until(lambda: not queued_jobs() & set(jobs), "the run's jobs to leave the queue", 60)
    done_before = len(traces(work))

    resumed = segment(work, *args, "--resume")
    _check_run(resumed)
    found = re.search(r"resuming: (\d+) of 64 tiles already done", resumed.stderr)
    assert found and int(found.group(1)) > 0, resumed.stderr
    assert len(traces(work)) - done_before < 64  # the finished tiles did not run again
    assert np.array_equal(labels(work / "out.zarr"), labels(work / "serial-32,32.zarr"))


@pytest.mark.parametrize(("queue", "option", "says"), [
    ("no-such-partition", [], "invalid partition specified: no-such-partition"),
    (PARTITION, ["--gpus-per-job", "1"], "Invalid generic resource (gres) specification"),
])
def test_a_refused_submission_is_one_clear_error(work: Path, queue: str, option: list[str],
                                                 says: str) -> None:
    """The queue says no (a typo in --queue, GPUs it does not have): no hang, no traceback."""
    before = queued_jobs()
    proc = segment(work, "img.zarr", "out.zarr", *on_slurm(1, queue), *option)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Task exception" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("blockbuster: error: sbatch refused the job:") and says in error
    assert not (work / "out.zarr").exists()
    assert not (work / "out.zarr.blockbuster-work").exists()
    assert queued_jobs() <= before


def test_jobs_that_cannot_start_stop_the_run_with_a_clear_error(data: Path, tmp_path) -> None:
    """Python API: workers whose job exits at once (a broken environment on the nodes)."""
    from distributed import Client

    from blockbuster import ClusterError, tile_process
    from blockbuster.cluster import JobKeeper, jobqueue_cluster

    image = labels(data / "comb.zarr")
    with (jobqueue_cluster("slurm", cores=1, memory="1GB", queue=PARTITION, jobs=1,
                           job_script_prologue=["exit 3"], log_directory=str(tmp_path)
                           ) as cluster,
          Client(cluster) as client,
          pytest.raises(ClusterError, match="3 SLURM jobs ended within 60 s of starting"),
          JobKeeper(cluster, interval=1, max_early_ends=2) as keeper):
        tile_process(image, lambda tile: ndimage.label(tile > 500)[0], (60, 60), client=client,
                     output=tmp_path / "out.zarr")
    assert len(keeper.replaced) == 2
    assert not queued_jobs() & set(keeper.replaced)


def test_without_the_queues_word_a_job_whose_worker_left_is_replaced(tmp_path,
                                                                    slurm: None) -> None:
    """How LSF and PBS jobs are kept (no squeue there): dask drops a worker that left, and the
    keeper replaces its job."""
    import dask
    from distributed import Client

    from blockbuster.cluster import JobKeeper, job_ids, jobqueue_cluster

    with (dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}),
          jobqueue_cluster("slurm", cores=1, memory="1GB", queue=PARTITION, jobs=1,
                           log_directory=str(tmp_path)) as cluster,
          Client(cluster) as client):
        keeper = JobKeeper(cluster, interval=1)
        keeper.kind = None  # as for a queue it cannot ask
        with keeper:
            client.wait_for_workers(1, timeout=RUN_TIMEOUT)
            (job,) = job_ids(cluster)
            subprocess.run(["scancel", job], check=True)
            wait_until(lambda: bool(keeper.replaced), "a replacement job")
            client.wait_for_workers(1, timeout=RUN_TIMEOUT)
            workers = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert list(workers.values()) == keeper.replaced
        assert job not in keeper.replaced
