"""Stitching: turn tile-local labels into one seamless, globally unique labelling.

Each tile numbers its objects 1..n. Global node ``offset[t] + l`` stands for local label ``l``
of tile ``t``. Pairs of neighbouring tiles are matched from the boundary data their records hold
(never the image, never a second call of ``fn``), giving edges between global nodes. Connected
components of that graph are the final objects, numbered 1..N in order of first appearance
(:func:`solve_labels`, the distributed engine). The serial engine builds the same components
online, tile by tile, with :class:`LabelBook`.

Two modes:

``"faces"``
    Labels that touch across a tile border are merged (voxel adjacency given by
    ``connectivity``, as in :func:`scipy.ndimage.generate_binary_structure`). With a connected
    components ``fn`` this reproduces the whole-image result exactly.
``"iou"``
    Needs a halo. Neighbouring tiles both predicted the region where their padded regions
    overlap; objects whose predictions there have IoU above ``iou_threshold`` are the same
    object. Each voxel keeps the label of the tile whose core holds it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import BlockbusterError, InputError
from .tiling import Region, Tile, TileGrid

__all__ = [
    "STITCH_MODES",
    "LabelBook",
    "apply_changes",
    "boundary_arrays",
    "match_pair",
    "solve_labels",
    "Stitched",
    "label_dtype",
]

STITCH_MODES = ("faces", "iou", "none")


def check_mode(stitch: str, depth: tuple[int, ...], connectivity: int, ndim: int) -> None:
    """Reject bad stitching arguments before any tile runs."""
    if stitch not in STITCH_MODES:
        raise InputError(f"unknown stitch mode {stitch!r}; choose one of {', '.join(STITCH_MODES)}")
    if not 1 <= connectivity <= ndim:
        raise InputError(f"connectivity={connectivity} must be between 1 and {ndim} (spatial axes)")
    if stitch == "iou" and not any(depth):
        raise InputError(
            "stitch='iou' matches objects in the overlap between tiles, but the overlap is 0 on "
            "every axis; pass overlap=<about one object diameter>, or use stitch='faces'"
        )


def label_dtype(n_labels: int) -> np.dtype:
    """uint32 while the labels fit, uint64 beyond."""
    return np.dtype(np.uint32) if n_labels <= np.iinfo(np.uint32).max else np.dtype(np.uint64)


def _face(arr: np.ndarray, axis: int, side: int) -> np.ndarray:
    index = [slice(None)] * arr.ndim
    index[axis] = slice(-1, None) if side else slice(0, 1)
    return arr[tuple(index)]


def _local_region(region: Region, origin: Region) -> Region:
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, origin))


def boundary_arrays(grid: TileGrid, tile: Tile, labels: np.ndarray, mode: str,
                    ) -> dict[str, np.ndarray]:
    """The boundary data a tile keeps for stitching, keyed ``"<axis>_<side>"``.

    ``faces``: ``labels`` is the tile's core; keep its outermost layer on each side that has a
    neighbour. ``iou``: ``labels`` is the whole padded prediction; keep the slab that the
    neighbour across that side also reads (see :meth:`TileGrid.boundary_slab`).
    """
    if mode == "none":
        return {}
    out: dict[str, np.ndarray] = {}
    for axis in range(grid.ndim):
        for side in (0, 1):
            j = tile.index[axis] + (1 if side else -1)
            if not 0 <= j < grid.grid_shape[axis]:
                continue
            if mode == "faces":
                out[f"{axis}_{side}"] = _face(labels, axis, side)
            else:
                slab = grid.boundary_slab(tile, axis, side)
                if slab is not None:
                    out[f"{axis}_{side}"] = labels[_local_region(slab, tile.padded)]
    return out


def _shifted_pairs(a: np.ndarray, b: np.ndarray, axes: list[int], max_moves: int,
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label pairs ``(a[x], b[x + delta])`` for every in-plane shift ``delta`` allowed."""
    pairs = []
    for delta in itertools.product((-1, 0, 1), repeat=len(axes)):
        if sum(1 for d in delta if d) > max_moves:
            continue
        sa = [slice(None)] * a.ndim
        sb = [slice(None)] * b.ndim
        for axis, d in zip(axes, delta):
            n = a.shape[axis]
            sa[axis] = slice(max(0, -d), n - max(0, d))
            sb[axis] = slice(max(0, d), n - max(0, -d))
        va, vb = a[tuple(sa)].ravel(), b[tuple(sb)].ravel()
        keep = (va > 0) & (vb > 0)
        pairs.append((va[keep], vb[keep]))
    return pairs


def _unique_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    va = np.concatenate([p[0] for p in pairs]).astype(np.int64)
    vb = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    if va.size == 0:
        return va, vb
    both = np.unique(np.stack([va, vb], axis=1), axis=0)
    return both[:, 0], both[:, 1]


def _match_faces(a_face: np.ndarray, b_face: np.ndarray, offset: tuple[int, ...],
                 connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    moved = [ax for ax, o in enumerate(offset) if o]
    if len(moved) > connectivity:
        return _unique_pairs([])
    # Both faces are one layer thick along the first moved axis. Along the other moved axes keep
    # only the layer that touches the other tile (a's last and b's first, or the reverse).
    sa = [slice(None)] * a_face.ndim
    sb = [slice(None)] * b_face.ndim
    for ax in moved[1:]:
        sa[ax] = slice(-1, None) if offset[ax] > 0 else slice(0, 1)
        sb[ax] = slice(0, 1) if offset[ax] > 0 else slice(-1, None)
    a, b = a_face[tuple(sa)], b_face[tuple(sb)]
    free = [ax for ax in range(a.ndim) if ax not in moved]
    return _unique_pairs(_shifted_pairs(a, b, free, connectivity - len(moved)))


def _match_iou(a_slab: np.ndarray, a_origin: Region, b_slab: np.ndarray, b_origin: Region,
               region: Region, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    va = a_slab[_local_region(region, a_origin)].ravel().astype(np.int64)
    vb = b_slab[_local_region(region, b_origin)].ravel().astype(np.int64)
    size_a = np.bincount(va)
    size_b = np.bincount(vb)
    both = (va > 0) & (vb > 0)
    if not both.any():
        return _unique_pairs([])
    key = va[both] * (len(size_b)) + vb[both]
    keys, inter = np.unique(key, return_counts=True)
    la, lb = np.divmod(keys, len(size_b))
    iou = inter / (size_a[la] + size_b[lb] - inter)
    keep = iou > threshold
    return la[keep], lb[keep]


def match_pair(grid: TileGrid, a: Tile, b: Tile, offset: tuple[int, ...], a_rec, b_rec,
               mode: str, *, connectivity: int = 1, iou_threshold: float = 0.5,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Local label pairs ``(la, lb)`` that are the same object in tiles ``a`` and ``b``.

    ``offset`` is ``b.index - a.index`` with its first non-zero entry +1 (see
    :meth:`TileGrid.forward_offsets`); ``a_rec``/``b_rec`` are the tiles' records.
    """
    first = next(ax for ax, o in enumerate(offset) if o)
    a_arr, b_arr = a_rec.get(f"{first}_1"), b_rec.get(f"{first}_0")
    if a_arr is None or b_arr is None:
        return _unique_pairs([])
    if mode == "faces":
        return _match_faces(a_arr, b_arr, offset, connectivity)
    region = grid.overlap_region(a, b)
    if region is None:
        return _unique_pairs([])
    a_origin = grid.boundary_slab(a, first, 1)
    b_origin = grid.boundary_slab(b, first, 0)
    return _match_iou(a_arr, a_origin, b_arr, b_origin, region, iou_threshold)


def pairs_for(grid: TileGrid, mode: str, connectivity: int):
    """The neighbour pairs a mode has to match."""
    if mode == "none":
        return iter(())
    if mode == "faces":
        return grid.pairs(max_nonzero=connectivity)
    # IoU: every neighbour whose padded region overlaps ours (diagonals included).
    return ((a, b, off) for a, b, off in grid.pairs() if grid.overlap_region(a, b) is not None)


@dataclass
class Stitched:
    """The solved labelling: per-tile slices of the final map live in ``final``."""

    offsets: np.ndarray  # offsets[t] = global node of tile t's local label 0
    final: np.ndarray  # final[offsets[t] + l] = final label of tile t's local label l
    n_labels: int
    n_local: np.ndarray  # number of local labels of every tile
    #: whether each tile's core holds labels (its output chunk must exist); None: not known
    has_labels: np.ndarray | None = None

    @property
    def dtype(self) -> np.dtype:
        return label_dtype(self.n_labels)


def solve_labels(n_local: np.ndarray, has_core: np.ndarray, edges_a: np.ndarray,
                 edges_b: np.ndarray) -> Stitched:
    """Connected components of the match graph, numbered 1..N by first appearance.

    Parameters
    ----------
    n_local : (n_tiles,) int array
        Number of local labels of every tile (ids 1..n, with halo-only objects in iou mode).
    has_core : (M + 1,) bool array, indexed by global node
        Whether the node has voxels in its tile's core (only those appear in the output).
    edges_a, edges_b : int arrays of global nodes
        Pairs that are the same object.

    Examples
    --------
    Two tiles with two labels each; label 2 of tile 0 continues as label 1 of tile 1:

    >>> n = np.array([2, 2])
    >>> has_core = np.array([False, True, True, False, True, True])
    >>> s = solve_labels(n, has_core, np.array([2]), np.array([4]))
    >>> s.final.tolist(), s.n_labels
    ([0, 1, 2, 0, 2, 3], 3)
    """
    offsets = np.zeros(len(n_local) + 1, dtype=np.int64)
    # node of (t, l) is offsets[t] + l; each tile's local 0 gets a node too, keeping slices simple
    np.cumsum(np.asarray(n_local, dtype=np.int64) + 1, out=offsets[1:])
    n_nodes = int(offsets[-1])
    graph = coo_matrix((np.ones(len(edges_a), dtype=np.int8), (edges_a, edges_b)),
                       shape=(n_nodes, n_nodes))
    _, comp = connected_components(graph, directed=False)
    core_nodes = np.flatnonzero(has_core)
    comps = comp[core_nodes]
    uniq, first, inverse = np.unique(comps, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(uniq) + 1)
    n_labels = len(uniq)
    final = np.zeros(n_nodes, dtype=label_dtype(n_labels))
    final[core_nodes] = rank[inverse.ravel()]
    return Stitched(offsets[:-1], final, n_labels, np.asarray(n_local, dtype=np.int64))


def relabel(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map tile-local ids to final labels through the tile's slice of the final map."""
    return lut[raw]


def sequential_local_labels(labels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Renumber labels to 1..n (0 stays background); also return the voxel count of each.

    Returns ``(local, n, counts)`` with ``local`` as uint32 (uint64 if needed) and
    ``counts[l]`` the voxels of local label ``l`` (``counts[0]``: background). Uses a lookup
    table when the largest id is not much larger than the array (linear time), sorting
    otherwise; labels that are already 1..n (``scipy.ndimage.label``, most watersheds) are only
    cast.

    Examples
    --------
    >>> out, n, counts = sequential_local_labels(np.array([[0, 7, 7], [3, 0, 9]]))
    >>> out.tolist(), n, counts.tolist()
    ([[0, 2, 2], [1, 0, 3]], 3, [2, 1, 2, 1])
    """
    flat = labels.ravel()
    top = int(flat.max(initial=0))
    if top == 0:
        return np.zeros(labels.shape, dtype=np.uint32), 0, np.array([flat.size], np.int64)
    if top <= 4 * flat.size + 1024:
        counts = np.bincount(flat, minlength=top + 1)
        present = counts > 0
        present[0] = False
        n = int(present.sum())
        dtype = label_dtype(n)
        if n == top:  # already sequential: no gather needed (labels are >= 0: a view will do)
            same_size = labels.dtype.itemsize == dtype.itemsize
            return labels.view(dtype) if same_size else labels.astype(dtype), n, counts
        lut = np.zeros(top + 1, dtype=dtype)
        lut[present] = np.arange(1, n + 1)
        return lut[labels], n, np.concatenate([counts[:1], counts[present]])
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if uniq[0] != 0:  # no background voxel at all
        inverse = inverse + 1
        counts = np.concatenate([[0], counts])
    n = len(counts) - 1
    return inverse.astype(label_dtype(n)).reshape(labels.shape), n, counts


def core_counts(labels: np.ndarray, inner: tuple[slice, ...], counts: np.ndarray) -> np.ndarray:
    """Voxel count of every label inside ``labels[inner]``, given the counts of all ``labels``.

    Subtracts the halo's counts (the halo is much smaller than the core).

    Examples
    --------
    >>> labels = np.array([[1, 1, 2], [0, 2, 2]])
    >>> core_counts(labels, (slice(0, 2), slice(1, 3)), np.array([1, 2, 3])).tolist()
    [0, 1, 3]
    """
    out = counts.copy()
    region = [slice(None)] * labels.ndim
    for axis, keep in enumerate(inner):
        size = labels.shape[axis]
        for part in (slice(0, keep.start), slice(keep.stop, size)):
            if part.stop > part.start:
                region[axis] = part
                out -= np.bincount(labels[tuple(region)].ravel(), minlength=len(counts))
        region[axis] = keep  # later axes: only what is inside on this one (no double count)
    return out




class LabelBook:
    """Global labels handed out while tiles arrive one at a time (the serial, one-pass engine).

    A tile's objects that continue an object of an already finished neighbour take that
    object's label; the others get new labels. When one object joins two labels that were both
    handed out already (a U shape closing), the larger label is *absorbed* into the smaller:
    the tiles holding it are rewritten at the end (:meth:`final_changes`), which also closes the
    gaps so the labels end up consecutive, 1..N. The root of every group is its smallest label,
    whatever the order the tiles came in, so replaying the records after a crash rebuilds the
    same book.

    Examples
    --------
    >>> book = LabelBook()
    >>> has_core = np.array([False, True, True])
    >>> book.assign(has_core, np.empty(0, int), np.empty(0, int))[0].tolist()  # first tile
    [0, 1, 2]
    >>> book.assign(has_core, np.array([1, 1]), np.array([1, 2]))  # joins labels 1 and 2
    (array([0, 1, 3]), array([[2, 1]]))
    >>> book.n_labels, book.final_changes()  # label 3 moves into the gap left by 2
    (2, (array([2, 3]), array([1, 2])))
    """

    def __init__(self, max_label: int = int(np.iinfo(np.uint32).max)) -> None:
        self.next_label = 1
        self.max_label = max_label
        self._parent: dict[int, int] = {}  # absorbed label -> a smaller label of its group

    @property
    def n_labels(self) -> int:
        return self.next_label - 1 - len(self._parent)

    def find(self, label: int) -> int:
        root = label
        while root in self._parent:
            root = self._parent[root]
        while label != root:  # path compression
            self._parent[label], label = root, self._parent[label]
        return root

    def union(self, a: int, b: int) -> tuple[int, int] | None:
        """Join two groups; returns ``(absorbed, root)``, or None if already one group."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        lo, hi = min(ra, rb), max(ra, rb)
        self._parent[hi] = lo
        return hi, lo

    def assign(self, has_core: np.ndarray, local: np.ndarray, matched: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Global labels for a tile's local labels ``0..n``, and the merges it caused.

        ``has_core[l]``: local label ``l`` reaches the tile's core (only those are labelled);
        ``(local[i], matched[i])``: local label ``local[i]`` is the same object as global label
        ``matched[i]`` of a finished neighbour.
        """
        glabels = np.zeros(len(has_core), np.int64)
        merges = []
        for l, g in zip(local.tolist(), matched.tolist()):
            if glabels[l] == 0:
                glabels[l] = self.find(g)
            else:
                merged = self.union(int(glabels[l]), g)
                if merged is not None:
                    merges.append(merged)
        if merges:  # labels given out earlier in this loop may have been absorbed since
            glabels = np.array([self.find(int(g)) if g else 0 for g in glabels.tolist()],
                               np.int64)
        new = has_core.copy()
        new[0] = False
        new &= glabels == 0
        n_new = int(new.sum())
        if self.next_label + n_new - 1 > self.max_label:
            raise BlockbusterError(
                f"more than {self.max_label:,} objects: the serial engine numbers objects as "
                "tiles arrive, in uint32; run with a dask client (client=...), whose two-pass "
                "stitching switches to uint64 when needed")
        glabels[new] = np.arange(self.next_label, self.next_label + n_new)
        self.next_label += n_new
        return glabels, np.array(merges, np.int64).reshape(-1, 2)

    def replay(self, glabels: np.ndarray, merges: np.ndarray) -> None:
        """Take back what :meth:`assign` did for a tile finished in an earlier attempt."""
        self.next_label = max(self.next_label, int(glabels.max(initial=0)) + 1)
        for absorbed, root in merges.tolist():
            self.union(absorbed, root)

    def final_changes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(old, new)``: sorted labels that change at the end, and their final values.

        Absorbed labels take their root's final label; the largest roots move into the gaps
        the absorbed labels left, so that the final labels are exactly 1..N.
        """
        n = self.n_labels
        absorbed = sorted(self._parent)
        gaps = [a for a in absorbed if a <= n]
        movers = [r for r in range(n + 1, self.next_label) if r not in self._parent]
        moved = dict(zip(movers, gaps))
        old = sorted(absorbed + movers)
        new = [moved.get(self.find(x), self.find(x)) for x in old]
        return np.array(old, np.int64), np.array(new, np.int64)


def apply_changes(labels: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``labels`` with every value in ``old`` (sorted) replaced by the matching ``new``."""
    if old.size == 0:
        return labels
    index = np.minimum(np.searchsorted(old, labels), old.size - 1)
    hit = old[index] == labels
    out = labels.copy()
    out[hit] = new[index[hit]].astype(labels.dtype, copy=False)
    return out
