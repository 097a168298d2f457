"""Preview before a run (tiled against untiled on a window) and overlap="auto"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from test_stitching import local_threshold_watershed

from blockbuster import choose_overlap, preview_tiling, run_report, tile_process
from blockbuster.cli import main
from blockbuster.compare import compare, disagreement
from blockbuster.errors import InputError
from blockbuster.tilecheck import busiest_window, overlap_candidates


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((512, 512), diameter=20, density=0.6, touching=True, seed=3)
    return image


def watershed20(tile: np.ndarray) -> np.ndarray:
    return local_threshold_watershed(tile, 20)


def connected(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 20000)[0]


def test_compare_counts_fused_and_split() -> None:
    ref = np.zeros((10, 10), int)
    ref[:, :5], ref[:, 5:] = 1, 2
    fused = np.ones((10, 10), int)
    r = compare(ref, fused)
    assert (r["fused"], r["split"], r["f1"]) == (1, 0, 0.0)
    split = ref.copy()
    split[:5, :5] = 3
    r = compare(ref, split)
    assert r["split"] == 1 and r["fused"] == 0 and r["matched"] == 1
    assert disagreement(ref, split)[:, :5].all() and not disagreement(ref, split)[:, 5:].any()


def test_busiest_window_finds_the_structure() -> None:
    from blockbuster.io import open_image

    rng = np.random.default_rng(0)
    image = np.full((256, 256), 100.0) + rng.normal(0, 1, (256, 256))
    image[160:224, 32:96] += rng.normal(0, 80, (64, 64)) ** 2  # the only structure
    starts = [np.arange(0, 257, 32)] * 2
    first = busiest_window(open_image(image), starts, 2)
    # the 2 x 2 window holds tiles 5..6 along y and 1..2 along x (the structure)
    assert first[0] in (4, 5) and first[1] in (0, 1)
    assert (first[0] + 2) * 32 >= 224 and first[0] * 32 <= 160


def test_preview_of_an_exact_tiling_is_identical(tmp_path: Path) -> None:
    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((256, 320), seed=1)
    check = preview_tiling(image, connected, tile_shape=(64, 64), stitch="faces", tiles=2,
                           at=(100, 300), png=tmp_path / "p.png")
    assert check.window == [[64, 192], [192, 320]]  # the 2 x 2 tiles around the voxel
    assert check.identical and check.figures["voxels_one_to_one"] == 1.0
    assert check.tiled is not None and check.tiled.shape == (128, 128)
    with Image.open(tmp_path / "p.png") as im:
        assert im.width > 2 * im.height * 0.9  # two panels side by side
    assert json.loads(json.dumps(check.as_dict()))["identical"] is True


def test_preview_shows_what_too_little_overlap_does(nuclei: np.ndarray, tmp_path: Path) -> None:
    bad = preview_tiling(nuclei, watershed20, tile_shape=(128, 128), overlap=1, stitch="iou",
                         png=tmp_path / "bad.png")
    assert not bad.identical
    assert bad.figures["f1"] < 1.0 and bad.figures["split"] + bad.figures["fused"] > 0
    # the red disagreements are drawn where the labels disagree
    rgb = np.asarray(Image.open(tmp_path / "bad.png"))
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 120) & (rgb[..., 2] < 120)
    assert red.sum() > 50
    good = preview_tiling(nuclei, watershed20, tile_shape=(128, 128), overlap=32,
                          stitch="iou")
    assert good.identical
    assert good.window == bad.window  # the same busiest window


def test_preview_refuses_bad_arguments(nuclei: np.ndarray) -> None:
    with pytest.raises(InputError, match="tiles"):
        preview_tiling(nuclei, connected, tiles=0)
    with pytest.raises(InputError, match="inside the image"):
        preview_tiling(nuclei, connected, tile_shape=(128, 128), at=(600, 3))


def test_a_tiling_of_one_tile_is_refused_at_once_and_needs_no_overlap(nuclei: np.ndarray,
                                                                      tmp_path: Path) -> None:
    """'auto' tiles can hold the whole image: nothing to preview, and no overlap to choose."""
    calls = []

    def counted(tile: np.ndarray) -> np.ndarray:
        calls.append(tile.shape)
        return connected(tile)

    with pytest.raises(InputError, match=r"one tile.*tile_shape"):
        preview_tiling(nuclei, counted)  # "auto": the 512 x 512 image fits in one tile
    assert not calls
    out = tile_process(nuclei, counted, "auto", overlap="auto", output=tmp_path / "one.zarr",
                       progress=False)
    assert run_report(out).overlap_auto["chosen"] == [0, 0]
    assert calls == [(512, 512)]


def test_overlap_candidates_are_on_the_grid() -> None:
    cands = overlap_candidates((64, 128), (8, 16), "iou")
    assert all(o % 8 == 0 and p % 16 == 0 for o, p in cands)
    assert all(o < 64 and p < 128 for o, p in cands)
    assert cands == sorted(cands)


def test_choose_overlap_picks_the_smallest_exact(nuclei: np.ndarray) -> None:
    choice = choose_overlap(nuclei, watershed20, tile_shape=(128, 128), stitch="iou")
    assert choice.found
    last = choice.curve[-1]
    assert last["identical"] and tuple(last["overlap"]) == tuple(choice.chosen)
    assert all(not c["identical"] for c in choice.curve[:-1])
    assert len(choice.curve) >= 2  # the first overlaps tried are too small here
    # connected components need no halo at all with faces
    cc = choose_overlap(nuclei, connected, tile_shape=(128, 128), stitch="faces")
    assert cc.found and cc.chosen == [0, 0]


def test_tile_process_overlap_auto_stores_the_curve(nuclei: np.ndarray, tmp_path: Path) -> None:
    out = tile_process(nuclei, watershed20, (128, 128), overlap="auto", stitch="iou",
                       output=tmp_path / "auto.zarr", progress=False)
    report = run_report(out)
    auto = report.overlap_auto
    assert auto is not None and auto["found"]
    assert report.params["depth"] == auto["chosen"]
    assert auto["curve"][-1]["f1"] == 1.0


def test_cli_preview_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    from blockbuster.data import synthetic_nuclei

    image, _ = synthetic_nuclei((384, 384), diameter=12, seed=2)
    tifffile.imwrite(tmp_path / "img.tif", image)
    png = tmp_path / "out.png"
    code = main(["preview", str(tmp_path / "img.tif"), "--tile-shape", "128,128", "--overlap",
                 "auto", "--json", "--png", str(png), "--tiles", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] and result["overlap_auto"]["found"]
    assert result["overlap"] == result["overlap_auto"]["chosen"]
    assert png.exists()
    code = main(["preview", str(tmp_path / "img.tif"), "--tile-shape", "128,128", "--overlap",
                 "2", "--png", str(png), "--tiles", "2", "--at", "150,250"])
    text = capsys.readouterr().out
    # 150 lies in the low half of its tile, 250 in the high half: the window leans that way
    assert code == 0 and "F1" in text and "window:   [0:256, 128:384]" in text
