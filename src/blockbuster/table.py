"""The object table: voxel count, bounding box and centroid of every final label.

Computed out of core from the per-tile statistics that pass 1 stored in each tile's record: the
records are streamed one at a time and folded into arrays indexed by final label, so memory is
O(number of objects), never O(image).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .stitching import Stitched
from .store import WorkDir
from .tiling import TileGrid

__all__ = ["object_table", "write_object_table", "write_table", "read_object_table"]

AXIS_NAMES = "zyx"


def _axis_names(ndim: int) -> list[str]:
    return list(AXIS_NAMES[-ndim:]) if ndim <= 3 else [f"axis{i}" for i in range(ndim)]


def object_table(work: WorkDir, grid: TileGrid, stitched: Stitched) -> dict[str, np.ndarray]:
    """Columns ``label, voxels, bbox_min_<ax>, bbox_max_<ax> (exclusive), centroid_<ax>``."""
    n, ndim = stitched.n_labels, grid.ndim
    voxels = np.zeros(n + 1, np.int64)
    lo = np.full((n + 1, ndim), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((n + 1, ndim), np.int64)
    sums = np.zeros((n + 1, ndim), np.float64)
    for t in range(grid.n_tiles):
        rec = work.load_record(t)
        n_t = rec.meta["n"]
        if n_t == 0:
            continue
        start = int(stitched.offsets[t])
        ids = stitched.final[start + 1: start + n_t + 1].astype(np.int64)
        counts = rec.get("counts")[1:]
        present = counts > 0
        ids, counts = ids[present], counts[present]
        np.add.at(voxels, ids, counts)
        np.minimum.at(lo, ids, rec.get("bbox_lo")[1:][present])
        np.maximum.at(hi, ids, rec.get("bbox_hi")[1:][present])
        np.add.at(sums, ids, rec.get("coord_sum")[1:][present])
    columns: dict[str, np.ndarray] = {"label": np.arange(1, n + 1), "voxels": voxels[1:]}
    names = _axis_names(ndim)
    for axis, name in enumerate(names):
        columns[f"bbox_min_{name}"] = lo[1:, axis]
    for axis, name in enumerate(names):
        columns[f"bbox_max_{name}"] = hi[1:, axis]
    for axis, name in enumerate(names):
        columns[f"centroid_{name}"] = sums[1:, axis] / np.maximum(voxels[1:], 1)
    return columns


def write_object_table(work: WorkDir, grid: TileGrid, stitched: Stitched, path: Path) -> Path:
    """Write the table as Parquet (``.parquet``, needs pyarrow) or CSV (anything else)."""
    return write_table(object_table(work, grid, stitched), path, float_format=".3f")


def write_table(columns: dict[str, np.ndarray], path: str | Path, *,
                float_format: str | None = None) -> Path:
    """Write NumPy columns as Parquet (``.parquet``, needs pyarrow) or CSV (any other suffix).

    Parameters
    ----------
    columns : dict of str to numpy.ndarray
        Equal-length 1-D columns, in the order they are written.
    path : str or pathlib.Path
        Where to write; the suffix picks the format.
    float_format : str, optional
        CSV only: format of float values (e.g. ``".3f"``); default the shortest text that
        reads back to the same float.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
    >>> _ = write_table({"label": np.array([1, 2]), "mean": np.array([0.1, np.nan])}, path)
    >>> read_object_table(path)
    {'label': array([1, 2]), 'mean': array([0.1, nan])}
    """
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            from .errors import PluginNotInstalledError

            raise PluginNotInstalledError(
                f"writing {path.name} needs pyarrow: pip install \"blockbuster[table]\", or "
                "choose a .csv path") from exc
        pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), path)
        return path
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(_format(c, float_format) for c in columns.values())))
    return path


def _format(column: np.ndarray, float_format: str | None = None) -> list:
    column = np.asarray(column)
    if np.issubdtype(column.dtype, np.floating):
        if float_format is None:
            return [repr(float(v)) for v in column]
        return [f"{v:{float_format}}" for v in column]
    return column.tolist()


def read_object_table(path: str | Path) -> dict[str, np.ndarray]:
    """Read a table written by :func:`write_table` (object tables, measurements, relations).

    CSV columns whose values are all integers come back as int64, the others as float64.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    return {name: _parse_column([r[i] for r in body]) for i, name in enumerate(header)}


def _parse_column(values: list[str]) -> np.ndarray:
    """Integers when every value is one, floats otherwise (``nan`` and ``inf`` included)."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        return np.array([float(v) for v in values], dtype=np.float64)
