"""The seam report: tile borders measured against control planes inside the tiles."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from test_stitching import local_threshold_watershed

from blockbuster import run_report, seams, tile_process
from blockbuster.cli import main
from blockbuster.seams import (
    CONTROL_PLANES,
    control_positions,
    control_stats,
    pair_stats,
    stacked_matched_stats,
    stacked_pair_stats,
)


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((512, 512), diameter=20, density=0.6, touching=True, seed=3)
    return image


def watershed20(tile: np.ndarray) -> np.ndarray:
    """A segmenter whose result depends on context: it splits an object cut by the tile's edge
    differently from the whole object."""
    return local_threshold_watershed(tile, 20)


def test_pair_stats_counts_orphans_once_per_plane() -> None:
    a = np.array([[1, 1, 0, 2, 2, 0, 4]])
    b = np.array([[1, 1, 0, 0, 0, 3, 0]])
    assert pair_stats(a, b).tolist() == [5, 3, 0]  # 1 goes on; 2 and 4 end; 3 starts
    # across a border the numbering differs: the stitcher's matches say what goes on
    c = np.array([[9, 9, 0, 0, 0, 7, 0]])
    assert pair_stats(a, c, np.array([1]), np.array([9])).tolist() == [5, 3, 0]
    assert pair_stats(a, c, np.array([], int), np.array([], int))[1] == 5  # nothing matched
    # a match with an object that does not touch the plane does not make it go on
    assert pair_stats(a, c, np.array([1]), np.array([5]))[1] == 5


def test_pair_stats_ambiguity() -> None:
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    one_to_two = np.array([5, 5, 5, 5, 6, 6, 6, 6, 0, 0])  # a's 1 overlaps two objects
    # IoUs 0.5: above a threshold of 0.4, so only the overlap with two objects counts
    assert pair_stats(a, one_to_two, np.array([1]), np.array([5]), threshold=0.4)[2] == 1
    # at 0.5 both pairs are weak too: all three objects are ambiguous
    assert pair_stats(a, one_to_two, np.array([1]), np.array([5]))[2] == 3
    weak = np.array([0, 0, 0, 0, 0, 3, 3, 3, 3, 3])  # IoU 3/10: between 0.2 and 0.5
    assert pair_stats(a, weak)[2] == 2  # both sides of the weak pair
    assert pair_stats(a, a)[2] == 0


def reference_pair_stats(a: np.ndarray, b: np.ndarray, threshold: float) -> list[int]:
    """``[objects, orphans, ambiguous]`` of two planes sharing one numbering, with sets."""
    in_a, in_b = set(a[a > 0].tolist()), set(b[b > 0].tolist())
    size_a, size_b = Counter(a.tolist()), Counter(b.tolist())
    both = (a > 0) & (b > 0)
    overlaps = Counter(zip(a[both].tolist(), b[both].tolist(), strict=True))
    flagged_a: set[int] = set()
    flagged_b: set[int] = set()
    partners_a: Counter[int] = Counter()
    partners_b: Counter[int] = Counter()
    for (x, y), n in overlaps.items():
        if 0.2 < n / (size_a[x] + size_b[y] - n) <= threshold:
            flagged_a.add(x)
            flagged_b.add(y)
        partners_a[x] += n >= 0.2 * size_a[x]
        partners_b[y] += n >= 0.2 * size_b[y]
    flagged_a |= {x for x, k in partners_a.items() if k > 1}
    flagged_b |= {y for y, k in partners_b.items() if k > 1}
    return [len(in_a) + len(in_b), len(in_a ^ in_b), len(flagged_a) + len(flagged_b)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_stacked_pair_stats_equals_a_reference_pair_by_pair(k: int, m: int, labels: int,
                                                            seed: int) -> None:
    """The batched plane statistics equal a set-based reference, pair by pair (small label
    counts, so that weak overlaps and objects with two partners occur often)."""
    rng = np.random.default_rng(seed)
    va = rng.integers(0, labels + 1, (k, m)) * (rng.random((k, m)) < 0.8)
    vb = np.where(rng.random((k, m)) < 0.5, va, rng.integers(0, labels + 1, (k, m)))
    expected = [reference_pair_stats(a, b, 0.5) for a, b in zip(va, vb, strict=True)]
    assert stacked_pair_stats(va, vb, threshold=0.5).tolist() == expected
    assert [pair_stats(a, b).tolist() for a, b in zip(va, vb, strict=True)] == expected


def reference_matched_orphans(a: np.ndarray, b: np.ndarray, la: list[int], lb: list[int],
                              ) -> int:
    """Orphans across a border, with sets: a label goes on where it is matched with a label
    present on the other plane."""
    in_a, in_b = set(a[a > 0].tolist()), set(b[b > 0].tolist())
    real = [(x, y) for x, y in zip(la, lb, strict=True) if x in in_a and y in in_b]
    return len(in_a - {x for x, _ in real}) + len(in_b - {y for _, y in real})


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_stacked_matched_stats_equals_a_reference_pair_by_pair(k: int, m: int, labels: int,
                                                               seed: int) -> None:
    """Borders counted together (planes of several lengths, padded; matches of labels on the
    planes and off them) equal each border counted alone and a set-based reference."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, m + 1, k)
    va = [rng.integers(0, labels + 1, n) for n in lengths]
    vb = [rng.integers(0, labels + 3, n) for n in lengths]
    matches = [(rng.integers(0, labels + 2, j), rng.integers(1, labels + 4, j))
               for j in rng.integers(0, 4, k)]
    pad_a, pad_b = np.zeros((k, m), np.int64), np.zeros((k, m), np.int64)
    for i, n in enumerate(lengths):
        pad_a[i, :n], pad_b[i, :n] = va[i], vb[i]
    together = stacked_matched_stats(pad_a, pad_b, matches, threshold=0.5).tolist()
    for i in range(k):
        alone = pair_stats(va[i], vb[i], *matches[i]).tolist()
        reference = reference_pair_stats(va[i], vb[i], 0.5)
        reference[1] = reference_matched_orphans(va[i], vb[i], *(x.tolist() for x in matches[i]))
        assert together[i] == alone == reference


def test_a_runs_borders_counted_together_or_alone_give_one_report(
        nuclei: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    def report(batch: int) -> dict[str, object]:
        monkeypatch.setattr(seams, "BORDER_BATCH", batch)
        labels = tile_process(nuclei, watershed20, (96, 80), 8, stitch="iou", progress=False)
        return run_report(labels).seams

    alone = report(1)
    assert alone["borders"] > 50 and alone["axes"][0]["seam"]["objects"] > 0
    assert report(7) == alone == report(seams.BORDER_BATCH)


def test_control_planes_are_drawn_and_next_to_the_faces() -> None:
    core = np.zeros((6, 5, 7), np.int32)  # axes of other lengths: planes of other sizes
    core[:3, :, :3] = 1  # ends between planes 2 and 3 along z and x
    core[3:, :, 4:] = 2
    stats = control_stats(core, (0, 1, 2), 0.5, tile_id=7)
    assert stats.shape == (3, CONTROL_PLANES + 2, 3)
    for i, axis in enumerate((0, 1, 2)):
        drawn = control_positions(core.shape[axis], 7, axis)
        assert len(drawn) == CONTROL_PLANES and len(set(drawn.tolist())) == CONTROL_PLANES
        for j, p in enumerate(drawn):
            expected = pair_stats(np.take(core, p - 1, axis), np.take(core, p, axis))
            assert stats[i, j].tolist() == expected.tolist()
    assert stats[0, -2].tolist() == [2, 0, 0]  # z planes 0|1: object 1 goes on
    assert stats[0, -1].tolist() == [2, 0, 0]  # z planes 4|5: object 2 goes on
    assert stats[1, -2].tolist() == [4, 0, 0]  # along y both objects go on everywhere
    # another tile draws other places (borders all lie at one phase of the grid)
    assert any(control_positions(64, t, 0).tolist() != control_positions(64, 0, 0).tolist()
               for t in range(1, 4))


def test_rows_of_objects_at_every_border_are_not_a_bad_seam() -> None:
    """Objects in rows whose ends all fall on the tile borders: the same at the planes next to
    the faces, so the run is clean (it equals the untiled one)."""
    labels = np.zeros((240, 240), np.int32)
    n = 0
    for y0 in range(0, 240, 12):  # rows of 10 x 10 squares, a row ending at every 12th plane
        for x0 in range(1, 239, 12):
            n += 1
            labels[y0 + 1:y0 + 11 + (y0 % 24 == 0), x0:x0 + 10] = n
    out = tile_process(labels, lambda t: t.astype(np.int32), (60, 60), 4, stitch="iou",
                       progress=False)
    assert np.array_equal(out[:] > 0, labels > 0)
    seams = _seams(out)
    assert seams["verdict"] == "clean", seams["axes"]


def _seams(out):
    seams = run_report(out).seams
    assert seams is not None
    return seams


def test_too_little_overlap_is_flagged(nuclei: np.ndarray, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Objects larger than the overlap, split by a watershed that sees only their part."""
    with caplog.at_level(logging.WARNING, "blockbuster"):
        out = tile_process(nuclei, watershed20, (128, 128), overlap=1, stitch="iou",
                           output=tmp_path / "bad.zarr", seam_table=True, progress=False)
    seams = _seams(out)
    assert seams["verdict"] == "worse than controls"
    worse = [ax for ax in seams["axes"] if ax["worse"]]
    assert worse and all(ax["seam"]["orphan_rate"] > 2 * ax["control"]["orphan_rate"]
                         for ax in worse)
    assert seams["worst"], "the warning names the worst borders"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "tile borders look worse" in warning
    first = seams["worst"][0]
    assert f"tiles {first['tile_a']}|{first['tile_b']}" in warning
    # the table: one row per pair of face neighbours (4 x 4 tiles: 2 * 4 * 3 borders)
    table = tmp_path / "bad.zarr.seams.tsv"
    rows = list(csv.DictReader(table.open(), delimiter="\t"))
    assert len(rows) == 24 == seams["borders"]
    assert sum(int(r["orphans"]) for r in rows) == sum(ax["seam"]["orphans"]
                                                       for ax in seams["axes"])
    assert {r["axis"] for r in rows} == {"y", "x"}


def test_enough_overlap_is_clean(nuclei: np.ndarray, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "blockbuster"):
        out = tile_process(nuclei, watershed20, (128, 128), overlap=24, stitch="iou",
                           output=tmp_path / "good.zarr", progress=False)
    seams = _seams(out)
    assert seams["verdict"] == "clean"
    assert seams["flagged"] == 0
    assert all(ax["seam"]["objects"] > 30 for ax in seams["axes"])  # the test has power
    assert not any("tile borders" in r.getMessage() for r in caplog.records)


def test_connected_components_with_faces_is_clean(tmp_path: Path) -> None:
    mask = ndimage.binary_opening(np.random.default_rng(1).random((96, 96, 96)) < 0.45)
    out = tile_process(mask, lambda t: ndimage.label(t)[0], (32, 32, 32), stitch="faces",
                       output=tmp_path / "cc.zarr", seam_table=tmp_path / "seams.csv",
                       progress=False)
    seams = _seams(out)
    assert seams["verdict"] == "clean" and seams["borders"] == 3 * 3 * 3 * 2
    rows = list(csv.DictReader((tmp_path / "seams.csv").open()))
    assert len(rows) == 54 and all(r["flagged"] == "0" for r in rows)


def test_no_stitching_has_no_seam_report(tmp_path: Path) -> None:
    out = tile_process(np.ones((8, 8), np.uint8), lambda t: t.astype(np.int32), (4, 4),
                       stitch="none", output=tmp_path / "n.zarr", progress=False)
    assert run_report(out).seams is None


def test_info_shows_the_seam_report(nuclei: np.ndarray, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    tile_process(nuclei[:256, :256], watershed20, (64, 64), overlap=1, stitch="iou",
                 output=tmp_path / "o.zarr", progress=False)
    assert main(["info", str(tmp_path / "o.zarr")]) == 0
    text = capsys.readouterr().out
    assert "seams:" in text and "along y:" in text and "at control planes" in text


def test_cli_segment_prints_seams_and_writes_the_table(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((384, 384), diameter=12, seed=2)
    tifffile.imwrite(tmp_path / "img.tif", image)
    out = tmp_path / "img.labels.zarr"
    code = main(["-q", "segment", str(tmp_path / "img.tif"), str(out), "--tile-shape", "128,128",
                 "--overlap", "auto", "--seam-table"])
    text = capsys.readouterr().out
    assert code == 0
    assert "overlap: auto chose" in text and "seams:" in text and "along x:" in text
    rows = list(csv.DictReader((tmp_path / "img.labels.zarr.seams.tsv").open(), delimiter="\t"))
    assert len(rows) == 12  # 3 x 3 tiles: 2 * 3 * 2 borders
    assert run_report(out).overlap_auto["chosen"] == run_report(out).params["depth"]


def _scalar_test(rate: float, dispersion: float, k: int, n: int) -> tuple[bool, float]:
    """The per-border test written out one border at a time (the reference)."""
    import math

    if n == 0:
        return False, 1.0
    expected = n * rate
    z = (k - expected) / math.sqrt(dispersion * n * rate * (1 - rate))
    pv = 0.5 * math.erfc(z / math.sqrt(2))
    return (pv < seams.P_VALUE and k >= seams.RATE_RATIO * expected
            and n >= seams.MIN_OBJECTS), pv


def _random_rows(n: int, orphan_rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, len(seams.COLUMNS)), np.int32)
    rows[:, 0], rows[:, 1] = np.arange(n), np.arange(n) + 1
    rows[:, 2], rows[:, 3] = rng.integers(0, 2, n), rng.integers(0, 5000, n)
    rows[:, 4] = rng.integers(0, 60, n)
    rows[:, 6] = rng.binomial(rows[:, 4], orphan_rate)
    rows[:, 5] = rows[:, 4] - rows[:, 6]
    return rows


@settings(max_examples=20, deadline=None)
@given(st.floats(0.05, 0.3), st.integers(0, 2**16))
def test_border_flags_equal_the_test_one_border_at_a_time(orphan_rate: float,
                                                          seed: int) -> None:
    """Every border is tested at once; the flags and the worst borders are those of testing
    each border alone against its axis's higher control rate."""
    rows = _random_rows(300, orphan_rate, seed)
    control = np.array([[1000, 3000, 300, 40, 10, 1], [800, 2000, 150, 20, 8, 1]], float)
    near = np.array([[900, 2500, 200, 30, 9, 1], [700, 2100, 260, 40, 9, 1]], float)
    report = seams.SeamReport.build(rows, control, near, ["y", "x"], (0, 1))
    expected = []
    for row in rows.tolist():
        baselines = [seams._Baseline.of(c[row[2]], seams._ORPH) for c in (control, near)]
        worst = max(baselines, key=lambda b: b.rate)
        expected.append((*_scalar_test(worst.rate, worst.dispersion, row[6], row[4]),
                         row[6] - row[4] * worst.rate))
    assert report.flags.tolist() == [e[0] for e in expected]
    suspect = [i for i, e in enumerate(expected)
               if e[0] or (e[1] < seams.SUSPECT_P and e[2] > 0)]
    ranked = sorted(suspect, key=lambda i: (expected[i][1], -expected[i][2]))
    assert [w["tile_a"] for w in report.worst] == ranked[:seams.WORST_KEPT]


def test_the_seam_table_is_written_in_slices(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _random_rows(50, 0.3, 0)
    control = np.array([[1000, 3000, 300, 40, 10, 1]] * 2, float)
    report = seams.SeamReport.build(rows, control, control, ["y", "x"], (0, 1))
    whole = seams.write_seam_table(report, ["y", "x"], tmp_path / "whole.csv").read_text()
    monkeypatch.setattr(seams, "TABLE_SLICE", 7)
    sliced = seams.write_seam_table(report, ["y", "x"], tmp_path / "sliced.csv").read_text()
    assert sliced == whole and len(whole.splitlines()) == 51
