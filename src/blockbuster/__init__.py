"""blockbuster: segment microscopy images far larger than RAM or GPU memory."""

from .errors import (
    BlockbusterError,
    InputError,
    OutputExistsError,
    TileError,
    TileFailures,
)
from .io import ImageSource, open_image
from .segmenter import MemoryModel, Segmenter

__version__ = "0.1.0"

__all__ = [
    "BlockbusterError",
    "ImageSource",
    "InputError",
    "MemoryModel",
    "OutputExistsError",
    "Segmenter",
    "TileError",
    "TileFailures",
    "open_image",
]
