"""Scaling out on dask.distributed: a local cluster (one worker per GPU), or a job-queue cluster.

blockbuster never schedules work itself beyond its serial mode: with more than one process it
hands the tile tasks to a ``distributed.Client``. This module builds the usual clusters:

* :func:`local_cluster` -- N worker processes on this machine, one thread each (one model per
  worker). With ``gpus=[0, 1]`` each worker is pinned to its own GPU: through dask-cuda's
  ``LocalCUDACluster`` when dask-cuda is installed (it also sets each worker's CPU affinity to
  the GPU's socket), else through ``CUDA_VISIBLE_DEVICES``, set in the worker's environment
  before anything touches CUDA (:func:`choose_gpu_cluster` decides, and says why).
* :func:`jobqueue_cluster` -- SLURM, LSF or PBS jobs through dask-jobqueue
  (``pip install "blockbuster[cluster]"``), submitted before it returns (a refused submission
  raises :class:`~blockbuster.errors.ClusterError` with the queue's message).
* :class:`JobKeeper` -- replaces the jobs that end while a run still needs them (cancelled,
  killed at their wall time, lost with their node): dask-jobqueue submits each job once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import ClusterError, InputError, PluginNotInstalledError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CLUSTER_KINDS",
    "GpuClusterChoice",
    "JobKeeper",
    "choose_gpu_cluster",
    "gpu_worker_specs",
    "job_ids",
    "jobqueue_cluster",
    "local_cluster",
    "submit_jobs",
    "visible_gpu_count",
]

log = logging.getLogger("blockbuster")

CLUSTER_KINDS = {"slurm": "SLURMCluster", "lsf": "LSFCluster", "pbs": "PBSCluster"}


def gpu_worker_specs(gpus: list[int], memory_limit: str | int | None = None) -> dict[str, Any]:
    """One single-threaded worker per GPU, each seeing only its own device.

    Examples
    --------
    >>> spec = gpu_worker_specs([0, 3])
    >>> spec["gpu-3"]["options"]["env"]
    {'CUDA_VISIBLE_DEVICES': '3'}
    """
    from distributed import Nanny

    specs = {}
    for gpu in gpus:
        options: dict[str, Any] = {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}}
        if memory_limit is not None:
            options["memory_limit"] = memory_limit
        specs[f"gpu-{gpu}"] = {"cls": Nanny, "options": options}
    return specs


@dataclass(frozen=True)
class GpuClusterChoice:
    """How the GPU workers are started: ``"dask-cuda"`` or ``"pinned"`` (plain dask workers),
    on which GPUs, and the sentence that says why (logged)."""

    kind: str
    gpus: tuple[int, ...]
    message: str


def visible_gpu_count() -> int | None:
    """The NVIDIA GPUs this process may use (NVML, within ``CUDA_VISIBLE_DEVICES``); None when
    it cannot be told (no nvidia-ml-py, no driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 -- NVMLError and friends: no driver, so cannot tell
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 -- as above
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def choose_gpu_cluster(gpus: list[int], *, have_dask_cuda: bool | None = None,
                       n_visible: int | str | None = "probe") -> GpuClusterChoice:
    """Decide how to start one worker per GPU, refusing GPUs that are not there.

    Parameters
    ----------
    gpus
        The GPU indices asked for (one worker each).
    have_dask_cuda
        Whether dask-cuda is installed (default: looked up).
    n_visible
        How many GPUs this process sees (default: :func:`visible_gpu_count`); None when that
        cannot be told, in which case the GPUs asked for are trusted.

    Raises
    ------
    ClusterError
        No GPU is visible, or an index asked for is past the last one.

    Examples
    --------
    >>> choose_gpu_cluster([0, 1], have_dask_cuda=True, n_visible=4).kind
    'dask-cuda'
    >>> choose_gpu_cluster([0], have_dask_cuda=False, n_visible=None).kind
    'pinned'
    """
    if not gpus:
        raise InputError("gpus=[] asks for no GPU; pass GPU indices, e.g. gpus=[0, 1]")
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise InputError(f"gpus={gpus} must be distinct indices >= 0")
    count = visible_gpu_count() if n_visible == "probe" else n_visible
    if count == 0:
        raise ClusterError(
            f"GPU workers were asked for (GPUs {gpus}), but no GPU is visible to this process "
            "(NVML finds none, or CUDA_VISIBLE_DEVICES hides them all); run without --gpu, "
            "or on a machine with GPUs")
    if isinstance(count, int) and max(gpus) >= count:
        raise ClusterError(
            f"GPU workers were asked for on GPUs {gpus}, but this machine shows {count} "
            f"GPU(s) (indices 0..{count - 1}); ask for at most {count} worker(s)")
    if have_dask_cuda is None:
        have_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    seen = "an unknown number of GPUs (no NVML)" if count is None else f"{count} GPU(s)"
    if have_dask_cuda:
        return GpuClusterChoice("dask-cuda", tuple(gpus),
                                f"dask-cuda LocalCUDACluster: one worker per GPU on {list(gpus)} "
                                f"(this machine shows {seen})")
    return GpuClusterChoice("pinned", tuple(gpus),
                            f"dask-cuda is not installed: one plain dask worker per GPU on "
                            f"{list(gpus)}, each pinned with CUDA_VISIBLE_DEVICES (this machine "
                            f"shows {seen}); pip install dask-cuda for its CPU affinity and "
                            "GPU memory spilling")


def local_cluster(n_workers: int = 2, *, gpus: list[int] | None = None,
                  memory_limit: str | int | None = "auto", dashboard: bool = False) -> Any:
    """A cluster of worker processes on this machine.

    Parameters
    ----------
    n_workers : int
        Worker processes (ignored when ``gpus`` is given: one worker per GPU).
    gpus : list of int, optional
        GPU indices; each gets one worker pinned to it (see :func:`choose_gpu_cluster`).
    memory_limit : str or int
        Per-worker memory limit, as dask understands it.
    """
    if gpus:
        choice = choose_gpu_cluster(list(gpus))
        log.info("%s", choice.message)
        if choice.kind == "dask-cuda":
            return _cuda_cluster(choice.gpus, memory_limit, dashboard)
        from distributed import Scheduler, SpecCluster

        scheduler = {"cls": Scheduler,
                     "options": {"dashboard_address": ":0", "dashboard": dashboard}}
        limit = None if memory_limit == "auto" else memory_limit
        return SpecCluster(workers=gpu_worker_specs(list(gpus), limit), scheduler=scheduler)
    if n_workers < 1:
        raise InputError(f"workers={n_workers} must be >= 1")
    from distributed import LocalCluster

    # ":0": a free port, so a second cluster on the machine never collides on 8787
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        memory_limit=memory_limit, dashboard_address=":0",
                        scheduler_kwargs={"dashboard": dashboard})


def _cuda_cluster(gpus: tuple[int, ...], memory_limit: str | int | None,
                  dashboard: bool) -> Any:
    """dask-cuda's cluster: one single-threaded worker per GPU (one model each)."""
    from dask_cuda import LocalCUDACluster

    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus),
                            n_workers=len(gpus), threads_per_worker=1,
                            memory_limit=memory_limit, dashboard_address=":0",
                            scheduler_kwargs={"dashboard": dashboard})


def jobqueue_cluster(kind: str, *, cores: int = 1, memory: str = "16GB", processes: int = 1,
                     walltime: str | None = None, queue: str | None = None,
                     account: str | None = None, gpus_per_job: int = 0, jobs: int = 1,
                     job_extra_directives: list[str] | None = None,
                     job_script_prologue: list[str] | None = None, **kwargs: Any) -> Any:
    """A dask-jobqueue cluster for SLURM, LSF or PBS, with ``jobs`` jobs submitted.

    ``gpus_per_job`` adds the scheduler's GPU request (``--gres=gpu:N`` for SLURM). Call
    ``cluster.job_script()`` to see exactly what is submitted. The jobs run the worker with
    this interpreter (``sys.executable``, dask-jobqueue's default) and inherit this process's
    environment (SLURM's default ``--export=ALL``), so they import the same blockbuster.

    Raises
    ------
    ClusterError
        The queue refused a job (unknown partition or account, a GPU request the queue cannot
        meet, a limit): the message is the submit command's.
    """
    kind = kind.lower()
    if kind not in CLUSTER_KINDS:
        raise InputError(f"unknown cluster {kind!r}; choose one of {', '.join(CLUSTER_KINDS)}")
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise PluginNotInstalledError(
            'cluster runs need dask-jobqueue: pip install "blockbuster[cluster]"') from exc
    extra = list(job_extra_directives or [])
    if gpus_per_job:
        extra += {"slurm": [f"--gres=gpu:{gpus_per_job}"],
                  "lsf": [f'-gpu "num={gpus_per_job}"'],
                  "pbs": [f"-l ngpus={gpus_per_job}"]}[kind]
    options: dict[str, Any] = {"cores": cores, "memory": memory, "processes": processes,
                               "job_extra_directives": extra,
                               "scheduler_options": {"dashboard_address": ":0"}, **kwargs}
    for key, value in (("walltime", walltime), ("queue", queue), ("account", account),
                       ("job_script_prologue", job_script_prologue)):
        if value is not None:
            options[key] = value
    cls = getattr(dask_jobqueue, CLUSTER_KINDS[kind])
    cluster = cls(**options)
    if jobs:
        try:
            submit_jobs(cluster, jobs)
        except BaseException:
            cluster.close()
            raise
    return cluster


# -- jobs -------------------------------------------------------------------------------------
def submit_jobs(cluster: Any, jobs: int) -> list[str]:
    """Scale a dask-jobqueue cluster to ``jobs`` jobs, submitting the missing ones now.

    ``cluster.scale`` alone submits in the background, where a refused submission only prints a
    traceback and the run then waits for workers forever.

    Returns
    -------
    list of str
        The ids of all the cluster's jobs.

    Raises
    ------
    ClusterError
        The submit command failed; the message carries its error output.
    """
    try:
        cluster.sync(_grow, cluster, jobs)
    except (RuntimeError, OSError) as exc:  # dask-jobqueue: "Command exited with non-zero..."
        raise ClusterError(_refusal(cluster, exc)) from None
    return job_ids(cluster)


async def _grow(cluster: Any, jobs: int) -> None:
    """Add job specs up to ``jobs`` and submit them, on the cluster's loop.

    What ``SpecCluster.scale`` does when growing, except that the submissions are awaited here
    (scale() leaves them to a callback that only logs their errors). A job the queue refused is
    forgotten, so that closing the cluster does not trip over it.
    """
    from distributed.core import Status

    while len(cluster.worker_spec) < jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        await cluster._correct_state()
    except BaseException:
        for name, job in list(cluster.workers.items()):
            if not getattr(job, "job_id", None):
                job.status = Status.failed
                del cluster.workers[name]
                cluster.worker_spec.pop(name, None)
        raise


def job_ids(cluster: Any) -> list[str]:
    """The queue's ids of a dask-jobqueue cluster's submitted jobs, in submission order."""

    async def read() -> list[str]:
        jobs = [cluster.workers.get(name) for name in cluster.worker_spec]  # in creation order
        return [job.job_id for job in jobs if getattr(job, "job_id", None)]

    return list(cluster.sync(read))


def _submit_command(cluster: Any) -> str:
    return str(getattr(getattr(cluster, "job_cls", None), "submit_command", "the job queue"))


def _refusal(cluster: Any, exc: BaseException) -> str:
    """One line: the submit command and what it printed on stderr."""
    text = str(exc)
    said = text.split("stderr:", 1)[1] if "stderr:" in text else text
    command = _submit_command(cluster)
    lines = [line.strip().removeprefix(f"{command}: error: ") for line in said.splitlines()
             if line.strip()]
    return (f"{command} refused the job: {'; '.join(lines) or type(exc).__name__}"
            " (check --queue, --account, --memory, --walltime and --gpus-per-job against what "
            "the cluster offers)")


def _kind(cluster: Any) -> str | None:
    names = {cls: kind for kind, cls in CLUSTER_KINDS.items()}
    return next((names[c.__name__] for c in type(cluster).__mro__ if c.__name__ in names), None)


#: SLURM job states of a job that is over or on its way out (squeue --states=all).
SLURM_ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "COMPLETING", "DEADLINE", "FAILED",
                         "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})


def _ended_jobs(kind: str | None, ids: list[str]) -> dict[str, str] | None:
    """The jobs among ``ids`` that the queue reports as ended, with their state.

    Only SLURM is asked (``squeue``, which keeps ended jobs for a few minutes); a job it does
    not report is not taken as ended (e.g. one submitted to another cluster with ``-M``). None
    when the queue cannot say (another queue, or the controller did not answer): then a job
    counts as ended when its worker has left the scheduler (see :class:`JobKeeper`).
    """
    if kind != "slurm" or not ids:
        return None
    try:
        out = subprocess.run(["squeue", "--noheader", "--format=%i %T", "--states=all",
                              f"--jobs={','.join(ids)}"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # none of them known, or a busy controller
        return None
    states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
    return {job: state for job, state in states.items() if state in SLURM_ENDED}


class JobKeeper:
    """Keep a dask-jobqueue cluster at its number of jobs while a run needs them.

    dask-jobqueue submits each job once. A job that ends before the run does (cancelled with
    ``scancel``, killed at its wall time, lost with its node) is not replaced, and when the last
    one is gone the run waits for workers forever. Inside ``with JobKeeper(cluster):`` the jobs
    are checked every ``interval`` seconds (SLURM: the job's state in ``squeue``; LSF and PBS: a
    job ended when its worker left the scheduler and dask dropped it, ~15 s later) and each job
    that ended is replaced by a new one; dask reruns the tiles its worker held.

    Jobs that end young point at a broken set-up rather than bad luck (workers that cannot start,
    a partition that kills them): after more than ``max_early_ends`` jobs ended before their
    worker had been up ``min_uptime`` seconds, or when the queue refuses a replacement, the
    keeper gives up. It logs why and interrupts the thread that entered it (when that is the
    main thread), and the ``with`` block raises :class:`~blockbuster.errors.ClusterError`. The
    tiles finished so far stay recorded: a ``resume=True`` run continues.

    Parameters
    ----------
    cluster : dask_jobqueue.JobQueueCluster
        A cluster made by :func:`jobqueue_cluster` (any dask-jobqueue cluster works).
    interval : float
        Seconds between two checks.
    min_uptime : float
        A job whose worker was up for less than this (or never came up) ended young.
    max_early_ends : int, optional
        How many young ends are tolerated; default: the number of jobs plus 2.
    """

    def __init__(self, cluster: Any, *, interval: float = 5.0, min_uptime: float = 60.0,
                 max_early_ends: int | None = None) -> None:
        self.cluster = cluster
        self.jobs = len(cluster.worker_spec)
        self.kind = _kind(cluster)
        self.interval = interval
        self.min_uptime = min_uptime
        self.max_early_ends = self.jobs + 2 if max_early_ends is None else max_early_ends
        #: Jobs that ended young so far, and all the replacements submitted.
        self.early_ends = 0
        self.replaced: list[str] = []
        #: Why the keeper gave up (None while it keeps the jobs).
        self.failure: str | None = None
        self._up_since: dict[str, float] = {}
        self._tracked: set[str] = set()  # jobs seen submitted (dask holds them in .workers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="blockbuster-jobs", daemon=True)
        self._owner: int | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._owner = threading.get_ident()
        jobs = self.cluster.sync(self._jobs)
        self._tracked.update(name for name, (_, tracked, _) in jobs.items() if tracked)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        try:
            self._thread.join()
        except KeyboardInterrupt:  # our own interruption, arriving late
            if self.failure is None:
                raise
        if self.failure is not None and exc_type is not None:
            raise ClusterError(self.failure) from exc

    # -- the watch ----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except ClusterError as exc:
                self._give_up(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 -- a failed check must not end the run
                log.debug("checking the cluster's jobs failed: %r", exc)

    def check(self) -> list[str]:
        """Replace the jobs that ended since the last check; returns the new jobs' ids.

        Raises
        ------
        ClusterError
            Too many jobs ended young, or the queue refused a replacement.
        """
        now = time.monotonic()
        jobs = self.cluster.sync(self._jobs)
        states = _ended_jobs(self.kind, [job_id for job_id, _, _ in jobs.values() if job_id])
        ended = []
        for name, (job_id, tracked, connected) in jobs.items():
            if connected:
                self._up_since.setdefault(name, now)
            if tracked:
                self._tracked.add(name)
            state = (states or {}).get(job_id or "")
            if state is None and not tracked and name in self._tracked:
                # Still wanted, no longer tracked: dask dropped the job after its worker left
                # (lost-worker-timeout, 15 s; checks come sooner, so none is missed).
                state = "its worker left"
            if state is not None:
                ended.append((name, job_id, state))
        if not ended:
            return []
        for name, job_id, state in ended:
            self._tracked.discard(name)
            since = self._up_since.pop(name, None)
            young = since is None or now - since < self.min_uptime
            self.early_ends += young
            log.warning("%s job %s ended (%s) while the run still needs it; %s. Its output "
                        "file says why", (self.kind or "cluster").upper(), job_id or name, state,
                        "its worker never came up" if since is None
                        else f"its worker had been up about {now - since:.0f} s")
        if self.early_ends > self.max_early_ends:
            raise ClusterError(
                f"{self.early_ends} {(self.kind or 'cluster').upper()} jobs ended within "
                f"{self.min_uptime:.0f} s of starting (the last: job {ended[-1][1]}, "
                f"{ended[-1][2]}); the "
                "workers cannot run there: read a job's output file (slurm-<id>.out for "
                "SLURM), fix the cause, then resume the run ($resume)")
        try:
            new = self.cluster.sync(self._replace, [name for name, _, _ in ended])
        except (RuntimeError, OSError) as exc:
            raise ClusterError(_refusal(self.cluster, exc) + "; resume the run ($resume) when "
                               "the queue takes jobs again") from None
        self.replaced += new
        log.info("submitted replacement job(s) %s", ", ".join(new) or "(none)")
        return new

    async def _jobs(self) -> dict[str, tuple[str | None, bool, bool]]:
        """Each job's (id, still tracked by dask, its worker connected), on the cluster's loop."""
        cluster = self.cluster
        connected = {str(w.get("name")) for w in cluster.scheduler_info["workers"].values()}
        return {
            # a job with several processes names its workers <name>-0, <name>-1, ...
            str(name): (getattr(cluster.workers.get(name), "job_id", None),
                        name in cluster.workers,
                        any(w == str(name) or w.startswith(f"{name}-") for w in connected))
            for name in cluster.worker_spec
        }

    async def _replace(self, names: list[str]) -> list[str]:
        """Forget the ended jobs (cancelling any leftover) and submit as many new ones."""
        cluster = self.cluster
        for name in names:
            spec_name = next((n for n in cluster.worker_spec if str(n) == name), name)
            cluster.worker_spec.pop(spec_name, None)
            job = cluster.workers.pop(spec_name, None)
            if job is not None:
                await job.close()
        before = set(cluster.workers)
        await _grow(cluster, self.jobs)
        new = [name for name in cluster.workers if name not in before]
        self._tracked.update(str(name) for name in new)
        return [cluster.workers[name].job_id for name in new
                if getattr(cluster.workers[name], "job_id", None)]

    def _give_up(self, message: str) -> None:
        self.failure = message
        log.error("%s", message)
        if self._owner is not None:
            # a real signal, so that a wait on a lock in the main thread wakes up
            signal.pthread_kill(self._owner, signal.SIGINT)
