"""The seam report: do tile borders look like any other plane of the image?

A tiled run can go wrong at its tile borders only: too little overlap, and ``fn`` predicts an
object differently on the two sides of a border (it is cut, split another way, or missed), so
the labels end abruptly at the border although the object goes on. Every run measures this
from what it has anyway, with no extra pass over the image:

* at each border between two face neighbours, the stitcher's matches say which objects
  touching the border on one side go on, with the same global label, on the other side;
* inside every tile, *control plane pairs* are measured alike in the tile's task: four pairs
  of neighbouring planes drawn at places that differ from tile to tile, and the two pairs just
  inside its faces, on each tiled axis. There the labels are one tile's own, so an object
  that ends there really ends.

For a plane pair (the last plane before a border and the first after it, or the two control
planes), each object touching either plane is counted once per plane it touches
(``objects``). It is *matched* when it goes on across the pair (same label inside a tile; a
match of the stitcher at a border), else it is an *orphan*: it ends exactly there. An object
is *ambiguous* when its footprint on the pair overlaps a partner across with an IoU between
0.2 and the stitcher's threshold, or overlaps two partners (each 20% or more of it).

On a good run the orphan and ambiguity rates at the borders are those of the control planes
(objects end somewhere; the borders are no special place). A run whose borders, taken
together along an axis, have far more orphans or ambiguous objects than both kinds of control
planes (a one-sided test whose variance is widened by how much the rate varies from plane to
plane; at least :data:`MIN_OBJECTS` objects) gets a warning naming its worst borders; a
border far above the controls on its own is flagged. Comparing with the pairs next to the
faces as well keeps a sample whose objects lie in rows (every border at the same phase of
them) from looking like a bad run. The
report is stored with the output's run report (``report.seams``); :func:`write_seam_table`
writes one row per border.
"""

from __future__ import annotations

import array
import csv
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tiling import Region, Tile, TileGrid

__all__ = ["AMBIGUOUS_IOU", "SeamRecorder", "control_positions", "control_stats", "flag_text",
           "pair_stats", "seam_planes", "stacked_matched_stats", "stacked_pair_stats",
           "write_seam_table"]

#: An object overlapping a partner across a plane pair with an IoU above this, but not above
#: the stitcher's threshold, is ambiguous (and so is one overlapping two partners this much).
AMBIGUOUS_IOU = 0.2
#: A border (or a run's borders taken together) is worse than the controls when its orphans
#: are this unlikely at the control rate (upper tail, the spread from plane to plane
#: included) ...
P_VALUE = 1e-3
#: ... and its orphan rate is at least this many times the control rate.
RATE_RATIO = 1.5
#: A border this unlikely at the control rate is listed among the worst (not flagged).
SUSPECT_P = 0.05
#: Control plane pairs per tile and axis.
CONTROL_PLANES = 4
#: Fewer objects than this at a run's borders along an axis (or at one border) say nothing.
MIN_OBJECTS = 30
#: The worst borders kept in the stored report (all of them go to the seam table).
WORST_KEPT = 20
#: Border rows turned into Python lists at a time when the seam table is written.
TABLE_SLICE = 65_536
#: Borders counted together, at most (and at most this many voxels of planes held for it).
BORDER_BATCH = 256
BORDER_BATCH_VOXELS = 2**18
#: Columns of a border row (and of the seam table).
COLUMNS = ("tile_a", "tile_b", "axis", "position", "objects", "matched", "orphans",
           "ambiguous")
# indices of the counts in a stats triple
_OBJ, _ORPH, _AMB = 0, 1, 2
# the control sums a recorder keeps per axis
_CONTROL_SUMS = ("planes", "objects", "orphans", "orphans2_per_object", "ambiguous",
                 "ambiguous2_per_object")


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a sorted ``sorted_set``, by binary search (a tile's
    planes hold a few labels: ``np.isin``'s set-up costs more than the search).

    Examples
    --------
    >>> in_sorted(np.array([3, 1, 9]), np.array([1, 2, 3])).tolist()
    [True, True, False]
    """
    if sorted_set.size == 0:
        return np.zeros(np.shape(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[at] == values


def pair_stats(va: np.ndarray, vb: np.ndarray, la: np.ndarray | None = None,
               lb: np.ndarray | None = None, threshold: float = 0.5) -> np.ndarray:
    """``[objects, orphans, ambiguous]`` of two co-registered label planes.

    ``la, lb``: the label pairs that are one object across the planes (a stitcher's matches);
    None: the planes share one numbering (a label goes on where it appears in both).

    Examples
    --------
    >>> a = np.array([1, 1, 0, 2, 2, 0])
    >>> b = np.array([1, 1, 0, 0, 0, 3])
    >>> pair_stats(a, b).tolist()  # 1 goes on; 2 ends in a, 3 starts in b
    [4, 2, 0]
    >>> pair_stats(a, np.array([7, 7, 0, 0, 0, 0]), np.array([1]), np.array([7])).tolist()
    [3, 1, 0]
    """
    va = np.asarray(va).ravel().astype(np.int64)
    vb = np.asarray(vb).ravel().astype(np.int64)
    if la is None or lb is None:
        return stacked_pair_stats(va[None], vb[None], threshold)[0]
    return stacked_matched_stats(va[None], vb[None], [(la, lb)], threshold)[0]


def stacked_matched_stats(va: np.ndarray, vb: np.ndarray,
                          matches: list[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5,
                          ) -> np.ndarray:
    """:func:`pair_stats` with a stitcher's matches, of many plane pairs at once.

    ``va, vb``: ``(k, m)`` arrays, row ``i`` of each one plane of pair ``i`` (background
    fills shorter planes); ``matches[i]``: the label pairs ``(la, lb)`` matched across pair
    ``i``. A label goes on where it is matched with one on the other plane. Returns ``(k, 3)``.

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 2, 2, 0], [1, 1, 0, 2, 2, 0]])
    >>> b = np.array([[7, 7, 0, 0, 0, 0], [7, 7, 0, 8, 8, 0]])
    >>> stacked_matched_stats(a, b, [(np.array([1]), np.array([7]))] * 2).tolist()
    [[3, 1, 0], [4, 2, 0]]
    """
    va = np.asarray(va, np.int64)
    vb = np.asarray(vb, np.int64)
    k = va.shape[0]
    la = [np.asarray(m[0], np.int64).ravel() for m in matches]
    lb = [np.asarray(m[1], np.int64).ravel() for m in matches]
    if va.size == 0:
        return np.zeros((k, 3), np.int64)
    span = 1 + max(int(va.max()), int(vb.max()),
                   *(int(x.max()) for x in (*la, *lb) if x.size))
    out, ua, ub = _stacked(va, vb, threshold, span)
    row = np.repeat(np.arange(k, dtype=np.int64) * span, [len(x) for x in la])
    keys_a, keys_b = np.concatenate(la) + row, np.concatenate(lb) + row
    real = in_sorted(keys_a, ua) & in_sorted(keys_b, ub)  # a match of two objects on the planes
    goes_on_a = in_sorted(ua, np.sort(keys_a[real]))
    goes_on_b = in_sorted(ub, np.sort(keys_b[real]))
    out[:, _ORPH] = _per_row(ua[~goes_on_a], span, k) + _per_row(ub[~goes_on_b], span, k)
    return out


def control_positions(n: int, tile_id: int, axis: int, planes: int = CONTROL_PLANES,
                      ) -> np.ndarray:
    """Where a tile's control plane pairs lie along an axis of ``n`` voxels: ``p`` stands for
    the pair ``(p - 1, p)``.

    The positions vary from tile to tile (the same in every run): borders all lie at one
    phase of the tile grid, so controls at one fixed place in every tile could all fall where
    a regular structure of the sample (cells in rows, a lattice) happens to end, or never.
    Each tile takes one of ``_DRAWS`` draws per axis length, by a hash of its id and axis.

    Examples
    --------
    >>> control_positions(64, 3, 0).tolist() == control_positions(64, 3, 0).tolist()
    True
    >>> len(control_positions(64, 3, 0)), control_positions(2, 0, 0).tolist()
    (4, [1])
    """
    if n < 2:
        return np.zeros(0, np.int64)
    draws = _control_draws(n, min(planes, n - 1))
    # Knuth's multiplicative hash: neighbouring tiles take unrelated draws
    return draws[((int(tile_id) * 2 + int(axis)) * 2654435761 >> 7) % _DRAWS]


#: Distinct control position draws per axis length.
_DRAWS = 251


@functools.lru_cache(maxsize=64)
def _control_draws(n: int, k: int) -> np.ndarray:
    """``_DRAWS`` sorted draws of ``k`` distinct positions in ``1 .. n - 1`` (fixed seed)."""
    rng = np.random.default_rng([n, k, 0x5EA4])
    draws = np.array([np.sort(rng.choice(np.arange(1, n), size=k, replace=False))
                      for _ in range(_DRAWS)], np.int64)
    draws.flags.writeable = False
    return draws


def control_stats(core: np.ndarray, linked_axes: tuple[int, ...], threshold: float,
                  tile_id: int = 0, planes: int = CONTROL_PLANES) -> np.ndarray:
    """Per tiled axis, :func:`pair_stats` of a tile's control plane pairs.

    Returns an array ``(len(linked_axes), planes + 2, 3)``: first the ``planes`` pairs drawn
    inside the core (:func:`control_positions`), then the two pairs just inside its faces
    (planes 0 and 1, and the last two), which lie a plane away from the borders. Pairs an axis
    does not have are zeros.

    Examples
    --------
    >>> core = np.zeros((4, 6), int); core[:, 1:3] = 1; core[:2, 4:] = 2
    >>> stats = control_stats(core, (0, 1), 0.5, planes=1)
    >>> stats.shape, stats[0, 1:].tolist()  # along y: rows 0|1 and 2|3
    ((2, 3, 3), [[4, 0, 0], [2, 0, 0]])
    >>> stats[1, 1:].tolist()  # along x: columns 0|1 (1 starts), columns 4|5 (2 goes on)
    [[1, 1, 0], [2, 0, 0]]
    """
    out = np.zeros((len(linked_axes), planes + 2, 3), np.int64)
    core = np.asarray(core)
    where: list[tuple[int, int]] = []
    before: list[np.ndarray] = []
    after: list[np.ndarray] = []
    for i, axis in enumerate(linked_axes):
        n = core.shape[axis]
        if n < 2:
            continue
        drawn = control_positions(n, tile_id, axis, planes).tolist()
        positions = np.array([*drawn, *[0] * (planes - len(drawn)), 1, n - 1], np.int64)
        present = np.flatnonzero(positions)
        where += [(i, j) for j in present.tolist()]
        for planes_at, shift in ((before, 1), (after, 0)):
            stack = np.moveaxis(np.take(core, positions[present] - shift, axis=axis), axis, 0)
            planes_at.append(stack.reshape(len(present), -1))
    if where:
        # every pair of every axis at once (background fills the shorter planes): a tile
        # costs a few NumPy calls, not a few per pair
        width = max(p.shape[1] for p in before)
        va, vb = (np.concatenate([_pad_columns(p, width) for p in side])
                  for side in (before, after))
        stats = stacked_pair_stats(va, vb, threshold)
        rows, cols = zip(*where, strict=True)
        out[list(rows), list(cols)] = stats
    return out


def _pad_columns(planes: np.ndarray, width: int) -> np.ndarray:
    if planes.shape[1] == width:
        return planes
    return np.pad(planes, ((0, 0), (0, width - planes.shape[1])))


def stacked_pair_stats(va: np.ndarray, vb: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """:func:`pair_stats` (one numbering, no matches) of many plane pairs at once.

    ``va, vb``: ``(k, m)`` arrays, row ``i`` of each one plane of pair ``i``; returns ``(k,
    3)``. A label is keyed by its row (``row * L + label``), so that one ``np.unique`` serves
    every pair.

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 2, 2, 0], [1, 1, 0, 2, 2, 0]])
    >>> b = np.array([[1, 1, 0, 0, 0, 3], [1, 1, 0, 2, 2, 0]])
    >>> stacked_pair_stats(a, b).tolist()
    [[4, 2, 0], [4, 0, 0]]
    """
    va = np.asarray(va, np.int64)
    vb = np.asarray(vb, np.int64)
    if va.size == 0:
        return np.zeros((va.shape[0], 3), np.int64)
    return _stacked(va, vb, threshold, int(max(va.max(), vb.max())) + 1)[0]


def _stacked(va: np.ndarray, vb: np.ndarray, threshold: float, span: int,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`stacked_pair_stats` of non-empty int64 planes with labels below ``span``, and
    the row-keyed labels present in ``va`` and ``vb`` (sorted)."""
    k = va.shape[0]
    out = np.zeros((k, 3), np.int64)
    row = np.arange(k, dtype=np.int64)[:, None] * span
    keys_a, keys_b = (row + va)[va > 0], (row + vb)[vb > 0]
    ua, size_a = np.unique(keys_a, return_counts=True)
    ub, size_b = np.unique(keys_b, return_counts=True)
    out[:, _OBJ] = _per_row(ua, span, k) + _per_row(ub, span, k)
    goes_on_a, goes_on_b = in_sorted(ua, ub), in_sorted(ub, ua)
    out[:, _ORPH] = _per_row(ua[~goes_on_a], span, k) + _per_row(ub[~goes_on_b], span, k)
    both = (va > 0) & (vb > 0)
    if both.any():
        # the pairs of a label in a and one in b that overlap, keyed by both (row in a's key)
        keys, inter = np.unique((row + va)[both] * span + vb[both], return_counts=True)
        key_a = keys // span
        key_b = key_a - key_a % span + keys % span
        sa = size_a[np.searchsorted(ua, key_a)]
        sb = size_b[np.searchsorted(ub, key_b)]
        iou = inter / (sa + sb - inter)
        weak = (iou > AMBIGUOUS_IOU) & (iou <= threshold)
        flagged = [np.unique(np.concatenate([own[weak], _shared(own, inter >= AMBIGUOUS_IOU
                                                                 * size)]))
                   for own, size in ((key_a, sa), (key_b, sb))]
        out[:, _AMB] = _per_row(flagged[0], span, k) + _per_row(flagged[1], span, k)
    return out, ua, ub


def _per_row(keys: np.ndarray, span: int, k: int) -> np.ndarray:
    """How many of the row-keyed labels ``keys`` lie in each of ``k`` rows."""
    return np.bincount(keys // span, minlength=k)


def _shared(own: np.ndarray, big: np.ndarray) -> np.ndarray:
    """The labels of ``own`` that cover a large part of two or more partners."""
    ids, n = np.unique(own[big], return_counts=True)
    return ids[n > 1]


def _plane(arr: np.ndarray, origin: Region, axis: int, at: int, core: Region) -> np.ndarray:
    """The plane ``at`` (along ``axis``) of ``arr`` (which covers ``origin``), within ``core``
    on the other axes."""
    index = []
    for ax, (o, c) in enumerate(zip(origin, core, strict=True)):
        index.append(at - o.start if ax == axis else slice(c.start - o.start, c.stop - o.start))
    return arr[tuple(index)]


def seam_planes(grid: TileGrid, numbers_padded: bool, a: Tile, b: Tile, axis: int,
                a_arrays: Any, b_arrays: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The last plane of ``a``'s core and the first of ``b``'s, across the border on ``axis``.

    Read from the tiles' boundary arrays: a face (the outer layer of the core) for a stitcher
    that numbers cores, a slab of the padded region for one that numbers padded tiles. None
    when the stitcher keeps no such arrays.
    """
    fa, fb = a_arrays.get(f"{axis}_1"), b_arrays.get(f"{axis}_0")
    if fa is None or fb is None:
        return None
    if not numbers_padded:  # faces: the core's outer layer, in core coordinates
        if fa.shape[axis] != 1 or fb.shape[axis] != 1:
            return None
        return np.take(fa, 0, axis=axis), np.take(fb, 0, axis=axis)
    slab_a = grid.boundary_slab(a, axis, 1)
    slab_b = grid.boundary_slab(b, axis, 0)
    if slab_a is None or slab_b is None:
        return None
    border = a.core[axis].stop
    if not (slab_a[axis].start <= border - 1 < slab_a[axis].stop
            and slab_b[axis].start <= border < slab_b[axis].stop):
        return None
    return (_plane(fa, slab_a, axis, border - 1, a.core),
            _plane(fb, slab_b, axis, border, b.core))


@dataclass
class SeamRecorder:
    """Collects the border and control figures of a run as its tiles are matched.

    Parameters
    ----------
    grid : TileGrid
    numbers_padded : bool
        Whether the run's stitcher numbers padded tiles (its boundary arrays are slabs).
    threshold : float
        The stitcher's IoU threshold (for ambiguity).
    active : bool
        False for a run that stitches nothing (``stitch="none"``): no report.
    """

    grid: TileGrid
    numbers_padded: bool
    threshold: float = 0.5
    active: bool = True
    #: the border rows (``COLUMNS``), flat: 8 numbers per border (a list of tuples would take
    #: ten times the memory on a run of a million tiles)
    rows: array.array = field(init=False)
    control: np.ndarray = field(init=False)
    tiles_without_controls: int = 0
    #: borders whose planes wait to be counted together (see :meth:`add_border`)
    _pending: list[tuple[Any, ...]] = field(init=False, default_factory=list)
    _pending_voxels: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # int32 when every value fits (tile ids, positions, counts): half the memory
        small = max(self.grid.n_tiles, *self.grid.shape) < 2**31
        self.rows = array.array("i" if small else "q")
        self.control = np.zeros((self.grid.ndim, len(_CONTROL_SUMS)), np.float64)
        self.near = np.zeros((self.grid.ndim, len(_CONTROL_SUMS)), np.float64)

    def add_control(self, stats: np.ndarray | None) -> None:
        """A tile's control-plane figures (:func:`control_stats`), from its record.

        Only sums are kept (plane pairs, objects, and per count its sum and its sum of
        squares over objects), enough for the rate and its spread from plane to plane.
        """
        if stats is None or not self.active:
            self.tiles_without_controls += 1
            return
        linked = self.grid.linked_axes
        stats = np.asarray(stats, np.float64).reshape(len(linked), -1, 3)
        for i, axis in enumerate(linked):
            self.control[axis] += _sums(stats[i][:-2])
            self.near[axis] += _sums(stats[i][-2:])

    def add_border(self, a: Tile, b: Tile, offset: tuple[int, ...], a_arrays: Any,
                   b_arrays: Any, la: np.ndarray, lb: np.ndarray) -> None:
        """A matched pair of face neighbours (the stitcher's matches ``la, lb``)."""
        moved = [ax for ax, o in enumerate(offset) if o]
        if not self.active or len(moved) != 1:
            return  # diagonal neighbours share no plane
        axis = moved[0]
        planes = seam_planes(self.grid, self.numbers_padded, a, b, axis, a_arrays, b_arrays)
        if planes is None:
            return
        # counted in batches: a border of small tiles is a few NumPy calls on a few voxels,
        # whose set-up costs far more than the counting (16 x 16 tiles: ~5x)
        va, vb = (np.asarray(p).ravel() for p in planes)
        self._pending.append((a.id, b.id, axis, int(a.core[axis].stop), va, vb, la, lb))
        self._pending_voxels += va.size
        if len(self._pending) >= BORDER_BATCH or self._pending_voxels >= BORDER_BATCH_VOXELS:
            self._count_pending()

    def _count_pending(self) -> None:
        """The border rows of the borders waiting, in the order they came."""
        pending, self._pending, self._pending_voxels = self._pending, [], 0
        if not pending:
            return
        width = max(p[4].size for p in pending)
        va = np.zeros((len(pending), width), np.int64)
        vb = np.zeros((len(pending), width), np.int64)
        for i, p in enumerate(pending):
            va[i, :p[4].size], vb[i, :p[5].size] = p[4], p[5]
        stats = stacked_matched_stats(va, vb, [(p[6], p[7]) for p in pending], self.threshold)
        for p, (objects, orphans, ambiguous) in zip(pending, stats.tolist(), strict=True):
            self.rows.extend((*p[:4], objects, objects - orphans, orphans, ambiguous))

    def report(self, axis_names: list[str] | None = None) -> SeamReport | None:
        """The run's seam report (None for a run that matches nothing)."""
        if not self.active:
            return None
        self._count_pending()
        names = axis_names or [str(a) for a in range(self.grid.ndim)]
        # a copy (a view would stop the rows from growing), in their own width: int32 halves a
        # large run's report
        return SeamReport.build(np.array(self.rows, f"i{self.rows.itemsize}")
                                .reshape(-1, len(COLUMNS)),
                                self.control, self.near, names, self.grid.linked_axes)


def _sums(pairs: np.ndarray) -> np.ndarray:
    """The control sums (``_CONTROL_SUMS``) of plane pairs ``(k, 3)``."""
    pairs = pairs[pairs[:, _OBJ] > 0]
    n = pairs[:, _OBJ]
    return np.array([len(pairs), n.sum(), pairs[:, _ORPH].sum(), (pairs[:, _ORPH] ** 2 / n).sum(),
                     pairs[:, _AMB].sum(), (pairs[:, _AMB] ** 2 / n).sum()])


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


@dataclass(frozen=True)
class _Baseline:
    """A count's rate at the control planes, and how much it varies from plane to plane."""

    rate: float
    dispersion: float

    @classmethod
    def of(cls, sums: np.ndarray, count: int) -> _Baseline:
        """From a recorder's control sums; ``count``: ``_ORPH`` or ``_AMB``."""
        units, n = sums[0], sums[1]
        k, k2n = (sums[2], sums[3]) if count == _ORPH else (sums[4], sums[5])
        rate = float((k + 1) / (n + 2))  # shrunk toward 1/2: a few controls never give 0
        if units < 2 or n == 0:
            return cls(rate, 1.0)
        # Pearson's chi-squared of the planes around the pooled rate, per degree of freedom:
        # objects of one plane are not independent (cells in rows end together), so the
        # binomial spread understates how much a plane's rate varies
        chi2 = (k2n - 2 * rate * k + rate**2 * n) / (rate * (1 - rate))
        return cls(rate, max(1.0, float(chi2 / (units - 1))))

    def test(self, k: int, n: int) -> tuple[bool, float]:
        """Whether ``k`` of ``n`` is worse than the baseline, and the one-sided p-value (a
        normal approximation, the variance widened by the dispersion)."""
        worse, pv = self.test_many(np.array([k]), np.array([n]))
        return bool(worse[0]), float(pv[0])

    def test_many(self, k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`test` of many counts at once (a run of a million tiles has two million
        borders); ``n == 0`` gives p-value 1."""
        # scipy.special, not scipy.stats: stats takes a third of a second to import, at the end
        # of every run; special is already loaded with scipy.ndimage
        from scipy.special import erfc

        k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
        expected = n * self.rate
        spread = np.sqrt(self.dispersion * n * self.rate * (1 - self.rate))
        z = np.divide(k - expected, spread, out=np.full(n.shape, -np.inf), where=n > 0)
        pv = 0.5 * erfc(z / math.sqrt(2))  # the normal upper tail
        return (pv < P_VALUE) & (k >= RATE_RATIO * expected) & (n >= MIN_OBJECTS), pv


def _control_figures(sums: np.ndarray, orphans: _Baseline, ambiguous: _Baseline,
                     ) -> dict[str, Any]:
    n, k_orph, k_amb = int(sums[1]), int(sums[2]), int(sums[4])
    return {"planes": int(sums[0]), "objects": n, "orphans": k_orph,
            "orphan_rate": _rate(k_orph, n), "ambiguous": k_amb,
            "ambiguous_rate": _rate(k_amb, n),
            "dispersion": [round(orphans.dispersion, 3), round(ambiguous.dispersion, 3)]}


@dataclass
class SeamReport:
    """A run's seam report (see the module). ``as_dict()`` is what the run report stores."""

    verdict: str  # "clean", "worse than controls", or "no borders"
    axes: list[dict[str, Any]]
    borders: int
    flagged: int
    worst: list[dict[str, Any]]
    table: np.ndarray
    flags: np.ndarray

    @classmethod
    def build(cls, rows: np.ndarray, control: np.ndarray, near: np.ndarray, names: list[str],
              linked: tuple[int, ...]) -> SeamReport:
        """The report from the border rows and the control sums, per axis, of the planes drawn
        inside the tiles (``control``) and of those next to their faces (``near``).

        An axis is worse than its controls when its borders have more orphans (or ambiguous
        objects) than both kinds of control planes: the drawn ones give the rate anywhere, the
        near ones the rate at the phase of the tile grid (a sample whose objects lie in rows,
        a lattice, can have many objects ending at every border plane without any seam).
        """
        axes, bad_axes = [], 0
        flags = np.zeros(len(rows), bool)
        excess = np.zeros(len(rows))
        pvalues = np.ones(len(rows))
        for axis in linked:
            mine = rows[:, 2] == axis
            seam = rows[mine][:, [4, 6, 7]].sum(axis=0) if mine.any() else np.zeros(3, np.int64)
            n = int(seam[_OBJ])
            verdicts = {}
            for count, key in ((_ORPH, "orphans"), (_AMB, "ambiguous")):
                anywhere, at_faces = _Baseline.of(control[axis], count), \
                    _Baseline.of(near[axis], count)
                worse_a, pv_a = anywhere.test(int(seam[count]), n)
                worse_n, pv_n = at_faces.test(int(seam[count]), n)
                verdicts[key] = (worse_a and worse_n, max(pv_a, pv_n))
                if count == _ORPH:
                    # a border is flagged against the higher of the two rates
                    worst_rate = anywhere if anywhere.rate >= at_faces.rate else at_faces
                    flags[mine], pvalues[mine] = worst_rate.test_many(rows[mine, 6],
                                                                      rows[mine, 4])
                    excess[mine] = rows[mine, 6] - rows[mine, 4] * worst_rate.rate
            worse, amb_worse = verdicts["orphans"][0], verdicts["ambiguous"][0]
            bad_axes += worse or amb_worse
            axes.append({
                "axis": names[axis], "borders": int(mine.sum()),
                "seam": {"objects": n, "orphans": int(seam[_ORPH]),
                         "orphan_rate": _rate(int(seam[_ORPH]), n),
                         "ambiguous": int(seam[_AMB]),
                         "ambiguous_rate": _rate(int(seam[_AMB]), n)},
                "control": _control_figures(control[axis], _Baseline.of(control[axis], _ORPH),
                                            _Baseline.of(control[axis], _AMB)),
                "near_border": _control_figures(near[axis], _Baseline.of(near[axis], _ORPH),
                                                _Baseline.of(near[axis], _AMB)),
                "worse": worse or amb_worse, "orphans_worse": worse,
                "ambiguous_worse": amb_worse,
                "p_value": float(f"{verdicts['orphans'][1]:.3g}"),
                "ambiguous_p_value": float(f"{verdicts['ambiguous'][1]:.3g}")})
        # the worst borders: flagged ones first, then those merely suspect (one border holds
        # few objects: a run can be worse than its controls with no border flagged alone)
        order = np.lexsort((-excess, pvalues))
        suspect = flags | ((pvalues < SUSPECT_P) & (excess > 0))
        worst = [dict(zip(COLUMNS, (int(v) for v in rows[i]), strict=True))
                 | {"axis": names[int(rows[i, 2])], "p_value": float(f"{pvalues[i]:.3g}"),
                    "flagged": bool(flags[i])}
                 for i in order[suspect[order]][:WORST_KEPT].tolist()]
        verdict = ("no borders" if len(rows) == 0 else
                   "worse than controls" if bad_axes else "clean")
        return cls(verdict, axes, len(rows), int(flags.sum()), worst, rows, flags)

    @property
    def worse(self) -> bool:
        return self.verdict == "worse than controls"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "borders": self.borders, "flagged": self.flagged,
                "axes": self.axes, "worst": self.worst,
                "ambiguous_iou": AMBIGUOUS_IOU, "p_value": P_VALUE, "rate_ratio": RATE_RATIO,
                "min_objects": MIN_OBJECTS, "control_planes": CONTROL_PLANES}


def flag_text(seams: dict[str, Any], limit: int = 5) -> str:
    """The warning of a run whose borders look worse than its controls (one paragraph)."""
    parts = []
    for ax in seams.get("axes", []):
        seam, control = ax["seam"], ax["control"]
        if ax.get("orphans_worse", ax.get("worse")):
            parts.append(f"along {ax['axis']} {_pct(seam['orphan_rate'])} of the objects at "
                         f"tile borders end there, {_pct(control['orphan_rate'])} at control "
                         "planes inside tiles")
        if ax.get("ambiguous_worse"):
            parts.append(f"along {ax['axis']} {_pct(seam['ambiguous_rate'])} of them are "
                         f"matched ambiguously, {_pct(control['ambiguous_rate'])} inside tiles")
    worst = seams.get("worst", [])[:limit]
    named = "; ".join(f"tiles {w['tile_a']}|{w['tile_b']} at {w['axis']}={w['position']} "
                      f"({w['orphans']} of {w['objects']} end there)" for w in worst)
    return ("the tile borders look worse than the inside of the tiles: " + ", ".join(parts)
            + (f". Worst borders: {named}" if named else "")
            + ". Objects are probably cut or split at the borders: increase the overlap (about "
              "one object diameter), or check with 'blockbuster preview'.")


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def write_seam_table(report: SeamReport, names: list[str], path: str | Path) -> Path:
    """One row per border (``COLUMNS`` plus rates and a flag) as tab- or comma-separated text
    (``.csv``: commas; anything else: tabs)."""
    path = Path(path)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter=delimiter)
        out.writerow([*COLUMNS, "orphan_rate", "flagged"])
        # in slices: Python lists of a million tiles' borders would take about a gigabyte
        for start in range(0, len(report.table), TABLE_SLICE):
            part = slice(start, start + TABLE_SLICE)
            for row, flag in zip(report.table[part].tolist(), report.flags[part].tolist(),
                                 strict=True):
                rate = row[6] / row[4] if row[4] else math.nan
                row[2] = names[row[2]]
                out.writerow([*row, f"{rate:.4f}", int(flag)])
    return path
