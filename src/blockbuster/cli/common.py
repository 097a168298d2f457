"""What every command shares: argument types, the parser classes, messages, exit codes.

Argument types turn text into values (or an ``argparse.ArgumentTypeError``, a usage error with
exit code 2); nothing here knows how a run works.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "add_message_options",
    "error_message",
    "exit_code_for",
    "format_shape",
    "parse_bytes",
    "parse_channels",
    "parse_length",
    "parse_overlap",
    "parse_param",
    "parse_size",
    "parse_tile_shape",
    "plural",
]

PROG = "blockbuster"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The exit codes, as ``--help`` states them.
EXIT_CODES_HELP = """\
exit codes:
  0    success (info --check: the output is complete)
  1    the run failed: tiles failed or timed out, an OS error while it ran (disk full,
       permission denied), another run writes the same output, the job queue refused the
       jobs; --resume continues it once the cause is fixed (info --check: not complete)
  2    bad input or usage: arguments, paths, unknown methods or parameters, an existing
       output without --overwrite, a --resume with other arguments, a missing extra
  130  interrupted (Ctrl-C; SIGTERM during --workers/--cluster); --resume continues
"""

log = logging.getLogger("blockbuster")


# -- argument types -------------------------------------------------------------------------
def ints(text: str, what: str) -> tuple[int, ...]:
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
    sizes = ints(text, "tile shape")
    for axis, size in enumerate(sizes):
        if size <= 0 and size != -1:
            raise argparse.ArgumentTypeError(
                f"tile shape {text!r}: size {size} on axis {axis} must be positive "
                "(or -1 for the whole axis)"
            )
    return sizes


def parse_overlap(text: str) -> int | str | tuple[int | str, ...]:
    """``--overlap``: one halo for every axis (``N``) or one per spatial axis (``N,N,N``), in
    voxels or as lengths with a unit (``6um``, ``2um,0.5um,0.5um``), or ``auto`` (measured on
    the data).

    Examples
    --------
    >>> parse_overlap("16"), parse_overlap("0,16,16"), parse_overlap("6um")
    (16, (0, 16, 16), '6um')
    >>> parse_overlap("-1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: overlap '-1': halo sizes must be >= 0
    """
    from ..units import is_length

    if text.strip().lower() == "auto":
        return "auto"
    parts = [p.strip() for p in text.split(",")]
    if any(is_length(p) for p in parts):
        values = tuple(p if is_length(p) else ints(p, "overlap")[0] for p in parts)
        return values[0] if len(values) == 1 else values
    sizes = ints(text, "overlap")
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


def int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{text} must be >= {lowest}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0)


def positive_length(text: str) -> float | str:
    """A positive number of voxels, or a length with a unit (``6um``: converted with the
    image's voxel size once it is opened).

    Examples
    --------
    >>> positive_length("12"), positive_length("6um")
    (12.0, '6um')
    """
    from ..units import is_length

    return text.strip() if is_length(text) else positive_float(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def parse_param(text: str) -> tuple[str, Any]:
    """``--param KEY=VALUE``: the value as JSON where it parses (numbers, true, null, lists),
    else as text.

    Examples
    --------
    >>> parse_param("diameter=12"), parse_param("model=cyto3"), parse_param("channels=[1, 2]")
    (('diameter', 12), ('model', 'cyto3'), ('channels', [1, 2]))
    >>> parse_param("threshold=null"), parse_param("name=a=b")
    (('threshold', None), ('name', 'a=b'))
    >>> parse_param("12")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '12' is not KEY=VALUE (e.g. diameter=12)
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. diameter=12)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def params_file(text: str) -> dict[str, Any]:
    """``--params FILE.json``: a JSON object of method parameters."""
    path = Path(text)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"parameter file {text} not found") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read parameter file {text}: "
                                         f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"parameter file {text} is not valid JSON: "
                                         f"{exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise argparse.ArgumentTypeError(f"parameter file {text} must hold one JSON object, "
                                         'e.g. {"diameter": 12}')
    return data


def shape_2d_3d(text: str) -> tuple[int, ...]:
    sizes = ints(text, "shape")
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} must be 2 or 3 positive sizes, e.g. 2048,2048 or 64,512,512"
        )
    return sizes


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


_LENGTH_UNITS = {"": None, "um": 1.0, "µm": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3,
                 "mm": 1e3, "px": None, "vox": None, "voxel": None, "voxels": None}


def parse_length(text: str) -> tuple[float, str]:
    """A distance with an optional unit: ``(value, "um")`` or ``(value, "voxels")``.

    Examples
    --------
    >>> parse_length("5um"), parse_length("250 nm"), parse_length("3")
    ((5.0, 'um'), (0.25, 'um'), (3.0, 'voxels'))
    """
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


def spacing(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing {text!r} must be numbers, e.g. 2,0.5,0.5") \
            from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing {text!r} must be positive")
    return values


def channel_list(text: str) -> list[int | str]:
    """``--channels``: indices (``0,2``) or names (``DAPI,GFP``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("--channels needs at least one channel")
    return [int(p) if p.lstrip("-").isdigit() else p for p in parts]


# -- the parser -----------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-formatted examples in the epilogs; a little wider than the default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_message_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``-q``/``-v``, accepted before the command (``top``) and after it.

    On a command's parser they default to SUPPRESS, so that a ``-q`` given before the command
    is not reset by the command's own defaults.
    """
    default: Any = False if top else argparse.SUPPRESS
    group = parser.add_argument_group("messages") if not top else parser
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress and no INFO messages; warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="debug messages, and the full traceback of an error")


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON object on stdout (nothing else goes "
                             "to stdout; messages stay on stderr)")


# -- messages -------------------------------------------------------------------------------
class LogFormatter(logging.Formatter):
    """``blockbuster: message``; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return f"{PROG}: {message}"


_HANDLER_FLAG = "_blockbuster_cli"


def setup_logging(quiet: bool, verbose: bool) -> None:
    """INFO to stderr by default, WARNING with --quiet, DEBUG with --verbose."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for old in [h for h in log.handlers if getattr(h, _HANDLER_FLAG, False)]:
        log.removeHandler(old)  # main() may run more than once in a process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    setattr(handler, _HANDLER_FLAG, True)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # no second copy through a root handler someone configured
    # dask.distributed is chatty at INFO (scheduler and worker start-up); keep it for --verbose.
    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose else logging.WARNING)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """Python warnings as one log line, without the source line."""
    text = str(message)
    if log.isEnabledFor(logging.DEBUG):
        text = f"{text} ({category.__name__} at {filename}:{lineno})"
    log.warning("%s", text)


def _failed_run_errors() -> tuple[type[BaseException], ...]:
    """The library's errors that mean "the input was fine, the run did not finish"."""
    from .. import errors

    names = ("TileError", "OutputLockedError", "ClusterError", "OutputWriteError")
    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


def exit_code_for(exc: BaseException, *, during_run: bool = False) -> int:
    """The exit code for an error: 1 when the run failed, 2 for bad input, 130 interrupted.

    ``during_run``: the error was raised while the run was writing (after the input, the
    method and the plan were checked): an OS error then is a failed run (disk full, permission
    denied), not bad input.

    Examples
    --------
    >>> from blockbuster.errors import InputError, OutputExistsError, TileError
    >>> exit_code_for(InputError("bad")), exit_code_for(TileError("tile (0, 1) failed"))
    (2, 1)
    >>> exit_code_for(OSError(28, "No space left on device"), during_run=True)
    1
    >>> exit_code_for(OutputExistsError("exists"), during_run=True), exit_code_for(KeyError("x"))
    (2, 1)
    >>> from blockbuster.errors import IncompleteOutputError
    >>> exit_code_for(IncompleteOutputError("deleted during the run"), during_run=True)
    1
    """
    from ..errors import BlockbusterError, IncompleteOutputError

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, _failed_run_errors()):
        return EXIT_FAILED  # the input was fine; the run did not finish
    if during_run and isinstance(exc, IncompleteOutputError):
        return EXIT_FAILED  # the run's own output failed its check (deleted during the run)
    if isinstance(exc, BlockbusterError):
        return EXIT_USAGE  # the library's own checks: arguments, paths, existing outputs
    if isinstance(exc, OSError):
        return EXIT_FAILED if during_run else EXIT_USAGE
    if isinstance(exc, ValueError) and not during_run:
        return EXIT_USAGE
    return EXIT_FAILED


def error_message(exc: BaseException, *, during_run: bool = False) -> str:
    """The message printed for an error (one line, except for a list of failed tiles)."""
    from ..errors import BlockbusterError, TileFailures

    if isinstance(exc, BlockbusterError):
        text = exc.cli_message().strip() or type(exc).__name__
    else:
        text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, TileFailures):
        # The per-tile list is the useful part; the traceback is for --verbose.
        text = text.split("\nTraceback of the first failure:")[0]
        return text + "\n(--verbose shows the traceback of the first failure)"
    first = text.splitlines()[0]
    if isinstance(exc, BlockbusterError):
        return first
    if isinstance(exc, OSError) and during_run:
        return (f"the run failed: {first}; fix the cause (disk space, permissions) and rerun "
                "with --resume to continue it")
    if isinstance(exc, (OSError, ValueError)) and not during_run:
        return first
    return f"internal error: {type(exc).__name__}: {first} (rerun with --verbose for the " \
           "traceback, and please report it)"


# -- rendering ------------------------------------------------------------------------------
def plural(n: int, noun: str) -> str:
    """``1 tile``, ``2 tiles``, ``12,345 objects``.

    Examples
    --------
    >>> plural(1, "tile"), plural(12345, "object")
    ('1 tile', '12,345 objects')
    """
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def format_shape(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape)


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # NumPy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    tolist = getattr(value, "tolist", None)  # NumPy arrays
    return tolist() if callable(tolist) else str(value)


def dump_json(data: Any) -> str:
    """One line of JSON (NumPy values as numbers and lists, paths as text).

    Examples
    --------
    >>> import numpy as np
    >>> dump_json({"n": np.int64(3), "path": Path("a/b"), "shape": (2, 3)})
    '{"n": 3, "path": "a/b", "shape": [2, 3]}'
    """
    return json.dumps(data, default=_json_default)
