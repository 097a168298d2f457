"""The seam report: do tile borders look like any other plane of the image?

A tiled run can go wrong at its tile borders only: too little overlap, and ``fn`` predicts an
object differently on the two sides of a border (it is cut, split another way, or missed), so
the labels end abruptly at the border although the object goes on. Every run measures this
from what it has anyway, with no extra pass over the image:

* at each border between two face neighbours, the stitcher's matches say which objects
  touching the border on one side go on, with the same global label, on the other side;
* inside every tile, two *control planes* (the middle of the core, on each tiled axis) are
  measured alike in the tile's task: there the labels are one tile's own, so an object that
  ends there really ends.

For a plane pair (the last plane before a border and the first after it, or the two control
planes), each object touching either plane is counted once per plane it touches
(``objects``). It is *matched* when it goes on across the pair (same label inside a tile; a
match of the stitcher at a border), else it is an *orphan*: it ends exactly there. An object
is *ambiguous* when its footprint on the pair overlaps a partner across with an IoU between
0.2 and the stitcher's threshold, or overlaps two partners (each 20% or more of it).

On a good run the orphan and ambiguity rates at the borders are those of the control planes
(objects end somewhere; the borders are no special place). A border whose orphan rate is far
above it (binomial test) is flagged; a run whose borders, taken together, have far more
orphans or ambiguous objects than its controls gets a warning naming the worst borders. The
report is stored with the output's run report (``report.seams``); :func:`write_seam_table`
writes one row per border.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tiling import Region, Tile, TileGrid

__all__ = ["AMBIGUOUS_IOU", "SeamRecorder", "control_stats", "flag_text", "pair_stats",
           "seam_planes", "write_seam_table"]

#: An object overlapping a partner across a plane pair with an IoU above this, but not above
#: the stitcher's threshold, is ambiguous (and so is one overlapping two partners this much).
AMBIGUOUS_IOU = 0.2
#: A border (or a run's borders taken together) is worse than the controls when its orphans
#: are this unlikely at the control rate (binomial upper tail) ...
P_VALUE = 1e-3
#: ... and its orphan rate is at least this many times the control rate.
RATE_RATIO = 1.5
#: A border this unlikely at the control rate is listed among the worst (not flagged).
SUSPECT_P = 0.05
#: The worst borders kept in the stored report (all of them go to the seam table).
WORST_KEPT = 20
#: Columns of a border row (and of the seam table).
COLUMNS = ("tile_a", "tile_b", "axis", "position", "objects", "matched", "orphans",
           "ambiguous")
# indices of the counts in a stats triple
_OBJ, _ORPH, _AMB = 0, 1, 2


def _labels_of(plane: np.ndarray) -> np.ndarray:
    values = np.unique(plane)
    return values[values > 0].astype(np.int64)


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
    in_a, in_b = _labels_of(va), _labels_of(vb)
    objects = len(in_a) + len(in_b)
    if objects == 0:
        return np.zeros(3, np.int64)
    if la is None or lb is None:
        goes_on_a = np.isin(in_a, in_b)
        goes_on_b = np.isin(in_b, in_a)
    else:
        la, lb = np.asarray(la, np.int64), np.asarray(lb, np.int64)
        real = np.isin(la, in_a) & np.isin(lb, in_b)  # a match of two objects on the planes
        goes_on_a = np.isin(in_a, la[real])
        goes_on_b = np.isin(in_b, lb[real])
    orphans = int((~goes_on_a).sum() + (~goes_on_b).sum())
    ambiguous = _ambiguous(va, vb, threshold)
    return np.array([objects, orphans, ambiguous], np.int64)


def _ambiguous(va: np.ndarray, vb: np.ndarray, threshold: float) -> int:
    """Objects (counted per plane) with a weak IoU partner across, or two partners."""
    both = (va > 0) & (vb > 0)
    if not both.any():
        return 0
    size_a = np.bincount(va)
    size_b = np.bincount(vb)
    key = va[both] * len(size_b) + vb[both]
    keys, inter = np.unique(key, return_counts=True)
    a, b = np.divmod(keys, len(size_b))
    iou = inter / (size_a[a] + size_b[b] - inter)
    weak = (iou > AMBIGUOUS_IOU) & (iou <= threshold)
    flagged_a = set(a[weak].tolist())
    flagged_b = set(b[weak].tolist())
    for side, own, sizes, flagged in ((a, a, size_a, flagged_a), (b, b, size_b, flagged_b)):
        big = inter >= AMBIGUOUS_IOU * sizes[own]
        ids, n = np.unique(side[big], return_counts=True)
        flagged.update(ids[n > 1].tolist())
    return len(flagged_a) + len(flagged_b)


def control_stats(core: np.ndarray, linked_axes: tuple[int, ...], threshold: float,
                  ) -> np.ndarray:
    """Per tiled axis, :func:`pair_stats` of the two planes at the middle of a tile's core.

    Returns an array ``(len(linked_axes), 3)``; a core one voxel deep along an axis has no
    plane pair there (zeros).

    Examples
    --------
    >>> core = np.zeros((4, 6), int); core[:, 1:3] = 1; core[:2, 4:] = 2
    >>> control_stats(core, (0, 1), 0.5).tolist()  # 2 ends between rows 1 and 2, 1 at column 2
    [[3, 1, 0], [1, 1, 0]]
    """
    out = np.zeros((len(linked_axes), 3), np.int64)
    for i, axis in enumerate(linked_axes):
        n = core.shape[axis]
        if n < 2:
            continue
        mid = n // 2
        out[i] = pair_stats(np.take(core, mid - 1, axis=axis), np.take(core, mid, axis=axis),
                            threshold=threshold)
    return out


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
    rows: list[tuple[int, ...]] = field(default_factory=list)
    control: np.ndarray = field(init=False)
    tiles_without_controls: int = 0

    def __post_init__(self) -> None:
        self.control = np.zeros((self.grid.ndim, 3), np.int64)

    def add_control(self, stats: np.ndarray | None) -> None:
        """A tile's control-plane figures (:func:`control_stats`), from its record."""
        if stats is None or not self.active:
            self.tiles_without_controls += 1
            return
        for i, axis in enumerate(self.grid.linked_axes):
            self.control[axis] += np.asarray(stats[i], np.int64)

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
        stats = pair_stats(planes[0], planes[1], la, lb, self.threshold)
        objects, orphans, ambiguous = (int(v) for v in stats)
        self.rows.append((a.id, b.id, axis, int(a.core[axis].stop), objects,
                          objects - orphans, orphans, ambiguous))

    def report(self, axis_names: list[str] | None = None) -> SeamReport | None:
        """The run's seam report (None for a run that matches nothing)."""
        if not self.active:
            return None
        names = axis_names or [str(a) for a in range(self.grid.ndim)]
        return SeamReport.build(np.array(self.rows, np.int64).reshape(-1, len(COLUMNS)),
                                self.control, names, self.grid.linked_axes)


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, p)) if k > 0 else 1.0


def _expected_rate(control: np.ndarray) -> float:
    """The control orphan rate, shrunk a little toward 1/2 so that few controls never give 0."""
    return float((control[_ORPH] + 1) / (control[_OBJ] + 2))


def _worse(k: int, n: int, p: float) -> tuple[bool, float]:
    """Whether ``k`` orphans of ``n`` are worse than rate ``p``, and the p-value."""
    if n == 0:
        return False, 1.0
    pv = _upper_tail(k, n, p)
    return bool(pv < P_VALUE and k / n >= RATE_RATIO * p), pv


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
    def build(cls, rows: np.ndarray, control: np.ndarray, names: list[str],
              linked: tuple[int, ...]) -> SeamReport:
        axes, bad_axes = [], 0
        flags = np.zeros(len(rows), bool)
        excess = np.zeros(len(rows))
        pvalues = np.ones(len(rows))
        for axis in linked:
            mine = rows[:, 2] == axis
            seam = rows[mine][:, [4, 6, 7]].sum(axis=0) if mine.any() else np.zeros(3, np.int64)
            p = _expected_rate(control[axis])
            worse, pv = _worse(int(seam[_ORPH]), int(seam[_OBJ]), p)
            # ambiguous matches (objects cut another way on each side) count as much
            amb_worse, amb_pv = _worse(int(seam[_AMB]), int(seam[_OBJ]),
                                       float((control[axis][_AMB] + 1) / (control[axis][_OBJ] + 2)))
            bad_axes += worse or amb_worse
            for i in np.flatnonzero(mine):
                n, k = int(rows[i, 4]), int(rows[i, 6])
                flags[i], pvalues[i] = _worse(k, n, p)
                excess[i] = k - n * p
            axes.append({
                "axis": names[axis], "borders": int(mine.sum()),
                "seam": {"objects": int(seam[_OBJ]), "orphans": int(seam[_ORPH]),
                         "orphan_rate": _rate(int(seam[_ORPH]), int(seam[_OBJ])),
                         "ambiguous": int(seam[_AMB]),
                         "ambiguous_rate": _rate(int(seam[_AMB]), int(seam[_OBJ]))},
                "control": {"objects": int(control[axis][_OBJ]),
                            "orphans": int(control[axis][_ORPH]),
                            "orphan_rate": _rate(int(control[axis][_ORPH]),
                                                 int(control[axis][_OBJ])),
                            "ambiguous": int(control[axis][_AMB]),
                            "ambiguous_rate": _rate(int(control[axis][_AMB]),
                                                    int(control[axis][_OBJ]))},
                "worse": worse or amb_worse, "orphans_worse": worse,
                "ambiguous_worse": amb_worse, "p_value": float(f"{pv:.3g}"),
                "ambiguous_p_value": float(f"{amb_pv:.3g}")})
        # the worst borders: flagged ones first, then those merely suspect (one border holds
        # few objects: a run can be worse than its controls with no border flagged alone)
        order = np.lexsort((-excess, pvalues))
        suspect = flags | ((pvalues < SUSPECT_P) & (excess > 0))
        worst = [dict(zip(COLUMNS, (int(v) for v in rows[i]), strict=True))
                 | {"axis": names[int(rows[i, 2])], "p_value": float(f"{pvalues[i]:.3g}"),
                    "flagged": bool(flags[i])}
                 for i in order if suspect[i]][:WORST_KEPT]
        verdict = ("no borders" if len(rows) == 0 else
                   "worse than controls" if bad_axes else "clean")
        return cls(verdict, axes, len(rows), int(flags.sum()), worst, rows, flags)

    @property
    def worse(self) -> bool:
        return self.verdict == "worse than controls"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "borders": self.borders, "flagged": self.flagged,
                "axes": self.axes, "worst": self.worst,
                "ambiguous_iou": AMBIGUOUS_IOU, "p_value": P_VALUE, "rate_ratio": RATE_RATIO}


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
        for row, flag in zip(report.table.tolist(), report.flags.tolist(), strict=True):
            rate = row[6] / row[4] if row[4] else math.nan
            row[2] = names[row[2]]
            out.writerow([*row, f"{rate:.4f}", int(flag)])
    return path
