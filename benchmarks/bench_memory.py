"""Memory is flat in image size: peak RSS of ``tile_process`` on 1, 4 and 16 GiB images.

Every image is a generated 2-D float32 zarr array of round nuclei (compressed on disk, written
chunk by chunk), processed with the same tile shape, overlap and segmentation function
(threshold + ``scipy.ndimage.label``, stitched with ``stitch="iou"``), each run in a fresh
process, with the in-process executor (the default). Peak RSS is the child's ``VmHWM``; each
stage's own peak is measured too: ``segment`` (read, fn, number; the committer matches each tile
with its finished neighbours and writes its core) and ``finish`` (the end pass: rewrite the
tiles whose labels were joined later).

Targets (issue 9): RSS(16 GiB) / RSS(1 GiB) <= 1.1, and the peak within
``2 x padded tile bytes x the segmenter's memory factor + 300 MiB``.

float32 (a deconvolved or normalised image) rather than uint16 keeps the number of voxels, and
so the run time on 2 cores, within the 10-minute budget; the memory per tile is what matters.

``--dense`` adds a run on the middle-sized image with nuclei twice as close (four times the
objects), which separates memory that follows the number of objects from memory that follows
the image size.

Run: ``python benchmarks/bench_memory.py [--quick] [--dense]``
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    MiB,
    PhaseRecorder,
    RssSampler,
    Timer,
    child_main,
    command_line,
    dir_bytes,
    format_table,
    nuclei_block,
    parse_args,
    peak_rss,
    plot_path,
    report,
    run_child,
    verdict,
    write_zarr,
)

TILE = (2048, 2048)
OVERLAP = 16
STORAGE_CHUNKS = (512, 512)
THRESHOLD = 400.0
FIXED_ALLOWANCE = 300 * MiB
#: Image sizes (GiB) and their 2-D float32 shapes.
FULL = {1: (16384, 16384), 4: (32768, 32768), 16: (65536, 65536)}
#: The engine's stages (see ``_common.PhaseRecorder``).
STAGES = ("segment", "finish")
QUICK = {0.0625: (4096, 4096), 0.25: (8192, 8192), 0.5: (8192, 16384)}


def threshold_label(tile):
    """The segmentation function: foreground threshold, then connected components."""
    from scipy import ndimage

    return ndimage.label(tile > THRESHOLD)[0]


# -- child ----------------------------------------------------------------------------------------
def child_run(p: dict[str, Any]) -> dict[str, Any]:
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    import blockbuster

    baseline = peak_rss()
    recorder = PhaseRecorder()
    out = Path(p["output"])
    with RssSampler() as sampler, Timer() as t:
        result = blockbuster.tile_process(p["image"], threshold_label, tuple(p["tile"]),
                                          p["overlap"], stitch="iou", output=str(out),
                                          overwrite=True, progress=False)
    meta = result.attrs["blockbuster"]
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": t.seconds, "baseline_rss": baseline, "peak_rss": recorder.overall_peak,
            "phases": recorder.phases, "n_labels": meta["n_labels"],
            "timeline": sampler.thinned()}


def child_baseline(p: dict[str, Any]) -> dict[str, Any]:
    """RSS of the interpreter with the run's imports, doing nothing."""
    import dask.array  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    import blockbuster  # noqa: F401

    return {}


# -- driver ---------------------------------------------------------------------------------------
def model_bytes() -> tuple[int, float, int]:
    """Padded tile bytes, the default memory model's factor, and the engine's own prediction."""
    import numpy as np

    from blockbuster.segmenter import DEFAULT_MEMORY_MODEL
    from blockbuster.sizing import predict_peak_bytes

    itemsize = np.dtype("float32").itemsize
    voxels = (TILE[0] + 2 * OVERLAP) * (TILE[1] + 2 * OVERLAP)
    factor = DEFAULT_MEMORY_MODEL.per_voxel_bytes(itemsize) / itemsize
    predicted = predict_peak_bytes(TILE, "float32", overlap=OVERLAP)
    return voxels * itemsize, factor, predicted


def generate(sizes: dict[float, tuple[int, int]], spacing: int = 40,
             ) -> dict[float, dict[str, Any]]:
    made = {}
    block = functools.partial(nuclei_block, spacing=spacing)
    suffix = "" if spacing == 40 else f"_s{spacing}"
    for gib, shape in sizes.items():
        path = DATA / f"nuclei_f32_{shape[0]}x{shape[1]}{suffix}.zarr"
        with Timer() as t:
            write_zarr(path, shape, STORAGE_CHUNKS, "float32", block, write_step=TILE, workers=2)
        made[gib] = {"gib": gib, "path": path, "shape": shape, "gen_seconds": t.seconds,
                     "disk": dir_bytes(path), "spacing": spacing}
        print(f"image {gib} GiB {shape}: ready in {t.seconds:.0f} s, "
              f"{made[gib]['disk'] / MiB:.0f} MiB on disk", flush=True)
    return made


def plot(rows: list[dict[str, Any]], bound: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        t, rss = zip(*r["timeline"], strict=True)
        dense = "" if r["spacing"] == 40 else f", nuclei every {r['spacing']} px"
        left.plot([x / max(t[-1], 1e-9) for x in t], [b / MiB for b in rss],
                  label=f"{r['gib']:g} GiB image{dense} ({r['seconds']:.0f} s)")
    left.axhline(bound / MiB, color="red", ls="--", label="target bound")
    left.set(xlabel="fraction of the run", ylabel="RSS (MiB)", ylim=(0, bound / MiB * 1.15),
             title="RSS during tile_process (same 2048x2048 tiles)")
    left.legend(fontsize=8)
    same = [r for r in rows if r["spacing"] == 40]
    sizes = [r["gib"] for r in same]
    right.plot(sizes, [r["peak_rss"] / MiB for r in same], "o-", label="peak RSS")
    for stage in STAGES:
        right.plot(sizes, [r["phases"][stage]["peak_rss"] / MiB for r in same], ".:",
                   label=f"peak during {stage}")
    for r in rows:
        if r["spacing"] != 40:
            right.plot([r["gib"]], [r["peak_rss"] / MiB], "r*", ms=10,
                       label=f"peak RSS, nuclei every {r['spacing']} px ({r['n_labels']:,} "
                             "objects)")
    right.plot(sizes, [g * 1024 for g in sizes], "k--", lw=0.8, label="image size")
    right.axhline(bound / MiB, color="red", ls="--", label="target bound")
    right.set(xscale="log", yscale="log", xlabel="image size (GiB)", ylabel="MiB",
              title="peak RSS vs image size")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--dense", action="store_true",
        help="also run the middle size with nuclei twice as close (4x the objects), to tell "
             "memory that follows the number of objects from memory that follows image size"))
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    images = list(generate(sizes).values())
    if args.dense:
        middle = list(sizes)[1]
        images.append(generate({middle: sizes[middle]}, spacing=20)[middle])
    baseline = run_child(__file__, "baseline", {})["peak_rss"]
    tile_bytes, factor, predicted = model_bytes()
    bound = 2 * tile_bytes * factor + FIXED_ALLOWANCE
    rows = []
    for img in images:
        gib = img["gib"]
        res = run_child(__file__, "run", {"image": str(img["path"]), "tile": TILE,
                                          "overlap": OVERLAP,
                                          "output": str(DATA / "memory_out.labels.zarr")})
        rows.append({"gib": gib, "spacing": img["spacing"],
                     "shape": f"{img['shape'][0]} x {img['shape'][1]}",
                     "disk_mib": img["disk"] / MiB, "n_tiles": len(range(0, img["shape"][0],
                     TILE[0])) * len(range(0, img["shape"][1], TILE[1])), **res})
        print(f"{gib} GiB: peak {res['peak_rss'] / MiB:.0f} MiB in {res['seconds']:.0f} s",
              flush=True)
    for r in rows:
        r["peak_mib"] = r["peak_rss"] / MiB
        r["baseline_mib"] = r["baseline_rss"] / MiB
        for stage in STAGES:
            r[f"{stage}_mib"] = r["phases"][stage]["peak_rss"] / MiB
            r[f"{stage}_s"] = r["phases"][stage]["seconds"]
        r["ratio"] = r["peak_rss"] / rows[0]["peak_rss"]
        r["vs_bound"] = r["peak_rss"] / bound
    table = format_table(rows, [
        ("gib", "image GiB"), ("shape", "shape (float32)"), ("spacing", "nuclei every (px)"),
        ("disk_mib", "on disk MiB"),
        ("n_tiles", "tiles"), ("n_labels", "objects"), ("seconds", "wall s"),
        ("baseline_mib", "after imports MiB"), ("segment_mib", "segment peak MiB"),
        ("finish_mib", "finish peak MiB"),
        ("peak_mib", "peak RSS MiB"), ("ratio", "peak / smallest's"),
        ("vs_bound", "peak / bound")])
    stage_times = format_table(rows, [("gib", "image GiB"), ("segment_s", "segment s"),
                                      ("finish_s", "finish s"),
                                      ("seconds", "total s")])
    largest, smallest = max(rows, key=lambda r: r["gib"]), rows[0]
    verdicts = [
        verdict(f"RSS({largest['gib']:g} GiB) / RSS({smallest['gib']:g} GiB)", largest["ratio"],
                "<=", 1.1),
        verdict(f"peak RSS at {largest['gib']:g} GiB (MiB)", largest["peak_rss"] / MiB, "<=",
                bound / MiB, ".0f"),
        f"bound = 2 x padded tile bytes ({tile_bytes / MiB:.1f} MiB) x memory factor "
        f"({factor:g}, the default MemoryModel for float32) + {FIXED_ALLOWANCE / MiB:.0f} MiB "
        f"= {bound / MiB:.0f} MiB; the engine's own prediction (predict_peak_bytes, engine "
        f"buffers included) is {predicted / MiB:.0f} MiB per tile; the interpreter with numpy, "
        f"scipy, zarr, dask and blockbuster imported takes {baseline / MiB:.0f} MiB.",
        *[f"nuclei every {r['spacing']} px at {r['gib']:g} GiB ({r['n_labels']:,} objects): "
          f"peak {r['peak_rss'] / MiB:.0f} MiB, {r['ratio']:.2f} x the smallest image's "
          f"(segment stage {r['segment_mib']:.0f} MiB, finish stage {r['finish_mib']:.0f} MiB)"
          for r in rows if r["spacing"] != 40],
        f"total benchmark time {time.perf_counter() - started:.0f} s (image generation "
        f"{sum(i['gen_seconds'] for i in images):.0f} s).",
    ]
    png = plot_path("bench_memory")
    plot(rows, bound, png)
    report("bench_memory", "Memory is flat in image size", {
        "Peak RSS per stage (each stage's own peak; the run's peak is their maximum):": table,
        "Time per stage:": stage_times}, verdicts,
        {"rows": rows, "bound": bound, "tile_bytes": tile_bytes, "factor": factor,
         "baseline": baseline, "predicted": predicted},
        command_line(__file__, args.quick, *(["--dense"] if args.dense else [])))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"run": child_run, "baseline": child_baseline}):
        main()
