"""Cells from nuclei: one cell per nucleus by a seeded watershed on a membrane or cytoplasm stain.

The image has (at least) two channels: nuclei and a membrane or cytoplasm stain. Nuclei are
segmented with the built-in :class:`~blockbuster.plugins.watershed.WatershedSegmenter` (or
taken as they are when the nuclei channel already holds labels, e.g. a blockbuster output
stacked with the image), and every nucleus grows into its cell by a watershed on the second
channel, seeded by the nuclei (scikit-image):

* membrane stain: the landscape is the smoothed membrane signal, so cells meet on the bright
  membranes;
* cytoplasm stain: the landscape is the inverted smoothed signal, so cells meet where the
  cytoplasm is dimmest, and the cell foreground is the signal above a threshold computed once
  for the whole image.

A cell never reaches further than ``max_radius`` from its nucleus. Cells are whole objects
about a cell diameter across, so they are stitched like other learned methods' objects: a halo
of one cell diameter and IoU matching.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..segmenter import MemoryModel, Segmenter
from ._checks import channel_index, finite, non_negative, positive
from .watershed import (
    THRESHOLD_METHODS,
    WatershedSegmenter,
    check_diameter,
    check_finite_sample,
    check_kernels,
    compute_threshold,
    gaussian_kernel_size,
)

if TYPE_CHECKING:
    from ..io import ImageSource

__all__ = ["NUCLEI_INPUTS", "STAINS", "CellsSegmenter"]

STAINS = ("membrane", "cytoplasm")
NUCLEI_INPUTS = ("intensity", "labels")

# Peak working memory of segment() per padded voxel, measured with tracemalloc on
# synthetic_cells tiles (uint16, membrane and cytoplasm stains alike): 43 B/voxel for a 2-D
# 1024^2 tile and 59 B/voxel for a 3-D 48x160x160 tile, output included. The peak is the nuclei
# watershed (see watershed.py); the cells' watershed after it (float32 landscape, the float64
# distance map limiting the reach, int32 seeds and output) stays below. 68 B/voxel leaves ~15 %
# headroom in 3-D; the selected channels' copies are the input-byte term.
_BYTES_PER_VOXEL = 68.0
_BYTES_PER_INPUT_BYTE = 1.0


class CellsSegmenter(Segmenter):
    """One cell per nucleus: nuclei seeds, grown by a watershed on a membrane/cytoplasm channel.

    Parameters
    ----------
    diameter : float
        Typical cell diameter in voxels: the preferred overlap, and the default reach and
        nucleus size.
    nucleus_diameter : float, optional
        Typical nucleus diameter in voxels (default ``diameter / 2``), for segmenting nuclei.
    nuclei_channel, membrane_channel : int
        Channel indices of the nuclei and of the membrane or cytoplasm stain.
    stain : {"membrane", "cytoplasm"}
        What the second channel shows (see the module description).
    nuclei : {"intensity", "labels"}
        "labels": the nuclei channel already holds nucleus labels (0 = background), e.g. a
        blockbuster output stacked with the membrane channel; they seed the cells as they are.
    max_radius : float, optional
        Farthest a cell reaches from its nucleus, in voxels (default ``0.75 * diameter``).
    threshold : float, optional
        Cytoplasm stain only: foreground threshold on the raw second channel. Default:
        computed once for the whole image in :meth:`prepare` with ``threshold_method``.
    threshold_method : str
        As for :class:`~blockbuster.plugins.watershed.WatershedSegmenter`.
    nuclei_threshold : float, optional
        Foreground threshold of the nuclei channel (default: computed once, like the
        watershed segmenter's).
    sigma : float, optional
        Smoothing of the second channel in voxels (default ``diameter / 30``, at least 0.5).
    compactness : float
        scikit-image watershed compactness: larger values give rounder cells that care less
        about the stain.

    Examples
    --------
    >>> from blockbuster.data import synthetic_cells
    >>> from blockbuster.io import open_image
    >>> image, nuclei, cells = synthetic_cells((96, 96), nucleus_diameter=8, seed=2)
    >>> seg = CellsSegmenter(diameter=18)
    >>> seg.channel_axis = 0
    >>> seg.prepare(open_image(image, channel_axis=0))
    >>> labels = seg(image)
    >>> labels.shape, labels.dtype.name, int(labels.max()) == len(np.unique(nuclei)) - 1
    ((96, 96), 'int32', True)
    """

    name = "cells"
    preferred_stitch = "iou"
    spatial_ndim = None

    def __init__(
        self,
        diameter: float = 30,
        nucleus_diameter: float | None = None,
        nuclei_channel: int = 0,
        membrane_channel: int = 1,
        stain: str = "membrane",
        nuclei: str = "intensity",
        max_radius: float | None = None,
        threshold: float | None = None,
        threshold_method: str = "otsu",
        nuclei_threshold: float | None = None,
        sigma: float | None = None,
        compactness: float = 0.0,
    ) -> None:
        self.diameter = positive("diameter", diameter)
        self._sigma_given = sigma is not None
        self.nucleus_diameter = (self.diameter / 2 if nucleus_diameter is None
                                 else positive("nucleus_diameter", nucleus_diameter))
        self.nuclei_channel = channel_index("nuclei_channel", nuclei_channel)
        self.membrane_channel = channel_index("membrane_channel", membrane_channel)
        if self.nuclei_channel == self.membrane_channel:
            raise InputError(f"nuclei_channel and membrane_channel are both "
                             f"{self.nuclei_channel}; cells need two channels")
        if stain not in STAINS:
            raise InputError(f"stain={stain!r} must be one of {', '.join(STAINS)}")
        if nuclei not in NUCLEI_INPUTS:
            raise InputError(f"nuclei={nuclei!r} must be one of {', '.join(NUCLEI_INPUTS)}")
        if threshold_method not in THRESHOLD_METHODS:
            raise InputError(f"threshold_method={threshold_method!r} must be one of "
                             f"{', '.join(THRESHOLD_METHODS)}")
        self.stain, self.nuclei, self.threshold_method = stain, nuclei, threshold_method
        self.max_radius = (0.75 * self.diameter if max_radius is None
                           else positive("max_radius", max_radius))
        self.threshold = None if threshold is None else finite("threshold", threshold)
        self.nuclei_threshold = (None if nuclei_threshold is None
                                 else finite("nuclei_threshold", nuclei_threshold))
        self.sigma = (max(0.5, self.diameter / 30) if sigma is None
                      else non_negative("sigma", sigma))
        self.compactness = non_negative("compactness", compactness)
        #: Set by prepare(): the cytoplasm threshold shared by all tiles.
        self.global_threshold: float | None = None
        self._nuclei = WatershedSegmenter(diameter=self.nucleus_diameter,
                                          threshold=self.nuclei_threshold,
                                          threshold_method=threshold_method,
                                          channel=self.nuclei_channel)

    # -- declared preferences ---------------------------------------------------------------------
    @property
    def preferred_overlap(self) -> int:  # type: ignore[override]
        """One cell diameter: a cell touching the tile core lies wholly inside the halo."""
        return math.ceil(self.diameter)

    @property
    def memory_model(self) -> MemoryModel:  # type: ignore[override]
        return MemoryModel(bytes_per_input_byte=_BYTES_PER_INPUT_BYTE,
                           bytes_per_voxel=_BYTES_PER_VOXEL)

    def config(self) -> dict[str, Any]:
        return {
            "diameter": self.diameter, "nucleus_diameter": self.nucleus_diameter,
            "nuclei_channel": self.nuclei_channel, "membrane_channel": self.membrane_channel,
            "stain": self.stain, "nuclei": self.nuclei, "max_radius": self.max_radius,
            "threshold": self.threshold, "threshold_method": self.threshold_method,
            "nuclei_threshold": self.nuclei_threshold, "sigma": self.sigma,
            "compactness": self.compactness,
        }

    def check_plan(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   overlap: tuple[int, ...]) -> None:
        """Cells or nuclei larger than the image, or smoothing larger than the image or the
        tile, cannot make sense; so neither can the nuclei watershed's own kernels."""
        check_diameter("diameter", self.diameter, spatial_shape)
        check_diameter("nucleus_diameter", self.nucleus_diameter, spatial_shape)
        if self.sigma > 0:
            sigma = (f"sigma={self.sigma!r}" if getattr(self, "_sigma_given", True) else
                     f"diameter={self.diameter!r} (which sets sigma={self.sigma:g})")
            check_kernels([(f"the smoothing of the second channel by {sigma}",
                            gaussian_kernel_size(self.sigma))], spatial_shape, tile_shape,
                          overlap)
        if self.nuclei == "intensity":
            kernels = [(f"{what.replace('diameter=', 'nucleus_diameter=')}", size)
                       for what, size in self._nuclei.kernels()]
            check_kernels(kernels, spatial_shape, tile_shape, overlap)

    # -- running --------------------------------------------------------------------------------
    def prepare(self, image: ImageSource) -> None:
        """Thresholds computed once from a streamed subsample of the whole image."""
        if image.channel_axis is None:
            raise InputError("the cells segmenter needs an image with a channel axis (nuclei "
                             "and a membrane or cytoplasm channel); pass channel_axis=")
        top = max(self.nuclei_channel, self.membrane_channel)
        if top >= image.n_channels:
            raise InputError(f"channel {top} is requested but the image has {image.n_channels} "
                             "channel(s)")
        if self.nuclei == "intensity":
            self._nuclei.channel_axis = self.channel_axis
            self._nuclei.prepare(image)
        if self.stain == "cytoplasm" and self.threshold is None:
            values = check_finite_sample(image.sample()[:, self.membrane_channel], image,
                                         "the cytoplasm threshold")
            self.global_threshold = compute_threshold(values, self.threshold_method)

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Cells of one tile: int32 labels of its spatial shape, one cell per nucleus."""
        if self.channel_axis is None:
            raise InputError("the cells segmenter needs a channel axis (nuclei and membrane); "
                             "pass channel_axis= to tile_process")
        if max(self.nuclei_channel, self.membrane_channel) >= tile.shape[self.channel_axis]:
            raise InputError(f"the tile has {tile.shape[self.channel_axis]} channel(s); the "
                             f"cells segmenter reads channels {self.nuclei_channel} and "
                             f"{self.membrane_channel}")
        seeds = self._seeds(tile)
        if not seeds.any():
            return seeds
        stain = np.take(tile, self.membrane_channel, axis=self.channel_axis)
        return self._grow(seeds, stain)

    def _seeds(self, tile: np.ndarray) -> np.ndarray:
        if self.nuclei == "labels":
            from .._labels import renumber

            labels = np.take(tile, self.nuclei_channel, axis=self.channel_axis)
            if not np.issubdtype(labels.dtype, np.integer):
                if labels.size and (labels != np.round(labels)).any():
                    raise InputError("nuclei='labels' but the nuclei channel holds fractions; "
                                     "stack the nucleus labels with an integer image")
                labels = labels.astype(np.int64)
            return renumber(labels)[0].astype(np.int32)
        self._nuclei.channel_axis = self.channel_axis
        return self._nuclei.segment(tile)

    def _grow(self, seeds: np.ndarray, stain: np.ndarray) -> np.ndarray:
        from scipy import ndimage as ndi
        from skimage.segmentation import watershed

        smooth = stain.astype(np.float32, copy=False)
        if self.sigma > 0:
            smooth = ndi.gaussian_filter(smooth, self.sigma, mode="nearest", output=np.float32)
        mask = ndi.distance_transform_edt(seeds == 0) <= self.max_radius
        if self.stain == "cytoplasm":
            mask &= (smooth > self._cytoplasm_threshold(stain)) | (seeds > 0)
            np.negative(smooth, out=smooth)  # cells meet where the cytoplasm is dimmest
        cells = watershed(smooth, seeds, mask=mask, compactness=self.compactness)
        return cells.astype(np.int32, copy=False)

    def _cytoplasm_threshold(self, stain: np.ndarray) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.global_threshold is not None:
            return self.global_threshold
        return compute_threshold(stain.ravel(), self.threshold_method)


