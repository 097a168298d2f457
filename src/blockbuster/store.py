"""The work directory next to an output: what a run has done so far, durably.

Layout of ``<output>.blockbuster-work/``::

    manifest.json   the run's parameters; a resumed run must match them
    lock            held (flock) by the run that is writing the output
    tiles/<id>.tile one record per finished tile: label count, voxel counts, boundary data
                    (serial engine: also the global labels it got, and the merges it caused);
                    its presence is what marks the tile done (written last, atomically)
    failed/<id>.txt traceback of a tile whose fn failed
    fixes/<id>.tile serial engine: a tile's labels as written, kept while the end rewrites it
    raw.zarr        distributed engine: each tile's core labels with tile-local ids 1..n
    final.zarr      distributed engine: the stitched map tile-local id -> final label

Nothing in here is needed once the output is complete; it is deleted then. blockbuster only
ever deletes the entries it names above (never a whole directory it did not make): a work
directory that holds anything else is refused, and removing one deletes its known entries and
then the directory only if it is empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from .errors import OutputExistsError, OutputLockedError, ResumeMismatchError

__all__ = ["TileRecord", "WorkDir", "RunLock", "work_dir_for", "check_same_params"]

log = logging.getLogger("blockbuster")

_CODEC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
WORK_SUFFIX = ".blockbuster-work"


def work_dir_for(output: Path) -> Path:
    """The work directory that belongs to an output path."""
    return output.with_name(output.name + WORK_SUFFIX)


class TileRecord:
    """What one finished tile left for stitching: metadata and named arrays.

    On disk: ``MAGIC``, the header length (8 bytes, little endian), a JSON header (the metadata
    and, per array, dtype, shape, offset and size), then each array compressed on its own, so a
    reader decompresses only what it asks for. (Not ``.npz``: NumPy parses its headers with
    ``ast``, which CPython 3.11 cannot do safely from several threads at once.)
    """

    MAGIC = b"BBTILE1\n"

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                 path: Path | None = None, header_end: int = 0):
        self.meta = meta
        self._arrays = arrays or {}
        self._path = path
        self._header_end = header_end

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self.meta.get("arrays", {})

    def get(self, name: str) -> np.ndarray | None:
        if name in self._arrays:
            return self._arrays[name]
        spec = self.meta.get("arrays", {}).get(name)
        if spec is None:
            return None
        if spec["nbytes"] == 0:  # an empty array (Blosc cannot round-trip zero bytes)
            return np.empty(spec["shape"], dtype=spec["dtype"])
        with open(self._path, "rb") as f:
            f.seek(self._header_end + spec["offset"])
            raw = _CODEC.decode(f.read(spec["nbytes"]))
        return np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"])

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename): a reader sees all of it or none."""
        blobs, specs, offset = [], {}, 0
        for name, arr in self._arrays.items():
            blob = _CODEC.encode(np.ascontiguousarray(arr)) if arr.size else b""
            specs[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                           "nbytes": len(blob)}
            blobs.append(blob)
            offset += len(blob)
        header = json.dumps({**self.meta, "arrays": specs}).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.MAGIC + len(header).to_bytes(8, "little") + header)
                for blob in blobs:
                    f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> TileRecord:
        with open(path, "rb") as f:
            if f.read(len(cls.MAGIC)) != cls.MAGIC:
                raise ValueError(f"{path} is not a blockbuster tile record")
            size = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(size))
        return cls(meta, path=path, header_end=len(cls.MAGIC) + 8 + size)


class RunLock:
    """An exclusive advisory lock (``flock``) held on a file while a run writes something.

    The file is deleted when the lock is released, so a finished run leaves nothing behind. A
    process that opened the file just before it was deleted would lock a deleted file: after
    locking, :meth:`acquire` checks that the path still names the locked file, and retries if
    not. (A run killed with SIGKILL leaves the file; the kernel has released its lock, and the
    next run simply takes it.)
    """

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what
        self._file: Any = None
        self._made_parent = False

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        import fcntl

        if self.held:
            return
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True)
            self._made_parent = True
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise OutputLockedError(
                    f"another blockbuster run ({holder}) is writing {self.what} right now "
                    f"(lock {self.path}); wait for it to finish or stop it first") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # the holder released and deleted it meanwhile: lock the new file
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it (see the class docstring)
        self._file.close()
        self._file = None
        if self._made_parent:  # a folder made only for the lock goes with it, if still empty
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
            self._made_parent = False


def holder_of(lock_path: Path) -> str | None:
    """Who holds the lock on ``lock_path`` right now, or None (no lock, or nobody holds it)."""
    import fcntl

    try:
        f = open(lock_path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


class WorkDir:
    """The durable state of one run (see the module docstring for the layout)."""

    #: Everything a run may create in its work directory. Nothing else is ever deleted.
    KNOWN_ENTRIES = frozenset({"manifest.json", "manifest.tmp", "lock", "tiles", "failed",
                               "fixes", "raw.zarr", "final.zarr"})

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = RunLock(self.path / "lock", f"the work directory {self.path}")

    # -- paths ------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def tiles_dir(self) -> Path:
        return self.path / "tiles"

    @property
    def failed_dir(self) -> Path:
        return self.path / "failed"

    @property
    def raw_path(self) -> Path:
        return self.path / "raw.zarr"

    @property
    def final_path(self) -> Path:
        return self.path / "final.zarr"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # -- lifecycle --------------------------------------------------------------------------
    def create(self, manifest: dict[str, Any]) -> None:
        """Start a new run here (the directory must not hold another run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.tiles_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        _write_json_atomic(self.manifest_path, manifest)

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def check_same_run(self, manifest: dict[str, Any]) -> None:
        """Refuse to resume a run that was started with different parameters."""
        check_same_params(self.read_manifest()["params"], manifest["params"], str(self.path))

    def foreign_entries(self) -> list[str]:
        """Entries of the directory that no blockbuster run makes (then it is not ours)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in self.KNOWN_ENTRIES and not _is_temporary(p.name))

    def check_usable(self) -> None:
        """Refuse a work directory that is a file, or a folder holding things we did not make."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"the work directory {self.path} is a file; pass another "
                                    "work_dir (a new or empty folder)")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"the work directory {self.path} holds files blockbuster did not write "
                f"({shown}); it only keeps its state in a new or empty folder, or in one of its "
                "own work directories. Pass another work_dir")

    def acquire_lock(self) -> None:
        """Hold an exclusive lock for this run; a second concurrent run is refused."""
        self.lock.acquire()

    def release_lock(self) -> None:
        """Release the lock; a work directory left with nothing in it is removed."""
        self.lock.release()
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only succeeds when empty

    def remove(self) -> None:
        """Delete the run's state: its known entries, then the folder if nothing else is in it."""
        self.lock.release()
        if not self.path.is_dir():
            return
        for name in self.KNOWN_ENTRIES - {"lock"}:
            _remove_entry(self.path / name)
        for tmp in self.path.iterdir():
            if _is_temporary(tmp.name):
                _remove_entry(tmp)
        (self.path / "lock").unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            log.warning("left %s in place: it holds files blockbuster did not write (%s)",
                        self.path, ", ".join(self.foreign_entries()[:5]))

    def clear(self) -> None:
        """Forget the run kept here (for ``overwrite=True``), keeping the lock."""
        for name in self.KNOWN_ENTRIES - {"lock"}:
            _remove_entry(self.path / name)

    # -- tiles ------------------------------------------------------------------------------
    def record_path(self, tile_id: int) -> Path:
        return self.tiles_dir / f"{tile_id}.tile"

    def done_tiles(self) -> set[int]:
        """Tiles with a complete record (partial temporary files are ignored)."""
        if not self.tiles_dir.exists():
            return set()
        return {int(p.stem) for p in self.tiles_dir.glob("*.tile")}

    def save_record(self, tile_id: int, record: TileRecord) -> None:
        record.save(self.record_path(tile_id))
        (self.failed_dir / f"{tile_id}.txt").unlink(missing_ok=True)

    def load_record(self, tile_id: int) -> TileRecord:
        return TileRecord.load(self.record_path(tile_id))

    def clear_tiles(self) -> None:
        """Forget every finished tile (their output is gone): they all run again."""
        for path in self.tiles_dir.glob("*.tile"):
            path.unlink()
        shutil.rmtree(self.path / "fixes", ignore_errors=True)

    def before_fix_path(self, tile_id: int) -> Path:
        """Where a tile's labels are kept while the serial engine's last pass rewrites it."""
        folder = self.path / "fixes"
        folder.mkdir(exist_ok=True)
        return folder / f"{tile_id}.tile"

    def save_failure(self, tile_id: int, text: str) -> None:
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        (self.failed_dir / f"{tile_id}.txt").write_text(text)

    def failed_tiles(self) -> set[int]:
        if not self.failed_dir.exists():
            return set()
        return {int(p.stem) for p in self.failed_dir.glob("*.txt")}

    # -- arrays -----------------------------------------------------------------------------
    def create_raw(self, shape: tuple[int, ...], chunks: tuple[int, ...], dtype) -> zarr.Array:
        return zarr.create_array(store=str(self.raw_path), shape=shape, chunks=chunks,
                                 dtype=dtype, fill_value=0, overwrite=True)

    def open_raw(self) -> zarr.Array:
        return zarr.open_array(store=str(self.raw_path), mode="r+")

    def save_final_map(self, final: np.ndarray) -> None:
        chunk = max(1, min(len(final), 1 << 20))
        arr = zarr.create_array(store=str(self.final_path), shape=final.shape, chunks=(chunk,),
                                dtype=final.dtype, fill_value=0, overwrite=True)
        arr[:] = final

    def open_final_map(self) -> zarr.Array:
        return zarr.open_array(store=str(self.final_path), mode="r")


def _is_temporary(name: str) -> bool:
    """Files that :func:`TileRecord.save` and :func:`_write_json_atomic` write before renaming."""
    return name.endswith(".tmp")


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_same_params(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatchError` naming every parameter that differs."""
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}"
             for k in keys if _canon(old.get(k)) != _canon(new.get(k))]
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume {where}: it was started with other arguments ("
            + "; ".join(diffs)
            + "). Rerun with the original arguments, or pass overwrite=True to start over."
        )


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


