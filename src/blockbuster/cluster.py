"""Scaling out on dask.distributed: a local cluster (one worker per GPU), or a job-queue cluster.

blockbuster never schedules work itself beyond its serial mode: with more than one process it
hands the tile tasks to a ``distributed.Client``. This module builds the usual clusters:

* :func:`local_cluster` -- N worker processes on this machine, one thread each (one model per
  worker). With ``gpus=[0, 1]`` each worker is pinned to its own GPU through
  ``CUDA_VISIBLE_DEVICES``, set in the worker's environment before anything touches CUDA.
* :func:`jobqueue_cluster` -- SLURM, LSF or PBS jobs through dask-jobqueue
  (``pip install "blockbuster[cluster]"``).
"""

from __future__ import annotations

from typing import Any

from .errors import InputError, PluginNotInstalledError

__all__ = ["local_cluster", "jobqueue_cluster", "gpu_worker_specs", "CLUSTER_KINDS"]

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


def local_cluster(n_workers: int = 2, *, gpus: list[int] | None = None,
                  memory_limit: str | int | None = "auto", dashboard: bool = False) -> Any:
    """A cluster of worker processes on this machine.

    Parameters
    ----------
    n_workers : int
        Worker processes (ignored when ``gpus`` is given: one worker per GPU).
    gpus : list of int, optional
        GPU indices; each gets one worker pinned to it.
    memory_limit : str or int
        Per-worker memory limit, as dask understands it.
    """
    if gpus:
        from distributed import Scheduler, SpecCluster

        scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "dashboard": dashboard}}
        limit = None if memory_limit == "auto" else memory_limit
        return SpecCluster(workers=gpu_worker_specs(list(gpus), limit), scheduler=scheduler)
    if n_workers < 1:
        raise InputError(f"workers={n_workers} must be >= 1")
    from distributed import LocalCluster

    # ":0": a free port, so a second cluster on the machine never collides on 8787
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        memory_limit=memory_limit, dashboard_address=":0",
                        scheduler_kwargs={"dashboard": dashboard})


def jobqueue_cluster(kind: str, *, cores: int = 1, memory: str = "16GB", processes: int = 1,
                     walltime: str | None = None, queue: str | None = None,
                     account: str | None = None, gpus_per_job: int = 0, jobs: int = 1,
                     job_extra_directives: list[str] | None = None,
                     job_script_prologue: list[str] | None = None, **kwargs: Any) -> Any:
    """A dask-jobqueue cluster for SLURM, LSF or PBS, scaled to ``jobs`` jobs.

    ``gpus_per_job`` adds the scheduler's GPU request (``--gres=gpu:N`` for SLURM). Call
    ``cluster.job_script()`` to see exactly what would be submitted.
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
        cluster.scale(jobs=jobs)
    return cluster
