"""The run report: what a run did, how long each stage took, and how much memory it used.

The engine fills a :class:`RunRecorder` as it goes; the finished :class:`RunReport` is stored
with the output, in ``attrs["blockbuster"]["report"]`` of the labels array (with the marker
that says the output is complete, so it travels with the labels and cannot disagree with
them). Read it back with :func:`run_report` or ``blockbuster.output_status(path).report``;
``blockbuster segment --json`` prints it.

A run that fails leaves no report in the output (the output is not complete); the error it
raises carries the report so far as ``error.report`` (the CLI's ``--json`` prints it).

Peak memory is that of the process that ran :func:`~blockbuster.tile_process` (``VmHWM``
on Linux, else ``ru_maxrss``): with ``client=`` the tiles' memory is the workers', not
counted here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["RunRecorder", "RunReport", "peak_memory", "run_report"]


def peak_memory() -> tuple[int | None, str]:
    """The peak resident memory of this process in bytes, and where the figure comes from.

    ``VmHWM`` from ``/proc/self/status`` on Linux; else ``getrusage``'s ``ru_maxrss``
    (kilobytes on Linux, bytes on macOS).

    Examples
    --------
    >>> value, how = peak_memory()
    >>> value > 0, how in ("VmHWM", "ru_maxrss")
    (True, True)
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    with contextlib.suppress(OSError, ValueError, ImportError):
        import resource  # not on Windows

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if platform.system() == "Darwin" else maxrss * 1024), "ru_maxrss"
    return None, "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass
class RunReport:
    """What one run did (see the module docstring). Plain data: ``as_dict()`` is JSON.

    Attributes
    ----------
    status : {"complete", "failed"}
    tiles : dict
        ``total``; ``run`` (handled by this run), ``resumed`` (done by earlier runs),
        ``failed``, ``skipped`` (mask or constant input), ``rewritten`` (by the end pass).
    n_labels : int or None
        Objects in the output.
    labels_joined_late : int or None
        Labels that a later tile joined to an earlier one (U shapes closing across tiles).
    seconds : dict
        Wall time per stage (``prepare``, ``segment``, ``end_pass``, ``finish``) and
        ``total``.
    seams : dict or None
        The seam report (:mod:`blockbuster.seams`): per axis, the orphan and ambiguity rates at
        tile borders and at control planes inside tiles, the verdict (``"clean"``, ``"worse
        than controls"``, ``"no borders"``) and the worst borders. None without stitching.
    overlap_auto : dict or None
        With ``overlap="auto"``: the overlap ``chosen``, whether an exact one was ``found``, the
        ``curve`` (figures per overlap tried) and the sample ``window``.
    """

    status: str
    output: str
    input: str
    executor: str
    tiles: dict[str, int]
    seconds: dict[str, float]
    n_labels: int | None = None
    labels_joined_late: int | None = None
    tiles_per_second: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_source: str = "unknown"
    work_dir: str | None = None
    table: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started: str | None = None
    finished: str | None = None
    host: str | None = None
    pid: int | None = None
    blockbuster_version: str | None = None
    seams: dict[str, Any] | None = None
    overlap_auto: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        """A report read back (keys it does not know, from a newer version, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RunRecorder:
    """Collects a run's figures while the engine runs it; :meth:`report` makes the report."""

    def __init__(self, *, output: str, input: str, executor: str, work_dir: str | None,
                 params: dict[str, Any], tiles_total: int):
        self.output, self.input, self.executor = output, input, executor
        self.work_dir = work_dir
        self.params = params
        self.tiles: dict[str, int] = {"total": tiles_total, "run": 0, "resumed": 0,
                                      "failed": 0, "skipped": 0, "rewritten": 0}
        self.seconds: dict[str, float] = {}
        self.started_at = _now()
        self._start = time.perf_counter()
        self.n_labels: int | None = None
        self.labels_joined_late: int | None = None
        self.table: str | None = None
        self.statistics: dict[str, Any] = {}
        self.seams: dict[str, Any] | None = None
        self.overlap_auto: dict[str, Any] | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (added up when a stage runs more than once)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0)
                                       + time.perf_counter() - start, 3)

    def count_tiles(self, progress: Any) -> None:
        """Take the segmentation pass's counts from its :class:`~blockbuster.progress.Progress`."""
        self.tiles["resumed"] = progress.initial
        self.tiles["run"] = progress.n - progress.initial
        self.tiles["failed"] = progress.failed
        self.tiles["skipped"] = progress.skipped

    def report(self, status: str = "complete", error: BaseException | None = None
               ) -> RunReport:
        from . import __version__

        seconds = dict(self.seconds)
        seconds["total"] = round(time.perf_counter() - self._start, 3)
        segment_s = seconds.get("segment")
        ran = self.tiles["run"]
        peak, source = peak_memory()
        return RunReport(
            status=status, output=self.output, input=self.input, executor=self.executor,
            tiles=dict(self.tiles), seconds=seconds, n_labels=self.n_labels,
            labels_joined_late=self.labels_joined_late,
            tiles_per_second=round(ran / segment_s, 4) if ran and segment_s else None,
            peak_memory_bytes=peak, peak_memory_source=source, work_dir=self.work_dir,
            table=self.table, params=self.params, statistics=self.statistics,
            error=None if error is None else f"{type(error).__name__}: {error}",
            started=self.started_at, finished=_now(), host=socket.gethostname(),
            pid=os.getpid(), blockbuster_version=__version__, seams=self.seams,
            overlap_auto=self.overlap_auto)


def run_report(labels: Any) -> RunReport:
    """The report stored with a complete output.

    Parameters
    ----------
    labels : path or zarr.Array
        An output of :func:`~blockbuster.tile_process` (a labels array, an OME-Zarr label
        image, ``<image>/labels/<name>``), or the array it returned.

    Raises
    ------
    IncompleteOutputError
        The output is not complete (its run did not finish: no report yet).
    InputError
        No blockbuster output there, or one written before reports existed.
    """
    from .errors import InputError
    from .output import completion
    from .status import open_labels

    arr = labels if hasattr(labels, "attrs") else open_labels(Path(labels))
    meta = completion(arr) or {}
    data = meta.get("report")
    if not isinstance(data, dict):
        raise InputError(f"{labels} has no run report (written by a blockbuster version "
                         "without reports, or not by tile_process)")
    return RunReport.from_dict(data)
