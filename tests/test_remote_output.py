"""Labels written to an object store (S3, through fsspec), the work directory kept locally.

A local S3 server (moto) stands in for the cloud; skipped when moto or s3fs is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.errors import OutputExistsError, TileFailures

from helpers import comb_mask

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields an s3fs filesystem."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("labs")
    try:
        yield fs
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


def label(tile):
    return ndimage.label(tile > 0)[0]


def test_labels_go_to_s3_and_equal_a_local_run(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mask = comb_mask()
    local = tile_process(mask, label, (30, 30), stitch="faces", output=tmp_path / "l.zarr",
                         progress=False)[:]
    remote = tile_process(mask, label, (30, 30), stitch="faces", output="s3://labs/a.zarr",
                          table=True, progress=False)
    again = zarr.open_array(store=zarr.storage.FsspecStore.from_url("s3://labs/a.zarr"))
    assert np.array_equal(again[:], local)
    assert again.attrs["blockbuster"]["complete"] is True
    assert not (tmp_path / "a.zarr.blockbuster-work").exists()  # removed when complete
    assert (tmp_path / "a.zarr.objects.csv").exists()  # the table stays on this machine
    assert remote.shape == mask.shape


def test_a_failed_remote_run_resumes_from_its_local_work_dir(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mask = comb_mask()
    flag = tmp_path / "fixed"

    def flaky(tile):
        if not flag.exists() and tile[10:20, 20:30].all():
            raise RuntimeError("simulated")
        return label(tile)

    with pytest.raises(TileFailures):
        tile_process(mask, flaky, (30, 30), stitch="faces", output="s3://labs/b.zarr",
                     progress=False)
    assert (tmp_path / "b.zarr.blockbuster-work" / "manifest.json").exists()
    flag.touch()
    out = tile_process(mask, flaky, (30, 30), stitch="faces", output="s3://labs/b.zarr",
                       resume=True, progress=False)
    reference = tile_process(mask, label, (30, 30), stitch="faces", progress=False)
    assert np.array_equal(out[:], reference[:])


def test_a_foreign_array_at_the_url_is_never_replaced(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = zarr.create_array(store=zarr.storage.FsspecStore.from_url("s3://labs/c.zarr"),
                               shape=(4, 4), chunks=(4, 4), dtype="u1")
    theirs[:] = 7
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="did not write"):
            tile_process(comb_mask(), label, (30, 30), stitch="faces", output="s3://labs/c.zarr",
                         overwrite=overwrite, progress=False)
    kept = zarr.open_array(store=zarr.storage.FsspecStore.from_url("s3://labs/c.zarr"))
    assert kept[:].tolist() == [[7] * 4] * 4


def test_an_ome_zarr_image_on_s3_is_segmented_with_its_calibration(s3, tmp_path):
    """Input from s3://: the same labels as the local copy, the voxel size kept."""
    mask = comb_mask()
    local = tmp_path / "img.ome.zarr"
    group = zarr.open_group(str(local), mode="w", zarr_format=2)
    group.create_array("0", data=mask.astype(np.uint8), chunks=(40, 40))
    group.attrs["multiscales"] = [{"version": "0.4", "name": "img", "axes": [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "yx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.5, 0.25]}]}]}]
    s3.put(str(local), "labs/img.ome.zarr", recursive=True)
    out = tile_process("s3://labs/img.ome.zarr", label, (30, 30), stitch="faces",
                       output=tmp_path / "labels.ome.zarr", progress=False)
    assert np.array_equal(out[:], tile_process(mask, label, (30, 30), stitch="faces",
                                               progress=False)[:])
    meta = zarr.open_group(str(tmp_path / "labels.ome.zarr"), mode="r").attrs
    level0 = meta["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert level0[0]["scale"] == [0.5, 0.25]
