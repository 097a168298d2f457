"""Tile sizing at run time: the process's peak memory stays within the predicted budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

RUN = """
import json, logging
from functools import partial
import numpy as np, psutil, zarr
from scipy import ndimage
import blockbuster
import blockbuster.api  # the package imports lazily: load the engine before measuring
from blockbuster.sizing import auto_tile_shape

def peak_rss():
    # VmHWM belongs to this address space; ru_maxrss survives execve, so a child forked from a
    # large process (pytest after loading torch) would report the parent's size.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

budget = {budget}
path = {path!r}
image = zarr.create_array(store=path, shape=(6000, 6000), chunks=(500, 500), dtype="uint16")
yy = np.arange(500, dtype=np.float32)[:, None]
for i in range(0, 6000, 500):
    for j in range(0, 6000, 500):
        wave = np.sin((yy + i) / 23) * np.cos((yy.T + j) / 19)
        image[i:i + 500, j:j + 500] = (wave > 0.5) * 900

def segment(tile):
    return ndimage.label(ndimage.gaussian_filter(tile.astype(np.float32), 1) > 450)[0]

if {mode!r} == "auto":
    tile_shape = "auto"
else:
    tile_shape = partial(auto_tile_shape, memory=budget, overlap=8)
before = psutil.Process().memory_info().rss
records = []
logging.basicConfig(level=logging.INFO, format="%(message)s")
out = blockbuster.tile_process(path, segment, tile_shape, 8, stitch="faces", memory=budget,
                               output=path + ".labels", progress=False)
peak = peak_rss()
print(json.dumps({{"growth": peak - before, "chunks": list(out.chunks)}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "callable"])
def test_peak_memory_stays_within_the_predicted_budget(mode, tmp_path):
    budget = 96 * 1024**2
    script = textwrap.dedent(RUN.format(budget=budget, path=str(tmp_path / "img.zarr"), mode=mode))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "predicted peak memory" in result.stderr  # the plan is logged before the first tile
    tile = report["chunks"]
    assert 500 <= tile[0] < 6000 and tile[0] == tile[1]  # sized from the budget, square
    assert report["growth"] <= budget, (
        f"grew by {report['growth'] / 2**20:.0f} MiB for a {budget / 2**20:.0f} MiB budget")
