"""Stitching scale: time and peak memory of stitching alone, for 1k to 100k tiles, both engines.

A work directory is filled with real tile records, as segmentation would leave them, for a
synthetic 2-D grid of 128 x 128 tiles: each tile's labels are the connected components of a
nuclei image (about 40 objects per tile, many crossing tile borders), numbered and cut into
boundary data by the engine's own functions (``stitching.sequential_local_labels``,
``core_counts``, ``boundary_arrays``, ``store.TileRecord``), as ``runner.store_tile`` does. No
fn runs and no labels are written. Then, each in a fresh process, timed, its peak RSS measured:

- ``distributed`` (the engine used with ``client=``): ``runner._stitch`` (load the records,
  match every pair of neighbours, solve the label graph, save the final map), serially;
- ``serial`` (the default engine, no client): in grid order, every tile's record goes through
  ``runner.assign_tile`` (match with its finished neighbours, read from their records, and take
  global labels from a ``stitching.LabelBook``) and is saved with its ``glabels`` and ``merges``,
  as ``runner.store_tile`` does; then the end of the run, as in ``runner._finish_serial``:
  ``LabelBook.final_changes`` applied to every record's labels (rewriting output tiles, which
  this synthetic run has none of, is left out). Loading the prepared record (it stands for the
  tile that was just segmented) and saving the record are timed apart: pass 1 saves every
  record in both engines. The serial run works on its own copy of the records, and its final
  labels are checked against the distributed run's (same partition of the tile-local labels).

Both modes are measured: ``faces`` (no halo) and ``iou`` (halo of 8 voxels, diagonal neighbours
matched too).

Targets (issues 4 and 9): time and memory grow linearly with the number of tiles; 100k tiles
stitch in under 2 GB.

Run: ``python benchmarks/bench_stitching.py [--quick]``
"""

from __future__ import annotations

import itertools
import math
import os
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
    Timer,
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
#: iou stops at 30k tiles: both engines at 100k iou tiles would take the script past its
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


# -- building the work directory (not measured) -------------------------------------------------
def _build_range(job: tuple[int, str, str, int, int]) -> int:
    """Write the records of tiles ``start..stop-1``, as ``runner.segment_tile`` would."""
    from scipy import ndimage

    from blockbuster import stitching
    from blockbuster.store import TileRecord, WorkDir

    n_tiles, mode, work_path, start, stop = job
    # Records are fsynced for crash safety in a real run; building this fixture needs none.
    os.fsync = lambda fd: None
    grid = grid_for(n_tiles, mode)
    work = WorkDir(Path(work_path))
    for tile_id in range(start, stop):
        tile = grid.tile(tile_id)
        labels = ndimage.label(nuclei_block(tile.padded, spacing=SPACING) > 400)[0]
        if mode == "iou":  # as runner.store_tile: the halo is numbered too, counts are the core's
            local, n, padded_counts = stitching.sequential_local_labels(labels)
            counts = stitching.core_counts(local, tile.inner, padded_counts)
            boundary = stitching.boundary_arrays(grid, tile, local, mode)
        else:
            core, n, counts = stitching.sequential_local_labels(labels[tile.inner])
            boundary = stitching.boundary_arrays(grid, tile, core, mode)
        arrays = {"counts": counts, **boundary}
        work.save_record(tile_id, TileRecord({"tile": tile_id, "n": n}, arrays))
    return stop - start


def engine_fingerprint() -> str:
    """Changes whenever the record format or the boundary data could have changed."""
    import hashlib

    from blockbuster import stitching, store

    digest = hashlib.sha256()
    for module in (store, stitching):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def build(n_tiles: int, mode: str) -> Path:
    """A work directory with every tile's record (reused while the engine is unchanged)."""
    from blockbuster.store import WorkDir

    path = DATA / f"stitch_{mode}_{n_tiles}"
    marker = path / "built"
    if marker.exists() and marker.read_text() == engine_fingerprint():
        return path
    shutil.rmtree(path, ignore_errors=True)
    work = WorkDir(path)
    work.create({"format": 1, "params": {"benchmark": "stitching", "tiles": n_tiles}})
    total = grid_for(n_tiles, mode).n_tiles
    bounds = np.linspace(0, total, 33).astype(int)
    jobs = [(n_tiles, mode, str(path), int(a), int(b))
            for a, b in itertools.pairwise(bounds)]
    with ProcessPoolExecutor(2) as pool:
        assert sum(pool.map(_build_range, jobs)) == total
    marker.write_text(engine_fingerprint())
    return path


# -- the measured child ---------------------------------------------------------------------------
def child_stitch(p: dict[str, Any]) -> dict[str, Any]:
    from blockbuster import runner, stitching
    from blockbuster.store import WorkDir

    grid = grid_for(p["n_tiles"], p["mode"])
    work = WorkDir(Path(p["work"]))
    shutil.rmtree(work.final_path, ignore_errors=True)
    timings = {"match": 0.0, "solve": 0.0, "save_map": 0.0}

    def timed(key: str, func, when=lambda *a, **k: True):
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not when(*args, **kwargs):
                return func(*args, **kwargs)
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                timings[key] += time.perf_counter() - start
        return wrapped

    # matching = the stage's task loop (wall time; it may use several threads)
    runner.run_tasks = timed("match", runner.run_tasks,
                             lambda *a, **k: k.get("name") == "stitch")
    stitching.solve_labels = timed("solve", stitching.solve_labels)
    WorkDir.save_final_map = timed("save_map", WorkDir.save_final_map)
    before = current_rss()
    reset_peak_rss()
    with Timer() as t:
        stitched = runner._stitch(grid, p["mode"], work, 1, 0.5, None, False)
    peak = peak_rss()
    timings["load_counts"] = t.seconds - sum(timings.values())
    return {"seconds": t.seconds, "stitch_peak_rss": peak, "before_rss": before,
            "n_nodes": len(stitched.final),
            "n_labels": stitched.n_labels, "n_tiles_real": grid.n_tiles, "parts": timings}


def child_serial(p: dict[str, Any]) -> dict[str, Any]:
    """The serial engine's stitching: assign_tile per tile as it is stored, then final_changes."""
    from blockbuster import runner, stitching
    from blockbuster.store import TileRecord, WorkDir

    # Saving records is pass 1's own cost in both engines (timed apart, not counted as
    # stitching); its fsync is skipped here so that 100k tiles fit the time budget.
    os.fsync = lambda fd: None
    grid = grid_for(p["n_tiles"], p["mode"])
    source = WorkDir(Path(p["work"]))
    work = WorkDir(Path(p["serial_work"]))
    shutil.rmtree(work.path, ignore_errors=True)
    work.create({"format": 1, "params": {"benchmark": "stitching-serial"}})
    book = stitching.LabelBook()
    ctx = runner.RunContext(source=None, fn=None, fn_label="", grid=grid, mode=p["mode"],
                            work_path=work.path, table=False, retries=0, connectivity=1,
                            iou_threshold=0.5, book=book)
    timings = {"load_input": 0.0, "assign": 0.0, "save_record": 0.0, "final": 0.0}
    clock = time.perf_counter
    before = current_rss()
    reset_peak_rss()
    start = clock()
    for tile_id in range(grid.n_tiles):
        t0 = clock()
        stored = source.load_record(tile_id)
        arrays = {name: stored.get(name) for name in stored.meta["arrays"]}
        n = stored.meta["n"]
        t1 = clock()
        glabels, merges = runner.assign_tile(ctx, grid.tile(tile_id), TileRecord({"n": n}, arrays))
        arrays.update(glabels=glabels, merges=merges)
        t2 = clock()
        work.save_record(tile_id, TileRecord({"tile": tile_id, "n": n}, arrays))
        t3 = clock()
        timings["load_input"] += t1 - t0
        timings["assign"] += t2 - t1
        timings["save_record"] += t3 - t2
    # the end of the run (runner._finish_serial without rewriting output tiles)
    t0 = clock()
    old, new = book.final_changes()
    changed_tiles = 0
    for tile_id in range(grid.n_tiles):
        glabels = work.load_record(tile_id).get("glabels")
        final = stitching.apply_changes(glabels, old, new)
        changed_tiles += bool((final != glabels).any())
    timings["final"] = clock() - t0
    total = clock() - start
    peak = peak_rss()
    # the check (not measured) keeps every tile's final labels, which the engine does not
    finals = [stitching.apply_changes(work.load_record(t).get("glabels"), old, new)
              for t in range(grid.n_tiles)]
    same = same_partition(np.concatenate(finals), Path(p["work"]))
    shutil.rmtree(work.path, ignore_errors=True)
    return {"seconds": timings["assign"] + timings["final"], "total_seconds": total,
            "stitch_peak_rss": peak, "before_rss": before,
            "n_nodes": sum(len(f) for f in finals), "n_labels": book.n_labels,
            "n_tiles_real": grid.n_tiles, "parts": timings, "changed_tiles": changed_tiles,
            "n_changes": len(old), "same_as_distributed": same}


def same_partition(serial: np.ndarray, work_path: Path) -> bool | None:
    """Whether the serial final labels partition the tile-local labels as the distributed
    run's final map does (same layout: each tile's labels 0..n in grid order), 0 alike."""
    import zarr

    from blockbuster.store import WorkDir

    final_path = WorkDir(work_path).final_path
    if not final_path.exists():
        return None
    dist = zarr.open_array(str(final_path), mode="r")[:].astype(np.int64)
    if dist.shape != serial.shape or not np.array_equal(dist == 0, serial == 0):
        return False
    pairs = np.unique(np.stack([serial, dist])[:, serial > 0], axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# -- driver ---------------------------------------------------------------------------------------
ENGINES = ("distributed", "serial")
STYLE = {("distributed", "faces"): "o-", ("distributed", "iou"): "s-",
         ("serial", "faces"): "o--", ("serial", "iou"): "s--"}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    for k, ((engine, mode), style) in enumerate(STYLE.items()):
        sel = [r for r in rows if r["mode"] == mode and r["engine"] == engine]
        n = [r["n_tiles_real"] for r in sel]
        label = f"{engine}, stitch='{mode}'"
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
             title="stitching time (one thread per tile loop)")
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
            with Timer() as built:
                work = build(n, mode)
            for engine in ENGINES:  # distributed first: the serial run checks against its map
                params = {"n_tiles": n, "mode": mode, "work": str(work),
                          "serial_work": str(DATA / "stitch_serial_work")}
                res = run_child(__file__, "stitch" if engine == "distributed" else "serial",
                                params)
                res["growth_mib"] = (res["stitch_peak_rss"] - res["before_rss"]) / MiB
                row = {"engine": engine, "mode": mode, "n": n, **res, "build_s": built.seconds,
                       "peak_mib": res["stitch_peak_rss"] / MiB,
                       "us_per_tile": res["seconds"] / res["n_tiles_real"] * 1e6,
                       "bytes_per_tile": res["growth_mib"] * MiB / res["n_tiles_real"],
                       **{f"{k}_s": v for k, v in res["parts"].items()}}
                rows.append(row)
                print(f"{engine} {mode} {n} tiles: {res['seconds']:.1f} s, peak "
                      f"{row['peak_mib']:.0f} MiB (built in {built.seconds:.0f} s)", flush=True)
    common = [("mode", "stitch"), ("n_tiles_real", "tiles"), ("n_nodes", "tile-local labels"),
              ("n_labels", "final objects"), ("seconds", "stitch s"),
              ("us_per_tile", "µs / tile")]
    memory = [("peak_mib", "peak RSS MiB"), ("growth_mib", "peak above start MiB"),
              ("bytes_per_tile", "bytes / tile")]
    dist_table = format_table([r for r in rows if r["engine"] == "distributed"], [
        *common, ("load_counts_s", "load counts s"), ("match_s", "match s"),
        ("solve_s", "solve s"), ("save_map_s", "save map s"), *memory])
    serial_table = format_table([r for r in rows if r["engine"] == "serial"], [
        *common, ("assign_s", "assign s"), ("final_s", "final changes s"),
        ("changed_tiles", "tiles to rewrite"), ("save_record_s", "save records s (not stitching)"),
        *memory, ("same_as_distributed", "same labels as distributed")])
    verdicts = []
    for engine in ENGINES:
        for mode in ("faces", "iou"):
            sel = [r for r in rows if r["mode"] == mode and r["engine"] == engine]
            name = f"{engine} '{mode}'"
            verdicts.append(verdict(f"{name} time growth exponent (time ~ tiles^b)",
                                    slope(sel, "seconds"), "<=", 1.1))
            verdicts.append(verdict(
                f"{name} memory growth exponent (peak above start ~ tiles^b)",
                slope(sel, "growth_mib"), "<=", 1.1))
            verdicts.append(verdict(f"{name} peak RSS at {sel[-1]['n_tiles_real']:,} tiles (MiB)",
                                    sel[-1]["peak_mib"], "<=", 2048, ".0f"))
    serial_rows = [r for r in rows if r["engine"] == "serial"]
    if not all(r["same_as_distributed"] for r in serial_rows):
        verdicts.append("**serial and distributed final labels differ** for: " + ", ".join(
            f"{r['mode']} {r['n_tiles_real']}" for r in serial_rows
            if not r["same_as_distributed"]))
    verdicts.append(
        f"tiles of {TILE} x {TILE} voxels, nuclei every {SPACING} voxels; records read from a "
        "warm page cache; 'peak RSS' is the whole process (interpreter and imports included), "
        "'peak above start' what stitching added. Serial 'stitch s' = assign + final changes "
        "(the work the serial engine's writer thread and its finish stage add to a tile's "
        "store); distributed 'stitch s' = runner._stitch.")
    png = plot_path("bench_stitching")
    plot(rows, png)
    report("bench_stitching", "Stitching scale", {
        "Distributed engine (`client=`): `runner._stitch` after all tiles are segmented:":
            dist_table,
        "Serial engine (default): `assign_tile` as each tile is stored, then the final changes:":
            serial_table}, verdicts, {"rows": rows}, command_line(__file__, args.quick))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"stitch": child_stitch, "serial": child_serial}):
        main()
