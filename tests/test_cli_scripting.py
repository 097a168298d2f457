"""The command line in scripts and pipelines, run in subprocesses as a pipeline runs it:
progress in logs, ``--json``, ``info --check``, ``--dry-run``, ``--param``, ``methods``, exit
codes and global options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_cli import Result, assert_one_line_error, run

import blockbuster
from blockbuster.data import write_synthetic_nuclei

from helpers import write_plugin_dist


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scripting-data")
    write_synthetic_nuclei(root / "img.zarr", (256, 256), chunks=(64, 64))
    return root


@pytest.fixture
def work(tmp_path: Path, data: Path) -> Path:
    for item in data.iterdir():
        (tmp_path / item.name).symlink_to(item)
    return tmp_path


def one_json(result: Result) -> dict:
    """stdout holds exactly one JSON object (one line) and nothing else."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data


SEGMENT = ("segment", "img.zarr", "out.zarr", "--tile-shape", "64,64")


# -- progress -------------------------------------------------------------------------------
def test_a_run_logged_to_a_file_shows_progress_with_an_eta(work: Path) -> None:
    """stderr redirected to a file (a SLURM log): progress lines, each tenth of the run."""
    with open(work / "run.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "blockbuster", *SEGMENT], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=log, timeout=300)
    assert proc.returncode == 0
    lines = (work / "run.log").read_text().splitlines()
    progress = [line for line in lines if line.startswith("blockbuster: segmenting: tiles ")]
    # 16 tiles: a line at each tenth crossed, and the last one with the duration
    assert 5 <= len(progress) <= 16, lines
    assert all("ETA" in line for line in progress[:-1]), progress
    assert all("tiles/s" in line or "s/tile" in line for line in progress)
    assert progress[-1].startswith("blockbuster: segmenting: tiles 16/16 (100.0 %)")
    assert "done in" in progress[-1]
    done = [int(line.split("tiles ")[1].split("/")[0]) for line in progress]
    assert done == sorted(done)
    assert not any("\r" in line for line in lines)  # no bar in a log file


def test_quiet_silences_progress_before_or_after_the_command(work: Path) -> None:
    before = run("-q", *SEGMENT, cwd=work)
    assert before.returncode == 0, before.stderr
    assert before.stderr == ""
    after = run(*SEGMENT[:2], "out2.zarr", *SEGMENT[3:], "--quiet", cwd=work)
    assert after.returncode == 0 and after.stderr == ""
    verbose = run("-v", "info", "out.zarr", cwd=work)
    assert verbose.returncode == 0
    both = run("-q", "info", "out.zarr", "-v", cwd=work)
    assert_one_line_error(both, 2, "exclude each other")


# -- segment --json and the stored report ---------------------------------------------------
def test_segment_json_prints_the_stored_report(work: Path) -> None:
    result = run(*SEGMENT, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    printed = one_json(result)
    assert printed.pop("exit_code") == 0
    stored = blockbuster.run_report(work / "out.zarr")
    assert printed == stored.as_dict()
    status = blockbuster.output_status(work / "out.zarr")
    assert status.report == stored.as_dict()
    arr = zarr.open_array(str(work / "out.zarr"), mode="r")
    meta = arr.attrs["blockbuster"]
    assert printed["status"] == "complete"
    assert printed["n_labels"] == meta["n_labels"] == len(np.unique(arr[:])) - 1
    assert printed["params"] == meta["params"]
    assert printed["tiles"] == {"total": 16, "run": 16, "resumed": 0, "failed": 0,
                                "skipped": 0, "rewritten": printed["tiles"]["rewritten"]}
    assert set(printed["seconds"]) >= {"prepare", "segment", "end_pass", "finish", "total"}
    assert printed["peak_memory_bytes"] > 0
    assert printed["statistics"]["threshold"] > 0  # the watershed's global threshold
    assert "INFO" not in result.stdout and "segmenting" in result.stderr


def test_segment_json_on_an_error_is_still_one_object(work: Path) -> None:
    assert run(*SEGMENT, "-q", cwd=work).returncode == 0
    again = run(*SEGMENT, "--json", cwd=work)
    assert again.returncode == 2
    error = one_json(again)
    assert error["status"] == "failed" and error["exit_code"] == 2
    assert "already exists" in error["error"] and "--overwrite" in error["error"]
    assert "blockbuster: error:" in again.stderr


# -- info --json, info --check ----------------------------------------------------------------
def test_info_json_of_an_image_is_the_librarys_plan(work: Path) -> None:
    from blockbuster.io import open_image
    from blockbuster.plan import make_plan
    from blockbuster.plugins.watershed import WatershedSegmenter
    from blockbuster.segmenter import describe_segmenter

    result = run("info", "img.zarr", "--tile-shape", "64,128", "--diameter", "10", "--json",
                 cwd=work)
    assert result.returncode == 0, result.stderr
    printed = one_json(result)
    assert printed["kind"] == "image"
    seg = WatershedSegmenter(diameter=10)
    plan = make_plan(open_image(work / "img.zarr"), seg, describe_segmenter(seg),
                     tile_shape=(64, 128))
    assert printed["plan"] == json.loads(json.dumps(plan.summary()))
    assert printed["plan"]["n_tiles"] == 8 and printed["plan"]["overlap"] == [10, 10]
    assert printed["image"]["shape"] == [256, 256]
    assert printed["image"]["dtype"] == "uint16"


def test_info_json_and_check_of_outputs(work: Path, monkeypatch) -> None:
    assert run(*SEGMENT, "-q", cwd=work).returncode == 0
    complete = run("info", "out.zarr", "--json", cwd=work)
    assert complete.returncode == 0
    printed = one_json(complete)
    monkeypatch.chdir(work)  # the library's answer for the path the command was given
    status = blockbuster.output_status("out.zarr").as_dict()
    assert printed == {"kind": "output", **json.loads(json.dumps(status))}
    assert printed["complete"] is True and printed["report"]["n_labels"] == printed["n_labels"]

    assert run("info", "out.zarr", "--check", cwd=work).returncode == 0
    # what a crash while writing leaves: not marked complete
    arr = zarr.open_array(str(work / "out.zarr"), mode="r+")
    arr.attrs["blockbuster"] = {**arr.attrs["blockbuster"], "complete": False}
    incomplete = run("info", "out.zarr", "--check", cwd=work)
    assert incomplete.returncode == 1
    assert "INCOMPLETE" in incomplete.stdout
    checked = run("info", "out.zarr", "--check", "--json", cwd=work)
    assert checked.returncode == 1 and one_json(checked)["complete"] is False
    nothing = run("info", "never-written.zarr", "--check", cwd=work)
    assert nothing.returncode == 1 and "nothing there" in nothing.stdout
    image = run("info", "img.zarr", "--check", cwd=work)
    assert_one_line_error(image, 2, "is not an output of blockbuster")


# -- --dry-run --------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_writes_nothing(work: Path) -> None:
    before = sorted(p.name for p in work.iterdir())
    text = run(*SEGMENT, "--dry-run", cwd=work)
    assert text.returncode == 0, text.stderr
    assert "nothing written" in text.stdout and "out.zarr" in text.stdout
    assert "tile shape: (64, 64) (16 tiles, grid 4 x 4)" in text.stdout
    as_json = one_json(run(*SEGMENT, "--dry-run", "--json", cwd=work))
    assert as_json["n_tiles"] == 16 and as_json["output"] == "out.zarr"
    assert sorted(p.name for p in work.iterdir()) == before
    bad = run(*SEGMENT, "--dry-run", "--param", "nope=1", cwd=work)
    assert_one_line_error(bad, 2, "no parameter 'nope'")


# -- method parameters ------------------------------------------------------------------------
def test_params_reach_the_segmenter(work: Path) -> None:
    (work / "params.json").write_text(json.dumps({"sigma": 2.5, "min_size": 30}))
    result = run(*SEGMENT, "--params", "params.json", "--param", "min_size=40",
                 "--param", "threshold_method=li", "--diameter", "10", "-q", cwd=work)
    assert result.returncode == 0, result.stderr
    segmenter = zarr.open_array(str(work / "out.zarr"), mode="r").attrs["blockbuster"][
        "params"]["segmenter"]
    assert (segmenter["sigma"], segmenter["min_size"], segmenter["threshold_method"],
            segmenter["diameter"]) == (2.5, 40, "li", 10.0)


@pytest.mark.parametrize("args, code, fragments", [
    (["--param", "sigmaa=2"], 2, ["no parameter 'sigmaa'", "sigma=null", "min_size=null"]),
    (["--param", "sigma"], 2, ["'sigma' is not KEY=VALUE"]),
    (["--param", "threshold_method=magic"], 2, ["threshold_method='magic' must be one of"]),
    (["--params", "missing.json"], 2, ["parameter file missing.json not found"]),
    (["--diameter", "10", "--param", "diameter=12"], 2, ["disagree"]),
])
def test_bad_params_are_usage_errors(args: list[str], code: int, fragments: list[str],
                                     work: Path) -> None:
    result = run(*SEGMENT, *args, cwd=work)
    assert_one_line_error(result, code, *fragments)
    assert not (work / "out.zarr").exists()


BROKEN_PLUGINS = """
from blockbuster import Segmenter


class NeedsMissing(Segmenter):
    \"\"\"Needs a module that is not installed.\"\"\"

    requires = ("surely_not_installed_module_xyz",)
    extra = "xyz"

    def __init__(self, size: int = 3):
        self.size = size


class NeedsBroken(Segmenter):
    \"\"\"Needs a module that is installed but fails to import.\"\"\"

    requires = ("broken_dependency",)

    def __init__(self, level: float = 0.5):
        self.level = level
"""


@pytest.fixture
def plugins(tmp_path_factory) -> Path:
    return write_plugin_dist(
        tmp_path_factory.mktemp("site"), "scripting-plugins",
        {"needs-missing": "scripting_plugins:NeedsMissing",
         "needs-broken": "scripting_plugins:NeedsBroken"},
        {"scripting_plugins": BROKEN_PLUGINS,
         "broken_dependency": "raise ImportError('libfoo.so: not found')\n"})


def test_methods_lists_what_runs_and_why_not(work: Path, plugins: Path) -> None:
    quick = run("methods", "--quick", "--json", cwd=work, python_path=plugins)
    assert quick.returncode == 0, quick.stderr
    methods = {m["name"]: m for m in one_json(quick)["methods"]}
    watershed = methods["watershed"]
    assert watershed["available"] and watershed["problem"] is None
    assert watershed["parameters"][0] == {"name": "diameter", "default": 12, "required": False,
                                          "annotation": "float"}
    missing = methods["needs-missing"]
    assert not missing["available"]
    assert "surely_not_installed_module_xyz" in missing["problem"]
    assert 'pip install "blockbuster[xyz]"' in missing["problem"]
    assert methods["needs-broken"]["available"]  # a lookup only: found, so offered
    text = run("methods", "--quick", cwd=work, python_path=plugins)
    assert "watershed: available" in text.stdout
    assert "parameters: diameter=12, sigma=null" in text.stdout
    assert "needs-missing: UNAVAILABLE: needs surely_not_installed_module_xyz" in text.stdout
    # segment --help offers only what is installed (the cheap check: no import)
    offered = run("segment", "--help", cwd=work, python_path=plugins).stdout
    offered = " ".join(offered.split("installed here:")[1].split(";")[0].split())
    assert "watershed" in offered and "needs-missing" not in offered


def test_methods_imports_the_requirements(work: Path, plugins: Path) -> None:
    full = run("methods", "needs-broken", "watershed", "--json", cwd=work, python_path=plugins)
    assert full.returncode == 0, full.stderr
    methods = {m["name"]: m for m in one_json(full)["methods"]}
    broken = methods["needs-broken"]
    assert not broken["available"]
    assert "fails to import" in broken["problem"] and "libfoo.so" in broken["problem"]
    assert set(methods) == {"needs-broken", "watershed"} and methods["watershed"]["available"]
    unknown = run("methods", "nope", cwd=work)
    assert_one_line_error(unknown, 2, "no segmenter named 'nope'")


# -- exit codes -------------------------------------------------------------------------------
SABOTEUR = """
import os

from scipy import ndimage

from blockbuster import Segmenter


class Saboteur(Segmenter):
    \"\"\"On its third tile, puts a file where the output's second row of chunks goes: the
    write of that row fails with an OS error (as on a full or read-only disk).\"\"\"

    name = "saboteur"
    calls = 0

    def segment(self, tile):
        type(self).calls += 1
        target = os.environ.get("SABOTAGE")
        if target and type(self).calls == 3:
            open(target, "w").close()
        return ndimage.label(tile > tile.mean())[0]
"""


@pytest.fixture
def saboteur(tmp_path_factory) -> Path:
    return write_plugin_dist(tmp_path_factory.mktemp("site"), "saboteur",
                             {"saboteur": "saboteur_plugin:Saboteur"},
                             {"saboteur_plugin": SABOTEUR})


def test_an_os_error_while_writing_is_a_failed_run(work: Path, saboteur: Path,
                                                   monkeypatch) -> None:
    chunks = work / "s.zarr" / "c" / "1"  # zarr v3 keys: c/<row>/<column>
    monkeypatch.setenv("SABOTAGE", str(chunks))
    args = ("segment", "img.zarr", "s.zarr", "--method", "saboteur", "--tile-shape", "64,64",
            "--overlap", "0")
    failed = run(*args, "--json", cwd=work, python_path=saboteur)
    line = assert_one_line_error(failed, 1, "the run failed", "--resume")
    assert "errno" in line and "s.zarr" in line  # the OS's reason, and the path
    printed = one_json(failed)
    assert printed["status"] == "failed" and printed["exit_code"] == 1
    assert printed["tiles"]["total"] == 16 and printed["tiles"]["run"] >= 4  # so far
    assert not blockbuster.output_status(work / "s.zarr").complete
    # the cause fixed (the file removed), --resume finishes the run
    chunks.unlink()
    monkeypatch.delenv("SABOTAGE")
    resumed = run(*args, "--resume", cwd=work, python_path=saboteur)
    assert resumed.returncode == 0, resumed.stderr
    assert blockbuster.output_status(work / "s.zarr").complete
    # an output path under a file: bad input, refused before the run
    (work / "afile").write_text("")
    under_file = run("segment", "img.zarr", "afile/o.zarr", cwd=work)
    assert_one_line_error(under_file, 2, "afile is a file, not a folder")


SLOW = """
import time

from scipy import ndimage

from blockbuster import Segmenter


class Slow(Segmenter):
    \"\"\"A second per tile.\"\"\"

    name = "slow"

    def segment(self, tile):
        time.sleep(1.0)
        return ndimage.label(tile > tile.mean())[0]
"""


@pytest.mark.slow  # a run interrupted after a few tiles, then resumed: ~20 s
def test_ctrl_c_exits_130_and_resume_finishes(work: Path, tmp_path_factory) -> None:
    site = write_plugin_dist(tmp_path_factory.mktemp("site"), "slow", {"slow": "slow_plugin:Slow"},
                             {"slow_plugin": SLOW})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(site), os.environ.get("PYTHONPATH")]))}
    args = ["segment", "img.zarr", "i.zarr", "--method", "slow", "--tile-shape", "64,64",
            "--overlap", "0"]
    log_path = work / "i.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "blockbuster", *args, "--json"],
                                cwd=work, env=env, stdout=subprocess.PIPE, stderr=log,
                                text=True)
        deadline = time.monotonic() + 120
        while "segmenting: tiles 2/16" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log_path.read_text()
    assert "blockbuster: interrupted" in log_path.read_text()
    printed = json.loads(stdout)
    assert printed["status"] == "interrupted" and printed["exit_code"] == 130
    assert 2 <= printed["tiles"]["run"] < 16
    resumed = subprocess.run([sys.executable, "-m", "blockbuster", *args, "--resume", "--json"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["tiles"]["resumed"] >= 2
    assert report["tiles"]["resumed"] + report["tiles"]["run"] == 16


@pytest.mark.slow  # a tile that hangs past its time limit, retried once: ~10 s
def test_tile_timeout_fails_the_tile_and_exits_1(work: Path, tmp_path_factory) -> None:
    site = write_plugin_dist(tmp_path_factory.mktemp("site"), "hang", {"hang": "hang_plugin:Hang"},
                             {"hang_plugin": '''
import threading

from scipy import ndimage

from blockbuster import Segmenter


class Hang(Segmenter):
    """Hangs on the tile whose top-left corner is bright; labels the others."""

    name = "hang"

    def segment(self, tile):
        if tile[0, 0] == 65535:
            threading.Event().wait()
        return ndimage.label(tile > tile.mean())[0]
'''})
    image = zarr.open_array(str(work / "img.zarr"), mode="r")[:]
    image[64, 128] = 65535  # the top-left voxel of tile (1, 2)
    zarr.create_array(store=str(work / "hang.zarr"), data=image, chunks=(64, 64))
    result = run("segment", "hang.zarr", "h.zarr", "--method", "hang", "--tile-shape", "64,64",
                 "--overlap", "0", "--tile-timeout", "2", cwd=work, python_path=site)
    assert result.returncode == 1, result.stderr
    assert "1 tile(s) failed" in result.stderr
    assert "tile (1, 2)" in result.stderr and "after 2 attempt(s)" in result.stderr
    assert "time limit of 2 s" in result.stderr
    status = blockbuster.output_status(work / "h.zarr")
    assert status.work[0].tiles_failed == [6] and status.work[0].tiles_done == 15


def test_a_diameter_in_micrometres_sets_the_method_and_a_per_axis_overlap(tmp_path) -> None:
    """--diameter 6um on an anisotropic volume (2 x 0.5 x 0.5 um): 12 voxels in-plane, and the
    default overlap of one diameter per axis, (3, 12, 12), in the plan."""
    volume = np.zeros((16, 64, 64), np.uint16)
    volume[4:8, 20:30, 20:30] = 1000
    group = zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=volume, chunks=(16, 32, 32))
    group.attrs["multiscales"] = [{"version": "0.4", "name": "v", "axes": [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]}]
    result = run("segment", "v.ome.zarr", "--diameter", "6um", "--tile-shape", "16,32,32",
                 "--dry-run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["segmenter"]["diameter"] == 12.0
    assert plan["overlap"] == [3, 12, 12]
