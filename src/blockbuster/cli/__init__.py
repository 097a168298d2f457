"""The ``blockbuster`` command: ``segment``, ``info``, ``methods``, ``demo`` and the analysis
commands (``measure``, ``relate``, ``postprocess``, ``upsample``) from a terminal.

The CLI only parses and renders: every command calls the library (the run plan
:func:`blockbuster.plan.make_plan`, :func:`blockbuster.tile_process`,
:func:`blockbuster.status.output_status`, the plugin catalogue
:mod:`blockbuster.plugins.catalog`...) and prints what it returns. One module per command:
:mod:`.segment`, :mod:`.info`, :mod:`.methods`, :mod:`.demo`, :mod:`.analysis`; what they
share is in :mod:`.common` and :mod:`.options`.

Exit codes (the same for every command):

* 0 -- success (``info --check``: the output is complete).
* 1 -- the run failed: tiles failed or exceeded ``--tile-timeout`` (the output is kept
  incomplete, ``--resume`` redoes them), an OS error while the run wrote (disk full,
  permission denied), another run is writing the same output, the job queue refused
  ``--cluster``'s jobs or they kept ending at start, or an unexpected internal error
  (``info --check``: the output is not complete).
* 2 -- bad input: arguments, paths, tile shapes, unknown methods or method parameters, an
  existing output without ``--overwrite``, a ``--resume`` with other arguments, a missing
  optional dependency.
* 130 -- interrupted (Ctrl-C, or SIGTERM during a ``--workers``/``--cluster`` run); an
  interrupted ``segment`` can be finished with ``--resume``.

Errors are one line on stderr (rendered by :meth:`BlockbusterError.cli_message`, which names
the command-line options); ``--verbose`` adds the traceback. Progress and INFO messages go to
stderr (``--quiet`` silences them); results go to stdout, and with ``--json`` stdout holds
exactly one JSON object (an error too: ``{"status": "failed", "error": ..., "exit_code": ...}``).

Nothing heavy is imported at module level: each command imports what it needs.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from .common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    HelpFormatter,
    Parser,
    add_message_options,
    dump_json,
    error_message,
    exit_code_for,
    parse_bytes,
    parse_channels,
    parse_length,
    parse_overlap,
    parse_param,
    parse_size,
    parse_tile_shape,
    setup_logging,
    show_warning,
)
from .demo import DEMO_ZOOM, demo_plan
from .info import guess_channel_axis

__all__ = [
    "DEMO_ZOOM",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "demo_plan",
    "exit_code_for",
    "guess_channel_axis",
    "main",
    "parse_bytes",
    "parse_channels",
    "parse_length",
    "parse_overlap",
    "parse_param",
    "parse_size",
    "parse_tile_shape",
]

COMMANDS = ("segment", "info", "preview", "view", "methods", "demo", "measure", "relate",
            "postprocess", "upsample")

MAIN_EPILOG = """\
examples:
  blockbuster demo                              # synthetic nuclei, segmented in tiles
  blockbuster info brain.ome.zarr               # what a run would do with this image
  blockbuster preview brain.ome.zarr            # tiled vs untiled on a window, in seconds
  blockbuster methods                           # the segmenters and their parameters
  blockbuster segment brain.ome.zarr --table    # labels into the image, plus an object table
  blockbuster segment scan.tif cells.zarr --method cellpose --diameter 30 --gpu
  blockbuster -q segment scan.tif --json        # quiet, the run report as JSON on stdout
  blockbuster info cells.zarr --check           # exit 0 only if the output is complete

-q/--quiet and -v/--verbose go before or after the command.
Run 'blockbuster COMMAND --help' for the options of a command.

""" + EXIT_CODES_HELP


def build_parser() -> Parser:
    """The ``blockbuster`` argument parser with all its commands.

    Examples
    --------
    >>> args = build_parser().parse_args(["-q", "segment", "in.zarr", "--tile-shape", "1,64,64"])
    >>> args.command, args.input, args.tile_shape, args.method, args.quiet
    ('segment', 'in.zarr', (1, 64, 64), 'watershed', True)
    """
    from .. import __version__
    from .analysis import add_analysis_commands
    from .demo import add_demo_command
    from .info import add_info_command
    from .methods import add_methods_command
    from .preview import add_preview_command
    from .segment import add_segment_command
    from .view import add_view_command

    parser = Parser(prog=PROG, formatter_class=HelpFormatter, epilog=MAIN_EPILOG,
                    description="Segment microscopy images far larger than memory, tile by "
                                "tile, with seamless stitching.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_message_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_segment_command(commands)
    add_info_command(commands)
    add_preview_command(commands)
    add_view_command(commands)
    add_methods_command(commands)
    add_demo_command(commands)
    add_analysis_commands(commands)
    return parser


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
    command_parser = getattr(args, "parser", parser)
    if unknown:  # reported by the command's parser, so that the hint names its --help
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        print(f"{PROG}: error: choose a command: {', '.join(COMMANDS[:-1])} or {COMMANDS[-1]} "
              f"(see '{PROG} --help')", file=sys.stderr)
        return EXIT_USAGE
    if args.quiet and args.verbose:
        command_parser.error("-q/--quiet and -v/--verbose exclude each other")
    setup_logging(args.quiet, args.verbose)
    wants_json = bool(getattr(args, "json", False))
    args.stdout = sys.stdout
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        # With --json, stdout is the JSON object's alone: anything printed meanwhile (by a
        # plugin, a framework) goes to stderr.
        quiet_stdout = contextlib.redirect_stdout(sys.stderr) if wants_json \
            else contextlib.nullcontext()
        try:
            with quiet_stdout:
                code = int(args.func(args))
        except KeyboardInterrupt as exc:
            print(f"{PROG}: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
            args.json_result = _error_result(exc, "interrupted", code)
        except Exception as exc:  # noqa: BLE001 -- every error becomes a message and an exit code
            during_run = bool(getattr(args, "run_started", False))
            if args.verbose:
                traceback.print_exc(file=sys.stderr)
            message = error_message(exc, during_run=during_run)
            print(f"{PROG}: error: {message}", file=sys.stderr)
            code = exit_code_for(exc, during_run=during_run)
            args.json_result = _error_result(exc, "failed", code, message)
    if wants_json and getattr(args, "json_result", None) is not None:
        args.stdout.write(dump_json(args.json_result) + "\n")
        args.stdout.flush()
    return code


def _error_result(exc: BaseException, status: str, code: int, message: str | None = None
                  ) -> dict[str, Any]:
    """What ``--json`` prints for an error: the run's report so far, when there is one."""
    report = getattr(exc, "report", None)
    result: dict[str, Any] = dict(report.as_dict()) if report is not None else {}
    result.update(status=status, error=message or type(exc).__name__, exit_code=code)
    return result
