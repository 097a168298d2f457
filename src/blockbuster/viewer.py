"""A blockbuster output as napari layers, built without napari.

:func:`output_layers` returns napari *LayerData* tuples ``(data, kwargs, layer_type)``: the
input image (when it can still be opened), the labels at their physical scale with the object
table as features, and a points layer at the tile borders the seam report flags. napari is
only needed to show them: ``blockbuster view OUTPUT`` (the ``[napari]`` extra), or napari's own
*File > Open* through the reader this package declares (``napari.yaml``,
:func:`napari_get_reader`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["LayerData", "border_points", "napari_get_reader", "output_layers"]

log = logging.getLogger("blockbuster")

LayerData = tuple[Any, dict[str, Any], str]


def _source_of_input(params: dict[str, Any]) -> Any:
    """The run's input, opened as the run opened it; None when it is gone (or was in memory)."""
    from .io import open_image

    where = params.get("input")
    if not isinstance(where, str) or where.startswith("<in-memory"):
        return None
    if "://" not in where and not Path(where).exists():
        return None
    options = {k: params[k] for k in ("series", "channels") if params.get(k) is not None}
    if params.get("level"):
        options["level"] = params["level"]
    # An OME-Zarr's dataset is its level's array, whose calibration lives in the image's
    # metadata: opened as an image first, and through the dataset when that is not the input.
    tries = [options, {**options, "dataset": params["dataset"]}] if params.get("dataset") \
        else [options]
    error: Exception | None = None
    for opts in tries:
        try:
            source = open_image(where, params.get("channel_axis"), **opts)
        except Exception as exc:  # noqa: BLE001 -- the labels are still worth showing alone
            error = exc
            continue
        if list(source.shape) == list(params.get("shape", source.shape)):
            return source
    log.warning("the run's input %s cannot be opened as it was (%s); showing the labels alone",
                where, error or "another shape")
    return None


def _labels_scale(path: Path, ndim: int, source: Any) -> tuple[list[float], list[float]]:
    """Scale and translation of the labels: the input's calibration, else the labels' own."""
    if source is not None and len(source.label_axes) == ndim:
        return ([float(a.scale) for a in source.label_axes],
                [float(a.translation) for a in source.label_axes])
    with contextlib.suppress(Exception):  # an OME-Zarr label image carries its calibration
        from .io import open_image

        own = open_image(path)
        if len(own.axes) == ndim:
            return [float(a.scale) for a in own.axes], [float(a.translation) for a in own.axes]
    return [1.0] * ndim, [0.0] * ndim


def border_points(seams: dict[str, Any] | None, params: dict[str, Any],
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The middle of each border the seam report lists among the worst, in voxels of the
    tiled axes, and its figures (features).

    Examples
    --------
    >>> seams = {"worst": [{"tile_a": 0, "tile_b": 1, "axis": "x", "position": 64,
    ...                     "objects": 9, "orphans": 5, "p_value": 1e-4, "flagged": True}]}
    >>> params = {"tile_chunks": [[64, 64], [64, 64]]}
    >>> points, features = border_points(seams, params)
    >>> points.tolist(), features["orphans"].tolist()
    ([[31.5, 64.0]], [5])
    """
    from .tiling import TileGrid

    worst = (seams or {}).get("worst") or []
    chunks = params.get("tile_chunks")
    names = ("tile_a", "tile_b", "objects", "orphans")
    features: dict[str, np.ndarray] = {n: np.zeros(0, np.int64) for n in names}
    if not worst or not chunks:
        return np.zeros((0, len(chunks or ())), float), features
    shape = tuple(int(sum(c)) for c in chunks)
    grid = TileGrid(shape, tuple(tuple(c) for c in chunks))
    points = []
    for w in worst:
        core = grid.tile(int(w["tile_a"])).core
        point = [(s.start + s.stop - 1) / 2 for s in core]
        moved = [ax for ax, (ca, cb) in enumerate(zip(
            core, grid.tile(int(w["tile_b"])).core, strict=True)) if ca != cb]
        if moved:
            point[moved[0]] = float(w["position"])
        points.append(point)
    features = {n: np.array([int(w[n]) for w in worst], np.int64) for n in names}
    features["orphan_rate"] = np.array([w["orphans"] / max(1, w["objects"]) for w in worst])
    features["axis"] = np.array([str(w["axis"]) for w in worst])
    return np.array(points, float), features


def _table_features(status: Any) -> dict[str, np.ndarray] | None:
    """The object table as napari features of the labels (``index``: the label)."""
    from .table import read_object_table

    table = status.table
    if not table or not Path(table).exists():
        return None
    try:
        columns = read_object_table(table)
    except Exception as exc:  # noqa: BLE001 -- a damaged table must not hide the labels
        log.warning("the object table %s cannot be read (%s)", table, exc)
        return None
    if "label" not in columns:
        return None
    return {"index": columns["label"], **{k: v for k, v in columns.items() if k != "label"}}


def output_layers(path: str | Path, *, image: bool = True) -> list[LayerData]:
    """The napari layers of a complete blockbuster output (see the module).

    Parameters
    ----------
    path : path
        The labels (a zarr array, an OME-Zarr label image, ``<image>/labels/<name>``).
    image : bool
        Also the run's input, when it can still be opened (lazily: nothing is read here).

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``"image"`` (the input), ``"labels"`` (with ``features``: the object table, when the run
        wrote one) and ``"points"`` (``"seam borders"``: the flagged tile borders, with their
        figures as features), each with the physical ``scale`` and ``translate``.
    """
    import dask.array as da

    from .status import open_labels, output_status

    path = Path(path)
    status = output_status(path)
    if not status.complete:
        raise InputError(f"{path} is not a complete blockbuster output")
    labels = open_labels(path)
    params = status.params
    source = _source_of_input(params) if image else None
    scale, translate = _labels_scale(path, labels.ndim, source)
    layers: list[LayerData] = []
    if source is not None:
        data = source.to_dask()
        kwargs: dict[str, Any] = {"name": path.name.removesuffix(".zarr") + " image",
                                  "blending": "additive"}
        ch = source.channel_axis
        keep = [i for i in range(len(source.axes)) if i != ch]
        kwargs["scale"] = [float(source.axes[i].scale) for i in keep]
        kwargs["translate"] = [float(source.axes[i].translation) for i in keep]
        if ch is not None:
            kwargs["channel_axis"] = ch
        layers.append((data, kwargs, "image"))
    label_kwargs: dict[str, Any] = {"name": path.name.removesuffix(".zarr"), "scale": scale,
                                    "translate": translate,
                                    "metadata": {"blockbuster": {"params": params,
                                                                 "report": status.report}}}
    features = _table_features(status)
    if features is not None:
        label_kwargs["features"] = features
    layers.append((da.from_zarr(labels), label_kwargs, "labels"))
    report = status.report or {}
    points, point_features = border_points(report.get("seams"), params)
    if len(points) and points.shape[1] == labels.ndim:
        pscale = list(scale)
        layers.append((points, {"name": "seam borders", "scale": pscale,
                                "translate": translate, "features": point_features,
                                "face_color": "red", "size": 10, "symbol": "cross"},
                       "points"))
    return layers


def napari_get_reader(path: Any) -> Any:
    """napari's reader hook: a function that opens ``path`` if it is a blockbuster output."""
    from .status import output_status

    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        status = output_status(str(path))
    except Exception:  # noqa: BLE001 -- not ours: napari asks the next reader
        return None
    if not (status.written_by_blockbuster and status.complete):
        return None
    return lambda p: output_layers(p[0] if isinstance(p, list) else p)
