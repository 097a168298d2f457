"""``blockbuster measure | relate | postprocess | upsample``: the analysis functions of the
library (:mod:`blockbuster.measurements`, :mod:`blockbuster.relations`,
:mod:`blockbuster.postprocess`) from a terminal."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import (
    EXIT_OK,
    HelpFormatter,
    add_message_options,
    channel_list,
    format_shape,
    ints,
    log,
    parse_length,
    parse_size,
    plural,
)
from .common import (
    spacing as spacing_type,
)

__all__ = ["add_analysis_commands", "cmd_measure", "cmd_postprocess", "cmd_relate",
           "cmd_upsample"]

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

def add_analysis_commands(commands: Any) -> None:
    """The ``measure``, ``relate``, ``postprocess`` and ``upsample`` commands."""
    spacing_help = "voxel size in µm per spatial axis, e.g. 2,0.5,0.5 (default: OME-Zarr metadata)"
    mea = commands.add_parser(
        "measure", help="measure every object (size, position, intensities)",
        formatter_class=HelpFormatter, epilog=MEASURE_EPILOG,
        description="Measure every object of LABELS tile by tile, with the intensities of "
                    "IMAGE, and write a table (CSV, or Parquet for a .parquet path).")
    mea.add_argument("labels", metavar="LABELS", help="labels: a blockbuster output or any "
                                                      "integer zarr array")
    mea.add_argument("--image", metavar="IMAGE", help="intensity image on the same grid")
    mea.add_argument("--channels", type=channel_list, metavar="C,C",
                     help="channels to measure, by index or name (default: all)")
    mea.add_argument("--channel-axis", type=int, metavar="N",
                     help="axis of IMAGE holding channels (default: from OME-Zarr metadata)")
    mea.add_argument("--spacing", type=spacing_type, metavar="Z,Y,X", help=spacing_help)
    mea.add_argument("-o", "--output", metavar="PATH",
                     help="table to write (default: <labels>.measurements.csv)")
    add_message_options(mea)
    mea.set_defaults(func=cmd_measure, parser=mea)

    rel = commands.add_parser(
        "relate", help="which parent object holds each child object",
        formatter_class=HelpFormatter, epilog=RELATE_EPILOG,
        description="Relate the objects of two label images on the same grid: the parent of "
                    "each child, and the number of children per parent.")
    rel.add_argument("children", metavar="CHILDREN", help="child labels (e.g. nuclei, spots)")
    rel.add_argument("parents", metavar="PARENTS", help="parent labels (e.g. cells, nuclei)")
    rel.add_argument("--max-distance", type=parse_length, metavar="D",
                     help="children overlapping no parent get the nearest parent within D "
                          "(e.g. 5um; voxels without a unit)")
    rel.add_argument("--spacing", type=spacing_type, metavar="Z,Y,X", help=spacing_help)
    rel.add_argument("-o", "--output", metavar="PATH",
                     help="children's table (default: <children>.relations.csv); the "
                          "parents' goes next to it as *.parents.csv")
    add_message_options(rel)
    rel.set_defaults(func=cmd_relate, parser=rel)

    post = commands.add_parser(
        "postprocess", help="fill holes, filter by size, expand labels (new output)",
        formatter_class=HelpFormatter, epilog=POSTPROCESS_EPILOG,
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
    post.add_argument("--spacing", type=spacing_type, metavar="Z,Y,X", help=spacing_help)
    post.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    add_message_options(post)
    post.set_defaults(func=cmd_postprocess, parser=post)

    up = commands.add_parser(
        "upsample", help="labels of a lower resolution level at full resolution",
        formatter_class=HelpFormatter, epilog=UPSAMPLE_EPILOG,
        description="Upsample LABELS (nearest neighbour, chunk by chunk) to a larger grid.")
    up.add_argument("labels", metavar="LABELS", help="low-resolution labels")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--factors", type=lambda t: ints(t, "factors"), metavar="F,F",
                        help="integer factor per axis (or one for all)")
    target.add_argument("--shape", type=lambda t: ints(t, "shape"), metavar="Z,Y,X",
                        help="target shape")
    target.add_argument("--like", metavar="IMAGE", help="the full-resolution image: its shape")
    up.add_argument("-o", "--output", metavar="OUTPUT",
                    help="new labels (default: <labels>.upsampled.zarr)")
    up.add_argument("--chunks", type=lambda t: ints(t, "chunks"), metavar="Z,Y,X",
                    help="output chunks (default: the input's)")
    up.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    add_message_options(up)
    up.set_defaults(func=cmd_upsample, parser=up)


def _table_next_to(labels: str, suffix: str) -> Path:
    """``<labels>.<suffix>.csv`` next to the labels (next to the image for OME labels)."""
    from .._labels import sibling_path

    return sibling_path(Path(labels.rstrip("/")), suffix, "csv")


def cmd_measure(args: argparse.Namespace) -> int:
    """``blockbuster measure``: the object table of a label image (and its image)."""
    from ..measurements import measure

    started = time.perf_counter()
    output = Path(args.output) if args.output else _table_next_to(args.labels, "measurements")
    table = measure(args.labels, args.image, channels=args.channels, spacing=args.spacing,
                    channel_axis=args.channel_axis, output=output,
                    progress=False if args.quiet else None)
    print(f"table:  {output}  ({plural(len(table['label']), 'object')}, "
          f"{len(table)} columns)")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_relate(args: argparse.Namespace) -> int:
    """``blockbuster relate``: the parent of each child, children per parent."""
    from ..relations import relate

    started = time.perf_counter()
    output = Path(args.output) if args.output else _table_next_to(args.children, "relations")
    distance, unit = args.max_distance if args.max_distance is not None else (None, None)
    result = relate(args.children, args.parents, max_distance=distance, unit=unit,
                    spacing=args.spacing, progress=False if args.quiet else None)
    children_path, parents_path = result.write(output)
    kids = result.children
    held = int((kids["parent"] > 0).sum())
    near = int(((kids["parent"] > 0) & (kids["overlap_voxels"] == 0)).sum())
    print(f"children: {children_path}  ({plural(len(kids['label']), 'child')}: {held:,} with a "
          f"parent, {near:,} of them the nearest one)")
    print(f"parents:  {parents_path}  ({plural(len(result.parents['label']), 'parent')})")
    print(f"time:     {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_postprocess(args: argparse.Namespace) -> int:
    """``blockbuster postprocess``: fill holes, filter by size, expand, into a new output."""
    import tempfile

    from .. import postprocess
    from ..errors import InputError

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
        from ..errors import OutputExistsError

        raise OutputExistsError(f"output {final} exists; pass overwrite=True to replace it")
    source: Any = args.labels
    with tempfile.TemporaryDirectory(prefix=".blockbuster-", dir=final.parent) as tmp:
        for i, (name, step) in enumerate(steps):
            last = i == len(steps) - 1
            out = final if last else Path(tmp) / f"step{i}.zarr"
            log.info("%s", name)
            result = step(source, out)
            source = out
    from ..output import completion

    meta = completion(result) or {}
    n = meta.get("n_labels")
    print(f"labels: {final}  ({plural(n, 'object') if isinstance(n, int) else 'objects'}, "
          f"{format_shape(result.shape)} {result.dtype}; {', '.join(s for s, _ in steps)})")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_upsample(args: argparse.Namespace) -> int:
    """``blockbuster upsample``: nearest-neighbour upsampling of labels, chunk by chunk."""
    from ..io import open_image
    from ..postprocess import upsample_labels

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
    from .segment import labels_location

    where = output or labels_location(out) or out.store
    print(f"labels: {where}  ({format_shape(out.shape)} {out.dtype})")
    print(f"time:   {time.perf_counter() - started:.1f} s")
    return EXIT_OK
