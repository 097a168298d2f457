"""The plugin test kit: it passes good segmenters and catches every kind of broken one."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import numpy as np
import pytest
from scipy import ndimage

import blockbuster.plugins as plugins
from blockbuster.plugins import ModelCache, get_segmenter
from blockbuster.segmenter import MemoryModel, Segmenter
from blockbuster.testing import (
    ConformanceFailure,
    SegmenterConformance,
    check_attributes,
    check_empty_tile,
    check_model_loaded_once,
    check_output,
    check_pickle,
    check_segmenter,
    synthetic_nuclei,
)
from blockbuster.testing.conformance import conformance_image


class Labeller(Segmenter):
    """A well-behaved segmenter with a 'model' (a threshold) loaded lazily through a cache."""

    name = "labeller"
    preferred_overlap = 5
    preferred_stitch = "iou"
    memory_model = MemoryModel(bytes_per_voxel=16)
    cache = ModelCache("labeller")

    def __init__(self, level: float = 0.5) -> None:
        self.level = level

    @property
    def model_cache(self) -> ModelCache:
        return self.cache

    def config(self) -> dict:
        return {"level": self.level}

    def prepare(self, image) -> None:
        self.scale = float(image.sample().max()) or 1.0

    def segment(self, tile: np.ndarray) -> np.ndarray:
        threshold = self.cache.get(("level", self.level), lambda: self.level)
        if self.channel_axis is not None:
            tile = np.take(tile, 0, axis=self.channel_axis)
        return ndimage.label(tile / self.scale > threshold)[0]


# Broken variants, one promise broken each (module level so that they pickle by reference).
class FloatLabels(Labeller):
    def segment(self, tile):
        return super().segment(tile).astype(np.float32)


class WrongShape(Labeller):
    def segment(self, tile):
        return super().segment(tile)[1:]


class NegativeLabels(Labeller):
    def segment(self, tile):
        return -super().segment(tile)


class HeavyPickle(Labeller):
    def prepare(self, image):
        super().prepare(image)
        self.weights = np.ones(1_000_000)  # "weights" kept on the instance


class ReloadsEveryTile(Labeller):
    def segment(self, tile):
        self.cache.clear()
        return super().segment(tile)


class SeesGhosts(Labeller):
    def segment(self, tile):
        labels = super().segment(tile)
        labels[0, ...] = 1
        return labels


class Unstable(Labeller):
    """Gives different labels after pickling (state lost that prepare() set)."""

    def __getstate__(self):
        return {"level": self.level, "scale": self.scale * 10}


class BadStitch(Labeller):
    preferred_stitch = "sometimes"


class BadMemoryModel(Labeller):
    memory_model = {"bytes_per_voxel": 16}  # noqa: RUF012 -- the mistake under test


class BadOverlap(Labeller):
    preferred_overlap = -2


class NonJsonConfig(Labeller):
    def config(self):
        return {"level": self.level, "model": object()}


@pytest.fixture(autouse=True)
def fresh_cache():
    Labeller.cache.clear()
    Labeller.cache.loads.clear()


@pytest.fixture(params=[2, 3])
def image(request) -> np.ndarray:
    return conformance_image(request.param)


# -- good segmenters pass ---------------------------------------------------------------------
def test_a_good_segmenter_passes_every_check(image: np.ndarray) -> None:
    passed = check_segmenter(Labeller(), image)
    assert passed == ["attributes", "output", "odd tile sizes", "pickle", "model loaded once",
                      "empty tile", "tile_process"]


def test_a_plain_function_passes_without_the_model_check(image: np.ndarray) -> None:
    passed = check_segmenter(_plain_labeller, image)
    assert "model loaded once" not in passed and "tile_process" in passed


def _plain_labeller(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > np.percentile(tile, 80))[0]


def test_channel_axis_is_announced_before_prepare() -> None:
    image = conformance_image(2, channel_axis=0, n_channels=2)
    seg = Labeller()
    check_segmenter(seg, image, channel_axis=0, end_to_end=False)
    assert seg.channel_axis == 0


# -- broken segmenters fail, each with a message that says why --------------------------------
@pytest.mark.parametrize(("cls", "check", "message"), [
    (FloatLabels, check_output, "dtype float32"),
    (WrongShape, check_output, "expected"),
    (NegativeLabels, check_output, "negative labels"),
    (HeavyPickle, check_pickle, "pickles to"),
    (Unstable, check_pickle, "different labels after a pickle"),
    (SeesGhosts, check_empty_tile, "all-zero tile"),
])
def test_each_broken_promise_is_caught(cls, check, message: str) -> None:
    image = conformance_image(2)
    seg = cls()
    seg.prepare(_source(image))
    with pytest.raises(ConformanceFailure, match=message):
        check(seg, image[:32, :40])


def test_reloading_the_model_every_tile_is_caught() -> None:
    image = conformance_image(2)
    seg = ReloadsEveryTile()
    seg.prepare(_source(image))
    with pytest.raises(ConformanceFailure, match="loaded its model"):
        check_model_loaded_once(seg, [image[:32, :32], image[32:, 32:]])


@pytest.mark.parametrize(("cls", "message"), [
    (BadStitch, "preferred_stitch"),
    (BadMemoryModel, "memory_model must be a MemoryModel"),
    (BadOverlap, "preferred_overlap"),
    (NonJsonConfig, "JSON-serialisable"),
])
def test_invalid_declarations_are_caught(cls, message: str) -> None:
    with pytest.raises(ConformanceFailure, match=message):
        check_attributes(cls())


def test_check_segmenter_reports_all_failures_at_once() -> None:
    class Everything(NegativeLabels):
        preferred_stitch = "sometimes"

    with pytest.raises(ConformanceFailure) as info:
        check_segmenter(Everything(), conformance_image(2), end_to_end=False)
    text = str(info.value)
    assert "attributes:" in text and "output:" in text and "negative labels" in text


def _source(image: np.ndarray):
    from blockbuster.io import open_image

    return open_image(image)


# -- synthetic images -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(80, 96), (20, 48, 56)])
def test_synthetic_nuclei_are_reproducible_and_bright_where_labelled(shape) -> None:
    image, labels = synthetic_nuclei(shape, diameter=10, seed=4)
    again, labels_again = synthetic_nuclei(shape, diameter=10, seed=4)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert image.shape == labels.shape == shape
    assert np.median(image[labels > 0]) > 3 * np.median(image[labels == 0])
    other, _ = synthetic_nuclei(shape, diameter=10, seed=5)
    assert not np.array_equal(image, other)
    # Labels are 1..n without gaps.
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))


# -- a third-party plugin, registered at run time, through the kit ----------------------------
TOY_SOURCE = '''
import numpy as np
from scipy import ndimage
from blockbuster.plugins import ModelCache
from blockbuster.segmenter import MemoryModel, Segmenter

CACHE = ModelCache("toy-kit")


class KitToy(Segmenter):
    name = "kit-toy"
    preferred_overlap = 6
    preferred_stitch = "iou"
    memory_model = MemoryModel(bytes_per_voxel=24)

    def __init__(self, quantile=0.8):
        self.quantile = quantile
        self.level = None

    model_cache = property(lambda self: CACHE)

    def config(self):
        return {"quantile": self.quantile}

    def prepare(self, image):
        self.level = float(np.quantile(image.sample()[:, 0], self.quantile))

    def segment(self, tile):
        smooth = CACHE.get("filter", lambda: (lambda t: ndimage.uniform_filter(t, 3)))
        return ndimage.label(smooth(tile.astype(np.float32)) > self.level)[0]
'''


@pytest.fixture
def kit_toy_registered(monkeypatch: pytest.MonkeyPatch):
    """Register 'kit-toy' by extending the entry-point listing blockbuster reads."""
    module = types.ModuleType("bb_kit_toy")
    exec(compile(TOY_SOURCE, "bb_kit_toy.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "bb_kit_toy", module)
    real = plugins.entry_points

    def entry_points(group: str):
        extra = importlib.metadata.EntryPoint("kit-toy", "bb_kit_toy:KitToy", group)
        return [*real(group=group), extra]

    monkeypatch.setattr(plugins, "entry_points", entry_points)
    return module


@pytest.mark.usefixtures("kit_toy_registered")
class TestThirdPartyPluginConformance(SegmenterConformance):
    diameter = 8

    @pytest.fixture
    def make_segmenter(self):
        return lambda: get_segmenter("kit-toy", quantile=0.7)

    def test_it_is_listed(self) -> None:
        assert "kit-toy" in plugins.available_segmenters()
