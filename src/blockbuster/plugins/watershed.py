"""A classical nucleus segmenter that needs no model: smoothing, a global threshold, watershed.

This is what the demo and the CLI's default run. It separates touching round objects (nuclei)
with a distance-transform watershed, in 2-D and 3-D, using only SciPy and scikit-image.

The foreground threshold is computed once for the whole image in :meth:`prepare` (from a
streamed subsample) and shared by every tile. A threshold computed per tile would differ from
tile to tile and cut objects differently on either side of a tile border.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..segmenter import MemoryModel, Segmenter, padded_extent
from ._checks import finite, non_negative, positive, positive_int

if TYPE_CHECKING:
    from ..io import ImageSource

__all__ = ["THRESHOLD_METHODS", "WatershedSegmenter", "check_diameter", "check_finite_sample",
           "check_kernels", "gaussian_kernel_size"]

#: Names accepted by ``threshold_method``: the scikit-image functions ``threshold_<name>``.
THRESHOLD_METHODS = ("otsu", "li", "yen", "triangle", "isodata", "mean")

# Peak working memory of segment(), measured with tracemalloc on synthetic nuclei (diameter 12,
# the arrays numpy, scipy and scikit-image allocate): 36 B per voxel for 2-D tiles (1024^2 and
# 2048^2; uint8, uint16 or float32 input alike), 50 B per voxel for 3-D tiles (96x128x128 up to
# 224^3, float64 input included), independent of object density, plus one input byte per voxel
# for multichannel input (the selected channel is copied). The peak RSS of a fresh process rose
# by 29 and 48 B per voxel (2048^2 and 160^3), in line. The peak comes from the float64 distance
# transform with scipy's int32 feature transform (one per axis) next to the float32 smoothed
# image and the mask, and then the watershed's float64 landscape, int32 markers and output.
# 56 B/voxel covers 3-D with ~15 % headroom; 2-D tiles are over-estimated, which is the safe side.
_BYTES_PER_VOXEL = 56.0
_BYTES_PER_INPUT_BYTE = 1.0


class WatershedSegmenter(Segmenter):
    """Gaussian smoothing, a global threshold, and a distance-transform watershed.

    Parameters
    ----------
    diameter : float
        Typical object diameter in voxels. Sets the smoothing, the minimum distance between
        object centres, the smallest object kept and the preferred overlap (one diameter).
    sigma : float, optional
        Gaussian smoothing in voxels; default ``diameter / 12`` (more smoothing fills the dim
        gaps between touching nuclei and merges them). 0 disables smoothing.
    threshold : float, optional
        Foreground threshold on the raw intensities. Default: computed once for the whole
        image in :meth:`prepare` with ``threshold_method``.
    threshold_method : {"otsu", "li", "yen", "triangle", "isodata", "mean"}
        How the global threshold is computed from the image's subsample.
    min_distance : int, optional
        Minimum distance between two object centres, in voxels; default ``diameter / 3``.
        Larger values merge more, smaller values split more.
    min_size : int, optional
        Objects with fewer voxels are removed; default 5 % of a ball of ``diameter``.
    channel : int
        Channel to segment when the image has a channel axis.

    Examples
    --------
    >>> import numpy as np
    >>> from blockbuster.io import open_image
    >>> yy, xx = np.mgrid[:40, :60]
    >>> image = ((yy - 20) ** 2 + (xx - 15) ** 2 < 64) | ((yy - 20) ** 2 + (xx - 45) ** 2 < 64)
    >>> seg = WatershedSegmenter(diameter=16)
    >>> seg.prepare(open_image(image.astype(np.uint8) * 200))
    >>> labels = seg(image.astype(np.uint8) * 200)
    >>> int(labels.max()), labels.dtype.name
    (2, 'int32')
    """

    name = "watershed"
    preferred_stitch = "iou"
    spatial_ndim = None

    def __init__(
        self,
        diameter: float = 12,
        sigma: float | None = None,
        threshold: float | None = None,
        threshold_method: str = "otsu",
        min_distance: int | None = None,
        min_size: int | None = None,
        channel: int = 0,
    ) -> None:
        self.diameter = positive("diameter", diameter)
        self._given = {k for k, v in (("sigma", sigma), ("min_distance", min_distance))
                       if v is not None}
        self.sigma = self.diameter / 12 if sigma is None else non_negative("sigma", sigma)
        self.threshold = None if threshold is None else finite("threshold", threshold)
        if threshold_method not in THRESHOLD_METHODS:
            raise InputError(f"threshold_method={threshold_method!r} must be one of "
                             f"{', '.join(THRESHOLD_METHODS)}")
        self.threshold_method = threshold_method
        self.min_distance = (max(1, round(self.diameter / 3)) if min_distance is None
                             else positive_int("min_distance", min_distance))
        self.min_size = None if min_size is None else _non_negative_int("min_size", min_size)
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
            raise InputError(f"channel={channel!r} must be a non-negative int")
        self.channel = int(channel)
        #: Set by prepare(): the threshold shared by all tiles.
        self.global_threshold: float | None = None
        self._warned_per_tile = False

    # -- declared preferences -----------------------------------------------------------------
    @property
    def preferred_overlap(self) -> int:  # type: ignore[override]
        """One diameter: an object touching the tile core lies wholly inside the halo."""
        return math.ceil(self.diameter)

    @property
    def memory_model(self) -> MemoryModel:  # type: ignore[override]
        return MemoryModel(bytes_per_input_byte=_BYTES_PER_INPUT_BYTE,
                           bytes_per_voxel=_BYTES_PER_VOXEL)

    def config(self) -> dict[str, Any]:
        return {
            "diameter": self.diameter,
            "sigma": self.sigma,
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "min_distance": self.min_distance,
            "min_size": self.min_size,
            "channel": self.channel,
        }

    def kernels(self) -> list[tuple[str, int]]:
        """The neighbourhoods ``segment`` works in, in voxels per axis, with the parameters
        that set them: the Gaussian smoothing and the peak search (``min_distance``)."""
        def named(parameter: str, value: float) -> str:
            if parameter in getattr(self, "_given", ()):
                return f"{parameter}={value!r}"
            return f"diameter={self.diameter!r} (which sets {parameter}={value:g})"

        found = []
        if self.sigma > 0:
            found.append((f"the smoothing of {named('sigma', self.sigma)}",
                          gaussian_kernel_size(self.sigma)))
        found.append((f"the peak search of {named('min_distance', self.min_distance)}",
                      2 * self.min_distance + 1))
        return found

    def check_plan(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   overlap: tuple[int, ...]) -> None:
        """Objects larger than the image, or kernels larger than the image or the tile, cannot
        make sense (and a kernel of 10^9 voxels would never finish)."""
        check_diameter("diameter", self.diameter, spatial_shape)
        check_kernels(self.kernels(), spatial_shape, tile_shape, overlap)

    # -- running ------------------------------------------------------------------------------
    def prepare(self, image: ImageSource) -> None:
        """Compute the foreground threshold once from a streamed subsample of ``image``."""
        self.channel_axis = image.segment_channel_axis  # where its tiles hold channels
        if self.channel >= image.n_channels:
            raise InputError(f"channel={self.channel} but the image has {image.n_channels} "
                             "channel(s)")
        if self.threshold is None:
            values = check_finite_sample(image.sample()[:, self.channel], image,
                                         "the watershed's threshold")
            self.global_threshold = compute_threshold(values, self.threshold_method)
            self._statistics = {"threshold": self.global_threshold,
                                "threshold_method": self.threshold_method,
                                "channel": self.channel, "sample": image.sample_info()}
        else:
            self._statistics = {"threshold": self.threshold, "threshold_method": "given"}

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Label the objects of one tile; returns int32 labels of the tile's spatial shape."""
        image = self._channel(tile)
        smoothed = _smooth(image, self.sigma)
        mask = smoothed > self._threshold_for(image)
        del smoothed
        return self._split(mask)

    def _channel(self, tile: np.ndarray) -> np.ndarray:
        if self.channel_axis is None:
            if self.channel != 0:
                raise InputError(f"channel={self.channel} but the image has no channel axis")
            return tile
        if self.channel >= tile.shape[self.channel_axis]:
            raise InputError(f"channel={self.channel} but the tile has "
                             f"{tile.shape[self.channel_axis]} channel(s)")
        return np.take(tile, self.channel, axis=self.channel_axis)

    def _threshold_for(self, image: np.ndarray) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.global_threshold is not None:
            return self.global_threshold
        if not self._warned_per_tile:
            self._warned_per_tile = True
            warnings.warn(
                "WatershedSegmenter.prepare() was not called, so the threshold is computed per "
                "tile, which can leave seams at tile borders; tile_process calls prepare() "
                "itself, or pass threshold=",
                RuntimeWarning,
                stacklevel=3,
            )
        return compute_threshold(image.ravel(), self.threshold_method)

    def _split(self, mask: np.ndarray) -> np.ndarray:
        """Distance-transform watershed of a foreground mask into round objects."""
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        if not mask.any():
            return np.zeros(mask.shape, np.int32)
        distance = ndi.distance_transform_edt(mask)
        peaks = peak_local_max(distance, min_distance=self.min_distance, labels=mask,
                               exclude_border=False)
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        labels = watershed(-distance, markers, mask=mask).astype(np.int32, copy=False)
        del distance, markers
        _label_unreached(labels, mask)
        return _remove_small(labels, self._min_size(mask.ndim))

    def _min_size(self, ndim: int) -> int:
        if self.min_size is not None:
            return self.min_size
        ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1) * (self.diameter / 2) ** ndim
        return int(0.05 * ball)

    def __getstate__(self) -> dict[str, Any]:
        # The per-tile warning is per process: a fresh worker warns again.
        return {**self.__dict__, "_warned_per_tile": False}


def gaussian_kernel_size(sigma: float) -> int:
    """Voxels per axis of scipy's Gaussian kernel for ``sigma`` (``truncate=4``).

    Examples
    --------
    >>> gaussian_kernel_size(1.0), gaussian_kernel_size(0.5)
    (9, 5)
    """
    return 2 * int(4.0 * float(sigma) + 0.5) + 1


def check_diameter(name: str, diameter: float, spatial_shape: tuple[int, ...]) -> None:
    """Objects wider than the image's longest axis cannot be found in it.

    Examples
    --------
    >>> check_diameter("diameter", 1e9, (64, 64))
    Traceback (most recent call last):
    blockbuster.errors.InputError: diameter=1000000000.0 is larger than the image (64, 64): no \
object that large fits in it. Give the objects' diameter in voxels of this image
    """
    if diameter > max(spatial_shape):
        raise InputError(f"{name}={diameter!r} is larger than the image {spatial_shape}: no "
                         "object that large fits in it. Give the objects' diameter in voxels "
                         "of this image")


def check_kernels(kernels: list[tuple[str, int]], spatial_shape: tuple[int, ...],
                  tile_shape: tuple[int, ...] | None, overlap: tuple[int, ...]) -> None:
    """Refuse neighbourhoods larger than the image, or than a tile that cuts the image.

    ``kernels``: ``(parameter, size in voxels)``. A kernel larger than the image on every axis
    longer than one voxel cannot make sense for this image; one larger than a tile's padded
    extent on an axis where tiles cut the image (and are more than one voxel deep) would see
    each tile's border instead of the image, so tiles would disagree. Axes the tile spans
    whole, and one-voxel-deep tiles (2-D per slice), are never limited by the tile.

    Examples
    --------
    >>> check_kernels([("sigma=1", 9)], (64, 64), (32, 32), (8, 8))
    >>> check_kernels([("sigma=10", 81)], (64, 64), (32, 32), (8, 8))
    Traceback (most recent call last):
    blockbuster.errors.InputError: sigma=10 spans 81 voxels, larger than the image (64, 64); \
give sizes in voxels of this image
    """
    long_axes = [n for n in spatial_shape if n > 1] or list(spatial_shape)
    for name, size in kernels:
        if size > max(long_axes):
            raise InputError(f"{name} spans {size} voxels, larger than the image "
                             f"{spatial_shape}; give sizes in voxels of this image")
    if tile_shape is None:
        return
    padded = padded_extent(spatial_shape, tile_shape, overlap)
    for name, size in kernels:
        for axis, (p, n) in enumerate(zip(padded, spatial_shape, strict=True)):
            if 1 < p < n and size > p:
                raise InputError(
                    f"{name} spans {size} voxels, larger than a tile on axis {axis} ({p} "
                    f"voxels with its halo: tile_shape {tuple(tile_shape)}, overlap "
                    f"{tuple(overlap)}): each tile would see only part of it, and tiles "
                    "would disagree at their borders. Use larger tiles ($tile_shape), or a "
                    "smaller diameter")


def check_finite_sample(values: np.ndarray, image: ImageSource, what: str,
                        hint: str = "give the threshold yourself") -> np.ndarray:
    """``values`` (a sample of ``image``), or an error when it holds NaN or infinities."""
    values = np.asarray(values)
    if values.dtype.kind in "fc" and values.size and not np.isfinite(values).all():
        bad = "NaN" if np.isnan(values).any() else "infinite"
        raise InputError(
            f"{image.describe()} holds {bad} values (seen in the sample used for {what}): "
            f"the segmenter needs finite intensities. Replace them first, e.g. with "
            f"numpy.nan_to_num, or {hint}")
    return values


def compute_threshold(values: np.ndarray, method: str = "otsu") -> float:
    """A foreground threshold for ``values`` with scikit-image's ``threshold_<method>``.

    Parameters
    ----------
    values : numpy.ndarray
        Intensities (any shape), e.g. a subsample of the whole image.
    method : str
        One of :data:`THRESHOLD_METHODS`.

    Returns
    -------
    float
        A constant input returns its value, so that nothing is foreground.

    Examples
    --------
    >>> import numpy as np
    >>> values = np.r_[np.zeros(50), np.full(50, 100.0)]
    >>> int((values > compute_threshold(values)).sum())
    50
    >>> compute_threshold(np.zeros(10))
    0.0
    """
    if method not in THRESHOLD_METHODS:
        raise InputError(f"threshold_method={method!r} must be one of "
                         f"{', '.join(THRESHOLD_METHODS)}")
    values = np.asarray(values)
    if values.size == 0:
        raise InputError("cannot compute a threshold from no values")
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        raise InputError("cannot compute a threshold from values holding NaN or infinities; "
                         "replace them first (numpy.nan_to_num) or give threshold=")
    low, high = values.min(), values.max()
    if low == high:
        return float(low)
    from skimage import filters

    fn: Callable[[np.ndarray], float] = getattr(filters, f"threshold_{method}")
    threshold = float(fn(values))
    if np.any(values == threshold):
        # Images with few grey levels (masks, synthetic data) get a threshold exactly on a
        # level; smoothing's rounding would tip voxels of that level over it. Move it halfway
        # to the next level.
        above = values[values > threshold]
        if above.size:
            threshold = (threshold + float(above.min())) / 2
    return threshold


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    image = image.astype(np.float32, copy=False)
    if sigma <= 0:
        return image
    # float32 output halves the memory of scipy's default float64 at no cost to the threshold.
    return ndi.gaussian_filter(image, sigma, mode="nearest", output=np.float32)


def _label_unreached(labels: np.ndarray, mask: np.ndarray) -> None:
    """Give foreground components that got no marker (too small for a peak) their own labels."""
    unreached = mask & (labels == 0)
    if not unreached.any():
        return
    extra = _face_components(unreached)
    offset = int(labels.max())
    found = extra > 0
    labels[found] = extra[found] + offset


def _face_components(mask: np.ndarray) -> np.ndarray:
    """Face-connected components of a mask, numbered in raster order (``ndimage.label``'s).

    cc3d (one pass in C++, 2-D and 3-D) where it applies, SciPy otherwise.
    """
    if mask.ndim in (2, 3) and mask.size:
        import cc3d

        return cc3d.connected_components(mask, connectivity=4 if mask.ndim == 2 else 6,
                                         out_dtype=np.uint32).astype(np.int32, copy=False)
    from scipy import ndimage as ndi

    return ndi.label(mask)[0]


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero objects smaller than ``min_size`` voxels and number the rest 1..n."""
    import fastremap

    from ..stitching import sequential_local_labels

    if min_size > 1:
        ids, sizes = fastremap.unique(labels, return_counts=True)
        small = ids[(sizes < min_size) & (ids != 0)]
        if small.size:
            labels = fastremap.mask(labels, small.tolist(), in_place=True)
    return sequential_local_labels(labels)[0].astype(np.int32, copy=False)


# -- argument checks --------------------------------------------------------------------------
def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name}={value!r} must be an int >= 0")
    return int(value)
