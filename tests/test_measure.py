"""Measurements out of core equal scikit-image's regionprops on the whole image, for any tiling."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.measure import regionprops_table

from blockbuster import measurements as measure_api
from blockbuster.errors import IncompleteOutputError, InputError
from blockbuster.measurements import MeasurementReducer, measure, tile_measurements
from blockbuster.table import read_object_table


def blocky_labels(rng: np.random.Generator, shape: tuple[int, ...], n: int,
                  block: int) -> np.ndarray:
    """Random labels 0..n painted in blocks, so objects cross tiles (and are not connected)."""
    coarse = [max(1, -(-s // block)) for s in shape]
    labels = rng.integers(0, n + 1, coarse)
    for axis in range(len(shape)):
        labels = np.repeat(labels, block, axis=axis)
    return labels[tuple(slice(0, s) for s in shape)].astype(np.uint32)


@st.composite
def labelled_images(draw, ndim: int | None = None):
    ndim = ndim or draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 24 if ndim == 2 else 10)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = blocky_labels(rng, shape, draw(st.integers(1, 12)), draw(st.integers(1, 4)))
    channels = draw(st.integers(1, 3))
    offset = draw(st.sampled_from([0.0, 1e7]))  # a bright, flat channel tests the stable combine
    image = (offset + rng.normal(100, 20, (*shape, channels))).astype(np.float64)
    tile = tuple(draw(st.integers(1, s)) for s in shape)
    return labels, image, tile


def regionprops_reference(labels: np.ndarray, image: np.ndarray,
                          spacing: tuple[float, ...]) -> dict[str, np.ndarray]:
    props = ("label", "area", "bbox", "centroid", "intensity_mean", "intensity_min",
             "intensity_max", "intensity_std")
    voxels = regionprops_table(labels, image, properties=props)
    physical = regionprops_table(labels, properties=("area", "centroid"), spacing=spacing)
    return {**voxels, **{f"um_{k}": v for k, v in physical.items()}}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labelled_images())
def test_tiled_measurements_equal_regionprops_on_the_whole_image(case):
    labels, image, tile = case
    ndim = labels.ndim
    spacing = (2.0, 0.5, 0.25)[-ndim:]
    names = list("zyx"[-ndim:])
    table = measure(labels, image, channel_axis=-1, spacing=spacing, tile_shape=tile,
                    progress=False)
    ref = regionprops_reference(labels, image, spacing)
    np.testing.assert_array_equal(table["label"], ref["label"])
    np.testing.assert_array_equal(table["voxels"], ref["area"])
    size = "area_um2" if ndim == 2 else "volume_um3"
    np.testing.assert_allclose(table[size], ref["um_area"])
    for axis, name in enumerate(names):
        np.testing.assert_array_equal(table[f"bbox_min_{name}"], ref[f"bbox-{axis}"])
        np.testing.assert_array_equal(table[f"bbox_max_{name}"], ref[f"bbox-{axis + ndim}"])
        np.testing.assert_allclose(table[f"centroid_{name}"], ref[f"centroid-{axis}"])
        np.testing.assert_allclose(table[f"centroid_{name}_um"], ref[f"um_centroid-{axis}"])
        np.testing.assert_allclose(table[f"bbox_max_{name}_um"],
                                   ref[f"bbox-{axis + ndim}"] * spacing[axis])
    for c in range(image.shape[-1]):
        ch = f"_ch{c}"
        mean = ref[f"intensity_mean-{c}"]
        np.testing.assert_allclose(table[f"mean_intensity{ch}"], mean, rtol=1e-12)
        np.testing.assert_array_equal(table[f"min_intensity{ch}"], ref[f"intensity_min-{c}"])
        np.testing.assert_array_equal(table[f"max_intensity{ch}"], ref[f"intensity_max-{c}"])
        # relative to the spread, not to the (possibly huge) mean: the combine is stable
        np.testing.assert_allclose(table[f"std_intensity{ch}"], ref[f"intensity_std-{c}"],
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(table[f"integrated_intensity{ch}"], mean * ref["area"],
                                   rtol=1e-12)


def test_an_unstable_combine_would_fail_on_a_bright_flat_object():
    """Sum-of-squares variance loses everything at this offset; the stable combine does not."""
    rng = np.random.default_rng(3)
    labels = np.ones((64, 64), np.uint8)
    image = 1e9 + rng.normal(0, 1, labels.shape)
    table = measure(labels, image, tile_shape=(8, 8), progress=False)
    naive_variance = np.mean(image**2) - np.mean(image) ** 2
    assert abs(naive_variance - image.var()) > 0.5  # the naive formula is far off
    np.testing.assert_allclose(table["std_intensity"], [image.std()], rtol=1e-6)


def test_pieces_of_one_object_in_one_tile_are_combined():
    """Two local labels of one tile can be one final object (joined through a neighbour)."""
    labels = np.array([[1, 0, 2, 2], [1, 1, 0, 2]])
    image = np.array([[1.0, 9.0, 5.0, 7.0], [2.0, 3.0, 9.0, 11.0]])
    reducer = MeasurementReducer(2, 1)
    reducer.add(tile_measurements(labels, 2, image), np.array([0, 5, 5]))
    table = reducer.columns()
    values = image[labels > 0]
    assert table["label"].tolist() == [5]
    np.testing.assert_allclose(table["std_intensity"], [values.std()])
    np.testing.assert_allclose(table["centroid_x"], [np.nonzero(labels)[1].mean()])


def test_measure_a_blockbuster_style_ome_output_with_units(tmp_path):
    from blockbuster.data import write_synthetic_nuclei

    path = tmp_path / "img.ome.zarr"
    write_synthetic_nuclei(path, (24, 96, 80), chunks=(8, 32, 32), diameter=10, ome=True,
                           with_labels=True, scale=(2.0, 0.5, 0.5))
    labels = zarr.open_array(str(path / "labels" / "truth" / "0"), mode="r")[:]
    image = zarr.open_array(str(path / "0"), mode="r")[:]
    out = tmp_path / "m.parquet"
    table = measure(path / "labels" / "truth", path, output=out, progress=False)
    ref = regionprops_table(labels, image, properties=("label", "area", "centroid",
                                                       "intensity_mean"), spacing=(2, .5, .5))
    np.testing.assert_array_equal(table["label"], ref["label"])
    np.testing.assert_allclose(table["volume_um3"], ref["area"])
    np.testing.assert_allclose(table["centroid_z_um"], ref["centroid-0"])
    np.testing.assert_allclose(table["mean_intensity"], ref["intensity_mean"])
    back = read_object_table(out)
    assert list(back) == list(table)
    np.testing.assert_array_equal(back["mean_intensity"], table["mean_intensity"])


def test_csv_round_trip_keeps_every_float(tmp_path):
    rng = np.random.default_rng(0)
    labels = blocky_labels(rng, (30, 30), 5, 4)
    image = rng.random((30, 30))
    table = measure(labels, image, spacing=(0.3, 0.3), output=tmp_path / "m.csv",
                    progress=False)
    back = read_object_table(tmp_path / "m.csv")
    assert list(back) == list(table)
    for name, column in table.items():
        np.testing.assert_array_equal(back[name], column)
        assert back[name].dtype.kind == column.dtype.kind


def test_channel_names_from_ome_metadata_and_selection(tmp_path):
    rng = np.random.default_rng(1)
    labels = blocky_labels(rng, (32, 40), 6, 5)
    image = rng.integers(0, 1000, (3, 32, 40)).astype(np.uint16)
    path = tmp_path / "three.ome.zarr"
    _write_ome_image(path, image, ["DAPI", "GFP", "Alexa 568"])
    table = measure(labels, path, channels=["Alexa 568", "DAPI"], progress=False)
    assert "mean_intensity_Alexa_568" in table and "max_intensity_DAPI" in table
    assert not any(k.endswith("_GFP") for k in table)
    ref = regionprops_table(labels, image[2], properties=("intensity_mean",))
    np.testing.assert_allclose(table["mean_intensity_Alexa_568"], ref["intensity_mean"])
    by_index = measure(labels, path, channels=[1], progress=False)
    assert "mean_intensity_GFP" in by_index
    with pytest.raises(InputError, match="no channel named RFP"):
        measure(labels, path, channels=["RFP"], progress=False)


def _write_ome_image(path, image, names):
    from blockbuster.ome import write_multiscales

    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", data=image, chunks=(1, 16, 16))
    write_multiscales(group, axes=["c", "y", "x"], scale=[1.0, 1.0, 1.0], factors=[])
    attrs = group.attrs.asdict()
    attrs["ome"]["omero"] = {"channels": [{"label": n} for n in names]}
    group.attrs.put(attrs)


def test_unnamed_channels_take_names_in_order_or_indices():
    rng = np.random.default_rng(2)
    labels = blocky_labels(rng, (16, 16), 3, 4)
    image = rng.random((16, 16, 2))
    table = measure(labels, image, channel_axis=-1, channels=["nuc", "mem"], progress=False)
    assert "mean_intensity_nuc" in table and "mean_intensity_mem" in table
    with pytest.raises(InputError, match="2 unnamed channel"):
        measure(labels, image, channel_axis=-1, channels=["nuc"], progress=False)
    with pytest.raises(InputError, match="out of range"):
        measure(labels, image, channel_axis=-1, channels=[2], progress=False)


def test_labels_only_and_no_spacing_give_voxel_columns_only():
    labels = np.zeros((5, 5), np.int32)
    labels[1:3, 1:4] = 7
    table = measure(labels, progress=False)
    assert table["label"].tolist() == [7] and table["voxels"].tolist() == [6]
    assert not any(k.endswith("_um") or "intensity" in k for k in table)


def test_wrong_inputs_are_refused(tmp_path):
    labels = np.ones((4, 4), np.uint8)
    with pytest.raises(InputError, match="spatial shape"):
        measure(labels, np.zeros((5, 4)), progress=False)
    with pytest.raises(InputError, match="integers"):
        measure(np.ones((4, 4), np.float32), progress=False)
    with pytest.raises(InputError, match="spacing"):
        measure(labels, spacing=(1.0, -1.0), progress=False)
    partial = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=(4, 4), dtype="uint32",
                                attributes={"blockbuster": {"complete": False, "params": {}}})
    with pytest.raises(IncompleteOutputError):
        measure(partial, progress=False)


def test_public_api_is_lazy():
    import blockbuster

    assert blockbuster.measure is measure_api.measure
    assert blockbuster.tile_measurements is measure_api.tile_measurements


@pytest.mark.parametrize("stitch", ["faces", "iou"])
def test_the_table_made_during_a_run_equals_measure_afterwards(tmp_path, stitch):
    """tile_process(table=True, measure=True) on a calibrated two-channel OME-Zarr image: the
    same rows as measuring the written labels afterwards, and as regionprops on the whole."""
    from scipy import ndimage

    from blockbuster import tile_process

    rng = np.random.default_rng(5)
    mask = ndimage.binary_opening(rng.random((90, 70)) > 0.5)
    image = np.stack([mask * 1000 + rng.integers(0, 50, mask.shape),
                      rng.integers(0, 4000, mask.shape)]).astype(np.uint16)
    path = tmp_path / "img.ome.zarr"  # NGFF 0.4, as bioformats2raw and ome-zarr-py write it
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=image, chunks=(1, 30, 30))
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "img",
        "axes": [{"name": "c", "type": "channel"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.5, 0.25]}]}]}]

    def segment(tile):  # channel 0 holds the nuclei
        return ndimage.label(tile[0] > 500)[0]

    out = tile_process(path, segment, (30, 30), 4 if stitch == "iou" else 0, stitch=stitch,
                       table=tmp_path / "run.csv", measure=True, progress=False)
    during = read_object_table(tmp_path / "run.csv")
    after = measure(out[:], image, channel_axis=0, spacing=(0.5, 0.25))
    assert sorted(during) == sorted(after)  # centroid_y_um, mean_intensity_<channel>...
    for name, values in after.items():
        np.testing.assert_allclose(during[name], values, rtol=1e-6, atol=2e-3, err_msg=name)
    assert "area_um2" in during and "mean_intensity_ch1" in during
