"""Stitching scale: time and peak memory of the stitching stage alone, for 1k to 100k tiles.

A work directory is filled with real tile records, as pass 1 would leave them, for a synthetic
2-D grid of 128 x 128 tiles: each tile's labels are the connected components of a nuclei image
(about 40 objects per tile, many crossing tile borders), numbered and cut into boundary data by
the engine's own functions (``stitching.sequential_local_labels``, ``boundary_arrays``,
``count_per_label``, ``store.TileRecord``). No fn runs and no raw labels are written; then
``runner._stitch`` (load the records, match every pair of neighbours, solve the label graph,
save the final map) runs in a fresh process, serially, and is timed and its peak RSS measured.

Both modes are measured: ``faces`` (no halo) and ``iou`` (halo of 8 voxels, diagonal neighbours
matched too).

Targets (issues 4 and 9): time and memory grow linearly with the number of tiles; 100k tiles
stitch in under 2 GB.

Run: ``python benchmarks/bench_stitching.py [--quick]``
"""

from __future__ import annotations

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
FULL = {"faces": (1_000, 10_000, 100_000), "iou": (1_000, 10_000, 100_000)}
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
        # [:2]: newer engines also return the counts; they are recounted below either way
        if mode == "iou":
            local, n = stitching.sequential_local_labels(labels)[:2]
            core = local[tile.inner]
            boundary = stitching.boundary_arrays(grid, tile, local, mode)
        else:
            core, n = stitching.sequential_local_labels(labels[tile.inner])[:2]
            boundary = stitching.boundary_arrays(grid, tile, core, mode)
        arrays = {"counts": stitching.count_per_label(core, n), **boundary}
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
    jobs = [(n_tiles, mode, str(path), int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
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


# -- driver ---------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("faces", "o-"), ("iou", "s-")):
        sel = [r for r in rows if r["mode"] == mode]
        n = [r["n_tiles_real"] for r in sel]
        left.plot(n, [r["seconds"] for r in sel], style, label=f"stitch='{mode}'")
        right.plot(n, [r["stitch_peak_rss"] / MiB for r in sel], style, label=f"stitch='{mode}'")
        right.plot(n, [r["growth_mib"] for r in sel], style.replace("-", ":"),
                   label=f"'{mode}': above the process before stitching")
    n_all = sorted({r["n_tiles_real"] for r in rows})
    ref = [r for r in rows if r["mode"] == "faces"][0]
    left.plot(n_all, [ref["seconds"] * n / ref["n_tiles_real"] for n in n_all], "k--", lw=0.8,
              label="linear")
    right.axhline(2 * GiB / MiB, color="red", ls="--", label="target 2 GiB")
    left.set(xscale="log", yscale="log", xlabel="tiles", ylabel="seconds",
             title="stitching time (serial)")
    right.set(xscale="log", yscale="log", xlabel="tiles", ylabel="MiB",
              title="stitching peak RSS")
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="lower right")
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
            res = run_child(__file__, "stitch", {"n_tiles": n, "mode": mode, "work": str(work)})
            res["growth_mib"] = (res["stitch_peak_rss"] - res["before_rss"]) / MiB
            row = {"mode": mode, "n": n, **res, "build_s": built.seconds,
                   "peak_mib": res["stitch_peak_rss"] / MiB,
                   "us_per_tile": res["seconds"] / res["n_tiles_real"] * 1e6,
                   "bytes_per_tile": res["growth_mib"] * MiB / res["n_tiles_real"],
                   **{f"{k}_s": v for k, v in res["parts"].items()}}
            rows.append(row)
            print(f"{mode} {n} tiles: {res['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB "
                  f"(built in {built.seconds:.0f} s)", flush=True)
    table = format_table(rows, [
        ("mode", "stitch"), ("n_tiles_real", "tiles"), ("n_nodes", "tile-local labels"),
        ("n_labels", "final objects"), ("seconds", "stitch s"), ("us_per_tile", "µs / tile"),
        ("load_counts_s", "load counts s"), ("match_s", "match s"), ("solve_s", "solve s"),
        ("save_map_s", "save map s"), ("peak_mib", "peak RSS MiB"),
        ("growth_mib", "peak above start MiB"), ("bytes_per_tile", "bytes / tile")])
    verdicts = []
    for mode in ("faces", "iou"):
        sel = [r for r in rows if r["mode"] == mode]
        verdicts.append(verdict(f"'{mode}' time growth exponent (time ~ tiles^b)",
                                slope(sel, "seconds"), "<=", 1.1))
        verdicts.append(verdict(f"'{mode}' memory growth exponent (peak above start ~ tiles^b)",
                                slope(sel, "growth_mib"), "<=", 1.1))
        verdicts.append(verdict(f"'{mode}' peak RSS at {sel[-1]['n_tiles_real']:,} tiles (MiB)",
                                sel[-1]["peak_mib"], "<=", 2048, ".0f"))
    verdicts.append(
        f"tiles of {TILE} x {TILE} voxels, nuclei every {SPACING} voxels; records read from a "
        "warm page cache; 'peak RSS' is the whole process (interpreter and imports included), "
        "'peak above start' what stitching added.")
    png = plot_path("bench_stitching")
    plot(rows, png)
    report("bench_stitching", "Stitching scale", {"": table}, verdicts, {"rows": rows},
           command_line(__file__, args.quick))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"stitch": child_stitch}):
        main()
