"""Tools for testing segmenters: synthetic images and the plugin conformance kit.

Every segmenter that ``tile_process`` runs, built-in or third-party, should pass the same
checks: the right output shape and dtype on 2-D and 3-D tiles of odd sizes, background on an
empty tile, cheap pickling that gives the same result, valid declared attributes, and a model
loaded once per process however many tiles run. A plugin author runs them in one line::

    from blockbuster.testing import check_segmenter
    check_segmenter(MySegmenter(), image)

or, with pytest, subclasses :class:`SegmenterConformance` (needs pytest) and overrides its
``make_segmenter`` fixture; every check then runs as its own test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conformance import (
    ConformanceFailure,
    check_attributes,
    check_empty_tile,
    check_model_loaded_once,
    check_odd_tile_sizes,
    check_output,
    check_pickle,
    check_segmenter,
    check_tile_process,
    count_model_loads,
)

__all__ = [
    "ConformanceFailure",
    "SegmenterConformance",
    "check_attributes",
    "check_empty_tile",
    "check_model_loaded_once",
    "check_odd_tile_sizes",
    "check_output",
    "check_pickle",
    "check_segmenter",
    "check_tile_process",
    "count_model_loads",
    "synthetic_nuclei",
]


def __getattr__(name: str) -> Any:
    # The pytest base class imports pytest, which is only a test dependency.
    if name == "SegmenterConformance":
        from . import conformance

        return conformance.SegmenterConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def synthetic_nuclei(
    shape: tuple[int, ...],
    diameter: float = 12,
    density: float = 0.5,
    *,
    seed: int = 0,
    noise: float = 0.05,
    touching: bool = True,
    dtype: Any = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like image of round nuclei (2-D or 3-D) and its true labels.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the image (2 or 3 axes).
    diameter : float
        Mean nucleus diameter in voxels (each varies by +-20 %).
    density : float
        Fraction of the image covered by nuclei, roughly (before overlaps).
    seed : int
        Random seed; the same seed gives the same image.
    noise : float
        Standard deviation of the Gaussian noise, relative to the mean nucleus brightness.
    touching : bool
        Let neighbouring nuclei touch (centres down to 0.85 x the sum of radii apart), as in
        dense tissue; otherwise keep a gap of at least 2 voxels.
    dtype : numpy dtype
        Integer dtype of the image (values are scaled to about a quarter of its range).

    Returns
    -------
    image : numpy.ndarray
        The image, ``dtype``.
    labels : numpy.ndarray
        int32 ground truth: 1..n, 0 background; where two nuclei touch each voxel belongs to
        the nearer centre (relative to the radii).

    Examples
    --------
    >>> image, labels = synthetic_nuclei((64, 64), diameter=10, seed=1)
    >>> image.shape, image.dtype.name, labels.dtype.name, int(labels.max()) > 5
    ((64, 64), 'uint16', 'int32', True)
    """
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape={shape} must have 2 or 3 positive axes")
    rng = np.random.default_rng(seed)
    centres, radii = _place_nuclei(shape, diameter, density, touching, rng)
    labels, brightness = _paint(shape, centres, radii, rng)
    image = _render(labels, brightness, diameter, noise, rng)
    info = np.iinfo(dtype)
    scale = (info.max - max(info.min, 0)) / 4
    image = np.clip(image * scale + max(info.min, 0), info.min, info.max)
    return image.astype(dtype), labels


def _place_nuclei(shape, diameter, density, touching, rng):
    ndim = len(shape)
    volume = float(np.prod(shape))
    ball = np.pi ** (ndim / 2) / _gamma(ndim / 2 + 1) * (diameter / 2) ** ndim
    wanted = max(1, int(density * volume / ball))
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(wanted * 30):  # dart throwing; gives up quietly when the image is full
        if len(centres) == wanted:
            break
        r = diameter / 2 * rng.uniform(0.8, 1.2)
        c = rng.uniform(0, 1, ndim) * np.asarray(shape, float)
        if centres:
            d = np.linalg.norm(np.asarray(centres) - c, axis=1)
            limit = 0.85 * (np.asarray(radii) + r) if touching else np.asarray(radii) + r + 2
            if (d < limit).any():
                continue
        centres.append(c)
        radii.append(r)
    return centres, radii


def _paint(shape, centres, radii, rng):
    labels = np.zeros(shape, np.int32)
    score = np.full(shape, np.inf, np.float32)
    for i, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        lo = [max(0, int(np.floor(ci - r))) for ci in c]
        hi = [min(s, int(np.ceil(ci + r)) + 1) for ci, s in zip(c, shape, strict=True)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.ogrid[box]
        rel = sum(((g + 0.5 - ci) / r) ** 2 for g, ci in zip(grids, c, strict=True))
        rel = np.sqrt(rel).astype(np.float32)
        take = (rel < 1.0) & (rel < score[box])
        labels[box][take] = i
        score[box][take] = rel[take]
    brightness = np.r_[0.0, rng.uniform(0.6, 1.4, len(centres))]
    return labels, brightness


def _render(labels, brightness, diameter, noise, rng):
    from scipy import ndimage as ndi

    image = brightness[labels].astype(np.float32)
    image = ndi.gaussian_filter(image, max(0.5, diameter / 12), mode="nearest")
    image += 0.1 + rng.normal(0.0, noise, labels.shape).astype(np.float32)
    return image


def _gamma(x: float) -> float:
    import math

    return math.gamma(x)
