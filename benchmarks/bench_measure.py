"""Measurements out of core vs reading the labels whole: ``blockbuster.measure`` against
``skimage.measure.regionprops_table`` on the demo image.

The image is the demo's (``blockbuster demo``: 8192 x 8192 uint16 synthetic nuclei in
1024 x 1024 chunks, OME-Zarr); the label image is its true labels (the nuclei the demo
segments, written next to it by the same generator), so no segmentation runs here. Both
variants compute the same per-object table: voxel count, bounding box, centroid and the
intensity mean, minimum, maximum and standard deviation.

* ``tiled``: ``blockbuster.measure(labels, image)``, one chunk at a time.
* ``whole``: read the labels and the image whole into memory, then ``regionprops_table``.

Each runs in a fresh process; its peak RSS is its own ``VmHWM``. A third process measures the
interpreter with the same imports (``baseline``), subtracted to give each variant's own memory.

Run: ``python benchmarks/bench_measure.py [--quick]``
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    MiB,
    Timer,
    child_main,
    command_line,
    format_table,
    parse_args,
    peak_rss,
    report,
    run_child,
)

SHAPE = {False: (8192, 8192), True: (2048, 2048)}
CHUNKS = (1024, 1024)
DIAMETER = 12.0
PROPERTIES = ("label", "area", "bbox", "centroid", "intensity_mean", "intensity_min",
              "intensity_max", "intensity_std")


def _imports() -> None:
    import numpy  # noqa: F401
    import skimage.measure  # noqa: F401
    import zarr  # noqa: F401

    import blockbuster.measurements  # noqa: F401


def child_baseline(p: dict[str, Any]) -> dict[str, Any]:
    _imports()
    return {"peak_rss": peak_rss()}


def child_tiled(p: dict[str, Any]) -> dict[str, Any]:
    _imports()
    from blockbuster.measurements import measure

    with Timer() as t:
        table = measure(p["labels"], p["image"], progress=False)
    return {"seconds": t.seconds, "objects": len(table["label"]),
            "mean_sum": float(table["mean_intensity"].sum()),
            "std_sum": float(table["std_intensity"].sum())}


def child_whole(p: dict[str, Any]) -> dict[str, Any]:
    _imports()
    import zarr
    from skimage.measure import regionprops_table

    with Timer() as t:
        labels = zarr.open_array(p["labels"] + "/0", mode="r")[:]
        image = zarr.open_array(p["image"] + "/0", mode="r")[:]
        table = regionprops_table(labels, image, properties=PROPERTIES)
    return {"seconds": t.seconds, "objects": len(table["label"]),
            "mean_sum": float(table["intensity_mean"].sum()),
            "std_sum": float(table["intensity_std"].sum())}


def make_image(quick: bool) -> Path:
    from blockbuster.data import write_synthetic_nuclei

    shape = SHAPE[quick]
    path = DATA / f"measure_demo_{shape[0]}x{shape[1]}.ome.zarr"
    done = path.with_name(path.name + ".complete")
    if not (done.exists() and path.exists()):
        shutil.rmtree(path, ignore_errors=True)
        write_synthetic_nuclei(path, shape, chunks=CHUNKS, diameter=DIAMETER, ome=True,
                               with_labels=True, overwrite=True)
        done.write_text("ok")
    return path


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    image = make_image(args.quick)
    params = {"image": str(image), "labels": str(image / "labels" / "truth")}
    baseline = run_child(__file__, "baseline", {})["peak_rss"]
    tiled = run_child(__file__, "tiled", params)
    whole = run_child(__file__, "whole", params)
    shape = SHAPE[args.quick]
    rows = []
    for name, res in (("blockbuster.measure (tiled)", tiled),
                      ("regionprops_table (whole)", whole)):
        rows.append({"variant": name, "seconds": res["seconds"],
                     "peak_mib": res["peak_rss"] / MiB,
                     "own_mib": (res["peak_rss"] - baseline) / MiB,
                     "objects": res["objects"]})
    same = (tiled["objects"] == whole["objects"]
            and abs(tiled["mean_sum"] - whole["mean_sum"]) <= 1e-9 * abs(whole["mean_sum"])
            and abs(tiled["std_sum"] - whole["std_sum"]) <= 1e-6 * abs(whole["std_sum"]))
    time_ratio = tiled["seconds"] / whole["seconds"]
    peak_ratio = tiled["peak_rss"] / whole["peak_rss"]
    own_ratio = (tiled["peak_rss"] - baseline) / max(1, whole["peak_rss"] - baseline)
    table = format_table(rows, [("variant", "variant"), ("seconds", "time (s)"),
                                ("peak_mib", "peak RSS (MiB)"),
                                ("own_mib", "peak above imports (MiB)"),
                                ("objects", "objects")])
    verdicts = [
        f"time ratio tiled / whole = {time_ratio:.2f}",
        f"peak RSS ratio tiled / whole = {peak_ratio:.2f} (above the imports: {own_ratio:.2f})",
        f"same table (objects, sums of means and standard deviations): {same}",
    ]
    report("bench_measure", "measure out of core vs regionprops on the whole image",
           {f"{shape[0]} x {shape[1]} uint16 demo image, {CHUNKS[0]} x {CHUNKS[1]} chunks, "
            f"{tiled['objects']:,} nuclei; imports alone: {baseline / MiB:.0f} MiB": table},
           verdicts, {"tiled": tiled, "whole": whole, "baseline": baseline},
           command_line(__file__, args.quick))


if __name__ == "__main__":
    if not child_main({"baseline": child_baseline, "tiled": child_tiled,
                       "whole": child_whole}):
        main()
