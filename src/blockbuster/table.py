"""Object tables: written as CSV or Parquet, read back as NumPy columns.

The run's own table (``tile_process(..., table=True)``) is folded from the per-tile
measurements each tile's record holds (:mod:`blockbuster.measurements`), never by reading the
labels back; :func:`blockbuster.measure` makes one for any label image afterwards.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["read_object_table", "write_object_table", "write_table"]


def write_object_table(columns: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write a run's object table (floats with three decimals in CSV)."""
    return write_table(columns, path, float_format=".3f")


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
        writer.writerows(zip(*(_format(c, float_format) for c in columns.values()), strict=True))
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
