"""One run, start to end: take the locks, decide fresh or resumed, segment, finish, verify.

The same steps whatever executes the tiles (see :mod:`blockbuster.engine.executors`):

1. check the output and work locations, lock them, and decide between a fresh run, a resumed
   one (same parameters), or refusing (:func:`prepare_work`);
2. open the output (this run's own unfinished one, or a new one) and read the run's state;
3. segment every tile not done yet; the committer assigns labels in grid order and writes each
   core (:mod:`blockbuster.engine.commit`);
4. the end pass: rewrite the tiles holding labels a later tile joined, fold the object table;
5. verify what was written, add the OME-Zarr pyramid, mark the output complete, delete the
   work directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import InputError, OutputExistsError, WorkDirError, writing
from ..output import (
    FORMAT_VERSION,
    LabelView,
    OutputTarget,
    check_parent_is_folder,
    completion,
    label_chunks,
    label_shards,
    mark_complete,
    verify_output,
)
from ..plan import RunPlan
from ..progress import make_progress
from ..report import RunRecorder
from ..segmenter import Segmenter
from ..stitching import apply_changes
from ..tasks import TaskContext
from .commit import Committer
from .executors import Executor
from .state import PackWriter, RunState, WorkDir, check_same_params

__all__ = ["EndResult", "execute", "manifest_for", "prepare_work"]

log = logging.getLogger("blockbuster")

#: The end pass rewrites tiles on two threads (decompression, compression and file I/O
#: release the GIL) while a tile's buffers are small; larger tiles go one at a time, so that
#: a second thread's buffers never exceed what "auto" sizing reserved for one tile.
IO_THREADS = 2
IO_THREADS_MAX_TILE_VOXELS = 2**20


def manifest_for(plan: RunPlan, target: OutputTarget) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "params": plan.params(), "output": target.describe()}


# -- 1. fresh, resumed, or refused ------------------------------------------------------------
def check_locations(target: OutputTarget, work: WorkDir, inputs: list[Path | None]) -> None:
    """Refuse, before anything is written, an output or work directory that is not safe."""
    if target.path is not None:
        check_parent_is_folder(target.path, "output")
    work.check_usable()
    # A run's own unfinished output may have lost its metadata (deleted during the run, then
    # partly written again); its work directory names it, which proves it is ours to replace.
    claimed = False
    if work.exists():
        try:
            claimed = work.read_manifest().get("output") == target.describe()
        except (InputError, WorkDirError):  # a damaged manifest proves nothing
            claimed = False
    target.check_location(inputs, claimed=claimed)
    paths = [p for p in (*inputs, target.path) if p is not None]
    w = work.path.resolve()
    for path in paths:
        p = Path(path).resolve()
        if w == p or w.is_relative_to(p) or p.is_relative_to(w):
            raise InputError(f"the work directory {work.path} would be inside, or hold, {path}; "
                             "pass a $work_dir outside the input and the output")


def prepare_work(target: OutputTarget, work: WorkDir, manifest: dict[str, Any], *,
                 overwrite: bool, resume: bool) -> zarr.Array | None:
    """Decide between a fresh run, a resumed one, or refusing (the locks are held).

    Returns the existing output when it is already complete with the same parameters.
    """
    if work.exists() and not overwrite:
        if not resume:
            raise OutputExistsError(
                f"an unfinished run left {work.path}; pass $resume to continue it, or "
                "$overwrite to start again")
        work.check_same_run(manifest)
        finished = complete_output(target, manifest)
        if finished is not None:
            work.remove()
        # else the output is this run's own unfinished one, or a stale one that an
        # overwrite run (the one being resumed) had not replaced yet: the run goes on
        return finished
    if target.exists() and not overwrite:
        existing = completion(target.open())
        if resume and existing and existing.get("complete"):
            check_same_params(existing.get("params", {}), manifest["params"], target.describe())
            work.remove()  # what a clean-up cut short left (never anything but our entries)
            return target.open()
        raise OutputExistsError(
            f"output {target.describe()} already exists; pass $overwrite to "
            "replace it (or choose another output)")
    if overwrite:
        # The old labels go first: a run stopped before its first tile must not leave them
        # looking like the result of the new arguments.
        target.remove()
        work.clear()
    work.create(manifest)
    return None


def complete_output(target: OutputTarget, manifest: dict[str, Any]) -> zarr.Array | None:
    """The output, when it is complete and was made with exactly these parameters."""
    if not target.exists():
        return None
    out = target.open()
    meta = completion(out) or {}
    return out if meta.get("complete") and meta.get("params") == manifest["params"] else None


# -- 2.-5. the run ----------------------------------------------------------------------------
@dataclass
class EndResult:
    """What the end pass learned: the label count, and what to verify and tabulate."""

    n_labels: int
    has_labels: np.ndarray
    table: dict[str, np.ndarray] | None
    tiles_rewritten: int = 0


def execute(plan: RunPlan, target: OutputTarget, work: WorkDir, manifest: dict[str, Any], *,
            executor: Executor, progress: bool | None, table_path: Path | None,
            keep_work: bool, seam_table: Path | None = None,
            report_extra: dict[str, Any] | None = None) -> zarr.Array:
    """Steps 2-5 (see the module docstring); the work directory is prepared and locked.

    The run's report (:mod:`blockbuster.report`) is stored with the output; an error raised
    here carries the report so far as its ``report`` attribute.
    """
    grid = plan.grid
    log.info("%s", plan.describe())
    recorder = RunRecorder(output=target.describe(), input=manifest["params"]["input"],
                           executor=executor.name, work_dir=str(work.path),
                           params=manifest["params"], tiles_total=grid.n_tiles)
    recorder.overlap_auto = (report_extra or {}).get("overlap_auto")
    state = RunState(work, grid.n_tiles)
    writer: PackWriter | None = None
    try:
        output = _open_output(target, plan, work, manifest, state)
        if output is None:  # the earlier tiles' output is gone: all of them run again
            state.close()
            work.clear_tiles()
            state = RunState(work, grid.n_tiles)
            output = _create_output(target, plan, manifest, uint64=False)
        writer = PackWriter(work.packs_dir, state.attempts + 1, "main")
        if isinstance(plan.fn, Segmenter):
            with recorder.stage("prepare"):
                plan.fn.prepare(plan.source)
        view = LabelView(output, plan.source)

        def to_uint64() -> LabelView:
            with writing("the labels", target.describe()):
                return LabelView(target.convert_to_uint64(committer.output.array), plan.source)

        committer = Committer(grid, plan.stitcher(), state, writer, view, to_uint64,
                              remote_writes=executor.remote_writes)
        # a new run: every tile, without a list of a million ints
        todo: Sequence[int] = [t for t in range(grid.n_tiles) if t not in state.seg] \
            if len(state.seg) else range(grid.n_tiles)
        done = grid.n_tiles - len(todo)
        if done:
            log.info("resuming: %d of %d tiles already done", done, grid.n_tiles)
        ctx = TaskContext(plan.source, plan.fn, plan.fn_label, grid, committer.stitcher,
                          work.path, writer.attempt, table=plan.table, retries=plan.retries,
                          mask=plan.mask, skip_empty=plan.skip_empty, measure=plan.measure,
                          timeout=plan.timeout)
        with recorder.stage("segment"), \
                make_progress(grid.n_tiles, "segmenting", progress, initial=done) as bar:
            try:
                segment_tiles(executor, ctx, todo, committer, bar)
            finally:
                recorder.count_tiles(bar)
        committer.check_done()
        writer.sync()
        with recorder.stage("end_pass"):
            result = _end_pass(plan, committer, writer, progress)
        _record_end_pass(recorder, committer, result)
        _record_seams(plan, recorder, committer, seam_table)
        output = committer.output.array
        with recorder.stage("finish"):
            verify_output(target, committer.output, grid, manifest, result.has_labels)
            with writing("the labels", target.describe()):
                target.finalize()
            if table_path is not None and result.table is not None:
                from ..table import write_object_table

                with writing("the object table", table_path):
                    write_object_table(result.table, table_path)
        statistics = plan.fn.statistics if isinstance(plan.fn, Segmenter) else None
        recorder.statistics = statistics or {}
        recorder.table = str(table_path) if table_path is not None else None
        mark_complete(output, manifest, result.n_labels,
                      table=str(table_path) if table_path is not None else None,
                      statistics=statistics, report=recorder.report().as_dict(),
                      axes=plan.source.label_axes, spacing_um=_spatial_spacing(plan.source))
    except BaseException as exc:  # Ctrl-C too: the CLI's --json prints the report so far
        _attach_report(exc, recorder)
        nothing_done = not state.seg
        _close(writer, state)
        if nothing_done and isinstance(exc, Exception):  # Ctrl-C and kills stay resumable
            _roll_back(target, work)
        raise
    _close(writer, state)
    if not keep_work:
        work.remove()
    log.info("wrote %d objects to %s", result.n_labels, target.describe())
    return output


def _close(writer: PackWriter | None, state: RunState) -> None:
    if writer is not None:
        writer.close()
    state.close()


def _roll_back(target: OutputTarget, work: WorkDir) -> None:
    """Remove what a run that failed before segmenting any tile made: its output (never
    complete, and this run's own: the location was checked before) and its state, so that the
    corrected rerun starts afresh, without $resume or $overwrite.

    A run stopped by Ctrl-C or SIGTERM is not rolled back: it can be resumed.
    """
    try:
        target.remove(claimed=True)
        work.clear()
    except OSError as exc:  # the original error matters more; the next run can still clear
        log.warning("could not remove the unfinished run's output or work directory: %s", exc)
        return
    log.info("no tile was segmented: removed the unfinished output %s and its work directory",
             target.describe())


def _record_end_pass(recorder: RunRecorder, committer: Committer, result: EndResult) -> None:
    book = committer.book
    recorder.n_labels = result.n_labels
    recorder.labels_joined_late = book.next_label - 1 - book.n_labels
    recorder.tiles["rewritten"] = result.tiles_rewritten


def _record_seams(plan: RunPlan, recorder: RunRecorder, committer: Committer,
                  seam_table: Path | None) -> None:
    """The seam report into the run report; its table written; a warning for bad seams."""
    from ..seams import flag_text, write_seam_table

    source = plan.source
    names = [source.axes[a].name for a in source.tiled_axes]
    seams = committer.seams.report(names)
    if seams is None:
        return
    recorder.seams = seams.as_dict()
    if seam_table is not None:
        with writing("the seam table", seam_table):
            write_seam_table(seams, names, seam_table)
    if seams.worse:
        log.warning("%s", flag_text(recorder.seams))
    elif seams.borders:
        log.info("seams: %s (%d borders, %d flagged)", seams.verdict, seams.borders,
                 seams.flagged)


def _attach_report(exc: BaseException, recorder: RunRecorder) -> None:
    """The report so far, on the error (``error.report``), for whoever renders it."""
    if getattr(exc, "report", None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            exc.report = recorder.report("failed", exc)  # type: ignore[attr-defined]


def segment_tiles(executor: Executor, ctx: TaskContext, todo: Sequence[int], committer: Committer,
                  bar: Any) -> None:
    """Step 3: the executor runs the tiles; the committer labels and writes each one."""
    executor.run(ctx, todo, committer, bar)


def _open_output(target: OutputTarget, plan: RunPlan, work: WorkDir, manifest: dict[str, Any],
                 state: RunState) -> zarr.Array | None:
    """This run's own unfinished output, a new one, or None when earlier tiles lost theirs."""
    target.recover_conversion()
    if target.exists():
        meta = completion(target.open()) or {}
        if meta.get("params") == manifest["params"] and not meta.get("complete"):
            return target.open("r+")
    if state.seg:
        log.warning("the output of the unfinished run in %s is missing; its tiles run again",
                    work.path)
        return None
    return _create_output(target, plan, manifest, uint64=state.uint64)


def _create_output(target: OutputTarget, plan: RunPlan, manifest: dict[str, Any], *,
                   uint64: bool) -> zarr.Array:
    attrs = {"blockbuster": {"complete": False, "params": manifest["params"]}}
    dtype = np.dtype(np.uint64 if uint64 else np.uint32)
    # Not for stitch="whole": its tiles are written well after the frontier passes them, so
    # a shard would be written before all its tiles are in.
    shards = None if target.is_ome or plan.stitch.mode == "whole" else label_shards(
        plan.source, plan.grid)
    with writing("the labels", target.describe()):
        return target.create(plan.source.label_shape, label_chunks(plan.source, plan.grid),
                             dtype, attrs, shards=shards)


def _end_pass(plan: RunPlan, committer: Committer, writer: PackWriter,
              progress: bool | None) -> EndResult:
    """One pass over the tiles' records: labels joined late are rewritten, the table folded."""
    grid, state = plan.grid, committer.state
    old, new = committer.final_changes()
    has_labels = np.zeros(grid.n_tiles, bool)
    reducer = None
    if plan.table:
        from ..measurements import MeasurementReducer

        channels = plan.source.n_channels if plan.measure else 0
        reducer = MeasurementReducer(grid.ndim, channels, capacity=committer.book.n_labels)
    todo = []
    for t in range(grid.n_tiles):
        entry = state.record(t)
        counts = entry.get("counts")
        # a tile assigned at once holds its global labels in its own record: read it once
        glabels = entry.get("glabels") if state.assignment[t] == entry.ref \
            else state.assigned_labels(t)[0]
        # stitch="whole": only the objects the tile kept are written from its own labels
        has_labels[t] = bool(((counts[1:] > 0) & (glabels[1:] > 0)).any()) \
            if committer.whole else bool(counts[1:].any())
        final = apply_changes(glabels, old, new)
        if reducer is not None and has_labels[t]:
            stats = entry.get_prefixed("s:")
            if committer.whole:  # the objects it kept, measured whole (see tasks.summarize)
                counts = np.where(final > 0, stats.pop("whole_counts"), 0)
            reducer.add({"counts": counts, **stats}, final)
        # (not np.isin(glabels, old): it sorts all of ``old`` again for every tile)
        if t not in state.fixed and not np.array_equal(final, glabels):
            todo.append(t)
    log.info("%d objects; %d tile(s) hold labels joined or moved after they were written",
             committer.book.n_labels, len(todo))
    threads = IO_THREADS if math.prod(grid.tile_shape) <= IO_THREADS_MAX_TILE_VOXELS else 1
    groups = [[t] for t in todo]
    if committer.shards is not None:
        # a shard's tiles are rewritten together: one read and one write of the shard (not one
        # per tile), and never two threads on one shard (one would lose the other's write)
        shard = committer.shards.shard_ids(np.asarray(todo, np.int64))
        groups = _split_sorted(todo, shard)
    elif committer.output.array.shards is not None:
        threads = 1  # sharded but not in our layout: two tiles of one shard would race
    with make_progress(len(todo), "merging", progress) as bar, \
            ThreadPoolExecutor(threads, thread_name_prefix="blockbuster-fix") as pool:
        for done in pool.map(lambda g: _fix_tiles(committer, writer, g, old, new), groups):
            bar.update(done)
    return EndResult(committer.book.n_labels, has_labels,
                     _table_columns(plan, reducer) if reducer is not None else None,
                     tiles_rewritten=len(todo))


def _table_columns(plan: RunPlan, reducer: Any) -> dict[str, np.ndarray]:
    """The object table, columns named after the image's axes and channels, in µm too."""
    source = plan.source
    names = [source.axes[a].name for a in source.tiled_axes]
    channel_names = None
    if plan.measure:
        given = source.channel_names
        channel_names = ([str(c) for c in given] if given else
                         [None] if source.n_channels == 1 else
                         [f"ch{i}" for i in source.channel_indices])
    spacing = source.spacing_um
    return reducer.columns(spacing=spacing if any(v is not None for v in spacing) else None,
                           names=names, channel_names=channel_names)


def _spatial_spacing(source: Any) -> tuple[float | None, ...] | None:
    """The voxel size in µm of the labels' spatial axes; None for a time series, whose labels
    are not a spatial image."""
    if source.time_positions:
        return None
    return source.spacing_um


def _split_sorted(todo: list[int], keys: np.ndarray) -> list[list[int]]:
    """``todo`` in groups of equal ``keys`` (grid order kept within a group)."""
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    return [[todo[i] for i in part] for part in np.split(order, cuts)] if todo else []


def _fix_tiles(committer: Committer, writer: PackWriter, tile_ids: list[int], old: np.ndarray,
               new: np.ndarray) -> int:
    """Rewrite tiles whose labels were joined or moved after they were written: one read and
    one write of the region holding them all (one tile, or the tiles of one shard).

    What each tile holds is backed up first (and made durable before anything is written),
    and a retry starts from that copy: the change is not idempotent (a label moved into a gap
    has the value an absorbed label had), so a crash at any moment followed by a resume still
    gives the same result.
    """
    state, output, grid = committer.state, committer.output, committer.grid
    cores = [grid.tile(t).core for t in tile_ids]
    region = tuple(slice(min(c[a].start for c in cores), max(c[a].stop for c in cores))
                   for a in range(len(cores[0])))
    held = np.array(output[region])
    within = [tuple(slice(c.start - r.start, c.stop - r.start) for c, r in
                    zip(core, region, strict=True)) for core in cores]
    backed_up = False
    for t, box in zip(tile_ids, within, strict=True):
        backup = state.backups.get(t)
        if backup is not None:
            held[box] = state.entry(backup).get("labels")
        else:
            ref = writer.append("bak", t, {}, {"labels": held[box].copy()})
            state.note("bak", t, ref, {})
            backed_up = True
    if backed_up:
        writer.sync()
    for box in within:
        held[box] = apply_changes(held[box], old, new)
    output[region] = held
    for t in tile_ids:
        ref = writer.append("fix", t)
        state.note("fix", t, ref, {})
    return len(tile_ids)
