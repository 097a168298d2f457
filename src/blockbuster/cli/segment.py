"""``blockbuster segment``: the options of :func:`~blockbuster.tile_process`, a cluster to run
on, and what to print (a summary, the run report as JSON, or the plan of a dry run)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    HelpFormatter,
    add_json_option,
    add_message_options,
    format_shape,
    log,
    non_negative_int,
    parse_bytes,
    plural,
    positive_float,
    positive_int,
)
from .options import (
    add_input_options,
    add_method_options,
    add_planning_options,
    input_options,
    make_method,
    open_input,
    selection_line,
)

if TYPE_CHECKING:
    import zarr

    from ..plan import RunPlan
    from ..report import RunReport

__all__ = ["add_segment_command", "cmd_segment", "labels_location"]

#: The command each job queue submits with; ``--cluster`` refuses to start without it.
SUBMIT_COMMANDS = {"slurm": "sbatch", "lsf": "bsub", "pbs": "qsub"}

#: Options that only mean something with ``--cluster``.
CLUSTER_OPTIONS = ("jobs", "cores", "walltime", "queue", "account", "gpus_per_job")

#: Memory per job for ``--cluster`` when ``--memory`` is not given (dask-jobqueue style).
DEFAULT_JOB_MEMORY = "16GB"

SEGMENT_EPILOG = """\
examples:
  # labels of an OME-Zarr image go into it (labels/blockbuster, with a pyramid for napari)
  blockbuster segment brain.ome.zarr
  # a TIFF to a zarr array, 2-D tiles on a 3-D stack, object table next to the labels
  blockbuster segment stack.tif stack.labels.zarr --tile-shape 1,1024,1024 --table
  # Cellpose on the GPU, nuclei about 17 voxels wide, with one of its own parameters
  blockbuster segment brain.ome.zarr --method cellpose --model nuclei --diameter 17 --gpu \\
      --param flow_threshold=0.6
  # what would run (tiles, overlap, memory), without writing anything
  blockbuster segment brain.ome.zarr --method cellpose --diameter 17 --dry-run
  # only where there is tissue, skipping blank tiles
  blockbuster segment lightsheet.zarr --mask tissue.zarr --skip-empty
  # a tile whose method takes more than 10 minutes counts as failed
  blockbuster segment big.zarr --tile-timeout 600
  # finish a run that was interrupted or had failed tiles (same arguments + --resume)
  blockbuster segment brain.ome.zarr --method cellpose --diameter 17 --resume
  # for a pipeline: the run report as JSON on stdout
  blockbuster segment brain.ome.zarr --json > report.json
  # 4 local worker processes; or 10 SLURM jobs with one GPU each
  blockbuster segment big.zarr --workers 4
  blockbuster segment big.zarr --cluster slurm --jobs 10 --gpus-per-job 1 --gpu \\
      --cores 4 --memory 32GB --walltime 04:00:00 --queue gpu
  # print the job script --cluster would submit, without submitting it
  blockbuster segment big.zarr --cluster slurm --memory 32GB --job-script

OUTPUT defaults to <INPUT>.labels.zarr next to the input; for OME-Zarr input the labels go
into the image itself (INPUT/labels/<label-name>) unless OUTPUT or --no-ome is given.

Progress: a bar on a terminal; otherwise (a log file, a SLURM job) a line on stderr at each
tenth of the run and at least every minute (BLOCKBUSTER_PROGRESS_INTERVAL seconds), e.g.
  blockbuster: segmenting: tiles 512/4096 (12.5 %), 3 failed, 1.9 tiles/s, ETA 31 min

--tile-timeout: Python cannot stop a running call, so a call that overruns goes on in the
background (on its own thread, holding its memory and GPU) while the run moves on; on dask
workers the same happens inside the worker. A tile that ran out of GPU memory is retried
after the framework's cache is freed and a pause, before it counts as failed.

""" + EXIT_CODES_HELP


def add_segment_command(commands: Any) -> None:
    seg = commands.add_parser(
        "segment", help="segment an image tile by tile", formatter_class=HelpFormatter,
        epilog=SEGMENT_EPILOG,
        description="Segment INPUT (zarr, OME-Zarr, TIFF, HDF5, N5, CZI/ND2/LIF; a path or "
                    "a URL) tile by tile and write one seamless labelling.")
    seg.add_argument("input", metavar="INPUT",
                     help="zarr array, OME-Zarr image, TIFF, HDF5 (file.h5/dataset), N5, ...")
    seg.add_argument("output", metavar="OUTPUT", nargs="?",
                     help="where to write the labels (default: see below)")
    add_method_options(seg)
    add_planning_options(seg)
    add_input_options(seg)
    tiles = seg.add_argument_group("stitching and output")
    tiles.add_argument("--stitch", choices=("auto", "faces", "iou", "none"), default="auto",
                       help="how labels are joined across tile borders (default: the method's "
                            "choice)")
    again = tiles.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing output (and any unfinished run on it)")
    again.add_argument("--resume", action="store_true",
                       help="finish an interrupted run: only unfinished tiles run again (same "
                            "arguments as the first run)")
    tiles.add_argument("--table", nargs="?", const=True, default=False, metavar="PATH",
                       help="also write an object table (voxels, bounding box, centroid per "
                            "label, in µm too for a calibrated image): CSV, or Parquet for a "
                            ".parquet PATH (default PATH: next to the labels)")
    tiles.add_argument("--seam-table", nargs="?", const=True, default=False, metavar="PATH",
                       help="also write the seam report's table: one row per tile border "
                            "(objects, matched, orphans, ambiguous), TSV or CSV (default PATH: "
                            "next to the labels)")
    tiles.add_argument("--measure", action="store_true",
                       help="with --table: also each object's mean, min, max, std and "
                            "integrated intensity per channel")
    tiles.add_argument("--mask", metavar="PATH",
                       help="foreground mask at any resolution: tiles without foreground are "
                            "written as background without running the method")
    tiles.add_argument("--skip-empty", action="store_true",
                       help="also skip tiles whose input is constant (e.g. zero padding)")
    tiles.add_argument("--ome", action=argparse.BooleanOptionalAction, default=None,
                       help="write an OME-Zarr label image with a pyramid (default: yes for "
                            "OME-Zarr input or an OUTPUT ending in .ome.zarr)")
    tiles.add_argument("--label-name", default="blockbuster", metavar="NAME",
                       help="name of the label image inside an OME-Zarr image (default: "
                            "blockbuster)")
    failures = seg.add_argument_group("failures")
    failures.add_argument("--tile-timeout", type=positive_float, metavar="SECONDS",
                          help="a tile whose method runs longer counts as failed (and is "
                               "retried as failures are; see below). Default: no limit")
    failures.add_argument("--retries", type=non_negative_int, default=1, metavar="N",
                          help="tries again a tile that failed (default: 1)")
    run = seg.add_argument_group("scaling out (default: one tile at a time in this process)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, metavar="N",
                       help="N worker processes on this machine (with --gpu: one per GPU, "
                            "GPUs 0..N-1)")
    where.add_argument("--cluster", choices=tuple(SUBMIT_COMMANDS),
                       help="run workers as batch jobs (needs dask-jobqueue: "
                            "pip install \"blockbuster[cluster]\")")
    run.add_argument("--jobs", type=positive_int, metavar="N",
                     help="--cluster: number of jobs (default: 1)")
    run.add_argument("--cores", type=positive_int, metavar="N",
                     help="--cluster: cores (worker threads) per job (default: 1)")
    run.add_argument("--walltime", metavar="HH:MM:SS", help="--cluster: time limit per job")
    run.add_argument("--queue", metavar="NAME", help="--cluster: queue / partition")
    run.add_argument("--account", metavar="NAME", help="--cluster: account / project")
    run.add_argument("--gpus-per-job", type=non_negative_int, metavar="N",
                     help="--cluster: GPUs requested per job (default: 0)")
    run.add_argument("--job-script", action="store_true",
                     help="--cluster: print the job script that would be submitted, and exit")
    out = seg.add_argument_group("what to print")
    add_json_option(out, "the run report (or, with --dry-run, the plan)")
    out.add_argument("--dry-run", action="store_true",
                     help="check the input and the method and print the plan (tiles, overlap, "
                          "predicted memory); write nothing")
    add_message_options(seg)
    seg.set_defaults(func=cmd_segment, parser=seg)


# -- where the tiles run --------------------------------------------------------------------
@dataclass
class _Execution:
    """Where tiles run: a distributed client (or None for this process) and the tile budget."""

    client: Any
    memory: int | None


@contextlib.contextmanager
def _execution(args: argparse.Namespace) -> Iterator[_Execution]:
    """Start the local or job-queue cluster the options ask for, and stop it afterwards."""
    if args.workers is None and args.cluster is None:
        yield _Execution(None, args.memory)
        return
    from distributed import Client

    from .. import cluster as clusters

    if args.workers is not None:
        gpus = list(range(args.workers)) if args.gpu else None
        log.info("starting %d local worker process(es)%s", args.workers,
                 f" on GPUs {gpus}" if gpus else "")
        running = clusters.local_cluster(args.workers, gpus=gpus)
        sized_here = args.tile_shape == "auto" and not args.memory and not args.gpu
        memory = _ram_share(args.workers) if sized_here else args.memory
    else:
        _check_submit_command(args.cluster)
        running = _job_cluster(args, jobs=args.jobs or 1)
        memory = _job_tile_budget(args) if args.tile_shape == "auto" else args.memory
        ids = clusters.job_ids(running)
        log.info("submitted %d %s job(s) %s; tiles start when the jobs do", len(ids),
                 args.cluster.upper(), ", ".join(ids))
    try:
        with _terminate_like_interrupt(), Client(running) as client:
            if args.cluster is None:
                yield _Execution(client, memory)
            else:
                with clusters.JobKeeper(running):  # replaces jobs that end before the run
                    yield _Execution(client, memory)
    finally:
        running.close()  # cancels the jobs still queued or running


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C while workers run for it.

    Python's default SIGTERM exits at once, so the worker jobs of a run killed that way (kill,
    a driver job's wall time) stay in the queue until their workers time out. As an interrupt,
    the cluster is closed on the way out (its jobs cancelled) and ``--resume`` continues.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ram_share(n_workers: int) -> int:
    """Each of ``n_workers`` local workers holds a tile at once: split the free RAM."""
    from ..sizing import RAM_SAFETY, available_memory, format_bytes

    budget = int(available_memory().available_bytes * RAM_SAFETY / n_workers)
    log.info("tile budget %s: half the free RAM shared by %d workers", format_bytes(budget),
             n_workers)
    return budget


def _job_tile_budget(args: argparse.Namespace) -> int | None:
    """A job runs ``--cores`` tiles at once in its memory: size tiles for that share."""
    from ..sizing import RAM_SAFETY

    if args.gpu:
        return args.memory  # GPU tiles are sized from the GPU, not the job's RAM
    job_memory = args.memory or parse_bytes(DEFAULT_JOB_MEMORY)
    return int(job_memory * RAM_SAFETY / (args.cores or 1))


def _job_cluster(args: argparse.Namespace, jobs: int) -> Any:
    from .. import cluster as clusters

    memory = str(args.memory) if args.memory else DEFAULT_JOB_MEMORY
    return clusters.jobqueue_cluster(args.cluster, cores=args.cores or 1, memory=memory,
                                     walltime=args.walltime, queue=args.queue,
                                     account=args.account, gpus_per_job=args.gpus_per_job or 0,
                                     jobs=jobs)


def _check_submit_command(kind: str) -> None:
    from ..errors import InputError

    command = SUBMIT_COMMANDS[kind]
    if shutil.which(command) is None:
        raise InputError(f"--cluster {kind} submits jobs with {command}, which is not on PATH "
                         "here; run on a login node of the cluster (--job-script shows what "
                         "would be submitted)")


# -- the command ----------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace) -> int:
    """``blockbuster segment``: run tile_process with the command line's options."""
    from ..api import tile_process
    from ..errors import InputError
    from ..report import run_report

    started = time.perf_counter()
    if args.job_script:
        if args.cluster is None:
            raise InputError("--job-script needs --cluster slurm|lsf|pbs")
        running = _job_cluster(args, jobs=0)
        try:
            script = running.job_script()
        finally:
            running.close()
        if args.json:
            args.json_result = {"job_script": script}
        else:
            print(script)
        return EXIT_OK
    cluster_only = [f"--{name.replace('_', '-')}" for name in CLUSTER_OPTIONS
                    if getattr(args, name) is not None]
    if args.cluster is None and cluster_only:
        raise InputError(f"{', '.join(cluster_only)}: only with --cluster slurm|lsf|pbs")
    # Absolute paths: the run's manifest records them, and a --resume from another working
    # directory must find the same run.
    image = args.input if "://" in args.input else os.path.abspath(args.input)
    mask = os.path.abspath(args.mask) if args.mask else None
    # Open the input and make the segmenter first: bad input fails before a cluster starts
    # (and the message names the path as the user typed it).
    opened = open_input(args)
    log.info("input: %s", selection_line(opened))
    segmenter = make_method(args, opened)
    if args.dry_run:
        return _dry_run(args, opened, segmenter, mask)
    # Chosen channels, series, dataset or level: tile_process gets the opened image.
    source: Any = open_input(args, image) if input_options(args) else image
    args.run_started = True  # from here on, an OS error is a failed run, not bad input
    with _execution(args) as execution:
        out = tile_process(
            source, segmenter, args.tile_shape, args.overlap, output=args.output,
            channel_axis=args.channel_axis, stitch=args.stitch, use_gpu=args.gpu,
            memory=execution.memory, overwrite=args.overwrite, resume=args.resume,
            client=execution.client, progress=False if args.quiet else None,
            table=args.table, mask=mask, skip_empty=args.skip_empty, ome=args.ome,
            label_name=args.label_name, retries=args.retries, timeout=args.tile_timeout,
            measure=args.measure, seam_table=args.seam_table)
    report = _report_of(out, run_report)
    if args.json:
        args.json_result = {**(report.as_dict() if report else {"status": "complete"}),
                            "exit_code": EXIT_OK}
    else:
        _print_summary(out, report, time.perf_counter() - started)
    return EXIT_OK


def _report_of(out: zarr.Array, reader: Any) -> RunReport | None:
    from ..errors import BlockbusterError

    try:
        return reader(out)
    except BlockbusterError:  # an output completed by an older version: no report
        return None


def labels_location(arr: zarr.Array) -> Path | None:
    """The labels' path as a user names it: an OME-Zarr label group, or the array itself."""
    import zarr

    root = getattr(arr.store, "root", None)
    if root is None:
        return None
    where = Path(root) / arr.path if arr.path else Path(root)
    if where.name == "0":
        with contextlib.suppress(Exception):
            attrs: dict[str, Any] = dict(zarr.open_group(str(where.parent), mode="r").attrs)
            attrs = dict(attrs.get("ome", attrs))  # NGFF 0.5 nests it under "ome"
            if "image-label" in attrs or "multiscales" in attrs:
                return where.parent
    return where


def _print_summary(out: zarr.Array, report: RunReport | None, elapsed: float) -> None:
    from ..output import completion
    from ..sizing import format_bytes

    meta = completion(out) or {}
    labels = labels_location(out)
    n = meta.get("n_labels")
    objects = plural(n, "object") if isinstance(n, int) else "objects"
    print(f"labels: {labels if labels is not None else out.store}  ({objects}, "
          f"{format_shape(out.shape)} {out.dtype})")
    table = meta.get("table")
    if table is not None and Path(table).exists():
        print(f"table:  {table}")
    line = f"time:   {elapsed:.1f} s"
    if report is not None and report.tiles.get("run"):
        tiles = report.tiles
        line += f"  ({plural(tiles['run'], 'tile')} run"
        for key in ("resumed", "skipped", "failed"):
            if tiles.get(key):
                line += f", {tiles[key]} {key}"
        line += ")"
    print(line)
    if report is not None and report.peak_memory_bytes:
        print(f"memory: peak {format_bytes(report.peak_memory_bytes)} in this process")
    auto = report.overlap_auto if report is not None else None
    if auto:
        curve = ", ".join(f"{tuple(c['overlap'])}: F1 {c['f1']:.3f}" for c in auto["curve"])
        print(f"overlap: auto chose {tuple(auto['chosen'])}"
              + ("" if auto["found"] else " (none tried was exact: the largest)")
              + f" [{curve}]")
    if report is not None and report.seams:
        from .info import seam_lines

        print("\n".join(line.replace("seams:     ", "seams: ", 1)
                        for line in seam_lines(report.seams)))


def _dry_run(args: argparse.Namespace, src: Any, segmenter: Any, mask: str | None) -> int:
    """Plan the run as tile_process would and print the plan; nothing is written."""
    plan = plan_for(args, src, segmenter, mask=mask)
    summary = plan.summary()
    summary["output"] = _planned_output(args, src)
    if args.json:
        args.json_result = summary
        return EXIT_OK
    print(f"dry run: nothing written; without --dry-run the labels go to {summary['output']}")
    print("\n".join(plan_lines(plan, args.method)))
    return EXIT_OK


def plan_for(args: argparse.Namespace, src: Any, segmenter: Any, *,
             mask: str | None = None) -> RunPlan:
    """The library's plan of the run these options describe (what tile_process would do)."""
    from ..io import open_image
    from ..plan import StitchOptions, make_plan
    from ..segmenter import describe_segmenter

    return make_plan(src, segmenter, describe_segmenter(segmenter),
                     tile_shape=getattr(args, "tile_shape", "auto"), overlap=args.overlap,
                     stitch=StitchOptions(getattr(args, "stitch", "auto")), use_gpu=args.gpu,
                     memory=args.memory, mask=open_image(mask) if mask else None,
                     skip_empty=getattr(args, "skip_empty", False),
                     table=bool(getattr(args, "table", False)),
                     measure=bool(getattr(args, "measure", False)),
                     retries=getattr(args, "retries", 1),
                     timeout=getattr(args, "tile_timeout", None))


def _planned_output(args: argparse.Namespace, src: Any) -> str:
    from ..output import resolve_output

    if src.path is None and args.output is None:
        return "a temporary directory"
    target = resolve_output(args.output, src, None, args.ome, args.label_name)
    return target.describe()


def plan_lines(plan: RunPlan, method: str) -> list[str]:
    """A plan as ``info`` and ``--dry-run`` print it."""
    from ..sizing import format_bytes

    summary = plan.summary()
    linked = plan.grid.linked_axes
    tile = tuple(summary["tile_shape"][a] for a in linked)
    overlap = tuple(summary["overlap"][a] for a in linked)
    lines = [f"plan for --method {method}:",
             f"  tile shape: {tile} ({plural(summary['n_tiles'], 'tile')}, grid "
             f"{format_shape(summary['grid_shape'])})",
             f"  overlap:    {overlap}",
             f"  stitch:     {summary['stitch']}",
             f"  memory:     predicted peak {format_bytes(summary['predicted_peak_bytes'])} "
             "per tile"]
    if summary.get("sizing"):
        lines.append(f"  why:        {summary['sizing']}")
    return lines
