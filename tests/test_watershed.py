"""The built-in watershed segmenter: separation quality, global threshold, tiling, memory."""

from __future__ import annotations

import json
import math
import pickle
import tracemalloc

import numpy as np
import pytest

from blockbuster.errors import InputError
from blockbuster.io import open_image
from blockbuster.plugins.watershed import THRESHOLD_METHODS, WatershedSegmenter, compute_threshold
from blockbuster.testing import SegmenterConformance, synthetic_nuclei


def matched_fraction(truth: np.ndarray, labels: np.ndarray, iou: float = 0.5) -> float:
    """Fraction of true objects that one predicted object covers with IoU above ``iou``."""
    t, p = truth.ravel().astype(np.int64), labels.ravel().astype(np.int64)
    n_t, n_p = int(t.max()) + 1, int(p.max()) + 1
    overlap = np.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p)[1:, 1:]
    union = np.bincount(t, minlength=n_t)[1:, None] + np.bincount(p, minlength=n_p)[None, 1:]
    ious = overlap / np.maximum(union - overlap, 1)
    return float((ious > iou).any(axis=1).mean())


def prepared(seg: WatershedSegmenter, image: np.ndarray, channel_axis=None) -> WatershedSegmenter:
    seg.channel_axis = channel_axis
    seg.prepare(open_image(image, channel_axis))
    return seg


# -- what it finds ----------------------------------------------------------------------------
def test_two_touching_discs_are_two_objects() -> None:
    yy, xx = np.mgrid[:48, :64]
    left = (yy - 24) ** 2 + (xx - 22) ** 2 < 11**2
    right = (yy - 24) ** 2 + (xx - 42) ** 2 < 11**2  # centres 20 apart: the discs overlap
    image = ((left | right) * 1000 + 100).astype(np.uint16)
    labels = prepared(WatershedSegmenter(diameter=22), image)(image)
    assert labels.max() == 2
    a, b = np.bincount(labels[left & ~right]).argmax(), np.bincount(labels[right & ~left]).argmax()
    assert {a, b} == {1, 2}
    # Smoothing may round the waist between the discs by a pixel, no more.
    from scipy import ndimage

    assert not labels[~ndimage.binary_dilation(left | right)].any()


@pytest.mark.parametrize(("shape", "diameter"), [((256, 256), 12), ((256, 256), 6),
                                                 ((40, 96, 96), 12)])
def test_separates_touching_nuclei(shape: tuple[int, ...], diameter: float) -> None:
    image, truth = synthetic_nuclei(shape, diameter=diameter, seed=3, noise=0.1)
    labels = prepared(WatershedSegmenter(diameter=diameter), image)(image)
    assert labels.shape == shape and labels.dtype == np.int32
    # Dense, touching nuclei with noise: most are found whole and separate (measured 0.88-0.96).
    assert matched_fraction(truth, labels) > 0.85
    assert 0.85 < labels.max() / truth.max() < 1.15


def test_tiled_equals_untiled() -> None:
    """The global threshold and IoU stitching make the tiled result match the whole image."""
    from blockbuster.api import tile_process

    image, truth = synthetic_nuclei((192, 224), diameter=12, seed=7)
    whole = prepared(WatershedSegmenter(diameter=12), image)(image)
    tiled = np.asarray(tile_process(image, "watershed", tile_shape=(64, 64), progress=False)[...])
    assert tiled.max() == pytest.approx(whole.max(), abs=2)
    assert matched_fraction(whole, tiled, iou=0.9) > 0.98
    assert matched_fraction(truth, tiled) > 0.9


def test_multichannel_uses_the_chosen_channel() -> None:
    nuclei, truth = synthetic_nuclei((96, 96), diameter=12, seed=2)
    image = np.stack([np.zeros_like(nuclei), nuclei], axis=-1)  # channel 1 has the nuclei
    seg1 = prepared(WatershedSegmenter(diameter=12, channel=1), image, channel_axis=2)
    assert matched_fraction(truth, seg1(image)) > 0.85
    seg0 = prepared(WatershedSegmenter(diameter=12), image, channel_axis=2)
    assert not seg0(image).any()


def test_channel_out_of_range_is_an_input_error() -> None:
    image = np.zeros((2, 32, 32), np.uint8)
    with pytest.raises(InputError, match="2 channel"):
        prepared(WatershedSegmenter(channel=2), image, channel_axis=0)
    seg = WatershedSegmenter(channel=1, threshold=1)
    with pytest.raises(InputError, match="no channel axis"):
        seg(np.zeros((8, 8)))


@pytest.mark.parametrize("value", [0, 7])
def test_constant_tile_is_background(value: int) -> None:
    image, _ = synthetic_nuclei((64, 64), diameter=10)
    seg = prepared(WatershedSegmenter(diameter=10), image)
    labels = seg(np.full((32, 40), value, np.uint16))
    assert labels.shape == (32, 40) and not labels.any()


def test_small_specks_are_removed() -> None:
    image = np.zeros((64, 64), np.uint16)
    image[10:22, 10:22] = 1000  # a nucleus
    image[40, 40] = image[50:52, 50] = 1000  # specks
    labels = WatershedSegmenter(diameter=12, sigma=0, threshold=500)(image)
    assert labels.max() == 1 and labels[15, 15] == 1
    kept = WatershedSegmenter(diameter=12, sigma=0, threshold=500, min_size=1)(image)
    assert kept.max() == 3


# -- the threshold ----------------------------------------------------------------------------
def test_prepare_computes_one_global_threshold() -> None:
    image, _ = synthetic_nuclei((128, 160), diameter=12, seed=4)
    src = open_image(image)
    seg = WatershedSegmenter(diameter=12)
    seg.prepare(src)
    assert seg.global_threshold == pytest.approx(compute_threshold(src.sample()[:, 0]))
    # Background and nuclei lie on either side of it.
    assert np.median(image) < seg.global_threshold < np.percentile(image, 95)


def test_global_threshold_is_used_for_every_tile() -> None:
    """A tile of dim nuclei only: a per-tile threshold would find its noise; the global one not."""
    image, _ = synthetic_nuclei((128, 128), diameter=12, seed=5)
    seg = prepared(WatershedSegmenter(diameter=12), image)
    background = np.full((48, 48), np.median(image), np.uint16)
    background += np.random.default_rng(0).integers(0, 50, background.shape, dtype=np.uint16)
    assert not seg(background).any()


def test_explicit_threshold_wins() -> None:
    image, _ = synthetic_nuclei((96, 96), diameter=12, seed=1)
    seg = prepared(WatershedSegmenter(diameter=12, threshold=float(image.max())), image)
    assert seg.global_threshold is None
    assert not seg(image).any()  # nothing is above the image's maximum


def test_without_prepare_thresholds_per_tile_with_a_warning() -> None:
    image, truth = synthetic_nuclei((96, 96), diameter=12, seed=1)
    seg = WatershedSegmenter(diameter=12)
    with pytest.warns(RuntimeWarning, match="prepare"):
        labels = seg(image)
    assert matched_fraction(truth, labels) > 0.85
    seg(image)  # warns once per instance, not per tile (an error here with filterwarnings)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_threshold_methods_split_a_bimodal_image(method: str) -> None:
    rng = np.random.default_rng(0)
    background, foreground = rng.normal(100, 5, 5000), rng.normal(1000, 50, 1000)
    t = compute_threshold(np.r_[background, foreground], method)
    assert (background > t).mean() < 0.01
    assert (foreground <= t).mean() < 0.01


def test_threshold_on_a_grey_level_is_moved_off_it() -> None:
    values = np.r_[np.full(60, 100.0), np.full(40, 1100.0)]
    t = compute_threshold(values)
    assert 100 < t < 1100  # smoothing's rounding errors around 100 stay background


# -- arguments and declared attributes --------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"diameter": 0}, {"diameter": -3}, {"diameter": "12"},
                                    {"diameter": float("nan")}, {"sigma": -1},
                                    {"threshold_method": "magic"}, {"min_distance": 0},
                                    {"min_size": -1}, {"channel": -1}, {"threshold": True}])
def test_bad_arguments_are_input_errors(kwargs: dict) -> None:
    with pytest.raises(InputError):
        WatershedSegmenter(**kwargs)


def test_declared_preferences_follow_the_diameter() -> None:
    seg = WatershedSegmenter(diameter=17.5)
    assert seg.preferred_overlap == 18
    assert seg.preferred_stitch == "iou"
    assert seg.spatial_ndim is None
    assert seg.sigma == pytest.approx(17.5 / 12)
    assert seg.min_distance == round(17.5 / 3)
    config = json.loads(json.dumps(seg.config()))
    assert config["diameter"] == 17.5 and config["threshold_method"] == "otsu"


def test_pickle_carries_the_global_threshold() -> None:
    image, _ = synthetic_nuclei((64, 64), diameter=10, seed=1)
    seg = prepared(WatershedSegmenter(diameter=10), image)
    copy = pickle.loads(pickle.dumps(seg))
    assert copy.global_threshold == seg.global_threshold
    np.testing.assert_array_equal(copy(image), seg(image))


@pytest.mark.parametrize("shape", [(512, 512), (48, 96, 96)])
def test_memory_model_covers_the_measured_peak(shape: tuple[int, ...]) -> None:
    image, _ = synthetic_nuclei(shape, diameter=12, seed=1)
    seg = prepared(WatershedSegmenter(diameter=12), image)
    seg(image[tuple(slice(0, 16) for _ in shape)])  # imports and first-call set-up
    tracemalloc.start()
    try:
        seg(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    predicted = seg.memory_model.peak_bytes(math.prod(shape), image.dtype.itemsize)
    assert peak <= predicted
    assert peak > predicted / 3  # a real estimate, not an arbitrary bound


# -- the conformance kit ----------------------------------------------------------------------
class TestWatershedConformance(SegmenterConformance):
    diameter = 10

    @pytest.fixture
    def make_segmenter(self):
        return lambda: WatershedSegmenter(diameter=10)


class TestWatershedConformanceMultichannel(SegmenterConformance):
    diameter = 10
    channel_axis = -1
    n_channels = 2

    @pytest.fixture
    def make_segmenter(self):
        return lambda: WatershedSegmenter(diameter=10)
