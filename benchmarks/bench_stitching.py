"""Stitching scale: time and peak memory of the committer alone, for 1k to 100k tiles.

The one engine (issue 17) stitches in one place, whatever runs the tiles: the run's
:class:`~blockbuster.engine.commit.Committer` receives each segmented tile, and when the tile
is at the *frontier* (the first tile in grid order without global labels) it matches it with
its neighbours before it (read from their records), takes its global labels from the
``LabelBook`` and appends its record; a tile that arrives ahead of the frontier is only recorded
until the frontier reaches it. At the end of the run, ``LabelBook.final_changes`` is applied to
every tile's labels (the end pass, which rewrites the few tiles holding labels a later tile
joined).

Here the tiles are prepared once (not measured) for a synthetic 2-D grid of 128 x 128 tiles:
each tile's labels are the connected components of a nuclei image (about 40 objects per tile,
many crossing tile borders), numbered and cut into boundary data by the engine's own functions
(``sequential_local_labels``, ``core_counts``, the stitcher's ``boundary_arrays``), as
``tasks.summarize`` does, and kept in a pack file. No fn runs and no labels are written (the
tiles carry no core labels, so the committer writes nothing). Then, each in a fresh process,
timed, its peak RSS measured, the prepared tiles go through a fresh ``Committer`` (with its own
work directory, records appended and fsynced as in a run):

- ``in order``: tiles arrive in grid order, each at the frontier, as the in-process executor
  (the default, no client) hands them over;
- ``out of order``: tiles arrive shuffled within blocks of 64 (as tiles finish on a thread pool
  or a dask cluster); a tile ahead of the frontier is recorded and assigned later from its
  record, as with ``client=``.

Then the end pass's stitching part: ``final_changes``, applied to every tile's assigned labels
(rewriting output tiles is left out; the tiles to rewrite are counted). Loading a prepared tile
(it stands for the tile that was just segmented) is timed apart. Both orders must give the same
labels, id for id (checked with a hash of every tile's final labels).

Both modes are measured: ``faces`` (no halo) and ``iou`` (halo of 8 voxels, diagonal neighbours
matched too).

Targets (issues 4 and 9): time and memory grow linearly with the number of tiles; 100k tiles
stitch in under 2 GB.

Run: ``python benchmarks/bench_stitching.py [--quick]``
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    DATA,
    GiB,
    MiB,
    child_main,
    command_line,
    current_rss,
    format_table,
    nuclei_block,
    parse_args,
    peak_rss,
    plot_path,
    report,
    reset_peak_rss,
    run_child,
    verdict,
)

TILE = 128
SPACING = 20
DEPTH = {"faces": 0, "iou": 8}
#: tiles arriving out of order are shuffled within blocks of this many
SHUFFLE_BLOCK = 64
#: iou stops at 30k tiles: both orders at 100k iou tiles would take the script past its
#: 10-minute budget on 2 cores (faces covers the 100k-tile target).
FULL = {"faces": (1_000, 10_000, 100_000), "iou": (1_000, 10_000, 30_000)}
QUICK = {"faces": (256, 1_024, 4_096), "iou": (256, 1_024, 4_096)}


def grid_for(n_tiles: int, mode: str):
    """A square-ish grid with about ``n_tiles`` tiles of ``TILE`` voxels."""
    from blockbuster.tiling import TileGrid

    side = math.isqrt(n_tiles)
    rows = side
    cols = math.ceil(n_tiles / rows)
    return TileGrid((rows * TILE, cols * TILE), (TILE, TILE), (DEPTH[mode],) * 2)


def stitcher_for(grid, mode: str):
    from blockbuster.stitching import make_stitcher

    return make_stitcher(mode, grid, connectivity=1, iou_threshold=0.5)


# -- preparing the tiles (not measured) ---------------------------------------------------------
def _build_range(job: tuple[int, str, str, int, int, int]) -> int:
    """Append the prepared tiles ``start..stop-1`` to this job's own pack file."""
    from scipy import ndimage

    from blockbuster.engine.state import PackWriter
    from blockbuster.stitching import core_counts, sequential_local_labels

    n_tiles, mode, packs, part, start, stop = job
    grid = grid_for(n_tiles, mode)
    stitcher = stitcher_for(grid, mode)
    writer = PackWriter(Path(packs), 1, f"build{part:03d}")
    for tile_id in range(start, stop):
        tile = grid.tile(tile_id)
        labels = ndimage.label(nuclei_block(tile.padded, spacing=SPACING) > 400)[0]
        if stitcher.numbers_padded:  # as tasks.summarize
            local, n, padded_counts = sequential_local_labels(labels)
            counts = core_counts(local, tile.inner, padded_counts)
            arrays = stitcher.boundary_arrays(tile, local)
        else:
            core, n, counts = sequential_local_labels(labels[tile.inner])
            arrays = stitcher.boundary_arrays(tile, core)
        writer.append("seg", tile_id, {"n": n, "skipped": False},
                      {"counts": counts, **{f"b:{k}": v for k, v in arrays.items()}})
    writer.close()
    return stop - start


def engine_fingerprint() -> str:
    """Changes whenever the record format or the boundary data could have changed."""
    from blockbuster import stitching
    from blockbuster.engine import state

    digest = hashlib.sha256()
    for module in (state, stitching):
        digest.update(Path(module.__file__).read_bytes())
    for path in sorted(Path(stitching.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build(n_tiles: int, mode: str) -> Path:
    """A work directory with every prepared tile (reused while the engine is unchanged)."""
    from blockbuster.engine.state import WorkDir

    path = DATA / f"stitch1_{mode}_{n_tiles}"
    marker = DATA / f"stitch1_{mode}_{n_tiles}.built"
    if marker.exists() and marker.read_text() == engine_fingerprint() and path.exists():
        return path
    if path.exists():
        WorkDir(path).remove()
    shutil.rmtree(path, ignore_errors=True)
    work = WorkDir(path)
    work.create({"format": 1, "params": {"benchmark": "stitching", "tiles": n_tiles}})
    total = grid_for(n_tiles, mode).n_tiles
    bounds = np.linspace(0, total, 33).astype(int)
    jobs = [(n_tiles, mode, str(work.packs_dir), k, int(a), int(b))
            for k, (a, b) in enumerate(itertools.pairwise(bounds))]
    with ProcessPoolExecutor(2) as pool:
        assert sum(pool.map(_build_range, jobs)) == total
    marker.write_text(engine_fingerprint())
    return path


# -- the measured child ---------------------------------------------------------------------------
class _NoOutput:
    """The committer's output when no tile carries labels: only its dtype is read."""

    dtype = np.dtype(np.uint32)


def arrival_order(n_tiles: int, order: str) -> list[int]:
    if order == "in order":
        return list(range(n_tiles))
    rng = np.random.default_rng(0)
    out: list[int] = []
    for start in range(0, n_tiles, SHUFFLE_BLOCK):
        out.extend(int(t) for t in rng.permutation(np.arange(start, min(start + SHUFFLE_BLOCK,
                                                                         n_tiles))))
    return out


def child_commit(p: dict[str, Any]) -> dict[str, Any]:
    """Every prepared tile through a fresh Committer, in the given order; then the end pass."""
    from blockbuster.engine.commit import Committer
    from blockbuster.engine.state import PackWriter, RunState, WorkDir
    from blockbuster.stitching import TileBoundary, apply_changes
    from blockbuster.tasks import SegmentedTile

    grid = grid_for(p["n_tiles"], p["mode"])
    prepared = RunState(WorkDir(Path(p["work"])), grid.n_tiles)
    assert len(prepared.seg) == grid.n_tiles
    work = WorkDir(Path(p["commit_work"]))
    if work.exists():
        work.remove()
    shutil.rmtree(work.path, ignore_errors=True)
    work.create({"format": 1, "params": {"benchmark": "stitching-commit"}})
    state = RunState(work, grid.n_tiles)
    writer = PackWriter(work.packs_dir, 1, "main")

    def no_uint64():
        raise AssertionError("more than 2**32 - 1 objects in a benchmark")

    committer = Committer(grid, stitcher_for(grid, p["mode"]), state, writer,
                          _NoOutput(), no_uint64,  # type: ignore[arg-type]
                          remote_writes=p["order"] != "in order")
    order = arrival_order(grid.n_tiles, p["order"])
    timings = {"load_input": 0.0, "commit": 0.0, "final": 0.0}
    clock = time.perf_counter
    ahead = 0
    before = current_rss()
    reset_peak_rss()
    start = clock()
    for tile_id in order:
        t0 = clock()
        entry = prepared.record(tile_id)
        arrays = {name[2:]: entry.get(name) for name in entry.names() if name.startswith("b:")}
        seg = SegmentedTile(tile_id, entry.meta["n"], TileBoundary(entry.get("counts"), arrays))
        t1 = clock()
        ahead += tile_id != committer.frontier
        jobs = committer.accept(seg)
        assert not jobs  # no tile carries labels: nothing to write
        timings["load_input"] += t1 - t0
        timings["commit"] += clock() - t1
    committer.check_done()
    writer.sync()
    # the end pass's stitching part (engine.run._end_pass without rewriting output tiles)
    t0 = clock()
    old, new = committer.final_changes()
    to_rewrite = 0
    digest = hashlib.sha256()
    n_nodes = 0
    for tile_id in range(grid.n_tiles):
        glabels, _ = state.assigned_labels(tile_id)
        final = apply_changes(glabels, old, new)
        to_rewrite += bool(old.size and np.isin(glabels, old).any())
        digest.update(np.ascontiguousarray(final, np.int64).tobytes())
        n_nodes += len(final)
    timings["final"] = clock() - t0
    total = clock() - start
    peak = peak_rss()
    writer.close()
    state.close()
    prepared.close()
    work.remove()
    return {"seconds": timings["commit"] + timings["final"], "total_seconds": total,
            "stitch_peak_rss": peak, "before_rss": before, "n_nodes": n_nodes,
            "n_labels": committer.book.n_labels, "n_tiles_real": grid.n_tiles,
            "parts": timings, "changed_tiles": to_rewrite, "n_changes": len(old),
            "arrived_ahead": ahead, "labels_hash": digest.hexdigest()}


# -- driver ---------------------------------------------------------------------------------------
ORDERS = ("in order", "out of order")
STYLE = {("in order", "faces"): "o-", ("in order", "iou"): "s-",
         ("out of order", "faces"): "o--", ("out of order", "iou"): "s--"}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    for k, ((order, mode), style) in enumerate(STYLE.items()):
        sel = [r for r in rows if r["mode"] == mode and r["order"] == order]
        n = [r["n_tiles_real"] for r in sel]
        label = f"{order}, stitch='{mode}'"
        colour = f"C{k}"
        left.plot(n, [r["seconds"] for r in sel], style, color=colour, label=label)
        right.plot(n, [r["stitch_peak_rss"] / MiB for r in sel], style, color=colour,
                   label=f"{label}: whole process")
        right.plot(n, [max(r["growth_mib"], 0.1) for r in sel], style[0] + ":", color=colour,
                   alpha=0.7, label=f"{label}: above the process before stitching")
    n_all = sorted({r["n_tiles_real"] for r in rows})
    ref = rows[0]
    left.plot(n_all, [ref["seconds"] * n / ref["n_tiles_real"] for n in n_all], "k--", lw=0.8,
              label="linear")
    right.axhline(2 * GiB / MiB, color="red", ls="--", label="target 2 GiB")
    left.set(xscale="log", yscale="log", xlabel="tiles", ylabel="seconds",
             title="committer + end pass stitching time (one thread)")
    right.set(xscale="log", yscale="log", xlabel="tiles", ylabel="MiB",
              title="stitching peak RSS")
    left.legend(fontsize=7)
    right.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def slope(rows: list[dict[str, Any]], key: str) -> float:
    """Exponent b of key ~ n_tiles^b between the smallest and largest grid (1 = linear)."""
    a, b = rows[0], rows[-1]
    return math.log(b[key] / a[key]) / math.log(b["n_tiles_real"] / a["n_tiles_real"])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes = QUICK if args.quick else FULL
    rows = []
    for mode in ("faces", "iou"):
        for n in sizes[mode]:
            built_at = time.perf_counter()
            work = build(n, mode)
            built = time.perf_counter() - built_at
            for order in ORDERS:
                params = {"n_tiles": n, "mode": mode, "work": str(work), "order": order,
                          "commit_work": str(DATA / "stitch_commit_work")}
                res = run_child(__file__, "commit", params)
                res["growth_mib"] = max((res["stitch_peak_rss"] - res["before_rss"]) / MiB,
                                        0.01)
                row = {"order": order, "mode": mode, "n": n, **res, "build_s": built,
                       "peak_mib": res["stitch_peak_rss"] / MiB,
                       "us_per_tile": res["seconds"] / res["n_tiles_real"] * 1e6,
                       "bytes_per_tile": res["growth_mib"] * MiB / res["n_tiles_real"],
                       **{f"{k}_s": v for k, v in res["parts"].items()}}
                rows.append(row)
                print(f"{order} {mode} {n} tiles: {res['seconds']:.1f} s, peak "
                      f"{row['peak_mib']:.0f} MiB (built in {built:.0f} s)", flush=True)
    for row in rows:
        twin = next(r for r in rows if r["mode"] == row["mode"] and r["n"] == row["n"]
                    and r["order"] == "in order")
        row["same_labels"] = row["labels_hash"] == twin["labels_hash"]
    table = format_table(rows, [
        ("mode", "stitch"), ("order", "tiles arrive"), ("n_tiles_real", "tiles"),
        ("arrived_ahead", "ahead of the frontier"), ("n_nodes", "tile-local labels"),
        ("n_labels", "final objects"), ("seconds", "stitch s"), ("us_per_tile", "µs / tile"),
        ("commit_s", "committer s"), ("final_s", "final changes s"),
        ("changed_tiles", "tiles to rewrite"), ("load_input_s", "load tiles s (not stitching)"),
        ("peak_mib", "peak RSS MiB"), ("growth_mib", "peak above start MiB"),
        ("bytes_per_tile", "bytes / tile"), ("same_labels", "same labels as in order")])
    verdicts = []
    for order in ORDERS:
        for mode in ("faces", "iou"):
            sel = [r for r in rows if r["mode"] == mode and r["order"] == order]
            name = f"{order} '{mode}'"
            verdicts.append(verdict(f"{name} time growth exponent (time ~ tiles^b)",
                                    slope(sel, "seconds"), "<=", 1.1))
            verdicts.append(verdict(
                f"{name} memory growth exponent (peak above start ~ tiles^b)",
                slope(sel, "growth_mib"), "<=", 1.1))
            verdicts.append(verdict(f"{name} peak RSS at {sel[-1]['n_tiles_real']:,} tiles (MiB)",
                                    sel[-1]["peak_mib"], "<=", 2048, ".0f"))
    if not all(r["same_labels"] for r in rows):
        verdicts.append("**labels differ between the orders** for: " + ", ".join(
            f"{r['mode']} {r['n_tiles_real']}" for r in rows if not r["same_labels"]))
    verdicts.append(
        f"tiles of {TILE} x {TILE} voxels, nuclei every {SPACING} voxels; prepared tiles read "
        "from a warm page cache; 'peak RSS' is the whole process (interpreter and imports "
        "included), 'peak above start' what stitching added (floored at 0.01 MiB). 'stitch s' "
        "= committer (matching, label book, records appended) + final changes (the end pass "
        f"without rewriting); out of order = shuffled within blocks of {SHUFFLE_BLOCK} tiles.")
    png = plot_path("bench_stitching")
    plot(rows, png)
    report("bench_stitching", "Stitching scale", {
        "The committer (`engine.commit.Committer`), then the end pass's final changes:": table},
        verdicts, {"rows": rows}, command_line(__file__, args.quick))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"commit": child_commit}):
        main()
