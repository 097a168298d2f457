"""Shared fixtures: reference segmenters and partition comparison."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from helpers import same_partition


def _load_torch_before_tensorflow() -> None:
    """torch's triton segfaults when it loads after TensorFlow (clashing LLVM symbols), so with
    both extras installed the StarDist tests would crash any later Cellpose test. Load it first."""
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow"):
        import torch  # noqa: F401

        if importlib.util.find_spec("triton"):
            import triton
            import triton.runtime  # noqa: F401


_load_torch_before_tensorflow()


class CountingLabel:
    """Connected components of ``tile > 0``; remembers the shape of every tile it saw."""

    def __init__(self, structure=None):
        self.structure = structure
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        self.shapes.append(tile.shape)
        return ndimage.label(tile > 0, self.structure)[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def blobs2d(rng) -> np.ndarray:
    """A 2-D binary mask of irregular blobs of many sizes, some crossing any tiling."""
    return ndimage.binary_opening(rng.random((150, 131)) > 0.42)


@pytest.fixture
def blobs3d(rng) -> np.ndarray:
    return ndimage.binary_opening(rng.random((24, 40, 37)) > 0.45)


@pytest.fixture(name="same_partition")
def same_partition_fixture():
    return same_partition


@pytest.fixture
def label_fn():
    return CountingLabel()
