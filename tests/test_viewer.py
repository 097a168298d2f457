"""The napari layers of an output, built and checked without napari."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml
from test_stitching import local_threshold_watershed

from blockbuster import run_report, tile_process
from blockbuster.cli import main
from blockbuster.data import write_synthetic_nuclei
from blockbuster.errors import InputError
from blockbuster.viewer import napari_get_reader, output_layers

ROOT = Path(__file__).resolve().parents[1]


def watershed20(tile: np.ndarray) -> np.ndarray:
    return local_threshold_watershed(tile, 20)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated OME-Zarr image segmented with too little overlap, with an object table."""
    folder = tmp_path_factory.mktemp("view")
    image = folder / "img.ome.zarr"
    write_synthetic_nuclei(image, (512, 512), chunks=(128, 128), diameter=20, density=0.6,
                           seed=3, ome=True, scale=(0.5, 0.25))
    out = folder / "labels.zarr"
    tile_process(str(image), watershed20, (128, 128), overlap=1, stitch="iou", output=out,
                 ome=False, table=True, progress=False)
    return out


def test_layers_of_an_output(bad_run: Path) -> None:
    layers = output_layers(bad_run)
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels", "points"]
    (img, img_kw, _), (lab, lab_kw, _), (pts, pts_kw, _) = layers
    assert img.shape == lab.shape == (512, 512)
    assert img_kw["scale"] == lab_kw["scale"] == [0.5, 0.25]  # physical, from the input
    # the object table as features, one row per label
    features = lab_kw["features"]
    n = run_report(bad_run).n_labels
    assert sorted(features["index"].tolist()) == list(range(1, n + 1))
    assert "voxels" in features
    # a cross per flagged border, on the border itself
    seams = run_report(bad_run).seams
    assert seams is not None and len(pts) == len(seams["worst"]) > 0
    first = seams["worst"][0]
    axis = ["y", "x"].index(first["axis"])
    assert pts[0][axis] == first["position"]
    assert pts_kw["features"]["orphans"][0] == first["orphans"]
    assert pts_kw["scale"] == [0.5, 0.25]


def test_layers_without_the_image(bad_run: Path) -> None:
    assert [kind for _, _, kind in output_layers(bad_run, image=False)] == ["labels", "points"]


def test_reader_opens_outputs_only(bad_run: Path, tmp_path: Path) -> None:
    reader = napari_get_reader(str(bad_run))
    assert callable(reader)
    assert [k for _, _, k in reader(str(bad_run))] == ["image", "labels", "points"]
    assert napari_get_reader(str(tmp_path)) is None  # not ours: napari asks the next reader
    assert napari_get_reader(str(bad_run.parent / "img.ome.zarr")) is None
    with pytest.raises(InputError, match="not a complete"):
        output_layers(tmp_path)


def test_manifest_names_the_reader() -> None:
    manifest = yaml.safe_load((ROOT / "src/blockbuster/napari.yaml").read_text())
    command = manifest["contributions"]["commands"][0]
    module, name = command["python_name"].split(":")
    assert getattr(importlib.import_module(module), name) is napari_get_reader
    assert manifest["contributions"]["readers"][0]["command"] == command["id"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["napari.manifest"]["blockbuster"] == "blockbuster:napari.yaml"
    extras = project["optional-dependencies"]
    assert any(r.startswith("napari") for r in extras["napari"])
    assert not any(r.startswith(("napari", "npe2")) for r in extras["test"])


def test_view_without_napari_says_how_to_get_it(bad_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "napari" else real(name, *a))
    code = main(["view", str(bad_run)])
    assert code != 0
    assert 'pip install "blockbuster[napari]"' in capsys.readouterr().err
