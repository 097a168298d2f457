"""``blockbuster preview``: try the tiling on a window before a long run (the library's
:func:`~blockbuster.tilecheck.preview_tiling`); this module parses and renders only."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    EXIT_OK,
    HelpFormatter,
    add_json_option,
    add_message_options,
    ints,
    positive_int,
)
from .options import add_input_options, add_method_options, add_planning_options, make_method

__all__ = ["add_preview_command", "cmd_preview"]

PREVIEW_EPILOG = """\
examples:
  blockbuster preview brain.ome.zarr                       # the busiest 3 x 3 (x 3) tiles
  blockbuster preview brain.ome.zarr --at 40,5000,7000     # the tiles around this voxel
  blockbuster preview scan.tif --method cellpose --gpu --tiles 2 --json

A window of K x K (x K) tiles of the run's own tile grid (tile shape, overlap and stitch mode
as 'segment' would choose them, or as given) is segmented twice through the engine: tiled, as
the run would, and as one tile. The two are compared object by object: F1 (objects matched at
IoU > 0.5), objects fused and split by tiling, and the share of voxels that agree. A PNG shows
the untiled labels beside the tiled ones, with the tile borders and the disagreements in red.
F1 1.000 with nothing fused or split: the tiling changes nothing there.
"""


def add_preview_command(commands: Any) -> None:
    preview = commands.add_parser(
        "preview", help="compare tiled and untiled segmentation on a window, in seconds",
        formatter_class=HelpFormatter, epilog=PREVIEW_EPILOG,
        description="Segment a small window of INPUT tiled and untiled and compare them, to "
                    "check a tiling (tile shape, overlap, stitch mode) before a long run.")
    preview.add_argument("input", metavar="INPUT", help="the image (any format segment reads)")
    preview.add_argument("--at", type=lambda text: ints(text, "--at"), metavar="Z,Y,X",
                         help="centre the window on this voxel (default: the busiest region "
                              "of a low-resolution sample)")
    preview.add_argument("--tiles", type=positive_int, default=3, metavar="K",
                         help="tiles per axis in the window (default: 3)")
    preview.add_argument("--png", metavar="PATH",
                         help="where to write the picture (default: <input>.preview-tiling.png "
                              "in the current folder)")
    preview.add_argument("--stitch", choices=("auto", "faces", "iou", "none"), default="auto",
                         help="stitch mode (default: the method's choice)")
    add_json_option(preview, "the figures")
    add_method_options(preview)
    add_planning_options(preview)
    add_input_options(preview)
    add_message_options(preview)
    preview.set_defaults(func=cmd_preview, parser=preview)


def cmd_preview(args: argparse.Namespace) -> int:
    """``blockbuster preview``: preview_tiling with the command line's options."""
    from ..tilecheck import preview_tiling
    from .options import open_input

    source = open_input(args)
    segmenter = make_method(args, source)
    png = args.png or f"{Path(args.input.rstrip('/')).name}.preview-tiling.png"
    check = preview_tiling(source, segmenter, at=args.at, tiles=args.tiles,
                           tile_shape=args.tile_shape, overlap=args.overlap, stitch=args.stitch,
                           use_gpu=args.gpu, memory=args.memory, png=png, keep_labels=False)
    if args.json:
        args.json_result = check.as_dict()
        return EXIT_OK
    print("\n".join(preview_lines(check.as_dict())))
    return EXIT_OK


def preview_lines(result: dict[str, Any]) -> list[str]:
    """The figures of a preview, as the command prints them."""
    f = result["figures"]
    window = ", ".join(f"{a}:{b}" for a, b in result["window"])
    verdict = ("tiled = untiled: the tiling changes nothing here" if result["identical"]
               else "tiling CHANGES the result: more overlap (--overlap auto finds it) or "
                    "larger tiles")
    lines = [f"window:   [{window}] ({result['method']})",
             f"tiling:   tile shape {tuple(result['tile_shape'])}, overlap "
             f"{tuple(result['overlap'])}, stitch {result['stitch']}",
             f"objects:  {f['n_ref']} untiled, {f['n_out']} tiled; F1 {f['f1']:.3f}, "
             f"{f['fused']} fused, {f['split']} split, {100 * f['voxels_one_to_one']:.2f}% of "
             "the voxels agree",
             f"verdict:  {verdict}"]
    auto = result.get("overlap_auto")
    if auto:
        curve = ", ".join(f"{tuple(c['overlap'])}: F1 {c['f1']:.3f}" for c in auto["curve"])
        lines.append(f"overlap:  auto chose {tuple(auto['chosen'])}"
                     + ("" if auto["found"] else " (none tried was exact)") + f" [{curve}]")
    seams = result.get("seams")
    if seams and seams["verdict"] == "worse than controls":  # a window has few borders: the
        lines.append("seams:    worse than controls")  # comparison above is the real test
    secs = result["seconds"]
    lines.append(f"time:     {secs['tiled']:.1f} s tiled, {secs['untiled']:.1f} s untiled")
    if result.get("png"):
        lines.append(f"picture:  {result['png']}")
    return lines
