"""Which parent object holds each child object (nucleus -> cell, spot -> nucleus), out of core.

Two label images on the same grid are read tile by tile:

1. **Overlap.** Every tile adds its (child, parent, voxels) overlap counts; at the end each child
   gets the parent it overlaps most. Ties go to the smaller parent label, so the answer never
   depends on the order tiles are read in.
2. **Nearest parent.** Children that overlap no parent get the nearest parent within
   ``max_distance`` (µm with a known voxel size, else voxels). Each tile reads the parents with
   a halo of ``max_distance``, so every parent voxel within reach of a child voxel of the tile's
   core is in view; the tile's nearest candidates are reduced over tiles (smallest distance,
   then smallest label). Distances are between voxel centres, closest pair of voxels, computed
   as ``sqrt(sum((d_i * spacing_i) ** 2))`` (as ``scipy.ndimage.distance_transform_edt`` does).

Memory is a few tiles plus a few numbers per label and per overlapping pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._labels import (
    LabelCounts,
    LabelImage,
    open_label_image,
    renumber,
    resolve_spacing,
    tile_map,
)
from .errors import InputError
from .tiling import TileGrid

__all__ = ["Relations", "closest_pairs_distance", "relate"]

#: Relative slack when selecting tie candidates, far above float rounding of distances.
_TIE_SLACK = 1e-9


@dataclass
class Relations:
    """The answer of :func:`relate`: one table for the children, one for the parents.

    Attributes
    ----------
    children : dict of str to numpy.ndarray
        ``label``, ``voxels``, ``parent`` (0: none), ``overlap_voxels`` (voxels shared with
        that parent; 0 for a nearest parent), ``distance_um`` (or ``distance_voxels`` without
        a voxel size: 0 when overlapping, NaN without parent).
    parents : dict of str to numpy.ndarray
        ``label``, ``voxels``, ``n_children``.
    """

    children: dict[str, np.ndarray]
    parents: dict[str, np.ndarray]

    def write(self, children_path: str | Path, parents_path: str | Path | None = None,
              ) -> tuple[Path, Path]:
        """Write both tables (Parquet or CSV by suffix); parents default to ``*.parents.*``."""
        from .table import write_table

        children_path = Path(children_path)
        if parents_path is None:
            parents_path = children_path.with_name(
                f"{children_path.stem}.parents{children_path.suffix}")
        return write_table(self.children, children_path), write_table(self.parents, parents_path)


# -- overlaps -----------------------------------------------------------------------------------
@dataclass
class _Pass:
    children: LabelImage
    parents: LabelImage
    grid: TileGrid

    def overlaps(self, tile_id: int) -> tuple[np.ndarray, ...]:
        """Voxel counts of the tile's children and parents, and its overlapping pairs."""
        tile = self.grid.tile(tile_id)
        c_local, c_ids = renumber(self.children.read(tile.core))
        p_local, p_ids = renumber(self.parents.read(tile.core))
        c_counts = np.bincount(c_local.ravel(), minlength=len(c_ids))
        p_counts = np.bincount(p_local.ravel(), minlength=len(p_ids))
        both = (c_local > 0) & (p_local > 0)
        keys = c_local[both] * len(p_ids) + p_local[both]
        pairs, n = np.unique(keys, return_counts=True)
        return (c_ids, c_counts, p_ids, p_counts, c_ids[pairs // len(p_ids)],
                p_ids[pairs % len(p_ids)], n.astype(np.int64))


def best_overlaps(child: np.ndarray, parent: np.ndarray, voxels: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per child, the parent with most shared voxels (ties: smaller parent).

    Pairs may repeat (one per tile); they are summed first.

    Examples
    --------
    >>> best_overlaps(np.array([1, 1, 1, 2]), np.array([4, 3, 4, 9]), np.array([2, 5, 3, 1]))
    (array([1, 2]), array([3, 9]), array([5, 1]))
    """
    if not child.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    pairs, inverse = np.unique(np.stack([child, parent]), axis=1, return_inverse=True)
    totals = np.bincount(inverse.ravel(), weights=voxels).astype(np.int64)
    c, p = pairs
    order = np.lexsort((p, -totals, c))  # by child, then most voxels, then smaller parent
    c, p, totals = c[order], p[order], totals[order]
    first = np.r_[True, c[1:] != c[:-1]]
    return c[first], p[first], totals[first]


# -- nearest parents ----------------------------------------------------------------------------
@dataclass
class _Nearest:
    children: LabelImage
    parents: LabelImage
    grid: TileGrid  # with the halo
    orphan: np.ndarray  # dense bool by child label
    spacing: tuple[float, ...]
    max_distance: float

    def tile(self, tile_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per orphan child in the tile's core: (child, distance, parent) of its nearest parent."""
        none = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        tile = self.grid.tile(tile_id)
        children = self.children.read(tile.padded).astype(np.int64, copy=False)
        inner = tile.inner
        core = children[inner]
        top = len(self.orphan) - 1
        wanted = self.orphan[np.minimum(core, top)] & (core <= top)
        if not wanted.any():
            return none
        parents = self.parents.read(tile.padded).astype(np.int64, copy=False)
        if not parents.any():
            return none
        origin = np.array([s.start for s in tile.padded])
        in_core = np.zeros(children.shape, bool)
        in_core[inner] = wanted
        c_where = np.nonzero(boundary(children) & in_core)
        p_where = np.nonzero(boundary(parents) & (parents > 0))
        return nearest_parents(np.stack(c_where, 1) + origin, children[c_where],
                               np.stack(p_where, 1) + origin, parents[p_where],
                               self.spacing, self.max_distance)


def boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another value (inside the array; its edge is not one).

    The closest voxel of an object to anything outside it always has a face neighbour
    outside the object, on the way there, so boundaries are enough for nearest distances.

    Examples
    --------
    >>> boundary(np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])).astype(int).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    edge = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        differ = labels[tuple(lo)] != labels[tuple(hi)]
        edge[tuple(lo)] |= differ
        edge[tuple(hi)] |= differ
    return edge


def closest_pairs_distance(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances between voxel positions ``a[i]`` and ``b[i]`` (integer coordinates) in the
    units of ``spacing``, as ``sqrt(sum((d * s) ** 2))`` in axis order.

    Examples
    --------
    >>> closest_pairs_distance(np.array([[0, 0]]), np.array([[3, 4]]), (1.0, 1.0)).tolist()
    [5.0]
    """
    d = (np.asarray(b, np.int64) - np.asarray(a, np.int64)).astype(np.float64)
    d *= np.asarray(spacing, np.float64)
    d *= d
    return np.sqrt(np.add.reduce(d, axis=1))


def nearest_parents(child_at: np.ndarray, child: np.ndarray, parent_at: np.ndarray,
                    parent: np.ndarray, spacing: Sequence[float], max_distance: float,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per child, the nearest parent within ``max_distance``: ``(children, distances, parents)``.

    ``child_at`` and ``parent_at`` are integer voxel positions of child and parent voxels
    (boundary voxels suffice) with their labels. Ties go to the smaller parent.
    """
    from scipy.spatial import cKDTree

    none = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    if not len(child_at) or not len(parent_at):
        return none
    scale = np.asarray(spacing, np.float64)
    tree = cKDTree(parent_at * scale)
    reach = max_distance * (1 + _TIE_SLACK) + 1e-12
    found, _ = tree.query(child_at * scale, k=1, distance_upper_bound=reach)
    ok = np.isfinite(found)
    if not ok.any():
        return none
    child_at, child, found = child_at[ok], child[ok], found[ok]
    # The closest voxels of each child (a few): every parent voxel at that distance, exactly.
    labels, inverse = np.unique(child, return_inverse=True)
    best = np.full(len(labels), np.inf)
    np.minimum.at(best, inverse, found)
    limit = best[inverse] * (1 + _TIE_SLACK) + 1e-12
    close = found <= limit
    hits = tree.query_ball_point(child_at[close] * scale, limit[close])
    sizes = np.fromiter((len(h) for h in hits), np.int64, len(hits))
    which = np.repeat(np.flatnonzero(close), sizes)
    pidx = np.concatenate([np.asarray(h, np.int64) for h in hits]) if len(hits) else \
        np.zeros(0, np.int64)
    dist = closest_pairs_distance(child_at[which], parent_at[pidx], spacing)
    keep = dist <= max_distance
    c, d, p = child[which][keep], dist[keep], parent[pidx][keep]
    return reduce_nearest(c, d, p)


def reduce_nearest(child: np.ndarray, distance: np.ndarray, parent: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per child, the smallest distance, then the smallest parent label.

    Examples
    --------
    >>> reduce_nearest(np.array([2, 2, 2]), np.array([1.5, 1.0, 1.0]), np.array([3, 8, 4]))
    (array([2]), array([1.]), array([4]))
    """
    if not child.size:
        return child.astype(np.int64), distance.astype(np.float64), parent.astype(np.int64)
    order = np.lexsort((parent, distance, child))
    child, distance, parent = child[order], distance[order], parent[order]
    first = np.r_[True, child[1:] != child[:-1]]
    return child[first], distance[first], parent[first]


# -- the whole thing ----------------------------------------------------------------------------
def relate(children: Any, parents: Any, *, max_distance: float | None = None,
           unit: str | None = None, spacing: float | Sequence[float] | None = None,
           output: str | Path | None = None, tile_shape: Sequence[int] | None = None,
           progress: bool | None = None) -> Relations:
    """The parent object holding each child object, and the number of children per parent.

    Parameters
    ----------
    children, parents : path or array
        Two label images on the same voxel grid (e.g. nuclei and cells, or spots and
        nuclei): blockbuster outputs, integer zarr arrays or arrays in memory.
    max_distance : float, optional
        Children that overlap no parent get the nearest parent within this distance, in
        ``unit``; None: overlap only.
    unit : {"um", "voxels"}, optional
        Unit of ``max_distance`` and of the distance column. Default: µm when the voxel size
        is known, voxels otherwise.
    spacing : float or sequence of float, optional
        Voxel size in µm per axis (default: the OME-Zarr metadata of either image).
    output : path, optional
        Write the children's table there and the parents' next to it (``*.parents.csv``).
    tile_shape : sequence of int, optional
        Tiles to read (default: the children array's chunks).
    progress : bool, optional
        Show progress bars (default: on a terminal).

    Returns
    -------
    Relations
        ``children`` (label, voxels, parent, overlap_voxels, distance) and ``parents``
        (label, voxels, n_children) tables. A child overlapping several parents goes to the
        one it shares most voxels with; ties go to the smaller parent label.

    Examples
    --------
    >>> nuclei = np.array([[1, 1, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0]])
    >>> cells = np.array([[5, 5, 5, 0, 0, 0], [5, 5, 5, 0, 7, 7]])
    >>> r = relate(nuclei, cells, max_distance=1.5, progress=False)
    >>> r.children["parent"].tolist(), r.children["distance_voxels"].tolist()
    ([5, 7], [0.0, 1.0])
    >>> r.parents["label"].tolist(), r.parents["n_children"].tolist()
    ([5, 7], [1, 1])
    """
    kids = open_label_image(children, what="children")
    hosts = open_label_image(parents, what="parents")
    if kids.shape != hosts.shape:
        raise InputError(f"children {kids.shape} and parents {hosts.shape} are not on the same "
                         "grid; relate label images of the same image (upsample a lower "
                         "pyramid level first)")
    spacing_um = resolve_spacing(spacing, kids.ndim, kids.spacing, hosts.spacing)
    if unit not in (None, "um", "voxels"):
        raise InputError(f"unit={unit!r} must be 'um' or 'voxels'")
    if unit == "um" and spacing_um is None:
        raise InputError("unit='um' needs the voxel size: pass spacing= (µm per axis) or use "
                         "labels with OME-Zarr metadata")
    if unit == "voxels":
        spacing_um = None
    if max_distance is not None and not (math.isfinite(max_distance) and max_distance >= 0):
        raise InputError(f"max_distance={max_distance!r} must be a distance >= 0")
    grid = kids.grid(tile_shape)
    child_counts, parent_counts = LabelCounts(), LabelCounts()
    pair_c, pair_p, pair_n = [], [], []
    one = _Pass(kids, hosts, grid)
    for c_ids, c_n, p_ids, p_n, pc, pp, pn in tile_map(one.overlaps, range(grid.n_tiles),
                                                       desc="overlaps", progress=progress):
        child_counts.add(c_ids, c_n)
        parent_counts.add(p_ids, p_n)
        pair_c.append(pc)
        pair_p.append(pp)
        pair_n.append(pn)
    child_labels = child_counts.labels()
    c_best, p_best, n_best = best_overlaps(*(np.concatenate(x) if x else np.zeros(0, np.int64)
                                             for x in (pair_c, pair_p, pair_n)))
    parent_of = np.zeros(len(child_counts.values), np.int64)
    overlap = np.zeros(len(child_counts.values), np.int64)
    distance = np.full(len(child_counts.values), np.nan)
    parent_of[c_best], overlap[c_best], distance[c_best] = p_best, n_best, 0.0
    if max_distance is not None:
        orphan = np.zeros(len(child_counts.values), bool)
        orphan[child_labels] = True
        orphan[c_best] = False
        if orphan.any() and len(parent_counts.labels()):
            c, d, p = _nearest(kids, hosts, grid, orphan, spacing_um, float(max_distance),
                               progress)
            parent_of[c], distance[c] = p, d
    result = _tables(child_labels, child_counts, parent_counts, parent_of, overlap, distance,
                     "distance_um" if spacing_um is not None else "distance_voxels")
    if output is not None:
        result.write(output)
    return result


def _nearest(kids: LabelImage, hosts: LabelImage, grid: TileGrid, orphan: np.ndarray,
             spacing: tuple[float, ...] | None, max_distance: float, progress: bool | None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = spacing or (1.0,) * kids.ndim
    halo = tuple(math.ceil(max_distance / s) for s in scale)
    haloed = TileGrid(grid.shape, grid.chunks, halo)
    ctx = _Nearest(kids, hosts, haloed, orphan, tuple(scale), max_distance)
    found = list(tile_map(ctx.tile, range(haloed.n_tiles), desc="nearest parents",
                          progress=progress))
    return reduce_nearest(*(np.concatenate([f[i] for f in found]) for i in range(3)))


def _tables(child_labels: np.ndarray, child_counts: LabelCounts, parent_counts: LabelCounts,
            parent_of: np.ndarray, overlap: np.ndarray, distance: np.ndarray,
            distance_name: str) -> Relations:
    parent_labels = parent_counts.labels()
    parent = parent_of[child_labels]
    held = np.bincount(parent, minlength=len(parent_counts.values))
    children = {"label": child_labels.astype(np.int64),
                "voxels": child_counts.values[child_labels],
                "parent": parent, "overlap_voxels": overlap[child_labels],
                distance_name: distance[child_labels]}
    parents = {"label": parent_labels.astype(np.int64),
               "voxels": parent_counts.values[parent_labels],
               "n_children": held[parent_labels].astype(np.int64)}
    return Relations(children, parents)
