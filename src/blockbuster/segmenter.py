"""The segmenter interface: what ``tile_process`` needs to know about a segmentation function.

A *segmenter* is any callable ``fn(tile) -> labels``. Plain functions work as they are. A
:class:`Segmenter` subclass can also declare what it prefers (overlap, stitching mode), how much
memory it needs per voxel (for ``tile_shape="auto"``), whether it is a 2-D method that wants one
z-slice per tile, and it can look at the whole image once before any tile runs (for example to
compute global normalisation percentiles, so that neighbouring tiles see the same contrast), and
it can declare the grid its output is equivariant on (a U-Net that downsamples by 16 gives the
same answer for a pixel in two tiles only when both tiles start on multiples of 16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .io import ImageSource

__all__ = ["MemoryModel", "Segmenter", "SegmenterInfo", "describe_segmenter", "fn_name",
           "grid_per_axis", "padded_extent"]

StitchMode = Literal["faces", "iou", "whole", "none"]


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of one call of a segmenter, as a linear function of its input.

    ``peak_bytes = bytes_per_input_byte * input_bytes + bytes_per_voxel * voxels + fixed_bytes``

    where ``input_bytes`` is the size of the padded tile as given to the segmenter (all channels)
    and ``voxels`` the number of spatial voxels of the padded tile.

    Parameters
    ----------
    bytes_per_input_byte : float
        Working memory per byte of raw input (Cellpose: about 20).
    bytes_per_voxel : float
        Working memory per spatial voxel independent of the input dtype (e.g. float32 maps).
    fixed_bytes : int
        Memory that does not depend on the tile (model weights, CUDA context).
    scale : float
        Factor applied to the voxel count before the per-voxel terms, for methods that resample
        the tile (Cellpose rescales by ``30 / diameter`` per axis).

    Examples
    --------
    >>> m = MemoryModel(bytes_per_input_byte=20, bytes_per_voxel=0, fixed_bytes=2 * 1024**3)
    >>> m.peak_bytes(voxels=1000, input_itemsize=2, channels=1)
    2147523648
    """

    bytes_per_input_byte: float = 4.0
    bytes_per_voxel: float = 16.0
    fixed_bytes: int = 0
    scale: float = 1.0

    def per_voxel_bytes(self, input_itemsize: int, channels: int = 1) -> float:
        """Bytes per spatial voxel of the padded tile, excluding ``fixed_bytes``."""
        per = self.bytes_per_input_byte * input_itemsize * channels + self.bytes_per_voxel
        return per * self.scale

    def peak_bytes(self, voxels: int, input_itemsize: int, channels: int = 1) -> int:
        """Predicted peak bytes for a padded tile of ``voxels`` spatial voxels."""
        return int(voxels * self.per_voxel_bytes(input_itemsize, channels) + self.fixed_bytes)


#: Used for plain functions that declare nothing: room for a few float32 copies of the tile.
DEFAULT_MEMORY_MODEL = MemoryModel(bytes_per_input_byte=4.0, bytes_per_voxel=16.0)


class Segmenter:
    """Base class for segmenters that declare their preferences.

    Subclasses implement :meth:`segment` (called on every tile) and may override the class
    attributes below. Everything has a default, so only ``segment`` is required. Instances must
    pickle cheaply (they are shipped to dask workers): load models lazily, never in ``__init__``,
    and drop them in ``__getstate__``.

    Attributes
    ----------
    name : str
        Short name (the entry-point name for registered plugins).
    preferred_overlap : int or tuple of int or None
        Halo the method needs, in voxels (typically about one object diameter).
    preferred_stitch : {"faces", "iou", "whole", "none"} or None
        Stitching mode that suits the method.
    memory_model : MemoryModel or None
        Working memory per tile, used by ``tile_shape="auto"``.
    spatial_ndim : int or None
        2 for methods that segment one 2-D plane at a time: ``"auto"`` then uses tiles one
        voxel deep in every leading axis. None: the method takes tiles of any dimensionality.
    grid : int or tuple of int or None
        The grid the method's output is equivariant on, per spatial axis, in input pixels (after
        any rescaling the method does itself): shifting the input by a multiple of it shifts the
        labels by as much, and by nothing else. A network that downsamples by 16 has grid 16;
        tiles then give the whole-image answer only when every tile's read region starts on a
        multiple of it (tile shape and overlap multiples of the grid). A tuple has one entry per
        spatial axis of the method (see :func:`grid_per_axis`). None: nothing declared (any
        placement; plain functions, watershed).
    channel_axis : int or None
        Set by ``tile_process`` before the first tile: where the channel axis is in each tile.
    requires : tuple of str
        Top-level modules the segmenter needs (e.g. ``("cellpose", "torch")``): listings such
        as ``blockbuster methods`` and ``segment --help`` offer it only where they are
        installed, without importing them.
    extra : str or None
        The pip extra that installs them (``pip install "blockbuster[extra]"``).
    """

    name: str = "segmenter"
    preferred_overlap: int | tuple[int, ...] | None = None
    preferred_stitch: StitchMode | None = None
    memory_model: MemoryModel | None = None
    spatial_ndim: int | None = None
    grid: int | tuple[int, ...] | None = None
    channel_axis: int | None = None
    requires: tuple[str, ...] = ()
    extra: str | None = None

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Return an integer label image with the spatial shape of ``tile`` (0 = background)."""
        raise NotImplementedError

    def check_plan(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   overlap: tuple[int, ...]) -> None:
        """Refuse a plan the segmenter cannot make sense of, before anything is written.

        Called by :func:`~blockbuster.plan.make_plan` once the tiles are decided, before any
        tile runs (and before ``prepare``). Raise :class:`~blockbuster.errors.InputError`
        naming the parameter and the limit, e.g. a smoothing kernel larger than the tile or an
        object diameter larger than the image. The default accepts every plan.

        Parameters
        ----------
        spatial_shape : tuple of int
            The image's spatial shape (the axes that are tiled and stitched).
        tile_shape : tuple of int
            The core shape of a (full) tile on those axes.
        overlap : tuple of int
            The halo on those axes, as the run will use it (already clipped to the tile): a
            tile's padded extent is ``min(tile + 2 * overlap, image)`` per axis.
        """

    def prepare(self, image: ImageSource) -> None:
        """Look at the whole image once, before any tile runs (global statistics).

        ``image`` is an :class:`blockbuster.io.ImageSource`; use ``image.to_dask()`` or
        ``image.sample(...)`` to stream over it. Never load the whole image. Tiles will have
        their channels at ``image.segment_channel_axis``. Record what was computed in
        ``self._statistics`` (see :attr:`statistics`).
        """

    @property
    def statistics(self) -> dict[str, Any]:
        """Global values ``prepare()`` computed (threshold, percentiles) and how they were
        sampled; empty before ``prepare()`` or when nothing global is computed.

        JSON-serialisable, meant to be stored with the output so that a run can be compared
        and reproduced.
        """
        return dict(getattr(self, "_statistics", None) or {})

    def config(self) -> dict[str, Any]:
        """Parameters that define the result; a resumed run must have the same ones."""
        return {}

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return self.segment(tile)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({params})"


def padded_extent(spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                  overlap: tuple[int, ...]) -> tuple[int, ...]:
    """What a full tile with its halo spans on each axis (never more than the image).

    Examples
    --------
    >>> padded_extent((64, 1000), (16, 256), (8, 32))
    (32, 320)
    """
    return tuple(min(t + 2 * o, s) for s, t, o in zip(spatial_shape, tile_shape, overlap,
                                                        strict=True))


@dataclass(frozen=True)
class SegmenterInfo:
    """What ``tile_process`` reads off a segmenter (plain callables get the defaults)."""

    name: str
    preferred_overlap: tuple[int, ...] | int | None
    preferred_stitch: str | None
    memory_model: MemoryModel
    spatial_ndim: int | None
    identity: dict[str, Any]
    grid: int | tuple[int, ...] | None = None


def fn_name(fn: Callable) -> str:
    """A readable name for any callable, for error messages and the run manifest.

    Examples
    --------
    >>> import functools, numpy
    >>> fn_name(numpy.zeros_like)
    'numpy.zeros_like'
    >>> fn_name(functools.partial(numpy.zeros_like, dtype=int))
    "functools.partial(numpy.zeros_like, dtype=<class 'int'>)"
    """
    import functools

    if isinstance(fn, functools.partial):
        args = [fn_name(fn.func)] + [repr(a) for a in fn.args]
        args += [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"functools.partial({', '.join(args)})"
    if isinstance(fn, Segmenter):
        return repr(fn)
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}" if module else qualname


def describe_segmenter(fn: Callable) -> SegmenterInfo:
    """Collect a segmenter's declared preferences; plain callables get defaults."""
    return SegmenterInfo(
        name=getattr(fn, "name", None) or fn_name(fn),
        preferred_overlap=getattr(fn, "preferred_overlap", None),
        preferred_stitch=getattr(fn, "preferred_stitch", None),
        memory_model=getattr(fn, "memory_model", None) or DEFAULT_MEMORY_MODEL,
        spatial_ndim=getattr(fn, "spatial_ndim", None),
        identity={"fn": fn_name(fn), **(fn.config() if isinstance(fn, Segmenter) else {})},
        grid=getattr(fn, "grid", None),
    )


def grid_per_axis(grid: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """A declared grid as one int per spatial axis of an image with ``ndim`` spatial axes.

    An int applies to every axis. A tuple covers the method's own axes, which are the last
    ones (a 2-D method on a 3-D image segments each plane: the leading axes get 1). None: 1.

    Examples
    --------
    >>> grid_per_axis(16, 2)
    (16, 16)
    >>> grid_per_axis((16, 16), 3)   # a 2-D network on a 3-D image, plane by plane
    (1, 16, 16)
    >>> grid_per_axis(None, 3)
    (1, 1, 1)
    """
    if grid is None:
        return (1,) * ndim
    if isinstance(grid, (int, np.integer)):
        return (int(grid),) * ndim
    values = tuple(int(g) for g in grid)
    if len(values) > ndim:  # a 3-D method on a 2-D image: its check_plan says so clearly
        values = values[-ndim:]
    return (1,) * (ndim - len(values)) + values
