"""The ``blockbuster`` command: ``segment``, ``info`` and ``demo`` from a terminal.

Every command mirrors the Python API (:func:`blockbuster.tile_process` and friends) and adds
what a terminal needs: one-line errors, a progress bar, a summary of where the results are.

Exit codes (the same for every command):

* 0 -- success.
* 1 -- the run failed: tiles failed (the output is kept incomplete, ``--resume`` redoes them),
  another run is writing the same output, the job queue refused ``--cluster``'s jobs or they
  kept ending at start, or an unexpected internal error.
* 2 -- bad input: arguments, paths, tile shapes, unknown methods, an existing output without
  ``--overwrite``, a ``--resume`` with other arguments, a missing optional dependency.
* 130 -- interrupted (Ctrl-C, or SIGTERM during a ``--workers``/``--cluster`` run); an
  interrupted ``segment`` can be finished with ``--resume``.

Errors are one line on stderr; ``--verbose`` adds the traceback. Progress and INFO messages go
to stderr (``--quiet`` silences them); results (summaries, ``info`` reports) go to stdout.

Nothing heavy is imported at module level: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import zarr

    from .io import ImageSource
    from .segmenter import Segmenter

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "exit_code_for",
    "guess_channel_axis",
    "main",
    "parse_bytes",
    "parse_channels",
    "parse_overlap",
    "parse_tile_shape",
]

PROG = "blockbuster"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("blockbuster")

#: Options of ``segment``/``info`` that are handed to the segmenter's factory, when it takes
#: them (checked against its signature).
METHOD_OPTIONS = ("diameter", "model")

#: The command each job queue submits with; ``--cluster`` refuses to start without it.
SUBMIT_COMMANDS = {"slurm": "sbatch", "lsf": "bsub", "pbs": "qsub"}

#: Options that only mean something with ``--cluster``.
CLUSTER_OPTIONS = ("jobs", "cores", "walltime", "queue", "account", "gpus_per_job")

#: Memory per job for ``--cluster`` when ``--memory`` is not given (dask-jobqueue style).
DEFAULT_JOB_MEMORY = "16GB"

# The demo: sizes chosen so the default run takes well under two minutes on 2 cores.
DEMO_DIAMETER = 12.0
DEMO_SHAPE_2D = (8192, 8192)  # 128 MiB of uint16
DEMO_SHAPE_3D = (64, 768, 768)  # 72 MiB of uint16 (3-D watershed costs ~2x more per voxel)
DEMO_QUICK_2D = (512, 512)
DEMO_QUICK_3D = (8, 384, 384)  # y/x above 256: a 2-level pyramid
DEMO_TILE_2D = 1024
DEMO_TILE_3D = (32, 256, 256)
DEMO_QUICK_TILE_2D = 128
DEMO_QUICK_TILE_3D = (8, 128, 128)
#: Side (full-resolution voxels) of the zoomed preview around a tile corner.
DEMO_ZOOM = 512


# -- argument types -------------------------------------------------------------------------
def _ints(text: str, what: str) -> tuple[int, ...]:
    """Comma-separated ints, or ArgumentTypeError naming ``what``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} {text!r} is not a comma-separated list of integers"
        ) from None


def parse_tile_shape(text: str) -> str | tuple[int, ...]:
    """``--tile-shape``: ``auto``, or one size per spatial axis (-1 = the whole axis).

    The number of axes is checked against the image later, when it is open.

    Examples
    --------
    >>> parse_tile_shape("auto"), parse_tile_shape("1, 512,512"), parse_tile_shape("-1,256")
    ('auto', (1, 512, 512), (-1, 256))
    >>> parse_tile_shape("0,64")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    argparse.ArgumentTypeError: tile shape '0,64': size 0 on axis 0 must be positive ...
    """
    if text.strip().lower() == "auto":
        return "auto"
    sizes = _ints(text, "tile shape")
    for axis, size in enumerate(sizes):
        if size <= 0 and size != -1:
            raise argparse.ArgumentTypeError(
                f"tile shape {text!r}: size {size} on axis {axis} must be positive "
                "(or -1 for the whole axis)"
            )
    return sizes


def parse_overlap(text: str) -> int | tuple[int, ...]:
    """``--overlap``: one halo for every axis (``N``) or one per spatial axis (``N,N,N``).

    Examples
    --------
    >>> parse_overlap("16"), parse_overlap("0,16,16")
    (16, (0, 16, 16))
    >>> parse_overlap("-1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: overlap '-1': halo sizes must be >= 0
    """
    sizes = _ints(text, "overlap")
    if any(s < 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"overlap {text!r}: halo sizes must be >= 0")
    return sizes[0] if len(sizes) == 1 else sizes


def parse_bytes(text: str) -> int:
    """A memory size such as ``8GB``, ``512MiB``, ``1.5e9`` or ``4096`` in bytes.

    Units follow dask: ``kB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/... of
    1024; case and spaces do not matter.

    Examples
    --------
    >>> parse_bytes("8GB"), parse_bytes("512 MiB"), parse_bytes("4096")
    (8000000000, 536870912, 4096)
    >>> parse_bytes("lots")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    argparse.ArgumentTypeError: memory size 'lots' is not understood: use e.g. 8GB, ...
    """
    from dask.utils import parse_bytes as dask_parse_bytes

    try:
        value = dask_parse_bytes(text)
    except (ValueError, TypeError):
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"memory size {text!r} is not understood: use e.g. 8GB, 512MiB or a number of bytes"
        )
    return int(value)


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{text} must be >= {lowest}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _shape(text: str) -> tuple[int, ...]:
    sizes = _ints(text, "shape")
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} must be 2 or 3 positive sizes, e.g. 2048,2048 or 64,512,512"
        )
    return sizes


# -- the parser -----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-formatted examples in the epilogs; a little wider than the default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


MAIN_EPILOG = """\
examples:
  blockbuster demo                              # synthetic nuclei, segmented in tiles
  blockbuster info brain.ome.zarr               # what 'auto' would do with this image
  blockbuster segment brain.ome.zarr --table    # labels into the image, plus an object table
  blockbuster segment scan.tif cells.zarr --method cellpose --diameter 30 --gpu

exit codes: 0 success, 1 the run failed (see the message; --resume continues it),
            2 bad input (arguments, paths, existing output), 130 interrupted.
Run 'blockbuster COMMAND --help' for the options of a command.
"""

SEGMENT_EPILOG = """\
examples:
  # labels of an OME-Zarr image go into it (labels/blockbuster, with a pyramid for napari)
  blockbuster segment brain.ome.zarr
  # a TIFF to a zarr array, 2-D tiles on a 3-D stack, object table next to the labels
  blockbuster segment stack.tif stack.labels.zarr --tile-shape 1,1024,1024 --table
  # Cellpose on the GPU, nuclei about 17 voxels wide
  blockbuster segment brain.ome.zarr --method cellpose --model nuclei --diameter 17 --gpu
  # only where there is tissue, skipping blank tiles
  blockbuster segment lightsheet.zarr --mask tissue.zarr --skip-empty
  # finish a run that was interrupted or had failed tiles (same arguments + --resume)
  blockbuster segment brain.ome.zarr --method cellpose --diameter 17 --resume
  # 4 local worker processes; or 10 SLURM jobs with one GPU each
  blockbuster segment big.zarr --workers 4
  blockbuster segment big.zarr --cluster slurm --jobs 10 --gpus-per-job 1 --gpu \\
      --cores 4 --memory 32GB --walltime 04:00:00 --queue gpu
  # print the job script --cluster would submit, without submitting it
  blockbuster segment big.zarr --cluster slurm --memory 32GB --job-script

OUTPUT defaults to <INPUT>.labels.zarr next to the input; for OME-Zarr input the labels go
into the image itself (INPUT/labels/<label-name>) unless OUTPUT or --no-ome is given.
"""

INFO_EPILOG = """\
examples:
  blockbuster info brain.ome.zarr                       # shape, chunks, what 'auto' picks
  blockbuster info scan.tif --method cellpose --gpu     # tile plan for Cellpose on the GPU
  blockbuster info big.zarr --memory 8GB --overlap 32   # ... within an 8 GB budget
  blockbuster info brain.labels.zarr                    # is this output complete?
"""

DEMO_EPILOG = """\
examples:
  blockbuster demo                      # 8192 x 8192 nuclei in ./blockbuster-demo
  blockbuster demo /tmp/demo --3d       # a 64 x 768 x 768 volume
  blockbuster demo --shape 4096,4096    # any 2-D or 3-D size
  blockbuster demo --quick              # a tiny image, a few seconds

The demo writes, in OUTPUT_DIR: nuclei.ome.zarr (the image, with the labels in
labels/blockbuster), nuclei.objects.csv (one row per nucleus), nuclei.preview.png (a zoom on a
tile corner) and nuclei.overview.png (the whole image). It replaces its own files from an
earlier demo and touches nothing else. Open the image in napari (with napari-ome-zarr):
  napari ./blockbuster-demo/nuclei.ome.zarr
"""


def _segmenter_names() -> list[str]:
    """Registered segmenter names, read from the entry points without importing any plugin."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group="blockbuster.segmenters")})


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("messages")
    loud = group.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no progress bar and no INFO messages; warnings and errors only")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="debug messages, and the full traceback of an error")


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(_segmenter_names()) or "none found"
    group = parser.add_argument_group("method")
    group.add_argument("--method", default="watershed", metavar="NAME",
                       help=f"registered segmenter (installed: {names}; default: watershed)")
    group.add_argument("--diameter", type=_positive_float, metavar="D",
                       help="typical object diameter in voxels (for methods that take one)")
    group.add_argument("--model", metavar="M",
                       help="pretrained model name or path (for methods that take one)")


def _add_planning_options(parser: argparse.ArgumentParser, *, tile_shape: bool) -> None:
    group = parser.add_argument_group("tiles")
    if tile_shape:
        group.add_argument("--tile-shape", type=parse_tile_shape, default="auto",
                           metavar="auto|Z,Y,X",
                           help="tile (core) size per spatial axis, -1 = whole axis; 'auto' "
                                "sizes tiles from free memory (default)")
    group.add_argument("--overlap", type=parse_overlap, metavar="N|N,N,N",
                       help="halo around every tile, in voxels (default: the method's choice, "
                            "about one object diameter)")
    group.add_argument("--channel-axis", type=int, metavar="N",
                       help="axis holding channels (default: from OME-Zarr metadata, else none)")
    group.add_argument("--gpu", action="store_true",
                       help="run the method on the GPU and size tiles from free GPU memory")
    group.add_argument("--memory", type=parse_bytes, metavar="BYTES",
                       help="memory budget per tile for --tile-shape auto, e.g. 8GB (default: "
                            "half the free RAM, or 80%% of free GPU memory with --gpu); with "
                            "--cluster also the memory of each job")


# -- input selection (channels, series, dataset, level) -------------------------------------
def _add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--channel", action="append", metavar="NAME|INDEX",
                       help="segment only this channel, by name (from the file's metadata) or "
                            "index; repeat or separate with commas for several (default: all "
                            "channels). Not the same as --channel-axis")
    group.add_argument("--series", type=_non_negative_int, metavar="N",
                       help="series of a multi-series file (bioformats2raw, OME-TIFF, CZI/LIF "
                            "scenes; default: 0)")
    group.add_argument("--dataset", metavar="PATH",
                       help="array inside a container: zarr group member, HDF5 dataset, N5 "
                            "dataset (or append it to the path: file.h5/raw/volume)")
    group.add_argument("--level", type=_non_negative_int, default=0, metavar="N",
                       help="pyramid level of an OME-Zarr / pyramidal TIFF (default: 0, full "
                            "resolution)")


def parse_channels(values: Sequence[str] | None) -> list[str | int] | None:
    """``--channel`` values: names, or indices for plain integers; commas split several.

    Examples
    --------
    >>> parse_channels(["DAPI", "1,GFP"])
    ['DAPI', 1, 'GFP']
    >>> parse_channels(None) is None
    True
    """
    if not values:
        return None
    out: list[str | int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part:
                out.append(int(part) if part.lstrip("-").isdigit() else part)
    return out or None


def _input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The open_image options of the command line (only those given)."""
    options = {"channels": parse_channels(getattr(args, "channel", None)),
               "series": getattr(args, "series", None),
               "dataset": getattr(args, "dataset", None),
               "level": getattr(args, "level", 0) or 0}
    return {k: v for k, v in options.items() if v not in (None, 0)}


def build_parser() -> argparse.ArgumentParser:
    """The ``blockbuster`` argument parser with its ``segment``, ``info`` and ``demo`` commands.

    Examples
    --------
    >>> args = build_parser().parse_args(["segment", "in.zarr", "--tile-shape", "1,64,64"])
    >>> args.command, args.input, args.tile_shape, args.method
    ('segment', 'in.zarr', (1, 64, 64), 'watershed')
    """
    from . import __version__

    parser = _Parser(prog=PROG, formatter_class=_HelpFormatter, epilog=MAIN_EPILOG,
                     description="Segment microscopy images far larger than memory, tile by "
                                 "tile, with seamless stitching.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    seg = commands.add_parser(
        "segment", help="segment an image tile by tile", formatter_class=_HelpFormatter,
        epilog=SEGMENT_EPILOG,
        description="Segment INPUT (zarr, OME-Zarr, TIFF, HDF5, N5, CZI/ND2/LIF; a path or "
                    "a URL) tile by tile and write one seamless labelling.")
    seg.add_argument("input", metavar="INPUT",
                     help="zarr array, OME-Zarr image, TIFF, HDF5 (file.h5/dataset), N5, ...")
    seg.add_argument("output", metavar="OUTPUT", nargs="?",
                     help="where to write the labels (default: see below)")
    _add_method_options(seg)
    _add_planning_options(seg, tile_shape=True)
    _add_input_options(seg)
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
                            "label): CSV, or Parquet for a .parquet PATH (default PATH: next "
                            "to the labels)")
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
    run = seg.add_argument_group("scaling out (default: one tile at a time in this process)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, metavar="N",
                       help="N worker processes on this machine (with --gpu: one per GPU, "
                            "GPUs 0..N-1)")
    where.add_argument("--cluster", choices=tuple(SUBMIT_COMMANDS),
                       help="run workers as batch jobs (needs dask-jobqueue: "
                            "pip install \"blockbuster[cluster]\")")
    run.add_argument("--jobs", type=_positive_int, metavar="N",
                     help="--cluster: number of jobs (default: 1)")
    run.add_argument("--cores", type=_positive_int, metavar="N",
                     help="--cluster: cores (worker threads) per job (default: 1)")
    run.add_argument("--walltime", metavar="HH:MM:SS", help="--cluster: time limit per job")
    run.add_argument("--queue", metavar="NAME", help="--cluster: queue / partition")
    run.add_argument("--account", metavar="NAME", help="--cluster: account / project")
    run.add_argument("--gpus-per-job", type=_non_negative_int, metavar="N",
                     help="--cluster: GPUs requested per job (default: 0)")
    run.add_argument("--job-script", action="store_true",
                     help="--cluster: print the job script that would be submitted, and exit")
    _add_common(seg)
    seg.set_defaults(func=cmd_segment, parser=seg)

    info = commands.add_parser(
        "info", help="describe an image, or check an output", formatter_class=_HelpFormatter,
        epilog=INFO_EPILOG,
        description="Describe INPUT (shape, dtype, chunks, size, channel axis) and the tiles "
                    "'--tile-shape auto' would choose for a method; or, for labels written by "
                    "blockbuster, whether they are complete.")
    info.add_argument("input", metavar="INPUT", help="an image, or labels written by blockbuster")
    _add_method_options(info)
    _add_planning_options(info, tile_shape=False)
    _add_input_options(info)
    _add_common(info)
    info.set_defaults(func=cmd_info, parser=info)

    demo = commands.add_parser(
        "demo", help="segment a built-in synthetic nuclei image (no download)",
        formatter_class=_HelpFormatter, epilog=DEMO_EPILOG,
        description="Make a synthetic fluorescence image of nuclei (OME-Zarr), segment it in "
                    "tiles with the built-in watershed, and write OME-Zarr labels, an object "
                    "table and PNG previews.")
    demo.add_argument("output_dir", metavar="OUTPUT_DIR", nargs="?", default="blockbuster-demo",
                      help="folder for the demo's files (default: ./blockbuster-demo)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--shape", type=_shape, metavar="Y,X|Z,Y,X",
                      help=f"image shape (default: {','.join(map(str, DEMO_SHAPE_2D))})")
    size.add_argument("--3d", dest="three_d", action="store_true",
                      help=f"a 3-D volume ({' x '.join(map(str, DEMO_SHAPE_3D))})")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny image that runs in seconds (for tests)")
    _add_common(demo)
    demo.set_defaults(func=cmd_demo, parser=demo)
    add_analysis_commands(commands)
    return parser


# -- messages -------------------------------------------------------------------------------
class _Formatter(logging.Formatter):
    """``blockbuster: message``; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return f"{PROG}: {message}"


_HANDLER_FLAG = "_blockbuster_cli"


def _setup_logging(quiet: bool, verbose: bool) -> None:
    """INFO to stderr by default, WARNING with --quiet, DEBUG with --verbose."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for old in [h for h in log.handlers if getattr(h, _HANDLER_FLAG, False)]:
        log.removeHandler(old)  # main() may run more than once in a process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    setattr(handler, _HANDLER_FLAG, True)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # no second copy through a root handler someone configured
    # dask.distributed is chatty at INFO (scheduler and worker start-up); keep it for --verbose.
    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Python warnings as one log line, without the source line."""
    text = str(message)
    if log.isEnabledFor(logging.DEBUG):
        text = f"{text} ({category.__name__} at {filename}:{lineno})"
    log.warning("%s", text)


#: API wording in error messages -> the matching command-line option.
_CLI_WORDING = (
    ("rerun tile_process with resume=True", "rerun with --resume"),
    ("pass overwrite=True", "pass --overwrite"),
    ("overwrite=True", "--overwrite"),
    ("resume=True", "--resume"),
    ("drop use_gpu=True", "drop --gpu"),
    ("use_gpu=True", "--gpu"),
    ("pass a larger memory=", "pass a larger --memory"),
    ("pass a fixed tile_shape", "pass a fixed --tile-shape"),
    ("tile_shape=", "--tile-shape "),
)


def _cli_wording(message: str) -> str:
    """Say ``--overwrite`` where the library's message says ``overwrite=True``.

    Examples
    --------
    >>> _cli_wording("output x exists; pass overwrite=True to replace it")
    'output x exists; pass --overwrite to replace it'
    """
    for api, cli in _CLI_WORDING:
        message = message.replace(api, cli)
    return message


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error: 1 when the run failed, 2 for bad input.

    Examples
    --------
    >>> from blockbuster.errors import InputError, TileError
    >>> exit_code_for(InputError("bad")), exit_code_for(FileNotFoundError("x"))
    (2, 2)
    >>> exit_code_for(TileError("tile (0, 1) failed")), exit_code_for(KeyError("bug"))
    (1, 1)
    """
    from .errors import BlockbusterError, ClusterError, OutputLockedError, TileError

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (TileError, OutputLockedError, ClusterError)):
        return EXIT_FAILED  # the input was fine; the run did not finish
    if isinstance(exc, (BlockbusterError, OSError, ValueError)):
        return EXIT_USAGE
    return EXIT_FAILED


def _error_message(exc: BaseException) -> str:
    """The message printed for an error (one line, except for a list of failed tiles)."""
    from .errors import BlockbusterError, TileFailures

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, TileFailures):
        # The per-tile list is the useful part; the traceback is for --verbose.
        text = text.split("\nTraceback of the first failure:")[0]
        return _cli_wording(text) + "\n(--verbose shows the traceback of the first failure)"
    first = text.splitlines()[0]
    if isinstance(exc, BlockbusterError):
        return _cli_wording(first)
    if isinstance(exc, (OSError, ValueError)):
        return first
    return f"internal error: {type(exc).__name__}: {first} (rerun with --verbose for the " \
           "traceback, and please report it)"


# -- entry point ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``blockbuster`` command line; returns the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when the run failed, 2 for bad input, 130 when interrupted.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, so that the hint names its --help
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        print(f"{PROG}: error: choose a command: segment, info, demo, measure, relate, "
              f"postprocess or upsample (see '{PROG} --help')",
              file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.quiet, args.verbose)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 -- every error becomes a message and an exit code
            if args.verbose:
                traceback.print_exc(file=sys.stderr)
            print(f"{PROG}: error: {_error_message(exc)}", file=sys.stderr)
            return exit_code_for(exc)


# -- shared helpers -------------------------------------------------------------------------
def _segmenter_factory(name: str) -> Any:
    """The class or factory registered as ``name`` (blockbuster's own entry point first)."""
    from importlib.metadata import entry_points

    from .errors import InputError
    from .plugins import ENTRY_POINT_GROUP, get_segmenter

    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not eps:
        get_segmenter(name)  # raises the registry's error, which lists the installed ones
        raise InputError(f"no segmenter named {name!r}")
    eps.sort(key=lambda ep: getattr(getattr(ep, "dist", None), "name", None) != "blockbuster")
    try:
        return eps[0].load()
    except Exception as exc:  # a broken third-party plugin: say which, do not crash
        raise InputError(f"segmenter plugin {name!r} ({eps[0].value}) failed to load: "
                         f"{type(exc).__name__}: {exc}") from exc


def _accepted_options(factory: Any) -> list[str] | None:
    """The parameters a segmenter factory names, or None when it has no signature to read.

    ``**kwargs`` does not count: Cellpose and StarDist forward theirs to the model's predict
    call, where an option meant for another method would fail only on the first tile.
    """
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins or C callables without a signature
        return None
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def make_segmenter(method: str, options: dict[str, Any], *, gpu: bool = False) -> Segmenter:
    """Create the registered segmenter ``method`` with the command line's method options.

    Options the factory does not name as parameters are refused with an error that lists the
    ones it does. With ``gpu``, a factory that takes ``gpu`` or ``use_gpu`` gets True.

    Examples
    --------
    >>> make_segmenter("watershed", {"diameter": 20.0}).diameter
    20.0
    >>> make_segmenter("watershed", {"model": "nuclei"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    blockbuster.errors.InputError: --model does not apply to --method watershed; it takes ...
    """
    from .errors import InputError
    from .plugins import get_segmenter

    factory = _segmenter_factory(method)
    accepted = _accepted_options(factory)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if accepted is not None and key not in accepted:
            takes = ", ".join(f"--{a.replace('_', '-')}" for a in accepted) or "no options"
            raise InputError(
                f"--{key} does not apply to --method {method}; it takes {takes} (only "
                f"{' and '.join('--' + o for o in METHOD_OPTIONS)} are command-line options)"
            )
    if gpu and accepted is not None:
        for name in ("gpu", "use_gpu"):
            if name in accepted:
                given[name] = True
                break
    return get_segmenter(method, **given)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in METHOD_OPTIONS}


def _ome_attrs(attrs: Any) -> dict[str, Any]:
    """NGFF metadata of a group's attributes (0.5 nests it under ``"ome"``)."""
    attrs = dict(attrs)
    return dict(attrs.get("ome", attrs))


def _output_meta(arr: Any) -> dict[str, Any] | None:
    """The ``blockbuster`` attributes of labels written by tile_process, or None."""
    meta = arr.attrs.get("blockbuster")
    if isinstance(meta, dict) and "complete" in meta and "params" in meta:
        return meta
    return None


def _array_dir(arr: zarr.Array) -> Path | None:
    """Where a zarr array opened from a local path lives."""
    root = getattr(arr.store, "root", None)
    if root is None:
        return None
    return Path(root) / arr.path if arr.path else Path(root)


def _labels_location(arr: zarr.Array) -> Path | None:
    """The labels' path as a user names it: an OME-Zarr label group, or the array itself."""
    import zarr

    where = _array_dir(arr)
    if where is None:
        return None
    if where.name == "0":
        with contextlib.suppress(Exception):
            group = zarr.open_group(str(where.parent), mode="r")
            if "image-label" in _ome_attrs(group.attrs) or "multiscales" in _ome_attrs(
                    group.attrs):
                return where.parent
    return where


def _plural(n: int, noun: str) -> str:
    """``1 tile``, ``2 tiles``, ``12,345 objects``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _format_shape(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape)


# -- segment --------------------------------------------------------------------------------
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

    from . import cluster as clusters

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
    from .sizing import RAM_SAFETY, available_memory, format_bytes

    budget = int(available_memory().available_bytes * RAM_SAFETY / n_workers)
    log.info("tile budget %s: half the free RAM shared by %d workers", format_bytes(budget),
             n_workers)
    return budget


def _job_tile_budget(args: argparse.Namespace) -> int | None:
    """A job runs ``--cores`` tiles at once in its memory: size tiles for that share."""
    from .sizing import RAM_SAFETY

    if args.gpu:
        return args.memory  # GPU tiles are sized from the GPU, not the job's RAM
    job_memory = args.memory or parse_bytes(DEFAULT_JOB_MEMORY)
    return int(job_memory * RAM_SAFETY / (args.cores or 1))


def _job_cluster(args: argparse.Namespace, jobs: int) -> Any:
    from . import cluster as clusters

    memory = str(args.memory) if args.memory else DEFAULT_JOB_MEMORY
    return clusters.jobqueue_cluster(args.cluster, cores=args.cores or 1, memory=memory,
                                     walltime=args.walltime, queue=args.queue,
                                     account=args.account, gpus_per_job=args.gpus_per_job or 0,
                                     jobs=jobs)


def _check_submit_command(kind: str) -> None:
    from .errors import InputError

    command = SUBMIT_COMMANDS[kind]
    if shutil.which(command) is None:
        raise InputError(f"--cluster {kind} submits jobs with {command}, which is not on PATH "
                         "here; run on a login node of the cluster (--job-script shows what "
                         "would be submitted)")


def cmd_segment(args: argparse.Namespace) -> int:
    """``blockbuster segment``: run tile_process with the command line's options."""
    from .api import tile_process
    from .errors import InputError
    from .io import open_image

    started = time.perf_counter()
    if args.job_script:
        if args.cluster is None:
            raise InputError("--job-script needs --cluster slurm|lsf|pbs")
        running = _job_cluster(args, jobs=0)
        try:
            print(running.job_script())
        finally:
            running.close()
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
    opened = open_image(args.input, args.channel_axis, **_input_options(args))
    source: Any = image
    if _input_options(args):
        # Channels, series, dataset or level chosen: hand tile_process the opened image.
        source = open_image(image, args.channel_axis, **_input_options(args))
    log.info("input: %s", _selection_line(opened))
    segmenter = make_segmenter(args.method, _method_options(args), gpu=args.gpu)
    with _execution(args) as execution:
        out = tile_process(
            source, segmenter, args.tile_shape, args.overlap, output=args.output,
            channel_axis=args.channel_axis, stitch=args.stitch, use_gpu=args.gpu,
            memory=execution.memory, overwrite=args.overwrite, resume=args.resume,
            client=execution.client, progress=False if args.quiet else None,
            table=args.table, mask=mask, skip_empty=args.skip_empty, ome=args.ome,
            label_name=args.label_name)
    _print_segment_summary(out, args, time.perf_counter() - started)
    return EXIT_OK


def _print_segment_summary(out: zarr.Array, args: argparse.Namespace, elapsed: float) -> None:
    meta = _output_meta(out) or {}
    labels = _labels_location(out)
    n = meta.get("n_labels")
    objects = _plural(n, "object") if isinstance(n, int) else "objects"
    print(f"labels: {labels if labels is not None else out.store}  ({objects}, "
          f"{_format_shape(out.shape)} {out.dtype})")
    table = meta.get("table")
    if table is not None and Path(table).exists():
        print(f"table:  {table}")
    print(f"time:   {elapsed:.1f} s")


# -- info -----------------------------------------------------------------------------------
def guess_channel_axis(shape: Sequence[int], axes: Sequence[Any] | None = None
                       ) -> tuple[int | None, str, bool]:
    """Which axis holds channels: ``(axis or None, why, is_a_guess)``.

    OME-Zarr axes of type ``"channel"`` (or TIFF axes ``C``/``S``) are taken as they are. Else,
    in a 3-D or 4-D image, a last or first axis of size <= 4 looks like channels, but that is a
    guess (it could be a thin stack).

    Parameters
    ----------
    shape : sequence of int
        Full image shape.
    axes : sequence of dict or str, optional
        OME-Zarr axes (``{"name": "c", "type": "channel"}``) or a TIFF axes string (``"CYX"``).

    Examples
    --------
    >>> guess_channel_axis((2, 512, 512), [{"name": "c", "type": "channel"},
    ...                                    {"name": "y", "type": "space"},
    ...                                    {"name": "x", "type": "space"}])
    (0, 'OME-Zarr axis type "channel"', False)
    >>> guess_channel_axis((512, 512, 3))
    (2, 'the last axis has only 3 entries', True)
    >>> guess_channel_axis((40, 512, 512))[0] is None
    True
    """
    if axes:
        if isinstance(axes, str):
            for i, name in enumerate(axes.upper()):
                if name in "CS" and len(axes) == len(shape):
                    return i, f"TIFF axes {axes!r}", False
        else:
            for i, axis in enumerate(axes):
                if isinstance(axis, dict) and axis.get("type") == "channel":
                    return i, 'OME-Zarr axis type "channel"', False
            return None, "OME-Zarr axes have no channel axis", False
    if len(shape) in (3, 4):
        for i, where in ((len(shape) - 1, "last"), (0, "first")):
            if shape[i] <= 4:
                return i, f"the {where} axis has only {shape[i]} entries", True
    return None, "no axis looks like channels", True


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def _work_dirs(path: Path) -> list[Path]:
    """Work directories an output at ``path`` can have (as tile_process names them)."""
    from .status import work_dirs_for

    return work_dirs_for(path)


def _find_output(path: Path) -> tuple[Any, dict[str, Any]] | None:
    """The labels array and its run metadata when ``path`` is a blockbuster output."""
    import zarr

    if not path.is_dir():
        return None
    try:
        node = zarr.open(store=str(path), mode="r")
        if isinstance(node, zarr.Group):
            if "0" not in node:
                return None
            node = node["0"]
        meta = _output_meta(node)
    except Exception:  # noqa: BLE001 -- not zarr at all: described as an input (which reports the error)
        return None
    return (node, meta) if meta is not None else None


def _has_run(work: Path) -> bool:
    """Whether a work directory holds a run (a refused run may leave just a lock file)."""
    from .engine.state import WorkDir

    return WorkDir(work).exists()


def _lock_holder(work: Path) -> str | None:
    """Who holds the run lock in a work directory right now, or None."""
    lock = work / "lock"
    try:
        import fcntl
    except ImportError:  # no flock (Windows): cannot tell
        return None
    if not lock.exists():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _work_report(work: Path) -> list[str]:
    """Tiles done and failed in a work directory."""
    from .engine.state import WorkDir

    wd = WorkDir(work)
    done, failed = wd.done_tiles(), wd.failed_tiles()
    total = None
    with contextlib.suppress(Exception):
        total = math.prod(len(c) for c in wd.read_manifest()["params"]["tile_chunks"])
    of = f" of {total}" if total is not None else ""
    line = f"work dir:   {work}: {len(done)}{of} tiles done, {len(failed)} failed"
    if failed:
        listed = ", ".join(str(t) for t in sorted(failed)[:10])
        line += f" (tile ids {listed}{', ...' if len(failed) > 10 else ''})"
    lines = [line]
    holder = _lock_holder(work)
    if holder:
        lines.append(f"running:    a run is writing this output now ({holder})")
    return lines


def _describe_output(path: Path, arr: zarr.Array, meta: dict[str, Any]) -> list[str]:
    params = meta.get("params", {})
    complete = meta.get("complete") is True
    kind = "OME-Zarr label image" if arr.path == "0" else "zarr array"
    lines = [f"labels:     {path} ({kind}, written by blockbuster)",
             f"shape:      {tuple(arr.shape)}  dtype {arr.dtype}  chunks (tiles) "
             f"{tuple(arr.chunks)}"]
    if complete:
        n = meta.get("n_labels")
        lines.append(f"status:     complete, {n:,} objects" if isinstance(n, int)
                     else "status:     complete")
    else:
        lines.append("status:     INCOMPLETE: the run writing these labels has not finished "
                     "(or died); finish it by rerunning the same command with --resume")
    segmenter = params.get("segmenter", {})
    chunks = params.get("tile_chunks") or []
    lines.append(f"run:        {segmenter.get('fn', segmenter)} on {params.get('input')}; "
                 f"{math.prod(len(c) for c in chunks)} tiles, overlap "
                 f"{tuple(params.get('depth', ()))}, stitch {params.get('stitch')}")
    for work in _work_dirs(path):
        if _has_run(work):
            lines += _work_report(work)
            if complete:
                lines.append("note:       the labels are complete; this work directory is a "
                             "leftover and can be deleted")
    return lines


def _describe_unwritten(path: Path, work: Path) -> list[str]:
    return [f"labels:     {path} (not written yet)",
            "status:     INCOMPLETE: a run writing these labels started but has not finished "
            "(or died); finish it by rerunning the same command with --resume",
            *_work_report(work)]


def _describe_input(args: argparse.Namespace, path: str) -> list[str]:
    from .io import open_image
    from .sizing import format_bytes

    src = open_image(path, args.channel_axis, **_input_options(args))
    meta = src.meta
    kind = meta.format
    if meta.series is not None:
        kind += f", series {meta.series}"
    if src.dataset is not None:
        kind += f", dataset {src.dataset!r}"
    if meta.level:
        kind += f", level {meta.level}"
    lines = [f"input:      {path} ({kind}; reader {meta.reader})",
             f"shape:      {src.shape}  axes {','.join(src.axis_names)}",
             f"dtype:      {src.dtype}",
             f"chunks:     {src.storage_chunks}",
             f"size:       {_on_disk(src)}{format_bytes(src.nbytes)} uncompressed",
             _calibration_line(src),
             _channel_line(args, src),
             *_time_lines(src),
             f"tiled axes: {', '.join(src.axes[a].name for a in src.tiled_axes)} "
             f"{src.tiled_shape}" + _dropped_text(src)]
    problem = meta.extra.get("metadata_problem")
    if problem:
        lines.append(f"warning:    metadata {problem}")
    labels = _ome_label_names(src.path) if src.kind == "ome-zarr" and src.path else []
    if labels:
        lines.append(f"OME labels: {', '.join(labels)}")
    lines += _plan_lines(args, src)
    return lines


def _on_disk(src: ImageSource) -> str:
    from .sizing import format_bytes

    if src.path is None or not src.path.exists():
        return ""
    return f"{format_bytes(_disk_size(src.path))} on disk, "


def _calibration_line(src: ImageSource) -> str:
    parts = []
    for a in src.spatial_axes:
        axis = src.axes[a]
        parts.append(f"{axis.name} {axis.scale:g} {axis.unit or 'voxel'}"
                     + (f" (origin {axis.translation:g})" if axis.translation else ""))
    if not any(src.axes[a].unit for a in src.spatial_axes) and all(
            src.axes[a].scale == 1 for a in src.spatial_axes):
        return "voxel size: unknown (1 voxel); outputs will be in voxels"
    return "voxel size: " + ", ".join(parts)


def _time_lines(src: ImageSource) -> list[str]:
    if src.time_axis is None:
        return []
    n = src.shape[src.time_axis]
    axis = src.axes[src.time_axis]
    step = f", every {axis.scale:g} {axis.unit}" if axis.unit else ""
    return [f"time:       axis {src.time_axis} ({axis.name!r}), {n} time point(s){step}; "
            "each time point is segmented on its own"]


def _dropped_text(src: ImageSource) -> str:
    dropped = [src.axes[a].name for a in src.squeezed_axes]
    return f"; singleton axes {', '.join(dropped)} not tiled" if dropped else ""


def _selection_line(src: ImageSource) -> str:
    """What a run segments: shape, channels and time points (for the run log)."""
    from .io import describe_channels

    parts = [f"{src.meta.format}, tiled axes "
             f"{','.join(src.axes[a].name for a in src.tiled_axes)} {src.tiled_shape}"]
    if src.channel_axis is not None:
        chosen = src.channel_names or tuple(str(i) for i in src.channel_indices)
        parts.append(f"channel(s) {', '.join(chosen)} of {describe_channels(src)}")
    if src.time_axis is not None:
        parts.append(f"{src.shape[src.time_axis]} time point(s)")
    return "; ".join(parts)


def _channel_line(args: argparse.Namespace, src: ImageSource) -> str:
    from .io import describe_channels

    if src.channel_axis is not None:
        how = "given" if args.channel_axis is not None else f"from the {src.meta.format} metadata"
        line = (f"channels:   axis {src.channel_axis} ({src.axes[src.channel_axis].name!r}, "
                f"{how}), {src.shape[src.channel_axis]} channel(s): {describe_channels(src)}")
        if src.channels is not None:
            chosen = src.channel_names or tuple(str(i) for i in src.channel_indices)
            return line + f"; segmenting {', '.join(chosen)}"
        return line + "; all are given to the method (--channel NAME|INDEX chooses)"
    axis, why, _ = guess_channel_axis(src.shape)
    if src.meta.axes_known or axis is None:
        return ("channels:   none" + ("" if src.meta.axes_known else f" ({why})")
                + "; pass --channel-axis N if an axis holds channels")
    return (f"channels:   axis {axis} may hold channels ({why}; a guess: it could also be a "
            f"thin stack); pass --channel-axis {axis} if so")


def _ome_label_names(path: Path) -> list[str]:
    import zarr

    with contextlib.suppress(Exception):
        group = zarr.open_group(str(path / "labels"), mode="r")
        return [str(n) for n in _ome_attrs(group.attrs).get("labels", [])]
    return []


def _plan_lines(args: argparse.Namespace, src: ImageSource) -> list[str]:
    """What ``--tile-shape auto`` would choose for the method (as tile_process plans it)."""
    from .segmenter import describe_segmenter
    from .sizing import format_bytes, plan_tile_shape
    from .tiling import TileGrid, clip_depth, normalize_overlap

    segmenter = make_segmenter(args.method, _method_options(args), gpu=args.gpu)
    info = describe_segmenter(segmenter)
    overlap = args.overlap if args.overlap is not None else (info.preferred_overlap or 0)
    overlap_t = normalize_overlap(overlap, len(src.spatial_shape))
    plan = plan_tile_shape(src.spatial_shape, src.dtype, overlap=overlap_t, use_gpu=args.gpu,
                           memory=args.memory, memory_model=info.memory_model,
                           channels=src.n_channels, chunks=src.spatial_storage_chunks,
                           spatial_ndim=info.spatial_ndim)
    grid = TileGrid(src.spatial_shape, plan.shape)
    depth = clip_depth(overlap_t, grid.chunks)
    return [f"auto tiles for --method {args.method}:",
            f"  tile shape: {plan.shape} ({_plural(grid.n_tiles, 'tile')}, grid "
            f"{_format_shape(grid.grid_shape)})",
            f"  overlap:    {depth}",
            f"  memory:     predicted peak {format_bytes(plan.predicted_peak_bytes)} per tile, "
            f"budget {format_bytes(plan.budget_bytes)}",
            f"  why:        {plan.reason}"]


def cmd_info(args: argparse.Namespace) -> int:
    """``blockbuster info``: describe an image, or the state of an output."""
    path = Path(args.input)
    found = _find_output(path)
    if found is not None:
        lines = _describe_output(path, *found)
    elif not path.exists() and any(_has_run(w) for w in _work_dirs(path)):
        lines = _describe_unwritten(path, next(w for w in _work_dirs(path) if _has_run(w)))
    else:  # an image: a path, a URL, or file.h5/dataset (open_image says if it is not found)
        lines = _describe_input(args, args.input)
    print("\n".join(lines))
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoPlan:
    """Shape, storage chunks and tile shape of the demo image."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    tile: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return math.prod(-(-s // t) for s, t in zip(self.shape, self.tile, strict=True))


def demo_plan(shape: Sequence[int] | None = None, *, three_d: bool = False,
              quick: bool = False) -> DemoPlan:
    """The demo's image shape, storage chunks and tiles (tiles are whole chunks).

    Examples
    --------
    >>> plan = demo_plan()
    >>> plan, plan.n_tiles
    (DemoPlan(shape=(8192, 8192), chunks=(1024, 1024), tile=(1024, 1024)), 64)
    >>> demo_plan(three_d=True, quick=True)
    DemoPlan(shape=(8, 384, 384), chunks=(8, 128, 128), tile=(8, 128, 128))
    >>> demo_plan((100, 3000))
    DemoPlan(shape=(100, 3000), chunks=(100, 1024), tile=(100, 1024))
    """
    if shape is None:
        if three_d:
            shape = DEMO_QUICK_3D if quick else DEMO_SHAPE_3D
        else:
            shape = DEMO_QUICK_2D if quick else DEMO_SHAPE_2D
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        tile: tuple[int, ...] = DEMO_QUICK_TILE_3D if quick else DEMO_TILE_3D
    else:
        tile = (DEMO_QUICK_TILE_2D if quick else DEMO_TILE_2D,) * 2
    tile = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))
    return DemoPlan(shape, tile, tile)


def _zoom_window(shape: Sequence[int], tile: Sequence[int], size: int
                 ) -> tuple[slice, slice]:
    """A y/x window of about ``size`` voxels centred on the tile corner nearest the middle.

    Examples
    --------
    >>> _zoom_window((8192, 8192), (1024, 1024), 512)
    (slice(3840, 4352, None), slice(3840, 4352, None))
    >>> _zoom_window((300, 5000), (128, 1024), 512)
    (slice(0, 300, None), slice(1792, 2304, None))
    """
    window = []
    for extent, step in zip(shape[-2:], tile[-2:], strict=True):
        corner = max(step, round(extent / 2 / step) * step) if step < extent else extent // 2
        start = min(max(0, corner - size // 2), max(0, extent - size))
        window.append(slice(start, min(extent, start + size)))
    return window[0], window[1]


def cmd_demo(args: argparse.Namespace) -> int:
    """``blockbuster demo``: synthetic nuclei -> tiled watershed -> OME-Zarr labels, table, PNGs."""
    from .api import tile_process
    from .data import write_synthetic_nuclei
    from .sizing import format_bytes

    started = time.perf_counter()
    plan = demo_plan(args.shape, three_d=args.three_d, quick=args.quick)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "nuclei.ome.zarr"
    table_path = folder / "nuclei.objects.csv"
    log.info("writing a synthetic %s uint16 image of nuclei (%s) to %s",
             _format_shape(plan.shape), format_bytes(math.prod(plan.shape) * 2), image_path)
    write_synthetic_nuclei(image_path, plan.shape, chunks=plan.chunks, diameter=DEMO_DIAMETER,
                           ome=True, overwrite=True)
    made = time.perf_counter()
    segmenter = make_segmenter("watershed", {"diameter": DEMO_DIAMETER})
    # OME-Zarr input, no output: tile_process writes the labels into the image as
    # labels/blockbuster, with a pyramid, listed so that napari shows them over the image.
    out = tile_process(image_path, segmenter, plan.tile, ome=True, overwrite=True,
                       progress=False if args.quiet else None, table=table_path)
    labels_path = _labels_location(out) or image_path / "labels" / "blockbuster"
    segmented = time.perf_counter()
    previews = _demo_previews(image_path, labels_path, out, plan, folder)
    n = (_output_meta(out) or {}).get("n_labels", 0)
    elapsed = time.perf_counter() - started
    print(f"demo done in {elapsed:.1f} s (image {made - started:.1f} s, segmentation "
          f"{segmented - made:.1f} s, previews {elapsed - (segmented - started):.1f} s)")
    print(f"image:    {image_path}  ({_format_shape(plan.shape)} uint16, synthetic nuclei)")
    print(f"labels:   {labels_path}  ({n:,} nuclei, OME-Zarr with pyramid, "
          f"{_plural(plan.n_tiles, 'tile')} of {_format_shape(plan.tile)})")
    print(f"table:    {table_path}")
    print(f"preview:  {previews[0]}  (zoom on a tile corner)")
    print(f"overview: {previews[1]}")
    print(f"view it:  napari {image_path}   (needs napari and napari-ome-zarr)")
    return EXIT_OK


def _demo_previews(image_path: Path, labels_path: Path, out: zarr.Array, plan: DemoPlan,
                   folder: Path) -> tuple[Path, Path]:
    """A full-resolution zoom on a tile corner and a reduced overview, both with the grid."""
    from .preview import save_preview

    where = "" if len(plan.shape) == 2 else f", plane z={plan.shape[0] // 2}"
    window = _zoom_window(plan.shape, plan.tile, DEMO_ZOOM)
    zoom = save_preview(
        image_path, labels_path, folder / "nuclei.preview.png", tile_grid=out, window=window,
        max_size=DEMO_ZOOM, fill_alpha=0.25,
        caption=f"blockbuster demo: y {window[0].start}-{window[0].stop}, x "
                f"{window[1].start}-{window[1].stop}{where}; yellow = tile borders")
    # The whole image holds too many nuclei to outline at this scale: image and tiles only.
    overview = save_preview(
        image_path, None, folder / "nuclei.overview.png", tile_grid=out,
        caption=f"{_format_shape(plan.shape)}, {_plural(plan.n_tiles, 'tile')}{where}")
    return zoom, overview


# -- analysis: measure, relate, postprocess, upsample ----------------------------------------
MEASURE_EPILOG = """\
examples:
  blockbuster measure brain.ome.zarr/labels/blockbuster --image brain.ome.zarr
  blockbuster measure nuclei.labels.zarr --image scan.zarr --channel-axis 0 \\
      --channels DAPI,GFP --spacing 2,0.5,0.5 -o nuclei.parquet

One row per object: voxels and volume, centroid and bounding box (voxels and µm), and per
channel the mean, min, max, standard deviation and integrated intensity. The voxel size comes
from --spacing, else from the OME-Zarr metadata. Default table: next to the labels,
<labels>.measurements.csv.
"""

RELATE_EPILOG = """\
examples:
  blockbuster relate nuclei.labels.zarr cells.labels.zarr
  blockbuster relate spots.zarr nuclei.zarr --max-distance 5um -o spots.relations.csv

Each child goes to the parent it overlaps most (ties: the smaller parent label); a child that
overlaps none goes to the nearest parent within --max-distance (µm with a unit, voxels
without). Writes the children's table and, next to it, *.parents.csv with the number of
children per parent.
"""

POSTPROCESS_EPILOG = """\
examples:
  blockbuster postprocess nuclei.labels.zarr -o clean.zarr --fill-holes --min-size 50
  blockbuster postprocess nuclei.labels.zarr -o cells.zarr --expand 3um
  blockbuster postprocess brain.ome.zarr/labels/blockbuster -o big.ome.zarr --min-size 20um3

Operations run in this order: --fill-holes, --min-size/--max-size, --expand. Sizes without a
unit are voxels (with um3/um2: µm³ or µm²); distances without a unit are voxels (with um: µm).
Tiled results equal whole-image results; the input is never modified. An OUTPUT ending in
.ome.zarr is an OME-Zarr label image.
"""

UPSAMPLE_EPILOG = """\
examples:
  blockbuster upsample brain.ome.zarr/labels/blockbuster/2 --like brain.ome.zarr -o full.zarr
  blockbuster upsample small.labels.zarr --factors 4,4 -o full.labels.zarr

Nearest neighbour, one output chunk at a time: every full-resolution voxel takes the label of
the low-resolution voxel it was downsampled into.
"""

_LENGTH_UNITS = {"": None, "um": 1.0, "µm": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3,
                 "mm": 1e3, "px": None, "vox": None, "voxel": None, "voxels": None}


def parse_length(text: str) -> tuple[float, str]:
    """A distance with an optional unit: ``(value, "um")`` or ``(value, "voxels")``.

    Examples
    --------
    >>> parse_length("5um"), parse_length("250 nm"), parse_length("3")
    ((5.0, 'um'), (0.25, 'um'), (3.0, 'voxels'))
    """
    import re

    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zµ]*)\s*", text)
    unit = match.group(2) if match else None
    if match is None or unit not in _LENGTH_UNITS:
        raise argparse.ArgumentTypeError(
            f"distance {text!r} is not understood: use e.g. 5um, 250nm or 3 (voxels)")
    try:
        value = float(match.group(1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"distance {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"distance {text!r} must be >= 0")
    factor = _LENGTH_UNITS[unit]
    return (value * factor, "um") if factor is not None else (value, "voxels")


def parse_size(text: str) -> tuple[float, str]:
    """An object size: voxels (no unit) or ``um3`` / ``um2`` (µm³, µm²).

    Examples
    --------
    >>> parse_size("50"), parse_size("12.5um3"), parse_size("30 µm2")
    ((50.0, 'voxels'), (12.5, 'um3'), (30.0, 'um2'))
    """
    import re

    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(um3|um2|µm3|µm2|µm³|µm²|voxels|vox|px)?\s*",
                         text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not understood: use e.g. 50 (voxels), 20um3 or 30um2")
    try:
        value = float(match.group(1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"size {text!r} must be >= 0")
    unit = (match.group(2) or "voxels").replace("µ", "u").replace("³", "3").replace("²", "2")
    return value, "voxels" if unit in ("vox", "px") else unit


def _spacing(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing {text!r} must be numbers, e.g. 2,0.5,0.5") \
            from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing {text!r} must be positive")
    return values


def _channel_list(text: str) -> list[int | str]:
    """``--channels``: indices (``0,2``) or names (``DAPI,GFP``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("--channels needs at least one channel")
    return [int(p) if p.lstrip("-").isdigit() else p for p in parts]


def add_analysis_commands(commands: Any) -> None:
    """The ``measure``, ``relate``, ``postprocess`` and ``upsample`` commands."""
    spacing_help = "voxel size in µm per spatial axis, e.g. 2,0.5,0.5 (default: OME-Zarr metadata)"
    mea = commands.add_parser(
        "measure", help="measure every object (size, position, intensities)",
        formatter_class=_HelpFormatter, epilog=MEASURE_EPILOG,
        description="Measure every object of LABELS tile by tile, with the intensities of "
                    "IMAGE, and write a table (CSV, or Parquet for a .parquet path).")
    mea.add_argument("labels", metavar="LABELS", help="labels: a blockbuster output or any "
                                                      "integer zarr array")
    mea.add_argument("--image", metavar="IMAGE", help="intensity image on the same grid")
    mea.add_argument("--channels", type=_channel_list, metavar="C,C",
                     help="channels to measure, by index or name (default: all)")
    mea.add_argument("--channel-axis", type=int, metavar="N",
                     help="axis of IMAGE holding channels (default: from OME-Zarr metadata)")
    mea.add_argument("--spacing", type=_spacing, metavar="Z,Y,X", help=spacing_help)
    mea.add_argument("-o", "--output", metavar="PATH",
                     help="table to write (default: <labels>.measurements.csv)")
    _add_common(mea)
    mea.set_defaults(func=cmd_measure, parser=mea)

    rel = commands.add_parser(
        "relate", help="which parent object holds each child object",
        formatter_class=_HelpFormatter, epilog=RELATE_EPILOG,
        description="Relate the objects of two label images on the same grid: the parent of "
                    "each child, and the number of children per parent.")
    rel.add_argument("children", metavar="CHILDREN", help="child labels (e.g. nuclei, spots)")
    rel.add_argument("parents", metavar="PARENTS", help="parent labels (e.g. cells, nuclei)")
    rel.add_argument("--max-distance", type=parse_length, metavar="D",
                     help="children overlapping no parent get the nearest parent within D "
                          "(e.g. 5um; voxels without a unit)")
    rel.add_argument("--spacing", type=_spacing, metavar="Z,Y,X", help=spacing_help)
    rel.add_argument("-o", "--output", metavar="PATH",
                     help="children's table (default: <children>.relations.csv); the "
                          "parents' goes next to it as *.parents.csv")
    _add_common(rel)
    rel.set_defaults(func=cmd_relate, parser=rel)

    post = commands.add_parser(
        "postprocess", help="fill holes, filter by size, expand labels (new output)",
        formatter_class=_HelpFormatter, epilog=POSTPROCESS_EPILOG,
        description="Post-process LABELS out of core, without seams, into a new label image.")
    post.add_argument("labels", metavar="LABELS", help="labels to post-process")
    post.add_argument("-o", "--output", metavar="OUTPUT",
                      help="new labels (default: <labels>.postprocessed.zarr)")
    post.add_argument("--fill-holes", action="store_true",
                      help="fill background enclosed by a single object")
    post.add_argument("--min-size", type=parse_size, metavar="S",
                      help="drop smaller objects (voxels, or e.g. 20um3)")
    post.add_argument("--max-size", type=parse_size, metavar="S",
                      help="drop larger objects (voxels, or e.g. 5000um3)")
    post.add_argument("--expand", type=parse_length, metavar="D",
                      help="grow objects into the background by D without merging them "
                           "(voxels, or e.g. 2um)")
    post.add_argument("--spacing", type=_spacing, metavar="Z,Y,X", help=spacing_help)
    post.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    _add_common(post)
    post.set_defaults(func=cmd_postprocess, parser=post)

    up = commands.add_parser(
        "upsample", help="labels of a lower resolution level at full resolution",
        formatter_class=_HelpFormatter, epilog=UPSAMPLE_EPILOG,
        description="Upsample LABELS (nearest neighbour, chunk by chunk) to a larger grid.")
    up.add_argument("labels", metavar="LABELS", help="low-resolution labels")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--factors", type=lambda t: _ints(t, "factors"), metavar="F,F",
                        help="integer factor per axis (or one for all)")
    target.add_argument("--shape", type=lambda t: _ints(t, "shape"), metavar="Z,Y,X",
                        help="target shape")
    target.add_argument("--like", metavar="IMAGE", help="the full-resolution image: its shape")
    up.add_argument("-o", "--output", metavar="OUTPUT",
                    help="new labels (default: <labels>.upsampled.zarr)")
    up.add_argument("--chunks", type=lambda t: _ints(t, "chunks"), metavar="Z,Y,X",
                    help="output chunks (default: the input's)")
    up.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    _add_common(up)
    up.set_defaults(func=cmd_upsample, parser=up)


def _table_next_to(labels: str, suffix: str) -> Path:
    """``<labels>.<suffix>.csv`` next to the labels (next to the image for OME labels)."""
    path = Path(labels.rstrip("/"))
    if path.parent.name == "labels":  # <image>/labels/<name>
        image = path.parent.parent
        return image.with_name(f"{image.name}.{path.name}.{suffix}.csv")
    name = path.name
    for ending in (".ome.zarr", ".zarr"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return path.with_name(f"{name}.{suffix}.csv")


def cmd_measure(args: argparse.Namespace) -> int:
    """``blockbuster measure``: the object table of a label image (and its image)."""
    from .measurements import measure

    started = time.perf_counter()
    output = Path(args.output) if args.output else _table_next_to(args.labels, "measurements")
    table = measure(args.labels, args.image, channels=args.channels, spacing=args.spacing,
                    channel_axis=args.channel_axis, output=output,
                    progress=False if args.quiet else None)
    print(f"table:  {output}  ({_plural(len(table['label']), 'object')}, "
          f"{len(table)} columns)")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_relate(args: argparse.Namespace) -> int:
    """``blockbuster relate``: the parent of each child, children per parent."""
    from .relations import relate

    started = time.perf_counter()
    output = Path(args.output) if args.output else _table_next_to(args.children, "relations")
    distance, unit = args.max_distance if args.max_distance is not None else (None, None)
    result = relate(args.children, args.parents, max_distance=distance, unit=unit,
                    spacing=args.spacing, progress=False if args.quiet else None)
    children_path, parents_path = result.write(output)
    kids = result.children
    held = int((kids["parent"] > 0).sum())
    near = int(((kids["parent"] > 0) & (kids["overlap_voxels"] == 0)).sum())
    print(f"children: {children_path}  ({_plural(len(kids['label']), 'child')}: {held:,} with a "
          f"parent, {near:,} of them the nearest one)")
    print(f"parents:  {parents_path}  ({_plural(len(result.parents['label']), 'parent')})")
    print(f"time:     {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_postprocess(args: argparse.Namespace) -> int:
    """``blockbuster postprocess``: fill holes, filter by size, expand, into a new output."""
    import tempfile

    from . import postprocess
    from .errors import InputError

    progress = False if args.quiet else None
    steps: list[tuple[str, Any]] = []
    if args.fill_holes:
        steps.append(("fill holes", lambda src, out: postprocess.fill_holes(
            src, output=out, overwrite=True, progress=progress)))
    if args.min_size is not None or args.max_size is not None:
        units = {s[1] for s in (args.min_size, args.max_size) if s is not None}
        if len(units) > 1:
            raise InputError("--min-size and --max-size must use the same unit")
        unit = units.pop()
        low = args.min_size[0] if args.min_size is not None else None
        high = args.max_size[0] if args.max_size is not None else None
        steps.append(("size filter", lambda src, out: postprocess.filter_by_size(
            src, min_size=low, max_size=high, unit=unit, spacing=args.spacing, output=out,
            overwrite=True, progress=progress)))
    if args.expand is not None:
        steps.append(("expand", lambda src, out: postprocess.expand_labels(
            src, args.expand[0], unit=args.expand[1], spacing=args.spacing, output=out,
            overwrite=True, progress=progress)))
    if not steps:
        raise InputError("nothing to do: give --fill-holes, --min-size, --max-size or --expand")
    started = time.perf_counter()
    final = Path(args.output) if args.output else None
    if final is None:
        final = _table_next_to(args.labels, "postprocessed").with_suffix(".zarr")
    if final.exists() and not args.overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(f"output {final} exists; pass overwrite=True to replace it")
    source: Any = args.labels
    with tempfile.TemporaryDirectory(prefix=".blockbuster-", dir=final.parent) as tmp:
        for i, (name, step) in enumerate(steps):
            last = i == len(steps) - 1
            out = final if last else Path(tmp) / f"step{i}.zarr"
            log.info("%s", name)
            result = step(source, out)
            source = out
    meta = _output_meta(result) or {}
    n = meta.get("n_labels")
    print(f"labels: {final}  ({_plural(n, 'object') if isinstance(n, int) else 'objects'}, "
          f"{_format_shape(result.shape)} {result.dtype}; {', '.join(s for s, _ in steps)})")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_upsample(args: argparse.Namespace) -> int:
    """``blockbuster upsample``: nearest-neighbour upsampling of labels, chunk by chunk."""
    from .io import open_image
    from .postprocess import upsample_labels

    started = time.perf_counter()
    factors = args.factors
    if factors is not None and len(factors) == 1:
        factors = factors[0]
    shape = args.shape
    if args.like is not None:
        shape = open_image(args.like).spatial_shape
    output = Path(args.output) if args.output else None
    out = upsample_labels(args.labels, factors, shape=shape, output=output, chunks=args.chunks,
                          overwrite=args.overwrite, progress=False if args.quiet else None)
    where = output or _array_dir(out) or out.store
    print(f"labels: {where}  ({_format_shape(out.shape)} {out.dtype})")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK
