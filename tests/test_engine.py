"""tile_process: every input kind, tile shapes, overlap clipping, channels, output handling."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

import blockbuster
from blockbuster import tile_process
from blockbuster.errors import IncompleteOutputError, InputError, OutputExistsError, TileError


def reference(mask: np.ndarray) -> np.ndarray:
    return ndimage.label(mask > 0)[0]


# -- input kinds --------------------------------------------------------------------------------
def _write_zarr(path, data, zarr_format):
    arr = zarr.create_array(store=str(path), shape=data.shape, chunks=(32,) * data.ndim,
                            dtype=data.dtype, zarr_format=zarr_format)
    arr[:] = data
    return path


def _write_ome_zarr(path, data, zarr_format):
    group = zarr.open_group(store=str(path), mode="w", zarr_format=zarr_format)
    axes = [{"name": n, "type": "space"} for n in "zyx"[-data.ndim:]]
    datasets = []
    for level, factor in enumerate((1, 2)):
        arr = data[(slice(None, None, factor),) * data.ndim]
        group.create_array(str(level), shape=arr.shape, chunks=(32,) * data.ndim,
                           dtype=data.dtype)[:] = arr
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [float(factor)] * data.ndim}]})
    ms = {"version": "0.4", "axes": axes, "datasets": datasets}
    if zarr_format == 3:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        group.attrs["multiscales"] = [ms]
    return path


def _write_tiff(path, data, ome):
    tifffile.imwrite(path, data, tile=(32, 32), ome=ome)
    return path


INPUTS = {
    "numpy": lambda tmp, d: d,
    "dask": lambda tmp, d: da.from_array(d, chunks=17),
    "zarr-memory": lambda tmp, d: zarr.array(d, chunks=(16,) * d.ndim),
    "zarr-v3-path": lambda tmp, d: str(_write_zarr(tmp / "img.zarr", d, 3)),
    "zarr-v2-path": lambda tmp, d: str(_write_zarr(tmp / "img.zarr", d, 2)),
    "ome-zarr-v2": lambda tmp, d: str(_write_ome_zarr(tmp / "img.ome.zarr", d, 2)),
    "ome-zarr-v3": lambda tmp, d: str(_write_ome_zarr(tmp / "img.ome.zarr", d, 3)),
    "tiff": lambda tmp, d: str(_write_tiff(tmp / "img.tif", d, False)),
    "ome-tiff": lambda tmp, d: str(_write_tiff(tmp / "img.ome.tif", d, True)),
}


@pytest.mark.parametrize("kind", INPUTS)
def test_every_input_kind_2d(kind, tmp_path, blobs2d, same_partition):
    data = blobs2d.astype(np.uint16) * 1000
    image = INPUTS[kind](tmp_path, data)
    out = tile_process(image, reference, (40, 33), 4, stitch="faces",
                       output=tmp_path / "out.zarr")
    assert out.shape == data.shape
    assert same_partition(out[:], reference(data))


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr-v3-path", "zarr-v2-path", "ome-zarr-v3"])
def test_every_input_kind_3d(kind, tmp_path, blobs3d, same_partition):
    data = blobs3d.astype(np.uint8)
    image = INPUTS[kind](tmp_path, data)
    out = tile_process(image, reference, (9, 16, 13), (2, 3, 3), stitch="faces",
                       output=tmp_path / "out.zarr")
    assert same_partition(out[:], reference(data))


def test_tiff_is_streamed_not_read_whole(tmp_path, blobs2d, monkeypatch):
    """Every read asks for one padded tile, never the whole image."""
    path = _write_tiff(tmp_path / "img.tif", blobs2d.astype(np.uint8), False)
    src = blockbuster.open_image(path)
    reads = []
    original = type(src).read

    def spy(self, region):
        reads.append(tuple(s.stop - s.start for s in region))
        return original(self, region)

    monkeypatch.setattr(type(src), "read", spy)
    tile_process(src, reference, (50, 50), 2, stitch="faces", output=tmp_path / "o.zarr")
    assert reads and max(np.prod(r) for r in reads) <= 54 * 54


# -- tiles, halo and streaming -----------------------------------------------------------------
@pytest.mark.parametrize("tile_shape", [(50, 131), (30, 30), (37, 41), (1, 131), (150, 131)])
def test_tile_shapes_that_do_and_do_not_divide(tile_shape, blobs2d, label_fn, same_partition):
    out = tile_process(blobs2d, label_fn, tile_shape, stitch="faces")
    assert same_partition(out[:], reference(blobs2d))
    grid = [-(-s // t) for s, t in zip(blobs2d.shape, tile_shape, strict=True)]
    assert len(label_fn.shapes) == np.prod(grid)  # one call per tile, no more
    assert out.chunks == tuple(min(t, s) for t, s in zip(tile_shape, blobs2d.shape, strict=True))


def test_fn_sees_padded_tiles_and_halo_is_trimmed(blobs2d):
    seen = []

    def fn(tile):
        seen.append(tile.shape)
        return np.ones(tile.shape, np.int32)  # one object per tile, halo included

    out = tile_process(blobs2d, fn, (50, 50), 7, stitch="none")
    # interior tile: 50 + 2*7 on both axes; corner tile clipped at the image border
    assert (64, 64) in seen and (57, 57) in seen
    labels = out[:]
    # the halo was trimmed: each tile core holds exactly one distinct label
    for y in range(0, 150, 50):
        for x in range(0, 131, 50):
            assert len(np.unique(labels[y:y + 50, x:x + 50])) == 1
    assert len(np.unique(labels)) == 9  # globally unique across tiles


def test_z_tile_of_one_gets_no_z_halo_and_no_warning(blobs3d):
    fn = _ShapeRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tile_process(blobs3d, fn, (1, 20, 20), 5, stitch="faces")
    assert {s[0] for s in fn.shapes} == {1}  # overlap 5 became depth 0 in z
    assert max(s[1] for s in fn.shapes) == 25  # 20 + 5 in y (the other side is the border)


def test_clipped_overlap_warns_once_per_run(blobs2d):
    with pytest.warns(UserWarning, match="overlap") as record:
        tile_process(blobs2d, reference, (10, 10), 30, stitch="faces")
    assert len([w for w in record if "overlap" in str(w.message)]) == 1


class _ShapeRecorder:
    def __init__(self):
        self.shapes = []

    def __call__(self, tile):
        self.shapes.append(tile.shape)
        return ndimage.label(tile > 0)[0]


@pytest.mark.parametrize("channel_axis", [0, -1])
def test_channel_axis_is_never_tiled_and_absent_from_output(channel_axis, blobs2d, same_partition):
    stack = np.stack([blobs2d, ~blobs2d, blobs2d], axis=channel_axis).astype(np.uint8)
    seen = []

    def fn(tile):
        seen.append(tile.shape)
        return ndimage.label(np.take(tile, 0, axis=channel_axis))[0]

    out = tile_process(stack, fn, (40, 40), 3, channel_axis=channel_axis, stitch="faces")
    assert out.shape == blobs2d.shape
    assert all(np.take(np.empty(s), 0, axis=channel_axis).ndim == 2 for s in seen)
    assert all(s[channel_axis] == 3 for s in seen)
    assert same_partition(out[:], reference(blobs2d))


def test_tile_shape_none_uses_the_inputs_chunks(blobs2d, same_partition):
    arr = da.from_array(blobs2d, chunks=(64, 50))
    out = tile_process(arr, reference, None, stitch="faces")
    assert out.chunks == (64, 50)
    assert same_partition(out[:], reference(blobs2d))


# -- output ------------------------------------------------------------------------------------
def test_default_output_is_a_sibling_labels_zarr(tmp_path, blobs2d):
    path = _write_zarr(tmp_path / "scan.zarr", blobs2d.astype(np.uint8), 3)
    out = tile_process(str(path), reference, (64, 64), stitch="faces")
    assert (tmp_path / "scan.labels.zarr").is_dir()
    assert out.attrs["blockbuster"]["complete"] is True
    assert not (tmp_path / "scan.labels.zarr.blockbuster-work").exists()  # cleaned up
    np.testing.assert_array_equal(blockbuster.open_labels(tmp_path / "scan.labels.zarr")[:], out[:])


def test_existing_output_is_refused_without_overwrite(tmp_path, blobs2d):
    target = tmp_path / "labels.zarr"
    tile_process(blobs2d, reference, (64, 64), stitch="faces", output=target)
    before = zarr.open_array(str(target))[:]
    calls = []

    def fn(tile):
        calls.append(1)
        return reference(tile)

    with pytest.raises(OutputExistsError, match="overwrite=True"):
        tile_process(blobs2d, fn, (64, 64), stitch="faces", output=target)
    assert not calls  # refused before any tile ran
    np.testing.assert_array_equal(zarr.open_array(str(target))[:], before)  # nothing lost
    out = tile_process(~blobs2d, reference, (64, 64), stitch="faces", output=target, overwrite=True)
    assert not np.array_equal(out[:], before)


def test_labels_dtype_is_uint32_and_switches_to_uint64():
    from blockbuster.stitching import label_dtype

    assert label_dtype(2**32 - 1) == np.uint32
    assert label_dtype(2**32) == np.uint64


# -- bad input ----------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="not found"):
        tile_process(tmp_path / "nope.zarr", reference, (8, 8))


def test_path_that_is_neither_zarr_nor_tiff(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    for bad in ("notes.txt", "empty_dir"):
        with pytest.raises(InputError, match="no reader recognises"):
            tile_process(tmp_path / bad, reference, (8, 8))


@pytest.mark.parametrize("tile_shape, match", [
    ((8,), "one per spatial axis"), ((8, 8, 8), "one per spatial axis"), ((0, 8), "positive"),
    ((-4, 8), "positive"), ((8.5, 8), "not an int"),
])
def test_bad_tile_shapes(tile_shape, match, blobs2d):
    with pytest.raises(InputError, match=match):
        tile_process(blobs2d, reference, tile_shape)


def test_negative_overlap(blobs2d):
    with pytest.raises(InputError, match="negative"):
        tile_process(blobs2d, reference, (32, 32), -1)
    with pytest.raises(InputError, match="negative"):
        tile_process(blobs2d, reference, (32, 32), (2, -3))


def test_fn_that_raises_names_tile_and_region(blobs2d, tmp_path):
    def fragile(tile):
        if tile[0, 0] == 99:
            raise ZeroDivisionError("boom")
        return reference(tile)

    data = blobs2d.astype(np.uint8)
    data[100, 50] = 99  # first voxel of tile (2, 1) (no overlap)
    target = tmp_path / "out.zarr"
    pattern = r"fragile.*tile \(2, 1\).*100:150, 50:100.*ZeroDivisionError: boom"
    with pytest.raises(TileError, match=pattern) as exc:
        tile_process(data, fragile, (50, 50), stitch="faces", output=target, retries=0)
    err = exc.value
    assert err.tile_index == (2, 1)
    assert err.region == (slice(100, 150), slice(50, 100))
    assert "fragile" in err.fn_name
    assert isinstance(err.__cause__, ZeroDivisionError)
    # nothing that looks complete was left behind
    meta = zarr.open_array(str(target)).attrs.get("blockbuster", {}) if target.exists() else {}
    assert not meta.get("complete")
    with pytest.raises((IncompleteOutputError, FileNotFoundError)):
        blockbuster.open_labels(target)


@pytest.mark.parametrize("bad, match", [
    (lambda t: np.zeros((3, 3), np.int32), r"shape \(3, 3\)"),
    (lambda t: t.astype(np.float32), "dtype float32"),
    (lambda t: t > 0, "dtype bool"),
    (lambda t: -np.ones(t.shape, np.int16), "negative"),
    (lambda t: None, "None"),
    (ndimage.label, "tuple of 2 items.*first item"),
])
def test_fn_returning_wrong_shape_or_dtype(bad, match, blobs2d):
    with pytest.raises(TileError, match=match) as exc:
        tile_process(blobs2d, bad, (64, 64), stitch="faces")
    assert exc.value.tile_index == (0, 0)
    assert "tile (0, 0)" in str(exc.value)


def test_fn_must_be_callable(blobs2d):
    with pytest.raises(InputError, match="callable"):
        tile_process(blobs2d, 42, (8, 8))


def test_configuration_errors_from_fn_are_not_retried_or_buried(blobs2d):
    """A missing GPU fails every tile alike: raise it at once, as it is."""
    calls = []

    def needs_gpu(tile):
        calls.append(1)
        raise blockbuster.NoGPUError("use_gpu=True but no CUDA device")

    with pytest.raises(blockbuster.NoGPUError, match="no CUDA device"):
        tile_process(blobs2d, needs_gpu, (50, 50), retries=3)
    assert calls == [1]


class GridLabeller:
    """A 'network' on a 16-voxel grid (2-D)."""

    grid = 16
    preferred_overlap = 24

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        return ndimage.label(tile > 0)[0]


def test_tiles_and_overlaps_are_put_on_the_segmenters_grid(tmp_path, blobs2d, caplog):
    """Read regions start on the network's grid: tile 129 -> 128, overlap 24 -> 32, and a halo
    clipped by a small tile stays a multiple of the grid."""
    from blockbuster.plan import make_plan
    from blockbuster.segmenter import describe_segmenter

    fn = GridLabeller()
    source = blockbuster.open_image(np.zeros((300, 300), np.uint8))
    with caplog.at_level("INFO", logger="blockbuster"):
        plan = make_plan(source, fn, describe_segmenter(fn), tile_shape=(129, 129))
    assert plan.grid.tile_shape == (128, 128) and plan.grid.depth == (32, 32)
    assert "rounded" in caplog.text  # the user's tile shape changed: the log says so
    starts = {t.padded[a].start % 16 for t in plan.grid for a in range(2)}
    assert starts == {0}
    with pytest.warns(UserWarning, match="reduced to"):
        small = make_plan(source, fn, describe_segmenter(fn), tile_shape=(40, 40))
    assert small.grid.tile_shape == (32, 32) and small.grid.depth == (16, 16)  # 32 - 16
    auto = make_plan(source, fn, describe_segmenter(fn), tile_shape="auto", memory=2 * 2**20)
    assert all(t % 16 == 0 or t == 300 for t in auto.grid.tile_shape)
    assert plan.summary()["network_grid"] == [16, 16]


def test_pack_entries_round_trip_small_arrays_raw_and_older_entries(tmp_path):
    """Small arrays are stored as they are, larger ones compressed; an entry written before
    (every array compressed, no codec named) still reads; the tile tables hold what is noted."""
    from blockbuster.engine import state as st

    writer = st.PackWriter(tmp_path, 1, "main")
    small, large = np.arange(5, dtype=np.int64), np.arange(10_000, dtype=np.uint32)
    ref = writer.append("seg", 3, {"n": 4}, {"small": small, "large": large})
    old = writer.append("seg", 4, {"n": 1}, {"small": small})
    writer.close()
    # rewrite the second entry as the earlier format had it: compressed, no codec
    header = {"kind": "seg", "tile": 4, "meta": {"n": 1}, "arrays": {}}
    blob = st._CODEC.encode(small)
    header["arrays"]["small"] = {"dtype": small.dtype.str, "shape": [5], "offset": 0,
                                 "nbytes": len(blob), "crc": st.zlib.crc32(blob)}
    encoded = st.json.dumps(header, separators=(",", ":")).encode()
    data = st._FIXED.pack(st._MAGIC, len(encoded), len(blob), st.zlib.crc32(encoded)) \
        + encoded + blob
    pack = tmp_path / ref.pack
    pack.write_bytes(pack.read_bytes()[:old.offset] + data)
    reader = st._PackReader(tmp_path)
    entry = reader.entry(ref)
    assert entry._specs["small"]["codec"] == "raw" and "codec" not in entry._specs["large"]
    assert np.array_equal(entry.get("small"), small) and np.array_equal(entry.get("large"), large)
    earlier = reader.entry(st.EntryRef(ref.pack, old.offset, len(data)))
    assert np.array_equal(earlier.get("small"), small)
    reader.close()

    table, tiles = st.RefTable(10), st.TileSet(10)
    table[3], table[7] = ref, old
    tiles.update([2, 9])
    tiles.discard(2)
    assert table[3] == ref and 7 in table and 5 not in table and len(table) == 2
    del table[7]
    assert list(table) == [3] and list(tiles) == [9] and 2 not in tiles and len(tiles) == 1
    with pytest.raises(KeyError):
        table[7]


def test_a_memory_budget_without_room_for_a_second_tile_runs_one_tile_at_a_time(
        blobs2d, same_partition, tmp_path, monkeypatch):
    """With a budget that one tile fills, the next tile is not read, nor the last one stored,
    while fn runs; the labels are the same as pipelined."""
    from blockbuster.engine.executors import InProcess
    from blockbuster.plan import RunPlan

    seen: list[bool] = []
    original = InProcess.run

    def spy(self, *args, **kwargs):
        seen.append(self.pipelined)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InProcess, "run", spy)
    image = (blobs2d > 0).astype(np.uint8)
    label = lambda tile: ndimage.label(tile)[0]
    fits = RunPlan.second_tile_fits
    monkeypatch.setattr(RunPlan, "second_tile_fits", lambda self, memory: False)
    tight = tile_process(image, label, (40, 40), 0, stitch="faces", memory="1GB")
    monkeypatch.setattr(RunPlan, "second_tile_fits", fits)
    roomy = tile_process(image, label, (40, 40), 0, stitch="faces", memory="1GB")
    plain = tile_process(image, label, (40, 40), 0, stitch="faces")
    assert seen == [False, True, True]
    assert np.array_equal(tight[:], roomy[:]) and np.array_equal(tight[:], plain[:])
    assert same_partition(tight[:], ndimage.label(image)[0])
