"""What tiling costs: tiled vs whole-image processing, for images that fit in RAM.

For each image size and fn, two fresh processes: ``whole`` reads the whole zarr image, calls
``fn`` once and writes the labels to zarr; ``tiled`` runs ``tile_process`` with 1024 x 1024
tiles (serial, the default). Reported: tiled / whole wall time and peak RSS.

fns:

- ``label``: threshold + ``scipy.ndimage.label``; ``stitch="faces"``, no overlap (exact:
  the tiled labels are the whole-image labels);
- ``watershed``: the built-in ``WatershedSegmenter(diameter=30)`` (smoothing, global Otsu
  threshold, distance-transform watershed); ``stitch="iou"`` with its preferred overlap of one
  diameter. Its ``prepare`` (the global threshold from a subsample) runs in both variants.

Run: ``python benchmarks/bench_whole_image.py [--quick]``
"""

from __future__ import annotations

import functools
import resource
import shutil
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    MiB,
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
    write_zarr,
)

TILE = (1024, 1024)
DIAMETER = 30
FULL = ((2048, 2048), (4096, 4096), (8192, 8192))
QUICK = ((1024, 1024), (2048, 2048))


def threshold_label(tile):
    from scipy import ndimage

    return ndimage.label(tile > 400)[0]


def make_fn(name: str):
    """The fn, its stitching mode and overlap."""
    if name == "label":
        return threshold_label, "faces", 0
    from blockbuster.plugins.watershed import WatershedSegmenter

    seg = WatershedSegmenter(diameter=DIAMETER)
    return seg, "iou", seg.preferred_overlap


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_whole(p: dict[str, Any]) -> dict[str, Any]:
    import zarr

    from blockbuster.io import open_image
    from blockbuster.segmenter import Segmenter

    fn, _, _ = make_fn(p["fn"])
    cpu0 = _cpu()
    with Timer() as t:
        if isinstance(fn, Segmenter):
            fn.prepare(open_image(p["image"]))
        image = zarr.open_array(p["image"], mode="r")[:]
        labels = fn(image)
        del image
        out = zarr.create_array(store=p["output"], shape=labels.shape, chunks=TILE,
                                dtype=labels.dtype, fill_value=0, overwrite=True)
        out[:] = labels
    n = int(labels.max())
    shutil.rmtree(p["output"], ignore_errors=True)
    return {"seconds": t.seconds, "cpu": _cpu() - cpu0, "n_labels": n}


def child_tiled(p: dict[str, Any]) -> dict[str, Any]:
    import blockbuster

    fn, stitch, overlap = make_fn(p["fn"])
    recorder = PhaseRecorder()
    cpu0 = _cpu()
    with Timer() as t:
        out = blockbuster.tile_process(p["image"], fn, TILE, overlap, stitch=stitch,
                                       output=p["output"], overwrite=True, progress=False)
    n = out.attrs["blockbuster"]["n_labels"]
    shutil.rmtree(p["output"], ignore_errors=True)
    return {"seconds": t.seconds, "cpu": _cpu() - cpu0, "n_labels": n,
            "phases": recorder.phases, "peak_rss": recorder.overall_peak}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for fn, colour in (("label", "tab:blue"), ("watershed", "tab:orange")):
        sel = [r for r in rows if r["fn"] == fn]
        mvox = [r["mvoxels"] for r in sel]
        left.plot(mvox, [r["time_ratio"] for r in sel], "o-", color=colour, label=fn)
        right.plot(mvox, [r["whole_mib"] for r in sel], "o--", color=colour,
                   label=f"{fn}: whole image")
        right.plot(mvox, [r["tiled_mib"] for r in sel], "o-", color=colour,
                   label=f"{fn}: tiled")
    left.axhline(1, color="grey", lw=0.8)
    left.set(xscale="log", xlabel="image size (megavoxels)", ylabel="tiled / whole wall time",
             title="time cost of tiling")
    right.set(xscale="log", yscale="log", xlabel="image size (megavoxels)",
              ylabel="peak RSS (MiB)", title="peak memory")
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(mvox, [f"{m:.0f}" for m in mvox])
    ticks = [t for t in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
             if min(r["tiled_mib"] for r in rows) / 2 <= t <= max(r["whole_mib"] for r in rows) * 2]
    right.set_yticks(ticks, [str(t) for t in ticks])
    left.legend()
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes = QUICK if args.quick else FULL
    rows = []
    for shape in sizes:
        image = write_zarr(DATA / f"nuclei_u16_{shape[0]}x{shape[1]}_c1024.zarr", shape,
                           TILE, "uint16", functools.partial(nuclei_block, spacing=40),
                           write_step=(2048, 2048))
        for fn in ("label", "watershed"):
            params = {"image": str(image), "fn": fn, "output": str(DATA / "whole_out.zarr")}
            whole = run_child(__file__, "whole", params)
            tiled = run_child(__file__, "tiled", params)
            row = {"fn": fn, "shape": f"{shape[0]} x {shape[1]}",
                   "mvoxels": shape[0] * shape[1] / 1e6,
                   "whole_s": whole["seconds"], "tiled_s": tiled["seconds"],
                   "whole_cpu": whole["cpu"], "tiled_cpu": tiled["cpu"],
                   "time_ratio": tiled["seconds"] / whole["seconds"],
                   "cpu_ratio": tiled["cpu"] / whole["cpu"],
                   "whole_mib": whole["peak_rss"] / MiB, "tiled_mib": tiled["peak_rss"] / MiB,
                   "rss_ratio": tiled["peak_rss"] / whole["peak_rss"],
                   "whole_n": whole["n_labels"], "tiled_n": tiled["n_labels"],
                   "stages": tiled["phases"]}
            rows.append(row)
            print(f"{fn} {row['shape']}: time x{row['time_ratio']:.2f}, "
                  f"RSS x{row['rss_ratio']:.2f}", flush=True)
    table = format_table(rows, [
        ("fn", "fn"), ("shape", "image (uint16)"), ("whole_s", "whole s"),
        ("tiled_s", "tiled s"), ("time_ratio", "time tiled / whole"),
        ("cpu_ratio", "CPU tiled / whole"), ("whole_mib", "whole peak MiB"),
        ("tiled_mib", "tiled peak MiB"), ("rss_ratio", "RSS tiled / whole"),
        ("whole_n", "objects whole"), ("tiled_n", "objects tiled")])
    notes = [
        f"tiles {TILE[0]} x {TILE[1]}; 'label' uses stitch='faces' without overlap, 'watershed' "
        f"stitch='iou' with overlap {DIAMETER}. Both variants read the image from zarr and "
        "write int labels to zarr; times exclude interpreter start-up and imports.",
    ]
    png = plot_path("bench_whole_image")
    plot(rows, png)
    report("bench_whole_image", "Tiled vs whole-image processing", {"": table}, notes,
           {"rows": rows}, command_line(__file__, args.quick))
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main({"whole": child_whole, "tiled": child_tiled}):
        main()
