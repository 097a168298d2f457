"""blockbuster: segment microscopy images far larger than RAM or GPU memory.

The data flow: :func:`open_image` -> plan tiles (:mod:`blockbuster.tiling`,
:mod:`blockbuster.sizing`) -> run ``fn`` per tile -> stitch (:mod:`blockbuster.stitching`) ->
write (:func:`tile_process` returns the written zarr array).

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
    NoGPUError,
    OutputExistsError,
    OutputLockedError,
    PluginNotInstalledError,
    ResumeMismatchError,
    TileError,
    TileFailures,
    TileSizeError,
)

if TYPE_CHECKING:
    from .io import ImageSource, open_image
    from .output import open_labels
    from .runner import tile_process
    from .segmenter import MemoryModel, Segmenter
    from .sizing import auto_tile_shape, auto_tile_shape_cellpose, plan_tile_shape
    from .table import read_object_table
    from .tiling import TileGrid

__version__ = "0.1.0"

_LAZY = {
    "ImageSource": "io",
    "open_image": "io",
    "open_labels": "output",
    "tile_process": "runner",
    "MemoryModel": "segmenter",
    "Segmenter": "segmenter",
    "auto_tile_shape": "sizing",
    "auto_tile_shape_cellpose": "sizing",
    "plan_tile_shape": "sizing",
    "read_object_table": "table",
    "TileGrid": "tiling",
}

__all__ = [
    "BlockbusterError",
    "ClusterError",
    "ImageSource",
    "IncompleteOutputError",
    "InputError",
    "MemoryModel",
    "NoGPUError",
    "OutputExistsError",
    "OutputLockedError",
    "PluginNotInstalledError",
    "ResumeMismatchError",
    "Segmenter",
    "TileError",
    "TileFailures",
    "TileGrid",
    "TileSizeError",
    "auto_tile_shape",
    "auto_tile_shape_cellpose",
    "open_image",
    "open_labels",
    "plan_tile_shape",
    "read_object_table",
    "tile_process",
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
