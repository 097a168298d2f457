"""The run report stored with an output: what ran, what failed, times, memory, parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from scipy import ndimage

import blockbuster
from blockbuster import output_status, run_report, tile_process
from blockbuster.errors import IncompleteOutputError, InputError, TileFailures
from blockbuster.report import RunReport, peak_memory


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


def u_shape() -> np.ndarray:
    """A U across two tiles whose arms meet only in the bottom tiles, plus a few dots."""
    img = np.zeros((32, 32), np.uint8)
    img[2:30, 4] = 1
    img[2:30, 27] = 1
    img[29, 4:28] = 1  # the bottom joins both arms, in the second row of tiles
    img[5, 12] = img[20, 20] = 1
    return img


def test_the_report_is_stored_with_the_output(tmp_path) -> None:
    path = tmp_path / "o.zarr"
    out = tile_process(u_shape(), label, (16, 16), 0, stitch="faces", output=path,
                       progress=False)
    report = run_report(path)
    assert isinstance(report, RunReport)
    assert run_report(out) == report  # the returned array works too
    meta = out.attrs["blockbuster"]
    assert report.status == "complete" and report.error is None
    assert report.n_labels == meta["n_labels"] == 3
    assert report.tiles == {"total": 4, "run": 4, "resumed": 0, "failed": 0, "skipped": 0,
                            "rewritten": report.tiles["rewritten"]}
    # the U's two arms got two labels in the top tiles; the bottom tiles joined them late
    assert report.labels_joined_late == 1 and report.tiles["rewritten"] >= 1
    assert set(report.seconds) >= {"segment", "end_pass", "finish", "total"}
    assert all(v >= 0 for v in report.seconds.values())
    assert report.seconds["total"] >= report.seconds["segment"]
    assert report.peak_memory_bytes == pytest.approx(peak_memory()[0], rel=0.5)
    assert report.params == meta["params"]
    assert report.output == str(path) and report.executor == "this process"
    assert report.blockbuster_version == blockbuster.__version__
    json.dumps(report.as_dict())  # plain data
    assert output_status(path).report == report.as_dict()
    assert RunReport.from_dict({**report.as_dict(), "from_a_newer_version": 1}) == report


def test_skipped_failed_and_resumed_tiles_are_counted(tmp_path) -> None:
    img = u_shape()
    img[16:, 16:] = 0  # an empty tile, skipped
    calls = []

    def fails_twice(tile: np.ndarray) -> np.ndarray:
        calls.append(1)
        if 2 <= len(calls) <= 3:  # the second tile, and its retry
            raise RuntimeError("flaky")
        return label(tile)

    path = tmp_path / "o.zarr"
    with pytest.raises(TileFailures) as failed:
        tile_process(img, fails_twice, (16, 16), 0, stitch="faces", output=path,
                     skip_empty=True, progress=False)
    partial = failed.value.report
    assert partial.status == "failed" and "flaky" in partial.error
    assert partial.tiles["failed"] == 1 and partial.tiles["skipped"] == 1
    assert partial.tiles["run"] == 4
    assert output_status(path).report is None  # no report for an incomplete output
    with pytest.raises(IncompleteOutputError):
        run_report(path)
    tile_process(img, fails_twice, (16, 16), 0, stitch="faces", output=path,
                 skip_empty=True, resume=True, progress=False)
    report = run_report(path)
    assert report.tiles["resumed"] == 3 and report.tiles["run"] == 1
    assert report.tiles["failed"] == 0 and report.tiles["skipped"] == 0


def test_segmenter_statistics_are_in_the_report(tmp_path) -> None:
    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((128, 128), seed=1)
    out = tile_process(image, "watershed", (64, 64), output=tmp_path / "w.zarr", progress=False)
    report = run_report(out)
    assert report.statistics == out.attrs["blockbuster"]["statistics"]
    assert report.statistics["threshold"] > 0
    assert report.seconds["prepare"] >= 0


def test_no_report_where_there_is_none(tmp_path) -> None:
    zarr.create_array(store=str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="uint8")
    with pytest.raises(IncompleteOutputError):
        run_report(tmp_path / "plain.zarr")
    arr = zarr.create_array(store=str(tmp_path / "old.zarr"), shape=(4, 4), dtype="uint32")
    arr.attrs["blockbuster"] = {"complete": True, "params": {}, "n_labels": 0}
    with pytest.raises(InputError, match="has no run report"):
        run_report(tmp_path / "old.zarr")
