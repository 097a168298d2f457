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
- Tiles on the network's grid: Cellpose's networks (CPnet: three 2 x 2 poolings; Cellpose 4's
  ViT: 8 x 8 patches) give the same answer for a pixel in two inputs only when both put it at
  the same position modulo 8 network pixels. Cellpose rescales each input by ``rescale =
  diam_mean / diameter`` (Cellpose 4: ``30 / diameter``), pads it centred to a multiple of 16
  and cuts it into 224 (Cellpose 4: 256) pixel windows at positions that depend on its length.
  The segmenter declares :attr:`CellposeSegmenter.grid`, the smallest input step whose
  rescaled length is a multiple of 8 (``8 q / gcd(p, 8)`` for ``rescale = p / q``: 8 at
  rescale 1, 16 at 1.5), and pads every tile at its end (zeros, as Cellpose pads) until
  Cellpose's own padding and windows start on that grid too, then crops. Tiles that start on
  multiples of the grid then see the image exactly as the whole image does.

- One style for the whole image (Cellpose 3, ``style="image"``): Cellpose 3's CPnet averages
  its deepest features over each 224 px window into a "style" vector that modulates every
  output pixel, so the same pixel gets a different prediction in a different window, in a
  tile as in the whole image (the model disagrees with itself on 2-3 % of the voxels when the
  image is shifted by one grid step). ``style="image"`` computes one style from windows spread
  over the whole image in :meth:`CellposeSegmenter.prepare` and uses it in every window of
  every tile; with ``bsize="tile"`` (one network window per tile, no blending of windows)
  tiles then reproduce the whole image's prediction to the receptive field.

Nothing is imported from Cellpose or torch when this module is imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from fractions import Fraction
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
from .watershed import check_diameter, check_kernels

if TYPE_CHECKING:
    from ..io import ImageSource

__all__ = [
    "CELLPOSE_MEMORY_MODEL",
    "MODEL_CACHE",
    "CellposeSegmenter",
    "auto_tile_shape_cellpose",
    "cellpose_fn",
    "cellpose_memory_model",
    "input_grid",
]

log = logging.getLogger("blockbuster.plugins.cellpose")

#: Cellpose's networks are equivariant on shifts by multiples of this many network pixels
#: (CPnet pools three times by 2; Cellpose 4's ViT embeds 8 x 8 patches).
_NET_GRID = 8

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
#: A rescale that needs a larger grid than this (in input pixels) is not aligned: its fraction
#: p / q has a large q (e.g. diameter 23.77 at diam_mean 30), and tiles rounded that far would
#: waste overlap.
_MAX_GRID = 256
#: Cellpose's own window size per version (``bsize``) when the user does not set one.
_DEFAULT_BSIZE = {3: 224, 4: 256}
#: ``bsize="tile"``: a window larger than any tile, so Cellpose runs one window per tile.
_TILE_BSIZE = 2**30
#: ``style="image"``: at most this many windows per plane axis, and planes, are sampled.
_STYLE_WINDOWS_PER_AXIS = 4
_STYLE_PLANES = 4
_STYLES = ("window", "image")

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
        ``percentiles``, ``invert``, ``device``, ``model_kwargs`` and ``style`` (see
        :class:`CellposeSegmenter`). ``bsize="tile"`` runs Cellpose's network on each tile
        in one window (more memory per call; no blending of windows inside a tile).

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
    style : {"window", "image"}
        Cellpose 3's style vector: ``"window"`` (Cellpose's own: each network window's), or
        ``"image"``: one style computed in :meth:`prepare` from windows spread over the whole
        image and used in every window of every tile, so that a pixel's prediction no longer
        depends on the window it falls in. Use with ``bsize="tile"`` to reproduce whole-image
        predictions tile by tile. Not for Cellpose 4 (its network has no style vector).
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
        style: str = "window",
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
        self.style = _check_style(style, info)
        #: Set by prepare() with normalize="global".
        self.norm: Percentiles | None = None
        #: Set by prepare() with style="image": the style vector used in every window.
        self.style_vector: list[float] | None = None
        self._warned_per_tile = False

    # -- declared preferences -----------------------------------------------------------------
    @property
    def spatial_ndim(self) -> int | None:  # type: ignore[override]
        """2 in 2-D mode (one z-plane per tile with ``"auto"``), None for 3-D or stitched planes."""
        return None if self.do_3D or self._stitches_planes else 2

    @property
    def rescale(self) -> tuple[float, ...]:
        """How Cellpose resizes a tile per spatial axis before its network (z last in 3-D).

        ``diam_mean / diameter`` (Cellpose 3: ``diam_mean`` is 30, 17 for ``nuclei``, a trained
        model's own value from its file; without a diameter, ``diam_mean / diam_labels``);
        Cellpose 4: ``30 / diameter``, 1 without one. In 3-D, z is also scaled by ``anisotropy``.
        """
        xy = self._xy_rescale()
        if not self.do_3D:
            return (xy, xy)
        anisotropy = float(self.eval_kwargs.get("anisotropy") or 1.0)
        return (xy * anisotropy, xy, xy)

    @property
    def grid(self) -> tuple[int, ...] | None:  # type: ignore[override]
        """Per spatial axis, the input step that is a multiple of 8 network pixels after rescaling.

        ``8 q / gcd(p, 8)`` for a rescale of ``p / q``: 8 at rescale 1, 16 at 1.5 (diameter
        20 with a model trained at 30), 4 at 2. None when the rescale is no simple fraction
        (the grid would exceed 256 pixels; choose a diameter with ``diam_mean / diameter`` a
        simple fraction, e.g. 24 instead of 23.7, to get one). Planes segmented one at a time
        (``stitch_threshold``) have grid 1 in z.
        """
        grids = tuple(input_grid(r, _NET_GRID) for r in self.rescale)
        if any(g is None for g in grids):
            return None
        if self._stitches_planes and not self.do_3D:
            return (1, *grids)  # type: ignore[arg-type]
        return grids  # type: ignore[return-value]

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
            "style": self.style,
        }

    def check_plan(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   overlap: tuple[int, ...]) -> None:
        """Cellpose sees 2-D planes (or 3-D volumes with ``do_3D``) and rescales every tile by
        ``30 / diameter``: objects larger than the image, or than a tile's plane, leave it
        nothing to find."""
        if len(spatial_shape) < 2:
            raise InputError(f"Cellpose segments 2-D planes; this image has spatial shape "
                             f"{spatial_shape}")
        if self.do_3D and len(spatial_shape) != 3:
            raise InputError(f"do_3D=True needs a 3-D image; this one has spatial shape "
                             f"{spatial_shape}")
        if self.diameter is None:
            return
        plane = slice(-2, None)  # the objects' diameter is in pixels of the planes
        check_diameter("diameter", self.diameter, spatial_shape[plane])
        check_kernels([(f"diameter={self.diameter!r}", math.ceil(self.diameter))],
                      spatial_shape[plane], tile_shape[plane], overlap[plane])

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
        if self.style == "image":
            self.style_vector = self.image_style(image)
        if self.grid is None:
            log.info("Cellpose rescales by %s (diameter %s): no tile grid of at most %d px "
                     "maps onto its network's 8-pixel grid, so tiles cannot see the image "
                     "exactly as the whole image does; a diameter that makes the rescale a "
                     "simple fraction (e.g. 24 rather than 23.77 for a model trained at 30) "
                     "gives one", ", ".join(f"{r:.4g}" for r in self.rescale), self.diameter,
                     _MAX_GRID)

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """Cellpose labels (uint32) of one tile; each z-plane separately unless ``do_3D``."""
        if self.style == "image" and self.style_vector is None:
            raise InputError("style='image' needs prepare(image) first (tile_process calls it)")
        spatial, x = network_input(tile, self.channel_axis, self._normalized)
        if x is None:
            return np.zeros(spatial, np.uint32)
        model = self.load_model()
        with _eval_lock(self._cache_key()), self._fixed_style(model):
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

    def image_style(self, image: ImageSource) -> list[float]:
        """Cellpose 3's style vector for the whole image: the styles of up to 4 x 4 windows
        (each one network window, ``bsize`` rescaled) spread evenly over up to 4 evenly spaced
        planes, summed and normalised as Cellpose sums and normalises its windows' styles."""
        model = self.load_model()
        if not hasattr(getattr(model, "net", None), "make_style"):
            raise InputError("style='image' needs Cellpose 3's CPnet; this model's network has "
                             "no style vector")
        bsize = self._cellpose_windows()["bsize"]
        side = max(_MIN_EDGE, int(bsize / self._xy_rescale()) - 16)  # one window, padded
        plane = image.spatial_axes[-2:]
        choices = []
        for axis in image.tiled_axes:
            n = image.shape[axis]
            if axis in plane:
                width = min(side, n)
                count = min(_STYLE_WINDOWS_PER_AXIS, -(-n // width))
                starts = np.linspace(0, n - width, count).round().astype(int)
                choices.append([slice(int(a), int(a) + width) for a in starts])
            else:
                picks = np.linspace(0, n - 1, min(_STYLE_PLANES, n)).round().astype(int)
                choices.append([slice(int(i), int(i) + 1) for i in dict.fromkeys(picks)])
        total = np.zeros(0)
        for region in itertools.product(*choices):
            tile = image.read(region)
            c = image.tile_channel_axis
            x = np.moveaxis(tile, c, -1) if c is not None else tile[..., None]
            x = x.reshape(x.shape[-3:])  # the plane and its channels: other axes have one voxel
            if self.normalize == "global":
                x = normalize_tile(x, self.norm, 2)  # type: ignore[arg-type]
            x = x.astype(np.float32)
            if self.invert and self.normalize != "tile":
                x = 1.0 - x
            args = {**self._eval_args(x.shape[-1]), "bsize": bsize}
            style = np.asarray(model.eval(x, channel_axis=2, compute_masks=False, **args)[2],
                               np.float64).reshape(-1)
            total = style if total.size == 0 else total + style
        norm = float(np.sqrt((total**2).sum()))
        return [float(v) for v in (total / norm if norm > 0 else total)]

    @contextlib.contextmanager
    def _fixed_style(self, model: Any) -> Iterator[None]:
        """With ``style="image"``: every network window uses :attr:`style_vector`."""
        if self.style != "image":
            yield
            return
        import torch

        module = model.net.make_style
        value = torch.tensor(self.style_vector or [], dtype=torch.float32)[None]

        def fixed(features: Any) -> Any:
            return value.to(features.device).expand(features.shape[0], -1)

        module.forward = fixed  # an instance attribute: nn.Module calls it instead
        try:
            yield
        finally:
            del module.forward

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
        if args.get("bsize") == "tile":
            args["bsize"] = _TILE_BSIZE
        if not _cellpose_info()["v4"]:
            # Cellpose 3: grayscale unless the user chose channels ([0, 0] avoids its guessing).
            args["channels"] = self.channels or ([0, 0] if n_channels == 1 else None)
        return args

    def _eval_plane(self, model: Any, plane: np.ndarray) -> np.ndarray:
        padded, crop = self._pad_to_grid(plane, self.rescale)
        masks = model.eval(padded, channel_axis=2, **self._eval_args(plane.shape[-1]))[0]
        return _as_labels(masks, padded.shape[:2])[crop]

    def _eval_volume(self, model: Any, volume: np.ndarray) -> np.ndarray:
        # Planes stitched in z (stitch_threshold) never pass z through the network.
        rescale = self.rescale if self.do_3D else (None, *self.rescale)
        padded, crop = self._pad_to_grid(volume, rescale)
        masks = model.eval(padded, channel_axis=3, z_axis=0, do_3D=self.do_3D,
                           **self._eval_args(volume.shape[-1]))[0]
        return _as_labels(masks, padded.shape[:3])[crop]

    def _pad_to_grid(self, x: np.ndarray, rescale: Sequence[float | None]
                     ) -> tuple[np.ndarray, tuple[slice, ...]]:
        """Pad the spatial axes of ``x`` (channels last) at their end so that Cellpose's own
        padding and windows start on the network grid; also to at least ``_MIN_EDGE``.

        Cellpose 3 guesses axes on tiny inputs, hence the minimum. Zeros are what Cellpose pads
        with after normalising; with ``normalize="tile"`` Cellpose normalises the padded input
        itself, so edge values are repeated instead, not to shift its percentiles.
        """
        n_spatial = len(rescale)
        window = self._cellpose_windows()
        pad = []
        for length, r in zip(x.shape[:n_spatial], rescale, strict=True):
            aligned = length if r is None else aligned_length(length, r, **window)
            target = max(_MIN_EDGE, aligned)
            pad.append((0, target - length))
        crop = tuple(slice(0, s) for s in x.shape[:n_spatial])
        if not any(after for _, after in pad):
            return x, crop
        pad += [(0, 0)] * (x.ndim - n_spatial)
        if self.normalize == "tile":
            return np.pad(x, pad, mode="edge"), crop
        return np.pad(x, pad, mode="constant"), crop

    def _cellpose_windows(self) -> dict[str, Any]:
        """How Cellpose pads and cuts its input (``aligned_length``'s keywords)."""
        v4 = _cellpose_info()["v4"]
        bsize = self.eval_kwargs.get("bsize") or _DEFAULT_BSIZE[4 if v4 else 3]
        bsize = _TILE_BSIZE if bsize == "tile" else int(bsize)
        if self.do_3D and not v4:
            bsize = _DEFAULT_BSIZE[3]  # Cellpose 3 does not pass bsize on in 3-D
        return {"bsize": bsize, "tile_overlap": float(self.eval_kwargs.get("tile_overlap", 0.1)),
                "augment": bool(self.eval_kwargs.get("augment", False)), "min_size": v4}

    def _xy_rescale(self) -> float:
        if _cellpose_info()["v4"]:
            return 30.0 / self.diameter if self.diameter else 1.0
        diam_mean, diam_labels = _diameters(self.model)
        return diam_mean / (self.diameter or diam_labels)

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


def _check_style(style: Any, info: dict[str, Any]) -> str:
    if style not in _STYLES:
        raise InputError(f"style={style!r} must be one of {', '.join(map(repr, _STYLES))}")
    if style == "image" and info["v4"]:
        raise InputError(f"style='image' fixes Cellpose 3's style vector; Cellpose "
                         f"{info['version']}'s network has none (use style='window')")
    return str(style)


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
def input_grid(rescale: float, step: int) -> int | None:
    """The smallest input length that Cellpose's rescaling maps to a multiple of ``step``.

    For ``rescale = p / q`` (in lowest terms) that is ``q * step / gcd(p, step)``; None if
    the rescale is no fraction with a denominator up to 1000 or the grid exceeds
    ``_MAX_GRID``.

    Examples
    --------
    >>> input_grid(1.0, 8), input_grid(1.5, 8), input_grid(2.0, 8), input_grid(30 / 17, 8)
    (8, 16, 4, 68)
    >>> input_grid(30 / 23.77, 8) is None
    True
    """
    frac = Fraction(rescale).limit_denominator(1000)
    if not math.isclose(float(frac), rescale, rel_tol=1e-9):
        return None
    grid = frac.denominator * step // math.gcd(frac.numerator, step)
    return grid if grid <= _MAX_GRID else None


def window_origins(length: int, *, bsize: int, tile_overlap: float = 0.1, augment: bool = False,
                   min_size: bool = False) -> list[int]:
    """Where Cellpose's network windows start in an input of ``length`` network pixels.

    Mirrors ``cellpose.core.run_net``: centred padding to a multiple of 16 plus 8 on each side
    (Cellpose 4, ``min_size``: at least ``bsize``), then windows of ``bsize`` at
    ``linspace(0, padded - bsize, n)``. Origins are relative to the input's first pixel.

    Examples
    --------
    >>> window_origins(192, bsize=224)      # one window; Cellpose pads 8 before
    [-8]
    >>> window_origins(560, bsize=224)      # four windows, three off the grid
    [-8, 109, 226, 344]
    """
    before, after = _cellpose_padding(length, bsize if min_size else None)
    padded = length + before + after
    if augment:
        padded = max(padded, bsize)
        n = max(2, math.ceil(2.0 * padded / bsize))
        starts = np.linspace(0, padded - bsize, n).astype(int)
    else:
        overlap = min(0.5, max(0.05, tile_overlap))
        n = 1 if padded <= bsize else math.ceil((1.0 + 2 * overlap) * padded / bsize)
        starts = np.linspace(0, padded - min(bsize, padded), n).astype(int)
    return [int(s) - before for s in starts]


def _cellpose_padding(length: int, min_size: int | None) -> tuple[int, int]:
    """What ``cellpose.transforms.get_pad_yx`` pads before and after an axis (``div=16``,
    ``extra=1``; ``min_size`` as Cellpose 4 passes ``bsize``). Checked against Cellpose's own
    function by the plugin's tests."""
    if min_size is None or length >= min_size:
        missing = -(-length // 16) * 16 - length
    else:
        missing = max(0, min_size - length - 16)
    return 8 + missing // 2, 8 + missing - missing // 2


def aligned_length(length: int, rescale: float, *, bsize: int, tile_overlap: float = 0.1,
                   augment: bool = False, min_size: bool = False) -> int:
    """The smallest length >= ``length`` (input pixels) at which all of Cellpose's windows
    start on multiples of 8 network pixels; ``length`` itself if the rescale has no grid.

    Examples
    --------
    >>> aligned_length(192, 1.0, bsize=224), aligned_length(560, 1.0, bsize=224)
    (192, 592)
    >>> aligned_length(200, 1.5, bsize=224)  # 224 -> 336 network px: windows at -8, 120
    224
    """
    grid = input_grid(rescale, _NET_GRID)
    if grid is None:
        return length
    candidate = -(-length // grid) * grid
    for _ in range(256):  # the window count grows slowly: a few steps suffice in practice
        net = int(candidate * rescale)  # as Cellpose computes it
        origins = window_origins(net, bsize=bsize, tile_overlap=tile_overlap, augment=augment,
                                 min_size=min_size)
        if net % _NET_GRID == 0 and all(o % _NET_GRID == 0 for o in origins):
            return candidate
        candidate += grid
    return length


@functools.lru_cache(maxsize=16)
def _model_file_diameters(path: str, mtime_ns: int) -> tuple[float, float]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    diam_mean = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0
    diam_labels = (float(state["diam_labels"].reshape(-1)[0]) if "diam_labels" in state
                   else diam_mean)
    return diam_mean, diam_labels


def _diameters(model: str) -> tuple[float, float]:
    """Cellpose 3's ``(diam_mean, diam_labels)`` of a model name or file (as it loads them)."""
    if os.path.exists(model):
        return _model_file_diameters(model, os.stat(model).st_mtime_ns)
    diam_mean = 17.0 if "nuclei" in model else 30.0
    return diam_mean, diam_mean


def _as_labels(masks: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Cellpose squeezes its output; restore ``shape`` and use uint32."""
    masks = np.asarray(masks)
    if masks.size != math.prod(shape):
        raise RuntimeError(f"Cellpose returned masks of shape {masks.shape} for input {shape}")
    return masks.reshape(shape).astype(np.uint32, copy=False)


# -- memory: what tile_shape="auto" reserves for Cellpose --------------------------------------
#: Cellpose's rule of thumb: working memory of about 20 x the raw input bytes, plus the model.
CELLPOSE_BYTES_PER_INPUT_BYTE = 20.0
CELLPOSE_MODEL_BYTES = 2 * 1024**3
#: Cellpose rescales every image by ``CELLPOSE_REFERENCE_DIAMETER / diameter`` per axis.
CELLPOSE_REFERENCE_DIAMETER = 30.0

def cellpose_memory_model(diameter: float, ndim: int) -> MemoryModel:
    """Cellpose's memory: about 20 x the raw input bytes, rescaled, plus 2 GiB for the model.

    Cellpose resamples the image by ``30 / diameter`` on each of the ``ndim`` axes it works in,
    so its working memory scales with ``(30 / diameter) ** ndim``.

    Parameters
    ----------
    diameter : float
        Expected object diameter in voxels, as passed to Cellpose.
    ndim : int
        2 for Cellpose's 2-D mode (also on a 3-D stack), 3 for ``do_3D=True``.

    Returns
    -------
    MemoryModel

    Examples
    --------
    >>> m = cellpose_memory_model(15, 2)
    >>> m.scale, m.per_voxel_bytes(2)
    (4.0, 160.0)
    """
    if isinstance(diameter, bool) or not isinstance(diameter, (int, float, np.number)):
        raise InputError(f"diameter={diameter!r} must be a positive number of voxels")
    if not (diameter > 0 and math.isfinite(diameter)):
        raise InputError(f"diameter={diameter!r} must be a positive number of voxels")
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or ndim < 1:
        raise InputError(f"ndim={ndim!r} must be a positive int")
    return MemoryModel(
        bytes_per_input_byte=CELLPOSE_BYTES_PER_INPUT_BYTE,
        bytes_per_voxel=0.0,
        fixed_bytes=CELLPOSE_MODEL_BYTES,
        scale=(CELLPOSE_REFERENCE_DIAMETER / float(diameter)) ** int(ndim),
    )


#: Cellpose at its reference diameter of 30 (no rescaling), in 2-D or 3-D alike.
CELLPOSE_MEMORY_MODEL: MemoryModel = cellpose_memory_model(CELLPOSE_REFERENCE_DIAMETER, 2)


def auto_tile_shape_cellpose(
    shape: tuple[int, ...],
    dtype: Any,
    diameter: float = 30,
    use_gpu: bool = False,
    *,
    do_3D: bool = False,
    overlap: int | tuple[int, ...] | None = None,
    channels: int = 1,
    memory: float | None = None,
    chunks: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """Tile shape for Cellpose, for ``tile_shape=functools.partial(auto_tile_shape_cellpose, ...)``.

    Uses :func:`cellpose_memory_model`. 2-D Cellpose (``do_3D=False``) on a 3-D stack gets
    tiles one z-slice deep; ``do_3D=True`` sizes the last three axes.

    Parameters
    ----------
    shape : tuple of int
        Spatial image shape (no channel axis), as the engine passes it.
    dtype : numpy dtype-like
        Input dtype.
    diameter : float
        Cellpose's ``diameter`` in voxels.
    use_gpu : bool
        Size from free GPU memory.
    do_3D : bool
        Cellpose's 3-D mode.
    overlap : int or tuple of int, optional
        Halo; default the diameter rounded up, the context Cellpose needs at a tile border.
    channels : int
        Channels per tile.
    memory : int or float, optional
        Budget in bytes, overriding the probe.
    chunks : tuple of int, optional
        Spatial storage chunk shape, for aligned reads.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> import functools
    >>> tile_fn = functools.partial(auto_tile_shape_cellpose, diameter=30, memory=4 * 1024**3)
    >>> tile_fn((40, 6000, 6000), "uint16")
    (1, 5644, 5644)
    """
    ndim = 3 if do_3D else 2
    if len(shape) < ndim:
        raise InputError(
            f"Cellpose with do_3D={do_3D} needs at least {ndim} spatial axes, got shape {shape!r}"
        )
    model = cellpose_memory_model(diameter, ndim)
    if overlap is None:
        overlap = math.ceil(diameter)
    from ..sizing import auto_tile_shape

    return auto_tile_shape(
        shape,
        dtype,
        overlap=overlap,
        use_gpu=use_gpu,
        memory=memory,
        memory_model=model,
        channels=channels,
        chunks=chunks,
        spatial_ndim=ndim,
    )
