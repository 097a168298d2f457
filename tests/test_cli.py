"""The ``blockbuster`` command, run as a user runs it: in a subprocess, on small inputs.

Every test checks exit codes, files and messages. Most runs take 2-3 s (about 1.5 s of it is
the interpreter importing numpy, dask and zarr).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from blockbuster.data import synthetic_nuclei, truth_path, write_synthetic_nuclei

from helpers import write_plugin_dist

#: The console script installed next to this interpreter (or on PATH), if any.
SCRIPT = shutil.which("blockbuster", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def run(*args: object, cwd: Path, script: bool = False, python_path: Path | None = None
        ) -> Result:
    """Run ``python -m blockbuster ARGS`` (or the console script) in ``cwd``."""
    command = [SCRIPT] if script else [sys.executable, "-m", "blockbuster"]
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path),
                                                          env.get("PYTHONPATH")]))
    proc = subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning:" not in result.stderr, result.stderr


def assert_one_line_error(result: Result, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one error line (the last line of stderr), no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    assert result.stderr.strip().splitlines()[-1] == line
    assert line.startswith("blockbuster")
    for fragment in fragments:
        assert fragment in line, line
    return line


def n_objects(path: Path) -> int:
    arr = zarr.open(str(path), mode="r")
    arr = arr["0"] if isinstance(arr, zarr.Group) else arr
    return int(arr.attrs["blockbuster"]["n_labels"])


# -- inputs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Small inputs shared by the tests (read-only: tests write their outputs elsewhere)."""
    root = tmp_path_factory.mktemp("cli-data")
    write_synthetic_nuclei(root / "img.zarr", (256, 256), chunks=(128, 128), with_labels=True)
    write_synthetic_nuclei(root / "vol.zarr", (8, 128, 128), chunks=(4, 64, 64), diameter=10)
    write_synthetic_nuclei(root / "img.ome.zarr", (256, 256), chunks=(128, 128), ome=True)
    zarr.create_array(store=str(root / "rgb.zarr"), shape=(3, 64, 64), chunks=(3, 64, 64),
                      dtype="uint8", fill_value=0)
    zarr.create_array(store=str(root / "nothing.zarr"), shape=(16, 16), chunks=(16, 16),
                      dtype="uint8", fill_value=0)
    import tifffile

    image, _ = synthetic_nuclei((200, 240), seed=3)
    tifffile.imwrite(root / "scan.tif", image)
    return root


@pytest.fixture
def work(tmp_path: Path, data: Path) -> Path:
    """A fresh working directory with the inputs linked in (outputs land next to them)."""
    for item in data.iterdir():
        (tmp_path / item.name).symlink_to(item)
    return tmp_path


# -- help and usage -------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["segment"], ["info"], ["demo"], ["methods"],
                                     ["preview"], ["view"]])
def test_help_has_usage_and_examples(command: list[str], tmp_path: Path) -> None:
    result = run(*command, "--help", cwd=tmp_path)
    assert_ok(result)
    assert result.stdout.startswith(f"usage: {' '.join(['blockbuster', *command])}")
    assert "examples:" in result.stdout
    example = f"blockbuster {command[0]} " if command else "blockbuster demo"
    assert example in result.stdout.split("examples:")[1]


def test_segment_help_lists_every_option(tmp_path: Path) -> None:
    result = run("segment", "--help", cwd=tmp_path)
    for option in ("--method", "--tile-shape", "--overlap", "--stitch", "--gpu",
                   "--channel-axis", "--overwrite", "--resume", "--table", "--mask",
                   "--skip-empty", "--workers", "--cluster", "--cores", "--memory", "--walltime",
                   "--queue", "--account", "--jobs", "--gpus-per-job", "--diameter", "--model",
                   "--ome", "--no-ome", "--quiet", "--verbose", "--param", "--params",
                   "--tile-timeout", "--retries", "--json", "--dry-run", "--seam-table"):
        assert option in result.stdout, option
    assert "watershed" in result.stdout  # the installed methods are listed
    for code in ("0 ", "1 ", "2 ", "130 "):  # the exit codes are documented
        assert f"\n  {code}" in result.stdout.split("exit codes:")[1]


@pytest.mark.skipif(SCRIPT is None, reason="the blockbuster console script is not installed")
def test_console_script(work: Path) -> None:
    assert_ok(run("--help", cwd=work, script=True))
    result = run("segment", "img.zarr", "out.zarr", "--tile-shape", "128,128", cwd=work,
                 script=True)
    assert_ok(result)
    assert n_objects(work / "out.zarr") > 0


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    assert_one_line_error(run(cwd=tmp_path), 2, "choose a command")


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    assert_one_line_error(run("segment", "x.zarr", "--tile-size", "64", cwd=tmp_path), 2,
                          "--tile-size", "blockbuster segment --help")


# -- segment --------------------------------------------------------------------------------
def test_segment_zarr_with_table(work: Path) -> None:
    result = run("segment", "img.zarr", "--tile-shape", "128,128", "--table", cwd=work)
    assert_ok(result)
    labels_path = work / "img.labels.zarr"
    from blockbuster import open_labels

    labels = open_labels(labels_path)  # raises unless complete
    n = n_objects(labels_path)
    assert labels.chunks == (128, 128)
    assert len(np.unique(labels[:])) - 1 == n
    truth = zarr.open_array(str(truth_path(work / "img.zarr")), mode="r")[:]
    n_true = len(np.unique(truth)) - 1
    assert 0.8 * n_true <= n <= 1.2 * n_true, (n, n_true)
    # the summary says where the labels are, how many objects, and how long it took
    assert f"{labels_path}" in result.stdout
    assert f"{n:,} objects" in result.stdout
    assert "time:" in result.stdout
    # INFO messages are shown by default: the engine's plan
    assert "tile shape (128, 128), overlap (12, 12), 4 tiles" in result.stderr
    table = work / "img.labels.zarr.objects.csv"
    assert f"table:  {table}" in result.stdout
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    assert sum(int(r["voxels"]) for r in rows) == int(np.count_nonzero(labels[:]))


def test_segment_tiff_to_default_output(work: Path) -> None:
    assert_ok(run("segment", "scan.tif", "--tile-shape", "100,120", cwd=work))
    labels = zarr.open_array(str(work / "scan.labels.zarr"), mode="r")
    assert labels.shape == (200, 240)
    assert labels.attrs["blockbuster"]["complete"] is True
    assert labels.attrs["blockbuster"]["n_labels"] > 50


def test_segment_3d_in_2d_tiles(work: Path) -> None:
    result = run("segment", "vol.zarr", "--tile-shape", "1,64,64", cwd=work)
    assert_ok(result)
    labels = zarr.open_array(str(work / "vol.labels.zarr"), mode="r")
    assert labels.chunks == (1, 64, 64)
    assert "tile shape (1, 64, 64)" in result.stderr
    assert labels.attrs["blockbuster"]["complete"] is True
    assert labels.attrs["blockbuster"]["n_labels"] > 0


def test_quiet_prints_only_the_summary(work: Path) -> None:
    result = run("segment", "img.zarr", "q.zarr", "--tile-shape", "128,128", "--quiet",
                 cwd=work)
    assert_ok(result)
    assert result.stderr == ""
    assert "labels:" in result.stdout


@pytest.mark.parametrize("make_input, fragment", [
    (lambda d: "missing.zarr", "input not found: missing.zarr"),
    (lambda d: (d / "folder").mkdir() or "folder", "no reader recognises"),
    (lambda d: (d / "notes.txt").write_text("hi") and "notes.txt", "no reader recognises"),
])
def test_bad_input_paths(make_input, fragment: str, tmp_path: Path) -> None:
    name = make_input(tmp_path)
    assert_one_line_error(run("segment", name, cwd=tmp_path), 2, fragment)
    assert_one_line_error(run("info", name, cwd=tmp_path), 2, name)


def test_verbose_adds_the_traceback(tmp_path: Path) -> None:
    result = run("segment", "missing.zarr", "--verbose", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "blockbuster: error: input not found: missing.zarr"


@pytest.mark.parametrize("tile_shape, fragment", [
    ("abc", "not a comma-separated list of integers"),
    ("0,64", "size 0 on axis 0 must be positive"),
    ("64,-3", "size -3 on axis 1 must be positive"),
    ("64,64,64", "expected 2 sizes, one per spatial axis of the image (256, 256), got 3"),
])
def test_bad_tile_shapes(tile_shape: str, fragment: str, work: Path) -> None:
    result = run("segment", "img.zarr", "--tile-shape", tile_shape, cwd=work)
    assert_one_line_error(result, 2, "tile-shape", fragment)
    assert not (work / "img.labels.zarr").exists()


def test_unknown_method_lists_the_installed_ones(work: Path) -> None:
    result = run("segment", "img.zarr", "--method", "magic", cwd=work)
    assert_one_line_error(result, 2, "no segmenter named 'magic'", "watershed")


def test_method_option_that_does_not_apply(work: Path) -> None:
    result = run("segment", "img.zarr", "--method", "watershed", "--model", "nuclei", cwd=work)
    line = assert_one_line_error(result, 2, "segmenter 'watershed' has no parameter 'model'",
                                 "diameter=12", "threshold_method=", "--param KEY=VALUE")
    assert "--sigma" not in line  # no flags that do not exist


def test_method_without_its_extra_names_the_install_command(work: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("cellpose") and importlib.util.find_spec("torch"):
        pytest.skip("Cellpose is installed here")
    result = run("segment", "img.zarr", "--method", "cellpose", "--diameter", "17", cwd=work)
    assert_one_line_error(result, 2, "Cellpose", 'pip install "blockbuster[cellpose]"')


def test_diameter_reaches_the_segmenter(work: Path) -> None:
    assert_ok(run("segment", "img.zarr", "d.zarr", "--tile-shape", "128,128", "--diameter",
                  "9", cwd=work))
    params = zarr.open_array(str(work / "d.zarr"), mode="r").attrs["blockbuster"]["params"]
    assert params["segmenter"]["diameter"] == 9.0
    assert params["depth"] == [9, 9]  # the method's preferred overlap follows the diameter


def test_existing_output_needs_overwrite(work: Path) -> None:
    args = ("segment", "img.zarr", "out.zarr", "--tile-shape", "128,128")
    assert_ok(run(*args, cwd=work))
    first = zarr.open_array(str(work / "out.zarr"), mode="r")[:]
    assert_one_line_error(run(*args, cwd=work), 2, "out.zarr already exists",
                          "pass --overwrite")
    assert_ok(run(*args, "--overwrite", "--tile-shape", "64,64", cwd=work))
    again = zarr.open_array(str(work / "out.zarr"), mode="r")
    assert again.chunks == (64, 64)
    assert again.shape == first.shape


def test_overwrite_and_resume_exclude_each_other(work: Path) -> None:
    result = run("segment", "img.zarr", "--overwrite", "--resume", cwd=work)
    assert_one_line_error(result, 2, "not allowed with argument")


def test_bad_memory_size(work: Path) -> None:
    assert_one_line_error(run("segment", "img.zarr", "--memory", "lots", cwd=work), 2,
                          "memory size 'lots' is not understood")


def test_gpu_without_a_gpu_is_bad_input(work: Path) -> None:
    from blockbuster.errors import NoGPUError
    from blockbuster.sizing import available_memory

    try:
        available_memory(use_gpu=True)
        pytest.skip("this machine has a GPU")
    except NoGPUError:
        pass
    result = run("segment", "img.zarr", "--gpu", cwd=work)
    assert_one_line_error(result, 2, "--gpu but no usable GPU")


def test_locked_output_is_a_failed_run(work: Path) -> None:
    from blockbuster.locks import RunLock
    from blockbuster.output import output_lock_path

    lock = RunLock(output_lock_path(work / "busy.zarr"), "busy.zarr")
    lock.acquire()
    try:
        result = run("segment", "img.zarr", "busy.zarr", "--tile-shape", "128,128", cwd=work)
    finally:
        lock.release()
    assert_one_line_error(result, 1, "another blockbuster run")


def test_mask_without_foreground_skips_every_tile(work: Path) -> None:
    zarr.create_array(store=str(work / "mask.zarr"), shape=(32, 32), chunks=(32, 32),
                      dtype="uint8", fill_value=0)
    result = run("segment", "img.zarr", "m.zarr", "--tile-shape", "128,128", "--mask",
                 "mask.zarr", cwd=work)
    assert_ok(result)
    assert "(0 objects" in result.stdout
    assert not zarr.open_array(str(work / "m.zarr"), mode="r")[:].any()


FLAKY_PLUGIN = """
from scipy import ndimage
from blockbuster import Segmenter


class Flaky(Segmenter):
    \"\"\"Labels bright blobs on its first two tiles, then fails on every call.\"\"\"

    name = "flaky"
    calls = 0

    def segment(self, tile):
        type(self).calls += 1
        if type(self).calls > 2:
            raise RuntimeError("the flaky plugin gave up")
        return ndimage.label(tile > tile.mean())[0]
"""


@pytest.fixture
def flaky_plugin(tmp_path_factory) -> Path:
    """A third-party segmenter plugin, installed by putting its folder on PYTHONPATH."""
    return write_plugin_dist(tmp_path_factory.mktemp("site"), "flaky-plugin",
                             {"flaky": "flaky_plugin:Flaky"}, {"flaky_plugin": FLAKY_PLUGIN})


@pytest.mark.slow  # five runs of the command: ~12 s
def test_failed_tiles_exit_1_and_resume_finishes(work: Path, flaky_plugin: Path) -> None:
    """A third-party plugin found through its entry point fails on two of four tiles."""
    assert "flaky" in run("segment", "--help", cwd=work, python_path=flaky_plugin).stdout
    args = ("segment", "img.zarr", "f.zarr", "--method", "flaky", "--tile-shape", "128,128",
            "--overlap", "0")
    failed = run(*args, cwd=work, python_path=flaky_plugin)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "blockbuster: error: 2 tile(s) failed; the other tiles are kept" in failed.stderr
    assert failed.stderr.count("the flaky plugin gave up") == 2  # one line per failed tile
    assert "rerun with --resume" in failed.stderr
    assert "2 of 4 tiles done, 2 failed" in run("info", "f.zarr", cwd=work).stdout
    # a new process: the plugin's first two calls (the two unfinished tiles) succeed
    resumed = run(*args, "--resume", cwd=work, python_path=flaky_plugin)
    assert_ok(resumed)
    assert "resuming: 2 of 4 tiles already done" in resumed.stderr
    verbose = run(*args, "--overwrite", "--verbose", cwd=work, python_path=flaky_plugin)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "RuntimeError: the flaky plugin gave up" in verbose.stderr


@pytest.mark.slow  # six runs of the command: ~12 s
def test_resume_finishes_a_failed_run(work: Path, monkeypatch, same_partition) -> None:
    """Tiles fail in a first run (through the API); the CLI's --resume redoes only those."""
    from blockbuster import tile_process
    from blockbuster.errors import TileFailures
    from blockbuster.plugins.watershed import WatershedSegmenter

    image, output = os.path.abspath(work / "img.zarr"), work / "r.zarr"
    calls = []
    segment = WatershedSegmenter.segment

    def crashes_after_two_tiles(self, tile):
        calls.append(tile.shape)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return segment(self, tile)

    monkeypatch.setattr(WatershedSegmenter, "segment", crashes_after_two_tiles)
    with pytest.raises(TileFailures):
        tile_process(image, "watershed", (64, 64), output=output, progress=False)
    monkeypatch.undo()

    info = run("info", "r.zarr", cwd=work)
    assert_ok(info)
    assert "INCOMPLETE" in info.stdout and "complete," not in info.stdout
    assert "2 of 16 tiles done, 14 failed" in info.stdout

    args = ("segment", "img.zarr", "r.zarr", "--tile-shape", "64,64")
    assert_one_line_error(run(*args, cwd=work), 2, "unfinished run", "pass --resume")
    assert_one_line_error(run(*args, "--resume", "--diameter", "10", cwd=work), 2,
                          "started with other arguments")
    resumed = run(*args, "--resume", cwd=work)
    assert_ok(resumed)
    assert "resuming: 2 of 16 tiles already done" in resumed.stderr

    assert_ok(run("segment", "img.zarr", "ref.zarr", "--tile-shape", "64,64", cwd=work))
    ref = zarr.open_array(str(work / "ref.zarr"), mode="r")[:]
    assert same_partition(zarr.open_array(str(output), mode="r")[:], ref)
    info = run("info", "r.zarr", cwd=work)
    assert f"status:     complete, {n_objects(output):,} objects" in info.stdout
    assert "work dir" not in info.stdout  # finished runs leave no work directory


# -- OME-Zarr output ------------------------------------------------------------------------
def _reader_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


def _label_nodes(nodes: list, name: str) -> list:
    """The nodes the ome-zarr reader recognises as the label image ``name``."""
    from ome_zarr.reader import Label

    return [n for n in nodes
            if n.zarr.basename() == name and any(isinstance(s, Label) for s in n.specs)]


def test_ome_input_gets_labels_inside(work: Path, data: Path) -> None:
    # the image is written into: use a copy, not the shared (linked) input
    (work / "img.ome.zarr").unlink()
    shutil.copytree(data / "img.ome.zarr", work / "img.ome.zarr")
    result = run("segment", "img.ome.zarr", "--tile-shape", "128,128", cwd=work)
    assert_ok(result)
    assert f"{work / 'img.ome.zarr' / 'labels' / 'blockbuster'}" in result.stdout
    labels = _label_nodes(_reader_nodes(work / "img.ome.zarr"), "blockbuster")
    assert len(labels) == 1 and labels[0].data[0].shape == (256, 256)
    info = run("info", "img.ome.zarr", cwd=work)
    assert "OME labels: blockbuster" in info.stdout
    assert_ok(run("segment", "img.ome.zarr", "--tile-shape", "128,128", "--no-ome", cwd=work))
    assert zarr.open_array(str(work / "img.labels.zarr"), mode="r").shape == (256, 256)


def test_ome_flag_writes_a_standalone_label_image(work: Path) -> None:
    result = run("segment", "img.zarr", "cells.zarr", "--tile-shape", "128,128", "--ome",
                 cwd=work)
    assert_ok(result)
    group = zarr.open_group(str(work / "cells.zarr"), mode="r")
    meta = dict(group.attrs).get("ome", dict(group.attrs))
    assert "image-label" in meta and len(meta["multiscales"][0]["datasets"]) >= 1
    assert group["0"].attrs["blockbuster"]["complete"] is True
    info = run("info", "cells.zarr", cwd=work)
    assert "OME-Zarr label image" in info.stdout and "status:     complete" in info.stdout


# -- scaling out ----------------------------------------------------------------------------
@pytest.mark.slow  # starting a local dask cluster: ~12 s
def test_two_local_workers_match_the_sequential_run(work: Path, same_partition) -> None:
    assert_ok(run("segment", "img.zarr", "seq.zarr", "--tile-shape", "64,64", cwd=work))
    result = run("segment", "img.zarr", "par.zarr", "--tile-shape", "64,64", "--workers", "2",
                 cwd=work)
    assert_ok(result)
    assert "starting 2 local worker process(es)" in result.stderr
    seq = zarr.open_array(str(work / "seq.zarr"), mode="r")[:]
    par = zarr.open_array(str(work / "par.zarr"), mode="r")[:]
    assert same_partition(seq, par)


def test_cluster_job_script(work: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    result = run("segment", "img.zarr", "--cluster", "slurm", "--job-script", "--cores", "4",
                 "--memory", "32GB", "--queue", "gpu", "--account", "lab", "--walltime",
                 "02:00:00", "--gpus-per-job", "1", cwd=work)
    assert_ok(result)
    for directive in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --cpus-per-task=4",
                      "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --mem="):
        assert directive in result.stdout, directive


def test_cluster_needs_its_submit_command(work: Path) -> None:
    if shutil.which("sbatch"):
        pytest.skip("sbatch is installed here")
    assert_one_line_error(run("segment", "img.zarr", "--cluster", "slurm", cwd=work), 2,
                          "sbatch, which is not on PATH")


def test_cluster_options_need_cluster(work: Path) -> None:
    assert_one_line_error(run("segment", "img.zarr", "--jobs", "4", cwd=work), 2,
                          "--jobs: only with --cluster")


# -- info -----------------------------------------------------------------------------------
def test_info_on_an_input_matches_the_planner(work: Path) -> None:
    from blockbuster.plugins.watershed import WatershedSegmenter
    from blockbuster.sizing import format_bytes, plan_tile_shape

    result = run("info", "img.zarr", "--memory", "2MB", cwd=work)
    assert_ok(result)
    seg = WatershedSegmenter()
    plan = plan_tile_shape((256, 256), "uint16", overlap=seg.preferred_overlap, memory=2e6,
                           memory_model=seg.memory_model, chunks=(128, 128))
    n_tiles = int(np.prod([-(-s // t) for s, t in zip((256, 256), plan.shape, strict=True)]))
    assert n_tiles > 1  # the budget is small enough to need tiles
    out = result.stdout
    assert "shape:      (256, 256)" in out and "dtype:      uint16" in out
    assert "chunks:     (128, 128)" in out and "on disk" in out
    assert f"tile shape: {plan.shape} ({n_tiles} tiles" in out
    assert f"predicted peak {format_bytes(plan.predicted_peak_bytes)} per tile" in out
    assert plan.reason in out


def test_info_guesses_a_channel_axis(work: Path) -> None:
    guessed = run("info", "rgb.zarr", cwd=work)
    assert_ok(guessed)
    assert "axis 0 may hold channels" in guessed.stdout and "a guess" in guessed.stdout
    given = run("info", "rgb.zarr", "--channel-axis", "0", cwd=work)
    assert "axis 0 ('c', given), 3 channel(s): 0, 1, 2" in given.stdout
    import tifffile

    tifffile.imwrite(work / "two.tif", np.zeros((2, 32, 32), np.uint16),
                     metadata={"axes": "CYX"})
    tiff = run("info", "two.tif", cwd=work)
    # The TIFF's own axes say which axis holds channels: nothing to pass.
    assert "axis 0 ('c', from the TIFF metadata), 2 channel(s): 0, 1" in tiff.stdout
    assert "tiled axes: y, x (32, 32)" in tiff.stdout


def test_channel_by_name_is_not_a_channel_axis(work: Path) -> None:
    import tifffile

    image, _ = synthetic_nuclei((96, 96), seed=3)
    stack = np.stack([np.zeros_like(image), image])  # the nuclei are in channel "DAPI"
    tifffile.imwrite(work / "cyx.ome.tif", stack, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["empty", "DAPI"]},
                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    info = run("info", "cyx.ome.tif", "--channel", "DAPI", cwd=work)
    assert_ok(info)
    assert "0 'empty', 1 'DAPI'; segmenting DAPI" in info.stdout
    assert "voxel size: y 0.5 micrometer, x 0.5 micrometer" in info.stdout
    by_name = run("segment", "cyx.ome.tif", "a.zarr", "--channel", "DAPI", cwd=work)
    by_index = run("segment", "cyx.ome.tif", "b.zarr", "--channel", "1", cwd=work)
    assert_ok(by_name)
    assert_ok(by_index)
    tifffile.imwrite(work / "dapi.tif", image)  # the same pixels, alone
    assert_ok(run("segment", "dapi.tif", "alone.zarr", cwd=work))
    a = zarr.open_array(str(work / "a.zarr"), mode="r")[:]
    b = zarr.open_array(str(work / "b.zarr"), mode="r")[:]
    alone = zarr.open_array(str(work / "alone.zarr"), mode="r")[:]
    assert a.shape == (96, 96) and a.max() > 5
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, alone)
    wrong = run("segment", "cyx.ome.tif", "c.zarr", "--channel", "GFP", cwd=work)
    assert wrong.returncode == 2
    assert "no channel named 'GFP'" in wrong.stderr and "1 'DAPI'" in wrong.stderr


def test_info_never_calls_an_unfinished_output_complete(work: Path) -> None:
    assert_ok(run("segment", "img.zarr", "o.zarr", "--tile-shape", "128,128", cwd=work))
    complete = run("info", "o.zarr", cwd=work)
    assert f"status:     complete, {n_objects(work / 'o.zarr'):,} objects" in complete.stdout
    # what a crash while writing the output leaves: the array, not yet marked complete
    arr = zarr.open_array(str(work / "o.zarr"), mode="r+")
    arr.attrs["blockbuster"] = {**arr.attrs["blockbuster"], "complete": False}
    incomplete = run("info", "o.zarr", cwd=work)
    assert_ok(incomplete)
    assert "INCOMPLETE" in incomplete.stdout and "complete," not in incomplete.stdout


# -- demo -----------------------------------------------------------------------------------
@pytest.mark.parametrize("three_d", [False, True])
def test_demo_quick(three_d: bool, tmp_path: Path) -> None:
    from PIL import Image

    from blockbuster.cli import DEMO_ZOOM, demo_plan

    result = run("demo", "out", "--quick", *(["--3d"] if three_d else []), cwd=tmp_path)
    assert_ok(result)
    folder = tmp_path / "out"
    image = folder / "nuclei.ome.zarr"
    plan = demo_plan(three_d=three_d, quick=True)
    # the ome-zarr reader finds the image, the label image, and matching pyramids
    nodes = _reader_nodes(image)
    image_node = nodes[0]
    label_nodes = _label_nodes(nodes, "blockbuster")
    assert len(label_nodes) == 1
    label_data = label_nodes[0].data
    assert len(label_data) >= 2, "no pyramid"
    assert [d.shape for d in label_data] == [d.shape for d in image_node.data]
    assert label_data[0].shape == plan.shape
    n = int(np.asarray(label_data[0]).max())
    assert n > 10
    assert f"({n:,} nuclei" in result.stdout
    with open(folder / "nuclei.objects.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == n
    # previews: a full-resolution zoom (at most DEMO_ZOOM wide) and the whole plane
    zoom = Image.open(folder / "nuclei.preview.png")
    assert zoom.size == tuple(min(DEMO_ZOOM, s) for s in plan.shape[-2:])[::-1]
    assert zoom.mode == "RGB"
    overview = np.asarray(Image.open(folder / "nuclei.overview.png").convert("RGB"))
    assert overview.shape[:2] == plan.shape[-2:]
    # the overview shows the labels: the nuclei of the middle plane are in colour, the
    # background stays grey (but for the tile grid and the caption)
    middle = np.asarray(label_data[0])[(plan.shape[0] // 2,) if three_d else ()]
    rgb = overview.astype(int)
    colourful = rgb.max(axis=-1) - rgb.min(axis=-1) > 40
    assert colourful[middle > 0].mean() > 0.9
    assert colourful[middle == 0].mean() < 0.2
    for name in ("image:", "labels:", "table:", "preview:", "overview:"):
        assert name in result.stdout
    if not three_d:  # a second demo in the same folder replaces its own files
        assert_ok(run("demo", "out", "--quick", cwd=tmp_path))
        assert Image.open(folder / "nuclei.preview.png").size == zoom.size
