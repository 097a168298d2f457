"""Cellpose as a blockbuster segmenter (Cellpose 3.x and 4.x).

>>> from blockbuster.plugins.cellpose import cellpose_fn      # doctest: +SKIP
>>> fn = cellpose_fn("cyto3", gpu=True, diameter=30)          # doctest: +SKIP
>>> tile_process("image.zarr", fn, tile_shape=(1, 2048, 2048))  # doctest: +SKIP

What this adds to calling Cellpose on each tile yourself:

- The model is loaded once per process, on first use, and shared by every tile and every equal
  segmenter in that process; the segmenter pickles to a few hundred bytes for dask workers.
- Normalisation without seams: Cellpose maps each input to [0, 1] by its 1st and 99th intensity
  percentiles. Per tile, neighbouring tiles get different mappings and the labels show seams;
  here the percentiles are computed once for the whole image in :meth:`prepare` and every tile
  is mapped with the same values (``normalize="tile"`` keeps Cellpose's own per-tile mapping).
- Model names are checked against the installed Cellpose: Cellpose 4 has only its own models
  (``cpsam`` ...) and silently substitutes them for a 3.x name such as ``cyto3``; here that is
  an error that says what to install or use instead.
- ``gpu=True`` without a usable GPU is an error (Cellpose itself silently runs on the CPU).

Nothing is imported from Cellpose or torch when this module is imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, NoGPUError
from ..segmenter import MemoryModel, Segmenter
from . import ModelCache, jsonable, require, stack_plane_labels
from ._normalize import (
    Percentiles,
    check_mode,
    check_percentiles,
    image_or_tile_percentiles,
    network_input,
    normalize_tile,
)

if TYPE_CHECKING:
    from ..io import ImageSource

__all__ = ["MODEL_CACHE", "CellposeSegmenter", "cellpose_fn"]

#: Models loaded in this process, shared by every CellposeSegmenter.
MODEL_CACHE = ModelCache("cellpose")

#: Cellpose's own default normalisation percentiles (``transforms.normalize99``).
DEFAULT_PERCENTILES = (1.0, 99.0)

#: Model names of Cellpose 3 (for the error message when Cellpose 4 is installed).
_CELLPOSE3_EXAMPLES = ("cyto3", "nuclei", "cyto2")

#: ``eval`` arguments this plugin sets itself.
_RESERVED_EVAL_KWARGS = frozenset({
    "x", "channels", "channel_axis", "z_axis", "normalize", "diameter", "do_3D", "progress",
    "compute_masks", "invert", "rescale",
})

#: Cellpose 3 guesses the axes of small arrays (an axis shorter than 8-10 is taken for channels),
#: so tiles are padded to at least this size per spatial axis; Cellpose pads to 224-256 anyway.
_MIN_EDGE = 16

# One inference at a time per model and process: GPU memory is sized for one tile.
_EVAL_LOCKS: dict[Any, threading.Lock] = {}
_EVAL_LOCKS_GUARD = threading.Lock()


def cellpose_fn(
    model: str | os.PathLike = "cyto3",
    gpu: bool = False,
    diameter: float | None = 30,
    channels: Sequence[int] | None = None,
    do_3D: bool = False,
    normalize: str = "global",
    **eval_kwargs: Any,
) -> CellposeSegmenter:
    """A Cellpose segmenter for :func:`blockbuster.tile_process`.

    Parameters
    ----------
    model : str or path
        A Cellpose 3 model name (``"cyto3"``, ``"nuclei"``, ``"cyto2"``, ...) with Cellpose 3
        installed, a Cellpose 4 model name (``"cpsam"``, ...) with Cellpose 4, or the path to a
        model file (a user-trained model) with either.
    gpu : bool
        Run on the GPU; raises :class:`~blockbuster.errors.NoGPUError` when there is none.
    diameter : float or None
        Object diameter in pixels; Cellpose rescales the image so objects are 30 pixels across
        (for ``nuclei`` in Cellpose 3: 17). None: no rescaling. Also sets the preferred overlap.
    channels : list of two int, optional
        Cellpose 3's channels (``[cytoplasm, nucleus]``, 1-based, 0 = grayscale). Cellpose 4
        takes the first three channels as they are and has no such argument.
    do_3D : bool
        Segment in 3-D (tiles must be 3-D); otherwise each z-plane is segmented in 2-D and
        ``tile_shape="auto"`` makes tiles one plane deep.
    normalize : {"global", "tile", "none"}
        ``"global"``: the same percentiles for every tile, from the whole image (no seams);
        ``"tile"``: Cellpose's own normalisation per tile; ``"none"``: input already in [0, 1].
    **eval_kwargs
        Passed to ``CellposeModel.eval`` (``flow_threshold``, ``cellprob_threshold``,
        ``min_size``, ``batch_size``, ``anisotropy``, ...), plus this plugin's keywords
        ``percentiles``, ``invert``, ``device`` and ``model_kwargs`` (see
        :class:`CellposeSegmenter`).

    Returns
    -------
    CellposeSegmenter
    """
    return CellposeSegmenter(model=model, gpu=gpu, diameter=diameter, channels=channels,
                             do_3D=do_3D, normalize=normalize, **eval_kwargs)


class CellposeSegmenter(Segmenter):
    """Cellpose on one tile at a time, with the model loaded once per process.

    Parameters
    ----------
    model, gpu, diameter, channels, do_3D, normalize, **eval_kwargs
        As for :func:`cellpose_fn`.
    percentiles : (float, float)
        Low and high percentile mapped to 0 and 1 (Cellpose's default: 1 and 99).
    invert : bool
        Invert intensities after normalisation (dark objects on a bright background).
    device : str, optional
        Torch device for the model (``"cuda:1"``); overrides ``gpu``'s default device.
    model_kwargs : dict, optional
        Further arguments for ``CellposeModel(...)`` (e.g. ``{"use_bfloat16": False}``).
    """

    name = "cellpose"
    preferred_stitch = "iou"
    requires = ("cellpose", "torch")
    extra = "cellpose"

    def __init__(
        self,
        model: str | os.PathLike = "cyto3",
        gpu: bool = False,
        diameter: float | None = 30,
        channels: Sequence[int] | None = None,
        do_3D: bool = False,
        normalize: str = "global",
        *,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        invert: bool = False,
        device: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **eval_kwargs: Any,
    ) -> None:
        require(self.requires, self.extra or "cellpose", "Cellpose")
        self.gpu = bool(gpu)
        self.diameter = _check_diameter(diameter)
        self.do_3D = bool(do_3D)
        self.normalize = check_mode(normalize)
        self.percentiles = check_percentiles(percentiles)
        self.invert = bool(invert)
        self.device = None if device is None else str(device)
        self.model_kwargs = dict(model_kwargs or {})
        info = _cellpose_info()
        self.model = _check_model(model, info)
        self.channels = _check_channels(channels, info)
        self.eval_kwargs = _check_eval_kwargs(eval_kwargs)
        #: Set by prepare() with normalize="global".
        self.norm: Percentiles | None = None
        self._warned_per_tile = False

    # -- declared preferences -----------------------------------------------------------------
    @property
    def spatial_ndim(self) -> int | None:  # type: ignore[override]
        """2 in 2-D mode (one z-plane per tile with ``"auto"``), None for 3-D or stitched planes."""
        return None if self.do_3D or self._stitches_planes else 2

    @property
    def preferred_overlap(self) -> int | tuple[int, ...]:  # type: ignore[override]
        """One object diameter (30 when no diameter is given); in 3-D with ``anisotropy`` (z step
        over pixel size) an object spans ``diameter / anisotropy`` planes."""
        xy = math.ceil(self.diameter or 30)
        anisotropy = self.eval_kwargs.get("anisotropy")
        if self.do_3D and anisotropy and anisotropy > 0 and anisotropy != 1:
            return (math.ceil(xy / anisotropy), xy, xy)
        return xy

    @property
    def memory_model(self) -> MemoryModel:  # type: ignore[override]
        """About 20 x the raw input bytes, rescaled by ``(30 / diameter) ** ndim``, + 2 GiB."""
        from ..sizing import cellpose_memory_model

        return cellpose_memory_model(self.diameter or 30, 3 if self.do_3D else 2)

    @property
    def model_cache(self) -> ModelCache:
        return MODEL_CACHE

    @property
    def _stitches_planes(self) -> bool:
        return float(self.eval_kwargs.get("stitch_threshold") or 0) > 0

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "diameter": self.diameter,
            "channels": self.channels,
            "do_3D": self.do_3D,
            "normalize": self.normalize,
            "percentiles": list(self.percentiles),
            "invert": self.invert,
            "eval_kwargs": jsonable(self.eval_kwargs),
        }

    # -- running ------------------------------------------------------------------------------
    def prepare(self, image: ImageSource) -> None:
        """Compute the normalisation percentiles once from a streamed subsample of ``image``."""
        self.channel_axis = image.segment_channel_axis  # where its tiles hold channels
        if self.do_3D and len(image.spatial_shape) != 3:
            raise InputError(f"do_3D=True needs a 3-D image; this one has spatial shape "
                             f"{image.spatial_shape}")
        if self.normalize == "global":
            self.norm = Percentiles.from_image(image, self.percentiles)
            self._statistics = self.norm.statistics(image, self.percentiles)

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Cellpose labels (uint32) of one tile; each z-plane separately unless ``do_3D``."""
        spatial, x = network_input(tile, self.channel_axis, self._normalized)
        if x is None:
            return np.zeros(spatial, np.uint32)
        model = self.load_model()
        with _eval_lock(self._cache_key()):
            if self.do_3D or self._stitches_planes:
                if x.ndim != 4:
                    raise InputError(f"do_3D / stitch_threshold need 3-D tiles; got spatial "
                                     f"shape {spatial}")
                return self._eval_volume(model, x)
            if x.ndim == 3:
                return self._eval_plane(model, x)
            if x.ndim == 4:
                return stack_plane_labels([self._eval_plane(model, plane) for plane in x])
        raise InputError(f"Cellpose takes 2-D or 3-D tiles; got spatial shape {spatial}")

    def _normalized(self, tile: np.ndarray) -> np.ndarray:
        if self.normalize == "tile":
            return tile.astype(np.float32)  # Cellpose normalises itself, see _eval_args
        if self.normalize == "none":
            x = tile.astype(np.float32)
        else:
            x = normalize_tile(tile, image_or_tile_percentiles(self, tile), self.channel_axis)
        return 1.0 - x if self.invert else x

    def _eval_args(self, n_channels: int) -> dict[str, Any]:
        if self.normalize == "tile":
            normalize: dict[str, Any] = {"normalize": True, "percentile": list(self.percentiles),
                                         "invert": self.invert}
        else:
            # A dict, never a bool: Cellpose writes a bool into its module-level defaults.
            normalize = {"normalize": False}
        args = {**self.eval_kwargs, "normalize": normalize, "diameter": self.diameter}
        if not _cellpose_info()["v4"]:
            # Cellpose 3: grayscale unless the user chose channels ([0, 0] avoids its guessing).
            args["channels"] = self.channels or ([0, 0] if n_channels == 1 else None)
        return args

    def _eval_plane(self, model: Any, plane: np.ndarray) -> np.ndarray:
        padded, crop = _pad_min(plane, 2)
        masks = model.eval(padded, channel_axis=2, **self._eval_args(plane.shape[-1]))[0]
        return _as_labels(masks, padded.shape[:2])[crop]

    def _eval_volume(self, model: Any, volume: np.ndarray) -> np.ndarray:
        padded, crop = _pad_min(volume, 3)
        masks = model.eval(padded, channel_axis=3, z_axis=0, do_3D=self.do_3D,
                           **self._eval_args(volume.shape[-1]))[0]
        return _as_labels(masks, padded.shape[:3])[crop]

    # -- the model ----------------------------------------------------------------------------
    def load_model(self) -> Any:
        """The ``CellposeModel`` for this configuration, loaded once per process."""
        return MODEL_CACHE.get(self._cache_key(), self._load)

    def _cache_key(self) -> tuple[Any, ...]:
        model: Any = self.model
        if os.path.exists(model):  # a retrained file at the same path is a new model
            st = os.stat(model)
            model = (model, st.st_mtime_ns, st.st_size)
        return (model, self.gpu, self.device, tuple(sorted(self.model_kwargs.items())))

    def _load(self) -> Any:
        import torch
        from cellpose import models

        device = _torch_device(torch, self.gpu, self.device)
        kwargs = {"gpu": self.gpu, "device": device, **self.model_kwargs}
        if os.path.exists(self.model) or _cellpose_info()["v4"]:
            return models.CellposeModel(pretrained_model=self.model, **kwargs)
        return models.CellposeModel(model_type=self.model, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Only parameters and the percentiles travel; the model is loaded in each process.
        return {**self.__dict__, "_warned_per_tile": False}


# -- Cellpose version and arguments ----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _cellpose_info() -> dict[str, Any]:
    """What the installed Cellpose offers (imports cellpose.models: only when used)."""
    models = importlib.import_module("cellpose.models")
    names = list(getattr(models, "MODEL_NAMES", []))
    try:
        from importlib.metadata import version

        ver = version("cellpose")
    except Exception:  # noqa: BLE001 -- a source checkout without metadata
        ver = "unknown"
    user = list(models.get_user_models()) if hasattr(models, "get_user_models") else []
    return {"v4": "cyto3" not in names, "names": names, "user": user, "version": ver,
            "eval": models.CellposeModel.eval}


def _check_model(model: Any, info: dict[str, Any]) -> str:
    if isinstance(model, os.PathLike) or (isinstance(model, str) and os.path.exists(model)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise InputError(f"Cellpose model file not found (or not a file): {path}")
        return str(path.resolve())
    if not isinstance(model, str) or not model:
        raise InputError(f"model={model!r} must be a Cellpose model name or a model file path")
    if os.sep in model or "/" in model:
        raise InputError(f"Cellpose model file not found: {model}")
    known = info["names"] + info["user"]
    if model in known:
        return model
    ver = info["version"]
    if info["v4"]:
        raise InputError(
            f"model={model!r} is not a Cellpose {ver} model (available: {', '.join(known)}); "
            f"Cellpose 4 would silently use its default model instead. Names such as "
            f"{', '.join(_CELLPOSE3_EXAMPLES)} are Cellpose 3 models: install Cellpose 3 with "
            f'pip install "cellpose<4", use model="cpsam", or pass the path of a model file')
    hint = ' (a Cellpose 4 model: pip install "cellpose>=4")' if model.startswith("cp") else ""
    raise InputError(f"model={model!r} is not a Cellpose {ver} model{hint}; available: "
                     f"{', '.join(known)}, or pass the path of a model file")


def _check_channels(channels: Any, info: dict[str, Any]) -> list[int] | None:
    if channels is None:
        return None
    try:
        values = [int(c) for c in channels]
    except (TypeError, ValueError):
        raise InputError(f"channels={channels!r} must be two ints, e.g. [2, 3]") from None
    if len(values) != 2 or min(values) < 0:
        raise InputError(f"channels={channels!r} must be two ints >= 0 ([cytoplasm, nucleus], "
                         "1-based, 0 = grayscale / none)")
    if info["v4"]:
        raise InputError(f"channels= is a Cellpose 3 argument; Cellpose {info['version']} uses "
                         "the first three channels of the image as they are. Select or reorder "
                         "channels in the image instead, or install Cellpose 3")
    return values


def _check_eval_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(_RESERVED_EVAL_KWARGS & kwargs.keys())
    if reserved:
        raise InputError(f"{', '.join(reserved)} cannot be passed to Cellpose's eval here: the "
                         "plugin sets them (use its own arguments)")
    allowed = set(inspect.signature(_cellpose_info()["eval"]).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InputError(f"unknown Cellpose argument(s): {', '.join(unknown)}; CellposeModel.eval "
                         f"takes {', '.join(sorted(allowed - _RESERVED_EVAL_KWARGS))}")
    return dict(kwargs)


def _check_diameter(diameter: Any) -> float | None:
    if diameter is None:
        return None
    if isinstance(diameter, bool) or not isinstance(diameter, (int, float, np.number)):
        raise InputError(f"diameter={diameter!r} must be a positive number or None")
    if not (math.isfinite(diameter) and diameter > 0):
        raise InputError(f"diameter={diameter!r} must be a positive number or None")
    return float(diameter)


def _torch_device(torch: Any, gpu: bool, device: str | None) -> Any:
    """The torch device to load on; :class:`NoGPUError` when a GPU is asked for but absent."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise NoGPUError(f"device={device!r} but torch finds no CUDA GPU")
        return dev
    if not gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    raise NoGPUError(
        f"gpu=True but torch {torch.__version__} finds no usable GPU (CUDA build: "
        f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use gpu=False to run on the CPU")


def _eval_lock(key: Any) -> threading.Lock:
    with _EVAL_LOCKS_GUARD:
        return _EVAL_LOCKS.setdefault(key, threading.Lock())


# -- arrays -----------------------------------------------------------------------------------
def _pad_min(x: np.ndarray, n_spatial: int) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the leading ``n_spatial`` axes to at least ``_MIN_EDGE`` by repeating edge values."""
    pad = [(0, max(0, _MIN_EDGE - s)) for s in x.shape[:n_spatial]]
    crop = tuple(slice(0, s) for s in x.shape[:n_spatial])
    if not any(after for _, after in pad):
        return x, crop
    return np.pad(x, pad + [(0, 0)] * (x.ndim - n_spatial), mode="edge"), crop


def _as_labels(masks: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Cellpose squeezes its output; restore ``shape`` and use uint32."""
    masks = np.asarray(masks)
    if masks.size != math.prod(shape):
        raise RuntimeError(f"Cellpose returned masks of shape {masks.shape} for input {shape}")
    return masks.reshape(shape).astype(np.uint32, copy=False)
