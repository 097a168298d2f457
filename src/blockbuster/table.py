"""The object table: voxel count, bounding box and centroid of every final label.

Computed out of core from the per-tile statistics each tile's record holds
(:func:`tile_statistics`, while the tile is segmented): at the end of a run the records are
read one at a time and folded into arrays indexed by final label (:class:`TableBuilder`), so
memory is O(number of objects), never O(image), and the labels are never read back.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["TableBuilder", "read_object_table", "tile_statistics", "write_object_table"]

AXIS_NAMES = "zyx"


def _axis_names(ndim: int) -> list[str]:
    return list(AXIS_NAMES[-ndim:]) if ndim <= 3 else [f"axis{i}" for i in range(ndim)]


def tile_statistics(core: np.ndarray, n: int, region: tuple[slice, ...]) -> dict[str, np.ndarray]:
    """Per local label of a tile's core: bounding box (global, half-open) and coordinate sums.

    ``core`` holds tile-local labels 1..n; ``region`` is where the core lies in the image.

    Examples
    --------
    >>> stats = tile_statistics(np.array([[0, 1], [1, 1]]), 1, (slice(10, 12), slice(0, 2)))
    >>> stats["bbox_lo"][1].tolist(), stats["bbox_hi"][1].tolist(), stats["coord_sum"][1].tolist()
    ([10, 0], [12, 2], [32.0, 2.0])
    """
    from scipy import ndimage

    ndim = core.ndim
    lo = np.zeros((n + 1, ndim), np.int64)
    hi = np.zeros((n + 1, ndim), np.int64)
    for label, box in enumerate(ndimage.find_objects(core, max_label=n), start=1):
        if box is not None:
            lo[label] = [s.start + c.start for s, c in zip(box, region, strict=True)]
            hi[label] = [s.stop + c.start for s, c in zip(box, region, strict=True)]
    sums = np.zeros((n + 1, ndim), np.float64)
    flat = core.ravel()
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = core.shape[axis]
        coord = np.arange(core.shape[axis], dtype=np.float64).reshape(shape) + region[axis].start
        sums[:, axis] = np.bincount(flat, weights=np.broadcast_to(coord, core.shape).ravel(),
                                    minlength=n + 1)[: n + 1]
    return {"bbox_lo": lo, "bbox_hi": hi, "coord_sum": sums}


class TableBuilder:
    """Folds per-tile statistics, mapped to final labels, into one row per object."""

    def __init__(self, n_labels: int, ndim: int):
        self.n = n_labels
        self.ndim = ndim
        self.voxels = np.zeros(n_labels + 1, np.int64)
        self.lo = np.full((n_labels + 1, ndim), np.iinfo(np.int64).max, np.int64)
        self.hi = np.zeros((n_labels + 1, ndim), np.int64)
        self.sums = np.zeros((n_labels + 1, ndim), np.float64)

    def add(self, final: np.ndarray, counts: np.ndarray, stats: dict[str, np.ndarray]) -> None:
        """One tile: ``final[l]`` is the final label of local label ``l``, ``counts[l]`` its
        core voxels, ``stats`` from :func:`tile_statistics`."""
        present = counts[1:] > 0
        if not present.any():
            return
        ids = final[1:][present].astype(np.int64)
        np.add.at(self.voxels, ids, counts[1:][present])
        np.minimum.at(self.lo, ids, stats["bbox_lo"][1:][present])
        np.maximum.at(self.hi, ids, stats["bbox_hi"][1:][present])
        np.add.at(self.sums, ids, stats["coord_sum"][1:][present])

    def columns(self) -> dict[str, np.ndarray]:
        """``label, voxels, bbox_min_<ax>, bbox_max_<ax> (exclusive), centroid_<ax>``."""
        columns: dict[str, np.ndarray] = {"label": np.arange(1, self.n + 1),
                                          "voxels": self.voxels[1:]}
        names = _axis_names(self.ndim)
        for axis, name in enumerate(names):
            columns[f"bbox_min_{name}"] = self.lo[1:, axis]
        for axis, name in enumerate(names):
            columns[f"bbox_max_{name}"] = self.hi[1:, axis]
        for axis, name in enumerate(names):
            columns[f"centroid_{name}"] = self.sums[1:, axis] / np.maximum(self.voxels[1:], 1)
        return columns


def write_object_table(columns: dict[str, np.ndarray], path: Path) -> Path:
    """Write the table as Parquet (``.parquet``, needs pyarrow) or CSV (anything else)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
        return path
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(_format(c) for c in columns.values()), strict=True))
    return path


def _format(column: np.ndarray) -> list:
    if np.issubdtype(column.dtype, np.floating):
        return [f"{v:.3f}" for v in column]
    return column.tolist()


def read_object_table(path: str | Path) -> dict[str, np.ndarray]:
    """Read a table written by :func:`write_object_table` into NumPy columns."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out = {}
    for i, name in enumerate(header):
        values = [r[i] for r in body]
        kind = float if name.startswith("centroid") else int
        out[name] = np.array([kind(v) for v in values], dtype=np.float64 if kind is float else np.int64)
    return out
