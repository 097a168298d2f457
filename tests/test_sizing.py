"""Tile sizing: memory probes, the peak-memory model, "auto" tile shapes, Cellpose, validation.

Every test that sizes tiles injects the memory (``memory=`` or monkeypatched probes), so the
results do not depend on the machine the tests run on.
"""

from __future__ import annotations

import functools
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockbuster import sizing
from blockbuster.errors import BlockbusterError, InputError, NoGPUError, TileSizeError
from blockbuster.plugins.cellpose import (
    CELLPOSE_MEMORY_MODEL,
    auto_tile_shape_cellpose,
    cellpose_memory_model,
)
from blockbuster.segmenter import MemoryModel
from blockbuster.sizing import (
    ENGINE_BYTES_PER_VOXEL,
    MemoryProbe,
    auto_tile_shape,
    available_memory,
    format_bytes,
    padded_shape,
    plan_tile_shape,
    predict_peak_bytes,
    validate_tile_shape,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def grown(tile: tuple[int, ...], shape: tuple[int, ...], sized: tuple[bool, ...]) -> tuple:
    """The next larger cubic tile: every sized edge one more, clipped to the extent."""
    edge = max(t for t, s in zip(tile, sized, strict=True) if s)
    return tuple(min(edge + 1, e) if s else 1 for e, s in zip(shape, sized, strict=True))


def sized_axes(ndim: int, spatial_ndim: int | None) -> tuple[bool, ...]:
    n_fixed = 0 if spatial_ndim is None else max(0, ndim - spatial_ndim)
    return (False,) * n_fixed + (True,) * (ndim - n_fixed)


def fake_probe(monkeypatch, name: str, result: MemoryProbe | str) -> None:
    """Replace a probe by one returning ``result``, or failing with ``result`` as the reason."""

    def probe() -> MemoryProbe:
        if isinstance(result, str):
            raise sizing._ProbeUnavailable(result)
        return result

    monkeypatch.setattr(sizing, name, probe)


# -- format_bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 * MiB, "1.5 GiB"),
        (int(3.2 * GiB), "3.2 GiB"),
        (MiB - 1, "1.0 MiB"),  # would be "1024.0 KiB" if rounding were not looked ahead
        (2 * 1024**4, "2.0 TiB"),
        (-3 * KiB, "-3.0 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# -- padded_shape and predict_peak_bytes -----------------------------------------------------


def test_padded_shape_adds_halo_on_both_sides():
    assert padded_shape((100, 200), (10, 5), (10**6, 10**6)) == (120, 210)


def test_padded_shape_clips_depth_to_core_minus_one():
    # z-tile of 1 gets no halo; a core of 5 gets at most 4 on each side.
    assert padded_shape((1, 5, 50), (20, 20, 20), (99, 99, 999)) == (1, 5 + 2 * 4, 90)


def test_padded_shape_clips_to_extent():
    assert padded_shape((95, 40), (10, 10), (100, 45)) == (100, 45)


def test_predict_peak_default_model_by_hand():
    # Default model: 4 bytes per input byte + 16 per voxel; uint16 -> 8 + 16 = 24,
    # plus the engine's 24 and the 2-byte input tile itself: 50 bytes per padded voxel.
    assert ENGINE_BYTES_PER_VOXEL == 24
    expected = (100 + 2 * 10) * (100 + 2 * 10) * 50
    assert predict_peak_bytes((100, 100), np.uint16, overlap=10) == expected


def test_predict_peak_channels_and_thin_axis_by_hand():
    # float32 x 3 channels: 4*4*3 = 48 + 16 + engine 24 + input 12 = 100 bytes per voxel.
    # The z-core of 1 gets no halo even though overlap is 5.
    expected = 1 * 74 * 74 * 100
    assert predict_peak_bytes((1, 64, 64), "float32", overlap=5, channels=3) == expected


def test_predict_peak_clips_padded_tile_to_image():
    # padded (120, 120) clipped to an image of (105, 1000): 105 x 120 voxels of 50 bytes.
    got = predict_peak_bytes((100, 100), "uint16", overlap=10, image_shape=(105, 1000))
    assert got == 105 * 120 * 50


def test_predict_peak_bytes_per_voxel_override_keeps_model_fixed_bytes():
    model = MemoryModel(bytes_per_input_byte=99, bytes_per_voxel=99, fixed_bytes=1000)
    got = predict_peak_bytes(
        (10, 10, 10), "uint8", memory_model=model, bytes_per_voxel=7, fixed_bytes=100
    )
    assert got == 1000 * 7 + 100 + 1000


def test_predict_peak_rounds_up():
    assert predict_peak_bytes((3,), "uint8", bytes_per_voxel=0.5) == 2


def test_predict_peak_rejects_mismatched_image_shape():
    with pytest.raises(InputError, match="image_shape"):
        predict_peak_bytes((10, 10), "uint8", image_shape=(10, 10, 10))


# -- plan_tile_shape: fit, maximality, halo, isotropy, clipping ------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "overlap", "memory", "spatial_ndim", "channels"),
    [
        ((10_000, 10_000), "uint16", 0, 200 * MiB, None, 1),
        ((10_000, 10_000), "uint8", 32, 64 * MiB, None, 1),
        ((800, 3000, 3000), "uint16", (4, 16, 16), 1 * GiB, None, 1),
        ((800, 3000, 3000), "float32", 20, 300 * MiB, 2, 2),
        ((5, 6, 3000, 3000), "uint16", 10, 100 * MiB, 2, 1),
        ((37, 5000, 61), "uint16", 7, 30 * MiB, None, 1),
    ],
)
def test_plan_fits_and_is_maximal(shape, dtype, overlap, memory, spatial_ndim, channels):
    plan = plan_tile_shape(
        shape, dtype, overlap=overlap, memory=memory, spatial_ndim=spatial_ndim, channels=channels
    )

    def peak(tile):
        kwargs = dict(overlap=overlap, channels=channels, image_shape=shape)
        return predict_peak_bytes(tile, dtype, **kwargs)

    assert plan.budget_bytes == memory
    assert plan.predicted_peak_bytes == peak(plan.shape) <= memory
    bigger = grown(plan.shape, shape, sized_axes(len(shape), spatial_ndim))
    assert bigger == plan.shape or peak(bigger) > memory
    depth = (overlap,) * len(shape) if isinstance(overlap, int) else overlap
    assert plan.padded_shape == padded_shape(plan.shape, depth, shape)


def test_plan_2d_square_by_hand():
    # 1 byte per voxel, 1e6 bytes: the largest square with s^2 <= 1e6 is 1000.
    plan = plan_tile_shape((10_000, 10_000), "uint8", bytes_per_voxel=1, memory=10**6)
    assert plan.shape == (1000, 1000)
    assert plan.predicted_peak_bytes == 10**6


def test_plan_accounts_for_halo_by_hand():
    # With a halo of 10 the padded tile (s + 20)^2 must fit 1e6: s = 980.
    plan = plan_tile_shape((10_000, 10_000), "uint8", overlap=10, bytes_per_voxel=1, memory=10**6)
    assert plan.shape == (980, 980)
    assert plan.padded_shape == (1000, 1000)


def test_plan_3d_cube_by_hand():
    plan = plan_tile_shape((5000,) * 3, "uint8", overlap=5, bytes_per_voxel=1, memory=10**6)
    assert plan.shape == (90, 90, 90)  # (90 + 10)^3 = 1e6


def test_plan_thin_tile_has_clipped_halo_by_hand():
    # overlap 50 exceeds the tile: depth is clipped to s - 1, padded 3s - 2 <= 100 gives s = 34.
    plan = plan_tile_shape((10_000, 10_000), "uint8", overlap=50, bytes_per_voxel=1, memory=100**2)
    assert plan.shape == (34, 34)
    assert plan.padded_shape == (100, 100)
    assert "halo clipped" in plan.reason


def test_plan_2d_method_gets_z_1_by_hand():
    plan = plan_tile_shape(
        (30, 5000, 5000), "uint8", overlap=10, bytes_per_voxel=1, memory=10**6, spatial_ndim=2
    )
    assert plan.shape == (1, 980, 980)
    assert plan.padded_shape == (1, 1000, 1000)  # no halo in z on a one-slice tile
    assert "2-D method" in plan.reason


def test_plan_2d_method_on_4d_image_keeps_leading_axes_at_1():
    plan = plan_tile_shape((3, 30, 500, 500), "uint8", memory=GiB, spatial_ndim=2)
    assert plan.shape == (1, 1, 500, 500)


def test_plan_3d_method_on_2d_image_sizes_both_axes():
    plan = plan_tile_shape((500, 500), "uint8", memory=GiB, spatial_ndim=3)
    assert plan.shape == (500, 500)


def test_plan_is_isotropic():
    plan = plan_tile_shape((300, 400, 500), "uint16", overlap=8, memory=100 * MiB)
    assert len(set(plan.shape)) == 1
    assert plan.shape[0] < 300


def test_plan_clipped_axis_lets_others_grow_by_hand():
    # z is clipped to its extent of 10; y and x grow to the largest s with 10 s^2 <= 1e6.
    plan = plan_tile_shape((10, 100_000, 100_000), "uint8", bytes_per_voxel=1, memory=10**6)
    assert plan.shape == (10, 316, 316)  # 10 * 316^2 = 998560, 10 * 317^2 > 1e6
    cubic = plan_tile_shape((5000, 100_000, 100_000), "uint8", bytes_per_voxel=1, memory=10**6)
    assert cubic.shape == (100, 100, 100)
    assert "clipped to the image extent on axes (0,)" in plan.reason


def test_plan_whole_image_when_it_fits():
    plan = plan_tile_shape((40, 300, 200), "uint16", overlap=10, memory=GiB)
    assert plan.shape == (40, 300, 200)
    assert plan.padded_shape == (40, 300, 200)
    assert "whole image" in plan.reason


def test_plan_reason_names_budget_and_cost():
    plan = plan_tile_shape((10_000, 10_000), "uint8", bytes_per_voxel=3, memory=3 * MiB)
    assert "3.0 MiB budget" in plan.reason
    assert "3.0 B/voxel" in plan.reason
    assert "memory=3.0 MiB given" in plan.reason


def test_plan_explicit_safety_scales_given_memory():
    plan = plan_tile_shape((10_000,), "uint8", bytes_per_voxel=1, memory=1000, safety=0.5)
    assert plan.budget_bytes == 500
    assert plan.shape == (500,)
    assert "50% of memory=" in plan.reason


# -- chunk rounding --------------------------------------------------------------------------


def test_chunk_rounding_applied_when_cheap():
    # Unrounded 1100 x 1100; 1024 x 1024 keeps 87% of the volume, so it is rounded.
    kwargs = dict(bytes_per_voxel=1, memory=1100**2)
    assert auto_tile_shape((10_000, 10_000), "uint8", **kwargs) == (1100, 1100)
    plan = plan_tile_shape((10_000, 10_000), "uint8", chunks=(256, 256), **kwargs)
    assert plan.shape == (1024, 1024)
    assert "rounded down" in plan.reason and "(256, 256)" in plan.reason


def test_chunk_rounding_stops_before_losing_a_quarter():
    # 600 -> 512 on both axes keeps only 73%: one axis is rounded (85%), the other is not.
    plan = plan_tile_shape(
        (10_000, 10_000), "uint8", bytes_per_voxel=1, memory=600**2, chunks=(512, 512)
    )
    assert plan.shape == (512, 600)
    assert "left off the chunk grid" in plan.reason


def test_chunk_rounding_never_below_one_chunk():
    plan = plan_tile_shape(
        (10_000, 10_000), "uint8", bytes_per_voxel=1, memory=600**2, chunks=(1024, 1024)
    )
    assert plan.shape == (600, 600)


def test_chunk_rounding_keeps_edges_at_the_extent():
    # Unrounded (700, 1100): axis 0 is the whole extent and stays, axis 1 goes to 1024.
    plan = plan_tile_shape(
        (700, 10_000), "uint8", bytes_per_voxel=1, memory=700 * 1100, chunks=(512, 512)
    )
    assert plan.shape == (700, 1024)


def test_chunk_rounding_leaves_z_1_alone():
    plan = plan_tile_shape(
        (50, 10_000, 10_000),
        "uint8",
        bytes_per_voxel=1,
        memory=1100**2,
        chunks=(16, 256, 256),
        spatial_ndim=2,
    )
    assert plan.shape == (1, 1024, 1024)


def test_chunks_of_wrong_length_rejected():
    with pytest.raises(InputError, match="chunks"):
        plan_tile_shape((100, 100), "uint8", memory=MiB, chunks=(10,))


# -- nothing fits ----------------------------------------------------------------------------


def test_tile_size_error_when_smallest_tile_does_not_fit():
    # Smallest tile: core 8 per axis, halo clipped to 7: padded 22^3 voxels at 1000 bytes.
    needed = 22**3 * 1000
    with pytest.raises(TileSizeError) as info:
        plan_tile_shape((1000,) * 3, "uint8", overlap=10, bytes_per_voxel=1000, memory=MiB)
    message = str(info.value)
    assert f"needs {format_bytes(needed)}" in message
    assert f"{format_bytes(MiB)} available" in message
    assert "(8, 8, 8)" in message and "(22, 22, 22)" in message


def test_tile_size_error_smallest_tile_of_a_tiny_image_is_the_image():
    with pytest.raises(TileSizeError, match=r"\(4, 5\)"):
        plan_tile_shape((4, 5), "uint8", bytes_per_voxel=1000, memory=100)


def test_tile_size_error_names_fixed_model_memory():
    with pytest.raises(TileSizeError, match=r"of which 2\.0 GiB fixed"):
        plan_tile_shape((1000, 1000), "uint16", memory=GiB, memory_model=CELLPOSE_MEMORY_MODEL)


def test_tile_size_error_names_probed_pool(monkeypatch):
    fake_probe(monkeypatch, "_probe_ram", MemoryProbe(2 * GiB, 4 * GiB, "cpu", "psutil"))
    with pytest.raises(TileSizeError) as info:
        plan_tile_shape((1000, 1000), "uint16", memory_model=CELLPOSE_MEMORY_MODEL)
    assert "1.0 GiB available (50% of 2.0 GiB free RAM)" in str(info.value)
    assert isinstance(info.value, BlockbusterError)


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(overlap=(1, 2, 3)), "overlap"),
        (dict(overlap=-1), "overlap"),
        (dict(memory=0), "memory"),
        (dict(memory=-5), "memory"),
        (dict(memory=float("nan")), "memory"),
        (dict(memory="4GiB"), "memory"),
        (dict(memory=MiB, safety=0), "safety"),
        (dict(memory=MiB, safety=1.5), "safety"),
        (dict(spatial_ndim=0), "spatial_ndim"),
        (dict(spatial_ndim="2"), "spatial_ndim"),
        (dict(channels=0), "channels"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, match):
    kwargs.setdefault("memory", MiB)
    with pytest.raises(InputError, match=match):
        plan_tile_shape((100, 100), "uint8", **kwargs)


@pytest.mark.parametrize(("shape", "dtype"), [((0, 100), "uint8"), ((100, 100), "not-a-dtype")])
def test_plan_rejects_bad_shape_or_dtype(shape, dtype):
    with pytest.raises(InputError):
        plan_tile_shape(shape, dtype, memory=MiB)


# -- probes: RAM -----------------------------------------------------------------------------


def test_real_ram_probe():
    import psutil

    probe = available_memory()
    assert probe.device == "cpu" and not probe.is_gpu
    assert probe.source in ("psutil", "psutil+cgroup")
    assert 0 < probe.available_bytes <= probe.total_bytes <= psutil.virtual_memory().total


def test_ram_budget_defaults_to_half_of_available(monkeypatch):
    fake_probe(monkeypatch, "_probe_ram", MemoryProbe(10**6, 10**7, "cpu", "psutil"))
    plan = plan_tile_shape((10_000, 10_000), "uint8", bytes_per_voxel=1)
    assert plan.budget_bytes == 500_000
    assert plan.available_bytes == 10**6
    assert plan.shape == (707, 707)  # 707^2 = 499849 <= 5e5 < 708^2
    assert "50% of 976.6 KiB free RAM" in plan.reason


def test_ram_probe_uses_cgroup_headroom(monkeypatch):
    monkeypatch.setattr(sizing, "_cgroup_memory", lambda: (100 * MiB, 200 * MiB))
    probe = sizing._probe_ram()
    assert probe.available_bytes == 100 * MiB  # this machine has far more free RAM than that
    assert probe.total_bytes == 200 * MiB
    assert probe.source == "psutil+cgroup"


def test_ram_probe_ignores_a_looser_cgroup(monkeypatch):
    monkeypatch.setattr(sizing, "_cgroup_memory", lambda: (2**50, 2**50))
    assert sizing._probe_ram().source == "psutil"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_on_parent(tmp_path):
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "0::/job/step\n")
    root = tmp_path / "cg"
    _write(root / "job" / "memory.max", f"{4 * GiB}\n")
    _write(root / "job" / "memory.current", f"{GiB}\n")
    _write(root / "job" / "memory.stat", f"anon 5\ninactive_file {256 * MiB}\nfile 7\n")
    _write(root / "job" / "step" / "memory.max", "max\n")
    _write(root / "job" / "step" / "memory.current", "123\n")
    assert sizing._cgroup_memory(root, proc) == (4 * GiB - GiB + 256 * MiB, 4 * GiB)


def test_cgroup_v1_tightest_level_wins(tmp_path):
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "9:cpu,cpuacct:/x\n4:memory:/slurm/job1\n0::/\n")
    mem = tmp_path / "cg" / "memory"
    _write(mem / "memory.limit_in_bytes", "9223372036854771712\n")  # the root: no limit
    _write(mem / "memory.usage_in_bytes", "1000\n")
    _write(mem / "slurm" / "memory.limit_in_bytes", f"{8 * GiB}\n")
    _write(mem / "slurm" / "memory.usage_in_bytes", f"{GiB}\n")
    _write(mem / "slurm" / "job1" / "memory.limit_in_bytes", f"{2 * GiB}\n")
    _write(mem / "slurm" / "job1" / "memory.usage_in_bytes", f"{512 * MiB}\n")
    _write(mem / "slurm" / "job1" / "memory.stat", "total_inactive_file 0\n")
    assert sizing._cgroup_memory(tmp_path / "cg", proc) == (2 * GiB - 512 * MiB, 2 * GiB)


def test_cgroup_namespaced_path_falls_back_to_root(tmp_path):
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "0::/not/visible/here\n")
    root = tmp_path / "cg"
    _write(root / "memory.max", f"{GiB}\n")
    _write(root / "memory.current", f"{GiB // 4}\n")
    assert sizing._cgroup_memory(root, proc) == (GiB - GiB // 4, GiB)


def test_cgroup_without_limit_or_files(tmp_path):
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "0::/\n")
    root = tmp_path / "cg"
    _write(root / "memory.max", "max\n")
    _write(root / "memory.current", "5\n")
    assert sizing._cgroup_memory(root, proc) is None
    assert sizing._cgroup_memory(root, tmp_path / "missing") is None


# -- probes: GPU -----------------------------------------------------------------------------


def test_no_gpu_error_from_real_probe():
    try:
        probe = available_memory(use_gpu=True)
    except NoGPUError as exc:
        message = str(exc)
    else:
        pytest.skip(f"a GPU is present here: {probe}")
    assert "use_gpu=True" in message
    assert "torch" in message and "NVML" in message
    assert "GPU node" in message


def test_no_gpu_error_explains_each_probe(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", "torch installed but is_available() is False")
    fake_probe(monkeypatch, "_probe_nvml", "nvidia-ml-py not installed")
    with pytest.raises(NoGPUError) as info:
        available_memory(use_gpu=True)
    message = str(info.value)
    assert "torch: torch installed but is_available() is False" in message
    assert "NVML: nvidia-ml-py not installed" in message
    assert "drop use_gpu=True" in message


def test_no_gpu_error_from_plan(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", "torch not installed")
    fake_probe(monkeypatch, "_probe_nvml", "nvidia-ml-py not installed")
    with pytest.raises(NoGPUError):
        plan_tile_shape((100, 100), "uint8", use_gpu=True)


def test_gpu_budget_defaults_to_80_percent(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", MemoryProbe(10**6, 10**9, "cuda:0", "torch"))
    plan = plan_tile_shape((10_000, 10_000), "uint8", bytes_per_voxel=1, use_gpu=True)
    assert plan.budget_bytes == 800_000
    assert plan.device == "cuda:0"
    assert plan.shape == (894, 894)  # 894^2 = 799236 <= 8e5 < 895^2
    assert "80% of" in plan.reason and "cuda:0" in plan.reason


def test_gpu_falls_back_to_nvml(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", "torch not installed")
    fake_probe(monkeypatch, "_probe_nvml", MemoryProbe(5 * GiB, 8 * GiB, "GPU 0", "nvml"))
    assert available_memory(use_gpu=True) == MemoryProbe(5 * GiB, 8 * GiB, "GPU 0", "nvml")


def test_given_memory_skips_the_probes(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", "must not be called")
    fake_probe(monkeypatch, "_probe_nvml", "must not be called")
    plan = plan_tile_shape((100, 100), "uint8", memory=GiB, use_gpu=True)
    assert plan.device == "gpu"
    assert plan.budget_bytes == GiB


def _fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _fake_torch(available: bool) -> types.ModuleType:
    cuda = types.SimpleNamespace(
        is_available=lambda: available,
        current_device=lambda: 1,
        mem_get_info=lambda device: (3 * GiB, 8 * GiB) if device == 1 else (0, 0),
        memory_reserved=lambda device: GiB,
        memory_allocated=lambda device: GiB // 4,
    )
    return _fake_module("torch", cuda=cuda)


def _fake_pynvml(calls: list, fail_init: bool = False) -> types.ModuleType:
    class NVMLError(Exception):
        pass

    def init():
        calls.append("init")
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    return _fake_module(
        "pynvml",
        NVMLError=NVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda index: calls.append(("handle", index)) or index,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(
            free=(handle + 1) * GiB, total=16 * GiB, used=0
        ),
    )


def test_torch_probe_reads_free_plus_cached_memory(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(available=True))
    probe = available_memory(use_gpu=True)
    # 3 GiB free on the device + 0.75 GiB held by torch's cache but unused.
    assert probe == MemoryProbe(3 * GiB + 3 * GiB // 4, 8 * GiB, "cuda:1", "torch")


def test_cpu_only_torch_then_nvml(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(available=False))
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    probe = available_memory(use_gpu=True)
    assert probe == MemoryProbe(3 * GiB, 16 * GiB, "GPU 2", "nvml")
    assert calls == ["init", ("handle", 2), "shutdown"]


def test_cpu_only_torch_without_nvml_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(available=False))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import system: "not installed"
    with pytest.raises(NoGPUError) as info:
        available_memory(use_gpu=True)
    message = str(info.value)
    assert "torch.cuda.is_available() is False (CPU-only build" in message
    assert "nvidia-ml-py not installed" in message


def test_nvml_without_driver(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls, fail_init=True))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(NoGPUError) as info:
        available_memory(use_gpu=True)
    assert "torch: torch not installed" in str(info.value)
    assert "NVML failed to start (Driver Not Loaded)" in str(info.value)


def test_nvml_respects_hidden_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NoGPUError, match="hides every GPU"):
        available_memory(use_gpu=True)


# -- Cellpose --------------------------------------------------------------------------------


def test_cellpose_default_model():
    assert CELLPOSE_MEMORY_MODEL.bytes_per_input_byte == 20
    assert CELLPOSE_MEMORY_MODEL.fixed_bytes == 2 * GiB
    assert CELLPOSE_MEMORY_MODEL.scale == 1


@pytest.mark.parametrize(
    ("tile", "dtype", "diameter", "ndim", "overlap", "expected"),
    [
        # 2-D, d=15: scale (30/15)^2 = 4; 20 x 2 bytes x 4 = 160, + engine 24 + input 2 = 186;
        # 512^2 = 262144 voxels x 186 = 48758784, + 2 GiB (2147483648).
        ((512, 512), "uint16", 15, 2, 0, 2_196_242_432),
        # 2-D, d=30 (no rescale), float32, halo 30: 1060^2 = 1123600 voxels x (80 + 24 + 4).
        ((1000, 1000), "float32", 30, 2, 30, 1_123_600 * 108 + 2_147_483_648),
        # 3-D, d=60: scale (1/2)^3 = 0.125; 20 x 1 x 0.125 = 2.5, + 24 + 1 = 27.5 per voxel;
        # 64^3 = 262144 voxels x 27.5 = 7208960, + 2 GiB.
        ((64, 64, 64), "uint8", 60, 3, 0, 2_154_692_608),
        # 3-D, d=15: scale 2^3 = 8; 20 x 2 x 8 = 320, + 26 = 346; 32768 x 346 = 11337728.
        ((32, 32, 32), "uint16", 15, 3, 0, 2_158_821_376),
        # 2-D z=1 tile of a stack, d=10: scale 9; 20 x 2 x 9 = 360 + 26 = 386; no halo in z.
        ((1, 100, 100), "uint16", 10, 2, 10, 120 * 120 * 386 + 2 * GiB),
    ],
)
def test_cellpose_formula_by_hand(tile, dtype, diameter, ndim, overlap, expected):
    model = cellpose_memory_model(diameter, ndim)
    assert predict_peak_bytes(tile, dtype, overlap=overlap, memory_model=model) == expected


@pytest.mark.parametrize("diameter", [7.5, 12, 17, 30, 45, 100])
@pytest.mark.parametrize("ndim", [2, 3])
def test_cellpose_scale_follows_diameter(diameter, ndim):
    model = cellpose_memory_model(diameter, ndim)
    assert model.scale == pytest.approx((30 / diameter) ** ndim)
    # uint16: 20 x 2 bytes per voxel before rescaling.
    assert model.per_voxel_bytes(2) == pytest.approx(40 * (30 / diameter) ** ndim)


def test_auto_tile_shape_cellpose_as_partial_by_hand():
    # Budget: 2 GiB model + room for (s + 60)^2 voxels x 66 bytes with s = 1000 (d=30, uint16,
    # overlap defaults to the diameter).
    room = 66 * 1060**2
    tile_fn = functools.partial(auto_tile_shape_cellpose, diameter=30, memory=2 * GiB + room)
    assert tile_fn((10_000, 10_000), "uint16") == (1000, 1000)
    assert tile_fn((25, 10_000, 10_000), "uint16") == (1, 1000, 1000)  # 2-D Cellpose: z = 1
    # d=15 costs 20 x 2 x 4 + 26 = 186 bytes per voxel with a halo of 15: (s + 30)^2 x 186.
    smaller = auto_tile_shape_cellpose(
        (10_000, 10_000), "uint16", diameter=15, memory=2 * GiB + room
    )
    assert smaller == (math.isqrt(room // 186) - 30,) * 2


def test_auto_tile_shape_cellpose_default_overlap_is_diameter_rounded_up():
    # d=17.5 -> halo 18; uint8 costs 20 x 1 x (30/17.5)^2 + 24 + 1 bytes per voxel; 3 GiB
    # minus the 2 GiB model leaves 1 GiB for (s + 36)^2 voxels.
    per_voxel = 20 * (30 / 17.5) ** 2 + 25
    shape = auto_tile_shape_cellpose((10_000, 10_000), "uint8", diameter=17.5, memory=3 * GiB)
    edge = shape[0]
    assert (edge + 36) ** 2 * per_voxel <= GiB < (edge + 37) ** 2 * per_voxel


def test_auto_tile_shape_cellpose_gpu_partial(monkeypatch):
    fake_probe(monkeypatch, "_probe_torch", MemoryProbe(10 * GiB, 12 * GiB, "cuda:0", "torch"))
    tile_fn = functools.partial(auto_tile_shape_cellpose, diameter=30, use_gpu=True)
    shape = (60, 20_000, 20_000)
    tile = tile_fn(shape, np.uint16)
    assert tile[0] == 1 and tile[1] == tile[2] < 20_000

    def peak(tile):
        model = CELLPOSE_MEMORY_MODEL
        return predict_peak_bytes(tile, "uint16", overlap=30, memory_model=model, image_shape=shape)

    assert peak(tile) <= 0.8 * 10 * GiB < peak((1, tile[1] + 1, tile[2] + 1))


def test_auto_tile_shape_cellpose_3d():
    room = 45 * 1000**3  # uint8, d=30: 20 + 24 + 1 = 45 bytes per voxel
    tile = auto_tile_shape_cellpose(
        (5000,) * 3, "uint8", diameter=30, do_3D=True, overlap=20, memory=2 * GiB + room
    )
    assert tile == (960, 960, 960)  # (960 + 40)^3 = 1e9 voxels


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(shape=(100, 100), do_3D=True), "do_3D"),
        (dict(shape=(100, 100), diameter=0), "diameter"),
        (dict(shape=(100, 100), diameter=-3), "diameter"),
        (dict(shape=(100, 100), diameter=float("nan")), "diameter"),
        (dict(shape=(100, 100), diameter="30"), "diameter"),
    ],
)
def test_auto_tile_shape_cellpose_bad_input(kwargs, match):
    shape = kwargs.pop("shape")
    with pytest.raises(InputError, match=match):
        auto_tile_shape_cellpose(shape, "uint16", memory=8 * GiB, **kwargs)


# -- validate_tile_shape ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile", "expected"),
    [
        ((1, 512, 512), (1, 512, 512)),
        ([1, None, 5000], (1, 2048, 2048)),
        ((-1, np.int64(256), 300), (30, 256, 300)),
        (np.array([4, 8, 16]), (4, 8, 16)),
    ],
)
def test_validate_tile_shape_accepts(tile, expected):
    assert validate_tile_shape(tile, (30, 2048, 2048)) == expected


@pytest.mark.parametrize(
    ("tile", "match"),
    [
        ((512, 512), "expected 3 sizes"),
        ((1, 512, 512, 512), "expected 3 sizes"),
        ((0, 512, 512), "size 0 on axis 0 must be positive"),
        ((1, -2, 512), "size -2 on axis 1 must be positive"),
        ((1, 512.0, 512), "512.0 on axis 1 is not an int"),
        ((1, True, 512), "on axis 1 is not an int"),
        ("auto", "expected a tuple of 3 ints"),
        (512, "expected a tuple of 3 ints"),
    ],
)
def test_validate_tile_shape_rejects_fixed(tile, match):
    with pytest.raises(InputError, match=match) as info:
        validate_tile_shape(tile, (30, 2048, 2048))
    assert str(info.value).startswith(f"tile_shape={tile!r}")
    assert not isinstance(info.value, TileSizeError)


def test_validate_tile_shape_names_custom_source():
    with pytest.raises(InputError, match=r"^--tile-shape=\(0, 5\)"):
        validate_tile_shape((0, 5), (10, 10), source="--tile-shape")


def test_validate_tile_shape_names_the_callable():
    def bad_tile_fn(shape, dtype, edge):
        return (edge, 512)

    tile_fn = functools.partial(bad_tile_fn, edge=0)
    with pytest.raises(TileSizeError) as info:
        validate_tile_shape(tile_fn((512, 512), "uint8"), (512, 512), source=tile_fn)
    message = str(info.value)
    assert message.startswith("tile_shape callable functools.partial(")
    assert "bad_tile_fn" in message and "edge=0" in message
    assert "returned (0, 512)" in message and "must be positive" in message
    assert isinstance(info.value, ValueError)


def test_validate_tile_shape_callable_named_by_string():
    with pytest.raises(TileSizeError, match=r"^tile_shape callable my_fn returned \(1, 2\): "):
        validate_tile_shape((1, 2), (10, 10, 10), source="tile_shape callable my_fn")


def test_validate_tile_shape_callable_wrong_axes():
    tile_fn = functools.partial(auto_tile_shape_cellpose, diameter=30, memory=4 * GiB)
    result = tile_fn((4000, 4000), "uint16")  # a 2-D answer for a 3-D image
    with pytest.raises(TileSizeError, match=r"auto_tile_shape_cellpose.*expected 3 sizes"):
        validate_tile_shape(result, (10, 4000, 4000), source=tile_fn)


# -- property: fits and maximal --------------------------------------------------------------


@st.composite
def sizing_problems(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 3000), min_size=ndim, max_size=ndim)))
    overlap = draw(st.integers(0, 40) | st.tuples(*[st.integers(0, 40)] * ndim))
    spatial_ndim = draw(st.sampled_from([None, 1, 2]))
    chunks = draw(st.none() | st.tuples(*[st.integers(1, 700)] * ndim))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(["uint8", "uint16", "float32"])),
        overlap=overlap,
        bytes_per_voxel=draw(st.floats(0.5, 200)),
        fixed_bytes=draw(st.integers(0, 10**6)),
        memory=draw(st.integers(10**3, 10**10)),
        spatial_ndim=spatial_ndim,
        chunks=chunks,
    )


@settings(max_examples=200, deadline=None)
@given(sizing_problems())
def test_property_fits_and_is_maximal(problem):
    shape, chunks = problem["shape"], problem.pop("chunks")
    sized = sized_axes(len(shape), problem["spatial_ndim"])
    memory = problem["memory"]
    keys = ("overlap", "bytes_per_voxel", "fixed_bytes")

    def peak(tile):
        kwargs = {k: problem[k] for k in keys}
        return predict_peak_bytes(tile, problem["dtype"], image_shape=shape, **kwargs)

    smallest = tuple(min(8, e) if s else 1 for e, s in zip(shape, sized, strict=True))
    if peak(smallest) > memory:
        with pytest.raises(TileSizeError, match="needs"):
            plan_tile_shape(**problem)
        return

    plan = plan_tile_shape(**problem)
    tile = plan.shape
    assert plan.predicted_peak_bytes == peak(tile) <= memory
    assert all(1 <= t <= e for t, e in zip(tile, shape, strict=True))
    assert all(t == 1 for t, s in zip(tile, sized, strict=True) if not s)
    # Isotropic: every sized edge below its extent is the same edge.
    assert len({t for t, e, s in zip(tile, shape, sized, strict=True) if s and t < e}) <= 1
    bigger = grown(tile, shape, sized)
    assert bigger == tile or peak(bigger) > memory

    if chunks is not None:
        rounded = plan_tile_shape(**problem, chunks=chunks).shape
        assert peak(rounded) <= memory
        assert math.prod(rounded) >= 0.75 * math.prod(tile)
        for r, t, c, e in zip(rounded, tile, chunks, shape, strict=True):
            # Either untouched, or rounded down to a whole number (>= 1) of chunks.
            assert r == t or (r < t < e and r % c == 0)
