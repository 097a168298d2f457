"""One engine, before and after: the serial and distributed engines against the one pipeline.

Issue 17 replaced two engines (commit 814e145: a serial one-pass engine without a client, and a
distributed two-pass engine with ``client=``) by one pipeline whose executor decides only where
tiles run (in this process, or on dask workers) while one ``Committer`` in the driver assigns
the global labels in grid order. This script runs the same ``tile_process`` call on both:

- before (``--before-src``, default: a ``git worktree`` of 814e145 at ``/work/wt/old-engine``):
  ``serial`` (no client) and ``distributed`` (``client=`` a ``LocalCluster``);
- after (this checkout's ``src``): ``in-process`` (no client) and ``dask`` (the same
  ``LocalCluster``).

Each run is a fresh interpreter with ``PYTHONPATH`` set to the engine's ``src``. The image is a
uint16 zarr of nuclei (every 20 voxels) in 256 x 256 chunks, cut into 32 x 32 tiles with
overlap 4 and ``stitch="iou"``; fn thresholds and labels (about 0.1 ms per tile), so the
engine's own per-tile work is what is measured, at 1k, 10k and 100k tiles. The cluster has 2
worker processes of one thread each; its start-up is not timed. Measured per run:

- wall time of ``tile_process`` and peak RSS (``VmHWM``) of the driver and of each worker;
- driver ms/tile: time the driver spends in the code that labels the tiles in grid order.
  After: ``Committer.accept`` (match with the neighbours before, take global labels, append
  the record, and in-process write the core) plus the end pass. Before, serial: the store
  thread's ``assign_tile``, core write and ``save_record``, plus ``_finish_serial``. Before,
  distributed: its two passes after segmenting, ``_stitch`` (the driver gathers every match and
  solves the label graph) and ``_write_output`` (write tasks on the workers);
- after segmentation s: what remains once the last tile is segmented (before, distributed: the
  stitch and write passes; otherwise the end pass and finalising);
- driver CPU ms/tile: CPU time of the driver process (all its threads; with a cluster this
  includes the scheduler, which a ``LocalCluster`` runs in the driver) per tile;
- output chunk writes per chunk: every ``LocalStore.set`` of an output chunk key, in the driver
  and in the workers, over the number of chunks (each output chunk is one tile core).
  Intermediate zarr writes (the distributed engine's ``raw.zarr``) are counted apart.

Run: ``python benchmarks/bench_engine.py [--quick] [--sizes N ...] [--variants V ...]
[--keep]``. ``--keep`` keeps the rows of an earlier run (same image sizes) for variants and
sizes not run again, so the 100k-tile cluster runs can be done on their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    OUT,
    ROOT,
    MiB,
    child_main,
    format_table,
    nuclei_block,
    parse_args,
    peak_rss,
    plot_path,
    report,
    verdict,
    write_zarr,
)

TILE = 32
OVERLAP = 4
SPACING = 20
CHUNK = 256
THRESHOLD = 400
FULL = (1_000, 10_000, 100_000)
QUICK = (256, 1_024)
OLD_SRC = Path("/work/wt/old-engine/src")
#: variant -> (side, uses a cluster)
VARIANTS = {"serial": ("before", False), "distributed": ("before", True),
            "in-process": ("after", False), "dask": ("after", True)}


def label_fn(tile):
    """Threshold and label: about 0.1 ms for a 40 x 40 tile, so the engine's work shows."""
    from scipy import ndimage

    return ndimage.label(tile > THRESHOLD)[0]


def image_shape(n_tiles: int) -> tuple[int, int]:
    side = math.isqrt(n_tiles)
    return side * TILE, math.ceil(n_tiles / side) * TILE


def image_for(n_tiles: int) -> Path:
    import functools

    shape = image_shape(n_tiles)
    path = DATA / f"engine_{shape[0]}x{shape[1]}.zarr"
    return write_zarr(path, shape, (CHUNK, CHUNK), "uint16",
                      functools.partial(nuclei_block, spacing=SPACING), workers=2)


# -- counting output chunk writes (driver and workers) ---------------------------------------
METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def install_write_counter() -> None:
    """Count every ``LocalStore.set`` of a chunk (not metadata) in this process, by path.

    The counts live on the class, not in a global of this script: on a worker this function
    arrives pickled by value, with its own copy of any global it names.
    """
    from collections import Counter

    from zarr.storage import LocalStore

    if hasattr(LocalStore, "_bench_writes"):
        return
    writes: Counter[str] = Counter()
    original = LocalStore.set

    async def counted(self: Any, key: str, value: Any) -> None:
        if not key.endswith(METADATA):
            writes[f"{self.root}/{key}"] += 1
        await original(self, key, value)

    LocalStore.set = counted  # type: ignore[method-assign]
    LocalStore._bench_writes = writes  # type: ignore[attr-defined]


def written_keys() -> dict[str, int]:
    from zarr.storage import LocalStore

    return dict(getattr(LocalStore, "_bench_writes", {}))


def worker_peak() -> int:
    return peak_rss()


# -- timing the engine's stages in the driver ----------------------------------------------
class Clock:
    """Adds the wall time and the calling thread's CPU time of wrapped functions to named
    totals (``name`` and ``name + "_cpu"``)."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def wrap(self, owner: Any, attr: str, name: str, thread: str | None = None) -> None:
        import threading

        func = getattr(owner, attr)
        totals = self.totals

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if thread is not None and not threading.current_thread().name.startswith(thread):
                return func(*args, **kwargs)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                totals[name + "_cpu"] += time.thread_time() - cpu

        setattr(owner, attr, wrapped)


def instrument(side: str, clock: Clock) -> None:
    if side == "after":
        from blockbuster.engine import commit, run

        clock.wrap(commit.Committer, "accept", "driver")
        clock.wrap(commit.Committer, "written", "driver")
        clock.wrap(run, "segment_tiles", "segment")
        clock.wrap(run, "_end_pass", "driver")
        clock.wrap(run, "_end_pass", "end")
        return
    import zarr

    from blockbuster import runner, store

    clock.wrap(runner, "_segment_all", "segment")
    # serial: the store thread's labelling work (matching, core write, record) and the finish
    clock.wrap(runner, "assign_tile", "driver", thread="blockbuster-store")
    clock.wrap(zarr.Array, "__setitem__", "driver", thread="blockbuster-store")
    clock.wrap(store.WorkDir, "save_record", "driver", thread="blockbuster-store")
    clock.wrap(runner, "_finish_serial", "driver")
    clock.wrap(runner, "_finish_serial", "end")
    # distributed: the passes after segmenting
    clock.wrap(runner, "_stitch", "driver")
    clock.wrap(runner, "_write_output", "driver")
    clock.wrap(runner, "_stitch", "end")
    clock.wrap(runner, "_write_output", "end")


def child_run(p: dict[str, Any]) -> dict[str, Any]:
    import blockbuster

    side, cluster_kind = VARIANTS[p["variant"]]
    assert Path(blockbuster.__file__).resolve().is_relative_to(Path(p["src"]).resolve()), \
        f"imported {blockbuster.__file__}, not from {p['src']}"
    install_write_counter()
    clock = Clock()
    instrument(side, clock)
    out = Path(p["output"])
    shutil.rmtree(out, ignore_errors=True)
    client = cluster = None
    if cluster_kind:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        client.run(install_write_counter)
    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = blockbuster.tile_process(p["image"], label_fn, (TILE, TILE), OVERLAP, output=out,
                                      stitch="iou", client=client, progress=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    writes = Counter(written_keys())
    worker_peaks: list[int] = []
    if client is not None:
        for counts in client.run(written_keys).values():
            writes.update(counts)
        worker_peaks = list(client.run(worker_peak).values())
        client.close()
        cluster.close()
    root = str(out.resolve())
    out_writes = {k: v for k, v in writes.items() if k.startswith(root + "/")}
    n_chunks = int(np.prod(result.cdata_shape))
    n_labels = int(result.attrs["blockbuster"]["n_labels"])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "driver_s": clock.totals["driver"],
            "driver_thread_cpu_s": clock.totals["driver_cpu"],
            "segment_s": clock.totals["segment"], "end_s": clock.totals["end"],
            "driver_cpu_s": cpu, "driver_peak": peak_rss(), "worker_peaks": worker_peaks,
            "output_writes": sum(out_writes.values()), "chunks_written": len(out_writes),
            "max_writes_per_chunk": max(out_writes.values(), default=0),
            "other_writes": sum(writes.values()) - sum(out_writes.values()),
            "n_chunks": n_chunks, "n_labels": n_labels, "engine": blockbuster.__file__}


def run_variant(variant: str, n_tiles: int, image: Path, src: Path) -> dict[str, Any]:
    """One run in a fresh interpreter importing blockbuster from ``src``."""
    params = {"variant": variant, "image": str(image), "src": str(src),
              "output": str(DATA / f"engine_out_{variant}.zarr")}
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"}
    cmd = [sys.executable, __file__, "--child", "run", json.dumps(params)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} at {n_tiles} tiles failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def derive(row: dict[str, Any]) -> dict[str, Any]:
    n = row["n_tiles"]
    row.update(
        side=VARIANTS[row["variant"]][0],
        driver_ms=row["driver_s"] / n * 1e3, driver_cpu_ms=row["driver_cpu_s"] / n * 1e3,
        labelling_cpu_ms=row.get("driver_thread_cpu_s", math.nan) / n * 1e3,
        # tiles reach the driver every fn/2 ms from 2 workers: its labelling is <= 5 % of that
        # when fn >= 2 x 20 x (labelling CPU per tile)
        fn_for_5pct=(2 * 20 * row["driver_thread_cpu_s"] / n * 1e3
                     if VARIANTS[row["variant"]][1] and "driver_thread_cpu_s" in row else "-"),
        after_segment_s=max(row["wall"] - row["segment_s"], 0.0),
        driver_mib=row["driver_peak"] / MiB,
        workers_mib=max(row["worker_peaks"], default=0) / MiB or "-",
        writes_per_chunk=row["output_writes"] / row["n_chunks"],
        ms_per_tile=row["wall"] / n * 1e3)
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {"serial": "o--", "distributed": "s--", "in-process": "o-", "dask": "s-"}
    for k, (variant, style) in enumerate(styles.items()):
        sel = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["n_tiles"])
        if not sel:
            continue
        n = [r["n_tiles"] for r in sel]
        label = f"{VARIANTS[variant][0]}: {variant}"
        left.plot(n, [r["ms_per_tile"] for r in sel], style, color=f"C{k}", label=label)
        right.plot(n, [r["driver_ms"] for r in sel], style, color=f"C{k}", label=label)
    left.set(xscale="log", yscale="log", xlabel="tiles", ylabel="ms per tile",
             title="wall time per tile (32 x 32 tiles, fn ~0.1 ms)")
    right.set(xscale="log", yscale="log", xlabel="tiles", ylabel="ms per tile",
              title="driver's labelling work per tile")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", help="tile counts (default 1k 10k 100k)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--before-src", type=Path, default=OLD_SRC,
                        help="src of the engine before (commit 814e145)")
    parser.add_argument("--keep", action="store_true",
                        help="keep earlier rows for the variants and sizes not run now")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], options)
    sizes = args.sizes or (QUICK if args.quick else FULL)
    after_src = ROOT / "src"
    if any(VARIANTS[v][0] == "before" for v in args.variants) and \
            not (args.before_src / "blockbuster" / "runner.py").exists():
        sys.exit(f"{args.before_src} is not the engine before issue 17; create it with "
                 "`git worktree add /work/wt/old-engine 814e145` or pass --before-src")
    saved = OUT / "bench_engine.json"
    rows: list[dict[str, Any]] = []
    if args.keep and saved.exists():
        rows = [derive(r) for r in json.loads(saved.read_text())["results"]["rows"]
                if not (r["variant"] in args.variants and r["n_tiles"] in sizes)]
    command = " ".join(["python benchmarks/bench_engine.py", *(["--quick"] if args.quick else []),
                        *([f"--sizes {' '.join(map(str, sizes))}"] if args.sizes else []),
                        *(["--variants " + " ".join(args.variants)]
                          if args.variants != list(VARIANTS) else []),
                        *(["--keep"] if args.keep else [])])
    stamp = time.strftime("%Y-%m-%d %H:%M")
    load = []
    for n in sizes:
        image = image_for(n)
        for variant in args.variants:
            src = args.before_src if VARIANTS[variant][0] == "before" else after_src
            load.append(os.getloadavg()[0])
            res = run_variant(variant, n, image, src)
            row = derive({"variant": variant, "n_tiles": n, "load_before": load[-1], **res,
                          "run": f"`{command}` ({stamp})"})
            rows.append(row)
            print(f"{variant} {n} tiles: {row['wall']:.1f} s, driver {row['driver_ms']:.3f} "
                  f"ms/tile, {row['writes_per_chunk']:.3f} writes/chunk, driver peak "
                  f"{row['driver_mib']:.0f} MiB", flush=True)
    order = list(VARIANTS)
    rows.sort(key=lambda r: (r["n_tiles"], order.index(r["variant"])))
    table = format_table(rows, [
        ("n_tiles", "tiles"), ("side", "engine"), ("variant", "executor"), ("wall", "wall s"),
        ("ms_per_tile", "wall ms/tile"), ("driver_ms", "driver ms/tile"),
        ("labelling_cpu_ms", "of which CPU ms/tile"), ("fn_for_5pct", "fn ms/tile for 5 %"),
        ("after_segment_s", "after segmentation s"), ("driver_cpu_ms", "driver CPU ms/tile"),
        ("driver_mib", "driver peak MiB"), ("workers_mib", "worker peak MiB"),
        ("writes_per_chunk", "output writes / chunk"),
        ("max_writes_per_chunk", "most writes of one chunk"),
        ("other_writes", "other zarr chunk writes"), ("n_labels", "objects"),
        ("load_before", "load avg")])
    verdicts = []
    for n in sorted({r["n_tiles"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["n_tiles"] == n}
        if "serial" in by and "in-process" in by:
            verdicts.append(verdict(f"in-process / serial (before) wall at {n:,} tiles",
                                    by["in-process"]["wall"] / by["serial"]["wall"], "<=", 1.05))
            verdicts.append(verdict(
                f"in-process / serial (before) driver peak RSS at {n:,} tiles",
                by["in-process"]["driver_peak"] / by["serial"]["driver_peak"], "<=", 1.1))
        if "dask" in by:
            verdicts.append(verdict(f"dask: most writes of one output chunk at {n:,} tiles",
                                    by["dask"]["max_writes_per_chunk"], "<=", 1, ".0f"))
        if len({r["n_labels"] for r in by.values()}) > 1:  # same image, same objects
            verdicts.append(f"**object counts differ at {n:,} tiles**: " + ", ".join(
                f"{v} {r['n_labels']:,}" for v, r in by.items()))
    for variant in ("in-process", "dask"):
        sel = sorted((r for r in rows if r["variant"] == variant and "labelling_cpu_ms" in r),
                     key=lambda r: r["n_tiles"])
        if len(sel) > 1:
            verdicts.append(verdict(
                f"{variant}: driver labelling CPU per tile, {sel[-1]['n_tiles']:,} / "
                f"{sel[0]['n_tiles']:,} tiles", sel[-1]["labelling_cpu_ms"]
                / sel[0]["labelling_cpu_ms"], "<=", 1.25))
    verdicts.append(
        "'driver ms/tile' is wall time in the labelling code, 'of which CPU' that thread's own "
        "CPU time (the rest is waiting for the GIL or a core: the scheduler runs in the same "
        "process, the workers on the same 2 cores). 'fn ms/tile for 5 %': with 2 workers, tiles "
        "reach the driver every fn / 2 ms; the driver's labelling CPU is at most 5 % of that "
        "for an fn at least this slow. Before, distributed: the driver's stitch and write "
        "passes run after segmenting, not per tile as tiles arrive.")
    verdicts.append(
        f"uint16 image of nuclei every {SPACING} voxels in {CHUNK} x {CHUNK} chunks; tiles "
        f"{TILE} x {TILE}, overlap {OVERLAP}, stitch='iou', fn = threshold + label; cluster: "
        "LocalCluster, 2 worker processes x 1 thread, start-up not timed. 'load avg' is the "
        "1-minute load average just before the run (a shared 2-core machine).")
    runs = sorted({r.get("run", "an earlier run") for r in rows})
    if len(runs) > 1:
        verdicts.append("rows measured by: " + "; ".join(runs))
    png = plot_path("bench_engine")
    plot(rows, png)
    report("bench_engine", "One engine: before and after", {"": table}, verdicts,
           {"rows": rows}, command)
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"run": child_run}):
        main()
