"""Exceptions raised by blockbuster.

Every error a user can trigger is a :class:`BlockbusterError`, so scripts can catch one type.
"""

from __future__ import annotations

__all__ = [
    "BlockbusterError",
    "ClusterError",
    "IncompleteOutputError",
    "InputError",
    "NoGPUError",
    "OutputExistsError",
    "OutputLockedError",
    "PluginNotInstalledError",
    "ResumeMismatchError",
    "TileError",
    "TileFailures",
    "TileSizeError",
]


class BlockbusterError(Exception):
    """Base class of every error blockbuster raises on purpose."""


class InputError(BlockbusterError, ValueError):
    """The input image or an argument is unusable."""


class OutputExistsError(BlockbusterError, FileExistsError):
    """The output exists and ``overwrite=False``."""


class TileError(BlockbusterError, RuntimeError):
    """The segmentation function failed, or returned something unusable, on one tile.

    Attributes
    ----------
    tile_index : tuple of int
        Position of the tile in the tile grid.
    region : tuple of slice
        Voxel region (with halo) that was passed to the function.
    fn_name : str
        Name of the function that failed.
    """

    def __init__(self, message: str, *, tile_index=None, region=None, fn_name=None, tb=None):
        super().__init__(message)
        self.tile_index = tile_index
        self.region = region
        self.fn_name = fn_name
        self.traceback_text = tb


class TileFailures(TileError):
    """One or more tiles failed; the rest were kept and a resume redoes only the failed ones.

    ``failures`` lists one :class:`TileError` per failed tile; the attributes of the first one
    are also set on this error.
    """

    def __init__(self, message: str, failures: list[TileError]):
        first = failures[0] if failures else None
        super().__init__(message, tile_index=getattr(first, "tile_index", None),
                         region=getattr(first, "region", None),
                         fn_name=getattr(first, "fn_name", None),
                         tb=getattr(first, "traceback_text", None))
        self.failures = failures


class ResumeMismatchError(BlockbusterError, ValueError):
    """A resumed run's arguments differ from the run that started the output."""


class OutputLockedError(BlockbusterError, RuntimeError):
    """Another run is writing the same output right now."""


class NoGPUError(BlockbusterError, RuntimeError):
    """``use_gpu=True`` but no usable GPU was found."""


class TileSizeError(BlockbusterError, ValueError):
    """No tile shape fits the memory budget, or a tile-shape callable returned nonsense."""


class IncompleteOutputError(BlockbusterError, RuntimeError):
    """The labels on disk come from a run that did not finish."""


class PluginNotInstalledError(BlockbusterError, ImportError):
    """A segmenter needs an optional dependency that is not installed."""


class ClusterError(BlockbusterError, RuntimeError):
    """The job queue refused a cluster's jobs, or its jobs kept ending before the run finished."""
