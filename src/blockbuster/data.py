"""Synthetic microscopy images with ground truth, generated on the fly (no downloads).

Four generators, all deterministic per ``seed``:

* :func:`synthetic_nuclei` -- a fluorescence-like image of dense, partly touching, slightly
  irregular ellipsoidal nuclei (2-D or 3-D) on a smooth background with noise, and its true
  labels, in memory (for tests).
* :func:`write_synthetic_nuclei` -- the same image written chunk by chunk to a zarr v3 array or
  an OME-Zarr image (for demos and benchmarks); peak memory is a few chunks, never the image.
  :func:`lazy_synthetic_nuclei` gives it as a lazy dask array.
* :func:`synthetic_mask` -- a binary mask of irregular blobs for connected-components tests and
  benchmarks, as NumPy or as a lazy dask array.
* :func:`synthetic_cells` -- a two-channel image of cells (nuclei + membranes or cytoplasm) with
  true nucleus and cell labels, in memory (for the ``cells`` segmenter's tests).

Every voxel of the nuclei images is a pure function of its global position and the parameters:
nuclei live on a fixed lattice of cells whose random parameters are hashed from
``(seed, cell index)``, noise is hashed from ``(seed, voxel position)`` and the background is a
smooth analytic function. A chunk therefore renders exactly the voxels the whole image would
have there, whatever the chunking, and the same seed gives the same image for any ``chunks``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr

from .errors import InputError, OutputExistsError

__all__ = [
    "lazy_synthetic_nuclei",
    "synthetic_cells",
    "synthetic_mask",
    "synthetic_nuclei",
    "truth_path",
    "write_synthetic_nuclei",
]

# Nucleus model constants (fractions of the diameter / of the mean nucleus brightness).
_SIZE_RANGE = (0.85, 1.10)  # overall size factor per nucleus
_LOG_ASPECT = 0.2  # per-axis log aspect ratio spread (volume preserving)
_MAX_E1 = 0.10  # egg-shape (first harmonic) irregularity
_MAX_E3 = 0.06  # three-lobed (third harmonic) irregularity
_EDGE_DIM = 0.35  # nuclei are 35 % dimmer at the rim than at the centre
_BRIGHTNESS_SIGMA = 0.3  # log-normal spread of brightness between nuclei
_BACKGROUND = 0.12  # background level relative to the mean nucleus brightness
_NOISE_FLOOR = 0.01  # read-noise variance floor, in the same units

#: Integer output scale: ``value = offset + gain * intensity`` (intensity 1 = a mean nucleus).
_INT_SCALE = {1: (4.0, 90.0)}  # uint8 / int8
_DEFAULT_INT_SCALE = (100.0, 4000.0)  # 16-bit cameras and wider

# Work sizes: NumPy ops on fresh arrays larger than a few MB are dominated by page faults, so
# everything is processed in blocks that stay in cache.
_BATCH_ENTRIES = 1 << 19  # stamp voxels evaluated per vectorised batch
_SLAB_VOXELS = 1 << 18  # voxels decoded / blurred / noised per slab
_SUBREGION_VOXELS = 1 << 22  # largest region rendered in one go (bounds the key buffer)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_UINT32 = np.dtype(np.uint32)
_AXIS_SALTS = (np.uint64(0xD1B54A32D192ED03), np.uint64(0xABC98388FB8FAC03),
               np.uint64(0x8CB92BA72F3D8DD7))


# -- counter-based hashing -------------------------------------------------------------------
def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (new array; wraps modulo 2**64 by design)."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _seed_key(seed: int, salt: int) -> np.ndarray:
    return _mix64(np.array([seed], np.uint64) * _GOLDEN + np.uint64(salt))


def _lattice_keys(seed: int, salt: int, cells: np.ndarray) -> np.ndarray:
    """One well-mixed uint64 per integer lattice point (rows of ``cells``, may be negative)."""
    keys = np.repeat(_seed_key(seed, salt), len(cells))
    for axis in range(cells.shape[1]):
        coord = np.ascontiguousarray(cells[:, axis], dtype=np.int64).view(np.uint64)
        keys = _mix64(keys ^ (coord * _AXIS_SALTS[axis]))
    return keys


def _uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` independent uniforms in [0, 1) per key, shape ``(len(keys), count)``."""
    streams = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    bits = _mix64(keys[:, None] + streams[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _mix32_inplace(x: np.ndarray) -> None:
    """Murmur3 32-bit finaliser, in place on a uint32 array."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)


def _axis_hash32(coords: np.ndarray, seed: int, axis: int) -> np.ndarray:
    salt = int(_seed_key(seed, 0x5EED + axis)[0] & np.uint64(0xFFFFFFFF))
    x = (coords.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
    x *= np.uint32(0x9E3779B1)
    x += np.uint32(salt)
    _mix32_inplace(x)
    return x


def _hash_normal(axis_hashes: Sequence[np.ndarray]) -> np.ndarray:
    """Approximately standard-normal noise from per-axis coordinate hashes (outer XOR).

    The four bytes of a 32-bit hash are summed (Irwin-Hall with n=4), which is close enough to
    a Gaussian for image noise and far cheaper than a transform of uniforms.
    """
    grids = np.ix_(*axis_hashes)
    x = grids[0]
    for g in grids[1:]:
        x = x ^ g
    x = np.array(x, dtype=np.uint32)  # materialise the full block
    _mix32_inplace(x)
    low = x & np.uint32(0x00FF00FF)
    x >>= np.uint32(8)
    x &= np.uint32(0x00FF00FF)
    x += low  # two 16-bit lanes, each the sum of two bytes
    low[...] = x
    low &= np.uint32(0xFFFF)
    x >>= np.uint32(16)
    x += low
    out = x.astype(np.float32)
    out -= np.float32(510.0)
    out *= np.float32(1.0 / 147.80)  # sqrt(4 * (256**2 - 1) / 12)
    return out


# -- the nucleus lattice ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Nuclei:
    """Parameters of a set of nuclei, one row per nucleus, sorted by global id."""

    ids: np.ndarray  # (n,) int64 global label ids (>= 1)
    center: np.ndarray  # (n, nd) float64
    quad: np.ndarray  # (n, nd, nd) quadratic form M: r**2 = d.T M d
    w1: np.ndarray  # (n, nd) e1 * A.T v1: first-harmonic term is (w1 . d) / r
    w3: np.ndarray  # (n, nd) A.T v3: third-harmonic direction term is (w3 . d) / r
    e3: np.ndarray  # (n,) third-harmonic amplitude
    brightness: np.ndarray  # (n,)
    half: np.ndarray  # (n,) int64 stamp half-width: the label lies within center +- half

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> _Nuclei:
        return _Nuclei(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class _NucleiField:
    """The chunk-independent definition of a synthetic nuclei image.

    Space is cut into cubic cells of ``spacing`` voxels; each cell holds at most one nucleus
    (with probability ``density``) near its centre. All of a nucleus's parameters are hashed
    from ``(seed, cell index)``, so any region can find and render the nuclei that reach it.
    """

    shape: tuple[int, ...]
    diameter: float
    density: float
    touching: bool
    seed: int
    spacing: int
    jitter: float
    max_half: int
    id_origin: tuple[int, ...]
    id_dims: tuple[int, ...]

    @classmethod
    def create(cls, shape: tuple[int, ...], diameter: float, density: float, touching: bool,
               seed: int) -> _NucleiField:
        ndim = len(shape)
        max_aspect = math.exp(2 * _LOG_ASPECT * (ndim - 1) / ndim)
        max_radius = 0.5 * diameter * _SIZE_RANGE[1] * max_aspect * (1 + _MAX_E1 + _MAX_E3)
        max_half = math.ceil(max_radius) + 1
        if touching:
            spacing = max(2, round(0.9 * diameter))
            jitter = 0.3 * spacing
        else:
            # Neighbours can never meet: two maximal nuclei plus a 2-voxel gap fit in a cell.
            jitter = 0.1 * diameter
            spacing = math.ceil(2 * max_radius + 2 * jitter + 2)
        reach = math.ceil((max_half + jitter + 2) / spacing) + 1
        id_origin = tuple(-reach for _ in shape)
        id_dims = tuple(math.ceil(s / spacing) + 2 * reach + 1 for s in shape)
        return cls(tuple(shape), float(diameter), float(density), bool(touching), int(seed),
                   spacing, float(jitter), max_half, id_origin, id_dims)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def max_id(self) -> int:
        return math.prod(self.id_dims)

    def cells_reaching(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """Indices ``(n, ndim)`` of every cell whose nucleus could touch ``[lo, hi)``."""
        reach = self.max_half + self.jitter + 1
        ranges = []
        for a in range(self.ndim):
            first = math.floor((lo[a] - reach) / self.spacing - 0.5)
            last = math.ceil((hi[a] + reach) / self.spacing - 0.5)
            first = max(first, self.id_origin[a])
            last = min(last, self.id_origin[a] + self.id_dims[a] - 1)
            ranges.append(np.arange(first, last + 1, dtype=np.int64))
        if any(len(r) == 0 for r in ranges):
            return np.zeros((0, self.ndim), np.int64)
        mesh = np.meshgrid(*ranges, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)

    def nuclei(self, cells: np.ndarray) -> _Nuclei:
        """The nuclei of occupied ``cells``, sorted by id (so ties break the same everywhere)."""
        nd = self.ndim
        n_rot = 1 if nd == 2 else 3
        n_dir = 1 if nd == 2 else 2
        u = _uniforms(_lattice_keys(self.seed, 0xC311 + nd, cells),
                      1 + nd + 1 + nd + n_rot + 2 * n_dir + 2 + 3)
        occupied = u[:, 0] < self.density
        u, cells = u[occupied], cells[occupied]
        cols = iter(range(1, u.shape[1]))

        def take(k: int) -> np.ndarray:
            return u[:, [next(cols) for _ in range(k)]]

        center = (cells + 0.5) * self.spacing + (2 * take(nd) - 1) * self.jitter
        size = _SIZE_RANGE[0] + (_SIZE_RANGE[1] - _SIZE_RANGE[0]) * take(1)
        log_aspect = (2 * take(nd) - 1) * _LOG_ASPECT
        log_aspect -= log_aspect.mean(axis=1, keepdims=True)  # keep the volume
        radii = 0.5 * self.diameter * size * np.exp(log_aspect)
        rot = _rotations(take(n_rot), nd)
        v1 = _unit_vectors(take(n_dir), nd)
        v3 = _unit_vectors(take(n_dir), nd)
        e1 = _MAX_E1 * take(1)[:, 0]
        e3 = _MAX_E3 * take(1)[:, 0]
        brightness = np.exp(_BRIGHTNESS_SIGMA * 2.0 * (take(3).sum(axis=1) - 1.5))

        # q = A d with A = diag(1/r) R^T maps the ellipsoid onto the unit ball.
        a_t = rot / radii[:, None, :]  # A^T = R diag(1/r)
        quad = np.einsum("nij,nkj->nik", a_t, a_t)  # A^T A
        w1 = e1[:, None] * np.einsum("nij,nj->ni", a_t, v1)
        w3 = np.einsum("nij,nj->ni", a_t, v3)
        # Label voxels have r < 1 + e1 + e3; an ellipsoid's half-extent on axis i is
        # sqrt(sum_k R_ik^2 r_k^2).
        extent = np.sqrt(np.einsum("nik,nk->ni", rot**2, radii**2)).max(axis=1)
        half = np.ceil(extent * (1 + e1 + e3)).astype(np.int64)
        ids = 1 + np.ravel_multi_index(tuple((cells - self.id_origin).T), self.id_dims)
        order = np.argsort(ids, kind="stable")
        return _Nuclei(ids.astype(np.int64), center, quad, w1, w3, e3, brightness,
                       half).take(order)


def _rotations(u: np.ndarray, nd: int) -> np.ndarray:
    """Uniformly random rotation matrices ``(n, nd, nd)`` from uniforms."""
    if nd == 2:
        theta = 2 * np.pi * u[:, 0]
        c, s = np.cos(theta), np.sin(theta)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    # Random unit quaternion (Shoemake's method) -> rotation matrix.
    r1, r2 = np.sqrt(1 - u[:, 0]), np.sqrt(u[:, 0])
    t1, t2 = 2 * np.pi * u[:, 1], 2 * np.pi * u[:, 2]
    x, y, z, w = r1 * np.sin(t1), r1 * np.cos(t1), r2 * np.sin(t2), r2 * np.cos(t2)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _unit_vectors(u: np.ndarray, nd: int) -> np.ndarray:
    if nd == 2:
        theta = 2 * np.pi * u[:, 0]
        return np.stack([np.cos(theta), np.sin(theta)], -1)
    z = 2 * u[:, 0] - 1
    rho, phi = np.sqrt(1 - z * z), 2 * np.pi * u[:, 1]
    return np.stack([z, rho * np.cos(phi), rho * np.sin(phi)], -1)


# -- rendering ---------------------------------------------------------------------------
_FAR = np.uint64(int(np.float32(2.0).view(np.uint32)) << 32)  # "no nucleus": r_eff = 2


def _stamp_axis(nuc: _Nuclei, axis: int, width: int, lo: int, hi: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-nucleus voxel coordinates along one axis of a stamp, clipped cheaply.

    If the region is thinner than the stamp, every nucleus is evaluated on the region's own
    coordinates (always valid); otherwise on its stamp, with a validity mask.
    """
    n = len(nuc)
    if hi - lo <= width:
        coords = np.broadcast_to(np.arange(lo, hi, dtype=np.int64), (n, hi - lo))
        valid = None
    else:
        start = np.floor(nuc.center[:, axis]).astype(np.int64) - nuc.half
        coords = start[:, None] + np.arange(width, dtype=np.int64)[None, :]
        valid = (coords >= lo) & (coords < hi)
    delta = (coords - nuc.center[:, axis, None]).astype(np.float32)
    return delta, coords - lo, valid


def _expand(arr: np.ndarray, axis: int, nd: int) -> np.ndarray:
    """(n, L) -> shape (n, 1.., L, 1..) with L on stamp axis ``axis``."""
    shape = [arr.shape[0]] + [1] * nd
    shape[1 + axis] = arr.shape[1]
    return arr.reshape(shape)


def _scatter_batch(keys: np.ndarray, nuc: _Nuclei, index: np.ndarray, width: int,
                   lo: Sequence[int], hi: Sequence[int]) -> None:
    """Evaluate a batch of nuclei on their stamps and keep, per voxel, the closest one.

    Closeness is the irregular ellipsoidal radius r_eff (< 1 inside a nucleus). The key packs
    the float32 bits of r_eff (monotonic for non-negative floats) above the nucleus index, so a
    single ``minimum.at`` finds the owner and breaks exact ties by the smaller id.
    """
    nd = len(lo)
    f32 = np.float32
    axes = [_stamp_axis(nuc, a, width, lo[a], hi[a]) for a in range(nd)]
    d = [_expand(axes[a][0], a, nd) for a in range(nd)]
    m = nuc.quad.astype(f32)
    col = [(slice(None),) + (None,) * nd]
    # r^2 = d^T M d, summed so that only three operations touch full-size arrays.
    # (in place where possible: fresh full-size temporaries cost more than the arithmetic)
    if nd == 2:
        part = (m[:, 0, 0][:, None, None] * d[0]) * d[0]
        r = (2 * m[:, 0, 1])[:, None, None] * d[0] + m[:, 1, 1][:, None, None] * d[1]
    else:
        mm = [[m[:, i, j][tuple(col[0])] for j in range(3)] for i in range(3)]
        part = mm[0][0] * d[0] * d[0] + (2 * mm[0][1] * d[0] + mm[1][1] * d[1]) * d[1]
        r = (2 * mm[0][2] * d[0] + 2 * mm[1][2] * d[1]) + mm[2][2] * d[2]
    r *= d[-1]
    r += part
    np.sqrt(r, out=r)
    dot1 = _linear(nuc.w1.astype(f32), d)
    dot3 = _linear(nuc.w3.astype(f32), d)
    inv = r + f32(1e-6)
    np.reciprocal(inv, out=inv)
    dot1 *= inv  # e1 * cos(angle to v1)
    dot3 *= inv  # cos(angle to v3)
    # den = 1 + e1 cos1 + e3 (4 cos3^3 - 3 cos3): the third Chebyshev term gives three lobes.
    cube = dot3 * dot3
    cube *= f32(4.0)
    cube -= f32(3.0)
    cube *= dot3
    cube *= nuc.e3.astype(f32)[tuple(col[0])]
    cube += dot1
    cube += f32(1.0)
    r /= cube
    inside = r < f32(1.0)
    for a in range(nd):
        valid = axes[a][2]
        if valid is not None:
            inside &= _expand(valid, a, nd)
    strides = np.cumprod((list(np.subtract(hi, lo)) + [1])[:0:-1])[::-1]
    # int32 is enough: a sub-region has at most _SUBREGION_VOXELS voxels (plus margins)
    lin = _expand(axes[0][1].astype(np.int32) * np.int32(strides[0]), 0, nd)
    for a in range(1, nd):
        lin = lin + _expand(axes[a][1].astype(np.int32) * np.int32(strides[a]), a, nd)
    lin = np.broadcast_to(lin, r.shape)[inside]
    idx = np.broadcast_to(index.astype(np.uint64)[tuple(col[0])], r.shape)[inside]
    key = r[inside].view(np.uint32).astype(np.uint64)
    key <<= np.uint64(32)
    key |= idx
    np.minimum.at(keys, lin, key)


def _linear(w: np.ndarray, d: list[np.ndarray]) -> np.ndarray:
    """sum_i w[:, i] * d_i broadcast to the full stamp (one full-size add per extra axis)."""
    nd = len(d)
    idx = (slice(None),) + (None,) * nd
    out = w[:, 0][idx] * d[0]
    for a in range(1, nd):
        out = out + w[:, a][idx] * d[a]  # the last add yields a fresh full-size array
    return out


def _owner_keys(field: _NucleiField, lo: Sequence[int], hi: Sequence[int]
                ) -> tuple[np.ndarray, _Nuclei]:
    """Packed (r_eff, nucleus index) key of the owning nucleus for every voxel of a region."""
    cells = field.cells_reaching(lo, hi)
    nuc = field.nuclei(cells)
    # keep nuclei whose stamp intersects the region
    start = np.floor(nuc.center).astype(np.int64) - nuc.half[:, None]
    stop = start + 2 * nuc.half[:, None] + 1
    hits = np.all((stop > np.asarray(lo)) & (start < np.asarray(hi)), axis=1)
    nuc = nuc.take(np.flatnonzero(hits))
    shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    keys = np.empty(math.prod(shape), np.uint64)
    keys.fill(_FAR | np.uint64(len(nuc)))  # index len(nuc) is the background sentinel
    # Stamps of one size are evaluated together, in batches that stay in cache.
    for half in np.unique(nuc.half):
        members = np.flatnonzero(nuc.half == half)
        width = int(2 * half + 1)
        per = math.prod(min(width, b - a) for a, b in zip(lo, hi, strict=True))
        step = max(1, _BATCH_ENTRIES // per)
        for s in range(0, len(members), step):
            sel = members[s:s + step]
            # the key stores the position in the id-sorted list, so ties break by id
            _scatter_batch(keys, nuc.take(sel), sel, width, lo, hi)
    return keys.reshape(shape), nuc


def _background_axis(coords: np.ndarray, seed: int, axis: int) -> np.ndarray:
    """A smooth 1-D illumination profile around 1 (two long cosine waves)."""
    rng = np.random.default_rng([seed, 0xB6, axis])
    wavelength = rng.uniform(250.0, 900.0, 2)
    amplitude = rng.uniform(0.05, 0.12, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    x = coords.astype(np.float64)[:, None]
    wave = amplitude * np.cos(2 * np.pi * x / wavelength + phase)
    return (1.0 + wave.sum(axis=1)).astype(np.float32)


def _output_scale(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind == "f":
        return 0.0, 1.0
    return _INT_SCALE.get(dtype.itemsize, _DEFAULT_INT_SCALE)


def _blur121(a: np.ndarray) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 blur on every axis (a cheap PSF, sigma ~0.7 voxel).

    The input carries a one-voxel margin on every side; the output is the interior.
    """
    for axis in range(a.ndim):
        lo = [slice(None)] * a.ndim
        mid = [slice(None)] * a.ndim
        hi = [slice(None)] * a.ndim
        lo[axis], mid[axis], hi[axis] = slice(None, -2), slice(1, -1), slice(2, None)
        out = a[tuple(mid)] * np.float32(2.0)
        out += a[tuple(lo)]
        out += a[tuple(hi)]
        a = out
    a *= np.float32(0.25**a.ndim)
    return a


def _slabs(lo: Sequence[int], hi: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Split axis 0 of a region so each slab has about _SLAB_VOXELS voxels."""
    plane = max(1, math.prod(b - a for a, b in zip(lo[1:], hi[1:], strict=True)))
    step = max(1, _SLAB_VOXELS // plane)
    for a in range(lo[0], hi[0], step):
        yield a, min(a + step, hi[0])


def _render(field: _NucleiField, lo: Sequence[int], hi: Sequence[int], *, noise: float,
            dtype: np.dtype, image: bool = True, labels: bool = True,
            label_dtype: np.dtype = _UINT32
            ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Render the image and/or labels of the region ``[lo, hi)`` (global coordinates)."""
    shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    img = np.empty(shape, dtype) if image else None
    lab = np.empty(shape, label_dtype) if labels else None
    for sub_lo, sub_hi in _subregions(lo, hi):
        out = tuple(slice(a - o, b - o) for a, b, o in zip(sub_lo, sub_hi, lo, strict=True))
        s_img, s_lab = _render_subregion(field, sub_lo, sub_hi, noise=noise, dtype=dtype,
                                         image=image, labels=labels, label_dtype=label_dtype)
        if img is not None:
            img[out] = s_img
        if lab is not None:
            lab[out] = s_lab
    return img, lab


def _subregions(lo: Sequence[int], hi: Sequence[int]) -> Iterator[tuple[list[int], list[int]]]:
    """Cut a big region into near-cubic pieces of at most _SUBREGION_VOXELS voxels."""
    block = [b - a for a, b in zip(lo, hi, strict=True)]
    while math.prod(block) > _SUBREGION_VOXELS:
        i = int(np.argmax(block))
        block[i] = (block[i] + 1) // 2
    ranges = [range(a, b, step) for a, b, step in zip(lo, hi, block, strict=True)]
    for start in np.ndindex(*(len(r) for r in ranges)):
        s = [r[i] for r, i in zip(ranges, start, strict=True)]
        yield s, [min(a + b, h) for a, b, h in zip(s, block, hi, strict=True)]


def _render_subregion(field: _NucleiField, lo: Sequence[int], hi: Sequence[int], *,
                      noise: float, dtype: np.dtype, image: bool, labels: bool,
                      label_dtype: np.dtype) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Render one sub-region: owner keys, then decode, blur, background and noise by slab."""
    nd = field.ndim
    # one voxel of margin for the blur
    plo, phi = [a - 1 for a in lo], [b + 1 for b in hi]
    keys, nuc = _owner_keys(field, plo, phi)
    lut_id = np.append(nuc.ids, 0).astype(label_dtype)
    lut_b = np.append(nuc.brightness, 0.0).astype(np.float32)
    offset, gain = _output_scale(dtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    img = np.empty(shape, dtype) if image else None
    lab = np.empty(shape, label_dtype) if labels else None
    inner = tuple(slice(1, -1) for _ in range(nd - 1))
    bg_axes = [_background_axis(np.arange(lo[a], hi[a]), field.seed, a) for a in range(1, nd)]
    noise_axes = [_axis_hash32(np.arange(lo[a], hi[a]), field.seed, a) for a in range(1, nd)]
    for a, b in _slabs(lo, hi):
        rows = slice(a - lo[0], b - lo[0])
        k = keys[a - lo[0]: b - lo[0] + 2]  # rows a-1 .. b: the slab plus the blur margin
        index = (k & np.uint64(0xFFFFFFFF)).astype(np.intp)
        if lab is not None:
            lab[rows] = lut_id[index[(slice(1, -1),) + inner]]
        if img is None:
            continue
        r = (k >> np.uint64(32)).astype(np.uint32).view(np.float32)
        r *= r
        r *= np.float32(-_EDGE_DIM)
        r += np.float32(1.0)
        r *= lut_b[index]
        vals = _blur121(r)
        bg = _background_axis(np.arange(a, b), field.seed, 0)
        vals += np.float32(_BACKGROUND) * _outer([bg] + bg_axes)
        if noise > 0:
            sigma = np.maximum(vals, np.float32(0.0))
            sigma += np.float32(_NOISE_FLOOR)
            np.sqrt(sigma, out=sigma)
            sigma *= np.float32(noise)
            sigma *= _hash_normal([_axis_hash32(np.arange(a, b), field.seed, 0)] + noise_axes)
            vals += sigma
        if info is None:
            img[rows] = vals
        else:
            vals *= np.float32(gain)
            vals += np.float32(offset + 0.5)  # + 0.5: round while truncating
            np.clip(vals, info.min, info.max, out=vals)
            img[rows] = vals
    return img, lab


def _outer(vectors: list[np.ndarray]) -> np.ndarray:
    out = vectors[0]
    for v in vectors[1:]:
        out = np.multiply.outer(out, v)
    return out


# -- public API ------------------------------------------------------------------------------
def _check_params(shape: Sequence[int], diameter: float, density: float, seed: int,
                  noise: float) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise InputError(f"shape must be 2-D or 3-D, got {shape}")
    if min(shape) < 1:
        raise InputError(f"shape must be positive, got {shape}")
    if not diameter >= 3:
        raise InputError(f"diameter must be at least 3 voxels, got {diameter}")
    if not 0 <= density <= 1:
        raise InputError(f"density must be in [0, 1], got {density}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if not noise >= 0:
        raise InputError(f"noise must be >= 0, got {noise}")
    return shape


def _label_dtype(field: _NucleiField) -> np.dtype:
    return np.dtype(np.uint32 if field.max_id < 2**32 else np.uint64)


def synthetic_nuclei(
    shape: Sequence[int],
    *,
    diameter: float = 12.0,
    density: float = 0.5,
    touching: bool = True,
    seed: int = 0,
    dtype: Any = "uint16",
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic fluorescence image of nuclei and its true labels, in memory.

    Nuclei are slightly irregular ellipsoids (random size, aspect ratio, orientation and a
    little lumpiness) of about ``diameter`` voxels, with log-normal brightness differences
    between nuclei and dimmer rims, blurred by a small PSF, on a smooth uneven background,
    with signal-dependent (shot-like) plus read noise.

    Parameters
    ----------
    shape : sequence of int
        2-D ``(y, x)`` or 3-D ``(z, y, x)`` shape.
    diameter : float
        Typical nucleus diameter in voxels (>= 3).
    density : float
        Fraction of lattice sites holding a nucleus, in [0, 1]. With ``touching=True`` the
        sites are 0.9 diameters apart, so 0.5 covers about 45 % of a 2-D image and many
        neighbours touch; 1.0 packs them like a tissue.
    touching : bool
        If False, nuclei sit on a sparser lattice and are always separated by background
        (at least 2 voxels), which makes connected components an exact segmentation.
    seed : int
        Non-negative seed; the same seed always gives the same image.
    dtype : numpy dtype
        Output dtype. Integers map a mean nucleus to ~4100 counts over a camera offset of 100
        (8-bit: ~94 over 4); floats are in units of the mean nucleus brightness.
    noise : float
        Noise standard deviation relative to a mean nucleus at that brightness; it scales
        with the square root of the local intensity (shot noise) above a read-noise floor.
        0 disables noise.

    Returns
    -------
    image : numpy.ndarray
        The image, of ``dtype``.
    labels : numpy.ndarray
        uint32 true labels (uint64 only for gigantic images): 0 is background, every nucleus
        has its own id. Ids are unique but not consecutive (they index the nucleus lattice),
        and are the same as :func:`write_synthetic_nuclei` writes for the same parameters.

    Examples
    --------
    >>> image, labels = synthetic_nuclei((64, 64), diameter=10, seed=1)
    >>> image.shape, image.dtype.name, labels.dtype.name
    ((64, 64), 'uint16', 'uint32')
    >>> bool(image[labels > 0].mean() > 2 * image[labels == 0].mean())
    True
    """
    shape = _check_params(shape, diameter, density, seed, noise)
    field = _NucleiField.create(shape, diameter, density, touching, seed)
    img, lab = _render(field, [0] * len(shape), list(shape), noise=noise,
                       dtype=np.dtype(dtype), label_dtype=_label_dtype(field))
    assert img is not None and lab is not None
    return img, lab


def synthetic_cells(
    shape: Sequence[int],
    *,
    nucleus_diameter: float = 10.0,
    density: float = 0.9,
    seed: int = 0,
    dtype: Any = "uint16",
    noise: float = 0.05,
    stain: Literal["membrane", "cytoplasm"] = "membrane",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-channel image of cells (nuclei + membrane or cytoplasm) and its true labels.

    Nuclei are those of :func:`synthetic_nuclei` with ``touching=False`` (one per lattice site,
    never touching); each cell is the region nearer to its nucleus than to any other, within
    about 0.7 lattice sites of it (so cells touch their neighbours and end at the tissue's edge),
    about twice the nucleus diameter across. Channel 1 shows the cells' membranes (bright
    outlines) or their cytoplasm (bright inside, dim at the borders between cells).

    Parameters
    ----------
    shape : sequence of int
        2-D or 3-D spatial shape.
    nucleus_diameter : float
        Typical nucleus diameter in voxels.
    density : float
        Fraction of lattice sites holding a cell.
    seed : int
        The same seed gives the same image.
    dtype : numpy dtype
        Of the image (scaled as :func:`synthetic_nuclei`).
    noise : float
        Noise relative to a mean nucleus, in both channels.
    stain : {"membrane", "cytoplasm"}
        What channel 1 shows.

    Returns
    -------
    image : numpy.ndarray
        ``(2, *shape)``: channel 0 the nuclei, channel 1 the membranes or cytoplasm.
    nuclei : numpy.ndarray
        uint32 true nucleus labels.
    cells : numpy.ndarray
        uint32 true cell labels; every cell has its nucleus's label.

    Examples
    --------
    >>> image, nuclei, cells = synthetic_cells((96, 96), nucleus_diameter=8, seed=2)
    >>> image.shape, set(np.unique(cells)) == set(np.unique(nuclei))
    ((2, 96, 96), True)
    >>> bool(((cells > 0) >= (nuclei > 0)).all())  # every nucleus lies in its cell
    True
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    from .postprocess import expand_block

    if stain not in ("membrane", "cytoplasm"):
        raise InputError(f"stain={stain!r} must be 'membrane' or 'cytoplasm'")
    shape = _check_params(shape, nucleus_diameter, density, seed, noise)
    field = _NucleiField.create(shape, nucleus_diameter, density, False, seed)
    nuclei_img, nuclei = _render(field, [0] * len(shape), list(shape), noise=0.0,
                                 dtype=np.dtype(np.float32), label_dtype=np.dtype(np.uint32))
    assert nuclei_img is not None and nuclei is not None
    cells = expand_block(nuclei, 0.7 * field.spacing).astype(np.uint32)
    edges = find_boundaries(cells, mode="inner") & (cells > 0)
    if stain == "membrane":
        second = edges.astype(np.float32)
    else:
        second = np.where(edges, 0.6, (cells > 0) * 1.0).astype(np.float32)
    second = ndi.gaussian_filter(second, max(0.7, nucleus_diameter / 12)) * 1.2
    rng = np.random.default_rng([seed, 0xCE11])
    channels = []
    for channel in (nuclei_img, second):
        value = channel + _BACKGROUND + rng.normal(0.0, noise, shape).astype(np.float32)
        channels.append(value)
    out = np.stack(channels)
    out_dtype = np.dtype(dtype)
    offset, gain = _output_scale(out_dtype)
    out = offset + gain * out
    if out_dtype.kind in "iu":
        info = np.iinfo(out_dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(out_dtype), nuclei, cells


def lazy_synthetic_nuclei(
    shape: Sequence[int],
    chunks: Sequence[int],
    *,
    diameter: float = 12.0,
    density: float = 0.5,
    touching: bool = True,
    seed: int = 0,
    dtype: Any = "uint16",
    noise: float = 0.05,
    labels: bool = False,
) -> da.Array:
    """The image (or, with ``labels=True``, the true labels) of :func:`synthetic_nuclei` as a
    lazy dask array: each chunk is rendered when computed, so any size costs no memory.

    Examples
    --------
    >>> img = lazy_synthetic_nuclei((4000, 4000), (1000, 1000), diameter=10)
    >>> img.chunksize, img.dtype.name
    ((1000, 1000), 'uint16')
    >>> image, _ = synthetic_nuclei((300, 300), diameter=10)
    >>> bool((img[:300, :300].compute() == image).all())
    True
    """
    shape = _check_params(shape, diameter, density, seed, noise)
    field = _NucleiField.create(shape, diameter, density, touching, seed)
    out_dtype = _label_dtype(field) if labels else np.dtype(dtype)
    chunks = da.core.normalize_chunks(tuple(chunks), shape)

    def block(block_info: dict | None = None) -> np.ndarray:
        assert block_info is not None  # dask always passes it to map_blocks functions
        loc = block_info[None]["array-location"]
        lo, hi = [a for a, _ in loc], [b for _, b in loc]
        img, lab = _render(field, lo, hi, noise=noise, dtype=np.dtype(dtype),
                           image=not labels, labels=labels, label_dtype=out_dtype)
        out = lab if labels else img
        assert out is not None
        return out

    name = f"synthetic-nuclei-{'labels' if labels else 'image'}-" + da.core.tokenize(
        field, noise, str(dtype), chunks)
    return da.map_blocks(block, chunks=chunks, dtype=out_dtype, name=name,
                         meta=np.empty((0,) * len(shape), out_dtype))


def truth_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_synthetic_nuclei` puts the true labels of a plain zarr image.

    Examples
    --------
    >>> truth_path("/data/demo.zarr").as_posix()
    '/data/demo.truth.zarr'
    """
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".zarr") else path.name
    return path.with_name(f"{stem}.truth.zarr")


def _default_image_codec(zarr_format: int) -> Any:
    # zstd level 1 + bit-shuffle: noisy 16-bit images shrink ~2x at several hundred MB/s.
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


def _chunk_regions(shape: Sequence[int], chunks: Sequence[int]
                   ) -> Iterator[tuple[list[int], list[int]]]:
    grid = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    for idx in np.ndindex(*(len(g) for g in grid)):
        lo = [g[i] for g, i in zip(grid, idx, strict=True)]
        yield lo, [min(a + c, s) for a, c, s in zip(lo, chunks, shape, strict=True)]


def write_synthetic_nuclei(
    path: str | os.PathLike,
    shape: Sequence[int],
    *,
    chunks: Sequence[int],
    diameter: float = 12.0,
    density: float = 0.5,
    touching: bool = True,
    seed: int = 0,
    dtype: Any = "uint16",
    noise: float = 0.05,
    ome: bool = False,
    with_labels: bool | str | os.PathLike = False,
    compressor: Any = "default",
    zarr_format: int = 3,
    scale: Sequence[float] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> zarr.Array:
    """Write :func:`synthetic_nuclei` chunk by chunk to disk, in parallel threads.

    Peak memory is about ``workers`` chunks' worth of work (each chunk is rendered in small
    pieces), never the whole image, so images far larger than RAM can be made.

    Parameters
    ----------
    path : str or os.PathLike
        Output location (a directory store).
    shape, diameter, density, touching, seed, dtype, noise
        As for :func:`synthetic_nuclei`; the written voxels equal its output exactly.
    chunks : sequence of int
        Chunk shape of the (full-resolution) array. The image does not depend on it.
    ome : bool
        Write an OME-Zarr image group (NGFF 0.5 with ``zarr_format=3``, 0.4 with 2): level
        ``"0"`` at full resolution plus mean-downsampled levels (y/x halved per level, z when
        not much thinner, see :func:`blockbuster.ome.pyramid_factors`) down to about one chunk.
        Otherwise a plain zarr array.
    with_labels : bool or path
        Also write the true labels. With ``ome=True`` they become an NGFF label image
        ``<path>/labels/truth``; otherwise a zarr array at :func:`truth_path` (or the given
        path). Label ids are the same as :func:`synthetic_nuclei` returns.
    compressor : codec, None or "default"
        Compressor of the image arrays; "default" is Blosc zstd level 1 with bit-shuffle.
    zarr_format : {3, 2}
        Zarr format; 2 gives OME-Zarr 0.4 for tools that have not moved to 0.5.
    scale : sequence of float, optional
        Physical voxel size per axis for the OME-Zarr metadata (default 1).
    overwrite : bool
        Replace an existing ``path`` (and truth labels); otherwise refuse.
    workers : int, optional
        Threads rendering chunks in parallel (default: number of CPUs).

    Returns
    -------
    zarr.Array
        The full-resolution image array (level ``"0"`` for OME-Zarr).

    Examples
    --------
    >>> import os, shutil, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> arr = write_synthetic_nuclei(os.path.join(tmp, "img.zarr"), (256, 256),
    ...                              chunks=(128, 128), diameter=10, with_labels=True)
    >>> arr.shape, arr.chunks
    ((256, 256), (128, 128))
    >>> image, labels = synthetic_nuclei((256, 256), diameter=10)
    >>> bool((arr[:] == image).all())
    True
    >>> bool((zarr.open_array(truth_path(os.path.join(tmp, "img.zarr")))[:] == labels).all())
    True
    >>> shutil.rmtree(tmp)
    """
    shape = _check_params(shape, diameter, density, seed, noise)
    if len(chunks) != len(shape):
        raise InputError(f"chunks {tuple(chunks)} do not fit shape {shape}")
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    if min(chunks) < 1:
        raise InputError(f"chunks {chunks} do not fit shape {shape}")
    if zarr_format not in (2, 3):
        raise InputError(f"zarr_format must be 2 or 3, got {zarr_format}")
    path = Path(path)
    truth = None
    if with_labels and not ome:
        truth = truth_path(path) if with_labels is True else Path(with_labels)
    for p in (path, truth):
        if p is not None and p.exists():
            if not overwrite:
                raise OutputExistsError(f"{p} exists; pass $overwrite to replace it")
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    field = _NucleiField.create(shape, diameter, density, touching, seed)
    dtype = np.dtype(dtype)
    label_dtype = _label_dtype(field)
    codec = _default_image_codec(zarr_format) if compressor == "default" else compressor
    compressors = None if codec is None else [codec] if zarr_format == 3 else codec
    axes = ["z", "y", "x"][-len(shape):]
    fmt: Literal[2, 3] = 2 if zarr_format == 2 else 3
    params: dict[str, Any] = {"generator": "blockbuster.data.synthetic_nuclei",
                              "diameter": diameter,
              "density": density, "touching": touching, "seed": seed, "noise": noise}
    lab_arr = None
    if ome:
        from .ome import write_multiscales

        group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
        image = _create(group, "0", shape, chunks, dtype, compressors, fmt, axes)
        # single-level metadata first, so the truth labels can be created inside the image
        write_multiscales(group, axes=axes, scale=_scale0(scale, axes), factors=[],
                          name=path.name, method="mean")
        if with_labels:
            from .ome import create_label_level0

            lab_arr = create_label_level0(path, "truth", shape, chunks, label_dtype)
    else:
        image = _create(str(path), None, shape, chunks, dtype, compressors, fmt, axes)
        if truth is not None:
            lab_arr = _create(str(truth), None, shape, chunks, label_dtype, "auto", fmt, axes)
    image.attrs["synthetic"] = params  # how the image was made

    def work(region: tuple[list[int], list[int]]) -> None:
        lo, hi = region
        img, lab = _render(field, lo, hi, noise=noise, dtype=dtype, labels=lab_arr is not None,
                           label_dtype=label_dtype)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        assert img is not None
        image[box] = img
        if lab_arr is not None:
            assert lab is not None
            lab_arr[box] = lab

    _run_parallel(work, _chunk_regions(shape, chunks), workers)
    if ome:
        _finish_ome_image(path, image, axes, scale, workers)
        if lab_arr is not None:
            from .ome import finalize_ome_labels

            finalize_ome_labels(path, "truth", workers=workers)
        image = zarr.open_array(str(path / "0"), mode="r+")
    return image


def _create(store: zarr.Group | str, name: str | None, shape: tuple[int, ...],
            chunks: tuple[int, ...], dtype: np.dtype, compressors: Any,
            zarr_format: Literal[2, 3], axes: list[str]) -> zarr.Array:
    """A zarr array (v2 with "/" chunk keys, as NGFF 0.4 wants; v3 with dimension names)."""
    kwargs: dict[str, Any] = {"shape": shape, "chunks": chunks, "dtype": dtype,
                              "compressors": compressors, "fill_value": 0,
                              "zarr_format": zarr_format}
    if zarr_format == 3:
        kwargs["dimension_names"] = axes
    else:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    if isinstance(store, zarr.Group):
        assert name is not None
        return store.create_array(name, **{k: v for k, v in kwargs.items()
                                           if k != "zarr_format"})
    return zarr.create_array(store=store, overwrite=True, **kwargs)


def _run_parallel(work: Callable[[Any], None], items: Iterable[Any], workers: int | None
                  ) -> None:
    """Run ``work`` on every item in a thread pool (NumPy and the codecs release the GIL)."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # consume results so the first exception propagates
        for _ in pool.map(work, items):
            pass


def _scale0(scale: Sequence[float] | None, axes: list[str]) -> list[float]:
    scale0 = [1.0] * len(axes) if scale is None else [float(s) for s in scale]
    if len(scale0) != len(axes) or min(scale0) <= 0:
        raise InputError(f"scale {scale} must have one positive value per axis {axes}")
    return scale0


def _finish_ome_image(path: Path, level0: zarr.Array, axes: list[str],
                      scale: Sequence[float] | None, workers: int | None) -> None:
    from .ome import build_pyramid, pyramid_factors, write_multiscales

    scale0 = _scale0(scale, axes)
    factors = pyramid_factors(level0.shape, axes, level0.chunks, scale0)
    group = zarr.open_group(str(path), mode="r+")
    build_pyramid(group, factors, method="mean", workers=workers)
    write_multiscales(group, axes=axes, scale=scale0, factors=factors,
                      name=path.name, method="mean")


# -- binary blob masks -----------------------------------------------------------------------
def _value_noise(lo: Sequence[int], hi: Sequence[int], seed: int, spacing: float,
                 salt: int) -> np.ndarray:
    """Smooth random field: hashed lattice values, smooth-step interpolated, axis by axis."""
    nd = len(lo)
    coords = [np.arange(a, b, dtype=np.float64) / spacing for a, b in zip(lo, hi, strict=True)]
    base = [np.floor(c).astype(np.int64) for c in coords]
    first = [int(b[0]) for b in base]
    counts = [int(b[-1]) - f + 2 for b, f in zip(base, first, strict=True)]
    mesh = np.meshgrid(*[np.arange(f, f + n) for f, n in zip(first, counts, strict=True)],
                       indexing="ij")
    cells = np.stack([m.ravel() for m in mesh], axis=1)
    field = _uniforms(_lattice_keys(seed, salt, cells), 1)[:, 0].reshape(counts)
    field = field.astype(np.float32)
    for axis in range(nd):
        t = coords[axis] - base[axis]
        t = (t * t * (3 - 2 * t)).astype(np.float32)
        i = base[axis] - first[axis]
        shape = [1] * nd
        shape[axis] = len(t)
        t = t.reshape(shape)
        field = np.take(field, i, axis=axis) * (1 - t) + np.take(field, i + 1, axis=axis) * t
    return field


def _mask_field(lo: Sequence[int], hi: Sequence[int], seed: int, blob_size: float
                ) -> np.ndarray:
    # two octaves: blobs of ~blob_size with ragged edges
    f = _value_noise(lo, hi, seed, blob_size, 0xB10B)
    f += np.float32(0.5) * _value_noise(lo, hi, seed, blob_size / 2.0, 0xB10C)
    return f


def _mask_threshold(ndim: int, fill: float, seed: int, blob_size: float) -> float:
    """Field value above which a fraction ``fill`` of voxels lie, from a fixed sample."""
    side = int(max(64, (2**21) ** (1 / ndim)))
    sample = _mask_field([0] * ndim, [side] * ndim, seed, blob_size)
    return float(np.quantile(sample, 1.0 - fill))


def synthetic_mask(
    shape: Sequence[int],
    *,
    fill: float = 0.4,
    seed: int = 0,
    chunks: Sequence[int] | None = None,
    blob_size: float = 32.0,
) -> np.ndarray | da.Array:
    """A binary mask of irregular blobs, for connected-components tests and benchmarks.

    The mask thresholds a smooth random field (two octaves of hashed value noise), so blobs
    have ragged outlines, a wide range of sizes, and many of them cross chunk borders. Every
    voxel depends only on its position, ``seed``, ``fill`` and ``blob_size``.

    Parameters
    ----------
    shape : sequence of int
        1-D to 3-D shape.
    fill : float
        Approximate fraction of True voxels, in (0, 1).
    seed : int
        Non-negative seed.
    chunks : sequence of int, optional
        If given, return a lazy dask array with these chunks (cheap at any size); otherwise a
        NumPy array.
    blob_size : float
        Typical blob width in voxels.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Boolean mask.

    Examples
    --------
    >>> m = synthetic_mask((256, 256), fill=0.4, seed=3)
    >>> m.dtype.name, bool(0.3 < m.mean() < 0.5)
    ('bool', True)
    >>> lazy = synthetic_mask((256, 256), fill=0.4, seed=3, chunks=(100, 100))
    >>> bool((lazy.compute() == m).all())
    True
    """
    shape = tuple(int(s) for s in shape)
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise InputError(f"shape must be 1-D to 3-D and positive, got {shape}")
    if not 0 < fill < 1:
        raise InputError(f"fill must be in (0, 1), got {fill}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    threshold = np.float32(_mask_threshold(len(shape), fill, seed, blob_size))

    def render(lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        return _mask_field(lo, hi, seed, blob_size) > threshold

    if chunks is None:
        return render([0] * len(shape), shape)
    chunks = da.core.normalize_chunks(tuple(chunks), shape)

    def block(block_info: dict | None = None) -> np.ndarray:
        assert block_info is not None  # dask always passes it to map_blocks functions
        loc = block_info[None]["array-location"]
        return render([a for a, _ in loc], [b for _, b in loc])

    name = "synthetic-mask-" + da.core.tokenize(shape, fill, seed, blob_size, chunks)
    return da.map_blocks(block, chunks=chunks, dtype=bool, name=name,
                         meta=np.empty((0,) * len(shape), bool))
