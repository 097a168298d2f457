"""What lies at an output path: complete labels, an unfinished run, or nothing of ours.

:func:`output_status` reads it without changing anything (``blockbuster info``, scripts that
ask "is it done?"), and :func:`open_labels` opens labels only when they are complete.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zarr

from .errors import IncompleteOutputError, InputError, WorkDirError
from .locks import holder_of
from .output import completion, ome_work_dir, output_lock_path, work_dir_for

__all__ = ["OutputStatus", "WorkStatus", "open_labels", "output_status", "work_dirs_for"]


def work_dirs_for(path: str | Path) -> list[Path]:
    """The work directories an output at ``path`` can have (default locations).

    ``path`` is a labels array, a standalone label image, or ``<image>/labels/<name>``.
    """
    path = Path(path)
    found = [work_dir_for(path)]
    if path.parent.name == "labels":
        found.append(ome_work_dir(path.parent.parent, path.name))
    return found


@dataclass
class WorkStatus:
    """An unfinished run's work directory: how far it got, and whether it runs now."""

    path: str
    resumable: bool
    problem: str | None = None
    tiles_total: int | None = None
    tiles_done: int = 0
    tiles_failed: list[int] = field(default_factory=list)
    running: str | None = None

    @classmethod
    def read(cls, path: Path) -> WorkStatus | None:
        from .engine.state import WorkDir

        work = WorkDir(path)
        if not path.is_dir():
            return None
        running = holder_of(path / "lock")
        if not work.exists():
            return None if not any(path.iterdir()) else cls(
                str(path), False, "no manifest: a run was refused or stopped at once",
                running=running)
        try:
            state = work.state()
        except WorkDirError as exc:
            return cls(str(path), False, str(exc), running=running)
        try:
            return cls(str(path), True, None, state.n_tiles, len(state.seg),
                       sorted(state.failed), running)
        finally:
            state.close()


@dataclass
class OutputStatus:
    """The labels at a path, as blockbuster sees them."""

    path: str
    exists: bool
    written_by_blockbuster: bool = False
    complete: bool = False
    n_labels: int | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    chunks: list[int] | None = None
    kind: str | None = None  # "zarr array" or "OME-Zarr label image"
    params: dict[str, Any] = field(default_factory=dict)
    table: str | None = None
    work: list[WorkStatus] = field(default_factory=list)
    running: str | None = None
    #: the run's report (:class:`blockbuster.report.RunReport` as a dict), for a complete output
    report: dict[str, Any] | None = None

    @property
    def leftover_work(self) -> bool:
        """A work directory beside a complete output (a run stopped during its cleanup)."""
        return self.complete and bool(self.work)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open_array(path: Path) -> zarr.Array | None:
    with contextlib.suppress(Exception):  # not zarr, or not an array/label image
        node = zarr.open(store=str(path), mode="r")
        if isinstance(node, zarr.Group):
            return node["0"] if "0" in node and isinstance(node["0"], zarr.Array) else None
        return node
    return None


def output_status(path: str | Path) -> OutputStatus:
    """What lies at ``path``: labels of ours (complete or not), their run, or nothing."""
    path = Path(path)
    status = OutputStatus(str(path), path.exists())
    status.work = [w for w in (WorkStatus.read(p) for p in work_dirs_for(path)) if w is not None]
    status.running = holder_of(output_lock_path(path)) or next(
        (w.running for w in status.work if w.running), None)
    arr = _open_array(path) if status.exists else None
    meta = completion(arr) if arr is not None else None
    if arr is None or meta is None:
        return status
    status.written_by_blockbuster = True
    status.complete = meta.get("complete") is True
    n = meta.get("n_labels")
    status.n_labels = int(n) if isinstance(n, int) else None
    status.shape, status.chunks = list(arr.shape), list(arr.chunks)
    status.dtype = str(arr.dtype)
    status.kind = "OME-Zarr label image" if arr.path.endswith("0") and arr.path else "zarr array"
    params = meta.get("params")
    status.params = params if isinstance(params, dict) else {}
    table = meta.get("table")
    status.table = table if isinstance(table, str) else None
    report = meta.get("report")
    status.report = report if isinstance(report, dict) and status.complete else None
    return status


def open_labels(path: str | Path, *, allow_incomplete: bool = False) -> zarr.Array:
    """Open labels written by :func:`tile_process`, refusing an unfinished output.

    ``path`` is a labels array, or an OME-Zarr label image group (its level 0 is opened).

    Raises
    ------
    IncompleteOutputError
        The run that writes this output has not finished (or died); resume it.
    InputError
        There are no labels at ``path``.
    """
    arr = _open_array(Path(path))
    if arr is None:
        if any((p / "manifest.json").exists() for p in work_dirs_for(path)):
            raise IncompleteOutputError(
                f"{path} has no labels yet: the run that writes them did not finish; rerun it "
                "with $resume")
        raise InputError(f"no labels at {path}: it is not a zarr array or OME-Zarr label "
                         "image")
    meta = completion(arr)
    if not allow_incomplete and (meta is None or not meta.get("complete")):
        raise IncompleteOutputError(
            f"{path} is not a complete blockbuster output (the run that writes it did not "
            "finish); rerun tile_process with $resume to finish it")
    return arr
