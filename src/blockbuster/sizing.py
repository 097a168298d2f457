"""Choosing tile shapes: ``tile_shape="auto"``, tile-shape callables and their validation.

A tile is sized so that one padded tile (core plus the overlap halo on every side) fits in the
memory that is free right now. The predicted peak of one tile is linear in its voxel count::

    peak = padded_voxels * per_voxel_bytes + fixed_bytes

where ``per_voxel_bytes`` is the segmenter's working memory (its :class:`MemoryModel`), plus
blockbuster's own working memory (:data:`ENGINE_BYTES_PER_VOXEL`), plus the input tile itself,
and ``fixed_bytes`` is memory that does not depend on the tile (model weights).

Tiles are cubic in voxels: every sized axis gets the same edge, clipped to the image extent, and
when an axis is clipped the others grow into the freed budget. Nothing heavy is imported here:
torch and NVML are imported only inside the GPU probes, and only when ``use_gpu=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from .errors import InputError, NoGPUError, TileSizeError
from .segmenter import DEFAULT_MEMORY_MODEL, MemoryModel, fn_name

__all__ = [
    "ENGINE_BYTES_PER_VOXEL",
    "MemoryProbe",
    "TileShapePlan",
    "auto_tile_shape",
    "available_memory",
    "format_bytes",
    "padded_shape",
    "plan_tile_shape",
    "predict_peak_bytes",
    "validate_tile_shape",
]

#: blockbuster's own working memory per padded spatial voxel, on top of the input tile: the
#: function's output (up to int64), the local relabelling (uint32) and temporaries.
ENGINE_BYTES_PER_VOXEL: int = 24

#: Fraction of the free memory a tile may use when the budget comes from a probe. RAM is shared
#: with the OS, dask, the writer and the next tile's read, so only half; a GPU is usually
#: dedicated to the segmenter but fragments, so 80 %.
RAM_SAFETY = 0.5
GPU_SAFETY = 0.8

#: Smallest core edge worth running (per sized axis, or the extent if smaller): below this the
#: halo dominates and the number of border merges explodes.
MIN_CORE_EDGE = 8

#: Rounding to the storage chunk grid may cost at most this fraction of the tile volume.
CHUNK_ROUNDING_MAX_LOSS = 0.25

# cgroup v1 reports "no limit" as a page-aligned 2**63 - 1; anything this large is no limit.
_CGROUP_NO_LIMIT = 2**60
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_SELF_CGROUP = Path("/proc/self/cgroup")

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int | float) -> str:
    """A byte count in binary units with one decimal, for messages.

    Parameters
    ----------
    n : int or float
        Number of bytes.

    Returns
    -------
    str

    Examples
    --------
    >>> format_bytes(512)
    '512 B'
    >>> format_bytes(1536 * 1024**2)
    '1.5 GiB'
    >>> format_bytes(-2048)
    '-2.0 KiB'
    """
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    unit = 0
    # 1023.95 would print as "1024.0 KiB"; move up a unit before rounding gets there.
    while value >= 1023.95 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.1f} {_UNITS[unit]}"


# -- memory probes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryProbe:
    """Free memory on the device tiles will be processed on.

    Attributes
    ----------
    available_bytes : int
        Memory that can be used now.
    total_bytes : int
        Size of the memory pool (RAM, cgroup limit or GPU memory).
    device : str
        ``"cpu"`` for host RAM, ``"cuda:N"`` (torch) or ``"GPU N"`` (NVML) for a GPU.
    source : str
        What measured it: ``"psutil"``, ``"psutil+cgroup"``, ``"torch"`` or ``"nvml"``.
    """

    available_bytes: int
    total_bytes: int
    device: str
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"


class _ProbeUnavailable(Exception):
    """A probe could not measure; the message says why (it goes into the user's error)."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a half-imported module without __spec__
        return False


def _probe_ram() -> MemoryProbe:
    """Free host RAM: psutil's ``available``, lowered to the cgroup's headroom if tighter.

    Batch schedulers (SLURM, LSF, Kubernetes) confine jobs with a cgroup memory limit far below
    the node's RAM, which psutil does not see; exceeding it gets the job killed.
    """
    vm = psutil.virtual_memory()
    available, total, source = int(vm.available), int(vm.total), "psutil"
    cgroup = _cgroup_memory()
    if cgroup is not None:
        cg_available, cg_limit = cgroup
        if cg_available < available or cg_limit < total:
            available, total = min(available, cg_available), min(total, cg_limit)
            source = "psutil+cgroup"
    return MemoryProbe(available, total, "cpu", source)


def _cgroup_memory(
    root: Path = _CGROUP_ROOT, self_cgroup: Path = _PROC_SELF_CGROUP
) -> tuple[int, int] | None:
    """Headroom and limit of the tightest memory cgroup above this process, or None.

    Handles cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``) and walks up to the
    hierarchy root, because schedulers often set the limit on a parent (the job) of the cgroup
    the process runs in (the job step). Reclaimable page cache (``inactive_file``) counts as
    free, as it does in psutil's ``available``.
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, int] | None = None
    for hierarchy_root, relative, files in _cgroup_dirs(root, lines):
        directory = hierarchy_root / relative.lstrip("/")
        if not directory.is_dir():  # inside a cgroup namespace the path is relative to "/"
            directory = hierarchy_root
        while True:
            level = _cgroup_level(directory, *files)
            if level is not None and (best is None or level[0] < best[0]):
                best = level
            if directory == hierarchy_root or hierarchy_root not in directory.parents:
                break
            directory = directory.parent
    return best


def _cgroup_dirs(root: Path, lines: list[str]) -> list[tuple[Path, str, tuple[str, str, str]]]:
    """(hierarchy root, path of this process in it, (limit, usage, stat-key)) per hierarchy."""
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, relative = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            found.append((root, relative, ("memory.max", "memory.current", "inactive_file")))
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            found.append((root / "memory", relative, files))
    return found


def _cgroup_level(
    directory: Path, limit_file: str, usage_file: str, inactive_key: str
) -> tuple[int, int] | None:
    """(headroom, limit) of one cgroup directory, or None when it sets no limit."""
    try:
        limit_text = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or int(limit_text) >= _CGROUP_NO_LIMIT:
        return None
    limit = int(limit_text)
    inactive = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
    return max(0, limit - usage + inactive), limit


def _visible_gpu_index() -> int:
    """NVML index of the first GPU this process may use (NVML ignores CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return 0
    first = visible.split(",")[0].strip()
    if first == "" or first.startswith("-"):
        raise _ProbeUnavailable(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    # A UUID or MIG name cannot be mapped to an index cheaply; the first GPU is the best guess.
    return int(first) if first.isdigit() else 0


def _probe_torch() -> MemoryProbe:
    """Free memory on torch's current CUDA device; raises _ProbeUnavailable saying why not."""
    if not _installed("torch"):
        raise _ProbeUnavailable("torch not installed")
    try:
        import torch
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        raise _ProbeUnavailable(f"torch installed but failed to import ({exc})") from exc
    if not torch.cuda.is_available():
        raise _ProbeUnavailable(
            "torch installed but torch.cuda.is_available() is False "
            "(CPU-only build, or no GPU/driver on this node?)"
        )
    try:
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        # Memory torch's caching allocator holds but does not use is free for our purposes,
        # though the driver counts it as taken.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except Exception as exc:  # CUDA errors surface as RuntimeError or torch-specific types
        raise _ProbeUnavailable(f"torch.cuda.mem_get_info() failed ({exc})") from exc
    return MemoryProbe(int(free) + max(0, int(cached)), int(total), f"cuda:{device}", "torch")


def _probe_nvml() -> MemoryProbe:
    """Free memory on the first visible GPU through NVML; raises _ProbeUnavailable if not."""
    if not _installed("pynvml"):
        raise _ProbeUnavailable("nvidia-ml-py not installed")
    import pynvml

    index = _visible_gpu_index()
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and friends; the driver library may be missing
        raise _ProbeUnavailable(f"NVML failed to start ({exc}); no NVIDIA driver?") from exc
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
    except Exception as exc:
        raise _ProbeUnavailable(f"NVML could not read GPU {index} ({exc})") from exc
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return MemoryProbe(int(info.free), int(info.total), f"GPU {index}", "nvml")


def available_memory(use_gpu: bool = False) -> MemoryProbe:
    """Measure the memory free now, in host RAM or on the GPU.

    RAM comes from ``psutil.virtual_memory().available``, lowered to the headroom under the
    process's cgroup memory limit when that is tighter (batch jobs). A GPU is measured with
    ``torch.cuda.mem_get_info`` when torch is installed with CUDA, else through NVML
    (``nvidia-ml-py``) on the first visible GPU. There is no silent fall-back from GPU to RAM.

    Parameters
    ----------
    use_gpu : bool
        Measure GPU memory instead of RAM.

    Returns
    -------
    MemoryProbe

    Raises
    ------
    NoGPUError
        ``use_gpu=True`` and neither probe found a usable GPU; the message lists why each failed.

    Examples
    --------
    >>> probe = available_memory()
    >>> probe.device, 0 < probe.available_bytes <= probe.total_bytes
    ('cpu', True)
    """
    if not use_gpu:
        return _probe_ram()
    failures = []
    for name, probe in (("torch", _probe_torch), ("NVML", _probe_nvml)):
        try:
            return probe()
        except _ProbeUnavailable as exc:
            failures.append(f"{name}: {exc}")
    raise NoGPUError(
        "$use_gpu but no usable GPU was found. Tried "
        + "; ".join(failures)
        + ". Install a CUDA build of torch (or nvidia-ml-py), run on a GPU node, "
        "or drop $use_gpu to size tiles from RAM."
    )


# -- geometry and the memory model -----------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """A tuple of positive ints, or InputError naming ``name``."""
    try:
        values = tuple(shape)
    except TypeError:
        raise InputError(f"{name}={shape!r} must be a tuple of positive ints") from None
    if not values or not all(_is_int(v) and v > 0 for v in values):
        raise InputError(f"{name}={shape!r} must be a non-empty tuple of positive ints")
    return tuple(int(v) for v in values)


def _per_axis(value: int | Sequence[int] | None, ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int (or None = 0) to ``ndim`` non-negative ints, or check a tuple's length."""
    if value is None:
        value = 0
    values: tuple[Any, ...] = (value,) * ndim if _is_int(value) else tuple(value)  # type: ignore[arg-type]
    if len(values) != ndim:
        raise InputError(f"{name}={value!r} has {len(values)} entries, expected {ndim}")
    if not all(_is_int(v) and v >= 0 for v in values):
        raise InputError(f"{name}={value!r} must be non-negative ints")
    return tuple(int(v) for v in values)


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError as exc:
        raise InputError(f"dtype={dtype!r} is not a NumPy dtype ({exc})") from exc


def padded_shape(
    core: tuple[int, ...], depth: tuple[int, ...], extent: tuple[int, ...]
) -> tuple[int, ...]:
    """Shape of a tile with its halo, as the engine reads it for an interior tile.

    The halo on each axis is clipped to ``core - 1`` (a tile one voxel deep gets no halo on that
    axis), and the padded size to the image extent.

    Parameters
    ----------
    core : tuple of int
        Tile shape without the halo.
    depth : tuple of int
        Requested halo per axis (the overlap).
    extent : tuple of int
        Image shape.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> padded_shape((1, 256, 256), (20, 20, 20), (50, 1000, 1000))
    (1, 296, 296)
    >>> padded_shape((4, 990, 256), (20, 20, 20), (50, 1000, 1000))
    (10, 1000, 296)
    """
    return tuple(
        min(c + 2 * min(d, c - 1), e) for c, d, e in zip(core, depth, extent, strict=True)
    )


def _per_voxel_bytes(
    itemsize: int, channels: int, memory_model: MemoryModel | None, bytes_per_voxel: float | None
) -> float:
    """Total bytes per padded spatial voxel: segmenter + engine + the input tile itself."""
    if bytes_per_voxel is not None:
        return float(bytes_per_voxel)
    model = memory_model or DEFAULT_MEMORY_MODEL
    return model.per_voxel_bytes(itemsize, channels) + ENGINE_BYTES_PER_VOXEL + itemsize * channels


def _fixed_bytes(memory_model: MemoryModel | None, fixed_bytes: int) -> int:
    return int(fixed_bytes) + (memory_model or DEFAULT_MEMORY_MODEL).fixed_bytes


def predict_peak_bytes(
    tile_shape: tuple[int, ...],
    dtype: Any,
    *,
    overlap: int | tuple[int, ...] = 0,
    channels: int = 1,
    memory_model: MemoryModel | None = None,
    bytes_per_voxel: float | None = None,
    fixed_bytes: int = 0,
    image_shape: tuple[int, ...] | None = None,
) -> int:
    """Predicted peak memory of processing one tile, halo included.

    ``peak = padded_voxels * per_voxel + fixed``, where ``per_voxel`` is ``bytes_per_voxel``
    when given, else ``memory_model.per_voxel_bytes(itemsize, channels)`` plus
    :data:`ENGINE_BYTES_PER_VOXEL` plus the input tile's own ``itemsize * channels``; and
    ``fixed`` is ``fixed_bytes + memory_model.fixed_bytes`` (also when ``bytes_per_voxel`` is
    given: that replaces only the per-voxel term).

    Parameters
    ----------
    tile_shape : tuple of int
        Spatial core shape of the tile (no channel axis).
    dtype : numpy dtype-like
        Input dtype.
    overlap : int or tuple of int
        Halo per spatial axis; clipped as in :func:`padded_shape`.
    channels : int
        Number of channels in each tile.
    memory_model : MemoryModel, optional
        The segmenter's memory model; default ``segmenter.DEFAULT_MEMORY_MODEL``.
    bytes_per_voxel : float, optional
        Total bytes per padded spatial voxel, everything included; overrides the model's.
    fixed_bytes : int
        Extra memory that does not depend on the tile.
    image_shape : tuple of int, optional
        Image spatial shape, to clip the padded tile to; unclipped when None.

    Returns
    -------
    int
        Bytes, rounded up.

    Examples
    --------
    Default model, uint16: (4 x 2 + 16) segmenter + 24 engine + 2 input = 50 bytes per voxel.

    >>> predict_peak_bytes((100, 100), "uint16", overlap=10) == 120 * 120 * 50
    True
    """
    core = _check_shape(tile_shape, "tile_shape")
    depth = _per_axis(overlap, len(core), "overlap")
    if image_shape is None:
        extent = (2**62,) * len(core)  # unclipped
    else:
        extent = _check_shape(image_shape, "image_shape")
    if len(extent) != len(core):
        raise InputError(f"image_shape={image_shape!r} and tile_shape={tile_shape!r} differ")
    per_voxel = _per_voxel_bytes(_itemsize(dtype), channels, memory_model, bytes_per_voxel)
    voxels = math.prod(padded_shape(core, depth, extent))
    return math.ceil(voxels * per_voxel) + _fixed_bytes(memory_model, fixed_bytes)


# -- planning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileShapePlan:
    """A chosen tile shape and why it was chosen.

    Attributes
    ----------
    shape : tuple of int
        Spatial tile (core) shape.
    padded_shape : tuple of int
        Shape of an interior tile with its halo, clipped to the image.
    budget_bytes : int
        Memory one tile may use, fixed bytes included.
    predicted_peak_bytes : int
        Predicted peak of one padded tile (``<= budget_bytes``).
    available_bytes : int
        Free memory measured by the probe, or the ``memory=`` given.
    device : str
        ``"cpu"``, a GPU name, or ``"cpu"``/``"gpu"`` when ``memory=`` was given.
    reason : str
        One sentence explaining the choice (budget, cost per voxel, rounding, clipping).
    """

    shape: tuple[int, ...]
    padded_shape: tuple[int, ...]
    budget_bytes: int
    predicted_peak_bytes: int
    available_bytes: int
    device: str
    reason: str


@dataclass(frozen=True)
class _Budget:
    total: int
    available: int
    device: str
    description: str  # e.g. "50% of 11.2 GiB free RAM"


def _resolve_budget(memory: float | None, use_gpu: bool, safety: float | None) -> _Budget:
    """The memory one tile may use: ``memory`` as given, or a safe share of what a probe finds."""
    if safety is not None and not 0 < safety <= 1:
        raise InputError(f"safety={safety!r} must be in (0, 1]")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (int, float, np.number)):
            raise InputError(f"memory={memory!r} must be a number of bytes")
        if not memory > 0 or not math.isfinite(memory):
            raise InputError(f"memory={memory!r} must be a positive number of bytes")
        share = 1.0 if safety is None else safety
        described = f"memory={format_bytes(memory)} given"
        if share != 1.0:
            described = f"{share:.0%} of {described}"
        return _Budget(int(memory * share), int(memory), "gpu" if use_gpu else "cpu", described)
    probe = available_memory(use_gpu)
    share = safety if safety is not None else (GPU_SAFETY if use_gpu else RAM_SAFETY)
    pool = "free RAM" if probe.device == "cpu" else f"free on {probe.device} ({probe.source})"
    if probe.source == "psutil+cgroup":
        pool = "free RAM under this job's cgroup limit"
    described = f"{share:.0%} of {format_bytes(probe.available_bytes)} {pool}"
    available = probe.available_bytes
    return _Budget(int(available * share), available, probe.device, described)


def _sized_axes(ndim: int, spatial_ndim: int | None) -> tuple[bool, ...]:
    """Which axes get sized; a 2-D method on a 3-D image keeps the leading axes at 1."""
    if spatial_ndim is not None and (not _is_int(spatial_ndim) or spatial_ndim < 1):
        raise InputError(f"spatial_ndim={spatial_ndim!r} must be a positive int or None")
    if spatial_ndim is None or spatial_ndim >= ndim:
        return (True,) * ndim
    return (False,) * (ndim - spatial_ndim) + (True,) * spatial_ndim


def _cubic_tile(edge: int, shape: tuple[int, ...], sized: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(min(edge, e) if s else 1 for e, s in zip(shape, sized, strict=True))


def _largest_edge(fits: Callable[[int], bool], low: int, high: int) -> int:
    """Largest edge in [low, high] that fits, given that ``low`` fits (fits is monotone)."""
    if fits(high):
        return high
    while high - low > 1:  # invariant: fits(low) and not fits(high)
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _round_to_chunks(
    tile: tuple[int, ...],
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    sized: tuple[bool, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Round tile edges down to chunk multiples while the tile keeps >= 75% of its volume.

    Tiles whose borders fall on the storage chunk grid read every chunk once; unaligned tiles
    read most chunks twice (once for each tile the chunk straddles) and decompress them twice.
    Rounding down costs tile volume (more tiles, more border merges), so edges are rounded
    cheapest first and only while the total loss stays within CHUNK_ROUNDING_MAX_LOSS. An edge
    equal to the image extent stays (it is aligned by definition), and an edge shorter than one
    chunk cannot be rounded without vanishing, so it stays too.

    Returns the rounded tile and the axes that were rounded.
    """
    candidates = []
    for axis, (t, e, c, s) in enumerate(zip(tile, shape, chunks, sized, strict=True)):
        rounded = (t // c) * c
        if s and t < e and rounded >= c and rounded != t:
            candidates.append((rounded / t, axis, rounded))
    # Cheapest first: the edge that keeps the largest share of itself.
    candidates.sort(key=lambda item: (-item[0], item[1]))
    result, kept, rounded_axes = list(tile), 1.0, []
    for share, axis, rounded in candidates:
        if kept * share < 1 - CHUNK_ROUNDING_MAX_LOSS:
            break  # later candidates keep even less, so none of them fits either
        kept *= share
        result[axis] = rounded
        rounded_axes.append(axis)
    return tuple(result), tuple(sorted(rounded_axes))


def plan_tile_shape(
    shape: tuple[int, ...],
    dtype: Any,
    *,
    overlap: int | tuple[int, ...] = 0,
    use_gpu: bool = False,
    bytes_per_voxel: float | None = None,
    fixed_bytes: int = 0,
    memory: float | None = None,
    memory_model: MemoryModel | None = None,
    channels: int = 1,
    chunks: tuple[int, ...] | None = None,
    spatial_ndim: int | None = None,
    safety: float | None = None,
) -> TileShapePlan:
    """Choose the largest cubic tile whose padded version fits the memory budget.

    Rules:

    * budget: ``memory`` bytes when given (it replaces the probe), else the free RAM (or GPU
      memory with ``use_gpu``) times ``safety``, which defaults to 0.5 for RAM and 0.8 for a
      GPU (and to 1 for a given ``memory``).
    * Every sized axis gets the same edge ``s``, clipped to the image extent; ``s`` is the
      largest for which :func:`predict_peak_bytes` of the padded tile is within the budget, so
      axes that are clipped leave room for the others to grow.
    * ``spatial_ndim=2`` on a 3-D (or higher) image: a 2-D method, every leading axis gets 1.
    * ``chunks``: edges are rounded down to multiples of the storage chunks where that keeps at
      least 75% of the tile volume (see ``_round_to_chunks``), so that reads are aligned.

    Parameters
    ----------
    shape : tuple of int
        Spatial image shape (no channel axis).
    dtype : numpy dtype-like
        Input dtype.
    overlap : int or tuple of int
        Halo per spatial axis.
    use_gpu : bool
        Budget from free GPU memory instead of RAM.
    bytes_per_voxel : float, optional
        Total bytes per padded voxel; overrides the memory model's per-voxel cost.
    fixed_bytes : int
        Extra memory independent of the tile, added to the model's fixed bytes.
    memory : int or float, optional
        Budget in bytes; overrides the probe (tests, shared machines).
    memory_model : MemoryModel, optional
        The segmenter's memory model; default ``segmenter.DEFAULT_MEMORY_MODEL``.
    channels : int
        Channels per tile.
    chunks : tuple of int, optional
        Spatial storage chunk shape of the input.
    spatial_ndim : int, optional
        Dimensionality the method works in; fewer than the image's means one-voxel-deep tiles.
    safety : float, optional
        Fraction of the probed (or given) memory to use.

    Returns
    -------
    TileShapePlan

    Raises
    ------
    TileSizeError
        Even the smallest sensible tile (core edge 8, or the extent if smaller, plus halo)
        does not fit; the message says how much it needs and how much is available.
    NoGPUError
        ``use_gpu=True``, no ``memory`` given, and no usable GPU.
    InputError
        Malformed arguments.

    Examples
    --------
    >>> plan = plan_tile_shape((2000, 2000), "uint8", bytes_per_voxel=100, memory=10**8)
    >>> plan.shape, plan.predicted_peak_bytes <= plan.budget_bytes
    ((1000, 1000), True)
    >>> plan_tile_shape((50, 4000, 4000), "uint16", spatial_ndim=2, memory=10**9).shape
    (1, 4000, 4000)
    """
    shape = _check_shape(shape, "shape")
    ndim = len(shape)
    depth = _per_axis(overlap, ndim, "overlap")
    sized = _sized_axes(ndim, spatial_ndim)
    if chunks is not None:
        chunks = _check_shape(chunks, "chunks")
        if len(chunks) != ndim:
            raise InputError(f"chunks={chunks!r} has {len(chunks)} axes, the image has {ndim}")
    if not _is_int(channels) or channels < 1:
        raise InputError(f"channels={channels!r} must be a positive int")
    itemsize = _itemsize(dtype)
    budget = _resolve_budget(memory, use_gpu, safety)

    def peak(tile: tuple[int, ...]) -> int:
        return predict_peak_bytes(
            tile,
            dtype,
            overlap=depth,
            channels=channels,
            memory_model=memory_model,
            bytes_per_voxel=bytes_per_voxel,
            fixed_bytes=fixed_bytes,
            image_shape=shape,
        )

    largest = max(e for e, s in zip(shape, sized, strict=True) if s)
    smallest = _cubic_tile(min(MIN_CORE_EDGE, largest), shape, sized)
    needed = peak(smallest)
    if needed > budget.total:
        raise _too_small_error(smallest, needed, depth, shape, budget, memory_model, fixed_bytes)
    edge = _largest_edge(
        lambda s: peak(_cubic_tile(s, shape, sized)) <= budget.total,
        min(MIN_CORE_EDGE, largest),
        largest,
    )
    unrounded = _cubic_tile(edge, shape, sized)
    tile: tuple[int, ...] = unrounded
    rounded_axes: tuple[int, ...] = ()
    if chunks is not None:
        tile, rounded_axes = _round_to_chunks(unrounded, shape, chunks, sized)

    padded = padded_shape(tile, depth, shape)
    per_voxel = _per_voxel_bytes(itemsize, channels, memory_model, bytes_per_voxel)
    predicted = peak(tile)
    reason = _explain(
        tile=tile,
        padded=padded,
        depth=depth,
        shape=shape,
        sized=sized,
        edge=edge,
        chunks=chunks,
        rounded_axes=rounded_axes,
        unrounded=unrounded,
        per_voxel=per_voxel,
        fixed=_fixed_bytes(memory_model, fixed_bytes),
        predicted=predicted,
        budget=budget,
    )
    return TileShapePlan(
        shape=tile,
        padded_shape=padded,
        budget_bytes=budget.total,
        predicted_peak_bytes=predicted,
        available_bytes=budget.available,
        device=budget.device,
        reason=reason,
    )


def _too_small_error(
    tile: tuple[int, ...],
    needed: int,
    depth: tuple[int, ...],
    shape: tuple[int, ...],
    budget: _Budget,
    memory_model: MemoryModel | None,
    fixed_bytes: int,
) -> TileSizeError:
    fixed = _fixed_bytes(memory_model, fixed_bytes)
    of_which = f" (of which {format_bytes(fixed)} fixed, e.g. model weights)" if fixed else ""
    return TileSizeError(
        f"${{tile_shape}}'auto': even the smallest sensible tile {tile} "
        f"(padded to {padded_shape(tile, depth, shape)} by the halo) "
        f"needs {format_bytes(needed)}{of_which}, {format_bytes(budget.total)} available "
        f"({budget.description}). Free some memory, pass a larger $memory, reduce the "
        "overlap, or pass a fixed $tile_shape."
    )


def _explain(
    *,
    tile: tuple[int, ...],
    padded: tuple[int, ...],
    depth: tuple[int, ...],
    shape: tuple[int, ...],
    sized: tuple[bool, ...],
    edge: int,
    chunks: tuple[int, ...] | None,
    rounded_axes: tuple[int, ...],
    unrounded: tuple[int, ...],
    per_voxel: float,
    fixed: int,
    predicted: int,
    budget: _Budget,
) -> str:
    """One sentence: what was chosen, what it costs, against which budget, and what adjusted it."""
    halo = f"padded {padded} by the halo" if padded != tile else "no halo"
    parts = [
        f"tile {tile} ({halo}) is predicted to peak at "
        f"{format_bytes(predicted)} ({per_voxel:.1f} B/voxel + {format_bytes(fixed)} fixed) "
        f"within a {format_bytes(budget.total)} budget ({budget.description})"
    ]
    if tuple(tile) == tuple(1 if not s else e for e, s in zip(shape, sized, strict=True)):
        parts.append("the whole image fits in one tile" if all(sized) else "whole planes fit")
    else:
        parts.append(f"largest cubic edge that fits: {edge}")
    if not all(sized):
        leading = tuple(a for a, s in enumerate(sized) if not s)
        parts.append(f"axes {leading} set to 1 for a 2-D method")
    clipped = tuple(
        a for a, (t, e, s) in enumerate(zip(unrounded, shape, sized, strict=True))
        if s and t == e < edge
    )
    if clipped:
        parts.append(f"clipped to the image extent on axes {clipped}, other axes grown")
    if rounded_axes:
        parts.append(
            f"axes {rounded_axes} rounded down from {unrounded} to the storage chunks {chunks} "
            "for aligned reads"
        )
    if chunks is not None:
        off_grid = tuple(
            a
            for a, (t, e, c, s) in enumerate(zip(tile, shape, chunks, sized, strict=True))
            if s and t < e and t % c
        )
        if off_grid:
            parts.append(
                f"axes {off_grid} left off the chunk grid {chunks} (rounding would cost more "
                f"than {CHUNK_ROUNDING_MAX_LOSS:.0%} of the tile volume, or the edge is under "
                "one chunk)"
            )
    short = tuple(a for a, (t, d) in enumerate(zip(tile, depth, strict=True))
                  if sized[a] and d > t - 1)
    if short:
        parts.append(f"halo clipped to the tile size minus one on axes {short}")
    return "; ".join(parts) + "."


def auto_tile_shape(
    shape: tuple[int, ...],
    dtype: Any,
    *,
    overlap: int | tuple[int, ...] = 0,
    use_gpu: bool = False,
    bytes_per_voxel: float | None = None,
    fixed_bytes: int = 0,
    memory: float | None = None,
    memory_model: MemoryModel | None = None,
    channels: int = 1,
    chunks: tuple[int, ...] | None = None,
    spatial_ndim: int | None = None,
) -> tuple[int, ...]:
    """The tile shape :func:`plan_tile_shape` chooses (same arguments, without ``safety``).

    Examples
    --------
    >>> auto_tile_shape((3000, 3000), "uint16", memory=2 * 1024**3)
    (3000, 3000)
    >>> auto_tile_shape((3000, 3000), "uint16", memory=60_500_000)
    (1100, 1100)
    >>> auto_tile_shape((3000, 3000), "uint16", memory=60_500_000, chunks=(256, 256))
    (1024, 1024)
    """
    return plan_tile_shape(
        shape,
        dtype,
        overlap=overlap,
        use_gpu=use_gpu,
        bytes_per_voxel=bytes_per_voxel,
        fixed_bytes=fixed_bytes,
        memory=memory,
        memory_model=memory_model,
        channels=channels,
        chunks=chunks,
        spatial_ndim=spatial_ndim,
    ).shape


# -- validation ------------------------------------------------------------------------------

_CALLABLE_SOURCE = "tile_shape callable "


def validate_tile_shape(
    tile_shape: Any,
    spatial_shape: tuple[int, ...],
    *,
    source: str | Callable[..., Any] = "tile_shape",
) -> tuple[int, ...]:
    """Check a tile shape (fixed, or a callable's result) against the image.

    Each entry is a positive int, or None or -1 for the full extent; entries larger than the
    extent are clipped to it.

    Parameters
    ----------
    tile_shape : tuple or list of int
        The shape to check.
    spatial_shape : tuple of int
        Spatial image shape.
    source : str or callable
        Where the shape came from, for the error message. A string (e.g. ``"tile_shape"``)
        means a fixed shape given by the user, and errors are :class:`InputError`. A callable
        means the shape is that callable's result, and errors are :class:`TileSizeError` naming
        it (both are ``ValueError``). A string starting with ``"tile_shape callable "`` (the
        callable's description) is treated as naming a callable too.

    Returns
    -------
    tuple of int

    Raises
    ------
    InputError
        Bad fixed shape (``source`` is a string).
    TileSizeError
        Bad result of a tile-shape callable (``source`` is the callable).

    Examples
    --------
    >>> validate_tile_shape((1, None, 5000), (30, 2048, 2048))
    (1, 2048, 2048)
    >>> validate_tile_shape((0, 512), (2048, 2048))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    blockbuster.errors.InputError: tile_shape=(0, 512) is invalid: size 0 on axis 0 must be ...
    """
    spatial = _check_shape(spatial_shape, "spatial_shape")

    if callable(source):
        source = f"{_CALLABLE_SOURCE}{fn_name(source)}"

    def invalid(problem: str) -> Exception:
        if source.startswith(_CALLABLE_SOURCE):
            return TileSizeError(f"{source} returned {tile_shape!r}: {problem}")
        where = "${tile_shape}" if source == "tile_shape" else f"{source}="
        return InputError(f"{where}{tile_shape!r} is invalid: {problem}")

    values = tile_shape.tolist() if isinstance(tile_shape, np.ndarray) else tile_shape
    if not isinstance(values, (tuple, list)):
        raise invalid(f"expected a tuple of {len(spatial)} ints, one per spatial axis")
    if len(values) != len(spatial):
        raise invalid(
            f"expected {len(spatial)} sizes, one per spatial axis of the image {spatial}, "
            f"got {len(values)}"
        )
    result = []
    for axis, (size, extent) in enumerate(zip(values, spatial, strict=True)):
        if size is None or (_is_int(size) and size == -1):
            result.append(extent)
        elif not _is_int(size):
            raise invalid(f"size {size!r} on axis {axis} is not an int")
        elif size <= 0:
            raise invalid(
                f"size {size} on axis {axis} must be positive (or None/-1 for the full extent)"
            )
        else:
            result.append(min(int(size), extent))
    return tuple(result)
