"""Seam fidelity with real learned models: tiled vs whole-image prediction of the same model.

For each model trained by ``train_models.py`` (StarDist 2-D and 3-D, Cellpose 3), on the real
nuclei images it was trained on:

- the *reference* is the plugin segmenter applied to the whole image at once (the same
  normalisation percentiles as the tiled runs, so only tiling differs);
- blockbuster ``tile_process`` with that segmenter, over a sweep of tile shapes x overlaps x
  stitch modes (``--stitch iou,...``: add a new mode here and it is measured at every setting),
  with ``normalize="global"`` (the default) and a few settings with ``normalize="tile"``;
- tile shapes rounded to the segmenter's declared network ``grid`` by the benchmark itself
  (``align``: ``up`` rounds tile shape and overlap up to multiples of the grid, ``nearest`` to
  the nearest multiple), to measure what aligning the tiles to the grid gains;
- the tools' own large-image modes on the same images: StarDist ``predict_instances_big``
  (blocks of tile + 2 x overlap, ``min_overlap`` = overlap, ``context`` = half the overlap,
  rounded to the grid) and Cellpose's ``distributed_eval`` (blocks of the tile shape, its own
  fixed overlap of 2 x diameter, on a local dask cluster).

Per setting: object F1 at IoU 0.5 against the reference, fused objects (one tiled object holds
the largest part of two reference objects), split objects (one reference object holds the
largest part of two tiled objects), the share of foreground voxels whose two labels are a
matched pair ("1:1 voxels"), and wall time. Each model runs in its own child process
(Cellpose 3 with the overlay on ``PYTHONPATH``).

Run::

    python benchmarks/train_models.py ...        # first (see its docstring)
    python benchmarks/bench_fidelity.py [--quick] [--models stardist2d,cellpose3]
        [--stitch iou] [--cellpose3-overlay /work/venv/cellpose3-overlay]

Writes ``benchmarks/out/bench_fidelity.md`` and ``.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fidelity import compare, load_pair
from train_models import EVAL, read_manifest, up_to_date

from _common import OUT, ROOT, command_line, format_table, parse_args, report, verdict

WORK = OUT / "fidelity_work"
#: every measured row, saved after each model (``--from-rows`` makes the tables again)
ROWS = OUT / "bench_fidelity.rows.json"
DEFAULT_OVERLAY = Path("/work/venv/cellpose3-overlay")

#: The sweep per model: (tile, overlap, align) settings with normalize="global"; then the
#: settings repeated with normalize="tile"; then the tool's own mode per (tile, overlap).
SWEEP_2D = {
    "settings": [(128, 16, None), (128, 32, None), (129, 32, None), (129, 32, "up"),
                 (129, 32, "nearest"), (176, 32, None), (177, 32, None), (177, 32, "up"),
                 (128, 24, None), (144, 32, None), (128, 48, None)],
    "tile_norm": [(128, 32, None), (176, 32, None)],
    "own": [(128, 32), (176, 32)],
}
SWEEP_3D = {
    "settings": [((16, 32, 32), (4, 8, 8), None), ((16, 32, 32), (8, 16, 16), None),
                 ((16, 32, 32), (12, 24, 24), None), ((16, 32, 32), (15, 32, 30), None),
                 ((16, 32, 32), "default", None), ((12, 24, 24), (4, 8, 8), None),
                 ((12, 24, 24), (8, 16, 16), None), ((17, 33, 33), (8, 16, 16), None),
                 ((17, 33, 33), (8, 16, 16), "up"), ((20, 40, 40), "default", None)],
    "tile_norm": [((16, 32, 32), (8, 16, 16), None)],
    "own": [((16, 32, 32), (8, 16, 16)), ((16, 32, 32), (4, 8, 8)),
            ((16, 32, 32), (12, 24, 24))],
}
QUICK_2D = {"settings": [(128, 32, None), (129, 32, None)], "tile_norm": [(128, 32, None)],
            "own": [(128, 32)]}
QUICK_3D = {"settings": [((16, 32, 32), (8, 16, 16), None)], "tile_norm": [], "own": []}

#: A trained model run with other plugin settings: name -> (trained model, plugin keywords).
#: ``cellpose3-consistent``: one network window per tile and one style vector for the whole
#: image, so that Cellpose's prediction of a pixel no longer depends on the window it is in.
#: ``cellpose3-3d``: the same 2-D-trained network on the 3-D image with ``do_3D`` (Cellpose runs
#: it over the xy, xz and yz planes and follows the 3-D flows), run the consistent way too; the
#: volume's z step is about twice its pixel size (StarDist's anisotropy from the mask: 2.14).
VARIANTS = {"cellpose3-consistent": ("cellpose3", {"bsize": "tile", "style": "image"}),
            "cellpose3-3d": ("cellpose3", {"do_3D": True, "anisotropy": 2.0, "bsize": "tile",
                                           "style": "image"})}
#: The models run on the 3-D image (the others on the 2-D one).
MODELS_3D = ("stardist3d", "cellpose3-3d")
SWEEP_VARIANT = {"settings": [(128, 48, None), (176, 48, None)], "tile_norm": [], "own": []}

MODELS = ("stardist2d", "stardist3d", "cellpose3", "cellpose3-consistent")

#: ``--sweep overlap`` (StarDist): the overlap from one object diameter up to the network's
#: receptive field, each at several tile sizes, with the plugin's preferred overlap ("default")
#: at every tile size; report ``bench_fidelity_overlap``. The halo a tile can hold is clipped
#: below the tile (and to the grid): rows carry the halo that was used.
OVERLAP_SWEEP = {
    "stardist2d": {
        "settings": [(t, o, None) for o in (32, 48, 64, 96) for t in (128, 144, 176, 256)]
        + [(t, "default", None) for t in (128, 144, 176, 256)],
        "tile_norm": [], "own": [(128, 64), (176, 64)]},
    "stardist3d": {
        "settings": [(t, o, None) for o in ((8, 16, 16), (12, 24, 24), (16, 32, 32))
                     for t in ((16, 32, 32), (20, 40, 40), (24, 48, 48))]
        + [(t, "default", None) for t in ((16, 32, 32), (20, 40, 40), (24, 48, 48))],
        "tile_norm": [], "own": [((20, 40, 40), (16, 32, 32))]},
    # Cellpose's network on every plane of three orientations costs minutes a run on 2 cores:
    # a diameter, the preferred overlap (a diameter in z planes too), and a wider halo
    "cellpose3-3d": {
        "settings": [((16, 32, 32), (8, 16, 16), None), ((24, 48, 48), (16, 32, 32), None),
                     ((16, 32, 32), "default", None)],
        "tile_norm": [], "own": []},
}


# -- settings -----------------------------------------------------------------------------------
def model_ndim(name: str) -> int:
    """The image a model runs on: 3 for the 3-D models, else 2."""
    return 3 if name in MODELS_3D else 2


def per_axis(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * ndim


def align_to_grid(tile: Sequence[int], overlap: Sequence[int], grid: Sequence[int],
                  rule: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile shape and overlap rounded to multiples of ``grid`` (per axis).

    ``up``: both rounded up; ``nearest``: the tile to the nearest multiple (at least one grid
    step), the overlap up (a smaller halo than asked for would cut objects). With both on the
    grid, every tile's read region (``k * tile - overlap``) starts on the grid.

    >>> align_to_grid((129, 129), (32, 32), (16, 16), "up")
    ((144, 144), (32, 32))
    >>> align_to_grid((129, 129), (30, 30), (16, 16), "nearest")
    ((128, 128), (32, 32))
    """
    if rule is None:
        return tuple(tile), tuple(overlap)

    def up(v: int, g: int) -> int:
        return -(-v // g) * g

    if rule == "up":
        new_tile = tuple(up(t, g) for t, g in zip(tile, grid, strict=True))
    elif rule == "nearest":
        new_tile = tuple(max(g, round(t / g) * g) for t, g in zip(tile, grid, strict=True))
    else:
        raise ValueError(f"unknown alignment rule {rule!r}")
    return new_tile, tuple(up(o, g) for o, g in zip(overlap, grid, strict=True))


def on_grid(tile: Sequence[int], overlap: Sequence[int], grid: Sequence[int]) -> bool:
    """Whether every read region starts on the grid (halo clipped as blockbuster clips it)."""
    depth = [min(o, t - 1) for o, t in zip(overlap, tile, strict=True)]
    return all(t % g == 0 and d % g == 0 for t, d, g in zip(tile, depth, grid, strict=True))


def halo(shape: Sequence[int], tile: Sequence[int], overlap: Sequence[int],
         grid: Sequence[int]) -> tuple[int, ...]:
    """The halo blockbuster uses for ``overlap``: clipped below the tile (and to the grid).

    >>> halo((31, 61, 57), (16, 32, 32), (16, 32, 32), (4, 8, 8))
    (12, 24, 24)
    """
    from blockbuster.tiling import clip_depth

    chunks = tuple(tuple(min(t, s - k) for k in range(0, s, t))
                   for s, t in zip(shape, tile, strict=True))
    return clip_depth(tuple(overlap), chunks, tuple(grid))


# -- the child: one model, every setting ----------------------------------------------------------
def make_segmenter(name: str, normalize: str = "global") -> Any:
    base, extra = VARIANTS.get(name, (name, {}))
    manifest = read_manifest(base)
    assert manifest is not None
    path = manifest["model_path"]
    if base.startswith("stardist"):
        from blockbuster.plugins.stardist import stardist_fn

        return stardist_fn(path, normalize=normalize, **extra)
    from blockbuster.plugins.cellpose import cellpose_fn

    return cellpose_fn(path, normalize=normalize, **EVAL[base], **extra)


def run_tiled(image: np.ndarray, seg: Any, tile: tuple[int, ...], overlap: tuple[int, ...],
              stitch: str, out: Path) -> tuple[np.ndarray, float]:
    import zarr

    from blockbuster import tile_process

    start = time.perf_counter()
    tile_process(image, seg, tile_shape=tile, overlap=overlap, stitch=stitch, output=str(out),
                 overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    return zarr.open_array(str(out), mode="r")[:], seconds


def child(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting of one model, in this process (the model loads once)."""
    from blockbuster.io import open_image
    from blockbuster.segmenter import grid_per_axis

    name, sweep, modes = params["model"], params["sweep"], params["stitch"]
    ndim = model_ndim(name)
    image, _ = load_pair(ndim)
    work = Path(tempfile.mkdtemp(dir=WORK))
    seg = make_segmenter(name)
    seg.prepare(open_image(image))
    start = time.perf_counter()
    reference = seg(image)
    whole_seconds = time.perf_counter() - start
    grid = grid_per_axis(seg.grid, ndim)
    default_overlap = per_axis(seg.preferred_overlap, ndim)
    n_objects = int(len(np.unique(reference)) - 1)
    rows = [{"model": name, "method": "whole image (reference)", "tile": "-", "overlap": "-",
             "seconds": whole_seconds, "f1": 1.0, "n_ref": n_objects, "n_out": n_objects,
             "grid": _fmt(grid), "preferred_overlap": _fmt(default_overlap),
             "receptive_field": _fmt(getattr(seg, "receptive_field", None) or ("-",)),
             "diameter": _fmt(object_diameter(reference))}]
    print(f"[{name}] grid {grid}, preferred overlap {seg.preferred_overlap}, "
          f"{rows[0]['n_ref']} objects in the whole-image prediction", file=sys.stderr, flush=True)

    for row in shift_floor(name, seg, image, reference, grid):
        rows.append(row)
        print(f"[{name}] {_line(row)}", file=sys.stderr, flush=True)
    if name == "cellpose3" and params.get("diagnose", True):
        for row in cellpose_diagnosis(name, image, reference, work):
            rows.append(row)
            print(f"[{name}] {_line(row)}", file=sys.stderr, flush=True)

    done: dict[tuple, dict[str, Any]] = {}

    def measure(method: str, normalize: str, tile: Any, overlap: Any, align: str | None,
                stitch: str, segmenter: Any) -> None:
        t = per_axis(tile, ndim)
        o = default_overlap if overlap == "default" else per_axis(overlap, ndim)
        t, o = align_to_grid(t, o, grid, align)
        row = {"model": name, "method": method, "normalize": normalize, "stitch": stitch,
               "tile": _fmt(t), "overlap": _fmt(o) + (" (default)" if overlap == "default"
                                                      else ""),
               "halo": _fmt(halo(image.shape, t, o, grid)),
               "align": align or "-", "on_grid": on_grid(t, o, grid)}
        key = (t, o, stitch, normalize)
        if key not in done:  # alignment can map two settings onto one: measure it once
            try:
                labels, seconds = run_tiled(image, segmenter, t, o, stitch, work / "out.zarr")
                done[key] = {**compare(reference, labels), "seconds": seconds}
            except Exception as exc:
                done[key] = {"error": _error_text(exc)}
        row.update(done[key])
        rows.append(row)
        print(f"[{name}] {_line(row)}", file=sys.stderr, flush=True)

    for tile, overlap, align in sweep["settings"]:
        for stitch in modes:
            measure("blockbuster", "global", tile, overlap, align, stitch, seg)
    if sweep["tile_norm"]:
        per_tile = make_segmenter(name, normalize="tile")
        per_tile.prepare(open_image(image))
        for tile, overlap, align in sweep["tile_norm"]:
            measure("blockbuster", "tile", tile, overlap, align, modes[0], per_tile)
    # distributed_eval takes a minute to fail (cluster start): try it on one block shape only
    own = sweep["own"] if name.startswith("stardist") else sweep["own"][:1]
    for tile, overlap in dict.fromkeys((tuple(per_axis(t, ndim)), tuple(per_axis(o, ndim)))
                                       for t, o in own):
        t, o = tile, overlap
        for row in own_mode(name, seg, image, reference, t, o, grid, work):
            rows.append(row)
            print(f"[{name}] {_line(row)}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


#: Self-consistency: the whole image shifted by this many grid steps (per axis).
SHIFT_STEPS = (1, 2)
SELF = "same model, whole image shifted"


def shifted_prediction(seg: Any, image: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """The segmenter on ``image`` with ``shift`` voxels of background before it on every axis,
    cropped back to the image: the same image, moved by ``shift`` relative to the network's
    windows and padding (background: the low normalisation percentile, which maps to 0, what
    the networks pad with)."""
    low = seg.norm.low[0] if seg.norm is not None else float(np.min(image))
    padded = np.pad(image.astype(np.float32), [(s, 0) for s in shift], mode="constant",
                    constant_values=low)
    labels = np.asarray(seg(padded))
    return labels[tuple(slice(s, None) for s in shift)]


def shift_floor(name: str, seg: Any, image: np.ndarray, reference: np.ndarray,
                grid: tuple[int, ...]) -> list[dict[str, Any]]:
    """The model against itself: whole image vs the whole image shifted by k grid steps.

    No tiling can agree with the whole-image prediction better than the model agrees with
    itself under a shift that keeps every voxel on the grid: this is each model's floor.
    """
    rows = []
    for k in SHIFT_STEPS:
        shift = tuple(k * g for g in grid)
        row = {"model": name, "method": SELF, "normalize": "global", "stitch": "-",
               "tile": "-", "overlap": f"{_fmt(shift)} before ({k} grid step{'s' * (k > 1)})",
               "align": "-", "on_grid": True}
        start = time.perf_counter()
        try:
            labels = shifted_prediction(seg, image, shift)
            row.update(compare(reference, labels), seconds=time.perf_counter() - start)
        except Exception as exc:
            row.update(error=_error_text(exc))
        rows.append(row)
    return rows


# -- Cellpose: where its tiled and whole-image predictions part --------------------------------
#: (label, plugin keywords added to the model's EVAL)
CELLPOSE_VARIANTS = [
    ("as released (224 px windows, each its own style)", {}),
    ("one window per input (bsize='tile')", {"bsize": "tile"}),
    ("one style for the image (style='image')", {"style": "image"}),
    ("both (bsize='tile', style='image')", {"bsize": "tile", "style": "image"}),
]
#: The tiled setting the diagnosis runs (2-D tile, overlap, stitch).
DIAG_TILED = (128, 48, "whole")


def cellpose_diagnosis(name: str, image: np.ndarray, reference: np.ndarray, work: Path
                       ) -> list[dict[str, Any]]:
    """Per variant of how Cellpose runs: its whole-image labels against the released
    whole-image labels and against the ground truth, against itself shifted by one grid step,
    and tiled (:data:`DIAG_TILED`) against its own whole-image labels."""
    from blockbuster.io import open_image
    from blockbuster.plugins.cellpose import cellpose_fn
    from blockbuster.segmenter import grid_per_axis

    manifest = read_manifest(name)
    assert manifest is not None
    _, truth = load_pair(2)
    tile, overlap, stitch = DIAG_TILED
    rows = []
    for label, extra in CELLPOSE_VARIANTS:
        row: dict[str, Any] = {"model": name, "method": "diagnosis", "variant": label}
        try:
            seg = cellpose_fn(manifest["model_path"], **{**EVAL[name], **extra})
            seg.prepare(open_image(image))
            grid = grid_per_axis(seg.grid, 2)
            start = time.perf_counter()
            whole = np.asarray(seg(image))
            row["whole_s"] = time.perf_counter() - start
            row["vs_released"] = compare(reference, whole)
            row["vs_truth"] = compare(truth, whole)
            row["shifted"] = compare(whole, shifted_prediction(seg, image, grid))
            labels, seconds = run_tiled(image, seg, (tile, tile), (overlap, overlap),
                                        stitch, work / "diag.zarr")
            row["tiled"] = {**compare(whole, labels), "seconds": seconds}
        except Exception as exc:
            row["error"] = _error_text(exc)
        rows.append(row)
    return rows


def object_diameter(labels: np.ndarray, q: float = 90) -> tuple[int, ...]:
    """Per axis, the ``q``-th percentile of the objects' bounding-box extents (voxels)."""
    from scipy import ndimage

    boxes = [b for b in ndimage.find_objects(labels) if b is not None]
    if not boxes:
        return (0,) * labels.ndim
    extents = np.array([[s.stop - s.start for s in b] for b in boxes])
    return tuple(int(np.ceil(v)) for v in np.percentile(extents, q, axis=0))


# -- the tools' own large-image modes -------------------------------------------------------------
def own_mode(name: str, seg: Any, image: np.ndarray, reference: np.ndarray,
             tile: tuple[int, ...], overlap: tuple[int, ...], grid: tuple[int, ...],
             work: Path) -> list[dict[str, Any]]:
    if name.startswith("stardist"):
        return [stardist_big(name, seg, image, reference, tile, overlap, grid)]
    # as released, then with the one-line zarr 3 fix (if the release fails)
    rows = [cellpose_distributed(name, seg, image, reference, tile, work, patched=False)]
    if "error" in rows[0]:
        rows.append(cellpose_distributed(name, seg, image, reference, tile, work, patched=True))
    return rows


def stardist_big(name: str, seg: Any, image: np.ndarray, reference: np.ndarray,
                 tile: tuple[int, ...],
                 overlap: tuple[int, ...], grid: tuple[int, ...]) -> dict[str, Any]:
    """StarDist's ``predict_instances_big`` with blocks of tile + 2 x overlap."""
    from blockbuster.plugins._normalize import normalize_tile

    def down(v: int, g: int) -> int:
        return v // g * g

    # StarDist wants blocks no larger than the image (the 3-D volume is 31 planes deep)
    block = tuple(min(t + 2 * o, down(s, g)) for t, o, s, g in zip(tile, overlap, image.shape,
                                                                  grid, strict=True))
    context = tuple(down(o // 2, g) for o, g in zip(overlap, grid, strict=True))
    min_overlap = tuple(down(o, g) for o, g in zip(overlap, grid, strict=True))
    row = {"model": name, "method": "StarDist predict_instances_big",
           "normalize": "global", "stitch": "own", "tile": _fmt(block) + " block",
           "overlap": f"min {_fmt(min_overlap)}, context {_fmt(context)}", "align": "-"}
    x = normalize_tile(image, seg.norm, None)
    model = seg.load_model()
    axes = "YX" if image.ndim == 2 else "ZYX"
    start = time.perf_counter()
    try:
        labels, _ = model.predict_instances_big(
            x, axes=axes, block_size=block, min_overlap=min_overlap, context=context,
            show_progress=False, prob_thresh=seg.prob_thresh, nms_thresh=seg.nms_thresh)
        row.update(compare(reference, labels), seconds=time.perf_counter() - start)
    except Exception as exc:
        row.update(error=_error_text(exc))
    return row


class _Zarr2Open:
    """``zarr.open(path, mode, ...)`` as zarr 2 took it; zarr 3 takes ``mode`` by keyword only.

    The one change ``distributed_eval`` needs to run on zarr 3 here (its ``zarr.open(path, 'w',
    shape=..., chunks=..., dtype=...)`` raises a TypeError); the benchmark reports both runs.
    """

    def __getattr__(self, name: str) -> Any:
        import zarr

        return getattr(zarr, name)

    def open(self, store: Any = None, mode: str | None = None, **kwargs: Any) -> Any:
        import zarr

        return zarr.open(store=store, mode=mode or "a", **kwargs)


def cellpose_distributed(name: str, seg: Any, image: np.ndarray, reference: np.ndarray,
                         tile: tuple[int, ...], work: Path, patched: bool) -> dict[str, Any]:
    """Cellpose's ``contrib.distributed_segmentation.distributed_eval`` on a local cluster."""
    method = "Cellpose distributed_eval" + (" (zarr 3 shim, as 1 x Y x X)" if patched else "")
    row = {"model": name, "method": method, "normalize": "per block",
           "stitch": "own", "tile": _fmt(tile) + " block",
           "overlap": f"{2 * seg.diameter:g} (2 x diameter, fixed)", "align": "-"}
    cwd = os.getcwd()
    start = time.perf_counter()
    try:
        import zarr
        from cellpose.contrib import distributed_segmentation as cds

        if patched:
            cds.zarr = _Zarr2Open()
        work = Path(tempfile.mkdtemp(dir=work))  # its log folder is named by the second
        os.chdir(work)  # it writes worker logs and dask scratch into the working directory
        volume = image if not patched else image[None]  # its stitching works on 3-D arrays only
        blocks = tile if not patched else (1, *tile)
        source = zarr.create_array(store=str(work / "in.zarr"), shape=volume.shape,
                                   chunks=blocks, dtype=image.dtype, overwrite=True)
        source[:] = volume
        labels, _ = cds.distributed_eval(
            source, blocks, str(work / "cp_out.zarr"),
            model_kwargs={"gpu": False, "pretrained_model": seg.model},
            # an int diameter: it computes its overlap (2 x diameter) as slice bounds
            eval_kwargs={"channels": [0, 0], **EVAL[name], "diameter": round(seg.diameter)},
            cluster_kwargs={"n_workers": 1, "ncpus": 2, "threads_per_worker": 1,
                            "memory_limit": "4GB"})
        out = np.asarray(labels[:]).reshape(image.shape)
        row.update(compare(reference, out), seconds=time.perf_counter() - start)
    except Exception as exc:
        row.update(error=_error_text(exc))
    finally:
        os.chdir(cwd)
        if patched and "cds" in locals():
            cds.zarr = zarr
    return row


def _error_text(exc: BaseException) -> str:
    """The exception, its first message line and where it was raised (asserts have no text)."""
    last = traceback.extract_tb(exc.__traceback__)[-1]
    message = (str(exc).splitlines() or [last.line or ""])[0][:160]
    return f"{type(exc).__name__}: {message} (at {Path(last.filename).name}:{last.lineno})"


# -- the parent ------------------------------------------------------------------------------------
def _fmt(value: Sequence[int]) -> str:
    values = list(value)
    return str(values[0]) if len(set(values)) == 1 else "(" + ", ".join(map(str, values)) + ")"


def _line(row: dict[str, Any]) -> str:
    if row.get("method") == "diagnosis":
        return f"diagnosis {row['variant']}: " + ", ".join(
            f"{k} F1 {v['f1']:.3f} / {100 * v['voxels_one_to_one']:.2f} %"
            for k, v in row.items() if isinstance(v, dict)) + (f" {row['error']}"
                                                                if "error" in row else "")
    head = f"{row['method']} {row.get('normalize', '')} {row.get('stitch', '')} " \
           f"tile {row['tile']} overlap {row['overlap']} align {row.get('align', '-')}"
    if "error" in row:
        return f"{head}: {row['error']}"
    return (f"{head}: F1 {row['f1']:.3f}, fused {row['fused']}, split {row['split']}, "
            f"1:1 voxels {100 * row['voxels_one_to_one']:.2f} %, {row['seconds']:.1f} s")


def run_model(name: str, sweep: dict[str, Any], stitch: list[str], overlay: Path
              ) -> list[dict[str, Any]]:
    env = dict(os.environ)
    paths = [str(ROOT / "src")]
    if name.startswith("cellpose3"):
        paths.insert(0, str(overlay))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    params = {"model": name, "sweep": sweep, "stitch": stitch}
    cmd = [sys.executable, __file__, "--child", json.dumps(params)]
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None, text=True,
                          env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        return [{"model": name, "method": "(child failed)", "tile": "-", "overlap": "-",
                 "error": f"exit code {proc.returncode}"}]
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = [("model", "model"), ("method", "method"), ("normalize", "normalise"),
           ("stitch", "stitch"), ("tile", "tile"), ("overlap", "overlap"), ("align", "align"),
           ("halo", "halo"), ("on_grid", "on grid"), ("f1", "F1"), ("fused", "fused"),
           ("split", "split"),
           ("pct_one_to_one", "1:1 voxels %"), ("n_out", "objects"), ("seconds", "s"),
           ("error", "note")]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        WORK.mkdir(parents=True, exist_ok=True)
        rows = child(json.loads(sys.argv[2]))
        print(json.dumps(rows, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
        return

    def extra(parser: Any) -> None:
        parser.add_argument("--models", default=None,
                            help="comma-separated, of " + ", ".join(MODELS) + " (default), "
                            "with --sweep overlap of " + ", ".join(OVERLAP_SWEEP) + " (default)")
        parser.add_argument("--stitch", default="iou",
                            help="comma-separated stitch modes to sweep (default: iou)")
        parser.add_argument("--cellpose3-overlay", type=Path, default=DEFAULT_OVERLAY,
                            help="folder holding Cellpose 3, put first on PYTHONPATH")
        parser.add_argument("--from-rows", type=Path, nargs="+", default=None,
                            help="make the tables from the rows earlier runs saved (" f"{ROWS}"
                            "; several files: their rows together, e.g. one per model)")
        parser.add_argument("--sweep", choices=("standard", "overlap"), default="standard",
                            help="overlap: StarDist over overlaps up to the receptive field "
                            "at several tile sizes, and Cellpose 3 in 3-D "
                            "(bench_fidelity_overlap)")

    args = parse_args(__doc__.split("\n")[0], extra)
    stitch = [m.strip() for m in args.stitch.split(",") if m.strip()]
    by_overlap = args.sweep == "overlap"
    models_arg = args.models or ",".join(OVERLAP_SWEEP if by_overlap else MODELS)
    names = [m.strip() for m in models_arg.split(",") if m.strip()]
    if by_overlap:
        names = [n for n in names if n in OVERLAP_SWEEP]
    rows_path = ROWS.with_name("bench_fidelity_overlap.rows.json") if by_overlap else ROWS
    if args.models:  # a part of the models: its own file, so that parts run side by side
        rows_path = rows_path.with_name(rows_path.name.replace(
            ".rows.json", f".rows.{'+'.join(names)}.json"))
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    if args.from_rows:  # only the tables again, from the rows of an earlier run
        for path in args.from_rows:
            saved = json.loads(path.read_text())
            rows += saved["rows"]
            models.update(saved["models"])
        names = []
    for name in names:
        base, extra = VARIANTS.get(name, (name, {}))
        if not up_to_date(base):
            print(f"{name}: no trained model with the current settings; run "
                  f"benchmarks/train_models.py {base} first", file=sys.stderr)
            continue
        manifest = read_manifest(base)
        models[name] = {k: manifest[k] for k in ("train_seconds", "quality", "config")}
        models[name]["config"] = {**models[name]["config"], **extra}
        sweep = OVERLAP_SWEEP[name] if by_overlap else \
            (QUICK_3D if args.quick else SWEEP_3D) if name == "stardist3d" else \
            (QUICK_2D if args.quick else SWEEP_VARIANT if name in VARIANTS else SWEEP_2D)
        start = time.perf_counter()
        rows += run_model(name, sweep, stitch, args.cellpose3_overlay)
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows_path.write_text(json.dumps({"rows": rows, "models": models}, default=str))
    options = [*(["--sweep", "overlap"] if by_overlap else []),
               *(["--models", args.models] if args.models else []),
               *(["--stitch", args.stitch] if args.stitch != "iou" else [])]
    command = command_line(__file__, args.quick, *options)
    if not by_overlap:
        report("bench_fidelity", "Seam fidelity with learned models",
               _tables(rows, models, stitch), target_verdicts(rows) + verdicts(rows),
               {"models": models, "rows": rows, "stitch": stitch}, command)
        return
    # one report per image: the 2-D and the 3-D models run on different images and targets
    for dims, name in ((2, "bench_fidelity_overlap"), (3, "bench_fidelity_overlap_3d")):
        mine = [r for r in rows if model_ndim(r["model"]) == dims]
        if not mine:
            continue
        kept = {n: m for n, m in models.items() if model_ndim(n) == dims}
        worst, worst_columns = worst_by_halo(mine)
        tables = {"Worst setting per halo, over the tile sizes that hold it (F1 / 1:1 voxels "
                  "%; >= diam.: the halo holds one object diameter; >= field/2: half the "
                  "network's receptive field):": format_table(worst, worst_columns),
                  **{k: v for k, v in _tables(mine, kept, stitch).items()
                     if not k.startswith("Stitch modes")}}
        report(name, f"Seam fidelity against overlap, {dims}-D", tables,
               context_verdicts(mine) + verdicts(mine),
               {"models": kept, "rows": mine, "stitch": stitch}, command)


def _tables(rows: list[dict[str, Any]], models: dict[str, Any], stitch: list[str],
            ) -> dict[str, str]:
    """The report's tables: the models, every row, the Cellpose diagnosis, the modes."""
    table_rows = [_cells(row) for row in rows if row.get("method") != "diagnosis"]
    declared = {r["model"]: r for r in rows if "grid" in r}
    quality = [{"model": n, "train_s": f"{m['train_seconds']:.0f}",
                "grid": declared.get(n, {}).get("grid", "-"),
                "overlap": declared.get(n, {}).get("preferred_overlap", "-"),
                "rf": declared.get(n, {}).get("receptive_field", "-"),
                "f1_gt": f"{m['quality']['all']['f1']:.3f}",
                "f1_held_out": (f"{m['quality']['held_out_rows']['f1']:.3f}"
                                if "held_out_rows" in m["quality"] else "-"),
                "objects": m["quality"]["all"]["n_ref"],
                "config": ", ".join(f"{k} {_short(v)}" for k, v in m["config"].items()
                                    if k != "thresholds")}
               for n, m in models.items()]
    tables = {
        "Models (trained by train_models.py; F1 at IoU 0.5 against the ground-truth mask):":
            format_table(quality, [("model", "model"), ("train_s", "training s"),
                                   ("f1_gt", "F1 vs ground truth"),
                                   ("f1_held_out", "F1 held-out rows"),
                                   ("objects", "GT objects"), ("grid", "declared grid"),
                                   ("overlap", "preferred overlap"),
                                   ("rf", "receptive field"), ("config", "config")]),
        "Tiled vs whole-image prediction of the same model:": format_table(table_rows, COLUMNS),
    }
    diagnosis = [r for r in rows if r.get("method") == "diagnosis"]
    if diagnosis:
        tile, overlap, mode = DIAG_TILED
        tables[f"Cellpose 3, where tiled and whole-image labels part (F1 / 1:1 voxels %): each "
               "variant's own whole-image labels against the released whole-image labels and "
               "against the ground truth, against the same variant on the image shifted by one "
               f"grid step, and tiled (tile {tile}, overlap {overlap}, stitch={mode}) against "
               "them:"] = format_table([_diag_cells(r) for r in diagnosis], DIAG_COLUMNS)
    if len(stitch) > 1:
        side, side_columns = modes_side_by_side(rows, stitch)
        tables = {"Stitch modes side by side (normalize global; F1 / 1:1 voxels %; >= diam.: "
                  "the overlap holds one object diameter, the 90th percentile of the "
                  "whole-image objects' extents per axis):": format_table(side, side_columns),
                  **tables}
    return tables


DIAG_COLUMNS = [("variant", "Cellpose run as"), ("vs_released", "whole vs released whole"),
                ("vs_truth", "whole vs ground truth"), ("shifted", "whole vs shifted whole"),
                ("tiled", "tiled vs whole"), ("error", "note")]


def _diag_cells(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key, value in row.items():
        if isinstance(value, dict) and "f1" in value:
            out[key] = f"{value['f1']:.3f} / {100 * value['voxels_one_to_one']:.2f}"
    return out


def _short(value: Any) -> str:
    """Floats (also inside lists) to 3 significant digits, for the models table."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return str(value)


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its figures as fixed-precision text (F1 to 3 decimals, voxels to 2)."""
    out = dict(row)
    if "f1" in row:
        out["f1"] = f"{row['f1']:.3f}"
    if "voxels_one_to_one" in row:
        out["pct_one_to_one"] = f"{100 * row['voxels_one_to_one']:.2f}"
    if "seconds" in row:
        out["seconds"] = f"{row['seconds']:.1f}"
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per model and stitch mode: the worst blockbuster setting, on and off the grid, and at an
    overlap of at least one object diameter (the 90th percentile of the whole-image objects'
    extents, per axis)."""
    out = []
    for name in sorted({r["model"] for r in rows}):
        ref = next((r for r in rows if r["model"] == name and "diameter" in r), None)
        diameter = _numbers(ref["diameter"]) if ref is not None else None
        floor = [r for r in rows if r["model"] == name and r.get("method") == SELF
                 and "f1" in r]
        if floor:
            out.append(f"{name}, floor (the whole image against itself shifted by "
                       f"{'-'.join(map(str, SHIFT_STEPS))} grid steps): worst F1 "
                       f"{min(r['f1'] for r in floor):.3f}, worst 1:1 voxels "
                       f"{100 * min(r['voxels_one_to_one'] for r in floor):.2f} %")
        mine = [r for r in rows if r["model"] == name and r.get("method") == "blockbuster"
                and r.get("normalize") == "global" and "f1" in r]
        for stitch in sorted({r["stitch"] for r in mine}):
            of_mode = [r for r in mine if r["stitch"] == stitch]
            groups: list[tuple[str, list[dict[str, Any]]]] = [
                (f"tiles {label}", [r for r in of_mode if r.get("on_grid") is flag])
                for flag, label in ((True, "on the grid"), (False, "off the grid"))]
            if diameter is not None:
                groups.append((f"overlap >= one object diameter {_fmt(diameter)}",
                               [r for r in of_mode if _covers(r["overlap"], diameter)]))
            for label, sel in groups:
                if sel:
                    worst = min(sel, key=lambda r: (r["f1"], r["voxels_one_to_one"]))
                    out.append(f"{name}, stitch={stitch}, {label}: worst F1 {worst['f1']:.3f}, "
                               "worst 1:1 voxels "
                               f"{100 * min(r['voxels_one_to_one'] for r in sel):.2f} % "
                               f"({len(sel)} settings)")
    return out


#: Targets at an overlap of at least one object diameter with stitch="whole": (F1, 1:1 voxels)
#: per image dimensionality.
TARGETS = {2: (1.0, 0.999), 3: (0.99, 0.99)}


def target_verdicts(rows: list[dict[str, Any]], stitch: str = "whole") -> list[str]:
    """MET/MISSED per model: the worst ``stitch`` setting whose overlap holds one diameter."""
    out = []
    for name in sorted({r["model"] for r in rows}):
        ref = next((r for r in rows if r["model"] == name and "diameter" in r), None)
        if ref is None:
            continue
        diameter = _numbers(ref["diameter"])
        sel = [r for r in rows if r["model"] == name and r.get("method") == "blockbuster"
               and r.get("normalize") == "global" and r.get("stitch") == stitch and "f1" in r
               and _covers(r["overlap"], diameter)]
        if sel:
            out += _worst_against(
                f"{name} stitch={stitch}, overlap >= one object diameter {_fmt(diameter)}",
                sel, name)
    return out


def _worst_against(label: str, sel: list[dict[str, Any]], name: str) -> list[str]:
    """MET/MISSED of the worst F1 and 1:1 voxels of ``sel`` against the model's
    :data:`TARGETS`."""
    f1_target, voxel_target = TARGETS[model_ndim(name)]
    return [verdict(f"{label}: worst F1", min(r["f1"] for r in sel), ">=", f1_target, ".3f"),
            verdict(f"{label}: worst 1:1 voxels %",
                    100 * min(r["voxels_one_to_one"] for r in sel), ">=", 100 * voxel_target,
                    ".2f")]


def _half_field(rows: list[dict[str, Any]], name: str) -> tuple[int, ...] | None:
    """Half the receptive field the model declares (its reference row), or None."""
    ref = next((r for r in rows if r["model"] == name and "receptive_field" in r), None)
    field = _numbers(ref["receptive_field"]) if ref is not None else ()
    return tuple(-(-f // 2) for f in field) or None


def worst_by_halo(rows: list[dict[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One row per (model, stitch, halo used): the worst tile size at that halo."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("method") == "blockbuster" and "f1" in r and "halo" in r:
            groups.setdefault((r["model"], r["stitch"], r["halo"]), []).append(r)
    diameters = {r["model"]: _numbers(r["diameter"]) for r in rows if "diameter" in r}
    out = []
    for (name, stitch, used), sel in sorted(groups.items(),
                                            key=lambda kv: (kv[0][:2], _numbers(kv[0][2]))):
        field = _half_field(rows, name)
        out.append({"model": name, "stitch": stitch, "halo": used,
                    "tiles": ", ".join(dict.fromkeys(r["tile"] for r in sel)),
                    "covers": "yes" if _covers(used, diameters.get(name, ())) else "no",
                    "field": "-" if field is None else "yes" if _covers(used, field) else "no",
                    "worst": f"{min(r['f1'] for r in sel):.3f} / "
                             f"{100 * min(r['voxels_one_to_one'] for r in sel):.2f}"})
    return out, [("model", "model"), ("stitch", "stitch"), ("halo", "halo"), ("tiles", "tiles"),
                 ("covers", ">= diam."), ("field", ">= field/2"), ("worst", "worst")]


def context_verdicts(rows: list[dict[str, Any]], stitch: str = "whole") -> list[str]:
    """The issue's targets (:data:`TARGETS`) per model, over every tile size, at halos that
    hold one object diameter and half the network's receptive field, and at the plugin's
    preferred overlap wherever the tile holds it whole."""
    out = []
    for name in sorted({r["model"] for r in rows}):
        ref = next((r for r in rows if r["model"] == name and "diameter" in r), None)
        if ref is None:
            continue
        field = _half_field(rows, name)  # None: a model that declares no receptive field
        diameter = _numbers(ref["diameter"])
        mine = [r for r in rows if r["model"] == name and r.get("method") == "blockbuster"
                and r.get("stitch") == stitch and "f1" in r and "halo" in r]
        groups = [
            (f"halo >= one object diameter {_fmt(diameter)}" + (
                f" and >= half the receptive field {_fmt(field)}" if field else ""),
             [r for r in mine if _covers(r["halo"], diameter)
              and (field is None or _covers(r["halo"], field))]),
            ("the preferred overlap, where the tile holds it",
             [r for r in mine if "(default)" in r["overlap"]
              and _numbers(r["halo"]) == _numbers(r["overlap"])])]
        for label, sel in groups:
            if not sel:
                out.append(f"{name} stitch={stitch}, {label}: no setting")
                continue
            out += _worst_against(f"{name} stitch={stitch}, {label} ({len(sel)} settings)",
                                  sel, name)
    return out


def modes_side_by_side(rows: list[dict[str, Any]], modes: list[str],
                       ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One row per (model, tile, overlap), F1 and 1:1 voxels of each stitch mode."""
    side: dict[tuple[str, str, str], dict[str, Any]] = {}
    diameters = {r["model"]: _numbers(r["diameter"]) for r in rows if "diameter" in r}
    for r in rows:
        if r.get("method") != "blockbuster" or r.get("normalize") != "global":
            continue
        key = (r["model"], r["tile"], r["overlap"])
        cell = side.setdefault(key, {"model": key[0], "tile": key[1], "overlap": key[2],
                                     "on_grid": r.get("on_grid"),
                                     "covers": "yes" if key[0] in diameters and _covers(
                                         key[2], diameters[key[0]]) else "no"})
        cell[r["stitch"]] = (f"{r['f1']:.3f} / {100 * r['voxels_one_to_one']:.2f}"
                             if "f1" in r else r.get("error", "-"))
    columns = [("model", "model"), ("tile", "tile"), ("overlap", "overlap"),
               ("on_grid", "on grid"), ("covers", ">= diam.")] + [(m, m) for m in modes]
    return list(side.values()), columns


def _numbers(text: str) -> tuple[int, ...]:
    """The integers of a shape written by :func:`_fmt` (``"8"``, ``"(4, 8, 8)"``)."""
    import re

    return tuple(int(v) for v in re.findall(r"\d+", text.split("(default)")[0]))


def _covers(overlap: str, diameter: Sequence[int]) -> bool:
    values, wanted = _numbers(overlap), tuple(diameter)
    n = max(len(values), len(wanted))
    values, wanted = (values * n if len(values) == 1 else values,
                      wanted * n if len(wanted) == 1 else wanted)
    return len(values) == len(wanted) and all(o >= d for o, d in
                                                zip(values, wanted, strict=True))


if __name__ == "__main__":
    main()
