"""The public entry points: :func:`tile_process`, and :func:`stitch_tiles` for labels in tiles.

Both are thin: open the input, look up the segmenter, make the run plan
(:mod:`blockbuster.plan`), resolve the output (:mod:`blockbuster.output`), and hand everything
to the engine (:mod:`blockbuster.engine`), which runs the tiles on whatever executor ``client``
names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .engine.executors import InProcess, executor_for
from .engine.run import check_locations, execute, manifest_for, prepare_work
from .engine.state import WorkDir
from .errors import InputError, OutputExistsError
from .io import ImageSource, open_image
from .output import WORK_SUFFIX, OutputTarget, completion, resolve_output
from .plan import StitchOptions, make_plan, parse_memory
from .segmenter import MemoryModel, Segmenter, describe_segmenter

__all__ = ["stitch_tiles", "tile_process"]

log = logging.getLogger("blockbuster")


def tile_process(
    image: Any,
    fn: Callable[[np.ndarray], np.ndarray] | Segmenter | str,
    tile_shape: Sequence[int] | str | Callable[..., Any] | None = "auto",
    overlap: int | str | Sequence[int | str] | None = None,
    *,
    output: str | Path | Any | None = None,
    channel_axis: int | None = None,
    channels: int | str | Sequence[int | str] | None = None,
    level: int = 0,
    stitch: str = "auto",
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    use_gpu: bool = False,
    memory: int | str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    progress: bool | None = None,
    table: bool | str | Path = False,
    measure: bool = False,
    retries: int = 1,
    timeout: float | None = None,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    mask: Any = None,
    skip_empty: bool = False,
    ome: bool | None = None,
    label_name: str = "blockbuster",
    seam_table: bool | str | Path = False,
) -> zarr.Array:
    """Segment an image of any size tile by tile and write one seamless labelling to zarr.

    Parameters
    ----------
    image : path, URL, ImageSource, numpy.ndarray, dask.array.Array, zarr.Array or h5py.Dataset
        Any format a reader opens (zarr, OME-Zarr, a bioformats2raw root, TIFF/OME-TIFF/ImageJ,
        HDF5/Imaris/BigDataViewer, N5, CZI through bioio; ``file://``, ``http(s)://``,
        ``s3://`` URLs), streamed and never read whole; an :func:`blockbuster.open_image`
        result to choose ``series=``, ``dataset=`` or ``channels=`` there; or an array (never
        modified). Time points are segmented each on their own, singleton axes are dropped.
    fn : callable, Segmenter or str
        ``fn(tile) -> labels``: takes one NumPy tile with its halo (axes in the input's order;
        the tile is its own, ``fn`` may change it) and returns integer labels of the tile's
        spatial shape, 0 = background. A registered segmenter name (e.g. ``"watershed"``) is
        looked up among the installed plugins.
    tile_shape : tuple of int, "auto", callable or None
        Core size of a tile per spatial axis (``(1, 512, 512)``: 2-D per slice;
        ``(120, 512, 512)``: 3-D). ``"auto"`` sizes cubic tiles from free RAM (or GPU memory with
        ``use_gpu``); a callable is called as ``tile_shape(shape, dtype)``; None uses the
        input's own chunks.
    overlap : int, str or tuple, optional
        Halo added on every side of each tile, per axis, in voxels, or as a length with a unit
        (``"6um"``: converted per axis with the image's voxel size, so an anisotropic volume gets
        less halo along its coarse axis). Clipped per axis to stay smaller than the tile (a
        z-tile of 1 gets 0). Default: the segmenter's preferred overlap, else 0.
        ``"auto"``: measured on the data (:func:`blockbuster.tilecheck.choose_overlap`): the
        busiest window of 3 x 3 (x 3) tiles is segmented untiled and then tiled with
        increasing overlaps (on the segmenter's grid), and the smallest at which tiling
        changes no object (F1 1.000, nothing fused or split) is used; the choice and the
        curve are logged and stored in the run report (``overlap_auto``).
    output : path or zarr store, optional
        Where to write the labels: a new path, an empty folder, or an output blockbuster wrote
        before (nothing else is ever replaced). Default: ``<input>.labels.zarr`` next to a path
        input, ``<image>/labels/<label_name>`` for OME-Zarr input, or a temporary directory for
        in-memory input.
    channel_axis : int, optional
        Axis of the input holding channels: never tiled, absent from the output. Default: from
        the file's metadata (OME-Zarr, OME-TIFF, ImageJ, HDF5 layouts, bioio).
    channels : int, str or sequence, optional
        The channels ``fn`` gets, by index or by name (default: all of them).
    level : int
        Resolution level of a multiscale image to segment (0: full resolution). The labels are
        made at that level; inside an OME-Zarr image they line up with it (same scale).
    stitch : {"auto", "faces", "iou", "whole", "none"}
        How labels are joined across tile borders (see :mod:`blockbuster.stitching`). "faces":
        labels touching across a border are one object (connected components). "iou": objects
        predicted alike where tiles overlap are one object, each voxel from the tile whose core
        holds it. "whole": matched like "iou", but each object takes all its voxels from the one
        tile that saw it best (farthest from the cut edges of its read region), like StarDist's
        ``predict_instances_big``; for learned models (StarDist, Cellpose), whose prediction of
        an object differs between tiles. Needs an overlap; exact with an overlap of at least
        one object diameter. "none": no stitching. "auto": the segmenter's preference, else
        "iou" with an overlap and "faces" without.
    iou_threshold : float
        For ``stitch="iou"`` and ``"whole"``: objects whose IoU in the shared region exceeds
        this are the same object.
    connectivity : int
        For ``stitch="faces"``: 1 = faces only, up to ndim = corners too (as scipy.ndimage).
    use_gpu : bool
        Size ``"auto"`` tiles from free GPU memory; fails clearly when no GPU is present.
    memory : int or str, optional
        Memory budget for ``"auto"`` (bytes, or a string like ``"8GB"``), instead of probing
        the machine.
    overwrite : bool
        Replace an existing output written by blockbuster (and any unfinished run's state).
    resume : bool
        Continue an unfinished run on the same output with the same arguments: finished tiles
        are not run again. A run may be resumed on another executor (``client``).
    client : None, distributed.Client, "active" or concurrent.futures.Executor
        Who runs the tiles: this process, one tile at a time (None, the default); a
        dask.distributed cluster (``"active"``: the current client); or a pool of threads of
        this process (``fn`` must then be thread-safe). The labels are the same, id for id.
    progress : bool, "bar" or "log", optional
        Show progress: a bar on a terminal or in a Jupyter notebook, else log lines (logger
        ``blockbuster``, INFO) at each tenth of the run and every minute, with tiles done,
        failed, rate and ETA. False: nothing. See :mod:`blockbuster.progress`.
    table : bool or path
        Also compute an object table while the tiles run (voxel count, bounding box and
        centroid per label, in voxels and, for a calibrated image, in micrometres; columns
        named after the image's axes). True writes ``<output>.objects.csv`` (or Parquet for a
        ``.parquet`` path).
    measure : bool
        Also measure each object's intensities in the table (mean, min, max, standard
        deviation and integrated intensity per channel, columns named after the channels).
    retries : int
        How many times a tile whose fn raised is tried again before it counts as failed.
        A tile that ran out of GPU memory (``torch.cuda.OutOfMemoryError``, TensorFlow's
        ``ResourceExhaustedError``, "CUDA out of memory") is first tried again up to three
        times after the framework's cache is freed and a pause (5, 10, 20 s); those tries do
        not count here.
    timeout : float, optional
        Seconds one call of ``fn`` may take on a tile; an attempt that takes longer counts as
        failed (and is retried as failures are). Python cannot stop a running call: an
        overrunning call goes on in the background, on its own thread, until it returns (its
        memory, and its GPU, stay in use meanwhile); its result is dropped. On dask workers
        the same happens in the worker process. Default: no limit.
    work_dir : path, optional
        Where the run keeps its state; default ``<output>.blockbuster-work`` next to the output.
        A new or empty folder, or a work directory of blockbuster's own.
    keep_work : bool
        Keep the work directory after success (for debugging).
    mask : path or array, optional
        Foreground (tissue) mask at any resolution with the image's spatial axes, e.g. a
        thresholded low-resolution level. Tiles with no foreground under their core are written
        as background without calling ``fn``.
    skip_empty : bool
        Also skip tiles whose input is constant (e.g. zero padding around a light-sheet volume).
    ome : bool, optional
        Write an OME-Zarr label image (multiscale pyramid + NGFF ``image-label`` metadata) that
        napari and other OME-Zarr readers open. Default: yes for OME-Zarr input (the labels go
        into the image, at ``<image>/labels/<label_name>``, unless ``output`` is given) and for
        an output path ending in ``.ome.zarr``; a plain zarr array otherwise.
    label_name : str
        Name of the label image inside an OME-Zarr image.
    seam_table : bool or path
        Also write the seam report's table: one row per tile border (objects touching it,
        matched, orphans that end there, ambiguous matches, flagged), tab-separated (commas
        for a ``.csv`` path). True writes ``<output>.seams.tsv``. The summary is always in the
        run report (``run_report(out).seams``; see :mod:`blockbuster.seams`).

    Returns
    -------
    zarr.Array
        The labels, consecutive 1..N, chunked on the tile cores; uint32 (uint64 beyond
        4,294,967,295 objects). The run's report (tiles, times per stage, peak memory,
        parameters) is stored with them: :func:`blockbuster.run_report` reads it.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage
    >>> mask = np.zeros((6, 6), np.uint8); mask[1:5, 2] = 1; mask[1, 2:5] = 1
    >>> label = lambda tile: ndimage.label(tile)[0]
    >>> out = tile_process(mask, label, tile_shape=(3, 3), stitch="faces")
    >>> int(out[:].max())  # one object although it crosses four tiles
    1
    """
    if overwrite and resume:
        raise InputError("$overwrite and $resume contradict each other: resume continues an "
                         "unfinished run, overwrite starts again; pass one of them")
    source = open_image(image, channel_axis, channels=channels, level=level)
    mask_source = _open_mask(mask)
    fn = _resolve_fn(fn, source.segment_channel_axis)
    info = describe_segmenter(fn)
    memory_bytes = parse_memory(memory)
    executor = executor_for(_active_client(client))
    target = resolve_output(output, source, work_dir, ome, label_name)
    table_path = _table_path(table, target)
    seam_path = _seam_table_path(seam_table, target)
    previous = _previous_tile_chunks(target, tile_shape) if resume else None
    overlap_auto = None
    if isinstance(overlap, str) and overlap.strip().lower() == "auto":
        overlap, overlap_auto = _auto_overlap(source, fn, tile_shape, stitch, iou_threshold,
                                              connectivity, use_gpu, memory_bytes)
    plan = make_plan(source, fn, info, tile_shape=tile_shape, overlap=overlap,
                     stitch=StitchOptions(stitch, iou_threshold, connectivity), use_gpu=use_gpu,
                     memory=memory_bytes, mask=mask_source, skip_empty=skip_empty,
                     table=table_path is not None, measure=measure, retries=retries,
                     timeout=timeout, tile_chunks=previous)
    if isinstance(executor, InProcess) and memory_bytes is not None:
        executor.pipelined = plan.second_tile_fits(memory_bytes)
    manifest = manifest_for(plan, target)
    work = WorkDir(target.work_path)
    check_locations(target, work, [source.path, mask_source.path if mask_source else None])
    locks = [lock for lock in (target.lock(), work.lock) if lock is not None]
    try:
        for lock in locks:
            lock.acquire()
        inputs = [source.path, mask_source.path if mask_source else None]
        if table_path is not None:
            _check_table_path(table_path, overwrite=overwrite or resume, inputs=inputs)
        if seam_path is not None:
            _check_table_path(seam_path, overwrite=overwrite or resume, inputs=inputs,
                              what="the seam table", option="seam_table")
        done = prepare_work(target, work, manifest, overwrite=overwrite, resume=resume)
        if done is not None:
            return done
        return execute(plan, target, work, manifest, executor=executor, progress=progress,
                       table_path=table_path, keep_work=keep_work, seam_table=seam_path,
                       report_extra={"overlap_auto": overlap_auto})
    finally:
        for lock in reversed(locks):
            lock.release()
        work.release_lock()  # removes the work directory when nothing is left in it


class TileLabels(Segmenter):
    """The "segmenter" of :func:`stitch_tiles`: each tile already holds its labels."""

    name = "tile-labels"
    preferred_stitch = "faces"
    memory_model = MemoryModel(bytes_per_input_byte=2.0, bytes_per_voxel=8.0)

    def segment(self, tile: np.ndarray) -> np.ndarray:
        return tile


def stitch_tiles(
    labels: Any,
    output: str | Path | Any | None = None,
    *,
    stitch: str = "faces",
    connectivity: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    progress: bool | None = None,
    table: bool | str | Path = False,
    work_dir: str | Path | None = None,
    ome: bool | None = None,
) -> zarr.Array:
    """Join labels made tile by tile elsewhere into one seamless labelling, out of core.

    ``labels`` is an integer zarr array (path or array) whose chunks are the tiles, or a dask
    array whose chunks are; each tile holds its own labels (ids may repeat between tiles). The
    same stitchers and engine as :func:`tile_process` number the objects 1..N and join those
    that touch across tile borders (``stitch="faces"``; ``"none"`` keeps every tile's objects
    apart). Tiles without a halo cannot be matched by overlap, so ``"iou"`` is not offered.

    Examples
    --------
    >>> import dask.array as da
    >>> tiles = da.from_array(np.array([[1, 1, 1, 1], [0, 0, 0, 2]]), chunks=(2, 2))
    >>> stitch_tiles(tiles)[:].tolist()  # the left tile's 1 continues in the right tile
    [[1, 1, 1, 1], [0, 0, 0, 2]]
    """
    if stitch not in ("faces", "none"):
        raise InputError(f"stitch={stitch!r}: tiles without a halo are stitched with 'faces' "
                         "(or kept apart with 'none')")
    source = open_image(labels)
    if not np.issubdtype(source.dtype, np.integer):
        raise InputError(f"stitch_tiles needs integer labels, not {source.dtype}")
    return tile_process(source, TileLabels(), None, 0, output=output, stitch=stitch,
                        connectivity=connectivity, overwrite=overwrite, resume=resume,
                        client=client, progress=progress, table=table, work_dir=work_dir,
                        ome=ome)


# -- helpers ----------------------------------------------------------------------------------
def _auto_overlap(source: ImageSource, fn: Callable[..., Any], tile_shape: Any, stitch: str,
                  iou_threshold: float, connectivity: int, use_gpu: bool,
                  memory: int | None) -> tuple[tuple[int, ...], dict[str, Any]]:
    """``overlap="auto"``: the smallest overlap at which a sample window tiles exactly."""
    from .tilecheck import choose_overlap

    choice = choose_overlap(source, fn, tile_shape=tile_shape, stitch=stitch,
                            iou_threshold=iou_threshold, connectivity=connectivity,
                            use_gpu=use_gpu, memory=memory)
    curve = "; ".join(f"{tuple(c['overlap'])}: F1 {c['f1']:.3f}, {c['fused']} fused, "
                      f"{c['split']} split" for c in choice.curve)
    if choice.found:
        log.info("overlap auto: %s, the smallest at which tiling changes nothing on the window "
                 "%s (%s)", tuple(choice.chosen), choice.window, curve)
    else:
        log.warning("overlap auto: no overlap tried makes the tiled result equal the untiled "
                    "one on the window %s; using the largest, %s (%s). Larger tiles help.",
                    choice.window, tuple(choice.chosen), curve)
    return tuple(choice.chosen), choice.as_dict()


def _active_client(client: Any) -> Any:
    """The given client; ``client="active"`` picks the current distributed client."""
    if client is None:
        return None
    if not isinstance(client, str):
        if not _is_client(client):
            raise InputError(f"client={client!r}: pass a distributed.Client, 'active', or a "
                             "concurrent.futures.Executor")
        return client
    if client != "active":
        raise InputError(f"client={client!r}: pass a distributed.Client, 'active', or a "
                         "concurrent.futures.Executor")
    from distributed import get_client

    return get_client()


def _is_client(client: Any) -> bool:
    """Whether ``client`` can run tiles: an executor of ours or of concurrent.futures, or a
    dask.distributed client (checked by name: distributed is imported only when used)."""
    from concurrent.futures import Executor as FuturesExecutor

    from .engine.executors import Executor

    if isinstance(client, (Executor, FuturesExecutor)):
        return True
    return any(cls.__module__.split(".")[0] == "distributed" and cls.__name__ == "Client"
               for cls in type(client).__mro__)


def _resolve_fn(fn: Any, channel_axis: int | None) -> Callable[[np.ndarray], Any]:
    if isinstance(fn, str):
        from .plugins import get_segmenter

        fn = get_segmenter(fn)
    if not callable(fn):
        raise InputError(f"fn must be a callable, a Segmenter or a registered segmenter name; "
                         f"got {type(fn).__name__}")
    if isinstance(fn, Segmenter):
        fn.channel_axis = channel_axis
    return fn


def _open_mask(mask: Any) -> ImageSource | None:
    """The mask, which must be a non-empty boolean or integer image (0 = no tissue)."""
    if mask is None:
        return None
    try:
        source = open_image(mask)
    except InputError as exc:
        raise type(exc)(f"mask=: {exc}") from exc
    if not (source.dtype == bool or np.issubdtype(source.dtype, np.integer)):
        raise InputError(f"mask= must be boolean or integer (0 = no tissue), not "
                         f"{source.dtype}; threshold it first, e.g. mask=probability > 0.5")
    return source


def _table_path(table: Any, target: OutputTarget) -> Path | None:
    if table is False or table is None:
        return None
    if isinstance(table, (str, Path)):
        path = Path(table)
        if path.suffix.lower() not in (".csv", ".parquet"):
            raise InputError(f"table={str(table)!r}: the object table is written as .csv or "
                             ".parquet; give a path ending in one of them")
        return path
    if table is not True:
        raise InputError(f"table={table!r}: pass True, or a path ending in .csv or .parquet")
    if target.is_ome and not target.ome_standalone and target.ome_image is not None:
        base = target.ome_image.with_name(f"{target.ome_image.name}.{target.ome_name}")
    elif target.path is not None:
        base = target.path
    else:  # a store or URL: next to the work directory, on this machine
        base = target.work_path.with_name(target.work_path.name.removesuffix(WORK_SUFFIX))
    return base.with_name(base.name + ".objects.csv")


def _seam_table_path(seam_table: Any, target: OutputTarget) -> Path | None:
    if seam_table is False or seam_table is None:
        return None
    if isinstance(seam_table, (str, Path)):
        return Path(seam_table)
    if seam_table is not True:
        raise InputError(f"seam_table={seam_table!r}: pass True, or a path (.tsv or .csv)")
    objects = _table_path(True, target)
    assert objects is not None  # table=True always names a path
    return objects.with_name(objects.name.removesuffix(".objects.csv") + ".seams.tsv")


def _check_table_path(path: Path, *, overwrite: bool, inputs: Sequence[Path | None] = (),
                      what: str = "the object table", option: str = "table") -> None:
    """A table (``what``, given as ``option``) must be writable, never be or lie inside an
    input, and never replace a file we did not make: checked before any tile."""
    import os

    folder = path.parent if str(path.parent) else Path(".")
    for given in inputs:
        if given is not None and (path.resolve() == Path(given).resolve()
                                  or path.resolve().is_relative_to(Path(given).resolve())):
            raise InputError(f"cannot write {what} {path}: it is, or lies inside, the input "
                             f"{given}; blockbuster never writes into or over what it reads; "
                             f"give another ${option}")
    if not folder.is_dir():
        raise InputError(f"cannot write {what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {what} {path}: the folder {folder} is not writable")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass $overwrite to replace it, "
                                f"or another ${option}")
    if path.suffix == ".parquet" and option == "table":
        import importlib.util

        from .errors import PluginNotInstalledError

        if importlib.util.find_spec("pyarrow") is None:
            raise PluginNotInstalledError(f"the Parquet table {path} needs pyarrow, which is not "
                                          'installed: pip install "blockbuster[table]" (or '
                                          "write a .csv table)")


def _previous_tile_chunks(target: OutputTarget, tile_shape: Any,
                          ) -> tuple[tuple[int, ...], ...] | None:
    """On resume, "auto" and callable sizing reuse the tiles the run started with.

    Free memory differs from one start to the next, so sizing again would pick other tiles and
    the resume would be refused for a difference the user never asked for.
    """
    if not (isinstance(tile_shape, str) or callable(tile_shape)):
        return None
    params = None
    work = WorkDir(target.work_path)
    if work.exists():
        params = work.read_manifest()["params"]
    elif target.exists():
        params = (completion(target.open()) or {}).get("params")
    if not params or "tile_chunks" not in params:
        return None
    return tuple(tuple(c) for c in params["tile_chunks"])
