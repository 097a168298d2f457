"""Where labels are written: a zarr array, or an OME-Zarr label image, plus the work directory.

Also the completion marker: a finished output carries ``attrs["blockbuster"]["complete"]``
with the run's parameters, and :func:`open_labels` refuses anything else.

What blockbuster may write to, and delete (:meth:`OutputTarget.check_location`): a path that
does not exist, an empty directory, or an output of its own (one whose zarr attributes carry
the ``"blockbuster"`` marker, complete or provisional). It replaces only its own outputs, and
never writes into, around or over its input (OME-Zarr labels inside their image excepted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import (
    BlockbusterError,
    IncompleteOutputError,
    InputError,
    OutputExistsError,
    writing,
)
from .io import ImageSource, default_output_path
from .locks import RunLock
from .tiling import TileGrid

__all__ = [
    "WORK_SUFFIX",
    "LabelView",
    "OutputTarget",
    "completion",
    "is_blockbuster_output",
    "label_chunks",
    "label_shards",
    "mark_complete",
    "missing_chunks",
    "ome_work_dir",
    "output_lock_path",
    "resolve_output",
    "verify_output",
    "work_dir_for",
]

#: The work directory of an output lies next to it, named after it with this suffix.
WORK_SUFFIX = ".blockbuster-work"

#: The attribute that marks what blockbuster wrote (an output array, or an OME label group).
MARKER = "blockbuster"

log = logging.getLogger("blockbuster")

#: Version of the on-disk layout (work directory and completion marker).
FORMAT_VERSION = 1


@dataclass
class OutputTarget:
    """Where the labels go (a zarr array, or an OME-Zarr label image), and the work directory.

    For OME-Zarr, ``path`` is the label image group (``<image>/labels/<name>`` or a standalone
    group) and the labels themselves are its level ``0``; the pyramid and the NGFF metadata are
    added by :meth:`finalize` once level 0 is complete.
    """

    path: Path | None
    store: Any
    work_path: Path
    temporary: bool = False
    ome_name: str | None = None
    ome_image: Path | None = None
    ome_standalone: bool = False
    #: the label axes (the input's without channels, with their calibration)
    axes: tuple[Any, ...] | None = None
    #: the resolution level of ``ome_image`` the labels were made at (0: full resolution)
    ome_level: int = 0
    #: the output's URL, for a remote output (``s3://...``) written through fsspec
    url: str | None = None

    @property
    def is_ome(self) -> bool:
        return self.ome_name is not None

    @property
    def label_name(self) -> str:
        """The label image's name (OME-Zarr outputs)."""
        return self.ome_name or "blockbuster"

    @property
    def array_path(self) -> Path | None:
        if self.path is None:
            return None
        return self.path / "0" if self.is_ome else self.path

    def exists(self) -> bool:
        if self.array_path is not None:
            return any((self.array_path / m).exists() for m in ("zarr.json", ".zarray"))
        try:
            zarr.open_array(store=self.store, mode="r")
            return True
        except Exception:  # noqa: BLE001 -- nothing there, or not an array
            return False

    def open(self, mode: str = "r") -> zarr.Array:
        store = str(self.array_path) if self.path is not None else self.store
        return zarr.open_array(store=store, mode=mode)

    def create(self, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
               attrs: dict[str, Any], shards: tuple[int, ...] | None = None) -> zarr.Array:
        """A new, empty output (replacing an earlier output of blockbuster's own).

        Only call it in a run that checked the location first (:meth:`check_location`).
        ``shards``: a zarr v3 shard shape, many tile chunks per file (plain zarr outputs only;
        an OME-Zarr label image keeps one file per chunk, as its image may be zarr v2).
        """
        replace_store = self.path is None and self.owned()
        self.remove(claimed=True)
        if not self.is_ome:
            store = str(self.path) if self.path is not None else self.store
            names = [a.name for a in self.axes] if self.axes else None
            return zarr.create_array(store=store, shape=shape, chunks=chunks, dtype=dtype,
                                     fill_value=0, attributes=attrs, overwrite=replace_store,
                                     dimension_names=names, shards=shards)
        from .ome import create_label_level0

        arr = create_label_level0(self.ome_image, self.label_name, shape, chunks, dtype,
                                  standalone_path=self.path if self.ome_standalone else None,
                                  axes=self.axes, level=self.ome_level)
        arr.attrs.update(attrs)
        return arr

    # -- more than 2**32 - 1 objects -------------------------------------------------------
    def _conversion_paths(self) -> tuple[Path, Path]:
        assert self.array_path is not None
        name = self.array_path.name
        return (self.array_path.with_name(f".{name}.uint64-tmp"),
                self.array_path.with_name(f".{name}.uint32-old"))

    def convert_to_uint64(self, arr: zarr.Array) -> zarr.Array:
        """Turn the uint32 output into a uint64 one with the same labels (chunk by chunk).

        The copy is made beside the output and swapped in with two renames, so a crash leaves
        either output whole (:meth:`recover_conversion` tidies up on the next start).
        """
        if self.path is None:
            raise BlockbusterError("more than 4,294,967,295 objects: a uint32 output in a zarr "
                                   "store "
                        "cannot be converted to uint64; write to an output path instead")
        tmp, old = self._conversion_paths()
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs: dict[str, Any] = {"shape": arr.shape, "chunks": arr.chunks, "dtype": np.uint64,
                                  "fill_value": 0, "attributes": dict(arr.attrs),
                                  "zarr_format": arr.metadata.zarr_format,
                                  "shards": arr.shards}
        names = getattr(arr.metadata, "dimension_names", None)
        if names:
            kwargs["dimension_names"] = names
        wide = zarr.create_array(store=str(tmp), **kwargs)
        unit = storage_shape(arr)  # whole shards: never two writes to one file
        grid = tuple(-(-s // u) for s, u in zip(arr.shape, unit, strict=True))
        indices = [tuple(int(i) for i in idx) for idx in np.ndindex(*grid)]
        stored = set(indices) - set(missing_chunks(arr, indices, stored_units=True))
        for idx in stored:
            region = tuple(slice(i * c, min((i + 1) * c, s))
                           for i, c, s in zip(idx, unit, arr.shape, strict=True))
            wide[region] = np.asarray(arr[region]).astype(np.uint64)
        assert self.array_path is not None
        self.array_path.rename(old)
        tmp.rename(self.array_path)
        shutil.rmtree(old)
        return self.open("r+")

    def recover_conversion(self) -> None:
        """Finish or undo a uint64 conversion that a crash interrupted."""
        if self.path is None or self.array_path is None:
            return
        tmp, old = self._conversion_paths()
        if old.exists():
            if self.array_path.exists():
                shutil.rmtree(old)  # the swap happened; only the cleanup was missed
            else:
                old.rename(self.array_path)
        if tmp.exists():
            shutil.rmtree(tmp)  # the copy was not swapped in: the run converts again

    def finalize(self) -> None:
        """Add the multiscale pyramid and NGFF metadata (OME-Zarr outputs only)."""
        if self.is_ome:
            from .ome import finalize_ome_labels

            finalize_ome_labels(self.ome_image, self.label_name,
                                standalone_path=self.path if self.ome_standalone else None,
                                axes=self.axes, level=self.ome_level)

    def owned(self) -> bool:
        """Whether what lies at the output location was written by blockbuster."""
        if self.path is not None:
            return is_blockbuster_output(self.path)
        try:
            return MARKER in zarr.open_array(store=self.store, mode="r").attrs
        except Exception:  # noqa: BLE001 -- nothing there, or not an array
            return False

    def occupied(self) -> list[str]:
        """What lies at the output location now (empty: nothing, or an empty directory)."""
        if self.path is not None:
            if not self.path.exists():
                return []
            if not self.path.is_dir():
                return [self.path.name]
            return sorted(p.name for p in self.path.iterdir())
        try:
            zarr.open(store=self.store, mode="r")
            return ["zarr node"]
        except Exception:  # noqa: BLE001 -- nothing there
            return []

    def check_location(self, inputs: Iterable[Path | None], *, claimed: bool = False) -> None:
        """Refuse an output location blockbuster must not write to (see the module docstring).

        ``inputs`` are the paths the run reads (the image, the mask): the output may not be,
        contain or lie inside one of them, except OME-Zarr labels at ``<image>/labels/<name>``.
        ``claimed``: an unfinished run of blockbuster's own names this output in its work
        directory, so what lies there is that run's.
        """
        if self.path is not None:
            check_parent_is_folder(self.path, "output")
            out = self.path.resolve()
            for given in inputs:
                if given is not None:
                    self._check_apart(out, Path(given).resolve())
        occupied = self.occupied()
        if occupied and not (claimed or self.owned()):
            shown = ", ".join(occupied[:5]) + (", ..." if len(occupied) > 5 else "")
            what = "is a file" if self.path is not None and self.path.is_file() else (
                f"already holds data that blockbuster did not write ({shown})")
            raise OutputExistsError(
                f"output {self.describe()} {what}. blockbuster writes only to a new path, an "
                "empty folder, or one of its own outputs, and never replaces anything else "
                "(not even with $overwrite); choose another output path")

    def _check_apart(self, out: Path, given: Path) -> None:
        if self.is_ome and not self.ome_standalone and self.ome_image is not None \
                and given == self.ome_image.resolve() and out.parent.parent == given:
            return  # <image>/labels/<name>: the NGFF place for an image's labels
        if out == given:
            problem = "is the input"
        elif given.is_relative_to(out):
            problem = f"contains the input {given}"
        elif out.is_relative_to(given):
            problem = f"lies inside the input {given}"
        else:
            return
        raise InputError(f"output {self.path} {problem}: blockbuster never writes into or over "
                         "what it reads; choose an output path outside it")

    def lock(self) -> RunLock | None:
        """The lock that keeps two runs from writing this output at once (None for a store).

        It lives next to the output, named after it, so every run that writes there takes the
        same lock, whatever work directory it uses.
        """
        if self.path is None:
            return None
        return RunLock(output_lock_path(self.path), f"the output {self.path}")

    def remove(self, *, claimed: bool = False) -> None:
        """Delete the output before a new run replaces it: only ever one of blockbuster's own.

        ``claimed``: see :meth:`check_location`.
        """
        if not self.occupied():
            return
        if not (claimed or self.owned()):  # check_location refuses this before a run starts
            raise OutputExistsError(f"refusing to delete {self.describe()}: blockbuster did not "
                                    "write it")
        if self.is_ome and not self.ome_standalone and self.ome_image is not None:
            from .ome import remove_label_image

            remove_label_image(self.ome_image, self.ome_name or "")
        elif self.path is not None:
            shutil.rmtree(self.path)
        # a store given by the caller is replaced by create(overwrite=True) instead

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return self.url or repr(self.store)


def output_lock_path(path: Path) -> Path:
    """``<parent>/.<name>.blockbuster-lock``: the lock of the output at ``path``.

    Examples
    --------
    >>> output_lock_path(Path("/data/img.labels.zarr")).as_posix()
    '/data/.img.labels.zarr.blockbuster-lock'
    """
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.blockbuster-lock")


def _zarr_attrs(path: Path) -> dict[str, Any]:
    """The user attributes of the zarr node at ``path`` (v3 or v2), read as plain JSON."""
    try:
        if (path / "zarr.json").is_file():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        elif (path / ".zattrs").is_file():
            attrs = json.loads((path / ".zattrs").read_text())
        else:
            return {}
    except (OSError, ValueError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def is_blockbuster_output(path: str | Path) -> bool:
    """Whether ``path`` is a label array or OME-Zarr label image that blockbuster wrote.

    Complete or not: the marker is written when the output is created.
    """
    path = Path(path)
    return MARKER in _zarr_attrs(path) or MARKER in _zarr_attrs(path / "0")


def work_dir_for(output: Path) -> Path:
    """The work directory that belongs to an output path.

    Examples
    --------
    >>> work_dir_for(Path("/data/img.labels.zarr")).as_posix()
    '/data/img.labels.zarr.blockbuster-work'
    """
    return output.with_name(output.name + WORK_SUFFIX)


def ome_work_dir(image: Path, label_name: str) -> Path:
    """Work directory of the labels ``<image>/labels/<label_name>``: next to the image."""
    return image.with_name(f"{image.name}.{label_name}{WORK_SUFFIX}")


def resolve_output(output: Any, source: ImageSource, work_dir: Any, ome: bool | None,
                   label_name: str) -> OutputTarget:
    """Where a run on ``source`` writes its labels (see :func:`tile_process`'s ``output``)."""
    from dataclasses import replace

    if work_dir is not None and not isinstance(work_dir, (str, os.PathLike)):
        raise InputError(f"work_dir={work_dir!r} must be a path (a new or empty folder, or a "
                         "work directory of blockbuster's own)")
    check_label_name(label_name)
    if output is not None and isinstance(output, (bytes, int, float)):
        raise InputError(f"output={output!r} must be a path or a zarr store")
    target = _resolve_output(output, source, work_dir, ome, label_name)
    level = source.meta.level if target.ome_image is not None else 0
    return replace(target, axes=source.label_axes, ome_level=level)


def check_label_name(name: Any) -> str:
    """A label image's name: one plain folder name (it becomes ``<image>/labels/<name>``).

    Examples
    --------
    >>> check_label_name("nuclei")
    'nuclei'
    >>> check_label_name("a/b")
    Traceback (most recent call last):
    blockbuster.errors.InputError: label_name='a/b' must be a plain name (letters, digits, ., -, \
_), not a path
    """
    if not isinstance(name, str) or not name or name in (".", "..") or \
            any(c in name for c in "/\\\0") or name != name.strip():
        raise InputError(f"label_name={name!r} must be a plain name (letters, digits, ., -, _), "
                         "not a path")
    return name


def check_parent_is_folder(path: Path, what: str) -> None:
    """Refuse ``path`` when something on its way is a file (it could never be created)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path} cannot be created: {parent} is a file, not a "
                                 "folder")
            return


def _resolve_output(output: Any, source: ImageSource, work_dir: Any, ome: bool | None,
                    label_name: str) -> OutputTarget:
    def work_for(path: Path) -> Path:
        return Path(work_dir) if work_dir else work_dir_for(path)

    image = source.path if source.kind == "ome-zarr" else None  # a local OME-Zarr image
    if output is None and image is not None and ome is not False:
        # The NGFF way: <image>/labels/<name>, listed in the image for napari & co.
        group = image / "labels" / label_name
        work = Path(work_dir) if work_dir else ome_work_dir(image, label_name)
        return OutputTarget(group, None, work, ome_name=label_name, ome_image=image)
    if isinstance(output, str) and "://" in output and not output.startswith("file://"):
        return _remote_output(output, work_dir, ome)
    if isinstance(output, str) and output.startswith("file://"):
        from urllib.parse import unquote, urlparse

        output = Path(unquote(urlparse(output).path))
    if output is None and source.path is None and source.url is not None:
        raise InputError(f"the input {source.url} is remote: give an $output path on this "
                         "machine (the work directory stays next to it)")
    if output is None:
        if source.path is not None:
            output = default_output_path(source.path)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="blockbuster-"))
            log.info("in-memory input: writing labels to %s", tmp / "labels.zarr")
            output = tmp / "labels.zarr"
            return OutputTarget(output, None, work_for(output), temporary=True,
                                ome_name=label_name if ome else None, ome_standalone=True)
    if isinstance(output, (str, Path)):
        path = Path(output)
        if image is not None and ome is not False and _is_label_slot(path, image):
            # <image>/labels/<name> named explicitly: the same label image (same lock and work
            # directory) as the default output with label_name=<name>
            work = Path(work_dir) if work_dir else ome_work_dir(image, path.name)
            return OutputTarget(image / "labels" / path.name, None, work,
                                ome_name=path.name, ome_image=image)
        standalone = ome if ome is not None else path.name.lower().endswith(".ome.zarr")
        return OutputTarget(path, None, work_for(path), ome_name=label_name if standalone else None,
                            ome_image=image, ome_standalone=True)
    if ome:
        raise InputError("ome=True needs an output path (or an OME-Zarr input), not a store")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="blockbuster-work-"))
    return OutputTarget(None, output, work)


def _remote_output(url: str, work_dir: Any, ome: bool | None) -> OutputTarget:
    """A zarr array at a URL (``s3://bucket/labels.zarr``), written through fsspec.

    The work directory stays on this machine: ``work_dir``, else
    ``./<name>.blockbuster-work`` in the current directory (the same on a resume from there).
    A remote output is not locked (object stores have no locks): do not start two runs on it.
    """
    if ome:
        raise InputError(f"output {url}: OME-Zarr label images are written to local paths; "
                         "write a plain zarr array to the URL (ome=False), or write locally "
                         "and copy")
    try:
        store = zarr.storage.FsspecStore.from_url(url)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        raise InputError(f"writing to {url} needs the fsspec filesystem for {protocol}:// "
                         f"({exc}); for S3: pip install \"blockbuster[s3]\"") from exc
    name = url.rstrip("/").rsplit("/", 1)[-1] or "labels"
    work = Path(work_dir) if work_dir else Path.cwd() / f"{name}{WORK_SUFFIX}"
    return OutputTarget(None, store, work, url=url)


def _is_label_slot(path: Path, image: Path | None) -> bool:
    """Whether ``path`` is ``<image>/labels/<name>``."""
    if image is None:
        return False
    path = path.resolve()
    return path.parent.name == "labels" and path.parent.parent == image.resolve()


def completion(arr: zarr.Array) -> dict[str, Any] | None:
    meta = arr.attrs.get("blockbuster")
    return meta if isinstance(meta, dict) else None


class LabelView:
    """The output array as the tiles see it: indexed over the image's tiled axes.

    The label array has the input's axes without the channel axis, singleton axes kept, so that
    it lines up with its image in a viewer; a tile's region (over the tiled axes: time and
    space) maps into it through :meth:`ImageSource.label_index`. Picklable (a worker writes
    through it).

    Examples
    --------
    >>> import zarr
    >>> from blockbuster.io import open_image
    >>> image = zarr.create_array({}, shape=(1, 6, 4), dtype="uint8",
    ...                           dimension_names=("z", "y", "x"))  # a 2-D plane stored as 3-D
    >>> source = open_image(image)
    >>> labels = zarr.create_array({}, shape=source.label_shape, chunks=(1, 3, 4), dtype="u4")
    >>> view = LabelView(labels, source)
    >>> view[0:3, 0:4] = np.ones((3, 4), np.uint32)
    >>> labels[0, :, 0].tolist(), view.chunk_index((slice(3, 6), slice(0, 4)))
    ([1, 1, 1, 0, 0, 0], (0, 1, 0))
    """

    def __init__(self, array: zarr.Array, source: ImageSource):
        self.array = array
        self.source = source

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def _index(self, region: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
        index = self.source.label_index(region)
        return index, tuple(s.stop - s.start for s in index)

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray:
        index, _ = self._index(region)
        return np.asarray(self.array[index]).reshape(
            tuple(s.stop - s.start for s in region))

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray) -> None:
        index, shape = self._index(region)
        with writing("the labels", store_location(self.array)):
            self.array[index] = np.asarray(values).reshape(shape)

    def chunk_index(self, region: tuple[slice, ...]) -> tuple[int, ...]:
        """The index of the output chunk a tile's core is."""
        index, _ = self._index(region)
        return tuple(s.start // c for s, c in zip(index, self.array.chunks, strict=True))


def label_chunks(source: ImageSource, grid: TileGrid) -> tuple[int, ...]:
    """The output's chunk shape: a tile core, over the label axes (1 on singleton axes)."""
    index = source.label_index(tuple(slice(0, c) for c in grid.tile_shape))
    return tuple(s.stop - s.start for s in index)


#: Tiles whose core holds at most this many voxels are stored sharded (zarr v3): one file per
#: shard of about SHARD_TILES tiles instead of one per tile (a million 16 x 16 tiles would
#: otherwise be a million files). Larger tiles make files large enough on their own.
SHARD_MAX_TILE_VOXELS = 128 * 128
SHARD_TILES = 256
#: Runs with fewer tiles are not sharded: they make few files anyway, and each tile's chunk is
#: then written as soon as the tile is labelled rather than held until its shard is full.
SHARD_MIN_TILES = 1024


def shard_tiles(grid: TileGrid) -> tuple[int, ...] | None:
    """How many tiles a shard spans along each tiled axis, or None to store unsharded.

    Shards are filled along the last axis first (grid order), so the committer, which writes
    tiles in grid order, finishes one shard before it starts the next but one: at most about
    two shards are held in memory (:class:`ShardBuffer`).

    Examples
    --------
    >>> from blockbuster.tiling import TileGrid
    >>> shard_tiles(TileGrid((4096, 4096), (16, 16), (0, 0)))
    (1, 256)
    >>> shard_tiles(TileGrid((128, 128, 128), (8, 8, 8), (0, 0, 0)))
    (1, 16, 16)
    >>> shard_tiles(TileGrid((256, 256), (16, 16), (0, 0))) is None  # 256 tiles: too few
    True
    >>> shard_tiles(TileGrid((4096, 4096), (512, 512), (0, 0))) is None
    True
    """
    if int(np.prod(grid.tile_shape)) > SHARD_MAX_TILE_VOXELS or grid.n_tiles < SHARD_MIN_TILES:
        return None
    per = [1] * grid.ndim
    left = SHARD_TILES
    for axis in reversed(range(grid.ndim)):
        take = min(grid.grid_shape[axis], left)
        per[axis] = max(1, take)
        left //= per[axis]
        if left <= 1:
            break
    return tuple(per) if int(np.prod(per)) > 1 else None


def label_shards(source: ImageSource, grid: TileGrid) -> tuple[int, ...] | None:
    """The output's shard shape over the label axes, or None (see :func:`shard_tiles`)."""
    per = shard_tiles(grid)
    if per is None:
        return None
    # the tile counts mapped onto the label axes (k <= the grid <= the image: never clipped)
    counts = source.label_index(tuple(slice(0, k) for k in per))
    return tuple(c * (s.stop - s.start)
                 for c, s in zip(label_chunks(source, grid), counts, strict=True))


class ShardBuffer:
    """Tile cores of a sharded output gathered in memory, each shard written once, whole.

    Writing one tile into a shard that holds others makes zarr read, merge and rewrite the
    whole shard (and two writers of one shard would lose each other's tiles). Instead the
    committer puts each core here; once every tile of a shard has had its turn in grid order
    (:meth:`complete_before`), the shard is written in one piece and its tiles reported as
    written, never before: a crash loses only what was not reported, and the resumed run
    writes every tile of such a shard again from their records (a shard is never read back).
    """

    def __init__(self, view: LabelView, grid: TileGrid, per: tuple[int, ...]):
        self.view = view
        self.grid = grid
        self.per = per
        self._open: dict[tuple[int, ...], tuple[np.ndarray, list[int]]] = {}

    @classmethod
    def for_output(cls, view: LabelView, grid: TileGrid) -> ShardBuffer | None:
        """A buffer when the output is sharded as :func:`label_shards` makes it, else None."""
        shards = view.array.shards
        per = shard_tiles(grid)
        if shards is None or per is None:
            return None
        if tuple(shards) != label_shards(view.source, grid):
            return None  # not our layout: plain (read-modify-write) writes stay correct
        return cls(view, grid, per)

    def shard_ids(self, tile_ids: np.ndarray) -> np.ndarray:
        """A number per tile naming its shard (vectorised :meth:`shard_of`)."""
        index = np.unravel_index(tile_ids, self.grid.grid_shape)
        per_shard = [(i // k) for i, k in zip(index, self.per, strict=True)]
        dims = [-(-g // k) for g, k in zip(self.grid.grid_shape, self.per, strict=True)]
        return np.ravel_multi_index(per_shard, dims)

    def shard_of(self, tile_id: int) -> tuple[int, ...]:
        index = self.grid.tile(tile_id).index
        return tuple(i // k for i, k in zip(index, self.per, strict=True))

    def region(self, shard: tuple[int, ...]) -> tuple[slice, ...]:
        """The shard's region over the tiled axes (clipped to the image)."""
        return tuple(slice(i * k * t, min((i + 1) * k * t, n)) for i, k, t, n in
                     zip(shard, self.per, self.grid.tile_shape, self.grid.shape, strict=True))

    def last_tile(self, shard: tuple[int, ...]) -> int:
        """The shard's last tile in grid order."""
        index = tuple(min((i + 1) * k, g) - 1 for i, k, g in
                      zip(shard, self.per, self.grid.grid_shape, strict=True))
        return int(np.ravel_multi_index(index, self.grid.grid_shape))

    def put(self, tile_id: int, values: np.ndarray) -> None:
        """Hold a tile's core (labels in the output's dtype) until its shard is written."""
        shard = self.shard_of(tile_id)
        region = self.region(shard)
        if shard not in self._open:
            # Never read back: a resumed run puts every tile of a shard it writes again (see
            # Committer.unwritten), so a shard a crash tore is replaced, not decoded.
            shape = tuple(r.stop - r.start for r in region)
            self._open[shard] = (np.zeros(shape, self.view.dtype), [])
        buffer, tiles = self._open[shard]
        core = self.grid.tile(tile_id).core
        local = tuple(slice(c.start - r.start, c.stop - r.start)
                      for c, r in zip(core, region, strict=True))
        buffer[local] = values
        tiles.append(tile_id)

    def widen(self, dtype: np.dtype) -> None:
        """The output became ``dtype`` (uint64): so do the held cores."""
        self._open = {k: (b.astype(dtype), t) for k, (b, t) in self._open.items()}

    def complete_before(self, frontier: int) -> list[int]:
        """Write every held shard whose tiles all come before ``frontier`` in grid order;
        returns the tiles now in the output."""
        done = [s for s in self._open if self.last_tile(s) < frontier]
        return [t for shard in done for t in self._write(shard)]

    def flush(self) -> list[int]:
        """Write every held shard (the run's end: every tile had its turn)."""
        return [t for shard in list(self._open) for t in self._write(shard)]

    def _write(self, shard: tuple[int, ...]) -> list[int]:
        buffer, tiles = self._open.pop(shard)
        self.view[self.region(shard)] = buffer
        return tiles

    @property
    def held_tiles(self) -> int:
        return sum(len(t) for _, t in self._open.values())


def verify_output(target: OutputTarget, view: LabelView, grid: TileGrid,
                  manifest: dict[str, Any], has_labels: np.ndarray | None) -> None:
    """Check what the run wrote before it may be called complete.

    The output must still be there, unchanged (its shape, tile chunks and this run's marker),
    and every tile whose core holds labels must have its chunk stored. Something else (a user,
    a cleanup job) deleting or replacing the output during the run is caught here.

    Raises
    ------
    IncompleteOutputError
        What is wrong; the output is left unfinished and the work directory kept.
    """
    where = target.describe()

    def fail(problem: str) -> IncompleteOutputError:
        return IncompleteOutputError(
            f"the labels written to {where} are not what this run wrote: {problem}. Was the "
            "output moved or deleted during the run? It is left unfinished; rerun with "
            "$resume to redo what is missing")

    try:
        out = target.open()
    except Exception as exc:
        raise fail(f"it cannot be opened ({type(exc).__name__}: {exc})") from exc
    meta = completion(out) or {}
    if meta.get("params") != manifest["params"]:
        raise fail("its blockbuster marker is missing or belongs to another run")
    shape, chunks = view.source.label_shape, label_chunks(view.source, grid)
    if tuple(out.shape) != shape or tuple(out.chunks) != chunks:
        raise fail(f"its shape {out.shape} / chunks {out.chunks} are not the run's "
                   f"{shape} / {chunks}")
    if has_labels is None:
        return
    wanted = [view.chunk_index(grid.tile(int(t)).core) for t in np.flatnonzero(has_labels)]
    missing = missing_chunks(out, wanted)
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise fail(f"{len(missing)} tile(s) with objects have no stored chunk ({shown})")


def storage_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of what one file of ``arr`` holds: a shard when sharded, else a chunk."""
    return tuple(arr.shards) if arr.shards is not None else tuple(arr.chunks)


def missing_chunks(arr: zarr.Array, indices: list[tuple[int, ...]], *,
                   stored_units: bool = False) -> list[tuple[int, ...]]:
    """The chunk indices among ``indices`` whose chunk is not stored in ``arr``'s store.

    In a sharded array a chunk counts as stored when its shard is (``stored_units``: the
    indices are of shards already).
    """
    from zarr.core.sync import sync

    if arr.shards is not None and not stored_units:
        per = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))
        shard_of = {i: tuple(a // p for a, p in zip(i, per, strict=True)) for i in indices}
        gone = set(missing_chunks(arr, sorted(set(shard_of.values())), stored_units=True))
        return [i for i in indices if shard_of[i] in gone]

    prefix = f"{arr.path}/" if arr.path else ""

    async def listed() -> set[str]:
        return {key async for key in arr.store.list_prefix(prefix)}

    stored = sync(listed())
    return [i for i in indices
            if prefix + arr.metadata.encode_chunk_key(tuple(i)) not in stored]


def mark_complete(out: zarr.Array, manifest: dict[str, Any], n_labels: int, *,
                  table: str | None = None, statistics: dict[str, Any] | None = None,
                  report: dict[str, Any] | None = None,
                  axes: Sequence[Any] | None = None,
                  spacing_um: Sequence[float | None] | None = None) -> None:
    """Mark a finished output: written last, so its presence means everything is there.

    ``statistics``: the global values the segmenter computed from the whole image (threshold,
    percentiles), so that a run can be compared and reproduced. ``report``: the run's report
    (:mod:`blockbuster.report`). ``axes``: the label axes with their calibration (name, type,
    unit, scale, translation), kept in plain zarr outputs too, which have no NGFF metadata.
    ``spacing_um``: the voxel size in µm of the spatial axes, stored only when all are known
    (the analyses read it: :func:`blockbuster.measure` on the labels alone is calibrated).
    """
    meta: dict[str, Any] = {"complete": True, "params": manifest["params"],
                            "n_labels": int(n_labels), "format": FORMAT_VERSION}
    if axes:
        meta["axes"] = [a.as_dict() for a in axes]
    known = [float(s) for s in spacing_um or () if s is not None]
    if spacing_um and len(known) == len(spacing_um):
        meta["spacing_um"] = known
    if table is not None:
        meta["table"] = table
    if statistics:
        meta["statistics"] = statistics
    if report is not None:
        meta["report"] = report
    with writing("the labels", store_location(out)):
        out.attrs["blockbuster"] = meta


def store_location(arr: zarr.Array) -> str:
    """Where a zarr array is stored, for messages (its folder for a local store).

    Examples
    --------
    >>> store_location(zarr.create_array({}, shape=(2,), dtype="u1"))
    'a zarr array in memory'
    """
    root = getattr(arr.store, "root", None)
    if root is not None:
        return str(Path(root) / arr.path) if arr.path else str(root)
    return "a zarr array in memory" if type(arr.store).__name__ == "MemoryStore" else \
        f"{arr.store}/{arr.path}"
