"""blockbuster: segment microscopy images far larger than RAM or GPU memory.

The data flow: :func:`open_image` (:mod:`blockbuster.io`) -> plan the run
(:mod:`blockbuster.plan`, :mod:`blockbuster.tiling`, :mod:`blockbuster.sizing`) -> run ``fn``
per tile (:mod:`blockbuster.tasks`, :mod:`blockbuster.engine`) -> stitch
(:mod:`blockbuster.stitching`) -> write (:mod:`blockbuster.output`); :func:`tile_process`
(:mod:`blockbuster.api`) returns the written zarr array.

The public names below are imported lazily (PEP 562), so ``import blockbuster`` and the command
line start fast; the first use of, e.g., :func:`tile_process` imports dask and zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BlockbusterError,
    ClusterError,
    IncompleteOutputError,
    InputError,
    InputReadError,
    NoGPUError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    PluginNotInstalledError,
    ResumeMismatchError,
    TileError,
    TileFailures,
    TileSizeError,
    WorkDirError,
)

if TYPE_CHECKING:
    from .api import stitch_tiles, tile_process
    from .io import ImageSource, open_image
    from .measurements import MeasurementReducer, measure, tile_measurements
    from .plugins.cellpose import auto_tile_shape_cellpose
    from .postprocess import expand_labels, fill_holes, filter_by_size, upsample_labels
    from .relations import Relations, relate
    from .report import RunReport, run_report
    from .segmenter import MemoryModel, Segmenter
    from .sizing import auto_tile_shape, plan_tile_shape
    from .status import open_labels, output_status
    from .table import read_object_table, write_table
    from .tilecheck import choose_overlap, preview_tiling
    from .tiling import TileGrid

__version__ = "0.1.0"

_LAZY = {
    "ImageSource": "io",
    "open_image": "io",
    "open_labels": "status",
    "output_status": "status",
    "stitch_tiles": "api",
    "tile_process": "api",
    "MeasurementReducer": "measurements",
    "measure": "measurements",
    "tile_measurements": "measurements",
    "expand_labels": "postprocess",
    "fill_holes": "postprocess",
    "filter_by_size": "postprocess",
    "upsample_labels": "postprocess",
    "Relations": "relations",
    "relate": "relations",
    "RunReport": "report",
    "run_report": "report",
    "MemoryModel": "segmenter",
    "Segmenter": "segmenter",
    "auto_tile_shape": "sizing",
    "auto_tile_shape_cellpose": "plugins.cellpose",
    "plan_tile_shape": "sizing",
    "read_object_table": "table",
    "write_table": "table",
    "TileGrid": "tiling",
    "choose_overlap": "tilecheck",
    "preview_tiling": "tilecheck",
}

__all__ = [
    "BlockbusterError",
    "ClusterError",
    "ImageSource",
    "IncompleteOutputError",
    "InputError",
    "InputReadError",
    "MeasurementReducer",
    "MemoryModel",
    "NoGPUError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "PluginNotInstalledError",
    "Relations",
    "ResumeMismatchError",
    "RunReport",
    "Segmenter",
    "TileError",
    "TileFailures",
    "TileGrid",
    "TileSizeError",
    "WorkDirError",
    "auto_tile_shape",
    "auto_tile_shape_cellpose",
    "choose_overlap",
    "expand_labels",
    "fill_holes",
    "filter_by_size",
    "measure",
    "open_image",
    "open_labels",
    "output_status",
    "plan_tile_shape",
    "preview_tiling",
    "read_object_table",
    "relate",
    "run_report",
    "stitch_tiles",
    "tile_measurements",
    "tile_process",
    "upsample_labels",
    "write_table",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockbuster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
