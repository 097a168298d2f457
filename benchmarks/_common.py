"""Shared plumbing for the benchmark scripts (not part of the package, not a test).

Every benchmark measures each variant in a fresh child process (the script re-runs itself with
``--child``), so that peak memory is the child's own. Peak RSS is read from ``VmHWM`` in
``/proc/self/status``: unlike ``resource.getrusage(...).ru_maxrss``, which a child inherits
from the parent it was forked from, ``VmHWM`` belongs to the child's own address space, and it
can be reset (``/proc/self/clear_refs``) to measure one phase alone.

Synthetic images are generated chunk by chunk from formulas of the global coordinates, so that
an image of any size is written with bounded memory and is seamless across chunks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DATA = OUT / "data"
MiB = 1024**2
GiB = 1024**3


# -- memory -------------------------------------------------------------------------------------
def _status_field(name: str) -> int:
    """A ``/proc/self/status`` field in bytes (the kernel reports kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not found in /proc/self/status (Linux only)")


def peak_rss() -> int:
    """Peak resident memory of this process (bytes) since start or the last reset."""
    return _status_field("VmHWM")


def current_rss() -> int:
    """Resident memory of this process now (bytes)."""
    return _status_field("VmRSS")


def reset_peak_rss() -> None:
    """Reset the peak to the current RSS, to measure the peak of what follows alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- child processes ----------------------------------------------------------------------------
def run_child(script: str | Path, variant: str, params: dict[str, Any], *,
              timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --child variant params`` in a fresh interpreter; return its JSON result.

    The child prints one JSON object as its last line of stdout. Its stderr is passed through,
    so warnings and tracebacks stay visible.
    """
    cmd = [sys.executable, str(script), "--child", variant, json.dumps(params)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {variant} {params} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """If this process was started by :func:`run_child`, run the variant and return True."""
    if len(sys.argv) < 2 or sys.argv[1] != "--child":
        return False
    variant, params = sys.argv[2], json.loads(sys.argv[3])
    result = handlers[variant](params)
    result.setdefault("peak_rss", peak_rss())
    print(json.dumps(result, default=_jsonable))
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def parse_args(description: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
    """The options every benchmark takes (``extra`` may add its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, finishes in under a minute (smoke test)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# -- reporting ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import dask
    import scipy
    import zarr

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem / GiB, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "blockbuster_commit": commit + ("+uncommitted src changes" if dirty else ""),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are ``(key, header)`` pairs; floats get 3 significant
    digits."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "**no**"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def report(name: str, title: str, tables: dict[str, str], verdicts: Sequence[str],
           data: dict[str, Any], command: str) -> None:
    """Print the tables and verdicts; save them (Markdown + JSON) under ``benchmarks/out``."""
    OUT.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    lines = [f"## {title}", "", f"Command: `{command}`", "",
             f"Measured {info['date']} on {info['cpus']} x {info['cpu']}, {info['ram_gib']} GiB "
             f"RAM; blockbuster {info['blockbuster_commit']}, Python {info['python']}, "
             f"NumPy {info['numpy']}, SciPy {info['scipy']}, zarr {info['zarr']}, "
             f"dask {info['dask']}.", ""]
    for caption, table in tables.items():
        if caption:
            lines += [caption, ""]
        lines += [table, ""]
    lines += [f"- {v}" for v in verdicts]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (OUT / f"{name}.md").write_text(text)
    payload = {"machine": info, "command": command, "results": data, "verdicts": list(verdicts)}
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable))


def verdict(label: str, value: float, op: str, target: float, fmt: str = ".3g") -> str:
    """A one-line met/missed statement for a target."""
    ok = value <= target if op == "<=" else value >= target
    return f"{'MET' if ok else 'MISSED'}: {label} = {value:{fmt}} (target {op} {target:{fmt}})"


def command_line(script: str, quick: bool, *extra: str) -> str:
    return " ".join([f"python benchmarks/{Path(script).name}", *(["--quick"] if quick else []),
                     *extra])


def plot_path(name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT / f"{name}.png"


# -- synthetic images ---------------------------------------------------------------------------
def regions(shape: Sequence[int], step: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Blocks of ``step`` (clipped at the border) that cover ``shape``, in C order."""
    starts = [range(0, s, c) for s, c in zip(shape, step, strict=True)]
    for corner in np.ndindex(*[len(r) for r in starts]):
        yield tuple(slice(starts[a][i], min(starts[a][i] + step[a], shape[a]))
                    for a, i in enumerate(corner))


def _hash01(*ints: np.ndarray, seed: int = 0) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) per integer coordinate tuple."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        for k, v in enumerate(ints):
            h = h ^ (np.asarray(v, dtype=np.uint64) + np.uint64(0x632BE59BD9B4E019 + k))
            h = h * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(29))
            h = h * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(32))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


#: Nuclei repeat with this period (in lattice cells), so a block is a slice of one canvas.
NUCLEI_PERIOD_CELLS = 50
_CANVAS: dict[tuple[int, int, int], np.ndarray] = {}


def _nuclei_direct(region: tuple[slice, ...], spacing: int, seed: int) -> np.ndarray:
    """Render nuclei on a block from the global coordinates (see :func:`nuclei_block`)."""
    ys = np.arange(region[0].start, region[0].stop)
    xs = np.arange(region[1].start, region[1].stop)
    cy, cx = ys // spacing, xs // spacing
    # per-cell parameters, computed on the cells this block touches only
    uy, iy = np.unique(cy, return_inverse=True)
    ux, ix = np.unique(cx, return_inverse=True)
    gy, gx = np.meshgrid(uy, ux, indexing="ij")
    ky, kx = gy % NUCLEI_PERIOD_CELLS, gx % NUCLEI_PERIOD_CELLS
    radius = spacing * (0.25 + 0.2 * _hash01(ky, kx, seed=seed))
    room = spacing / 2 - radius
    centre_y = gy * spacing + spacing / 2 + room * (2 * _hash01(ky, kx, seed=seed + 1) - 1)
    centre_x = gx * spacing + spacing / 2 + room * (2 * _hash01(ky, kx, seed=seed + 2) - 1)
    present = _hash01(ky, kx, seed=seed + 3) < 0.8
    bright = np.where(present, 600 + 1400 * _hash01(ky, kx, seed=seed + 4), 100)
    dy = (ys[:, None] - centre_y[iy][:, ix]).astype(np.float32)
    dx = (xs[None, :] - centre_x[iy][:, ix]).astype(np.float32)
    inside = dy * dy + dx * dx < (radius[iy][:, ix] ** 2).astype(np.float32)
    return np.where(inside, bright[iy][:, ix], 100).astype(np.uint16)


def nuclei_block(region: tuple[slice, ...], spacing: int = 40, seed: int = 0) -> np.ndarray:
    """Bright round nuclei on a dim background, uint16, for a block of a 2-D image.

    Nuclei sit on a jittered lattice of ``spacing`` voxels; 80 % of the lattice cells hold one,
    of radius 0.25-0.45 x spacing, with its own brightness. Everything is a function of the
    global coordinates, so blocks written separately join seamlessly; the spacing does not
    divide usual tile sizes, so many nuclei cross tile borders. The pattern repeats every
    ``NUCLEI_PERIOD_CELLS`` cells, so blocks up to 2048 voxels are cut from one cached canvas
    (generating a 16 GB image is then bound by compression, not by drawing).
    """
    period = spacing * NUCLEI_PERIOD_CELLS
    size = [s.stop - s.start for s in region]
    if max(size) > 2048:
        return _nuclei_direct(region, spacing, seed)
    key = (spacing, seed, period)
    if key not in _CANVAS:
        _CANVAS[key] = _nuclei_direct((slice(0, period + 2048),) * 2, spacing, seed)
    y0, x0 = region[0].start % period, region[1].start % period
    return _CANVAS[key][y0:y0 + size[0], x0:x0 + size[1]].copy()


def random_field_block(region: tuple[slice, ...], n_waves: int = 24, wavelength: float = 400.0,
                       seed: int = 0) -> np.ndarray:
    """A smooth random field (sum of separable plane waves) on a block of a 2-D image.

    Thresholded at 0 it gives a maze of connected regions of all sizes, many spanning several
    chunks: the hard case for connected components across chunks.
    """
    rng = np.random.default_rng(seed)
    ys = np.arange(region[0].start, region[0].stop, dtype=np.float64)
    xs = np.arange(region[1].start, region[1].stop, dtype=np.float64)
    out = np.zeros((len(ys), len(xs)), np.float32)
    for _ in range(n_waves):
        fy, fx = rng.normal(size=2) * 2 * np.pi / wavelength
        py, px = rng.uniform(0, 2 * np.pi, size=2)
        # cos(a + b) = cos a cos b - sin a sin b keeps every wave separable: outer products only
        a, b = fy * ys + py, fx * xs + px
        out += np.outer(np.cos(a), np.cos(b)).astype(np.float32)
        out -= np.outer(np.sin(a), np.sin(b)).astype(np.float32)
    return out


def mask_block(region: tuple[slice, ...], seed: int = 0) -> np.ndarray:
    """A binary uint8 mask: a thresholded random field (large mazes) plus small specks."""
    field = random_field_block(region, seed=seed)
    ys = np.arange(region[0].start, region[0].stop)[:, None]
    xs = np.arange(region[1].start, region[1].stop)[None, :]
    specks = _hash01(ys // 3, xs // 3, seed=seed + 7) < 0.04  # 3x3 specks, mostly isolated
    return ((field > 1.5) | specks).astype(np.uint8)


def write_zarr(path: Path, shape: Sequence[int], chunks: Sequence[int], dtype: Any,
               block: Callable[[tuple[slice, ...]], np.ndarray], *,
               write_step: Sequence[int] | None = None, workers: int = 1) -> Path:
    """Write a compressed zarr array block by block; memory stays near one block.

    ``block(region)`` returns the data of one region (cast to ``dtype`` here). A ``.complete``
    marker next to the data lets later runs reuse the image: it records the shape, chunks,
    dtype and the block function's name, which must identify the content.
    """
    import zarr
    from zarr.codecs import BloscCodec

    done = path.with_name(path.name + ".complete")
    spec = json.dumps({"shape": list(shape), "chunks": list(chunks), "dtype": str(dtype),
                       "block": _describe(block)})
    if done.exists() and done.read_text() == spec and path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = zarr.create_array(store=str(path), shape=tuple(shape), chunks=tuple(chunks),
                            dtype=dtype, fill_value=0, overwrite=True,
                            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"))
    step = tuple(write_step or chunks)
    todo = list(regions(shape, step))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            jobs = [(str(path), r, block, str(dtype)) for r in todo]
            list(pool.map(_write_region, jobs, chunksize=4))
    else:
        for r in todo:
            arr[r] = block(r).astype(dtype, copy=False)
    done.write_text(spec)
    return path


def _describe(block: Callable) -> str:
    import functools

    if isinstance(block, functools.partial):
        return f"{_describe(block.func)}{block.args}{sorted(block.keywords.items())}"
    return block.__name__


def _write_region(job: tuple[str, tuple[slice, ...], Callable, str]) -> None:
    import zarr

    path, region, block, dtype = job
    zarr.open_array(store=path, mode="r+")[region] = block(region).astype(dtype, copy=False)


def dir_bytes(path: Path) -> int:
    """Bytes on disk under a directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def same_partition_zarr(a_path: Path, b_path: Path, step: Sequence[int]) -> dict[str, Any]:
    """Compare two label arrays block by block: equal up to renumbering, background identical.

    Streams: only the distinct (a, b) label pairs are kept, never the arrays.
    """
    import zarr

    a, b = zarr.open_array(str(a_path), mode="r"), zarr.open_array(str(b_path), mode="r")
    if a.shape != b.shape:
        return {"same": False, "why": f"shapes {a.shape} vs {b.shape}"}
    pairs = []
    for r in regions(a.shape, step):
        va, vb = a[r].ravel().astype(np.uint64), b[r].ravel().astype(np.uint64)
        if not np.array_equal(va == 0, vb == 0):
            return {"same": False, "why": f"background differs in {r}"}
        keep = va > 0
        pairs.append(np.unique((va[keep] << np.uint64(32)) | vb[keep]))
    allp = np.unique(np.concatenate(pairs)) if pairs else np.empty(0, np.uint64)
    n_a = len(np.unique(allp >> np.uint64(32)))
    n_b = len(np.unique(allp & np.uint64(0xFFFFFFFF)))
    return {"same": len(allp) == n_a == n_b, "n_a": n_a, "n_b": n_b, "pairs": len(allp)}


# -- instrumentation of a tile_process run (benchmark only; the engine is not changed) ---------
class PhaseRecorder:
    """Time and peak RSS of each stage of ``tile_process``: segment (the tiles, stored as they
    come), finish (the end pass: tiles joined late rewritten, the table folded).

    Wraps the stage functions of :mod:`blockbuster.engine.run` in this process. The peak RSS is
    reset at the start of each stage, so each stage's peak is its own; :attr:`overall_peak`
    keeps the maximum over the whole process.
    """

    STAGES: ClassVar[dict[str, str]] = {"segment": "segment_tiles", "finish": "_end_pass"}

    def __init__(self) -> None:
        from blockbuster.engine import run

        self.phases: dict[str, dict[str, float]] = {}
        self._max_before = 0
        for stage, attr in self.STAGES.items():
            setattr(run, attr, self._wrap(stage, getattr(run, attr)))

    def _wrap(self, stage: str, func: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._max_before = max(self._max_before, peak_rss())
            reset_peak_rss()
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.phases[stage] = {"seconds": time.perf_counter() - start,
                                      "peak_rss": peak_rss()}
        return wrapped

    @property
    def overall_peak(self) -> int:
        return max([self._max_before, peak_rss()] + [p["peak_rss"] for p in self.phases.values()])


class RssSampler:
    """Samples this process's RSS in a background thread: ``(seconds, bytes)`` pairs."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - start, current_rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def thinned(self, n: int = 400) -> list[tuple[float, int]]:
        """At most ``n`` samples, keeping the maximum of each stretch (peaks stay visible)."""
        if len(self.samples) <= n:
            return self.samples
        out = []
        for chunk in np.array_split(np.arange(len(self.samples)), n):
            best = max((self.samples[i] for i in chunk), key=lambda s: s[1])
            out.append(best)
        return out
