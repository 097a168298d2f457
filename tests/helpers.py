"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to renumbering (background identical)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def comb_mask(shape=(120, 120)) -> np.ndarray:
    """U shapes and hooks: arms labelled apart in one tile row, joined rows later."""
    mask = np.zeros(shape, bool)
    for top in range(0, shape[0] - 55, 60):
        mask[top + 2:top + 52, 5:9] = mask[top + 2:top + 52, 95:99] = True
        mask[top + 48:top + 52, 5:99] = True
        mask[top + 2:top + 40, 40:44] = mask[top + 36:top + 40, 40:70] = True
        mask[top + 2:top + 40, 66:70] = True
        mask[top + 10:top + 20, 20:30] = True  # a plain blob in between
    return mask


def prepared(seg: Any, image: np.ndarray, channel_axis: int | None = None) -> Any:
    """A plugin segmenter set up the way ``tile_process`` sets it up for ``image``."""
    from blockbuster.io import open_image

    seg.channel_axis = None if channel_axis is None else channel_axis % image.ndim
    seg.prepare(open_image(image, channel_axis))
    return seg


class CallSpy:
    """Records what a plugin passes to one method of its model, and forwards the call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[np.ndarray, dict]] = []

    def __call__(self, x: Any, **kwargs: Any) -> Any:
        self.calls.append((np.array(x, copy=True), kwargs))
        return self.real(x, **kwargs)


def spy_on(monkeypatch: Any, model: Any, method: str) -> CallSpy:
    recorder = CallSpy(getattr(model, method))
    monkeypatch.setattr(model, method, recorder)
    return recorder


def write_plugin_dist(root: Path, name: str, entries: dict[str, str],
                      modules: dict[str, str]) -> Path:
    """A minimal installed distribution (dist-info + modules) under ``root``, as pip leaves it:
    ``entries`` (name -> ``module:object``) registered as blockbuster segmenters. Returns
    ``root`` (put it on ``sys.path`` or ``PYTHONPATH``)."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[blockbuster.segmenters]\n{lines}\n")
    return root
