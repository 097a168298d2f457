"""Many tiny tiles: engine time per tile, peak memory and files, from a thousand to a million.

Every tile is 16 x 16 voxels of a uint8 image of round blobs on a lattice (generated chunk by
chunk into a zarr array with 256 x 256 chunks, never held whole), the fn is trivial
(``scipy.ndimage.label`` of ``tile > 0``, about 20 microseconds), ``stitch="faces"``, no overlap,
serial: what is measured is the engine's cost per tile (reading the tile, checking and numbering
its labels, matching it with its neighbours, storing its record, writing its core), not the fn's.
Each size runs in a fresh process; peak RSS is that process's VmHWM. The work directory is kept
(``keep_work``) so that its files and bytes are counted at the end, when it is largest.

Targets (issue 18): <= 2 ms engine time per tile; files (work directory + output) <= tiles / 50
+ a constant; peak memory flat in the number of tiles.

Run: ``python benchmarks/bench_tiles.py [--quick] [--sizes 1000 10000 ...]``
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    DATA,
    MiB,
    Timer,
    child_main,
    command_line,
    format_table,
    parse_args,
    plot_path,
    report,
    run_child,
    verdict,
)

TILE = 16
FULL = (1_000, 10_000, 100_000, 1_000_000)
QUICK = (1_000, 4_000)
SPACING = 11  # blobs on an 11-voxel lattice: most tiles hold a few, many cross tile borders


def blobs(region: tuple[slice, ...]) -> np.ndarray:
    """Round blobs of radius 3.5 on a lattice, as a function of global coordinates."""
    ys = np.arange(region[0].start, region[0].stop)[:, None] % SPACING - SPACING // 2
    xs = np.arange(region[1].start, region[1].stop)[None, :] % SPACING - SPACING // 2
    return ((ys * ys + xs * xs) <= 12).astype(np.uint8) * 200


def make_image(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` zarr image of blobs, written chunk by chunk (reused if there)."""
    import zarr

    done = path.with_name(path.name + ".complete")
    if done.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    arr = zarr.create_array(store=str(path), shape=(side, side), chunks=(256, 256),
                            dtype="uint8", fill_value=0)
    step = 4096
    for y in range(0, side, step):
        for x in range(0, side, step):
            region = (slice(y, min(y + step, side)), slice(x, min(x + step, side)))
            arr[region] = blobs(region)
    done.touch()
    return path


def tree(path: Path) -> tuple[int, int]:
    """Files and bytes under ``path``."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size


class Label:
    """The trivial fn, timing itself (its time is not the engine's)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        start = time.perf_counter()
        labels = ndimage.label(tile > 0)[0]
        self.seconds += time.perf_counter() - start
        return labels


def _warm_up(scratch: Path) -> None:
    """One 4-tile run first, so the engine's one-time imports are not counted per tile."""
    import blockbuster

    blockbuster.tile_process(blobs((slice(0, 2 * TILE), slice(0, 2 * TILE))), Label(),
                             (TILE, TILE), 0, stitch="faces", output=scratch, progress=False)
    shutil.rmtree(scratch, ignore_errors=True)


def child_run(p: dict[str, Any]) -> dict[str, Any]:
    import zarr

    import blockbuster

    image = zarr.open_array(p["image"], mode="r")
    out = Path(p["output"])
    work = out.with_name(out.name + ".work")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    _warm_up(out.with_name(out.name + ".warm"))
    fn = Label()
    with Timer() as t:
        arr = blockbuster.tile_process(image, fn, (TILE, TILE), 0, stitch="faces", output=out,
                                       work_dir=work, keep_work=True, progress=False)
    n_tiles = math.ceil(image.shape[0] / TILE) * math.ceil(image.shape[1] / TILE)
    work_files, work_bytes = tree(work)
    out_files, out_bytes = tree(out)
    n_labels = arr.attrs["blockbuster"]["n_labels"]
    stages = arr.attrs["blockbuster"]["report"]["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": t.seconds, "fn_seconds": fn.seconds, "n_tiles": n_tiles,
            "work_files": work_files, "work_bytes": work_bytes, "out_files": out_files,
            "out_bytes": out_bytes, "n_labels": n_labels, "sharded": arr.shards is not None,
            "end_seconds": stages.get("end_pass", 0.0) + stages.get("finish", 0.0),
            "rewritten": arr.attrs["blockbuster"]["report"]["tiles"].get("rewritten", 0)}


def _options(parser: Any) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of tiles to run")
    parser.add_argument("--report-only", action="store_true",
                        help="render the report again from the last run's JSON")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tiles = [r["n_tiles"] for r in rows]
    left.plot(tiles, [r["ms_per_tile"] for r in rows], "o-", label="engine ms / tile")
    left.axhline(2.0, color="red", ls="--", label="target 2 ms")
    left.set(xscale="log", xlabel="tiles (16 x 16)", ylabel="ms per tile", ylim=(0, None),
             title="engine time per tile, serial")
    left.legend()
    right.plot(tiles, [r["files"] for r in rows], "o-", label="files (work + output)")
    right.plot(tiles, [r["peak_mib"] for r in rows], "s-", label="peak RSS MiB")
    right.plot(tiles, [t / 50 for t in tiles], "r--", label="tiles / 50")
    right.set(xscale="log", yscale="log", xlabel="tiles (16 x 16)",
              title="files and memory")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import json

    args = parse_args(__doc__.splitlines()[0], _options)
    if args.report_only:
        saved = json.loads((DATA.parent / "bench_tiles.json").read_text())
        render(saved["results"]["rows"], saved["command"].split("bench_tiles.py")[-1].split())
        return
    sizes = tuple(args.sizes) if args.sizes else QUICK if args.quick else FULL
    rows = []
    for n in sizes:
        side = TILE * round(math.sqrt(n))
        image = make_image(DATA / f"tiles_blobs_{side}.zarr", side)
        res = run_child(__file__, "run", {"image": str(image),
                                          "output": str(DATA / "tiles_out.zarr")},
                        timeout=max(7200, n // 100))  # 10 ms a tile, 2 h at least
        tiles = res["n_tiles"]
        row = {"asked": n, **res, "image": f"{side} x {side}",
               "ms_per_tile": (res["seconds"] - res["fn_seconds"]) / tiles * 1000,
               "files": res["work_files"] + res["out_files"],
               "peak_mib": res["peak_rss"] / MiB, "work_mib": res["work_bytes"] / MiB,
               "out_mib": res["out_bytes"] / MiB}
        row["files_per_tile"] = row["files"] / tiles
        rows.append(row)
        print(f"{tiles} tiles: {row['ms_per_tile']:.2f} ms/tile, {row['files']} files, "
              f"peak {row['peak_mib']:.0f} MiB", flush=True)
    render(rows, ["--quick"] if args.quick else
           ["--sizes", *map(str, args.sizes)] if args.sizes else [])


def render(rows: list[dict[str, Any]], extra: list[str]) -> None:
    """The tables, verdicts and plot of a run."""
    table = format_table(rows, [
        ("n_tiles", "tiles"), ("image", "image"), ("seconds", "wall s"),
        ("ms_per_tile", "engine ms/tile"), ("end_seconds", "end s"),
        ("rewritten", "tiles rewritten"), ("peak_mib", "peak RSS MiB"),
        ("work_files", "work files"), ("work_mib", "work MiB"), ("out_files", "output files"),
        ("out_mib", "output MiB"), ("files_per_tile", "files/tile"), ("n_labels", "objects")])
    verdicts = [verdict(f"engine ms/tile at {r['n_tiles']:,} tiles", r["ms_per_tile"], "<=", 2.0)
                for r in rows]
    verdicts += [verdict(f"files at {r['n_tiles']:,} tiles, per tile", r["files_per_tile"], "<=",
                         1 / 50 + 20 / r["n_tiles"]) for r in rows]
    if len(rows) > 1:
        growth = rows[-1]["peak_mib"] / rows[0]["peak_mib"]
        verdicts.append(f"peak RSS grows {growth:.2f}x from {rows[0]['n_tiles']:,} to "
                        f"{rows[-1]['n_tiles']:,} tiles")
    verdicts.append(f"{TILE} x {TILE} tiles of a uint8 blob image (zarr, 256 x 256 chunks), "
                    "fn = scipy.ndimage.label (its own time subtracted), stitch='faces', no "
                    "overlap, serial, a fresh process per size; end s: the end pass (tiles "
                    "holding labels joined late rewritten) and the final checks, part of the "
                    "wall time; files and bytes of the work "
                    "directory counted at the end of the run (kept), output sharded when "
                    "'sharded'.")
    plot(rows, plot_path("bench_tiles"))
    report("bench_tiles", "Many tiny tiles", {"": table}, verdicts, {"rows": rows},
           command_line(__file__, "--quick" in extra, *[e for e in extra if e != "--quick"]))


if __name__ == "__main__":
    if not child_main({"run": child_run}):
        main()
