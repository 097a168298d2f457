"""The Cellpose plugin, tested with untrained networks built here (no weights are downloaded).

A network is built with random weights, saved to a temporary file and loaded through
``pretrained_model=<path>``, exactly as a user's own trained model is. For Cellpose 4 the
network's ViT backbone is shrunk (one narrow transformer block instead of ViT-L) so that the
CPU tests run in seconds; the loading and evaluation code is Cellpose's own. Tests that need
the real pretrained weights are marked ``weights`` and skip unless the weights are cached.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pickle
import types
from pathlib import Path

import numpy as np
import pytest

from blockbuster.errors import InputError, NoGPUError
from blockbuster.io import open_image
from blockbuster.plugins import stack_plane_labels
from blockbuster.testing import SegmenterConformance, synthetic_nuclei

from helpers import prepared, spy_on

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("cellpose") is None,
                       reason='needs cellpose: pip install "blockbuster[cellpose]"'),
    # Third-party noise we cannot act on (torch internals used by Cellpose).
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning:torch"),
]


@pytest.fixture(scope="module")
def cellpose_major() -> int:
    from cellpose import models

    return 3 if "cyto3" in models.MODEL_NAMES else 4


def _tiny_vit_builder(checkpoint=None):
    """Stands in for SAM's ViT-L builder: one 16-wide block, same interface."""
    import torch
    from segment_anything.modeling import ImageEncoderViT

    encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=16, depth=1, num_heads=1,
                              mlp_ratio=1.0, out_chans=16, qkv_bias=True, use_rel_pos=True,
                              norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                              window_size=14, global_attn_indexes=(0,))
    return types.SimpleNamespace(image_encoder=encoder)


def _build_cellpose4_network():
    try:
        from cellpose.vit import CPSAM as Network  # Cellpose >= 4.1
    except ImportError:
        from cellpose.vit_sam import Transformer as Network  # Cellpose 4.0
    import torch

    net = Network()
    with torch.no_grad():  # cell probability high everywhere, so that masks come out
        net.out.bias[2 * net.ps**2:] = 3.0
    return net


def _build_cellpose3_network():
    import torch
    from cellpose.resnet_torch import CPnet

    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
    with torch.no_grad():
        net.output[-1].bias[2] = 3.0
    return net


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, cellpose_major: int):
    """An untrained Cellpose network saved as a user's model file (the patch stays active so
    that Cellpose builds the same small architecture when it loads the file)."""
    import torch

    torch.manual_seed(0)  # the same untrained network in every run
    path = tmp_path_factory.mktemp("cellpose") / "untrained_model"
    with pytest.MonkeyPatch.context() as mp:
        if cellpose_major >= 4:
            import segment_anything  # Cellpose 4 imports this very registry dict

            mp.setitem(segment_anything.sam_model_registry, "vit_l", _tiny_vit_builder)
            _build_cellpose4_network().save_model(str(path))
        else:
            _build_cellpose3_network().save_model(str(path))
        yield path


@pytest.fixture(scope="module")
def model_kwargs(cellpose_major: int) -> dict:
    # bfloat16 is Cellpose 4's default and slow on most CPUs.
    return {"use_bfloat16": False} if cellpose_major >= 4 else {}


@pytest.fixture
def make(model_file: Path, model_kwargs: dict):
    from blockbuster.plugins.cellpose import cellpose_fn

    def make(**kwargs):
        kwargs.setdefault("diameter", 30)
        kwargs.setdefault("flow_threshold", 0)  # random flows fail Cellpose's quality check
        return cellpose_fn(str(model_file), model_kwargs=model_kwargs, **kwargs)

    return make


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch):
    return lambda seg: spy_on(monkeypatch, seg.load_model(), "eval")


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    image, _ = synthetic_nuclei((3, 64, 80), diameter=20, seed=2)
    return image


# -- model names and arguments ----------------------------------------------------------------
def test_model_names_are_checked_against_the_installed_cellpose(cellpose_major: int) -> None:
    from blockbuster.plugins.cellpose import cellpose_fn

    if cellpose_major >= 4:
        with pytest.raises(InputError) as info:
            cellpose_fn("cyto3")
        message = str(info.value)
        assert 'pip install "cellpose<4"' in message and 'model="cpsam"' in message
        assert "silently" in message
    else:
        with pytest.raises(InputError, match=r'cellpose>=4'):
            cellpose_fn("cpsam")
    with pytest.raises(InputError, match="not a Cellpose"):
        cellpose_fn("no_such_model")
    with pytest.raises(InputError, match="not found"):
        cellpose_fn("/no/such/dir/model")


def test_channels_argument_follows_the_cellpose_version(make, cellpose_major: int) -> None:
    if cellpose_major >= 4:
        with pytest.raises(InputError, match="Cellpose 3 argument"):
            make(channels=[2, 3])
    else:
        assert make(channels=[2, 3]).channels == [2, 3]
    with pytest.raises(InputError, match="two ints"):
        make(channels=[1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"flow_treshold": 0.3}, "unknown Cellpose argument"),
    ({"normalize": "sometimes"}, "normalize"),
    ({"percentiles": (99, 1)}, "percentiles"),
    ({"diameter": -4}, "diameter"),
])
def test_bad_arguments_are_input_errors(make, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        make(**kwargs)


def test_declared_attributes(make) -> None:
    from blockbuster.plugins.cellpose import cellpose_memory_model

    seg = make(diameter=17)
    assert seg.preferred_overlap == 17 and seg.preferred_stitch == "iou"
    assert seg.spatial_ndim == 2
    assert seg.memory_model == cellpose_memory_model(17, 2)
    seg3 = make(diameter=17, do_3D=True, anisotropy=2.0)
    assert seg3.preferred_overlap == (9, 17, 17) and seg3.spatial_ndim is None
    assert seg3.memory_model == cellpose_memory_model(17, 3)
    config = json.loads(json.dumps(seg.config()))
    assert config["diameter"] == 17 and Path(config["model"]).is_absolute()
    assert config["eval_kwargs"] == {"flow_threshold": 0}


def test_grid_follows_the_rescale(make) -> None:
    from blockbuster.segmenter import describe_segmenter

    # The test model's diam_mean is 30 (Cellpose 4 always rescales by 30 / diameter).
    assert make(diameter=30).grid == (8, 8)
    assert make(diameter=20).grid == (16, 16)  # rescale 3/2: 16 input px = 24 network px
    assert make(diameter=15).grid == (4, 4)
    assert make(diameter=23.77).grid is None  # 3000/2377: no grid of sensible size
    assert make(diameter=30, do_3D=True, anisotropy=2.0).grid == (4, 8, 8)
    assert make(diameter=30, stitch_threshold=0.5).grid == (1, 8, 8)
    assert describe_segmenter(make(diameter=20)).grid == (16, 16)


@pytest.mark.parametrize("diameter", [30, 20])
def test_cellpose_windows_start_on_the_grid(make, monkeypatch: pytest.MonkeyPatch,
                                            diameter: float) -> None:
    """Whatever the tile's size, Cellpose's padding and windows sit on multiples of 8 network
    pixels from the tile's first pixel (recorded from Cellpose's own functions)."""
    from cellpose import transforms

    pads, windows = [], []
    real_pad, real_tiles = transforms.get_pad_yx, transforms.make_tiles

    def get_pad_yx(*args, **kwargs):
        pads.append(real_pad(*args, **kwargs))
        return pads[-1]

    def make_tiles(*args, **kwargs):  # run_net pads, then cuts: pair each cut with its pad
        out = real_tiles(*args, **kwargs)
        windows.append((pads[-1], out[1], out[2]))
        return out

    monkeypatch.setattr(transforms, "get_pad_yx", get_pad_yx)
    monkeypatch.setattr(transforms, "make_tiles", make_tiles)
    image, _ = synthetic_nuclei((333, 250), diameter=diameter, seed=1)
    seg = prepared(make(diameter=diameter), image)
    assert seg(image).shape == (333, 250)
    assert windows
    for (ypad, _, xpad, _), ysub, xsub in windows:
        assert {(int(y[0]) - ypad) % 8 for y in ysub} == {0}
        assert {(int(x[0]) - xpad) % 8 for x in xsub} == {0}


def test_style_argument_is_checked(make, cellpose_major: int) -> None:
    with pytest.raises(InputError, match="style="):
        make(style="tile")
    if cellpose_major >= 4:
        with pytest.raises(InputError, match="has none"):
            make(style="image")


def test_one_style_for_the_whole_image(make, cellpose_major: int, nuclei: np.ndarray,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """style="image": prepare() computes one unit style vector from the image, and every
    network window of every tile uses it (CPnet's own style module is never run)."""
    if cellpose_major >= 4:
        pytest.skip("Cellpose 4's network has no style vector")
    from cellpose import transforms

    image = nuclei[0]
    with pytest.raises(InputError, match="prepare"):
        make(style="image")(image)
    seg = prepared(make(style="image", bsize="tile"), image)
    style = np.asarray(seg.style_vector)
    assert style.shape == (256,) and np.isclose(np.linalg.norm(style), 1.0)
    assert pickle.loads(pickle.dumps(seg)).style_vector == seg.style_vector

    windows = []
    real_tiles = transforms.make_tiles

    def make_tiles(*args, **kwargs):
        out = real_tiles(*args, **kwargs)
        windows.append(len(out[1]))
        return out

    net = seg.load_model().net
    module_type = type(net.make_style)

    def never(self, x):
        raise AssertionError("CPnet computed its own style")

    monkeypatch.setattr(transforms, "make_tiles", make_tiles)
    monkeypatch.setattr(module_type, "forward", never)
    large = np.tile(image, (4, 4))  # 256 x 320: several 224 px windows at Cellpose's bsize
    labels = seg(large)
    assert labels.shape == large.shape and labels.max() > 0
    assert windows == [1]  # bsize="tile": one window for the whole tile
    assert "forward" not in vars(net.make_style)  # the model is left as it was
    monkeypatch.undo()
    assert np.array_equal(seg(large), labels)  # the same style every time


# -- running ----------------------------------------------------------------------------------
def test_2d_tiles_and_per_plane_stacks(make, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    plane = seg(nuclei[0])
    assert plane.shape == (64, 80) and plane.dtype == np.uint32
    assert plane.max() > 0  # the untrained network still draws masks
    single = seg(nuclei[:1])
    assert single.shape == (1, 64, 80)
    np.testing.assert_array_equal(single[0], plane)
    stack = seg(nuclei)
    np.testing.assert_array_equal(stack, stack_plane_labels([seg(p) for p in nuclei]))
    # Objects of different planes never share a label.
    ids = [set(np.unique(p)) - {0} for p in stack]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_multichannel_tiles_reach_cellpose_channels_last(make, spy, nuclei: np.ndarray) -> None:
    image = np.stack([nuclei[0], nuclei[1] // 2])  # (C, Y, X)
    seg = prepared(make(), image, channel_axis=0)
    recorder = spy(seg)
    labels = seg(image)
    assert labels.shape == (64, 80)
    x, kwargs = recorder.calls[-1]
    assert x.shape == (64, 80, 2) and kwargs["channel_axis"] == 2


def test_odd_and_tiny_tiles(make, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    for shape in [(7, 61), (1, 1), (33, 5)]:
        assert seg(nuclei[0][: shape[0], : shape[1]]).shape == shape


def test_constant_tile_skips_the_network(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    recorder = spy(seg)
    labels = seg(np.full((1, 40, 40), 123, np.uint16))
    assert labels.shape == (1, 40, 40) and not labels.any()
    assert recorder.calls == []


@pytest.mark.slow
def test_3d_path(make, spy, nuclei: np.ndarray) -> None:
    volume = nuclei[:, :24, :28]
    seg = prepared(make(do_3D=True), volume)
    recorder = spy(seg)
    labels = seg(volume)
    assert labels.shape == (3, 24, 28) and labels.dtype == np.uint32
    x, kwargs = recorder.calls[-1]
    assert kwargs["do_3D"] is True and kwargs["z_axis"] == 0
    assert x.shape[0] >= 3 and x.shape[-1] == 1  # padded to Cellpose's minimum, channels last
    with pytest.raises(InputError, match="3-D"):
        seg(volume[0])


# -- normalisation ----------------------------------------------------------------------------
def test_global_normalisation_maps_every_tile_the_same_way(make, spy, nuclei: np.ndarray) -> None:
    source = open_image(nuclei)
    seg = prepared(make(), nuclei)
    sample = source.sample()[:, 0]
    low, high = np.percentile(sample, [1, 99])
    assert (seg.norm.low[0], seg.norm.high[0]) == pytest.approx((low, high))
    recorder = spy(seg)
    bright, dim = nuclei[0, :32, :40], (nuclei[0, 32:, 40:] // 4)  # very different contrast
    for tile in (bright, dim):
        seg(tile)
        x, kwargs = recorder.calls[-1]
        expected = (tile.astype(np.float32) - low) / (high - low)
        np.testing.assert_allclose(x[..., 0][: tile.shape[0], : tile.shape[1]], expected,
                                   rtol=1e-5, atol=1e-6)
        assert kwargs["normalize"] == {"normalize": False}


def test_tile_normalisation_is_left_to_cellpose(make, spy, nuclei: np.ndarray) -> None:
    seg = prepared(make(normalize="tile", percentiles=(2, 98)), nuclei)
    assert seg.norm is None
    recorder = spy(seg)
    seg(nuclei[0])
    x, kwargs = recorder.calls[-1]
    np.testing.assert_array_equal(x[..., 0], nuclei[0].astype(np.float32))
    assert kwargs["normalize"]["normalize"] is True
    assert kwargs["normalize"]["percentile"] == [2.0, 98.0]


def test_without_prepare_normalises_per_tile_with_a_warning(make, nuclei: np.ndarray) -> None:
    seg = make()
    with pytest.warns(RuntimeWarning, match="prepare"):
        labels = seg(nuclei[0])
    assert labels.shape == (64, 80)


# -- one model per process, cheap pickles -----------------------------------------------------
def test_model_is_loaded_once_across_tiles_and_instances(make, nuclei: np.ndarray,
                                                         model_kwargs: dict) -> None:
    from blockbuster.plugins.cellpose import MODEL_CACHE

    seg = prepared(make(), nuclei)
    key = seg._cache_key()
    for tile in (nuclei[0], nuclei[1], nuclei[:2], nuclei[2, :30, :30]):
        seg(tile)
    other = prepared(make(), nuclei)  # an equal segmenter shares the model
    other(nuclei[0])
    copy = pickle.loads(pickle.dumps(seg))
    copy(nuclei[1])
    assert MODEL_CACHE.load_count(key) == 1


def test_pickle_is_small_and_gives_the_same_labels(make, nuclei: np.ndarray) -> None:
    seg = prepared(make(), nuclei)
    labels = seg(nuclei[0])  # model loaded
    data = pickle.dumps(seg)
    assert len(data) < 2_000
    assert b"torch" not in data
    np.testing.assert_array_equal(pickle.loads(data)(nuclei[0]), labels)


def test_gpu_without_a_gpu_is_a_clear_error(make, nuclei: np.ndarray) -> None:
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    seg = prepared(make(gpu=True), nuclei)
    with pytest.raises(NoGPUError, match="gpu=True"):
        seg(nuclei[0])


@pytest.mark.gpu
def test_gpu_runs_the_model_on_cuda(make, nuclei: np.ndarray) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    seg = prepared(make(gpu=True), nuclei)
    labels = seg(nuclei[0])
    assert labels.shape == (64, 80) and labels.dtype == np.uint32
    assert seg.load_model().device.type == "cuda"


# -- the conformance kit ----------------------------------------------------------------------
class TestCellposeConformance(SegmenterConformance):
    diameter = 20

    @pytest.fixture
    def make_segmenter(self, make):
        return make


# -- pretrained weights (skipped unless cached) -------------------------------------------------
def _cached_weights(name: str) -> bool:
    from cellpose import models

    folder = Path(models.MODEL_DIR)
    return any(p.name.startswith(name) for p in folder.glob("*")) if folder.is_dir() else False


@pytest.mark.weights
@pytest.mark.parametrize("name", ["cyto3", "nuclei", "cpsam"])
def test_pretrained_model_segments_nuclei(name: str, cellpose_major: int) -> None:
    from blockbuster.plugins.cellpose import cellpose_fn

    if (name == "cpsam") != (cellpose_major >= 4):
        pytest.skip(f"{name} is not a model of Cellpose {cellpose_major}")
    if not _cached_weights(name):
        pytest.skip(f"weights of {name} are not cached")
    image, truth = synthetic_nuclei((128, 128), diameter=20, seed=1)
    seg = prepared(cellpose_fn(name, diameter=20), image)
    labels = seg(image)
    assert 0.7 < labels.max() / truth.max() < 1.3
