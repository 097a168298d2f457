"""Readers: each layout written by the tool that normally writes it, read back with its axes,
calibration and channels, streamed, and segmented like the same pixels in memory."""

from __future__ import annotations

import functools
import http.server
import json
import pickle
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.data import synthetic_nuclei
from blockbuster.errors import InputError, PluginNotInstalledError
from blockbuster.io import ImageSource, open_image, reader_table
from blockbuster.io.source import sample_boxes

from helpers import same_partition

h5py = pytest.importorskip("h5py")


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 600)[0]


def nuclei(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return synthetic_nuclei(shape, diameter=9, seed=seed)[0]


def segments_like_memory(src: ImageSource, pixels: np.ndarray, tmp_path: Path,
                         name: str = "out.zarr") -> None:
    """tile_process over several tiles gives the labels of the same pixels in memory."""
    assert src.read(tuple(slice(0, s) for s in src.tiled_shape)).shape == pixels.shape
    tile = tuple(max(1, s // 2 + 3) if s > 8 else s for s in src.tiled_shape)
    out = tile_process(src, label, tile, 4, stitch="faces", output=tmp_path / name,
                       progress=False)
    assert out.shape == src.label_shape  # the image's axes without channels, singletons kept
    written = out[src.label_index(tuple(slice(0, s) for s in src.tiled_shape))]
    assert same_partition(written.reshape(pixels.shape), label(pixels))


# -- OME-Zarr (ome-zarr-py) ------------------------------------------------------------------
def write_ome_zarr(path: Path, data: np.ndarray, axes: str, version: str, *,
                   scale: dict[str, float], names: list[str] | None = None) -> Path:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV05() if version == "0.5" else FormatV04()
    group = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    units = {a: ("second" if a == "t" else "micrometer") for a in axes if a in "tzyx"}
    extra: dict[str, Any] = {}
    if names:
        extra["omero"] = {"channels": [{"label": n, "color": "FFFFFF", "window": {
            "min": 0, "max": 65535, "start": 0, "end": 65535}} for n in names]}
    write_image(data, group, axes=axes, scale_factors=[2], fmt=fmt,
                scale={a: scale.get(a, 1.0) for a in axes}, axes_units=units, **extra)
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_axes_calibration_channels_and_levels(version, tmp_path):
    data = np.stack([nuclei((6, 40, 56), 1), nuclei((6, 40, 56), 2)])  # c, z, y, x
    path = write_ome_zarr(tmp_path / "img.ome.zarr", data, "czyx", version,
                          scale={"z": 2.0, "y": 0.5, "x": 0.5}, names=["DAPI", "GFP"])
    src = open_image(path)
    assert src.kind == "ome-zarr" and src.meta.format == f"OME-Zarr (NGFF {version})"
    assert [(a.name, a.type, a.unit) for a in src.axes] == [
        ("c", "channel", None), ("z", "space", "micrometer"), ("y", "space", "micrometer"),
        ("x", "space", "micrometer")]
    assert src.channel_axis == 0 and src.channel_names == ("DAPI", "GFP")
    assert src.spatial_scale == (2.0, 0.5, 0.5) and src.spatial_units[0] == "micrometer"
    assert src.tiled_axes == src.spatial_axes == (1, 2, 3) and src.tile_channel_axis == 0
    region = (slice(1, 4), slice(5, 30), slice(0, 56))
    np.testing.assert_array_equal(src.read(region), data[(slice(None),) + region])
    gfp = open_image(path, channels="gfp")  # names match ignoring case
    assert gfp.channel_indices == (1,) and gfp.tile_channel_axis is None
    segments_like_memory(gfp, data[1], tmp_path)
    low = open_image(path, level=1)
    assert low.shape == (2, 6, 20, 28) and low.spatial_scale == (2.0, 1.0, 1.0)
    assert low.meta.level == 1


def test_ome_zarr_time_series_is_tiled_over_time_not_space(tmp_path):
    frames = np.stack([nuclei((40, 56), t) for t in range(3)])
    path = write_ome_zarr(tmp_path / "t.ome.zarr", frames, "tyx", "0.4",
                          scale={"t": 30.0, "y": 0.5, "x": 0.5})
    src = open_image(path)
    assert src.time_axis == 0 and src.tiled_axes == (0, 1, 2)
    assert src.tiled_types == ("time", "space", "space") and src.spatial_shape == (40, 56)
    assert src.axes[0].scale == 30.0 and src.axes[0].unit == "second"
    np.testing.assert_array_equal(src.read((slice(1, 3), slice(0, 9), slice(3, 7))),
                                  frames[1:3, 0:9, 3:7])
    with pytest.raises(InputError, match="time point"):
        src.read((slice(0, 9), slice(3, 7)))  # a spatial region alone is ambiguous
    for t in range(3):  # each time point on its own: labels never join across time
        one = src.time_point(t)
        assert one.tiled_axes == (1, 2) and one.squeezed_axes == (0,)
        segments_like_memory(one, frames[t], tmp_path, f"t{t}.zarr")
        assert one.label_index((slice(0, 4), slice(0, 5)))[0] == slice(t, t + 1)


def test_a_time_series_is_segmented_per_time_point(tmp_path):
    """T=3 frames of the same nuclei: every frame gets its own objects, none spans time."""
    frame = nuclei((40, 56), 0)
    frames = np.stack([frame] * 3)
    path = write_ome_zarr(tmp_path / "t.ome.zarr", frames, "tyx", "0.4",
                          scale={"t": 30.0, "y": 0.5, "x": 0.5})
    seen = []

    def segment(tile):
        seen.append(tile.shape)
        return label(tile)

    out = tile_process(path, segment, (23, 31), 4, stitch="iou", progress=False)
    assert all(len(shape) == 2 for shape in seen)  # fn never sees the time axis
    labels = out[:]
    assert labels.shape == (3, 40, 56)
    per_frame = [set(np.unique(labels[t])) - {0} for t in range(3)]
    assert not (per_frame[0] & per_frame[1]) and not (per_frame[1] & per_frame[2])
    for t in range(3):
        assert same_partition(labels[t], label(frame))
    group = zarr.open_group(str(path / "labels" / "blockbuster"))
    axes = group.attrs["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["t", "y", "x"] and axes[0]["type"] == "time"


# -- bioformats2raw ---------------------------------------------------------------------------
def write_bioformats2raw(root: Path, series: list[np.ndarray], names: list[list[str] | None]
                         ) -> Path:
    """The bioformats2raw layout: series groups 0, 1, ... and OME/METADATA.ome.xml."""
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    group.attrs["bioformats2raw.layout"] = 3
    ox = tifffile.OmeXml()
    for i, (data, channel_names) in enumerate(zip(series, names, strict=True)):
        write_ome_zarr(root / str(i), data, "tczyx", "0.4",
                       scale={"z": 1.0, "y": 0.65, "x": 0.65})
        kwargs = {"Channel": {"Name": channel_names}} if channel_names else {}
        ox.addimage(data.dtype, data.shape, (data.shape[1],) + (1, 1) + data.shape[3:] + (1,),
                    axes="TCZYX", **kwargs)
    ome = group.create_group("OME")
    ome.attrs["series"] = [str(i) for i in range(len(series))]
    (root / "OME" / "METADATA.ome.xml").write_text(ox.tostring())
    return root


def test_bioformats2raw_root_opens_series_0_and_drops_singleton_axes(tmp_path):
    plane = nuclei((48, 64), 3)
    two = np.stack([nuclei((48, 64), 4), plane])[None, :, None]  # t, c, z, y, x
    root = write_bioformats2raw(tmp_path / "b2r.zarr", [plane[None, None, None], two],
                                [None, ["DAPI", "GFP"]])
    src = open_image(root)
    assert src.meta.series == 0 and "bioformats2raw" in src.meta.format
    assert src.shape == (1, 1, 1, 48, 64) and src.tiled_axes == (3, 4)
    assert src.spatial_shape == (48, 64) and src.squeezed_axes == (0, 2)
    assert src.tile_channel_axis is None and src.spatial_scale == (0.65, 0.65)
    assert src.path == root / "0"  # labels inside the image go to 0/labels
    assert src.label_shape == (1, 1, 48, 64)
    segments_like_memory(src, plane, tmp_path)
    second = open_image(root, series=1)
    assert second.channel_names == ("DAPI", "GFP") and second.tile_channel_axis == 0
    assert second.read((slice(0, 48), slice(0, 64))).shape == (2, 48, 64)
    segments_like_memory(open_image(root, series=1, channels="GFP"), plane, tmp_path, "g.zarr")
    with pytest.raises(InputError, match="holds 2 series"):
        open_image(root, series=2)


# -- TIFF (tifffile) --------------------------------------------------------------------------
def test_ome_tiff_channels_and_physical_sizes(tmp_path):
    data = np.stack([nuclei((5, 40, 50), 5), nuclei((5, 40, 50), 6)])  # c, z, y, x
    path = tmp_path / "czyx.ome.tif"
    tifffile.imwrite(path, data, ome=True, tile=(16, 16), metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5,
        "PhysicalSizeZUnit": "µm", "Channel": {"Name": ["DAPI", "Actin"]}})
    src = open_image(path)
    assert src.meta.format == "OME-TIFF" and src.axis_names == ("c", "z", "y", "x")
    assert src.channel_axis == 0 and src.channel_names == ("DAPI", "Actin")
    assert src.spatial_scale == (1.5, 0.25, 0.25)
    assert src.spatial_units == ("micrometer",) * 3
    np.testing.assert_array_equal(src.read((slice(0, 5), slice(3, 20), slice(7, 50))),
                                  data[:, :, 3:20, 7:50])
    segments_like_memory(open_image(path, channels=["Actin"]), data[1], tmp_path)


def test_imagej_hyperstack_time_channels_and_spacing(tmp_path):
    data = np.stack([np.stack([np.stack([nuclei((36, 48), 10 * t + z),
                                         nuclei((36, 48), 10 * t + z + 5)]) for z in range(3)])
                     for t in range(2)])  # t, z, c, y, x
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(4.0, 4.0), metadata={
        "axes": "TZCYX", "spacing": 2.5, "unit": "um", "finterval": 5.0})
    src = open_image(path)
    assert src.meta.format == "ImageJ hyperstack TIFF"
    assert src.axis_names == ("t", "z", "c", "y", "x") and src.time_axis == 0
    assert src.spatial_scale == (2.5, 0.25, 0.25) and src.axes[0].scale == 5.0
    assert src.tiled_axes == (0, 1, 3, 4) and src.tile_channel_axis == 2
    tile = src.read((slice(1, 2), slice(0, 3), slice(0, 36), slice(0, 48)))
    np.testing.assert_array_equal(tile, data[1:2])
    one = open_image(path, channels=1).time_point(1)
    segments_like_memory(one, data[1, :, 1], tmp_path)


def test_plain_tiff_resolution_in_centimetres_and_multiseries(tmp_path):
    image = nuclei((40, 60), 8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, resolution=(1e4 / 0.4, 1e4 / 0.4),
                     resolutionunit="CENTIMETER")
    src = open_image(path)
    assert src.spatial_scale == pytest.approx((0.4, 0.4)) and src.channel_axis is None
    inches = tmp_path / "inch.tif"
    tifffile.imwrite(inches, image, resolution=(72, 72), resolutionunit="INCH")
    assert open_image(inches).spatial_units == (None, None)  # a print resolution, not a size
    multi = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(multi, ome=True) as tif:
        tif.write(image, metadata={"axes": "YX"})
        tif.write(image[::-1].copy(), metadata={"axes": "YX"})
    second = open_image(multi, series=1)
    np.testing.assert_array_equal(second.read((slice(0, 40), slice(0, 60))), image[::-1])
    segments_like_memory(second, image[::-1], tmp_path)


# -- HDF5 (h5py) ------------------------------------------------------------------------------
def test_hdf5_one_dataset_and_dataset_paths(tmp_path):
    volume = nuclei((6, 40, 52), 11)
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("raw", data=volume, chunks=(2, 16, 16), compression="gzip")
        ds.attrs["element_size_um"] = [2.0, 0.3, 0.3]
    src = open_image(path)
    assert src.kind == "hdf5" and src.dataset == "/raw" and src.storage_chunks == (2, 16, 16)
    assert src.spatial_scale == (2.0, 0.3, 0.3) and src.spatial_units[0] == "micrometer"
    segments_like_memory(src, volume, tmp_path)
    many = tmp_path / "many.h5"
    with h5py.File(many, "w") as f:
        f.create_dataset("a", data=volume)
        f.create_dataset("group/b", data=volume[:, ::-1])
    with pytest.raises(InputError, match="/a, /group/b"):
        open_image(many)
    by_path = open_image(f"{many}/group/b")
    by_option = open_image(many, dataset="group/b")
    np.testing.assert_array_equal(by_path.read((slice(0, 6), slice(0, 40), slice(0, 52))),
                                  volume[:, ::-1])
    assert by_option.dataset == "/group/b"
    with pytest.raises(InputError, match="no dataset"):
        open_image(f"{many}/missing")


def write_bdv(folder: Path, data: np.ndarray, names: list[str], voxel: tuple[float, ...]
              ) -> Path:
    """BigDataViewer HDF5 + XML as BigDataViewer writes them (uint16 stored as int16)."""
    h5 = folder / "dataset.h5"
    n_t, n_s = data.shape[:2]
    with h5py.File(h5, "w") as f:
        for s in range(n_s):
            f[f"s{s:02d}/resolutions"] = np.array([[1.0, 1.0, 1.0]])
            f[f"s{s:02d}/subdivisions"] = np.array([[32, 32, 4]], np.int32)
        for t in range(n_t):
            for s in range(n_s):
                cells = data[t, s].view(np.int16)
                f.create_dataset(f"t{t:05d}/s{s:02d}/0/cells", data=cells,
                                 chunks=tuple(min(c, n) for c, n in zip((4, 32, 32),
                                                                        cells.shape, strict=True)))
    setups = "".join(
        f"<ViewSetup><id>{s}</id><name>{n}</name><size>{data.shape[-1]} {data.shape[-2]} "
        f"{data.shape[-3]}</size><voxelSize><unit>µm</unit><size>{voxel[2]} {voxel[1]} "
        f"{voxel[0]}</size></voxelSize></ViewSetup>" for s, n in enumerate(names))
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><SpimData version="0.2"><BasePath '
           f'type="relative">.</BasePath><SequenceDescription><ImageLoader format="bdv.hdf5">'
           f'<hdf5 type="relative">dataset.h5</hdf5></ImageLoader><ViewSetups>{setups}'
           f'</ViewSetups><Timepoints type="range"><first>0</first><last>{n_t - 1}</last>'
           f"</Timepoints></SequenceDescription></SpimData>")
    (folder / "dataset.xml").write_text(xml, encoding="utf-8")
    return folder / "dataset.xml"


def test_bigdataviewer_xml_and_h5(tmp_path):
    data = np.stack([np.stack([nuclei((4, 40, 48), 20 + 2 * t + s) for s in range(2)])
                     for t in range(2)])  # t, setup, z, y, x
    data[0, 0, 0, 0, 0] = 60000  # above int16: must come back as uint16
    xml = write_bdv(tmp_path, data, ["DAPI", "GFP"], (2.0, 0.5, 0.5))
    for source in (xml, tmp_path / "dataset.h5"):
        src = open_image(source)
        assert src.meta.format == "BigDataViewer HDF5" and src.dtype == np.uint16
        assert src.axis_names == ("t", "c", "z", "y", "x") and src.shape == data.shape
        assert src.channel_names == ("DAPI", "GFP") and src.spatial_scale == (2.0, 0.5, 0.5)
        assert int(src.read((slice(0, 1), slice(0, 1), slice(0, 1), slice(0, 1)))[0, 0, 0, 0,
                                                                                    0]) == 60000
    one = open_image(xml, channels="GFP").time_point(1)
    segments_like_memory(one, data[1, 1], tmp_path)


def write_imaris(path: Path, data: np.ndarray, names: list[str], voxel: tuple[float, ...],
                 origin: tuple[float, ...]) -> Path:
    """The Imaris 5.5 layout: data padded to whole chunks, sizes as byte-string attributes."""
    def text(value: Any) -> np.ndarray:
        return np.array(list(str(value)), dtype="S1")

    n_t, n_c, z, y, x = data.shape
    with h5py.File(path, "w") as f:
        info = f.create_group("DataSetInfo/Image")
        for key, value in (("X", x), ("Y", y), ("Z", z), ("Unit", "um")):
            info.attrs[key] = text(value)
        for i, (n, v, o) in enumerate(zip((x, y, z), voxel[::-1], origin[::-1], strict=True)):
            info.attrs[f"ExtMin{i}"] = text(o)
            info.attrs[f"ExtMax{i}"] = text(o + n * v)
        for c, name in enumerate(names):
            f.create_group(f"DataSetInfo/Channel {c}").attrs["Name"] = text(name)
        for t in range(n_t):
            for c in range(n_c):
                padded = np.zeros((z, -(-y // 16) * 16, -(-x // 16) * 16), data.dtype)
                padded[:, :y, :x] = data[t, c]
                f.create_dataset(f"DataSet/ResolutionLevel 0/TimePoint {t}/Channel {c}/Data",
                                 data=padded, chunks=(z, 16, 16))  # Imaris pads to chunks
    return path


def test_imaris_crops_padding_and_reads_extents(tmp_path):
    data = np.stack([nuclei((3, 37, 45), 30), nuclei((3, 37, 45), 31)])[None]  # t, c, z, y, x
    path = write_imaris(tmp_path / "scan.ims", data, ["Hoechst", "Tubulin"], (1.0, 0.2, 0.2),
                        (5.0, 10.0, 20.0))
    src = open_image(path)
    assert src.meta.format == "Imaris" and src.shape == data.shape
    assert src.channel_names == ("Hoechst", "Tubulin")
    assert src.spatial_scale == pytest.approx((1.0, 0.2, 0.2))
    assert src.spatial_translation == pytest.approx((5.0, 10.0, 20.0))
    assert src.tiled_axes == (2, 3, 4)  # one time point: not tiled
    segments_like_memory(open_image(path, channels="Tubulin"), data[0, 1], tmp_path)


def test_h5py_dataset_and_memmap_stream_and_pickle_without_data(tmp_path):
    image = nuclei((64, 80), 40)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("img", data=image, chunks=(16, 16))
    with h5py.File(tmp_path / "d.h5", "r") as f:
        src = open_image(f["img"])
        assert src.kind == "h5py" and src.storage_chunks == (16, 16)
        blob = pickle.dumps(src)
        assert len(blob) < image.nbytes / 4  # a recipe to reopen the file, not the data
        again = pickle.loads(blob)
        np.testing.assert_array_equal(again.read((slice(3, 40), slice(5, 9))), image[3:40, 5:9])
        reads = []
        original = ImageSource._get

        def spy(self: ImageSource, index: tuple[Any, ...]) -> np.ndarray:
            out = original(self, index)
            reads.append(out.size)
            return out

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ImageSource, "_get", spy)
            segments_like_memory(src, image, tmp_path)
        # reads[0] is the whole image, read by the check itself; tiles are 35x43 + halo 4
        assert len(reads) > 4 and max(reads[1:]) <= (35 + 8) * (43 + 8)
    mm = np.memmap(tmp_path / "raw.dat", dtype=np.uint16, mode="w+", shape=image.shape)
    mm[:] = image
    mm.flush()
    src = open_image(np.memmap(tmp_path / "raw.dat", dtype=np.uint16, mode="r",
                               shape=image.shape))
    assert src.kind == "memmap" and len(pickle.dumps(src)) < image.nbytes / 4
    segments_like_memory(pickle.loads(pickle.dumps(src)), image, tmp_path, "mm.zarr")


# -- N5 (TensorStore) -------------------------------------------------------------------------
def test_n5_dataset_in_c_order_with_resolution(tmp_path):
    ts = pytest.importorskip("tensorstore")
    import json

    volume = nuclei((5, 36, 44), 50)
    path = tmp_path / "vol.n5" / "s0"
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"dimensions": list(volume.shape[::-1]),
                                  "blockSize": [16, 16, 2], "dataType": "uint16",
                                  "compression": {"type": "gzip"}},
                     "create": True}).result()
    store[...] = volume.T  # N5 lists x first
    attrs = json.loads((path / "attributes.json").read_text())
    attrs.update(axes=["x", "y", "z"], pixelResolution={"dimensions": [0.4, 0.4, 3.0],
                                                        "unit": "um"})
    (path / "attributes.json").write_text(json.dumps(attrs))
    (tmp_path / "vol.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
    for where in (path, tmp_path / "vol.n5"):
        src = open_image(where)
        assert src.kind == "n5" and src.shape == volume.shape
        assert src.axis_names == ("z", "y", "x") and src.spatial_scale == (3.0, 0.4, 0.4)
        assert src.storage_chunks == (2, 16, 16)
    np.testing.assert_array_equal(src.read((slice(1, 4), slice(0, 36), slice(9, 30))),
                                  volume[1:4, :, 9:30])
    segments_like_memory(pickle.loads(pickle.dumps(src)), volume, tmp_path)


# -- zarr layouts, arrays with named axes ----------------------------------------------------
def test_zarr_v2_nested_keys_v3_shards_and_dimension_names(tmp_path):
    image = nuclei((50, 70), 95)
    v2 = zarr.create_array(str(tmp_path / "nested.zarr"), shape=image.shape, chunks=(16, 16),
                           dtype=image.dtype, zarr_format=2,
                           chunk_key_encoding={"name": "v2", "separator": "/"})
    v2[:] = image
    assert (tmp_path / "nested.zarr" / "0" / "0").is_file()  # dimension_separator "/"
    sharded = zarr.create_array(str(tmp_path / "sharded.zarr"), shape=(1, *image.shape),
                                chunks=(1, 8, 8), shards=(1, 24, 32), dtype=image.dtype,
                                dimension_names=("z", "y", "x"))
    sharded[0] = image
    for path, chunks in (("nested.zarr", (16, 16)), ("sharded.zarr", (24, 32))):
        src = open_image(tmp_path / path)
        assert src.spatial_storage_chunks == chunks and src.spatial_shape == image.shape
        segments_like_memory(src, image, tmp_path, f"{path}.out.zarr")
    xr = pytest.importorskip("xarray")
    cyx = xr.DataArray(np.stack([image, image // 2]), dims=("c", "y", "x"))
    assert open_image(cyx).channel_axis == 0 and open_image(cyx).tile_channel_axis == 0


def test_stacked_hdf5_and_n5_arrays_work_as_dask_views(tmp_path):
    data = np.stack([nuclei((3, 20, 24), 96), nuclei((3, 20, 24), 97)])[None]
    src = open_image(write_imaris(tmp_path / "s.ims", data, ["a", "b"], (1.0, 1.0, 1.0),
                                  (0.0, 0.0, 0.0)))
    np.testing.assert_array_equal(src.to_dask().compute(), data)


# -- CZI (bioio) ------------------------------------------------------------------------------
def test_czi_through_bioio(tmp_path):
    pytest.importorskip("bioio_czi")
    from pylibCZIrw import czi as pyczi

    data = np.stack([nuclei((40, 50), 60), nuclei((40, 50), 61)])
    path = tmp_path / "two.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for c in range(2):
            czi.write(data=data[c], plane={"C": c, "T": 0, "Z": 0})
        czi.write_metadata(document_name="two", channel_names={0: "DAPI", 1: "GFP"},
                           scale_x=0.5e-6, scale_y=0.5e-6, scale_z=2e-6)
    src = open_image(path)
    assert src.kind == "bioio" and src.axis_names == ("t", "c", "z", "y", "x")
    assert src.channel_names == ("DAPI", "GFP") and src.spatial_scale == (0.5, 0.5)
    assert src.tiled_axes == (3, 4)
    segments_like_memory(open_image(path, channels="GFP"), data[1], tmp_path)


# -- URLs (fsspec) ----------------------------------------------------------------------------
@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path from a thread."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_zarr_ome_zarr_and_tiff_over_http(http_root):
    root, url = http_root
    image = nuclei((48, 60), 70)
    write_ome_zarr(root / "img.ome.zarr", image, "yx", "0.4", scale={"y": 0.5, "x": 0.5})
    arr = zarr.create_array(str(root / "plain.zarr"), shape=image.shape, chunks=(16, 32),
                            dtype=image.dtype)
    arr[:] = image
    tifffile.imwrite(root / "img.tif", image, tile=(16, 16))
    for name in ("img.ome.zarr", "plain.zarr", "img.tif"):
        src = open_image(f"{url}/{name}")
        assert src.url == f"{url}/{name}" and src.path is None
        np.testing.assert_array_equal(src.read((slice(0, 48), slice(0, 60))), image)
        segments_like_memory(pickle.loads(pickle.dumps(src)), image, root,
                             f"{name}.labels.zarr")
    assert open_image(f"{url}/img.ome.zarr").spatial_scale == (0.5, 0.5)
    assert open_image(f"file://{root / 'plain.zarr'}").path == root / "plain.zarr"
    with pytest.raises(InputError, match="not found"):
        open_image(f"{url}/missing.zarr")


# -- the same pixels give the same statistics -------------------------------------------------
def test_sample_and_threshold_do_not_depend_on_the_container(tmp_path):
    from blockbuster.plugins.watershed import WatershedSegmenter, compute_threshold

    image = nuclei((300, 340), 80)
    containers: dict[str, Any] = {"numpy": image}
    for chunks in [(16, 16), (100, 37), (300, 340)]:
        arr = zarr.create_array(str(tmp_path / f"{chunks}.zarr"), shape=image.shape,
                                chunks=chunks, dtype=image.dtype)
        arr[:] = image
        containers[f"zarr{chunks}"] = str(tmp_path / f"{chunks}.zarr")
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    containers["tiff"] = str(tmp_path / "img.tif")
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f.create_dataset("img", data=image, chunks=(64, 20))
    containers["hdf5"] = str(tmp_path / "img.h5")
    samples, thresholds = {}, {}
    for name, where in containers.items():
        src = open_image(where)
        samples[name] = src.sample(max_voxels=20_000)  # boxes: the image has 102,000 voxels
        assert src.sample_info(20_000)["voxels"] == len(samples[name]) <= 20_000
        thresholds[name] = compute_threshold(samples[name][:, 0])
        seg = WatershedSegmenter(diameter=9)
        seg.prepare(src)
        assert seg.statistics["threshold"] == seg.global_threshold
        assert seg.statistics["sample"]["voxels"] == image.size  # small: taken whole
    reference = samples["numpy"]
    for name in containers:
        np.testing.assert_array_equal(samples[name], reference, err_msg=name)
    assert len(set(thresholds.values())) == 1, thresholds


def test_sample_boxes_are_spread_and_bounded():
    boxes = sample_boxes((3, 500, 700), ("time", "space", "space"), 30_000)
    assert sum(np.prod([s.stop - s.start for s in b]) for b in boxes) <= 30_000
    assert {b[0].stop - b[0].start for b in boxes} == {1}  # one time point deep
    assert {b[0].start for b in boxes} == {0, 1, 2}  # every time point sampled
    ys = sorted({b[1].start for b in boxes})
    assert ys[0] < 100 and ys[-1] > 350  # spread over the image, not one corner


# -- channels, readers, errors ----------------------------------------------------------------
def test_channel_selection_errors_list_what_exists(tmp_path):
    stack = np.zeros((3, 16, 16), np.uint8)
    with pytest.raises(InputError, match=r"does not name its channels.*0, 1, 2"):
        open_image(stack, channel_axis=0, channels="DAPI")
    with pytest.raises(InputError, match="out of range"):
        open_image(stack, channel_axis=0, channels=5)
    with pytest.raises(InputError, match="no channel axis"):
        open_image(stack, channels=0)
    picked = open_image(stack + np.arange(3, dtype=np.uint8)[:, None, None], channel_axis=0,
                        channels=[2, 0])
    assert picked.read((slice(0, 2), slice(0, 2)))[:, 0, 0].tolist() == [2, 0]
    assert picked.sample().shape == (256, 2)


def test_reader_plugins_unknown_files_and_missing_dependencies(tmp_path, monkeypatch):
    from blockbuster.io.readers.hdf5_reader import HDF5Reader

    names = [name for name, _, _ in reader_table()]
    assert names[:5] == ["zarr", "n5", "tiff", "hdf5", "bioio"]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"no reader recognises .*Readers: zarr"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="input not found"):
        open_image(tmp_path / "nothing.zarr")
    with pytest.raises(InputError, match="level= is not supported by the hdf5 reader"):
        open_image(tmp_path / "x.h5", level=1)
    monkeypatch.setattr(HDF5Reader, "requires", ("no_such_module_here",))
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(PluginNotInstalledError, match=r"blockbuster\[hdf5\]"):
        open_image(tmp_path / "x.h5")


def test_a_broken_reader_plugin_warns_and_the_others_work(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from blockbuster.io import registry

    broken = EntryPoint("broken", "no_such_package.reader:Reader", registry.READER_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group=None: [broken] if group == registry.READER_GROUP else [])
    registry._reader_classes.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="'broken'.*failed to load"):
            table = reader_table()
        assert "broken" not in [name for name, _, _ in table]
        arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), dtype="uint8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert open_image(tmp_path / "a.zarr").shape == arr.shape
    finally:
        registry._reader_classes.cache_clear()


def test_raw_arrays_keep_their_shape_named_arrays_drop_singletons():
    raw = open_image(np.zeros((1, 20, 30), np.uint8))
    assert raw.tiled_axes == (0, 1, 2) and raw.spatial_shape == (1, 20, 30)
    named = zarr.create_array({}, shape=(1, 20, 30), dtype="uint8",
                              dimension_names=("z", "y", "x"))
    assert open_image(named).spatial_shape == (20, 30)
    with pytest.raises(InputError, match="metadata says axis 0"):
        open_image(zarr.create_array({}, shape=(2, 20, 30), dtype="uint8",
                                     dimension_names=("c", "y", "x")), channel_axis=2)


# -- calibration into OME-Zarr label images ---------------------------------------------------
def test_label_image_gets_the_source_axes_units_and_calibration(tmp_path):
    from blockbuster.ome import write_ome_labels

    data = nuclei((4, 40, 48), 90)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.2})
    src = open_image(path)
    out = write_ome_labels(label(data), None, standalone_path=tmp_path / "lab.ome.zarr",
                           axes=src.label_axes)
    meta = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]
    assert meta["axes"] == [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    level0 = meta["datasets"][0]["coordinateTransformations"]
    assert level0[0]["scale"] == pytest.approx([1.2, 0.3, 0.3])
    shifted = write_ome_labels(label(data), None, standalone_path=tmp_path / "b.ome.zarr",
                               axes=src.label_axes, translation=[0.0, 5.0, 7.0])
    meta = zarr.open_group(str(shifted), mode="r").attrs["ome"]["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][1]["translation"] == [0, 5, 7]



def test_a_plain_zarr_output_keeps_the_inputs_calibration(tmp_path):
    """The default output of a TIFF is a plain zarr array (no NGFF metadata): it records the
    label axes with their calibration, and measuring the labels alone is in micrometres."""
    from blockbuster import measure

    data = nuclei((4, 40, 48), 91)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.2})
    out = tile_process(path, label, (4, 24, 24), 2, stitch="faces", progress=False)
    assert out.store.root == tmp_path / "img.labels.zarr"  # the default output: plain zarr
    meta = out.attrs["blockbuster"]
    assert [(a["name"], a["unit"], a["scale"]) for a in meta["axes"]] == [
        ("z", "micrometer", 1.2), ("y", "micrometer", 0.3), ("x", "micrometer", 0.3)]
    assert meta["spacing_um"] == pytest.approx([1.2, 0.3, 0.3])
    table = measure(tmp_path / "img.labels.zarr", progress=False)
    np.testing.assert_allclose(table["volume_um3"], table["voxels"] * 1.2 * 0.3 * 0.3)
    plain = tile_process(data, label, (4, 24, 24), 2, stitch="faces", progress=False,
                         output=tmp_path / "uncalibrated.zarr")
    assert "spacing_um" not in plain.attrs["blockbuster"]  # unknown: not written as 1.0
    assert not any(k.endswith("_um") for k in measure(tmp_path / "uncalibrated.zarr",
                                                      progress=False))

# -- memory: an h5py dataset is streamed, never read whole ------------------------------------
STREAM_HDF5 = """
import json, sys
import h5py, numpy as np
from scipy import ndimage
import blockbuster

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

path, out, side, tile = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with h5py.File(path, "w") as f:
    ds = f.create_dataset("img", shape=(side, side), dtype="uint16", chunks=(512, 512))
    y = np.arange(512, dtype=np.float32)[:, None]
    x = np.arange(512, dtype=np.float32)[None, :]
    for i in range(0, side, 512):
        for j in range(0, side, 512):
            ds[i:i + 512, j:j + 512] = (np.sin((y + i) / 23.0) * np.sin((x + j) / 19.0)
                                        > 0.5).astype(np.uint16) * 1000
segment = lambda t: ndimage.label(t > 500)[0]
blockbuster.tile_process(np.zeros((64, 64), np.uint16), segment, (32, 32), 2, progress=False,
                         output=out + ".warmup.zarr")  # load the engine before the baseline
with h5py.File(path, "r") as f:
    before = peak_rss()
    labels = blockbuster.tile_process(f["img"], segment, (tile, tile), 8, stitch="faces",
                                      output=out, progress=False)
    print(json.dumps({"before": before, "peak": peak_rss(),
                      "n": int(labels.attrs["blockbuster"]["n_labels"])}))
"""


@pytest.mark.slow
def test_an_hdf5_dataset_is_segmented_with_memory_bounded_by_the_tile(tmp_path):
    import json
    import subprocess
    import sys

    side, tile = 12288, 1024  # 288 MiB of uint16; tiles of 2 MiB
    result = subprocess.run([sys.executable, "-c", STREAM_HDF5, str(tmp_path / "big.h5"),
                             str(tmp_path / "out.zarr"), str(side), str(tile)],
                            check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    dataset_bytes = side * side * 2
    grown = report["peak"] - report["before"]
    assert report["n"] > 1000
    # fn's working copies of one padded tile (~20 B per voxel) and the engine's own buffers
    # (the same ~70-100 MiB for a zarr input of this size); the dataset read whole would add
    # all of its 288 MiB.
    assert grown < dataset_bytes / 2, f"peak grew by {grown / 2**20:.0f} MiB"


def test_a_url_whose_filesystem_is_not_installed_names_the_extra(monkeypatch):
    import fsspec

    def missing(url: str, **_: Any) -> Any:
        raise ImportError("Install s3fs to access S3", name="s3fs")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(PluginNotInstalledError, match=r'blockbuster\[s3\]'):
        open_image("s3://bucket/image.ome.zarr", reader="zarr")


def test_the_global_statistics_are_stored_with_the_output(tmp_path):
    """The threshold the watershed computed from the whole image is in the output's metadata."""
    from blockbuster.plugins.watershed import WatershedSegmenter

    image = nuclei((96, 96))
    out = tile_process(image, WatershedSegmenter(diameter=9), (48, 48), output=tmp_path / "o.zarr",
                       progress=False)
    stats = out.attrs["blockbuster"]["statistics"]
    assert stats and json.dumps(stats)  # JSON-serialisable
    again = tile_process(image.copy(), WatershedSegmenter(diameter=9), (32, 32),
                         output=tmp_path / "p.zarr", progress=False)
    assert again.attrs["blockbuster"]["statistics"] == stats  # independent of the tiling


def test_a_lower_pyramid_level_is_segmented_and_lines_up_with_its_image(tmp_path):
    """level=1 of an OME-Zarr image: labels at that level, inside the image, with its scale."""
    from blockbuster.data import write_synthetic_nuclei

    path = tmp_path / "img.ome.zarr"
    write_synthetic_nuclei(path, (512, 512), chunks=(128, 128), ome=True)
    level1 = zarr.open_array(str(path / "1"))[:]
    out = tile_process(path, label, (128, 128), 8, stitch="iou", level=1, progress=False)
    assert out.shape == level1.shape == (256, 256)
    assert same_partition(out[:], tile_process(level1, label, (128, 128), 8, stitch="iou",
                                               progress=False)[:])
    image_ms = zarr.open_group(str(path)).attrs["ome"]["multiscales"][0]
    labels_ms = zarr.open_group(str(path / "labels" / "blockbuster")).attrs["ome"]["multiscales"][0]
    assert labels_ms["datasets"][0]["coordinateTransformations"] == \
        image_ms["datasets"][1]["coordinateTransformations"]


def test_an_overlap_in_micrometres_becomes_voxels_per_axis(tmp_path):
    """overlap='6um' on an anisotropic volume (2 x 0.5 x 0.5 um voxels): (3, 12, 12) voxels."""
    from blockbuster.errors import InputError
    from blockbuster.plan import make_plan
    from blockbuster.segmenter import describe_segmenter

    volume = np.zeros((20, 64, 64), np.uint16)
    path = write_ome_zarr(tmp_path / "v.ome.zarr", volume, "zyx", "0.4",
                          scale={"z": 2.0, "y": 0.5, "x": 0.5})
    src = open_image(path)
    plan = make_plan(src, label, describe_segmenter(label), tile_shape=(10, 32, 32),
                     overlap="6um")
    assert plan.grid.depth == (3, 12, 12)
    per_axis = make_plan(src, label, describe_segmenter(label), tile_shape=(10, 32, 32),
                         overlap=("4um", 2, "1um"))
    assert per_axis.grid.depth == (2, 2, 2)
    plain = open_image(volume)  # no voxel size: a physical length cannot be converted
    with pytest.raises(InputError, match="voxel size is not known"):
        make_plan(plain, label, describe_segmenter(label), tile_shape=(10, 32, 32),
                  overlap="6um")


# -- reads much smaller than the storage chunks -----------------------------------------------
def test_tiny_tiles_decode_each_chunk_once_and_get_their_own_copy(tmp_path):
    """16 x 16 tiles (overlap 2) of an image in 64 x 64 chunks: every read equals the stored
    voxels, the chunks are decoded once each instead of once per tile, and fn writing into
    its tile changes neither the image nor the next tiles' reads."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60_000, (128, 160), dtype=np.uint16)
    store = zarr.storage.LocalStore(tmp_path / "img.zarr")
    arr = zarr.create_array(store=store, shape=image.shape, chunks=(64, 64), dtype="uint16")
    arr[:] = image
    gets: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counted(self, key, *args, **kwargs):
        if key.startswith("c/"):
            gets.append(key)
        return await original(self, key, *args, **kwargs)

    seen = []

    def fn(tile: np.ndarray) -> np.ndarray:
        seen.append(tile.copy())
        tile[:] = 0  # a segmenter that works in place on its input
        return np.ones(tile.shape, np.uint32)

    src = open_image(tmp_path / "img.zarr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zarr.storage.LocalStore, "get", counted)
        tile_process(src, fn, (16, 16), 2, stitch="none")
    chunks = 2 * 3  # 128 / 64 x ceil(160 / 64)
    assert len(seen) == (128 // 16) * (160 // 16)
    assert len(gets) == chunks, gets  # 80 tiles: without the cache, ~100 chunk reads
    origins = [(y, x) for y in range(0, 128, 16) for x in range(0, 160, 16)]
    for (y, x), tile in zip(origins, seen, strict=True):
        # the padded region, cut at the image's edges
        assert np.array_equal(tile, image[max(0, y - 2):y + 18, max(0, x - 2):x + 18]), (y, x)
    assert np.array_equal(zarr.open_array(tmp_path / "img.zarr")[:], image)


def test_block_cache_keeps_its_byte_budget():
    from blockbuster.io.blocks import BlockCache

    cache = BlockCache(max_bytes=3 * 800)
    loads = []
    for i in [0, 1, 2, 0, 3, 4, 0]:
        cache.get((i,), lambda i=i: loads.append(i) or np.zeros(100, np.int64))
    assert cache.nbytes <= 3 * 800 and len(cache) == 3
    assert loads == [0, 1, 2, 3, 4]  # 0 was used again each time before it would leave
    block = cache.get((0,), lambda: np.ones(100))
    with pytest.raises(ValueError):
        block[0] = 1  # kept blocks are read-only: callers get copies
