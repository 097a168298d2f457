"""Benchmark data helpers; the agreement metrics live in :mod:`blockbuster.compare`.

Used by ``train_models.py`` (a model against the ground truth) and ``bench_fidelity.py`` (tiled
prediction against the whole-image prediction of the same model). Two objects *match* when their
IoU exceeds ``thresh`` (0.5: then each object has at most one partner, so no assignment problem).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockbuster.compare import compare

#: The real nuclei images with ground truth that ship in the stardist wheel.
IMAGES = ("img2d", "img3d")


def stardist_data(name: str) -> Path:
    """Path of ``stardist/data/images/<name>.tif`` (found without importing stardist)."""
    import importlib.util

    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the stardist package is not installed (pip install '.[stardist]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / f"{name}.tif"
    if not path.is_file():
        raise SystemExit(f"{path} not found: this stardist wheel ships no test images")
    return path


def load_pair(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image, ground-truth labels)`` of the bundled 2-D or 3-D nuclei data."""
    import tifffile

    tag = f"{ndim}d"
    return (tifffile.imread(stardist_data(f"img{tag}")),
            tifffile.imread(stardist_data(f"mask{tag}")))

__all__ = ["IMAGES", "compare", "load_pair", "stardist_data"]
