"""Stitching: turn tile-local labels into one seamless, globally unique labelling.

Each tile numbers its objects 1..n and keeps a little boundary data in its record. A stitcher
(one per mode: :mod:`~blockbuster.stitching.faces`, :mod:`~blockbuster.stitching.iou`, or none)
matches the objects of neighbouring tiles from those records, never from the image and never
by calling ``fn`` again. :class:`~blockbuster.stitching.labels.LabelBook` turns the matches into
global labels, tile by tile in grid order, the same whoever ran the tiles; at the end, labels
that a later tile joined are rewritten so the final labels are consecutive, 1..N.

Modes:

``"faces"``
    Labels that touch across a tile border are merged (voxel adjacency given by
    ``connectivity``). With a connected components ``fn`` this reproduces the whole-image
    result exactly.
``"iou"``
    Needs a halo. Objects whose predictions in the overlap of two tiles have IoU above
    ``iou_threshold`` are the same object. Each voxel keeps the label of the tile whose core
    holds it.
``"whole"``
    Needs a halo of at least one object diameter for exact results. Objects are matched as
    with ``"iou"``, and each object takes all its voxels from the one tile that saw it best
    (farthest from the cut edges of its read region); the other tiles' versions are dropped.
    For learned models, whose prediction of an object cut by a border differs between tiles.
``"none"``
    Every tile's objects stay distinct.
"""

from __future__ import annotations

from ..errors import InputError
from ..tiling import TileGrid
from .base import NoStitcher, Stitcher, TileBoundary
from .faces import FacesStitcher
from .iou import IouStitcher
from .labels import (
    UINT32_LIMIT,
    LabelBook,
    LabelOverflow,
    apply_changes,
    core_counts,
    label_dtype,
    sequential_local_labels,
)
from .whole import WholeStitcher

__all__ = [
    "STITCH_MODES",
    "UINT32_LIMIT",
    "FacesStitcher",
    "IouStitcher",
    "LabelBook",
    "LabelOverflow",
    "NoStitcher",
    "Stitcher",
    "TileBoundary",
    "WholeStitcher",
    "apply_changes",
    "check_mode",
    "core_counts",
    "label_dtype",
    "make_stitcher",
    "sequential_local_labels",
]

_STITCHERS: dict[str, type[Stitcher]] = {
    "faces": FacesStitcher,
    "iou": IouStitcher,
    "whole": WholeStitcher,
    "none": NoStitcher,
}
STITCH_MODES = tuple(_STITCHERS)


def check_mode(stitch: str, depth: tuple[int, ...], connectivity: int, ndim: int) -> None:
    """Reject bad stitching arguments before any tile runs."""
    if stitch not in STITCH_MODES:
        raise InputError(f"unknown stitch mode {stitch!r}; choose one of {', '.join(STITCH_MODES)}")
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) \
            or not 1 <= connectivity <= ndim:
        raise InputError(f"connectivity={connectivity!r} must be an integer between 1 and {ndim} "
                         "(the number of spatial axes)")
    if stitch in ("iou", "whole") and not any(depth):
        raise InputError(
            f"stitch={stitch!r} matches objects in the overlap between tiles, but the overlap is "
            "0 on every axis; pass overlap=<about one object diameter>, or use stitch='faces'"
        )


def make_stitcher(mode: str, grid: TileGrid, *, connectivity: int = 1,
                  iou_threshold: float = 0.5) -> Stitcher:
    """The stitcher of ``mode`` for ``grid`` (arguments checked by :func:`check_mode`)."""
    check_mode(mode, grid.depth, connectivity, len(grid.linked_axes))
    return _STITCHERS[mode](grid, connectivity=connectivity, iou_threshold=iou_threshold)
