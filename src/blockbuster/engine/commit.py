"""The one stitcher of a run: global labels handed out in grid order, each core written once.

Tiles may finish in any order (threads, dask workers, a resume after failures). The
:class:`Committer` receives each :class:`~blockbuster.tasks.SegmentedTile` as it finishes and
keeps a *frontier*: the first tile in grid order that has no global labels yet. When the
frontier tile is there, it is matched with its neighbours before it (all assigned already, read
from their records), gets its global labels from the :class:`LabelBook`, and its core is
written to the output with those labels: straight from memory when the tile was segmented in
this process, else from the labels its worker kept (``raw``). A tile that finishes ahead of the
frontier only has its record and labels saved until the frontier reaches it. So the labels are
the same, id for id, whoever ran which tile and in whatever order they finished.

At the end (:meth:`Committer.finish`), the few tiles holding labels that a later tile joined
(a U shape closing) are rewritten, after a backup of what they held, so that the final labels
are consecutive, 1..N.

With ``stitch="whole"`` (:mod:`blockbuster.stitching.whole`) every tile is kept (record and
raw core labels) when it arrives: the frontier tile is assigned once its neighbours *after* it
are segmented too (which of its objects it keeps depends on their versions of them), and its
core is written once its last neighbour is assigned (a :class:`WriteJob` with the neighbours'
records, whose kept objects spill into it). Nothing is merged, so nothing is rewritten at the
end; a resumed run queues the assigned tiles not yet written the same way.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BlockbusterError, TileError, TileFailures
from ..output import LabelView, ShardBuffer
from ..seams import SeamRecorder
from ..stitching import (
    UINT32_LIMIT,
    LabelBook,
    LabelOverflow,
    Stitcher,
    TileBoundary,
)
from ..stitching.whole import WholeStitcher, spill
from ..tasks import SegmentedTile
from ..tiling import Tile, TileGrid
from .state import Entry, EntryRef, PackWriter, RunState

__all__ = ["FAIL_FAST_AFTER", "Committer", "Spill", "WriteJob", "write_jobs"]

log = logging.getLogger("blockbuster")

#: Stop early when this many tiles failed before any succeeded: the fn is broken, not the data.
FAIL_FAST_AFTER = 3
UINT64_LIMIT = int(np.iinfo(np.uint64).max)


@dataclass(frozen=True)
class Spill:
    """A neighbour's kept objects that reach into a tile's core (``stitch="whole"``)."""

    tile_id: int
    record: EntryRef
    glabels: np.ndarray


@dataclass(frozen=True)
class WriteJob:
    """Write a tile's core from the labels its worker kept, through its global labels.

    ``raw`` is None for a skipped tile (background). ``spill``: with ``stitch="whole"``, the
    neighbours whose kept objects fill the voxels the tile's own kept objects leave empty, in
    grid order.
    """

    tile_id: int
    raw: EntryRef | None
    glabels: np.ndarray
    spill: tuple[Spill, ...] = ()


def write_jobs(output: LabelView, grid: TileGrid, work_path: Any, jobs: list[WriteJob],
               ) -> list[int]:
    """Write tiles from their kept labels (runs on a worker); returns their ids."""
    from pathlib import Path

    from .state import _PackReader

    reader = _PackReader(Path(work_path) / "packs")
    try:
        for job in jobs:
            core = job_core(output.dtype, grid, job, reader)
            if core is not None:
                output[grid.tile(job.tile_id).core] = core
    finally:
        reader.close()
    return [job.tile_id for job in jobs]


def job_core(dtype: np.dtype, grid: TileGrid, job: WriteJob, reader: Any) -> np.ndarray | None:
    """A tile's core with its final labels (None: a skipped tile that nothing reaches)."""
    if not job.spill and job.raw is not None:
        return job.glabels.astype(dtype)[reader.entry(job.raw).get("labels")]
    return _whole_core(dtype, grid, grid.tile(job.tile_id), job, reader)


def _whole_core(dtype: np.dtype, grid: TileGrid, tile: Tile, job: WriteJob, reader: Any,
                ) -> np.ndarray | None:
    """A tile's core under ``stitch="whole"``: its kept objects, then its neighbours' that
    spill into it (None: a skipped tile that nothing reaches; it stays background)."""
    if job.raw is not None:
        core = job.glabels.astype(dtype)[reader.entry(job.raw).get("labels")]
    else:
        core = np.zeros(tuple(s.stop - s.start for s in tile.core), dtype)
    reached = job.raw is not None
    for part in job.spill:
        found = spill(grid, tile, grid.tile(part.tile_id),
                      _LazyArrays(reader.entry(part.record), "b:").get)
        if found is None:
            continue
        region, local = found
        values = part.glabels.astype(dtype)[local]
        target = core[region]
        empty = (target == 0) & (values > 0)
        if empty.any():
            target[empty] = values[empty]
            reached = True
    return core if reached else None


class Committer:
    """Assigns global labels in grid order and writes every tile's core (see the module).

    Parameters
    ----------
    grid, stitcher
        The tile grid and the stitcher of the run's mode.
    state, writer
        The run's state (read at the start) and this process's pack writer.
    output
        The output, seen over the tiled axes (uint32, or uint64 once more objects were found).
    convert_to_uint64
        Called when the labels outgrow uint32: converts the output and returns the new array.
    remote_writes
        Write tiles from kept labels through :class:`WriteJob` s that the executor runs (on the
        workers that hold the data) instead of in this process.
    """

    def __init__(self, grid: TileGrid, stitcher: Stitcher, state: RunState, writer: PackWriter,
                 output: LabelView, convert_to_uint64: Callable[[], LabelView], *,
                 remote_writes: bool = False, on_progress: Callable[[SegmentedTile], None] |
                 None = None):
        self.grid = grid
        self.stitcher = stitcher
        self.state = state
        self.writer = writer
        self.output = output
        self._convert = convert_to_uint64
        #: a sharded output: cores gathered per shard, each shard written once, here (two
        #: workers writing tiles of one shard would lose each other's)
        self.shards = ShardBuffer.for_output(output, grid)
        self.remote_writes = remote_writes and self.shards is None
        self.on_progress = on_progress
        self.failures: list[TileError] = []
        self.succeeded = 0
        self.book = self._replay()
        #: the seam report's figures, gathered as tiles are matched (borders matched by an
        #: earlier run that this one resumes are not in it)
        self.seams = SeamRecorder(grid, stitcher.numbers_padded, stitcher.iou_threshold,
                                  active=bool(stitcher.offsets()))
        self.frontier = 0
        self._pending_jobs: list[WriteJob] = []
        self._pending_writes: set[int] = set()
        self._records: OrderedDict[int, Entry] = OrderedDict()
        self._window = self._backward_window()
        #: ``stitch="whole"``: a tile is assigned once its later neighbours are segmented, and
        #: written once all its neighbours are assigned (these wait for that)
        self.whole = stitcher.whole_objects
        self._to_write: list[tuple[int, int]] = []  # heap: (its last neighbour, tile)
        self._glabels_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        if self.whole:
            self._window *= 2  # the records of later neighbours are read too
        self._skip_assigned()

    # -- start ------------------------------------------------------------------------------
    def _replay(self) -> LabelBook:
        """The labels handed out so far, rebuilt from the assigned tiles, in grid order."""
        state = self.state
        limit = UINT64_LIMIT if state.uint64 or self.output.dtype == np.uint64 else UINT32_LIMIT
        book = LabelBook(max_label=limit)
        prefix = 0
        while prefix in state.assignment:
            prefix += 1
        broken = [t for t in state.assignment if t > prefix]
        if broken:  # a hole in the assigned prefix (a damaged record): assign again from there
            forgotten = state.forget_from(prefix)
            log.warning("resuming from tile %d on: %d tile(s) are assigned again and %d run "
                        "again", prefix, len(broken), len(forgotten))
        for t in range(prefix):
            glabels, merges = state.assigned_labels(t)
            book.replay(glabels, merges)
        return book

    def _skip_assigned(self) -> None:
        while self.frontier in self.state.assignment:
            self.frontier += 1

    def _backward_window(self) -> int:
        """How far back in grid order a tile's earliest neighbour lies (record cache size)."""
        strides = np.cumprod((1,) + self.grid.grid_shape[::-1][:-1])[::-1]
        return int(strides.sum()) + 2

    def unwritten(self) -> list[int]:
        """Assigned tiles whose core is not in the output yet (a resumed run writes them).

        With a sharded output, every tile of a shard that holds such a tile is written again
        too (from its record, which keeps its labels): the shard is rebuilt from the records and
        written whole, never read back, so a shard torn by a crash is simply replaced.
        """
        written = self.state.written
        missing = {t for t in self.state.assignment if t not in written}
        if self.shards is not None and written:
            # shards with a tile not in the output (unassigned, failed or unwritten)
            shard = self.shards.shard_ids(np.arange(self.grid.n_tiles))
            is_written = np.zeros(self.grid.n_tiles, bool)
            is_written[list(written)] = True
            incomplete = np.unique(shard[~is_written])
            redo = np.flatnonzero(np.isin(shard, incomplete) & is_written)
            redo_assigned = [int(t) for t in redo if int(t) in self.state.assignment]
            written.difference_update(redo_assigned)
            missing.update(redo_assigned)
        return sorted(missing)

    # -- tiles arriving ---------------------------------------------------------------------
    def accept(self, seg: SegmentedTile) -> list[WriteJob]:
        """Take one finished tile (in any order); returns writes for the executor to run."""
        if seg.error is not None:
            self._fail(seg.error)
            return []
        self.succeeded += 1
        if self.on_progress is not None:
            self.on_progress(seg)
        if seg.tile_id == self.frontier and not self.whole:
            self._commit_at_frontier(seg)
        else:
            self._keep(seg)
        return self.advance()

    def _fail(self, error: TileError) -> None:
        tile_id = int(np.ravel_multi_index(error.tile_index, self.grid.grid_shape))
        ref = self.writer.append("fail", tile_id, {"error": str(error),
                                                   "traceback": error.traceback_text or ""})
        self.state.note("fail", tile_id, ref, {})
        self.failures.append(error)
        if self.succeeded == 0 and len(self.failures) >= FAIL_FAST_AFTER:
            raise tile_failures(self.failures, stopped_early=True)

    def _keep(self, seg: SegmentedTile) -> None:
        """A tile ahead of the frontier: save its labels and record until its turn."""
        raw = seg.raw
        if raw is None and seg.labels is not None:
            raw = self.writer.append("raw", seg.tile_id, {}, {"labels": seg.labels})
        meta: dict[str, Any] = {"n": seg.n, "skipped": seg.skipped}
        if raw is not None:
            meta["raw"] = raw.as_json()
        ref = self.writer.append("seg", seg.tile_id, meta, seg.record_arrays())
        self.state.note("seg", seg.tile_id, ref, meta)

    def _commit_at_frontier(self, seg: SegmentedTile) -> None:
        """The frontier tile, in memory: assign, write its core, then record both at once."""
        tile = self.grid.tile(seg.tile_id)
        boundary = seg.boundary or TileBoundary(np.zeros(1, np.int64))
        glabels, merges = self._assign(tile, boundary)
        if not seg.skipped:
            self.seams.add_control(seg.control)
        meta: dict[str, Any] = {"n": seg.n, "skipped": seg.skipped, "assigned": True}
        arrays = {**seg.record_arrays(), "glabels": glabels, "merges": merges}
        if seg.labels is not None and self.shards is not None:
            arrays["labels"] = seg.labels  # kept until its shard is written (a resume needs it)
            meta["raw_here"] = True
        elif seg.labels is not None:
            self.output[tile.core] = glabels.astype(self.output.dtype)[seg.labels]
            meta["written"] = True
        elif seg.raw is not None:
            meta["raw"] = seg.raw.as_json()
        else:
            meta["written"] = True  # skipped: background, nothing to write
        ref = self.writer.append("seg", seg.tile_id, meta, arrays)
        self.state.note("seg", seg.tile_id, ref, meta)
        self._remember(seg.tile_id, Entry.in_memory("seg", seg.tile_id, meta, arrays, ref,
                                                    self.state.reader))
        self.frontier += 1
        if seg.raw is not None:
            self._pending_jobs.append(WriteJob(seg.tile_id, seg.raw, glabels))
        elif seg.labels is not None and self.shards is not None:
            self.shards.put(seg.tile_id, glabels.astype(self.output.dtype)[seg.labels])

    def advance(self) -> list[WriteJob]:
        """Assign every tile from the frontier on that is waiting; returns remote writes."""
        while self.frontier < self.grid.n_tiles and self.frontier in self.state.seg \
                and self.frontier not in self.state.assignment and self._ready(self.frontier):
            self._assign_kept(self.frontier)
            self.frontier += 1
            self._skip_assigned()
        if self.whole:
            self._pending_jobs.extend(self._whole_jobs())
        jobs, self._pending_jobs = self._pending_jobs, []
        if self.remote_writes:
            self._pending_writes.update(job.tile_id for job in jobs)
            return jobs
        self._write_here(jobs)  # this process holds the labels: write them now
        return []

    def _write_here(self, jobs: list[WriteJob]) -> None:
        """Write tiles from their kept labels in this process (a sharded output: held until
        their shard is complete), then write the shards the frontier has passed."""
        if self.shards is None:
            for job in jobs:
                write_jobs(self.output, self.grid, self.state.work.path, [job])
                self.written(job.tile_id)
            return
        if jobs:
            from .state import _PackReader

            reader = _PackReader(self.state.work.path / "packs")
            try:
                for job in jobs:
                    core = job_core(self.output.dtype, self.grid, job, reader)
                    if core is None:  # background, but its shard must count it as written
                        box = self.grid.tile(job.tile_id).core
                        core = np.zeros([c.stop - c.start for c in box], self.output.dtype)
                    self.shards.put(job.tile_id, core)
            finally:
                reader.close()
        self.written_many(self.shards.complete_before(self.frontier))

    def flush(self) -> None:
        """Write what a sharded output still holds (every tile has had its turn)."""
        if self.shards is not None:
            self.written_many(self.shards.flush())

    def written_many(self, tile_ids: list[int]) -> None:
        """Tiles whose cores are in the output, in one entry (a shard is written whole, and
        its tiles are recorded as written together, or not at all)."""
        tiles = [t for t in tile_ids if t not in self.state.written]
        if not tiles:
            return
        meta = {"tiles": tiles}
        ref = self.writer.append("put", tiles[0], meta)
        self.state.note("put", tiles[0], ref, meta)
        self._pending_writes.difference_update(tiles)

    def _assign_kept(self, tile_id: int) -> None:
        """Assign a tile segmented earlier, from its record; queue the write of its core."""
        entry = self._record(tile_id)
        tile = self.grid.tile(tile_id)
        if self.whole:
            glabels, merges = self._assign_whole(tile, _boundary(entry))
        else:
            glabels, merges = self._assign(tile, _boundary(entry))
        if not entry.meta.get("skipped"):
            self.seams.add_control(entry.get("q:control") if "q:control" in entry else None)
        raw = entry.meta.get("raw")
        written = raw is None and not self.whole  # a skipped tile: nothing to write
        ref = self.writer.append("asg", tile_id, {"written": written},
                                 {"glabels": glabels, "merges": merges})
        self.state.note("asg", tile_id, ref, {"written": written})
        if self.whole:
            self._remember_glabels(tile_id, glabels)
            self._wait_for_neighbours(tile_id)
        elif raw is not None:
            self._pending_jobs.append(WriteJob(tile_id, EntryRef.from_json(raw), glabels))

    def written(self, tile_id: int) -> None:
        """A tile's core is in the output (after its ``asg`` entry)."""
        self._pending_writes.discard(tile_id)
        if tile_id not in self.state.written:
            ref = self.writer.append("put", tile_id)
            self.state.note("put", tile_id, ref, {})

    def rewrite_jobs(self) -> list[WriteJob]:
        """Writes a resumed run still owes: assigned tiles whose core never reached the output.

        Tiles that were segmented but not assigned yet (a run stopped in between) are assigned
        too, and their writes returned.
        """
        if self.whole:  # written once their neighbours are assigned (see advance)
            for t in self.unwritten():
                self._wait_for_neighbours(t)
            return self.advance()
        jobs = []
        for t in self.unwritten():
            entry = self.state.record(t)
            raw = entry.meta.get("raw")
            if raw is None and entry.meta.get("raw_here"):
                raw = self.state.seg[t].as_json()  # the record holds the labels itself
            if raw is None:
                continue
            glabels, _ = self.state.assigned_labels(t)
            jobs.append(WriteJob(t, EntryRef.from_json(raw), np.asarray(glabels)))
        if not self.remote_writes:
            self._write_here(jobs)
            return self.advance()
        self._pending_writes.update(job.tile_id for job in jobs)
        return jobs + self.advance()

    # -- stitch="whole" ---------------------------------------------------------------------
    def _ready(self, tile_id: int) -> bool:
        """Whether a segmented tile can be assigned: with ``stitch="whole"``, once every
        neighbour after it in grid order is segmented too (it decides which objects it keeps)."""
        if not self.whole:
            return True
        tile = self.grid.tile(tile_id)
        return all(n.id in self.state.seg for n in self._whole_stitcher.all_neighbours(tile)
                   if n.id > tile_id)

    @property
    def _whole_stitcher(self) -> WholeStitcher:
        assert isinstance(self.stitcher, WholeStitcher)
        return self.stitcher

    def _assign_whole(self, tile: Tile, boundary: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        """New labels for the objects the tile keeps (nothing is merged: each object is
        kept by one tile)."""
        if self.seams.active:  # the seam report counts borders as with "iou" (same matches)
            for other, off in self.stitcher.neighbours(tile, backward=True):
                o_boundary = _boundary(self._record(other.id))
                lo, la = self.stitcher.match(other, tile, off, o_boundary, boundary)
                self.seams.add_border(other, tile, off, o_boundary.arrays, boundary.arrays,
                                      lo, la)
        kept = self._whole_stitcher.kept(tile, boundary,
                                         lambda t: _boundary(self._record(t)))
        none = np.empty(0, np.int64)
        try:
            return self.book.assign(kept, none, none)
        except LabelOverflow:
            self._to_uint64()
            return self.book.assign(kept, none, none)

    def _wait_for_neighbours(self, tile_id: int) -> None:
        """Queue an assigned tile's write until its last neighbour in grid order is assigned
        (tiles are assigned in grid order: then they all are)."""
        tile = self.grid.tile(tile_id)
        last = max([n.id for n in self._whole_stitcher.all_neighbours(tile)], default=tile_id)
        heapq.heappush(self._to_write, (last, tile_id))

    def _whole_jobs(self) -> list[WriteJob]:
        """The writes of the waiting tiles whose neighbours are all assigned now."""
        jobs = []
        while self._to_write and self._to_write[0][0] < self.frontier:
            _, t = heapq.heappop(self._to_write)
            tile = self.grid.tile(t)
            neighbours = self._whole_stitcher.all_neighbours(tile)
            raw = self._record(t).meta.get("raw")
            spills = []
            for n in neighbours:
                glabels = self._assigned_glabels(n.id)
                if glabels[1:].any():
                    spills.append(Spill(n.id, self.state.seg[n.id], glabels))
            jobs.append(WriteJob(t, None if raw is None else EntryRef.from_json(raw),
                                 self._assigned_glabels(t), tuple(spills)))
        return jobs

    def _assigned_glabels(self, tile_id: int) -> np.ndarray:
        glabels = self._glabels_cache.get(tile_id)
        if glabels is None:
            glabels = np.asarray(self.state.assigned_labels(tile_id)[0])
            self._remember_glabels(tile_id, glabels)
        return glabels

    def _remember_glabels(self, tile_id: int, glabels: np.ndarray) -> None:
        self._glabels_cache[tile_id] = glabels
        self._glabels_cache.move_to_end(tile_id)
        while len(self._glabels_cache) > self._window:
            self._glabels_cache.popitem(last=False)

    # -- matching ---------------------------------------------------------------------------
    def _assign(self, tile: Tile, boundary: TileBoundary) -> tuple[np.ndarray, np.ndarray]:
        local, matched = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        # an empty tile matches nothing, but the seam report counts the objects that end at its
        # border
        if len(boundary.counts) > 1 or self.seams.active:
            for other, off in self.stitcher.neighbours(tile, backward=True):
                o_entry = self._record(other.id)
                o_boundary = _boundary(o_entry)
                lo, la = self.stitcher.match(other, tile, off, o_boundary, boundary)
                self.seams.add_border(other, tile, off, o_boundary.arrays, boundary.arrays,
                                      lo, la)
                local.append(la)
                matched.append(self._glabels(o_entry, other.id)[lo])
        loc, mat = np.concatenate(local), np.concatenate(matched)
        try:
            return self.book.assign(boundary.in_core, loc, mat)
        except LabelOverflow:
            self._to_uint64()
            return self.book.assign(boundary.in_core, loc, mat)

    def _record(self, tile_id: int) -> Entry:
        entry = self._records.get(tile_id)
        if entry is None:
            entry = self.state.record(tile_id)
            self._remember(tile_id, entry)
        else:
            self._records.move_to_end(tile_id)
        return entry

    def _remember(self, tile_id: int, entry: Entry) -> None:
        """Keep the records of the tiles a later tile can still be matched with."""
        self._records[tile_id] = entry
        while len(self._records) > self._window:
            self._records.popitem(last=False)

    def _glabels(self, entry: Entry, tile_id: int) -> np.ndarray:
        if "glabels" in entry:
            return entry.get("glabels")
        return self.state.assigned_labels(tile_id)[0]

    def _to_uint64(self) -> None:
        if self.book.max_label >= UINT64_LIMIT:
            raise BlockbusterError("more than 2**64 - 1 objects")
        log.info("more than %s objects: the output becomes uint64", f"{self.book.max_label:,}")
        self.output = self._convert()
        if self.shards is not None:
            self.shards.view = self.output
            self.shards.widen(self.output.dtype)
        ref = self.writer.append("u64", -1, sync=True)
        self.state.note("u64", -1, ref, {})
        self.book.max_label = UINT64_LIMIT

    # -- the end ----------------------------------------------------------------------------
    def check_done(self) -> None:
        """Raise the failures; every tile must be assigned and written otherwise."""
        self.flush()
        if self.failures:
            raise tile_failures(self.failures, stopped_early=False)
        missing = self.grid.n_tiles - len(self.state.assignment)
        if missing or self._pending_writes:
            raise BlockbusterError(f"internal error: {missing} tile(s) unassigned and "
                                   f"{len(self._pending_writes)} unwritten at the end of the run")

    def final_changes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.book.final_changes()


def _boundary(entry: Entry) -> TileBoundary:
    return TileBoundary(entry.get("counts"), _LazyArrays(entry, "b:"))  # type: ignore[arg-type]


class _LazyArrays:
    """The boundary arrays of an entry, read only when the stitcher asks for one."""

    def __init__(self, entry: Entry, prefix: str):
        self.entry = entry
        self.prefix = prefix

    def get(self, name: str) -> np.ndarray | None:
        key = self.prefix + name
        return self.entry.get(key) if key in self.entry else None


def tile_failures(failures: list[TileError], stopped_early: bool) -> TileFailures:
    """One error listing the failed tiles (the first ten), with the first traceback."""
    listed = "\n".join(f"  - {e}" for e in failures[:10])
    more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
    head = (f"stopped after the first {len(failures)} tiles all failed" if stopped_early
            else f"{len(failures)} tile(s) failed; the other tiles are kept")
    tail = ("\nThe output is incomplete. Fix the cause and rerun with $resume: only the "
            "unfinished tiles run again.")
    if failures[0].traceback_text:
        tail += f"\nTraceback of the first failure:\n{failures[0].traceback_text}"
    err = TileFailures(f"{head}:\n{listed}{more}{tail}", failures)
    err.__cause__ = failures[0].__cause__
    return err
