"""Conformance checks that every segmenter must pass, built-in or third-party.

Each ``check_*`` function tests one promise of the segmenter contract and raises
:class:`ConformanceFailure` (an ``AssertionError``) with a message that says what is wrong.
:func:`check_segmenter` runs all of them on one image and reports every failure at once.
:class:`SegmenterConformance` (needs pytest) turns them into one test each.

The contract (see :mod:`blockbuster.segmenter`): ``fn(tile)`` takes a NumPy tile in the
image's axis order (channel axis where the image has it, announced in ``seg.channel_axis``
before :meth:`~blockbuster.segmenter.Segmenter.prepare`) and returns non-negative integer
labels of the tile's spatial shape, 0 for background. Instances are shipped to workers by
pickling, so they must pickle cheaply (no model weights) and a copy must give the same labels.
A model is loaded at most once per process, however many tiles and instances run.
"""

from __future__ import annotations

import json
import math
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import open_image
from ..segmenter import MemoryModel, Segmenter, describe_segmenter, grid_per_axis

__all__ = [
    "ConformanceFailure",
    "check_attributes",
    "check_empty_tile",
    "check_model_loaded_once",
    "check_odd_tile_sizes",
    "check_output",
    "check_pickle",
    "check_segmenter",
    "check_tile_process",
    "conformance_image",
    "count_model_loads",
    "crop_tiles",
    "prepare_segmenter",
]

#: A pickled segmenter larger than this probably carries model weights or data.
PICKLE_MAX_BYTES = 64 * 1024
STITCH_MODES = (None, "faces", "iou", "whole", "none")


class ConformanceFailure(AssertionError):
    """A segmenter broke the segmenter contract; the message says how."""


def _fail(message: str) -> ConformanceFailure:
    return ConformanceFailure(message)


def _name(seg: Any) -> str:
    return getattr(seg, "name", None) or type(seg).__name__


# -- helpers ----------------------------------------------------------------------------------
def spatial_shape(tile: np.ndarray, channel_axis: int | None) -> tuple[int, ...]:
    """The tile's shape without its channel axis (which may be negative)."""
    axis = None if channel_axis is None else channel_axis % tile.ndim
    return tuple(s for a, s in enumerate(tile.shape) if a != axis)


def prepare_segmenter(seg: Callable, image: np.ndarray, channel_axis: int | None = None) -> None:
    """Do what ``tile_process`` does before the first tile: set ``channel_axis``, ``prepare()``."""
    if isinstance(seg, Segmenter):
        seg.channel_axis = None if channel_axis is None else channel_axis % image.ndim
        seg.prepare(open_image(image, channel_axis))


def conformance_image(ndim: int, *, diameter: float = 10, channel_axis: int | None = None,
                      n_channels: int = 1, seed: int = 0) -> np.ndarray:
    """A small synthetic nuclei image for the checks (2-D: 64 x 80; 3-D: 12 x 48 x 56).

    Examples
    --------
    >>> conformance_image(3, channel_axis=0, n_channels=2).shape
    (2, 12, 48, 56)
    """
    from . import synthetic_nuclei

    shape = (64, 80) if ndim == 2 else (12, 48, 56)
    image, _ = synthetic_nuclei(shape, diameter=diameter, seed=seed)
    if channel_axis is None:
        if n_channels != 1:
            raise ValueError("n_channels > 1 needs a channel_axis")
        return image
    # Channel 0 holds the nuclei; further channels are dimmer copies, like a second stain.
    channels = [image] + [(image // (c + 1)).astype(image.dtype) for c in range(1, n_channels)]
    return np.stack(channels, axis=channel_axis % (ndim + 1))


def crop_tiles(image: np.ndarray, sizes: Sequence[tuple[int, ...]],
               channel_axis: int | None = None) -> list[np.ndarray]:
    """Crops of ``image`` with the given spatial sizes (clipped to the image), offset from 0."""
    spatial = spatial_shape(image, channel_axis)
    tiles = []
    for size in sizes:
        starts = [min(s - min(c, s), 3) for c, s in zip(size, spatial, strict=True)]
        region = [slice(a, a + min(c, s)) for a, c, s in zip(starts, size, spatial, strict=True)]
        if channel_axis is not None:
            region.insert(channel_axis % image.ndim, slice(None))
        tiles.append(np.ascontiguousarray(image[tuple(region)]))
    return tiles


def tile_sizes(seg: Any, ndim: int) -> list[tuple[int, ...]]:
    """Odd tile sizes to try: per-plane tiles for 2-D methods on 3-D images."""
    if ndim == 2:
        return [(33, 47), (7, 61), (64, 80)]
    if getattr(seg, "spatial_ndim", None) == 2:
        return [(1, 33, 47), (1, 7, 61), (1, 48, 56)]
    return [(5, 21, 19), (3, 9, 31), (12, 48, 56)]


def count_model_loads(seg: Any) -> int | None:
    """Model loads so far in this process, if the segmenter exposes a ``model_cache``.

    Segmenters that keep their models in a :class:`blockbuster.plugins.ModelCache` and expose
    it as ``model_cache`` are counted; for others this returns None (the check is skipped
    unless the caller passes its own counter).
    """
    from ..plugins import ModelCache

    cache = getattr(seg, "model_cache", None)
    return cache.load_count() if isinstance(cache, ModelCache) else None


# -- checks -----------------------------------------------------------------------------------
def check_attributes(seg: Any) -> None:
    """Declared attributes have valid types and ``config()`` is JSON-serialisable.

    Examples
    --------
    >>> from blockbuster.plugins.watershed import WatershedSegmenter
    >>> check_attributes(WatershedSegmenter())
    """
    if not callable(seg):
        raise _fail(f"{seg!r} is not callable")
    info = describe_segmenter(seg)
    if not isinstance(info.name, str) or not info.name:
        raise _fail(f"name must be a non-empty str, got {info.name!r}")
    _check_overlap(info.preferred_overlap)
    if info.preferred_stitch not in STITCH_MODES:
        raise _fail(f"preferred_stitch={info.preferred_stitch!r} must be one of {STITCH_MODES}")
    _check_memory_model(getattr(seg, "memory_model", None))
    _check_grid(info.grid)
    nd = info.spatial_ndim
    if nd is not None and (isinstance(nd, bool) or not isinstance(nd, int) or nd < 1):
        raise _fail(f"spatial_ndim={nd!r} must be None or a positive int")
    if isinstance(seg, Segmenter):
        _check_config(seg)


def _check_overlap(overlap: Any) -> None:
    values = overlap if isinstance(overlap, tuple) else (overlap,)
    if overlap is None:
        return
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise _fail(f"preferred_overlap={overlap!r} must be None, an int >= 0 or a tuple "
                        "of them")


def _check_grid(grid: Any) -> None:
    if grid is None:
        return
    values = grid if isinstance(grid, tuple) else (grid,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise _fail(f"grid={grid!r} must be None, an int >= 1 or a tuple of them (one per "
                        "spatial axis, in input pixels)")


def _check_memory_model(model: Any) -> None:
    if model is None:
        return
    if not isinstance(model, MemoryModel):
        raise _fail(f"memory_model must be a MemoryModel or None, got {type(model).__name__}")
    for field in ("bytes_per_input_byte", "bytes_per_voxel", "fixed_bytes", "scale"):
        value = getattr(model, field)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise _fail(f"memory_model.{field}={value!r} must be a finite number >= 0")
    if model.scale <= 0 or model.per_voxel_bytes(1) + model.fixed_bytes <= 0:
        raise _fail(f"memory_model {model} predicts no memory at all")


def _check_config(seg: Segmenter) -> None:
    config = seg.config()
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise _fail(f"config() must return a dict with str keys, got {config!r}")
    try:
        text = json.dumps(config, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise _fail(f"config() must be JSON-serialisable (it goes into the run manifest): "
                    f"{exc}") from exc
    if json.dumps(seg.config(), allow_nan=False, sort_keys=True) != text:
        raise _fail("config() must return the same parameters every time it is called")
    repr(seg)


def check_output(seg: Callable, tile: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """``seg(tile)`` is a non-negative integer label image of the tile's spatial shape.

    Returns
    -------
    numpy.ndarray
        The labels, for further checks.

    Examples
    --------
    >>> from scipy import ndimage
    >>> labels = check_output(lambda t: ndimage.label(t > 0)[0], np.eye(5))
    >>> int(labels.max())
    5
    """
    result = seg(tile)
    if result is None or not hasattr(result, "shape"):
        raise _fail(f"{_name(seg)} returned {type(result).__name__}, not an array")
    labels = np.asarray(result)
    expected = spatial_shape(tile, channel_axis)
    if labels.shape != expected:
        raise _fail(f"{_name(seg)} returned shape {labels.shape} for a tile of shape "
                    f"{tile.shape} (channel_axis={channel_axis}); expected {expected}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise _fail(f"{_name(seg)} returned dtype {labels.dtype}; labels must be integers")
    if labels.size and labels.min() < 0:
        raise _fail(f"{_name(seg)} returned negative labels (min {labels.min()})")
    return labels


def check_odd_tile_sizes(seg: Callable, image: np.ndarray, channel_axis: int | None = None,
                         sizes: Sequence[tuple[int, ...]] | None = None) -> None:
    """Tiles of odd, non-square sizes (as at image borders) give valid labels."""
    ndim = len(spatial_shape(image, channel_axis))
    for tile in crop_tiles(image, sizes or tile_sizes(seg, ndim)[:2], channel_axis):
        check_output(seg, tile, channel_axis)


def check_empty_tile(seg: Callable, tile_like: np.ndarray, channel_axis: int | None = None) -> None:
    """An all-zero tile is all background."""
    labels = check_output(seg, np.zeros_like(tile_like), channel_axis)
    if labels.any():
        raise _fail(f"{_name(seg)} found {len(np.unique(labels)) - 1} object(s) in an all-zero "
                    "tile; an empty tile must be all background")


def check_pickle(seg: Callable, tile: np.ndarray, channel_axis: int | None = None,
                 max_bytes: int = PICKLE_MAX_BYTES) -> int:
    """After use (model loaded), the segmenter pickles small and a copy gives the same labels.

    Returns
    -------
    int
        Size of the pickle in bytes.
    """
    before = check_output(seg, tile, channel_axis)
    try:
        data = pickle.dumps(seg)
    except Exception as exc:
        raise _fail(f"{_name(seg)} cannot be pickled, so it cannot run on dask workers: "
                    f"{type(exc).__name__}: {exc}") from exc
    if len(data) > max_bytes:
        raise _fail(f"{_name(seg)} pickles to {len(data)} bytes (limit {max_bytes}); it must "
                    "not carry model weights or data: load them lazily and drop them in "
                    "__getstate__")
    copy = pickle.loads(data)
    after = check_output(copy, tile, channel_axis)
    if not np.array_equal(before, after):
        raise _fail(f"{_name(seg)} gives different labels after a pickle round trip")
    return len(data)


def check_model_loaded_once(seg: Callable, tiles: Sequence[np.ndarray],
                            loads: Callable[[], int | None] | None = None) -> bool:
    """Many tiles, and a pickled copy of the segmenter, load the model at most once in total.

    Parameters
    ----------
    seg : callable
    tiles : sequence of numpy.ndarray
        At least two tiles.
    loads : callable, optional
        Returns the number of model loads in this process so far. Default:
        :func:`count_model_loads`.

    Returns
    -------
    bool
        False when loads cannot be counted (nothing was checked).
    """
    counter = loads or (lambda: count_model_loads(seg))
    start = counter()
    if start is None:
        return False
    copy = pickle.loads(pickle.dumps(seg))
    for tile in list(tiles) * 2:
        seg(tile)
        copy(tile)
    end = counter()
    n = (end or 0) - start
    if n > 1:
        raise _fail(f"{_name(seg)} loaded its model {n} times for {4 * len(tiles)} calls in one "
                    "process; load it once per process (see blockbuster.plugins.ModelCache)")
    return True


def check_tile_process(seg: Callable, image: np.ndarray, *, channel_axis: int | None = None,
                       tile_shape: Sequence[int] | None = None,
                       overlap: int | Sequence[int] | None = None,
                       workdir: str | Path | None = None) -> np.ndarray:
    """Run the segmenter end to end through :func:`blockbuster.tile_process` on ``image``.

    The image is cut into a few tiles (default: about half of each spatial axis, one plane for
    2-D methods on 3-D images) with the segmenter's preferred overlap, reduced where the tiles
    are too small for it. Returns the stitched labels.
    """
    from ..api import tile_process

    spatial = spatial_shape(image, channel_axis)
    if tile_shape is None:
        tile_shape = tuple(max(8, s // 2) for s in spatial)
        if getattr(seg, "spatial_ndim", None) == 2 and len(spatial) == 3:
            tile_shape = (1, *tile_shape[1:])
    if overlap is None:
        info = describe_segmenter(seg)
        preferred = info.preferred_overlap or 0
        if not isinstance(preferred, tuple):
            preferred = (preferred,) * len(spatial)
        step = grid_per_axis(info.grid, len(spatial))
        # The halo must stay smaller than the tile (by a grid step); a plane-thin tile gets none.
        overlap = tuple(max(0, min(int(p), (t - 1) // g * g))
                        for p, t, g in zip(preferred, tile_shape, step, strict=True))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = tile_process(image, seg, tile_shape=tuple(tile_shape), overlap=overlap,
                           output=Path(tmp) / "labels.zarr", channel_axis=channel_axis,
                           progress=False)
        labels = np.asarray(out[...])
    if labels.shape != spatial:
        raise _fail(f"tile_process output has shape {labels.shape}, expected {spatial}")
    if not np.issubdtype(labels.dtype, np.unsignedinteger):
        raise _fail(f"tile_process output has dtype {labels.dtype}")
    return labels


# -- everything at once -----------------------------------------------------------------------
def check_segmenter(
    seg: Callable,
    image: np.ndarray,
    *,
    channel_axis: int | None = None,
    tile_shape: Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    pickle_max_bytes: int = PICKLE_MAX_BYTES,
    loads: Callable[[], int | None] | None = None,
    empty: bool = True,
    end_to_end: bool = True,
) -> list[str]:
    """Run every conformance check on ``seg`` with tiles cut from ``image``.

    Parameters
    ----------
    seg : Segmenter or callable
        The segmenter; ``prepare()`` is called on ``image`` first, as ``tile_process`` does.
    image : numpy.ndarray
        A small image the segmenter can handle (2-D or 3-D, channel axis at ``channel_axis``),
        at least 64 x 80 (2-D) or 12 x 48 x 56 (3-D) for the default tile sizes.
    channel_axis : int, optional
    tile_shape, overlap : optional
        For the end-to-end run through ``tile_process``.
    pickle_max_bytes : int
        Largest acceptable pickle.
    loads : callable, optional
        Counter of model loads (default: the segmenter's ``model_cache``, if any).
    empty : bool
        Check that an all-zero tile gives no objects.
    end_to_end : bool
        Also run ``tile_process``.

    Returns
    -------
    list of str
        Names of the checks that ran (and passed).

    Raises
    ------
    ConformanceFailure
        Listing every failed check.

    Examples
    --------
    >>> from blockbuster.plugins.watershed import WatershedSegmenter
    >>> image = conformance_image(2)
    >>> check_segmenter(WatershedSegmenter(diameter=10), image)[:3]
    ['attributes', 'output', 'odd tile sizes']
    """
    ndim = len(spatial_shape(image, channel_axis))
    prepare_segmenter(seg, image, channel_axis)
    tiles = crop_tiles(image, tile_sizes(seg, ndim), channel_axis)
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("attributes", lambda: check_attributes(seg)),
        ("output", lambda: check_output(seg, tiles[-1], channel_axis)),
        ("odd tile sizes", lambda: check_odd_tile_sizes(seg, image, channel_axis)),
        ("pickle", lambda: check_pickle(seg, tiles[0], channel_axis, pickle_max_bytes)),
        ("model loaded once", lambda: check_model_loaded_once(seg, tiles[:2], loads)),
    ]
    if empty:
        checks.append(("empty tile", lambda: check_empty_tile(seg, tiles[0], channel_axis)))
    if end_to_end:
        checks.append(("tile_process", lambda: check_tile_process(
            seg, image, channel_axis=channel_axis, tile_shape=tile_shape, overlap=overlap)))
    passed, failures = [], []
    for name, check in checks:
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 -- report every broken promise
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if result is not False:
            passed.append(name)
    if failures:
        raise ConformanceFailure(f"{_name(seg)} failed {len(failures)} conformance check(s):\n"
                                 + "\n".join(f"  - {f}" for f in failures))
    return passed


# -- the pytest base class ---------------------------------------------------------------------
_CONFORMANCE_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    # Built on first use so that importing the kit does not import pytest.
    global _CONFORMANCE_CLASS
    if name == "SegmenterConformance":
        if _CONFORMANCE_CLASS is None:
            _CONFORMANCE_CLASS = _build_conformance_class()
        return _CONFORMANCE_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_conformance_class() -> type:
    import pytest

    class SegmenterConformance:
        """Pytest base class: subclass it, override ``make_segmenter``, get every check as a test.

        Example (in a plugin's test suite)::

            import pytest
            from blockbuster.testing import SegmenterConformance

            class TestMySegmenter(SegmenterConformance):
                diameter = 12            # of the synthetic nuclei

                @pytest.fixture
                def make_segmenter(self):
                    return lambda: MySegmenter(diameter=12)

        Class attributes tune the synthetic images: ``image_ndims`` (which of 2-D/3-D the
        segmenter accepts), ``channel_axis`` and ``n_channels`` (multichannel input),
        ``diameter``; ``check_empty`` and ``end_to_end`` switch checks off; override
        :meth:`make_image` for entirely different input and :meth:`model_loads` to count model
        loads of a segmenter without a ``model_cache``.
        """

        image_ndims: tuple[int, ...] = (2, 3)
        channel_axis: int | None = None
        n_channels: int = 1
        diameter: float = 10
        pickle_max_bytes: int = PICKLE_MAX_BYTES
        check_empty: bool = True
        end_to_end: bool = True
        #: Passed to tile_process in the end-to-end test (None: the segmenter's preference).
        overlap: int | tuple[int, ...] | None = None

        @pytest.fixture
        def make_segmenter(self) -> Callable[[], Callable]:
            """Override: return a function that builds a fresh segmenter."""
            pytest.fail("override the make_segmenter fixture in your SegmenterConformance "
                        "subclass")

        def make_image(self, ndim: int) -> np.ndarray:
            """A test image with ``ndim`` spatial axes (override for special input)."""
            return conformance_image(ndim, diameter=self.diameter, channel_axis=self.channel_axis,
                                     n_channels=self.n_channels)

        def model_loads(self, seg: Any) -> int | None:
            """Model loads so far in this process, or None if they cannot be counted."""
            return count_model_loads(seg)

        def _ready(self, make_segmenter: Callable, ndim: int | None = None):
            ndim = ndim or self.image_ndims[0]
            if ndim not in self.image_ndims:
                pytest.skip(f"the segmenter does not take {ndim}-D images")
            seg = make_segmenter()
            image = self.make_image(ndim)
            prepare_segmenter(seg, image, self.channel_axis)
            return seg, image, crop_tiles(image, tile_sizes(seg, ndim), self.channel_axis)

        def test_attributes(self, make_segmenter: Callable) -> None:
            check_attributes(make_segmenter())

        @pytest.mark.parametrize("ndim", [2, 3])
        def test_output(self, make_segmenter: Callable, ndim: int) -> None:
            seg, _, tiles = self._ready(make_segmenter, ndim)
            check_output(seg, tiles[-1], self.channel_axis)

        @pytest.mark.parametrize("ndim", [2, 3])
        def test_odd_tile_sizes(self, make_segmenter: Callable, ndim: int) -> None:
            seg, image, _ = self._ready(make_segmenter, ndim)
            check_odd_tile_sizes(seg, image, self.channel_axis)

        def test_empty_tile(self, make_segmenter: Callable) -> None:
            if not self.check_empty:
                pytest.skip("check_empty = False")
            seg, _, tiles = self._ready(make_segmenter)
            check_empty_tile(seg, tiles[0], self.channel_axis)

        def test_pickle(self, make_segmenter: Callable) -> None:
            seg, _, tiles = self._ready(make_segmenter)
            check_pickle(seg, tiles[0], self.channel_axis, self.pickle_max_bytes)

        def test_model_loaded_once(self, make_segmenter: Callable) -> None:
            seg, _, tiles = self._ready(make_segmenter)
            if not check_model_loaded_once(seg, tiles[:2], lambda: self.model_loads(seg)):
                pytest.skip("model loads cannot be counted for this segmenter")

        def test_tile_process(self, make_segmenter: Callable) -> None:
            if not self.end_to_end:
                pytest.skip("end_to_end = False")
            seg, image, _ = self._ready(make_segmenter)
            check_tile_process(seg, image, channel_axis=self.channel_axis, overlap=self.overlap)

    SegmenterConformance.__module__ = __name__
    return SegmenterConformance
