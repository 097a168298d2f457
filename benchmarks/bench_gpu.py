"""GPU: how busy blockbuster keeps the segmenter's GPU, and its speed against the whole image.

Cellpose 3 (the model ``train_models.py cellpose3`` trains, or ``--model``) on a mosaic of the
real nuclei image that ships in the stardist wheel, ``--side`` pixels square, written to a zarr
array: once on the whole image in memory (one call of the same segmenter), once tiled by
``tile_process`` (the in-process executor: a reader thread and a store thread around fn, so that
the GPU should not wait for reading and writing). While each runs, a thread samples NVML's GPU
utilisation (the share of its last sample period in which a kernel ran) every 50 ms; the busy
fraction is their mean over the run. Targets (issue 18): busy >= 90 % over the tiled run, and
the tiled run's pixels per second close to the whole image's.

Needs an NVIDIA GPU, torch with CUDA, ``nvidia-ml-py`` (the ``gpu`` extra) and Cellpose 3 (an
overlay folder, ``--cellpose3-overlay``); without a GPU it says so and exits with status 2.
``--device cpu`` runs the same on the CPU, without a busy figure: a check of the script on a
machine that has no GPU.

Run: ``python benchmarks/bench_gpu.py [--quick] [--side 8192] [--tile 2048] [--device cpu]``
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import OUT, Timer, command_line, format_table, parse_args, report, verdict

DEFAULT_OVERLAY = Path("/work/venv/cellpose3-overlay")
#: Cellpose settings of the trained model (train_models.EVAL["cellpose3"]).
EVAL = {"diameter": 20.0, "flow_threshold": 0.0}
BUSY_TARGET = 0.90
SAMPLE_S = 0.05


class UtilisationSampler:
    """Samples a utilisation reading (0-100) on a thread while a block runs.

    >>> import time
    >>> readings = iter([100, 100, 0, 100])
    >>> with UtilisationSampler(lambda: next(readings, 100), period=0.001) as s:
    ...     time.sleep(0.05)
    >>> 0.5 <= s.busy_fraction <= 1.0 and len(s.samples) >= 4
    True
    """

    def __init__(self, read: Callable[[], float], period: float = SAMPLE_S):
        self.read = read
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(float(self.read()))
            self._stop.wait(self.period)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def busy_fraction(self) -> float:
        """The mean reading over the block, as a fraction (NaN without samples)."""
        return float(np.mean(self.samples)) / 100 if self.samples else float("nan")


def nvml_reader(index: int = 0) -> Callable[[], float]:
    """GPU ``index``'s utilisation in percent, read through NVML."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def no_gpu_reason() -> str | None:
    """Why the GPU run cannot happen here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "nvidia-ml-py is not installed (pip install blockbuster[gpu])"
    return None


def mosaic(side: int) -> np.ndarray:
    """The real 2-D nuclei image of the stardist wheel, tiled (mirrored) to ``side`` square."""
    from _fidelity import load_pair

    img, _ = load_pair(2)
    reps = [-(-side // n) for n in img.shape]
    flips = [[img, img[:, ::-1]], [img[::-1], img[::-1, ::-1]]]
    block = np.block(flips)  # mirrored copies: no step in brightness at the joins
    return np.tile(block, [-(-r // 2) for r in reps])[:side, :side]


def model_path(given: str | None) -> str:
    if given:
        return given
    from train_models import read_manifest

    manifest = read_manifest("cellpose3")
    if manifest is None:
        raise SystemExit("no trained Cellpose 3 model: run benchmarks/train_models.py cellpose3 "
                         "(or pass --model)")
    return str(manifest["model_path"])


def measure(args: Any) -> list[dict[str, Any]]:
    import zarr

    from blockbuster import tile_process
    from blockbuster.io import open_image
    from blockbuster.plugins.cellpose import cellpose_fn

    gpu = args.device == "cuda"
    torch: Any = None
    if gpu:
        import torch
    side, tile = (1024, 512) if args.quick else (args.side, args.tile)
    image = mosaic(side)
    path = OUT / "data" / f"gpu_mosaic_{side}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = zarr.create_array(store=str(path), shape=image.shape, chunks=(tile, tile),
                               dtype=image.dtype, overwrite=True)
    stored[:] = image
    seg = cellpose_fn(model_path(args.model), gpu=gpu, **EVAL)
    seg(image[:256, :256])  # the model and the device context loaded before any timer
    read = nvml_reader() if gpu else (lambda: float("nan"))
    rows = []
    for mode in ("whole image", "tiled"):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with UtilisationSampler(read) as sampler, Timer() as t:
            if mode == "whole image":
                seg.prepare(open_image(stored))
                labels = seg(image)
                n_tiles = 1
            else:
                out = tile_process(stored, seg, tile_shape=(tile, tile),
                                   output=OUT / "gpu_out.zarr", overwrite=True, progress=False)
                labels = np.asarray(out)
                n_tiles = (-(-side // tile)) ** 2
        rows.append({"mode": mode, "side": side, "tile": "-" if n_tiles == 1 else tile,
                     "tiles": n_tiles, "seconds": t.seconds,
                     "mpx_per_s": side * side / t.seconds / 1e6,
                     "tiles_per_s": n_tiles / t.seconds,
                     "busy_pct": 100 * sampler.busy_fraction if gpu else "-",
                     "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else "-",
                     "objects": int(labels.max())})
        print(f"{mode}: {t.seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    def extra(parser: Any) -> None:
        parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        parser.add_argument("--side", type=int, default=8192, help="image side, pixels")
        parser.add_argument("--tile", type=int, default=2048, help="tile side, pixels")
        parser.add_argument("--model", help="a Cellpose 3 model file (default: the trained one)")
        parser.add_argument("--cellpose3-overlay", type=Path, default=DEFAULT_OVERLAY,
                            help="folder holding Cellpose 3, put first on the import path")

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.device == "cuda" and (reason := no_gpu_reason()) is not None:
        print(f"bench_gpu: no GPU to measure: {reason}. Nothing was measured (--device cpu runs "
              "the same on the CPU, without the busy figure).", file=sys.stderr)
        raise SystemExit(2)
    if args.cellpose3_overlay.is_dir():
        sys.path.insert(0, str(args.cellpose3_overlay))
    rows = measure(args)
    whole, tiled = rows
    table = format_table(rows, [
        ("mode", "run"), ("side", "image side"), ("tile", "tile"), ("tiles", "tiles"),
        ("seconds", "wall s"), ("mpx_per_s", "Mpx/s"), ("tiles_per_s", "tiles/s"),
        ("busy_pct", "GPU busy %"), ("gpu_peak_mib", "GPU peak MiB"), ("objects", "objects")])
    verdicts = [f"tiled / whole-image throughput = {whole['seconds'] / tiled['seconds']:.3f} "
                f"(device {args.device})"]
    if args.device == "cuda":
        verdicts.insert(0, verdict("GPU busy over the tiled run, %", tiled["busy_pct"], ">=",
                                   100 * BUSY_TARGET, ".1f"))
    options = [*(["--device", args.device] if args.device != "cuda" else []),
               *([] if args.quick else ["--side", str(args.side), "--tile", str(args.tile)])]
    # a CPU check is not a GPU figure: its own name, which collect.py does not copy
    name = "bench_gpu" if args.device == "cuda" else "bench_gpu_cpu"
    report(name, "GPU busy fraction and throughput", {"": table}, verdicts,
           {"rows": rows}, command_line(__file__, args.quick, *options))


if __name__ == "__main__":
    main()
