"""Parallel speed-up: one worker vs two workers on a ``distributed.LocalCluster``.

The same image, tiles and fn run three ways, each in a fresh process: in this process (no
client, the default ``InProcess`` executor), and with the ``Dask`` executor on a
``LocalCluster`` with one worker process, and with two worker processes (one thread each).
Cluster start-up is not timed; the run is ``tile_process(..., client=client)``. Whatever the
executor, the run's one ``Committer`` (in this process) assigns the global labels in grid
order as tiles finish, and the end pass rewrites the tiles joined late; its time is measured
too ("committer s").

Two fns, both releasing the GIL:

- ``sleep``: labels the tile, then sleeps to a fixed 100 ms per call (pure waiting: the ideal
  case, which shows the engine's own scaling);
- ``cpu``: a Gaussian filter, a threshold and connected components (SciPy's C code, CPU-bound:
  the realistic case; two workers then compete with the client and scheduler for 2 cores).

Target (issue 9): two workers >= 1.7 x faster than one.

Run: ``python benchmarks/bench_parallel.py [--quick]``
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    PhaseRecorder,
    Timer,
    child_main,
    command_line,
    format_table,
    nuclei_block,
    parse_args,
    plot_path,
    report,
    run_child,
    verdict,
    write_zarr,
)

TILE = 1024
OVERLAP = 16
SLEEP_SECONDS = 0.1
FULL = {"image": (8192, 8192)}
QUICK = {"image": (4096, 2048)}


def sleep_fn(tile):
    """Label, then sleep to a fixed 100 ms per call (the GIL is free while sleeping)."""
    from scipy import ndimage

    start = time.perf_counter()
    labels = ndimage.label(tile > 400)[0]
    time.sleep(max(0.0, SLEEP_SECONDS - (time.perf_counter() - start)))
    return labels


def cpu_fn(tile):
    """Smooth, threshold, label: CPU-bound work in SciPy's C code."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(tile.astype("float32"), 4)
    smooth = ndimage.gaussian_filter(smooth, 2)
    return ndimage.label(smooth > 400)[0]


FNS = {"sleep": sleep_fn, "cpu": cpu_fn}


def _busy(seconds: float) -> int:
    """CPU-bound work for a fixed time; returns how many rounds it managed."""
    import numpy as np

    a = np.random.default_rng(0).random((256, 256))
    rounds, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = np.sin(a) + 0.5
        rounds += 1
    return rounds


def child_calibrate(p: dict[str, Any]) -> dict[str, Any]:
    """How much faster two busy processes get through work than one, on this machine now."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_busy, [0.2, 0.2]))  # start both workers first
        one = pool.submit(_busy, p["seconds"]).result()
        two = sum(pool.map(_busy, [p["seconds"]] * 2))
    return {"speedup": two / one}


def child_run(p: dict[str, Any]) -> dict[str, Any]:
    import blockbuster

    fn = FNS[p["fn"]]
    output = Path(p["output"])
    recorder = PhaseRecorder()
    committer = _time_committer()
    if p["workers"] == 0:
        cpu0 = time.process_time()
        with Timer() as t:
            blockbuster.tile_process(p["image"], fn, (TILE, TILE), OVERLAP, stitch="iou",
                                     output=str(output), overwrite=True, progress=False)
        shutil.rmtree(output, ignore_errors=True)
        return {"seconds": t.seconds, "phases": recorder.phases, "committer": committer[0],
                "cpu": {"client": time.process_time() - cpu0}}
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=p["workers"], threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("scipy.ndimage") and None)  # warm the workers' imports
        before = _cluster_cpu(client)
        with Timer() as t:
            blockbuster.tile_process(p["image"], fn, (TILE, TILE), OVERLAP, stitch="iou",
                                     output=str(output), overwrite=True, progress=False,
                                     client=client)
        after = _cluster_cpu(client)
    shutil.rmtree(output, ignore_errors=True)
    return {"seconds": t.seconds, "phases": recorder.phases, "committer": committer[0],
            "cpu": {k: after[k] - before[k] for k in after}}


def _time_committer() -> list[float]:
    """Wrap ``Committer.accept``: the driver's labelling work, in seconds (one-element list)."""
    from blockbuster.engine.commit import Committer

    total = [0.0]
    accept = Committer.accept

    def timed(self: Any, seg: Any) -> Any:
        start = time.perf_counter()
        try:
            return accept(self, seg)
        finally:
            total[0] += time.perf_counter() - start

    Committer.accept = timed  # type: ignore[method-assign]
    return total


def _cluster_cpu(client: Any) -> dict[str, float]:
    """CPU seconds used so far by the workers (all their threads), the scheduler and us.

    A ``LocalCluster`` runs its scheduler in this process: then it is counted once, as ours.
    """
    import os

    workers = client.run(time.process_time)
    own = client.run_on_scheduler(os.getpid) != os.getpid()
    return {"workers": sum(workers.values()),
            "scheduler": client.run_on_scheduler(time.process_time) if own else 0.0,
            "client": time.process_time()}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["in-process", "1 worker", "2 workers"]
    width = 0.38
    for k, (fn, colour) in enumerate((("sleep", "tab:blue"), ("cpu", "tab:orange"))):
        r = next(r for r in rows if r["fn"] == fn)
        values = [r["serial_s"], r["one_s"], r["two_s"]]
        bars = ax.bar([i + (k - 0.5) * width for i in range(3)], values, width, color=colour,
                      label=f"fn = {fn} (speed-up {r['speedup']:.2f}x)")
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(3), labels)
    ax.set(ylabel="wall time (s)", title="tile_process on a LocalCluster (2 cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    cfg = QUICK if args.quick else FULL
    image = write_zarr(DATA / f"nuclei_u16_{cfg['image'][0]}x{cfg['image'][1]}_c512.zarr",
                       cfg["image"], (512, 512), "uint16",
                       functools.partial(nuclei_block, spacing=40),
                       write_step=(2048, 2048), workers=2)
    n_tiles = (cfg["image"][0] // TILE) * (cfg["image"][1] // TILE)
    rows, stage_rows = [], []
    calibration = []
    for fn in FNS:
        row: dict[str, Any] = {"fn": fn, "n_tiles": n_tiles, "load": os.getloadavg()[0]}
        calibration.append(run_child(__file__, "calibrate", {"seconds": 2.0})["speedup"])
        for key, workers in (("serial_s", 0), ("one_s", 1), ("two_s", 2)):
            res = run_child(__file__, "run", {"image": str(image), "fn": fn, "workers": workers,
                                              "output": str(DATA / "parallel_out.zarr")})
            row[key] = res["seconds"]
            cpu = res["cpu"]
            row[key.replace("_s", "_cores")] = sum(cpu.values()) / res["seconds"]
            if workers == 1:  # one worker process: how many cores it kept busy by itself
                row["one_worker_cores"] = cpu["workers"] / res["seconds"]
            stage_rows.append({"fn": fn, "workers": workers or "in-process",
                               "total": res["seconds"], "committer": res["committer"],
                               **{k: v["seconds"] for k, v in res["phases"].items()}})
            print(f"fn {fn}, workers {workers}: {res['seconds']:.1f} s", flush=True)
        calibration.append(run_child(__file__, "calibrate", {"seconds": 2.0})["speedup"])
        row["speedup"] = row["one_s"] / row["two_s"]
        row["one_vs_serial"] = row["one_s"] / row["serial_s"]
        row["cpu_bound"] = row["two_cores"] / row["one_cores"]
        row["machine"] = min(calibration[-2:])
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
    table = format_table(rows, [
        ("fn", "fn"), ("n_tiles", "tiles"), ("serial_s", "in-process s"),
        ("one_s", "1 worker s"),
        ("two_s", "2 workers s"), ("speedup", "speed-up 1 -> 2 workers"),
        ("one_vs_serial", "1 worker / in-process"),
        ("serial_cores", "cores busy, in-process"), ("one_cores", "cores busy, 1 worker"),
        ("one_worker_cores", "of which the worker"), ("two_cores", "cores busy, 2 workers"),
        ("cpu_bound", "speed-up the cores allow"),
        ("machine", "2-process speed-up of a busy loop, same time"),
        ("load", "load avg before"), ("load_after", "load avg after")])
    stages = format_table(stage_rows, [
        ("fn", "fn"), ("workers", "workers"), ("segment", "segment s"),
        ("finish", "end pass s"), ("total", "total s"),
        ("committer", "committer s (during segment)")])
    verdicts = [verdict(f"speed-up from 1 to 2 workers, fn = {r['fn']}", r["speedup"], ">=", 1.7)
                for r in rows]
    verdicts.append(
        f"{cfg['image'][0]} x {cfg['image'][1]} uint16 image, {TILE} x {TILE} tiles, overlap "
        f"{OVERLAP}, stitch='iou'; LocalCluster with processes, 1 thread per worker; cluster "
        "start-up excluded. The machine has 2 cores, shared with the client and the scheduler. "
        "Every run labels each tile as the committer receives it (in grid order; in this "
        "process, overlapped with segmenting) and ends with the end pass (rewriting tiles joined "
        "later); with a cluster the workers write the cores. 'load avg' is the machine's "
        "1-minute load average before the first and after the last run of the fn (other jobs "
        "included).")
    png = plot_path("bench_parallel")
    plot(rows, png)
    verdicts.append(
        "The last column runs a NumPy busy loop in one and then in two processes right before "
        "and after each fn's runs (the lower of the two is shown): the speed-up this shared "
        "machine offered at that time, an upper bound for the CPU-bound fn. 'Cores busy' is the "
        "CPU time of every process of the run (workers with all their threads, scheduler, "
        "client) over its wall time; 'of which the worker' is the one worker's own share. With "
        "a CPU-bound fn, two workers cannot be faster than one by more than 'the speed-up the "
        "cores allow' = (cores busy with 2 workers) / (cores busy with 1 worker).")
    report("bench_parallel", "Parallel speed-up", {"": table, "Time per stage:": stages},
           verdicts, {"rows": rows, "stages": stage_rows, "calibration": calibration},
           command_line(__file__, args.quick))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"run": child_run, "calibrate": child_calibrate}):
        main()
