"""blockbuster: segment microscopy images far larger than RAM or GPU memory.

The data flow: :func:`open_image` -> plan tiles (:mod:`blockbuster.tiling`,
:mod:`blockbuster.sizing`) -> run ``fn`` per tile -> stitch (:mod:`blockbuster.stitching`) ->
write (:func:`tile_process` returns the written zarr array).
"""

from .errors import (
    BlockbusterError,
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
from .io import ImageSource, open_image
from .output import open_labels
from .runner import tile_process
from .segmenter import MemoryModel, Segmenter
from .sizing import auto_tile_shape, auto_tile_shape_cellpose, plan_tile_shape
from .table import read_object_table
from .tiling import TileGrid

__version__ = "0.1.0"

__all__ = [
    "BlockbusterError",
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
