"""StarDist (2-D and 3-D) as a blockbuster segmenter.

>>> from blockbuster.plugins.stardist import stardist_fn               # doctest: +SKIP
>>> tile_process("image.zarr", stardist_fn("2D_versatile_fluo"))        # doctest: +SKIP

``model`` is a pretrained name (``StarDist2D.from_pretrained``: ``2D_versatile_fluo``,
``2D_versatile_he``, ``2D_paper_dsb2018``, ``3D_demo``, ... and their aliases) or a model folder
of your own: ``stardist_fn("my_model", basedir="models")`` loads ``models/my_model`` exactly as
``StarDist2D(None, name="my_model", basedir="models")`` does (``stardist_fn("models/my_model")``
too). 2-D or 3-D is read from the folder's ``config.json`` or the pretrained registry.

As with Cellpose, the model is loaded once per process and never pickled, and intensities are
normalised with percentiles computed once for the whole image (StarDist's usual 1 and 99.8),
so that tiles do not disagree at their borders; ``normalize="tile"`` normalises each tile with
csbdeep's ``normalize`` instead. Nothing is imported from StarDist or TensorFlow when this
module is imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..segmenter import MemoryModel, Segmenter, padded_extent
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

__all__ = ["MODEL_CACHE", "StardistSegmenter", "stardist_fn"]

log = logging.getLogger("blockbuster.plugins.stardist")

#: Models loaded in this process, shared by every StardistSegmenter.
MODEL_CACHE = ModelCache("stardist")

#: StarDist's usual normalisation percentiles (csbdeep ``normalize(x, 1, 99.8)``).
DEFAULT_PERCENTILES = (1.0, 99.8)

#: The overlap the tiling guide recommends for 2D_versatile_fluo, and the base for other models.
BASE_OVERLAP = 32

#: Arguments of ``predict_instances`` that the plugin sets itself.
_RESERVED = frozenset({"img", "axes", "normalizer", "n_tiles", "return_predict", "prob_thresh",
                       "nms_thresh"})

# Peak working memory of predict_instances per voxel of the tile, measured here on the CPU as the
# rise of the process's RSS (sampled every 5 ms) over its level after a warm-up call, with
# untrained networks of the pretrained models' architecture (StarDist's default U-Net: 32 base
# filters, 128 features after the U-Net): 2-D, 32 rays, grid 2 (as 2D_versatile_fluo): 350 B per
# voxel for 1024^2 and 2048^2 tiles; 3-D, 96 rays, grid (1, 2, 2): 472-475 B per voxel for
# 32x256x256 and 64x256x256. prob_thresh was high, so non-maximum suppression had little to do;
# the declared values leave 20-25 % headroom for it and for the normalised copy of the tile.
# The process held about 800 MB before the call (Python, NumPy, TensorFlow's runtime and the
# model); 1 GiB of fixed memory covers the runtime and the weights in a worker.
_BYTES_PER_VOXEL_2D = 420.0
_BYTES_PER_VOXEL_3D = 600.0
_FIXED_BYTES = 1024**3


def stardist_fn(
    model: str | os.PathLike = "2D_versatile_fluo",
    *,
    basedir: str | os.PathLike | None = None,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    normalize: str = "global",
    n_tiles: Sequence[int] | None = None,
    **predict_kwargs: Any,
) -> StardistSegmenter:
    """A StarDist segmenter for :func:`blockbuster.tile_process`.

    Parameters
    ----------
    model : str or path
        A pretrained model name or alias, a model folder name inside ``basedir``, or the path
        of a model folder (with ``config.json`` and weights).
    basedir : path, optional
        Folder holding the model folder ``model`` (as StarDist's own ``basedir``).
    prob_thresh, nms_thresh : float, optional
        Detection thresholds; default: the model's own (``thresholds.json``).
    normalize : {"global", "tile", "none"}
        ``"global"``: the same percentiles (1, 99.8) for every tile, from the whole image;
        ``"tile"``: csbdeep's ``normalize`` per tile; ``"none"``: input already normalised.
    n_tiles : sequence of int, optional
        Let StarDist split each tile further (one entry per spatial axis of the model), for
        GPUs with little memory.
    **predict_kwargs
        Passed to ``predict_instances`` (``scale``, ``nms_kwargs``, ...), plus this plugin's
        ``percentiles`` and ``channel`` (see :class:`StardistSegmenter`).

    Returns
    -------
    StardistSegmenter
    """
    return StardistSegmenter(model, basedir=basedir, prob_thresh=prob_thresh,
                             nms_thresh=nms_thresh, normalize=normalize, n_tiles=n_tiles,
                             **predict_kwargs)


class StardistSegmenter(Segmenter):
    """StarDist on one tile at a time, with the model loaded once per process.

    Parameters
    ----------
    model, basedir, prob_thresh, nms_thresh, normalize, n_tiles, **predict_kwargs
        As for :func:`stardist_fn`.
    percentiles : (float, float)
        Low and high percentile mapped to 0 and 1.
    channel : int, optional
        For a single-channel model on a multichannel image: the channel to segment (default 0).
    """

    name = "stardist"
    preferred_stitch = "iou"
    requires = ("stardist", "tensorflow")
    extra = "stardist"

    def __init__(
        self,
        model: str | os.PathLike = "2D_versatile_fluo",
        *,
        basedir: str | os.PathLike | None = None,
        prob_thresh: float | None = None,
        nms_thresh: float | None = None,
        normalize: str = "global",
        n_tiles: Sequence[int] | None = None,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        channel: int | None = None,
        **predict_kwargs: Any,
    ) -> None:
        require(self.requires, self.extra or "stardist", "StarDist")
        self.model, self.basedir, self.spec = _resolve_model(model, basedir)
        self.prob_thresh = _threshold("prob_thresh", prob_thresh)
        self.nms_thresh = _threshold("nms_thresh", nms_thresh)
        self.normalize = check_mode(normalize)
        self.percentiles = check_percentiles(percentiles)
        self.n_tiles = _check_n_tiles(n_tiles, self.spec["n_dim"])
        self.channel = _check_channel(channel, self.spec["n_channel_in"])
        self.predict_kwargs = _check_predict_kwargs(predict_kwargs)
        #: Set by prepare() with normalize="global".
        self.norm: Percentiles | None = None
        self._warned_per_tile = False

    # -- declared preferences -----------------------------------------------------------------
    @property
    def n_dim(self) -> int:
        """2 or 3: the dimensionality of the model."""
        return int(self.spec["n_dim"])

    @property
    def spatial_ndim(self) -> int | None:  # type: ignore[override]
        return 2 if self.n_dim == 2 else None

    @property
    def grid(self) -> tuple[int, ...] | None:  # type: ignore[override]
        """The network's grid per axis: StarDist's ``grid`` x ``unet_pool ** unet_n_depth``.

        StarDist pads each input at its end to a multiple of this and predicts on it; two tiles
        agree on a pixel only when both start on a multiple of it. None for a pretrained model
        whose configuration is not on this machine yet (it is read from StarDist's download
        cache when it is).
        """
        return self.spec.get("net_grid")

    @property
    def receptive_field(self) -> tuple[int, ...] | None:
        """How far the network looks beyond a pixel, per axis (see :func:`receptive_field`).

        A tile's prediction of a pixel equals the whole image's only when the pixel lies this
        far inside the tile's read region. Most of a pixel's response comes from nearer: half
        the field as halo (the preferred overlap of a model given as a folder) already gives
        99.98-100 % of the whole image's voxels (``bench_fidelity --sweep overlap``). None when
        unknown (pretrained model not on this machine, ResNet backbone).
        """
        return self.spec.get("receptive_field")

    @property
    def preferred_overlap(self) -> int | tuple[int, ...]:  # type: ignore[override]
        """32 (the guide's value for 2D_versatile_fluo), scaled by the model's grid and anisotropy,
        at least half the network's receptive field for a model given as a folder, then rounded
        up to a multiple of the network grid.

        A model that predicts on a coarser grid than 2 was trained for larger objects; a 3-D
        model whose objects are flatter along an axis (``anisotropy``) needs less halo there.
        A tile predicts a pixel as the whole image does only when the halo holds what the
        network sees around it: with half the field (64 px for a 106 px field) a StarDist 2-D
        model's tiles matched its whole-image labels on 99.98-100 % of the voxels, against
        99.6-99.9 % with 32 (``bench_fidelity --sweep overlap``). Pretrained names keep the
        guide's value: their configuration is known only after the download, and a run must
        plan the same before it and after. An overlap off the network grid makes the tiles'
        read regions start off it (an anisotropic 3-D model with overlap (15, 32, 30) instead
        of (16, 32, 32) lost 10 % F1).
        """
        grid = self.spec.get("grid") or (1,) * self.n_dim
        anisotropy = self.spec.get("anisotropy") or (1.0,) * self.n_dim
        per_axis = tuple(math.ceil(BASE_OVERLAP * max(1.0, g / 2) / max(a, 1e-6))
                         for g, a in zip(grid, anisotropy, strict=True))
        field = self.receptive_field if self.spec.get("folder") is not None else None
        if field is not None:
            per_axis = tuple(max(o, -(-f // 2)) for o, f in zip(per_axis, field, strict=True))
        net_grid = self.grid or (1,) * self.n_dim
        per_axis = tuple(-(-o // n) * n for o, n in zip(per_axis, net_grid, strict=True))
        return per_axis[0] if len(set(per_axis)) == 1 else per_axis

    @property
    def memory_model(self) -> MemoryModel:  # type: ignore[override]
        per_voxel = _BYTES_PER_VOXEL_2D if self.n_dim == 2 else _BYTES_PER_VOXEL_3D
        return MemoryModel(bytes_per_input_byte=0.0, bytes_per_voxel=per_voxel,
                           fixed_bytes=_FIXED_BYTES)

    @property
    def model_cache(self) -> ModelCache:
        return MODEL_CACHE

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "basedir": self.basedir,
            "prob_thresh": self.prob_thresh,
            "nms_thresh": self.nms_thresh,
            "normalize": self.normalize,
            "percentiles": list(self.percentiles),
            "channel": self.channel,
            "predict_kwargs": jsonable(self.predict_kwargs),
        }

    def check_plan(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   overlap: tuple[int, ...]) -> None:
        """The model's dimensionality must suit the image, and ``n_tiles`` must split each tile
        into pieces of at least one voxel."""
        if self.n_dim == 3 and len(spatial_shape) != 3:
            raise InputError(f"{self.model!r} is a 3-D StarDist model; the image has spatial "
                             f"shape {spatial_shape}")
        if len(spatial_shape) < 2:
            raise InputError(f"StarDist segments 2-D planes or 3-D volumes; this image has "
                             f"spatial shape {spatial_shape}")
        if self.n_tiles is None:
            return
        padded = padded_extent(spatial_shape, tile_shape, overlap)[-self.n_dim:]
        for axis, (n, p) in enumerate(zip(self.n_tiles, padded, strict=True)):
            if n > p:
                raise InputError(f"n_tiles={self.n_tiles} splits model axis {axis} of a tile "
                                 f"{p} voxels long (with its halo) into {n} pieces; use fewer "
                                 "n_tiles or larger tiles ($tile_shape)")

    # -- running ------------------------------------------------------------------------------
    def prepare(self, image: ImageSource) -> None:
        """Check the image against the model and compute the normalisation percentiles once."""
        self.channel_axis = image.segment_channel_axis  # where its tiles hold channels
        spatial = len(image.spatial_shape)
        if self.n_dim == 3 and spatial != 3:
            raise InputError(f"{self.model!r} is a 3-D StarDist model; the image has spatial "
                             f"shape {image.spatial_shape}")
        self._check_channels(image.n_channels, image.segment_channel_axis is not None)
        if self.normalize == "global":
            self.norm = Percentiles.from_image(image, self.percentiles)
            self._statistics = self.norm.statistics(image, self.percentiles)

    def segment(self, tile: np.ndarray) -> np.ndarray:
        """StarDist labels (int32) of one tile; a 2-D model segments each z-plane on its own."""
        spatial, x = network_input(tile, self.channel_axis, self._normalized)
        if x is None:
            return np.zeros(spatial, np.int32)
        x = self._model_channels(x)
        model = self.load_model()
        if len(spatial) == self.n_dim:
            return self._predict(model, x)
        if self.n_dim == 2 and len(spatial) == 3:
            return stack_plane_labels([self._predict(model, plane) for plane in x], np.int32)
        raise InputError(f"a {self.n_dim}-D StarDist model cannot segment a tile of spatial "
                         f"shape {spatial}")

    def _check_channels(self, n_channels: int, has_axis: bool) -> None:
        wanted = self.spec["n_channel_in"]
        if wanted > 1 and (not has_axis or n_channels != wanted):
            raise InputError(f"StarDist model {self.model!r} takes {wanted} channels; the image "
                             f"has {n_channels if has_axis else 'no channel axis'}")
        if wanted == 1 and (self.channel or 0) >= n_channels:
            raise InputError(f"channel={self.channel} but the image has {n_channels} channel(s)")

    def _model_channels(self, x: np.ndarray) -> np.ndarray:
        """Channels last, as many as the model takes."""
        self._check_channels(x.shape[-1], self.channel_axis is not None)
        if self.spec["n_channel_in"] == 1 and x.shape[-1] > 1:
            c = self.channel or 0
            return x[..., c:c + 1]
        return x

    def _normalized(self, tile: np.ndarray) -> np.ndarray:
        if self.normalize == "none":
            return tile.astype(np.float32)
        if self.normalize == "tile":
            from csbdeep.utils import normalize

            axes = tuple(a for a in range(tile.ndim) if a != self.channel_axis)
            return normalize(tile, *self.percentiles, axis=axes).astype(np.float32, copy=False)
        return normalize_tile(tile, image_or_tile_percentiles(self, tile), self.channel_axis)

    def _predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        axes = "YXC" if x.ndim == 3 else "ZYXC"
        n_tiles = None if self.n_tiles is None else (*self.n_tiles, 1)
        labels, _ = model.predict_instances(
            x, axes=axes, prob_thresh=self.prob_thresh, nms_thresh=self.nms_thresh,
            n_tiles=n_tiles, **{"show_tile_progress": False, "verbose": False,
                                **self.predict_kwargs})
        return np.asarray(labels).astype(np.int32, copy=False)

    # -- the model ----------------------------------------------------------------------------
    def load_model(self) -> Any:
        """The StarDist model, loaded once per process."""
        return MODEL_CACHE.get(self._cache_key(), self._load)

    def _cache_key(self) -> tuple:
        folder = self.spec.get("folder")
        if folder is None:
            return ("pretrained", self.spec["class"], self.model)
        # A retrained model saved in the same folder is a new model.
        stamps = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in Path(folder).glob("*.h5")))
        return ("folder", self.spec["class"], folder, stamps)

    def _load(self) -> Any:
        _tensorflow_memory_growth()
        models = importlib.import_module("stardist.models")
        cls = getattr(models, self.spec["class"])
        out = io.StringIO()
        # StarDist prints what it loads; keep worker output clean and log it instead.
        with contextlib.redirect_stdout(out):
            if self.spec.get("folder") is None:
                model = cls.from_pretrained(self.model)
            else:
                folder = Path(self.spec["folder"])
                model = cls(None, name=folder.name, basedir=str(folder.parent))
        if model is None:  # from_pretrained prints and returns None for an unknown name
            raise InputError(f"StarDist has no pretrained model {self.model!r}: {out.getvalue()}")
        log.debug("loaded StarDist model %s: %s", self.model, out.getvalue().strip())
        return model

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_warned_per_tile": False}


# -- resolving the model ---------------------------------------------------------------------
def _resolve_model(model: Any, basedir: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(model, basedir, spec) with spec: class, n_dim, n_channel_in, grid, anisotropy, folder."""
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise InputError(f"model={model!r} must be a StarDist model name or folder")
    if basedir is not None:
        folder = Path(basedir).expanduser() / str(model)
        if not (folder / "config.json").is_file():
            raise InputError(f"no StarDist model folder {folder} (expected {folder}/config.json)")
        return str(model), str(Path(basedir).expanduser().resolve()), _folder_spec(folder)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve()), None, _folder_spec(path)
    if isinstance(model, os.PathLike) or os.sep in str(model) or "/" in str(model):
        raise InputError(f"no StarDist model folder {path} (expected {path}/config.json)")
    spec = _pretrained_spec(str(model))
    return spec.pop("key"), None, spec


def _folder_spec(folder: Path) -> dict[str, Any]:
    """What blockbuster needs from a model folder's config.json, read without TensorFlow."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read StarDist config {folder / 'config.json'}: {exc}") from exc
    n_dim = int(config.get("n_dim") or len(str(config.get("axes", "YXC")).replace("C", "")))
    if n_dim not in (2, 3):
        raise InputError(f"StarDist model {folder} has n_dim={n_dim}; expected 2 or 3")
    return {"class": f"StarDist{n_dim}D", "n_dim": n_dim, "folder": str(folder.resolve()),
            "n_channel_in": int(config.get("n_channel_in", 1)),
            "grid": tuple(config.get("grid") or (1,) * n_dim),
            "anisotropy": tuple(config["anisotropy"]) if config.get("anisotropy") else None,
            "net_grid": network_grid(config, n_dim),
            "receptive_field": receptive_field(config, n_dim)}


def network_grid(config: dict[str, Any], n_dim: int) -> tuple[int, ...]:
    """The multiple StarDist pads every input to (its ``_axes_div_by``), from a ``config.json``.

    A U-Net backbone: ``grid * unet_pool ** unet_n_depth`` per axis; a ResNet: ``grid``.

    Examples
    --------
    >>> network_grid({"grid": [2, 2], "unet_n_depth": 3, "unet_pool": [2, 2]}, 2)
    (16, 16)
    >>> network_grid({"grid": [1, 2, 2], "unet_n_depth": 2, "backbone": "unet"}, 3)
    (4, 8, 8)
    """
    grid = tuple(int(g) for g in (config.get("grid") or (1,) * n_dim))
    if config.get("backbone", "unet") != "unet":
        return grid
    pool = tuple(int(p) for p in (config.get("unet_pool") or (2,) * n_dim))
    depth = int(config.get("unet_n_depth", 3 if n_dim == 2 else 2))
    return tuple(g * p**depth for g, p in zip(grid, pool, strict=True))


def receptive_field(config: dict[str, Any], n_dim: int) -> tuple[int, ...] | None:
    """How far (input pixels, per axis) a StarDist U-Net looks beyond a pixel to predict it.

    The network's receptive field from its ``config.json`` (no TensorFlow): StarDist's
    convolutions and max-poolings down to its ``grid``, csbdeep's U-Net
    (``unet_n_conv_per_depth`` convolutions per level down, in the middle and up, pooling and
    nearest upsampling by ``unet_pool``, skip connections) and the convolution after it,
    followed back from each output pixel to the input; the farthest reach beyond the pixel's
    own ``grid`` cell, either side. StarDist's ``_compute_receptive_field`` (the response to
    one bright pixel) finds the same for shallow U-Nets and a little less for deep ones, whose
    outermost pixels weigh too little to change a float32 output (94 px for the U-Net of
    2D_versatile_fluo, even with linear activations). None for a ResNet backbone.

    Examples
    --------
    >>> receptive_field({"grid": [2, 2], "unet_n_depth": 3}, 2)  # 2D_versatile_fluo's U-Net
    (106, 106)
    >>> receptive_field({"grid": [1, 2, 2], "unet_n_depth": 2}, 3)
    (26, 50, 50)
    """
    if config.get("backbone", "unet") != "unet":
        return None
    grid = tuple(int(g) for g in (config.get("grid") or (1,) * n_dim))
    kernel = tuple(int(k) for k in (config.get("unet_kernel_size") or (3,) * n_dim))
    pool = tuple(int(p) for p in (config.get("unet_pool") or (2,) * n_dim))
    depth = int(config.get("unet_n_depth", 3 if n_dim == 2 else 2))
    convs = int(config.get("unet_n_conv_per_depth", 2))
    after = int(config.get("net_conv_after_unet", 128)) > 0
    steps = max(round(math.log2(max(grid))), 0)  # StarDist pools by 2 up to the grid
    return tuple(_axis_reach(g, (k - 1) // 2, p, depth, convs, after, steps)
                 for g, k, p in zip(grid, kernel, pool, strict=True))


def _axis_reach(grid: int, half: int, pool: int, depth: int, convs: int, after: bool,
                steps: int) -> int:
    """:func:`receptive_field` along one axis: intervals of positions followed backwards."""
    Interval = tuple[int, int]

    def conv(iv: Interval, n: int) -> Interval:
        return iv[0] - n * half, iv[1] + n * half

    def pool_back(iv: Interval, p: int) -> Interval:  # coarse positions -> fine positions
        return p * iv[0], p * iv[1] + p - 1

    def up_back(iv: Interval, p: int) -> Interval:  # fine positions -> coarse positions
        return iv[0] // p, iv[1] // p

    def union(a: Interval, b: Interval) -> Interval:
        return min(a[0], b[0]), max(a[1], b[1])

    def unet_back(iv: Interval, level: int) -> Interval:
        """From the output of U-Net level ``level`` (its up path) back to its input."""
        if level == depth:
            return conv(iv, convs)  # the middle convolutions
        iv = conv(iv, convs)  # up convolutions, on [upsampled deeper, skip]
        deeper = unet_back(up_back(iv, pool), level + 1)
        skip = union(iv, pool_back(deeper, pool))  # both at this level's down output
        return conv(skip, convs)  # down convolutions

    pools = []
    jump = 1
    for _ in range(steps):
        pools.append(2 if jump < grid else 1)
        jump *= pools[-1]
    reach = 0
    for x in range(pool**depth):  # every output position modulo the U-Net's own grid
        iv = (x, x)
        if after:
            iv = conv(iv, 1)
        iv = unet_back(iv, 0)
        for p in reversed(pools):
            iv = conv(pool_back(iv, p), convs)
        reach = max(reach, grid * x - iv[0], iv[1] - (grid * x + grid - 1))
    return reach


def _pretrained_spec(name: str) -> dict[str, Any]:
    """Find a pretrained name in StarDist's registry (imports StarDist: only when used)."""
    registry = _pretrained_registry()
    for cls_name, names in registry.items():
        if name in names:
            n_dim = 3 if cls_name.endswith("3D") else 2
            # Pretrained configs are not available before download; the known ones take one
            # channel, except the H&E model (RGB).
            channels = 3 if names[name] == "2D_versatile_he" else 1
            spec = {"class": cls_name, "n_dim": n_dim, "folder": None, "key": names[name],
                    "n_channel_in": channels, "grid": None, "anisotropy": None,
                    "net_grid": None, "receptive_field": None}
            cached = _cached_pretrained_config(cls_name, names[name])
            if cached is not None:
                spec.update(grid=tuple(cached.get("grid") or (1,) * n_dim),
                            anisotropy=(tuple(cached["anisotropy"]) if cached.get("anisotropy")
                                        else None),
                            net_grid=network_grid(cached, n_dim),
                            receptive_field=receptive_field(cached, n_dim))
            return spec
    known = sorted(n for names in registry.values() for n in names)
    raise InputError(f"{name!r} is neither a pretrained StarDist model ({', '.join(known)}) nor "
                     "a model folder; for your own model pass its folder, or its name and "
                     "basedir=")


def _cached_pretrained_config(cls_name: str, key: str) -> dict[str, Any] | None:
    """The config.json of a pretrained model already in Keras' download cache, else None.

    csbdeep downloads pretrained models to ``$KERAS_HOME/models/<class>/<key>/`` (``~/.keras``
    by default); nothing is downloaded here.
    """
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    folder = home / "models" / cls_name / key
    for path in sorted(folder.rglob("config.json")) if folder.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
    return None


@functools.lru_cache(maxsize=1)
def _pretrained_registry() -> dict[str, dict[str, str]]:
    """``{"StarDist2D": {name or alias: key}, "StarDist3D": {...}}``."""
    models = importlib.import_module("stardist.models")
    from csbdeep.models.pretrained import get_registered_models

    registry: dict[str, dict[str, str]] = {}
    for cls_name in ("StarDist2D", "StarDist3D"):
        keys, aliases = get_registered_models(getattr(models, cls_name), return_aliases=True)
        names = {k: k for k in keys}
        names.update({alias: k for k in keys for alias in aliases.get(k, ())})
        registry[cls_name] = names
    return registry


def _tensorflow_memory_growth() -> None:
    """Let TensorFlow take GPU memory as needed instead of all of it (tiles are sized for it)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):  # already initialised: leave it
            tf.config.experimental.set_memory_growth(gpu, True)


# -- argument checks --------------------------------------------------------------------------
def _threshold(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InputError(f"{name}={value!r} must be a number in [0, 1] or None")
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name}={value!r} must be in [0, 1]")
    return float(value)


def _check_n_tiles(n_tiles: Any, n_dim: int) -> tuple[int, ...] | None:
    if n_tiles is None:
        return None
    try:
        values = tuple(int(n) for n in n_tiles)
    except (TypeError, ValueError):
        raise InputError(f"n_tiles={n_tiles!r} must be {n_dim} ints") from None
    if len(values) != n_dim or min(values) < 1:
        raise InputError(f"n_tiles={n_tiles!r} must be {n_dim} ints >= 1 (one per spatial axis "
                         "of the model)")
    return values


def _check_channel(channel: Any, n_channel_in: int) -> int | None:
    if channel is None:
        return None
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise InputError(f"channel={channel!r} must be a non-negative int")
    if n_channel_in != 1:
        raise InputError(f"channel= selects the channel for a single-channel model; this model "
                         f"takes {n_channel_in} channels")
    return int(channel)


def _check_predict_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(_RESERVED & kwargs.keys())
    if reserved:
        raise InputError(f"{', '.join(reserved)} cannot be passed through to predict_instances: "
                         "the plugin sets them (use its own arguments)")
    base = importlib.import_module("stardist.models.base")
    allowed = set(inspect.signature(base.StarDistBase._predict_instances_generator).parameters)
    allowed -= {"self"} | _RESERVED
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InputError(f"unknown StarDist argument(s): {', '.join(unknown)}; predict_instances "
                         f"takes {', '.join(sorted(allowed))}")
    return dict(kwargs)
