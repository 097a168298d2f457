"""``blockbuster measure | relate | postprocess | upsample``: the CLI gives the API's answers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from blockbuster import measure, relate
from blockbuster.cli import main
from blockbuster.data import write_synthetic_nuclei
from blockbuster.postprocess import expand_labels, fill_holes, filter_by_size
from blockbuster.table import read_object_table

from helpers import prepared


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small OME-Zarr image with its true labels, voxel size 2 x 0.5 x 0.5 µm."""
    path = tmp_path_factory.mktemp("cli") / "nuclei.ome.zarr"
    write_synthetic_nuclei(path, (12, 96, 80), chunks=(6, 48, 40), diameter=10, ome=True,
                           with_labels=True, scale=(2.0, 0.5, 0.5))
    return path


def test_measure_writes_the_apis_table_next_to_the_labels(image, capsys):
    labels = image / "labels" / "truth"
    assert main(["measure", str(labels), "--image", str(image), "-q"]) == 0
    written = image.with_name("nuclei.ome.zarr.truth.measurements.csv")
    assert str(written) in capsys.readouterr().out
    table = read_object_table(written)
    expected = measure(labels, image, progress=False)
    assert list(table) == list(expected)
    np.testing.assert_array_equal(table["volume_um3"], expected["volume_um3"])
    np.testing.assert_array_equal(table["std_intensity"], expected["std_intensity"])


def test_relate_and_postprocess_chain(image, tmp_path, capsys):
    labels = image / "labels" / "truth"
    cells = tmp_path / "cells.zarr"
    assert main(["postprocess", str(labels), "-o", str(cells), "--fill-holes",
                 "--min-size", "20um3", "--expand", "1.5um", "-q"]) == 0
    out = capsys.readouterr().out
    assert "fill holes, size filter, expand" in out
    step1 = fill_holes(labels, output=tmp_path / "a.zarr", progress=False)
    step2 = filter_by_size(tmp_path / "a.zarr", min_size=20, unit="um3",
                           output=tmp_path / "b.zarr", progress=False)
    expected = expand_labels(tmp_path / "b.zarr", 1.5, unit="um", output=tmp_path / "c.zarr",
                             progress=False)
    assert step1.shape == step2.shape
    np.testing.assert_array_equal(zarr.open_array(str(cells), mode="r")[:], expected[:])
    assert not list(tmp_path.glob(".blockbuster-*"))  # intermediate steps are cleaned up

    assert main(["relate", str(labels), str(cells), "--max-distance", "2um",
                 "-o", str(tmp_path / "rel.csv"), "-q"]) == 0
    children = read_object_table(tmp_path / "rel.csv")
    parents = read_object_table(tmp_path / "rel.parents.csv")
    api = relate(labels, cells, max_distance=2.0, unit="um", progress=False)
    np.testing.assert_array_equal(children["parent"], api.children["parent"])
    np.testing.assert_array_equal(parents["n_children"], api.parents["n_children"])
    assert (children["parent"] > 0).sum() >= len(parents["label"])


def test_upsample_to_the_shape_of_an_image(image, tmp_path, capsys):
    from blockbuster.ome import downsample_block

    truth = zarr.open_array(str(image / "labels" / "truth" / "0"), mode="r")[:]
    level1 = downsample_block(truth, (2, 2, 2))
    small = tmp_path / "small.zarr"
    zarr.create_array(store=str(small), data=level1, chunks=(6, 24, 20))
    assert main(["upsample", str(small), "--like", str(image), "-o", str(tmp_path / "up.zarr"),
                 "-q"]) == 0
    up = zarr.open_array(str(tmp_path / "up.zarr"), mode="r")
    assert up.shape == (12, 96, 80)
    factors = [round(a / b) for a, b in zip(up.shape, level1.shape, strict=True)]
    expected = level1
    for axis, f in enumerate(factors):
        expected = np.repeat(expected, f, axis=axis)
    np.testing.assert_array_equal(up[:], expected[:12, :96, :80])


@pytest.mark.parametrize(("argv", "message"), [
    (["postprocess", "LABELS"], "nothing to do"),
    (["postprocess", "LABELS", "--min-size", "20um3", "--max-size", "900"], "same unit"),
    (["relate", "LABELS", "LABELS", "--max-distance", "5 parsecs"], "not understood"),
    (["measure", "LABELS", "--image", "missing.zarr"], "not found"),
])
def test_bad_arguments_are_one_line_errors(image, argv, message, capsys):
    argv = [str(image / "labels" / "truth") if a == "LABELS" else a for a in argv]
    try:
        code = main([*argv, "-q"])
    except SystemExit as exc:  # argument parsing errors exit from argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_command_runs_in_a_subprocess(image, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blockbuster", "measure",
                           str(image / "labels" / "truth"), "-o", str(tmp_path / "m.parquet")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "table:" in proc.stdout
    assert "volume_um3" in read_object_table(tmp_path / "m.parquet")


def test_cells_with_measurements_from_the_command_line(tmp_path, capsys):
    """``segment --method cells --table --measure`` on a two-channel OME-Zarr image: the labels
    of ``tile_process`` with the same segmenter, id for id, and the table of ``measure``."""
    from ome_zarr.writer import write_image

    from blockbuster import open_labels, tile_process
    from blockbuster.data import synthetic_cells
    from blockbuster.plugins.cells import CellsSegmenter

    image, _, _ = synthetic_cells((128, 112), nucleus_diameter=10, seed=4)
    path = tmp_path / "tissue.ome.zarr"
    write_image(image, zarr.open_group(str(path), mode="w"), axes="cyx", scaler=None,
                storage_options={"chunks": (2, 64, 56)})
    out = tmp_path / "cells.zarr"
    assert main(["segment", str(path), str(out), "--method", "cells", "--diameter", "20",
                 "--tile-shape", "64,56", "--table", "--measure", "-q"]) == 0
    labels = open_labels(out)[:]
    api = tile_process(path, CellsSegmenter(diameter=20), (64, 56), output=tmp_path / "api.zarr",
                       progress=False)[:]
    np.testing.assert_array_equal(labels, api)
    whole = prepared(CellsSegmenter(diameter=20), image, channel_axis=0)(image)
    assert labels.max() == whole.max()  # no cell split or lost at a tile border
    table = read_object_table(next(tmp_path.glob("cells.zarr.objects.*")))
    expected = measure(labels, image, channel_axis=0, progress=False)
    for column in ("label", "voxels", "centroid_y", "mean_intensity_ch1", "std_intensity_ch0"):
        # (the run's CSV table gives centroids to 3 decimals)
        np.testing.assert_allclose(table[column], expected[column], rtol=1e-9, atol=5e-4,
                                   err_msg=column)


def test_a_lower_pyramid_level_from_the_command_line(tmp_path):
    """``--level 1``: a diameter in µm counts that level's voxels, and the labels are those of
    ``tile_process(..., level=1)``, at that level's shape."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    from blockbuster import open_labels, tile_process
    from blockbuster.data import synthetic_nuclei
    from blockbuster.plugins.watershed import WatershedSegmenter

    path = tmp_path / "img.ome.zarr"  # voxels of 0.5 µm, level 1 of 1 µm
    write_image(synthetic_nuclei((256, 256), seed=2)[0],
                zarr.open_group(str(path), mode="w", zarr_format=2), axes="yx",
                scale_factors=[2], fmt=FormatV04(), scale={"y": 0.5, "x": 0.5},
                axes_units={"y": "micrometer", "x": "micrometer"})
    for level, pixels in ((0, 12.0), (1, 6.0)):  # 6 µm: 12 voxels of 0.5 µm, 6 of 1 µm
        proc = subprocess.run([sys.executable, "-m", "blockbuster", "segment", str(path),
                               "--level", str(level), "--diameter", "6um", "--tile-shape",
                               "64,64", "--dry-run", "--json"],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["segmenter"]["diameter"] == pixels
    out = tmp_path / "low.zarr"
    assert main(["segment", str(path), str(out), "--level", "1", "--diameter", "6",
                 "--tile-shape", "64,64", "-q"]) == 0
    api = tile_process(path, WatershedSegmenter(diameter=6), (64, 64), level=1,
                       output=tmp_path / "api.zarr", progress=False)
    labels = open_labels(out)
    assert labels.shape == api.shape == (128, 128)  # level 1 of 256 x 256
    np.testing.assert_array_equal(labels[:], api[:])
