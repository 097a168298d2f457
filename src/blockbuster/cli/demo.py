"""``blockbuster demo``: a synthetic nuclei image, segmented in tiles, with previews."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_OK,
    HelpFormatter,
    add_message_options,
    format_shape,
    log,
    plural,
    shape_2d_3d,
)
from .segment import labels_location

if TYPE_CHECKING:
    import zarr

__all__ = ["DEMO_ZOOM", "DemoPlan", "add_demo_command", "cmd_demo", "demo_plan"]

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



DEMO_EPILOG = """\
examples:
  blockbuster demo                      # 8192 x 8192 nuclei in ./blockbuster-demo
  blockbuster demo /tmp/demo --3d       # a 64 x 768 x 768 volume
  blockbuster demo --shape 4096,4096    # any 2-D or 3-D size
  blockbuster demo --quick              # a tiny image, a few seconds

The demo writes, in OUTPUT_DIR: nuclei.ome.zarr (the image, with the labels in
labels/blockbuster), nuclei.objects.csv (one row per nucleus), nuclei.preview.png (a zoom on a
tile corner) and nuclei.overview.png (the whole image, each nucleus in its label's colour).
It replaces its own files from an earlier demo and touches nothing else. Open the image in
napari (with napari-ome-zarr):
  napari ./blockbuster-demo/nuclei.ome.zarr
"""


def add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="segment a built-in synthetic nuclei image (no download)",
        formatter_class=HelpFormatter, epilog=DEMO_EPILOG,
        description="Make a synthetic fluorescence image of nuclei (OME-Zarr), segment it in "
                    "tiles with the built-in watershed, and write OME-Zarr labels, an object "
                    "table and PNG previews.")
    demo.add_argument("output_dir", metavar="OUTPUT_DIR", nargs="?", default="blockbuster-demo",
                      help="folder for the demo's files (default: ./blockbuster-demo)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--shape", type=shape_2d_3d, metavar="Y,X|Z,Y,X",
                      help=f"image shape (default: {','.join(map(str, DEMO_SHAPE_2D))})")
    size.add_argument("--3d", dest="three_d", action="store_true",
                      help=f"a 3-D volume ({' x '.join(map(str, DEMO_SHAPE_3D))})")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny image that runs in seconds (for tests)")
    add_message_options(demo)
    demo.set_defaults(func=cmd_demo, parser=demo)


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
    from ..api import tile_process
    from ..data import write_synthetic_nuclei
    from ..output import completion
    from ..plugins.catalog import make_segmenter
    from ..sizing import format_bytes

    started = time.perf_counter()
    plan = demo_plan(args.shape, three_d=args.three_d, quick=args.quick)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "nuclei.ome.zarr"
    table_path = folder / "nuclei.objects.csv"
    log.info("writing a synthetic %s uint16 image of nuclei (%s) to %s",
             format_shape(plan.shape), format_bytes(math.prod(plan.shape) * 2), image_path)
    write_synthetic_nuclei(image_path, plan.shape, chunks=plan.chunks, diameter=DEMO_DIAMETER,
                           ome=True, overwrite=True)
    made = time.perf_counter()
    segmenter = make_segmenter("watershed", {"diameter": DEMO_DIAMETER})
    # OME-Zarr input, no output: tile_process writes the labels into the image as
    # labels/blockbuster, with a pyramid, listed so that napari shows them over the image.
    out = tile_process(image_path, segmenter, plan.tile, ome=True, overwrite=True,
                       progress=False if args.quiet else None, table=table_path)
    labels_path = labels_location(out) or image_path / "labels" / "blockbuster"
    segmented = time.perf_counter()
    previews = _demo_previews(image_path, labels_path, out, plan, folder)
    n = (completion(out) or {}).get("n_labels", 0)
    elapsed = time.perf_counter() - started
    print(f"demo done in {elapsed:.1f} s (image {made - started:.1f} s, segmentation "
          f"{segmented - made:.1f} s, previews {elapsed - (segmented - started):.1f} s)")
    print(f"image:    {image_path}  ({format_shape(plan.shape)} uint16, synthetic nuclei)")
    print(f"labels:   {labels_path}  ({n:,} nuclei, OME-Zarr with pyramid, "
          f"{plural(plan.n_tiles, 'tile')} of {format_shape(plan.tile)})")
    print(f"table:    {table_path}")
    print(f"preview:  {previews[0]}  (zoom on a tile corner)")
    print(f"overview: {previews[1]}")
    print(f"view it:  napari {image_path}   (needs napari and napari-ome-zarr)")
    return EXIT_OK


def _demo_previews(image_path: Path, labels_path: Path, out: zarr.Array, plan: DemoPlan,
                   folder: Path) -> tuple[Path, Path]:
    """A full-resolution zoom on a tile corner and a reduced overview, both with the grid."""
    from ..preview import save_preview

    where = "" if len(plan.shape) == 2 else f", plane z={plan.shape[0] // 2}"
    window = _zoom_window(plan.shape, plan.tile, DEMO_ZOOM)
    zoom = save_preview(
        image_path, labels_path, folder / "nuclei.preview.png", tile_grid=out, window=window,
        max_size=DEMO_ZOOM, fill_alpha=0.25,
        caption=f"blockbuster demo: y {window[0].start}-{window[0].stop}, x "
                f"{window[1].start}-{window[1].stop}{where}; yellow = tile borders")
    # The whole image: nuclei a few pixels wide at this scale, filled with their label's
    # colour (outlines would cover them), over the image and the tile grid.
    overview = save_preview(
        image_path, labels_path, folder / "nuclei.overview.png", tile_grid=out,
        fill_alpha=0.85, outlines=False,
        caption=f"{format_shape(plan.shape)}, {plural(plan.n_tiles, 'tile')}{where}; "
                "colours = labels")
    return zoom, overview


