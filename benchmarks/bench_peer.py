"""blockbuster next to patchworks (PyPI, GPL-3): wall time, peak memory and fidelity.

Both tools get the same image (a zarr array), the same fn, the same tiles and overlap, and
both write their labels to a zarr array on disk. Every run is a fresh process (peak RSS is its
VmHWM, which includes what the interpreter and imports take); the variants are interleaved
(blockbuster, patchworks, blockbuster, ...) and the medians reported. Fidelity is the
adjusted Rand-like agreement with the fn applied to the whole image at once: the fraction of
objects of the whole-image labels that the tiled result reproduces exactly (same voxels).

Cases: exact connected components (threshold + ``scipy.ndimage.label``, touching labels join:
``stitch="faces"`` against patchworks' ``"touch"``), dense 2-D watershed (nuclei, 512 x 512
tiles), 3-D watershed (tiles 64 x 256 x 256, overlap 16), and a cheap fn on a 1 GiB image.
patchworks runs serially too (``max_workers=1``), so that the comparison is engine to engine.

Targets (issue 18): blockbuster wall <= 0.6 x and peak RSS <= 0.8 x patchworks' in every case,
fidelity at least equal.

Run: ``python benchmarks/bench_peer.py [--quick] [--repeats N] [--cases cc ws2d ...]``
"""

from __future__ import annotations

import shutil
import statistics
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

CASES: dict[str, dict[str, Any]] = {
    "cc": {"what": "connected components", "shape": (8192, 8192), "tile": (1024, 1024),
           "overlap": 0, "fn": "label"},
    "ws2d": {"what": "2-D watershed, dense nuclei", "shape": (4096, 4096), "tile": (512, 512),
             "overlap": 16, "fn": "watershed"},
    "ws3d": {"what": "3-D watershed", "shape": (128, 768, 768), "tile": (64, 256, 256),
             "overlap": 16, "fn": "watershed"},
    "cheap1g": {"what": "cheap fn, 1 GiB image", "shape": (23170, 23170), "tile": (2048, 2048),
                "overlap": 0, "fn": "label"},
}
QUICK_SHAPES = {"cc": (1024, 1024), "ws2d": (1024, 1024), "ws3d": (64, 256, 256),
                "cheap1g": (2048, 2048)}


def image_block(region: tuple[slice, ...]) -> np.ndarray:
    """Dense round nuclei (uint16) on a jittered lattice, a function of global coordinates."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in region], indexing="ij",
                        sparse=True)
    spacing = 14
    value = np.zeros([s.stop - s.start for s in region], np.float32)
    dist = sum(((g % spacing) - spacing / 2) ** 2 for g in grids)
    value += np.clip(1.0 - dist / (spacing * 0.55) ** 2, 0, None)
    return (value * 1000 + 100).astype(np.uint16)


def make_image(name: str, shape: tuple[int, ...]) -> Path:
    import zarr

    path = DATA / f"peer_{name}_{'x'.join(map(str, shape))}.zarr"
    done = path.with_name(path.name + ".complete")
    if done.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    chunks = tuple(min(s, 64 if len(shape) == 3 else 1024) for s in shape)
    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype="uint16")
    step = tuple(min(s, 4 * c) for s, c in zip(shape, chunks, strict=True))
    for index in np.ndindex(*[-(-s // t) for s, t in zip(shape, step, strict=True)]):
        region = tuple(slice(i * t, min((i + 1) * t, s))
                       for i, t, s in zip(index, step, shape, strict=True))
        arr[region] = image_block(region)
    done.touch()
    return path


def label_fn(tile: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.label(tile > 600)[0]


def watershed_fn(tile: np.ndarray) -> np.ndarray:
    from blockbuster.plugins.watershed import WatershedSegmenter

    return WatershedSegmenter(diameter=12, threshold=600).segment(tile)


FNS = {"label": label_fn, "watershed": watershed_fn}


def child_run(p: dict[str, Any]) -> dict[str, Any]:
    import dask.array as da
    import zarr

    out = Path(p["output"])
    shutil.rmtree(out, ignore_errors=True)
    fn = FNS[p["fn"]]
    tile, overlap = tuple(p["tile"]), p["overlap"]
    with Timer() as t:
        if p["tool"] == "blockbuster":
            import blockbuster

            stitch = "faces" if overlap == 0 else "iou"
            blockbuster.tile_process(p["image"], fn, tile, overlap, stitch=stitch, output=out,
                                     progress=False)
            labels_path = out
        else:
            import patchworks

            image = da.from_zarr(zarr.open_array(p["image"], mode="r")).rechunk(tile)
            patchworks.tile_process(image, fn, tile_shape=tile, overlap=overlap,
                                    stitch="touch" if overlap == 0 else "iou",
                                    write_to=str(out), progress=False, max_workers=1)
            labels_path = out / "labels"
    result: dict[str, Any] = {"seconds": t.seconds}
    if p.get("fidelity"):
        result["fidelity"] = fidelity(zarr.open_array(str(labels_path), mode="r")[:],
                                      fn(zarr.open_array(p["image"], mode="r")[:]))
    shutil.rmtree(out, ignore_errors=True)
    return result


def fidelity(tiled: np.ndarray, whole: np.ndarray) -> float:
    """The fraction of the whole-image objects the tiled labels reproduce exactly."""
    import fastremap

    mask = whole > 0
    pairs = fastremap.unique(whole[mask].astype(np.uint64) << np.uint64(32)
                             | tiled[mask].astype(np.uint64))
    whole_ids = pairs >> np.uint64(32)
    tiled_ids = pairs & np.uint64(0xFFFFFFFF)
    # an object is reproduced when it maps to one tiled label that maps back to it only
    one_to = np.unique(whole_ids, return_counts=True)
    back = np.unique(tiled_ids, return_counts=True)
    single = set(one_to[0][one_to[1] == 1].tolist())
    single_back = set(back[0][back[1] == 1].tolist())
    exact = sum(1 for w, t in zip(whole_ids.tolist(), tiled_ids.tolist(), strict=True)
                if w in single and t in single_back and t != 0)
    return exact / max(1, len(one_to[0]))


def _options(parser: Any) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), help="only these cases")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _options)
    rows = []
    for name in args.cases or CASES:
        case = dict(CASES[name])
        shape = QUICK_SHAPES[name] if args.quick else case["shape"]
        image = make_image(name, shape)
        runs: dict[str, list[dict[str, Any]]] = {"blockbuster": [], "patchworks": []}
        for repeat in range(1 if args.quick else args.repeats):
            for tool in runs:
                runs[tool].append(run_child(__file__, "run", {
                    "tool": tool, "image": str(image), "fn": case["fn"], "tile": case["tile"],
                    "overlap": case["overlap"], "output": str(DATA / f"peer_out_{tool}.zarr"),
                    "fidelity": repeat == 0 and int(np.prod(shape)) <= 2**27}, timeout=7200))
        med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss")}
               for tool, rs in runs.items()}
        row = {"case": case["what"], "image": " x ".join(map(str, shape)),
               "tile": " x ".join(map(str, case["tile"])), "overlap": case["overlap"],
               "bb_s": med["blockbuster"]["seconds"], "pw_s": med["patchworks"]["seconds"],
               "bb_mib": med["blockbuster"]["peak_rss"] / MiB,
               "pw_mib": med["patchworks"]["peak_rss"] / MiB,
               "bb_fid": runs["blockbuster"][0].get("fidelity", float("nan")),
               "pw_fid": runs["patchworks"][0].get("fidelity", float("nan"))}
        row["wall_ratio"] = row["bb_s"] / row["pw_s"]
        row["rss_ratio"] = row["bb_mib"] / row["pw_mib"]
        rows.append(row)
        print(f"{name}: wall {row['wall_ratio']:.2f}x, RSS {row['rss_ratio']:.2f}x", flush=True)
    table = format_table(rows, [
        ("case", "case"), ("image", "image"), ("tile", "tile"), ("overlap", "overlap"),
        ("bb_s", "blockbuster s"), ("pw_s", "patchworks s"), ("wall_ratio", "wall ratio"),
        ("bb_mib", "blockbuster MiB"), ("pw_mib", "patchworks MiB"), ("rss_ratio", "RSS ratio"),
        ("bb_fid", "blockbuster exact objects"), ("pw_fid", "patchworks exact objects")])
    verdicts = []
    for r in rows:
        verdicts.append(verdict(f"{r['case']}: wall blockbuster / patchworks", r["wall_ratio"],
                                "<=", 0.6))
        verdicts.append(verdict(f"{r['case']}: peak RSS blockbuster / patchworks",
                                r["rss_ratio"], "<=", 0.8))
    plot(rows, plot_path("bench_peer"))
    report("bench_peer", "blockbuster next to patchworks", {"": table}, verdicts,
           {"rows": rows}, command_line(__file__, args.quick))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["wall_ratio"] for r in rows], 0.4, label="wall ratio")
    ax.bar(x + 0.2, [r["rss_ratio"] for r in rows], 0.4, label="peak RSS ratio")
    ax.axhline(0.6, color="tab:blue", ls="--", lw=1, label="wall target 0.6")
    ax.axhline(0.8, color="tab:orange", ls="--", lw=1, label="RSS target 0.8")
    ax.set_xticks(x, [r["case"] for r in rows], fontsize=8)
    ax.set(ylabel="blockbuster / patchworks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if not child_main({"run": child_run}):
        main()
