"""Never touch what blockbuster did not write; never call a wrong result complete.

Regression tests for the data-loss reports: an output location that holds someone else's files,
an output around or inside the input, a work directory full of user files, an OME-Zarr
overwrite stopped before its first tile, and two runs writing one output through different work
directories or spellings of the same label image.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from blockbuster import tile_process
from blockbuster.engine.state import WorkDir
from blockbuster.errors import (
    IncompleteOutputError,
    InputError,
    OutputExistsError,
    OutputLockedError,
)
from blockbuster.locks import RunLock
from blockbuster.output import output_lock_path, work_dir_for
from blockbuster.status import open_labels

from helpers import same_partition


def label(tile: np.ndarray) -> np.ndarray:
    return ndimage.label(tile > 0)[0]


def label_inverse(tile: np.ndarray) -> np.ndarray:
    """Another segmenter: its objects differ from ``label``'s, so old and new labels differ."""
    return ndimage.label(tile == 0)[0]


INTERRUPT = False


def label_inverse_or_stop(tile: np.ndarray) -> np.ndarray:
    """``label_inverse``, or a Ctrl-C while ``INTERRUPT`` is set."""
    if INTERRUPT:
        raise KeyboardInterrupt
    return label_inverse(tile)


@pytest.fixture
def image_zarr(tmp_path, blobs2d) -> Path:
    path = tmp_path / "proj" / "img.zarr"
    zarr.create_array(store=str(path), shape=blobs2d.shape, chunks=(50, 50),
                      dtype="uint8")[:] = blobs2d
    return path


@pytest.fixture
def ome_image(tmp_path, blobs2d) -> Path:
    """An OME-Zarr image as ome-zarr-py writes it."""
    from ome_zarr.writer import write_image

    path = tmp_path / "img.ome.zarr"
    root = zarr.open_group(str(path), mode="w")
    write_image(blobs2d.astype(np.uint8), root, axes="yx", scaler=None,
                storage_options={"chunks": (50, 50)})
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# -- 1. an output location that is not blockbuster's ------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_user_files_is_refused_as_output(tmp_path, blobs2d, overwrite):
    res = tmp_path / "res"
    res.mkdir()
    (res / "keep.txt").write_text("thesis")
    with pytest.raises(OutputExistsError, match=r"did not write.*keep\.txt"):
        tile_process(blobs2d, label, (50, 50), output=res, overwrite=overwrite)
    assert snapshot(res) == {"keep.txt": b"thesis"}
    assert not work_dir_for(res).exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_is_refused_as_output(tmp_path, blobs2d, overwrite):
    target = tmp_path / "labels.zarr"
    target.write_text("not a folder")
    with pytest.raises(OutputExistsError, match="is a file"):
        tile_process(blobs2d, label, (50, 50), output=target, overwrite=overwrite)
    assert target.read_text() == "not a folder"


def test_the_folder_holding_the_input_is_refused_as_output(image_zarr):
    before = snapshot(image_zarr.parent)
    for overwrite in (False, True):
        with pytest.raises(InputError, match="contains the input"):
            tile_process(image_zarr, label, (50, 50), output=image_zarr.parent,
                         overwrite=overwrite)
    assert snapshot(image_zarr.parent) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_an_output_at_or_inside_the_input_is_refused(image_zarr, where):
    before = snapshot(image_zarr)
    output = image_zarr if where == "same" else image_zarr / "labels"
    with pytest.raises(InputError, match="is the input" if where == "same" else "inside the input"):
        tile_process(image_zarr, label, (50, 50), output=output, overwrite=True)
    assert snapshot(image_zarr) == before


def test_an_output_around_the_mask_is_refused(tmp_path, blobs2d):
    mask = tmp_path / "masks" / "tissue.zarr"
    zarr.create_array(store=str(mask), shape=(15, 13), chunks=(15, 13), dtype=bool)[:] = True
    with pytest.raises(InputError, match="contains the input"):
        tile_process(blobs2d, label, (50, 50), output=tmp_path / "masks", mask=mask)


def test_an_empty_folder_is_a_fine_output(tmp_path, blobs2d):
    res = tmp_path / "res"
    res.mkdir()
    out = tile_process(blobs2d, label, (50, 50), output=res, stitch="faces")
    assert open_labels(res)[:].max() == out[:].max() > 0


def test_overwrite_replaces_an_output_of_blockbusters_own(tmp_path, blobs2d):
    res = tmp_path / "res.zarr"
    tile_process(blobs2d, label, (50, 50), output=res, stitch="faces")
    again = tile_process(blobs2d, label_inverse, (50, 50), output=res, stitch="faces",
                         overwrite=True)
    assert np.array_equal(again[:] > 0, ~blobs2d)


def test_a_work_dir_of_user_files_is_refused_and_kept(tmp_path, blobs2d):
    work = tmp_path / "home"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"work directory.*notes\.txt"):
        tile_process(blobs2d, label, (50, 50), output=tmp_path / "o.zarr", work_dir=work)
    assert snapshot(work) == {"notes.txt": b"mine"}
    assert not (tmp_path / "o.zarr").exists()


def test_removing_a_work_dir_keeps_files_that_appeared_in_it(tmp_path, blobs2d):
    """Files a user drops into a work directory during a run survive its cleanup."""
    work = tmp_path / "work"

    def fn(tile):
        (work / "user-notes.txt").write_text("mine")
        return label(tile)

    tile_process(blobs2d, fn, (50, 50), output=tmp_path / "o.zarr", work_dir=work,
                 stitch="faces")
    assert snapshot(work) == {"user-notes.txt": b"mine"}


def test_a_work_dir_inside_the_input_is_refused(image_zarr, tmp_path):
    with pytest.raises(InputError, match="work directory"):
        tile_process(image_zarr, label, (50, 50), output=tmp_path / "o.zarr",
                     work_dir=image_zarr / "work")
    assert not (image_zarr / "work").exists()


def test_someone_elses_label_image_is_never_replaced(ome_image, blobs2d):
    """A label image of that name that another tool wrote stays, even with overwrite."""
    from blockbuster.ome import write_ome_labels

    theirs = ndimage.label(blobs2d)[0].astype(np.uint32)
    write_ome_labels(theirs, ome_image, name="nuclei")
    group = ome_image / "labels" / "nuclei"
    zarr.open_group(str(group), mode="r+").attrs.pop("blockbuster")  # as another tool writes it
    before = snapshot(group)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not write"):
            tile_process(ome_image, label, (50, 50), label_name="nuclei", overwrite=overwrite)
    assert snapshot(group) == before


# -- 2. the output deleted during a run -------------------------------------------------------
def test_an_output_deleted_during_the_run_is_not_called_complete(tmp_path, blobs2d):
    out = tmp_path / "o.zarr"
    calls = []

    def fn(tile):
        calls.append(1)
        if len(calls) == 5:  # a cleanup job deletes the output half-way through the run
            shutil.rmtree(out)
        return label(tile)

    with pytest.raises(IncompleteOutputError, match="moved or deleted"):
        tile_process(blobs2d, fn, (50, 50), output=out, stitch="faces")
    with pytest.raises(IncompleteOutputError):
        open_labels(out)
    again = tile_process(blobs2d, fn, (50, 50), output=out, stitch="faces", resume=True)
    assert same_partition(again[:], ndimage.label(blobs2d)[0])
    assert np.array_equal(open_labels(out)[:], again[:])


# -- 3. an OME-Zarr overwrite stopped before its first tile -----------------------------------
def test_an_ome_overwrite_stopped_early_then_resumed_gives_the_new_labels(ome_image, blobs2d,
                                                                          monkeypatch):
    tile_process(ome_image, label, (50, 50), stitch="faces")
    monkeypatch.setattr(sys.modules[__name__], "INTERRUPT", True)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C before the first tile is stored
        tile_process(ome_image, label_inverse_or_stop, (50, 50), stitch="faces", overwrite=True)
    with pytest.raises(IncompleteOutputError):  # the old labels no longer look like a result
        open_labels(ome_image / "labels" / "blockbuster")
    monkeypatch.setattr(sys.modules[__name__], "INTERRUPT", False)
    new = tile_process(ome_image, label_inverse_or_stop, (50, 50), stitch="faces", resume=True)
    assert np.array_equal(new[:] > 0, ~blobs2d)


def test_a_complete_output_with_other_parameters_is_not_returned_by_resume(tmp_path, blobs2d):
    """A resumed overwrite run whose old output is still complete must not return it."""
    out = tmp_path / "o.zarr"
    tile_process(blobs2d, label, (50, 50), output=out, stitch="faces")
    old = zarr.open_array(str(out), mode="r+")
    work = WorkDir(work_dir_for(out))
    # The state an overwrite run killed between its manifest and its first output write left
    # on disk with older versions: a new manifest, the old complete output.
    work.path.mkdir()
    from blockbuster.output import FORMAT_VERSION

    params = dict(old.attrs["blockbuster"]["params"], segmenter={"fn": "label_inverse"})
    work.create({"format": FORMAT_VERSION, "params": params, "engine": "serial"})
    with pytest.raises(Exception, match=r"label_inverse|other arguments"):
        tile_process(blobs2d, label, (50, 50), output=out, stitch="faces", resume=True)


# -- 4. one output, one run at a time ---------------------------------------------------------
def test_another_work_dir_does_not_bypass_the_lock(tmp_path, blobs2d):
    out = tmp_path / "o.zarr"
    tile_process(blobs2d, label, (50, 50), output=out, stitch="faces")
    holder = RunLock(output_lock_path(out), "the output")  # a first run is writing `out`
    holder.acquire()
    try:
        with pytest.raises(OutputLockedError, match="another blockbuster run"):
            tile_process(blobs2d, label_inverse, (50, 50), output=out, overwrite=True,
                         work_dir=tmp_path / "elsewhere", stitch="faces")
    finally:
        holder.release()
    assert np.array_equal(open_labels(out)[:] > 0, blobs2d)  # the first run's labels stay
    assert not (tmp_path / "elsewhere").exists()
    assert not output_lock_path(out).exists()  # released locks leave no file


def test_the_ome_label_path_as_output_is_the_same_output(ome_image, blobs2d):
    slot = ome_image / "labels" / "blockbuster"
    holder = RunLock(output_lock_path(slot), "the output")
    holder.acquire()
    try:
        with pytest.raises(OutputLockedError):
            tile_process(ome_image, label, (50, 50), output=slot, ome=True, stitch="faces")
    finally:
        holder.release()
    out = tile_process(ome_image, label, (50, 50), output=slot, ome=True, stitch="faces")
    assert "labels/blockbuster" in str(out.store_path)
    labels = zarr.open_group(str(ome_image / "labels"))
    assert "blockbuster" in str(labels.attrs.asdict())  # listed in the image, as the default


def test_a_resume_of_a_complete_output_leaves_no_work_dir(tmp_path, blobs2d):
    out = tmp_path / "o.zarr"
    tile_process(blobs2d, label, (50, 50), output=out, stitch="faces")
    tile_process(blobs2d, label, (50, 50), output=out, stitch="faces", resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]
