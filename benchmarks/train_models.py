"""Train small StarDist and Cellpose 3 models from scratch on the CPU, for ``bench_fidelity.py``.

Pretrained weights cannot be downloaded everywhere (and a benchmark should not depend on them),
so the fidelity benchmark uses models trained here, in a few minutes each on two CPU cores, on
the real nuclei images with ground truth that ship inside the ``stardist`` wheel
(``stardist/data/images/img2d.tif`` + ``mask2d.tif``: 512 x 512 fluorescence nuclei from the 2018
Data Science Bowl; ``img3d.tif`` + ``mask3d.tif``: a 31 x 61 x 57 synthetic anisotropic volume).

Models:

- ``stardist2d``: StarDist 2-D, 32 rays, grid (2, 2), U-Net depth 3 (network grid 16 px);
  trained on the top 384 rows, validated (and thresholds optimised) on the bottom 128 rows.
- ``stardist3d``: StarDist 3-D with the anisotropy of the volume's objects (about (2.1, 1, 1.1)),
  grid (1, 2, 2), U-Net depth 2 (network grid (4, 8, 8)); one small volume, so it is trained
  and validated on the same volume (flips and intensity changes as augmentation).
- ``cellpose3``: Cellpose 3's CPnet (the standard size: Cellpose 3 loads no other from a file),
  trained with ``cellpose.train.train_seg`` on 256 x 256 crops of the top 384 rows, objects
  rescaled to its ``diam_mean`` of 30 px; it is run with ``diameter=20`` (rescale 1.5) and
  ``flow_threshold=0`` (see ``EVAL``). Needs Cellpose 3: run with the Cellpose 3 overlay on
  ``PYTHONPATH`` (Cellpose 4 cannot train this network).

Each model is saved under ``benchmarks/out/models/<name>/`` with ``manifest.json`` (settings,
training time, evaluation settings, F1 against the ground truth); a model whose manifest holds
the same settings is not trained again (``--force`` retrains), and one whose evaluation
settings changed is only evaluated again.

Run (each model in its own process; Cellpose needs the overlay)::

    nice -n 10 python benchmarks/train_models.py stardist2d stardist3d
    PYTHONPATH=/work/venv/cellpose3-overlay nice -n 10 python benchmarks/train_models.py cellpose3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fidelity import compare, load_pair

from _common import OUT

MODELS_DIR = OUT / "models"
SEED = 0

#: Training settings: a model is retrained when these change.
SETTINGS: dict[str, dict[str, Any]] = {
    "stardist2d": {"n_rays": 32, "grid": [2, 2], "unet_n_depth": 3, "unet_n_filter_base": 32,
                   "patch": [128, 128], "batch": 4, "epochs": 25, "steps": 100,
                   "train_rows": 384, "lr": 5e-4},
    "stardist3d": {"n_rays": 64, "grid": [1, 2, 2], "unet_n_depth": 2, "unet_n_filter_base": 32,
                   "patch": [24, 48, 48], "batch": 2, "epochs": 25, "steps": 40, "lr": 3e-4},
    "cellpose3": {"diam_mean": 30.0, "n_epochs": 80, "batch_size": 4,
                  "nimg_per_epoch": 4, "bsize": 128, "learning_rate": 0.005, "crop": 256,
                  "train_rows": 384},
}


#: How each model is run (by the quality check here and by bench_fidelity.py); changing these
#: re-evaluates a model without retraining it. Cellpose at diameter 20 (the nuclei's Cellpose
#: diameter is about 21-23): rescale 30 / 20 = 1.5, a simple fraction. This briefly trained CPnet
#: predicts good probabilities but flows that fail Cellpose's flow-error check (0.4 keeps 15
#: of 125 nuclei), so that check is off.
EVAL: dict[str, dict[str, Any]] = {
    "stardist2d": {},
    "stardist3d": {},
    "cellpose3": {"diameter": 20.0, "flow_threshold": 0.0},
}


def manifest_path(name: str) -> Path:
    return MODELS_DIR / name / "manifest.json"


def read_manifest(name: str) -> dict[str, Any] | None:
    """The manifest of a trained model, or None."""
    path = manifest_path(name)
    return json.loads(path.read_text()) if path.is_file() else None


def trained(name: str) -> bool:
    """A model trained with the current settings exists."""
    manifest = read_manifest(name)
    return bool(manifest and manifest.get("settings") == SETTINGS[name]
                and Path(manifest["model_path"]).exists())


def up_to_date(name: str) -> bool:
    """Trained with the current settings and evaluated with the current evaluation settings."""
    manifest = read_manifest(name)
    return trained(name) and bool(manifest and manifest.get("eval") == EVAL[name])


def _normalize(img: np.ndarray) -> np.ndarray:
    from csbdeep.utils import normalize

    return normalize(img, 1, 99.8, axis=None).astype(np.float32)


def _augmenter(ndim: int, rng: np.random.Generator) -> Callable:
    """Flips (and 90-degree turns in 2-D), then a random intensity scale and shift."""

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        axes = range(x.ndim) if ndim == 2 else range(1, x.ndim)  # 3-D: never flip z
        for ax in axes:
            if rng.random() < 0.5:
                x, y = np.flip(x, ax), np.flip(y, ax)
        if ndim == 2:
            k = int(rng.integers(4))
            x, y = np.rot90(x, k), np.rot90(y, k)
        x = x * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)

    return augment


# -- StarDist ----------------------------------------------------------------------------------
def train_stardist(name: str) -> dict[str, Any]:
    import tensorflow as tf
    from stardist import Rays_GoldenSpiral, calculate_extents
    from stardist.models import Config2D, Config3D, StarDist2D, StarDist3D

    s = SETTINGS[name]
    ndim = 2 if name == "stardist2d" else 3
    np.random.seed(SEED)
    tf.random.set_seed(SEED)
    img, mask = load_pair(ndim)
    x = _normalize(img)
    if ndim == 2:
        rows = s["train_rows"]
        X, Y, Xv, Yv = [x[:rows]], [mask[:rows]], [x[rows:]], [mask[rows:]]
        conf = Config2D(n_rays=s["n_rays"], grid=tuple(s["grid"]), n_channel_in=1,
                        unet_n_depth=s["unet_n_depth"], unet_n_filter_base=s["unet_n_filter_base"],
                        train_patch_size=tuple(s["patch"]), train_batch_size=s["batch"],
                        train_epochs=s["epochs"], train_steps_per_epoch=s["steps"],
                        train_learning_rate=s["lr"], train_tensorboard=False,
                        use_gpu=False)
        cls = StarDist2D
    else:
        extents = calculate_extents(mask)
        anisotropy = tuple(float(v) for v in np.max(extents) / extents)
        X, Y, Xv, Yv = [x], [mask], [x], [mask]
        conf = Config3D(rays=Rays_GoldenSpiral(s["n_rays"], anisotropy=anisotropy),
                        grid=tuple(s["grid"]), anisotropy=anisotropy, n_channel_in=1,
                        unet_n_depth=s["unet_n_depth"], unet_n_filter_base=s["unet_n_filter_base"],
                        train_patch_size=tuple(s["patch"]), train_batch_size=s["batch"],
                        train_epochs=s["epochs"], train_steps_per_epoch=s["steps"],
                        train_learning_rate=s["lr"], train_tensorboard=False,
                        use_gpu=False)
        cls = StarDist3D
    folder = MODELS_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    model = cls(conf, name=name, basedir=str(MODELS_DIR))
    start = time.perf_counter()
    augmenter = _augmenter(ndim, np.random.default_rng(SEED))
    model.train(X, Y, validation_data=(Xv, Yv), augmenter=augmenter,
                epochs=s["epochs"], steps_per_epoch=s["steps"])
    with contextlib.redirect_stdout(io.StringIO()):
        model.optimize_thresholds(Xv, Yv)
    seconds = time.perf_counter() - start
    return {"model_path": str(folder), "train_seconds": seconds}


def evaluate_stardist(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """F1 against the ground truth, with the model loaded as the plugin loads it."""
    from stardist.models import StarDist2D, StarDist3D

    ndim = 2 if name == "stardist2d" else 3
    cls = StarDist2D if ndim == 2 else StarDist3D
    img, mask = load_pair(ndim)
    x = _normalize(img)
    with contextlib.redirect_stdout(io.StringIO()):
        model = cls(None, name=name, basedir=str(MODELS_DIR))

    def predict(image: np.ndarray) -> np.ndarray:
        return model.predict_instances(image, verbose=False, show_tile_progress=False)[0]

    quality = {"all": compare(mask, predict(x))}
    if ndim == 2:
        rows = SETTINGS[name]["train_rows"]
        quality["held_out_rows"] = compare(mask[rows:], predict(x[rows:]))
    return {"quality": quality,
            "config": {"grid": list(model.config.grid), "unet_n_depth": model.config.unet_n_depth,
                       "anisotropy": getattr(model.config, "anisotropy", None),
                       "thresholds": dict(model.thresholds._asdict())}}


# -- Cellpose 3 --------------------------------------------------------------------------------
def _cellpose_crops(img: np.ndarray, mask: np.ndarray, size: int, rows: int
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Overlapping ``size`` x ``size`` crops of the top ``rows`` rows (Cellpose samples whole
    images per step, so several crops make each epoch see different parts)."""
    starts_y = range(0, rows - size + 1, (rows - size) // 2 or 1)
    starts_x = range(0, img.shape[1] - size + 1, (img.shape[1] - size) // 2)
    X, Y = [], []
    for y0 in starts_y:
        for x0 in starts_x:
            X.append(img[y0:y0 + size, x0:x0 + size].astype(np.float32))
            Y.append(mask[y0:y0 + size, x0:x0 + size].astype(np.int32))
    return X, Y


def train_cellpose(name: str) -> dict[str, Any]:
    import cellpose
    import torch
    from cellpose import models, train

    if not hasattr(models, "MODEL_NAMES") or "cyto3" not in models.MODEL_NAMES:
        raise SystemExit("cellpose3 needs Cellpose 3: PYTHONPATH=/path/to/cellpose3-overlay "
                         f"(found cellpose at {cellpose.__file__})")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # its epoch losses
    s = SETTINGS[name]
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    img, mask = load_pair(2)
    rows = s["train_rows"]
    X, Y = _cellpose_crops(img, mask, s["crop"], rows)
    folder = MODELS_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None,
                                 diam_mean=s["diam_mean"], nchan=2)
    start = time.perf_counter()
    path, _, _ = train.train_seg(
        model.net, train_data=X, train_labels=Y, test_data=[img[rows:].astype(np.float32)],
        test_labels=[mask[rows:].astype(np.int32)], channels=[0, 0], normalize=True,
        save_path=str(folder), n_epochs=s["n_epochs"], batch_size=s["batch_size"],
        nimg_per_epoch=s["nimg_per_epoch"], bsize=s["bsize"], learning_rate=s["learning_rate"],
        rescale=True, min_train_masks=1, model_name=name, save_every=10**6)
    seconds = time.perf_counter() - start
    return {"model_path": str(path), "train_seconds": seconds}


def evaluate_cellpose(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """F1 against the ground truth at the evaluation settings (``EVAL``)."""
    from cellpose import models

    img, mask = load_pair(2)
    rows = SETTINGS[name]["train_rows"]
    model = models.CellposeModel(gpu=False, pretrained_model=manifest["model_path"])
    kwargs = {"channels": [0, 0], **EVAL[name]}
    quality = {"all": compare(mask, model.eval(img, **kwargs)[0]),
               "held_out_rows": compare(mask[rows:], model.eval(img[rows:], **kwargs)[0])}
    return {"quality": quality,
            "config": {"diam_mean": float(model.diam_mean), "diam_labels": float(model.diam_labels),
                       **EVAL[name]}}


TRAINERS = {"stardist2d": train_stardist, "stardist3d": train_stardist,
            "cellpose3": train_cellpose}
EVALUATORS = {"stardist2d": evaluate_stardist, "stardist3d": evaluate_stardist,
              "cellpose3": evaluate_cellpose}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in args.models:
        if up_to_date(name) and not args.force:
            print(f"{name}: up to date ({manifest_path(name)})")
            continue
        if trained(name) and not args.force:
            manifest = read_manifest(name) or {}
            print(f"{name}: trained; evaluating with {EVAL[name]}", flush=True)
        else:
            print(f"{name}: training with {SETTINGS[name]}", flush=True)
            manifest = {"name": name, "settings": SETTINGS[name], **TRAINERS[name](name),
                        "trained": time.strftime("%Y-%m-%d %H:%M")}
        manifest.update(EVALUATORS[name](name, manifest), eval=EVAL[name])
        manifest_path(name).write_text(json.dumps(manifest, indent=2, default=_plain))
        q = manifest["quality"]["all"]
        print(f"{name}: trained in {manifest['train_seconds']:.0f} s; against the ground truth: "
              f"F1 {q['f1']:.3f} ({q['matched']}/{q['n_ref']} objects matched, "
              f"{q['n_out']} predicted)", flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    main()
