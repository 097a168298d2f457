"""The StarDist plugin, tested with untrained models built here (no weights are downloaded).

Small untrained StarDist2D/StarDist3D models are built from a ``Config2D``/``Config3D``, saved
to a temporary folder (config, weights, thresholds) and loaded through the same path as a
user's own model: a folder name with ``basedir=``, or the folder's path. Tests that need the
pretrained weights are marked ``weights`` and skip unless the weights are cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from blockbuster.errors import InputError
from blockbuster.io import open_image
from blockbuster.plugins import stack_plane_labels
from blockbuster.testing import SegmenterConformance, synthetic_nuclei

from helpers import prepared, spy_on

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("stardist") is None
                       or importlib.util.find_spec("tensorflow") is None,
                       reason='needs stardist: pip install "blockbuster[stardist]"'),
    # Keras 3 on NumPy 2 warns about __array__(copy=...) inside its own code.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:"
                               "DeprecationWarning"),
]


def _save_untrained(model, thresholds: dict) -> None:
    """Weights and thresholds next to config.json, as training leaves a model folder."""
    model.keras_model.save_weights(str(model.logdir / "weights_best.h5"))
    (model.logdir / "thresholds.json").write_text(json.dumps(thresholds))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two untrained models: 'tiny2d' and 'tiny3d' (anisotropic)."""
    import tensorflow as tf
    from stardist.models import Config2D, Config3D, StarDist2D, StarDist3D

    tf.random.set_seed(0)  # the same untrained networks in every run
    base = tmp_path_factory.mktemp("stardist")
    small = {"unet_n_depth": 1, "unet_n_filter_base": 4, "net_conv_after_unet": 8}
    _save_untrained(StarDist2D(Config2D(n_rays=8, grid=(2, 2), **small), name="tiny2d",
                               basedir=str(base)), {"prob": 0.5, "nms": 0.4})
    _save_untrained(StarDist3D(Config3D(n_rays=16, grid=(1, 2, 2), anisotropy=(2.0, 1.0, 1.0),
                                        **small), name="tiny3d", basedir=str(base)),
                    {"prob": 0.5, "nms": 0.4})
    return base


@pytest.fixture
def make(model_dir: Path):
    from blockbuster.plugins.stardist import stardist_fn

    def make(model: str = "tiny2d", **kwargs):
        return stardist_fn(model, basedir=model_dir, **kwargs)

    return make


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch):
    return lambda seg: spy_on(monkeypatch, seg.load_model(), "predict_instances")


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    image, _ = synthetic_nuclei((3, 64, 80), diameter=12, seed=2)
    return image


# -- resolving models -------------------------------------------------------------------------
def test_local_folder_by_name_and_by_path(make, model_dir: Path) -> None:
    from blockbuster.plugins.stardist import stardist_fn

    by_name = make("tiny2d")
    by_path = stardist_fn(str(model_dir / "tiny2d"))
    assert by_name.n_dim == by_path.n_dim == 2
    assert by_name._cache_key() == by_path._cache_key()  # one model for both
    assert make("tiny3d").n_dim == 3


def test_pretrained_names_and_aliases_resolve_without_download() -> None:
    from blockbuster.plugins.stardist import stardist_fn

    fluo = stardist_fn("2D_versatile_fluo")
    assert (fluo.n_dim, fluo.preferred_overlap, fluo.spatial_ndim) == (2, 32, 2)
    he = stardist_fn("Versatile (H&E nuclei)")
    assert he.model == "2D_versatile_he" and he.spec["n_channel_in"] == 3
    demo3d = stardist_fn("3D_demo")
    assert demo3d.n_dim == 3 and demo3d.spatial_ndim is None


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    ("2D_versatile_flou", {}, "neither a pretrained StarDist model"),
    ("/no/such/model", {}, "no StarDist model folder"),
    ("missing", {"basedir": "."}, "no StarDist model folder"),
    ("2D_versatile_fluo", {"prob_thresh": 1.5}, "prob_thresh"),
    ("2D_versatile_fluo", {"n_tiles": (2, 2, 2)}, "n_tiles"),
    ("2D_versatile_fluo", {"normalize": "per-tile"}, "normalize"),
    ("2D_versatile_fluo", {"n_tile": (2, 2)}, "unknown StarDist argument"),
    ("2D_versatile_fluo", {"axes": "YX"}, "cannot be passed"),
    ("2D_versatile_he", {"channel": 1}, "single-channel model"),
])
def test_bad_arguments_are_input_errors(model: str, kwargs: dict, message: str) -> None:
    from blockbuster.plugins.stardist import stardist_fn

    with pytest.raises(InputError, match=message):
        stardist_fn(model, **kwargs)


def test_declared_attributes(make) -> None:
    seg2, seg3 = make("tiny2d"), make("tiny3d")
    assert seg2.preferred_overlap == 32 and seg2.spatial_ndim == 2
    # Objects of the 3-D model are half as extended in z (anisotropy 2).
    assert seg3.preferred_overlap == (16, 32, 32) and seg3.spatial_ndim is None
    assert seg3.memory_model.per_voxel_bytes(2) > seg2.memory_model.per_voxel_bytes(2)
    assert seg2.preferred_stitch == "iou"
    config = json.loads(json.dumps(seg2.config()))
    assert config["model"] == "tiny2d" and config["percentiles"] == [1.0, 99.8]


def test_grid_is_stardists_own_input_divisor(make) -> None:
    from blockbuster.segmenter import describe_segmenter

    seg2, seg3 = make("tiny2d"), make("tiny3d")
    # grid x unet_pool ** unet_n_depth: (2, 2) x 2 and (1, 2, 2) x 2 for the tiny models
    assert seg2.grid == tuple(seg2.load_model()._axes_div_by("YX")) == (4, 4)
    assert seg3.grid == tuple(seg3.load_model()._axes_div_by("ZYX")) == (2, 4, 4)
    assert describe_segmenter(seg3).grid == (2, 4, 4)


def test_preferred_overlap_is_a_multiple_of_the_grid(tmp_path: Path) -> None:
    from blockbuster.plugins.stardist import stardist_fn

    # An anisotropic 3-D model as trained on stardist's own img3d: 32 / anisotropy gives
    # (15, 32, 30), off its (4, 8, 8) grid.
    folder = tmp_path / "aniso3d"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "n_dim": 3, "axes": "ZYXC", "n_channel_in": 1, "grid": [1, 2, 2],
        "anisotropy": [2.142857, 1.0, 1.071429], "backbone": "unet", "unet_n_depth": 2,
        "unet_pool": [2, 2, 2]}))
    seg = stardist_fn(folder)
    assert seg.grid == (4, 8, 8)
    assert seg.preferred_overlap == (16, 32, 32)


def test_a_model_folder_prefers_half_its_receptive_field_as_overlap(tmp_path: Path) -> None:
    from blockbuster.plugins.stardist import stardist_fn

    # 2D_versatile_fluo's architecture as a model folder: a 106 px field, so 53 -> 64 on its
    # 16 px grid; the pretrained name keeps the guide's 32 (its config is not known before
    # the download, and a run must plan the same before and after it).
    folder = tmp_path / "fluo_like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "n_dim": 2, "axes": "YXC", "n_channel_in": 1, "grid": [2, 2], "backbone": "unet",
        "unet_n_depth": 3, "unet_pool": [2, 2]}))
    seg = stardist_fn(folder)
    assert seg.receptive_field == (106, 106) and seg.grid == (16, 16)
    assert seg.preferred_overlap == 64
    assert stardist_fn("2D_versatile_fluo").preferred_overlap == 32


def test_receptive_field_matches_stardists_own_measurement(make) -> None:
    """The receptive field read from config.json bounds what StarDist measures on the network
    (the response to a single bright pixel), and not by much."""
    from blockbuster.plugins.stardist import receptive_field

    for name, axes in (("tiny2d", "YX"), ("tiny3d", "ZYX")):
        seg = make(name)
        config = json.loads((Path(seg.spec["folder"]) / "config.json").read_text())
        mine = receptive_field(config, seg.n_dim)
        measured = seg.load_model()._axes_tile_overlap(axes)
        assert mine is not None
        assert all(m >= r for m, r in zip(mine, measured, strict=True)), (mine, measured)
        assert all(m <= r + 4 for m, r in zip(mine, measured, strict=True)), (mine, measured)
        assert seg.receptive_field == mine
    assert receptive_field({"backbone": "resnet"}, 2) is None


# -- running ----------------------------------------------------------------------------------
def test_2d_model_on_planes_and_stacks(make, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    plane = seg(nuclei[0])
    assert plane.shape == (64, 80) and plane.dtype == np.int32 and plane.min() >= 0
    single = seg(nuclei[:1])
    np.testing.assert_array_equal(single[0], plane)
    stack = seg(nuclei)
    np.testing.assert_array_equal(stack, stack_plane_labels([seg(p) for p in nuclei], np.int32))


def test_3d_model_on_volumes(make, spy, nuclei: np.ndarray) -> None:
    volume = nuclei[:, :40, :44]
    seg = prepared(make("tiny3d"), volume)
    recorder = spy(seg)
    labels = seg(volume)
    assert labels.shape == volume.shape and labels.dtype == np.int32
    assert recorder.calls[-1][1]["axes"] == "ZYXC"
    with pytest.raises(InputError, match="3-D StarDist model"):
        prepared(make("tiny3d"), nuclei[0])


def test_odd_tiles_and_n_tiles(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(n_tiles=(2, 1)), nuclei)
    recorder = spy(seg)
    for shape in [(7, 61), (33, 5)]:
        assert seg(nuclei[0][: shape[0], : shape[1]]).shape == shape
    assert recorder.calls[-1][1]["n_tiles"] == (2, 1, 1)


def test_multichannel_image_with_single_channel_model(make, spy, nuclei: np.ndarray) -> None:
    image = np.stack([nuclei[0] // 3, nuclei[0]], axis=-1)
    seg = prepared(make(channel=1), image, channel_axis=-1)
    recorder = spy(seg)
    labels = seg(image)
    assert labels.shape == (64, 80)
    x = recorder.calls[-1][0]
    assert x.shape == (64, 80, 1)
    low, high = seg.norm.low[1], seg.norm.high[1]
    np.testing.assert_allclose(x[..., 0], (nuclei[0] - low) / (high - low), rtol=1e-5, atol=1e-6)


def test_thresholds_are_passed_on(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(prob_thresh=0.7, nms_thresh=0.2), nuclei)
    recorder = spy(seg)
    seg(nuclei[0])
    kwargs = recorder.calls[-1][1]
    assert (kwargs["prob_thresh"], kwargs["nms_thresh"]) == (0.7, 0.2)
    assert kwargs["show_tile_progress"] is False


def test_constant_tile_skips_the_network(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    recorder = spy(seg)
    assert not seg(np.zeros((48, 48), np.uint16)).any()
    assert recorder.calls == []


# -- normalisation ----------------------------------------------------------------------------
def test_global_normalisation_maps_every_tile_the_same_way(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    low, high = np.percentile(open_image(nuclei).sample()[:, 0], [1, 99.8])
    assert (seg.norm.low[0], seg.norm.high[0]) == pytest.approx((low, high))
    recorder = spy(seg)
    for tile in (nuclei[0, :32, :40], nuclei[1, 32:, 40:] // 4):
        seg(tile)
        expected = (tile.astype(np.float32) - low) / (high - low)
        np.testing.assert_allclose(recorder.calls[-1][0][..., 0], expected, rtol=1e-5, atol=1e-6)


def test_tile_normalisation_uses_each_tiles_percentiles(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(normalize="tile"), nuclei)
    recorder = spy(seg)
    tile = nuclei[1, 32:, 40:] // 4
    seg(tile)
    x = recorder.calls[-1][0][..., 0]
    low, high = np.percentile(tile, [1, 99.8])
    np.testing.assert_allclose(x, (tile - low) / (high - low), rtol=1e-4, atol=1e-5)


def test_without_prepare_warns_and_normalises_per_tile(make, nuclei: np.ndarray) -> None:
    seg = make()
    with pytest.warns(RuntimeWarning, match="prepare"):
        assert seg(nuclei[0]).shape == (64, 80)


# -- one model per process, cheap pickles -----------------------------------------------------
def test_model_is_loaded_once_across_tiles_and_instances(make, model_dir: Path,
                                                         nuclei: np.ndarray) -> None:
    from blockbuster.plugins.stardist import MODEL_CACHE, stardist_fn

    seg = prepared(make(), nuclei)
    key = seg._cache_key()
    for tile in (nuclei[0], nuclei[1], nuclei[:2]):
        seg(tile)
    prepared(stardist_fn(str(model_dir / "tiny2d")), nuclei)(nuclei[2])
    pickle.loads(pickle.dumps(seg))(nuclei[0])
    assert MODEL_CACHE.load_count(key) == 1


def test_retrained_weights_are_a_new_model(make, model_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "retrained"
    shutil.copytree(model_dir / "tiny2d", folder)
    seg = make(str(folder))
    key = seg._cache_key()
    weights = folder / "weights_best.h5"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert seg._cache_key() != key


def test_pickle_is_small_and_gives_the_same_labels(make, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    labels = seg(nuclei[0])
    data = pickle.dumps(seg)
    assert len(data) < 2_000
    np.testing.assert_array_equal(pickle.loads(data)(nuclei[0]), labels)


# -- the conformance kit ----------------------------------------------------------------------
class TestStardist2DConformance(SegmenterConformance):
    diameter = 12

    @pytest.fixture
    def make_segmenter(self, make):
        return make


class TestStardist3DConformance(SegmenterConformance):
    diameter = 12
    image_ndims = (3,)

    @pytest.fixture
    def make_segmenter(self, make):
        return lambda: make("tiny3d")


# -- pretrained weights (skipped unless cached) -------------------------------------------------
def _cached(cls_name: str, key: str) -> bool:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    return any((home / "models" / cls_name / key).glob(f"{key}*"))


@pytest.mark.weights
def test_2d_versatile_fluo_segments_nuclei() -> None:
    from blockbuster.plugins.stardist import stardist_fn

    if not _cached("StarDist2D", "2D_versatile_fluo"):
        pytest.skip("weights of 2D_versatile_fluo are not cached")
    image, truth = synthetic_nuclei((256, 256), diameter=14, seed=1)
    labels = prepared(stardist_fn("2D_versatile_fluo"), image)(image)
    assert 0.7 < labels.max() / truth.max() < 1.3
