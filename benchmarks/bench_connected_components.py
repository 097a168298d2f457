"""Exact connected components of a large 2-D mask: blockbuster vs dask-image vs in-RAM SciPy.

The mask (a thresholded smooth random field: mazes spanning many chunks, plus small specks) is
a zarr array in 1024 x 1024 chunks. Each variant reads it, labels it and writes int labels to a
zarr array with the same chunks, in its own fresh process:

- ``blockbuster``: ``tile_process(mask, scipy.ndimage.label, tile_shape=(1024, 1024),
  stitch="faces")``, serial (the default).
- ``dask-image``: ``dask_image.ndmeasure.label`` on the same chunks, written with
  ``to_zarr`` (dask's default threaded scheduler, which uses both cores).
- ``in-RAM``: load the whole mask, ``scipy.ndimage.label``, write (the in-memory limit).

The three outputs must be the same partition (equal up to renumbering, background identical).

Targets (issue 9): blockbuster's wall time <= 0.1 x dask-image's and <= 2 x in-RAM's; its peak
RSS <= dask-image's and <= 0.5 x in-RAM's.

Run: ``python benchmarks/bench_connected_components.py [--quick]``
"""

from __future__ import annotations

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
    mask_block,
    parse_args,
    plot_path,
    report,
    run_child,
    same_partition_zarr,
    verdict,
    write_zarr,
)

CHUNK = (1024, 1024)
FULL = (8192, 8192)
QUICK = (2048, 2048)
VARIANTS = ("blockbuster", "dask-image", "in-RAM")


def cc_label(tile):
    """Connected components (scipy's default 1-connectivity, like the other variants)."""
    from scipy import ndimage

    return ndimage.label(tile)[0]


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- children: each labels the mask and writes the labels --------------------------------------
def child_blockbuster(p: dict[str, Any]) -> dict[str, Any]:
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    import blockbuster

    recorder = PhaseRecorder()
    cpu0 = _cpu_seconds()
    with Timer() as t:
        out = blockbuster.tile_process(p["mask"], cc_label, tuple(p["chunk"]), 0, stitch="faces",
                                       output=p["output"], overwrite=True, progress=False)
    return {"seconds": t.seconds, "cpu": _cpu_seconds() - cpu0,
            "n_labels": out.attrs["blockbuster"]["n_labels"], "phases": recorder.phases,
            "peak_rss": recorder.overall_peak}


def child_dask_image(p: dict[str, Any]) -> dict[str, Any]:
    import dask
    import dask.array as da
    import zarr
    from dask_image import ndmeasure

    cpu0 = _cpu_seconds()
    with Timer() as t:
        mask = da.from_zarr(zarr.open_array(p["mask"], mode="r"))
        labels, n = ndmeasure.label(mask)
        target = zarr.create_array(store=p["output"], shape=mask.shape, chunks=tuple(p["chunk"]),
                                   dtype=labels.dtype, fill_value=0, overwrite=True)
        # one compute for both, so the block labelling is not run twice
        stored = da.store(labels, target, lock=False, compute=False)
        _, n_labels = dask.compute(stored, n)
    return {"seconds": t.seconds, "cpu": _cpu_seconds() - cpu0, "n_labels": int(n_labels)}


def child_in_ram(p: dict[str, Any]) -> dict[str, Any]:
    import zarr
    from scipy import ndimage

    cpu0 = _cpu_seconds()
    with Timer() as t:
        mask = zarr.open_array(p["mask"], mode="r")[:]
        labels, n = ndimage.label(mask)
        del mask
        out = zarr.create_array(store=p["output"], shape=labels.shape, chunks=tuple(p["chunk"]),
                                dtype=labels.dtype, fill_value=0, overwrite=True)
        out[:] = labels
    return {"seconds": t.seconds, "cpu": _cpu_seconds() - cpu0, "n_labels": int(n)}


def child_compare(p: dict[str, Any]) -> dict[str, Any]:
    return {name: same_partition_zarr(Path(p["reference"]), Path(path), p["chunk"])
            for name, path in p["others"].items()}


def child_imports(p: dict[str, Any]) -> dict[str, Any]:
    """RSS of the interpreter with every variant's imports, doing nothing."""
    import dask.array  # noqa: F401
    import dask_image.ndmeasure  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    import blockbuster  # noqa: F401

    return {}


CHILDREN = {"blockbuster": child_blockbuster, "dask-image": child_dask_image,
            "in-RAM": child_in_ram, "compare": child_compare, "imports": child_imports}


# -- driver ---------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path, shape: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in rows]
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for ax, key, label in ((axes[0], "seconds", "wall time (s)"),
                           (axes[1], "peak_mib", "peak RSS (MiB)")):
        bars = ax.bar(names, [r[key] for r in rows], color=colours)
        ax.bar_label(bars, fmt="%.3g")
        ax.set(ylabel=label)
    fig.suptitle(f"exact connected components, {shape[0]} x {shape[1]} mask in "
                 f"{CHUNK[0]} x {CHUNK[1]} chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    shape = QUICK if args.quick else FULL
    mask = DATA / f"mask_{shape[0]}x{shape[1]}.zarr"
    write_zarr(mask, shape, CHUNK, "uint8", mask_block, workers=2)
    imports = run_child(__file__, "imports", {})["peak_rss"]
    outputs = {v: DATA / f"cc_{v}.zarr" for v in VARIANTS}
    rows = []
    for variant in VARIANTS:
        res = run_child(__file__, variant, {"mask": str(mask), "output": str(outputs[variant]),
                                            "chunk": CHUNK})
        rows.append({"variant": variant, **res, "peak_mib": res["peak_rss"] / MiB})
        print(f"{variant}: {res['seconds']:.1f} s, peak {res['peak_rss'] / MiB:.0f} MiB",
              flush=True)
    same = run_child(__file__, "compare", {
        "reference": str(outputs["in-RAM"]), "chunk": CHUNK,
        "others": {v: str(outputs[v]) for v in VARIANTS if v != "in-RAM"}})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["same"] = same[r["variant"]]["same"] if r["variant"] in same else True
        r["t_vs_dask"] = r["seconds"] / by["dask-image"]["seconds"]
        r["t_vs_ram"] = r["seconds"] / by["in-RAM"]["seconds"]
        r["m_vs_dask"] = r["peak_rss"] / by["dask-image"]["peak_rss"]
        r["m_vs_ram"] = r["peak_rss"] / by["in-RAM"]["peak_rss"]
    table = format_table(rows, [
        ("variant", "variant"), ("seconds", "wall s"), ("cpu", "CPU s"),
        ("peak_mib", "peak RSS MiB"), ("n_labels", "objects"), ("same", "same partition"),
        ("t_vs_dask", "wall / dask-image"), ("t_vs_ram", "wall / in-RAM"),
        ("m_vs_dask", "RSS / dask-image"), ("m_vs_ram", "RSS / in-RAM")])
    bb = by["blockbuster"]
    stages = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in bb["phases"].items())
    verdicts = [
        verdict("blockbuster wall / dask-image wall", bb["t_vs_dask"], "<=", 0.1),
        verdict("blockbuster wall / in-RAM wall", bb["t_vs_ram"], "<=", 2.0),
        verdict("blockbuster peak RSS / dask-image's", bb["m_vs_dask"], "<=", 1.0),
        verdict("blockbuster peak RSS / in-RAM's", bb["m_vs_ram"], "<=", 0.5),
        ("MET" if all(r["same"] for r in rows) else "MISSED")
        + ": identical partitions (equal up to renumbering, background identical) "
        + "for all three (pairs of labels: "
        + ", ".join(f"{k} vs in-RAM {v['pairs']:,} for {v['n_a']:,} objects"
                    for k, v in same.items() if isinstance(v, dict)) + ")",
        f"mask {shape[0]} x {shape[1]} uint8 ({shape[0] * shape[1] / MiB:.0f} MiB) in "
        f"{CHUNK[0]} x {CHUNK[1]} chunks; interpreter with all imports: {imports / MiB:.0f} MiB; "
        f"blockbuster stages: {stages}. Wall times exclude interpreter start-up and imports.",
    ]
    png = plot_path("bench_connected_components")
    plot(rows, png, shape)
    report("bench_connected_components", "Exact connected components", {"": table}, verdicts,
           {"rows": rows, "shape": shape, "chunk": CHUNK, "imports_rss": imports},
           command_line(__file__, args.quick))
    for path in outputs.values():
        shutil.rmtree(path, ignore_errors=True)
    print(f"plot: {png}")


if __name__ == "__main__":
    if not child_main(CHILDREN):
        main()
