"""``blockbuster methods``: the installed segmenters, whether they run here, their parameters."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from .common import EXIT_OK, HelpFormatter, add_json_option, add_message_options

__all__ = ["add_methods_command", "cmd_methods"]

METHODS_EPILOG = """\
examples:
  blockbuster methods                 # every segmenter, its parameters and defaults
  blockbuster methods --quick         # without importing torch / TensorFlow (a lookup only)
  blockbuster methods cellpose        # one segmenter (imports only what it needs)
  blockbuster methods --json          # the same as one JSON object

A segmenter's parameters are given to 'blockbuster segment' with --param KEY=VALUE (values
are read as JSON where they parse) or --params FILE.json. Segmenters come from the
entry-point group 'blockbuster.segmenters' (see the README: "Writing a segmenter plugin").
By default each segmenter's requirements (torch, TensorFlow...) are imported to be sure they
work, which takes a few seconds when they are installed.
"""


def add_methods_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "methods", help="list the segmenters and their parameters",
        formatter_class=HelpFormatter, epilog=METHODS_EPILOG,
        description="List the installed segmenters with their parameters and defaults, and "
                    "say why one cannot run here.")
    cmd.add_argument("names", metavar="NAME", nargs="*",
                     help="only these segmenters (default: all)")
    cmd.add_argument("--quick", action="store_true",
                     help="only look the requirements up, do not import them")
    add_json_option(cmd, "the list")
    add_message_options(cmd)
    cmd.set_defaults(func=cmd_methods, parser=cmd)


@contextlib.contextmanager
def _native_stderr_silenced(silence: bool) -> Iterator[None]:
    """Hide what native libraries write straight to file descriptor 2 while they import
    (TensorFlow's absl start-up lines); an import that fails still says why in its error."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def cmd_methods(args: argparse.Namespace) -> int:
    from ..plugins.catalog import method_catalog

    # TensorFlow's C++ start-up messages would bury the listing (the user's setting wins).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced(not args.verbose and not args.quick):
        catalog = method_catalog(args.names or None, import_check=not args.quick)
    if args.json:
        args.json_result = {"methods": [m.as_dict() for m in catalog]}
        return EXIT_OK
    for m in catalog:
        state = "available" if m.available else f"UNAVAILABLE: {m.problem}"
        print(f"{m.name}: {state}")
        if m.summary:
            print(f"  {m.summary}")
        print(f"  from {m.entry_point} ({m.package})")
        if m.parameters:
            print("  parameters: " + ", ".join(p.describe() for p in m.parameters))
        if m.forwards:
            print(f"  other KEY=VALUE parameters go to the method itself (**{m.forwards})")
    if not catalog:
        print("no segmenter is registered (entry-point group 'blockbuster.segmenters')")
    return EXIT_OK
