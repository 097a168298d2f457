"""The durable state of a run: its work directory, next to the output.

Layout of ``<output>.blockbuster-work/``::

    manifest.json          the run's parameters; a resumed run must match them
    lock                   held (flock) by the run that keeps its state here
    packs/<attempt>-<writer>-<part>.bbr
                           append-only pack files of entries (below)

A pack file is a sequence of entries, each written whole by one process (the run's own process
writes ``main`` packs; a dask worker writes the raw labels of the tiles it segmented into its
own pack, so no file ever has two writers). Every entry has a fixed header (magic, lengths and
CRC-32 checksums), a JSON header (kind, tile, metadata, and per array its dtype, shape, place
and checksum) and the arrays, each compressed on its own (the smallest stored as they are) so
that a reader decompresses only what it asks for. Entries are never changed: a later entry of
the same kind and tile replaces an earlier one. A torn or damaged entry is ignored with a
warning (its tile is simply done again), so a crash at any moment, or a damaged file, never
blocks a resume.

Entry kinds:

``seg``   a tile was segmented: its label count, core voxel counts, boundary arrays and object
          statistics; also its global labels (``glabels``, ``merges``) when they were assigned
          at once, and ``raw``: where its core labels were kept when they were not
          (``written``: its core is in the output; ``raw_here``: its core labels are in this
          entry, until the shard of a sharded output holding them is written).
``raw``   a tile's core labels with tile-local ids, kept until the tile is assigned.
``asg``   the global labels of a tile segmented earlier (``written``: its core is in the output).
``put``   a tile whose core was written after its ``asg`` entry (``tiles``: the tiles of a
          shard of a sharded output, written whole).
``fail``  a tile whose ``fn`` failed: the error and its traceback.
``bak``   a tile's labels as written, saved before the end of the run rewrites them.
``fix``   that rewrite is done.
``u64``   the output was converted to uint64 (more than 2**32 - 1 objects).

Nothing in here is needed once the output is complete; it is deleted then. blockbuster only
ever deletes the entries it names above (never a whole folder it did not make): a work
directory that holds anything else is refused, and removing one deletes its known entries and
then the folder only if it is empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, MutableMapping, MutableSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from ..errors import OutputExistsError, ResumeMismatchError, WorkDirError, writing
from ..locks import RunLock
from ..output import WORK_SUFFIX, check_parent_is_folder, work_dir_for

__all__ = [
    "ENTRY_KINDS",
    "WORK_SUFFIX",
    "Entry",
    "EntryRef",
    "PackWriter",
    "RunState",
    "WorkDir",
    "check_same_params",
    "work_dir_for",
]

log = logging.getLogger("blockbuster")

#: Version of the on-disk state; a work directory of another version is not resumed.
STATE_FORMAT = 2
ENTRY_KINDS = ("seg", "raw", "asg", "put", "fail", "bak", "fix", "u64")

_CODEC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
_MAGIC = b"BBE2"
# magic, JSON header length, payload length, CRC-32 of the JSON header
_FIXED = struct.Struct("<4sIQI")
#: Arrays of at most this many bytes are stored as they are (compressing a tile's small
#: arrays cost more than the rest of its record; entries without a codec are compressed).
RAW_BYTES = 512
#: A pack file is closed and a new one started past this size.
PACK_BYTES = 1 << 30
#: Entries are made durable (fsync) at least this often, and at once when asked to.
FSYNC_INTERVAL_S = 1.0


# -- entries ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EntryRef:
    """Where an entry lies: a pack file of the work directory, and its byte range."""

    pack: str
    offset: int
    length: int

    def as_json(self) -> list[Any]:
        return [self.pack, self.offset, self.length]

    @classmethod
    def from_json(cls, value: Any) -> EntryRef:
        pack, offset, length = value
        return cls(str(pack), int(offset), int(length))


class DamagedEntry(Exception):
    """An entry whose bytes do not match its checksums (torn write, disk error, edit)."""


class Entry:
    """One entry of a pack file: kind, tile, metadata, and arrays read on demand."""

    def __init__(self, header: dict[str, Any], ref: EntryRef, payload_at: int,
                 reader: _PackReader):
        self.kind: str = header["kind"]
        self.tile: int = int(header["tile"])
        self.meta: dict[str, Any] = header.get("meta", {})
        self.ref = ref
        self._specs: dict[str, dict[str, Any]] = header.get("arrays", {})
        self._payload_at = payload_at
        self._reader = reader
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def in_memory(cls, kind: str, tile: int, meta: dict[str, Any],
                  arrays: dict[str, np.ndarray], ref: EntryRef, reader: _PackReader) -> Entry:
        """The entry just appended at ``ref``, from the arrays that were written (not read
        back: the engine matches later tiles with a tile's record right after writing it).

        Its core labels are left out (a tile's largest array; what needs them reads the entry
        from its pack), and the other arrays are copied: a face is a view that would keep the
        tile's whole labels alive.
        """
        kept = {name: np.array(arr, copy=True) for name, arr in arrays.items()
                if name != "labels"}
        entry = cls({"kind": kind, "tile": tile, "meta": meta,
                     "arrays": {name: {} for name in kept}}, ref, 0, reader)
        entry._cache = kept
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> np.ndarray:
        """An array of the entry, checked against its checksum."""
        if name not in self._cache:
            spec = self._specs[name]
            blob = self._reader.read(self.ref.pack, self._payload_at + spec["offset"],
                                     spec["nbytes"]) if spec["nbytes"] else b""
            if zlib.crc32(blob) != spec["crc"]:
                raise DamagedEntry(f"array {name!r} of the {self.kind} entry of tile {self.tile} "
                                   f"in {self.ref.pack} at byte {self.ref.offset} is damaged")
            raw = blob if not blob or spec.get("codec") == "raw" else _CODEC.decode(blob)
            self._cache[name] = np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"])
        return self._cache[name]

    def get_prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays whose names start with ``prefix``, keyed without it."""
        return {n[len(prefix):]: self.get(n) for n in self._specs if n.startswith(prefix)}

    def verify(self) -> None:
        """Read every array once (raises :class:`DamagedEntry` if one is damaged)."""
        for name in self._specs:
            self.get(name)
        self._cache.clear()


def _encode(kind: str, tile: int, meta: dict[str, Any], arrays: dict[str, np.ndarray],
            ) -> bytes:
    blobs, specs, offset = [], {}, 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        spec: dict[str, Any] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        if arr.nbytes <= RAW_BYTES:
            blob = arr.tobytes()
            spec["codec"] = "raw"
        else:
            blob = _CODEC.encode(arr)
        specs[name] = {**spec, "offset": offset, "nbytes": len(blob), "crc": zlib.crc32(blob)}
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"kind": kind, "tile": int(tile), "meta": meta, "arrays": specs},
                        separators=(",", ":"), default=_json_default).encode()
    fixed = _FIXED.pack(_MAGIC, len(header), offset, zlib.crc32(header))
    return b"".join([fixed, header, *blobs])


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, EntryRef):
        return value.as_json()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class PackWriter:
    """Appends entries to this process's own pack files in a work directory (thread-safe).

    Entries reach the disk in the order they were appended; they are made durable (fsync) at
    least every ``FSYNC_INTERVAL_S`` seconds, and at once with ``sync=True`` (for an entry that
    must survive a power cut before the next step, e.g. a backup taken before a rewrite).
    """

    def __init__(self, packs_dir: Path, attempt: int, writer: str):
        self.dir = Path(packs_dir)
        self.attempt = attempt
        self.writer = writer
        self._lock = threading.Lock()
        self._file: Any = None
        self._name = ""
        self._part = 0
        self._size = 0
        self._last_sync = time.monotonic()

    def _open_next(self) -> None:
        self._close_file()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            self._name = f"{self.attempt:06d}-{self.writer}-{self._part:03d}.bbr"
            self._part += 1
            path = self.dir / self._name
            if not path.exists():
                break
        self._file = open(path, "ab")  # noqa: SIM115 -- held open across appends, closed in close()
        self._size = 0

    def append(self, kind: str, tile: int, meta: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None, *, sync: bool = False) -> EntryRef:
        data = _encode(kind, tile, meta or {}, arrays or {})
        with self._lock, writing("the run's state", self.dir / (self._name or "")):
            if self._file is None or self._size > PACK_BYTES:
                self._open_next()
            offset = self._size
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
            now = time.monotonic()
            if sync or now - self._last_sync >= FSYNC_INTERVAL_S:
                os.fsync(self._file.fileno())
                self._last_sync = now
            return EntryRef(self._name, offset, len(data))

    def sync(self) -> None:
        with self._lock, writing("the run's state", self.dir / self._name):
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._last_sync = time.monotonic()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            try:
                self._close_file()
            except OSError as exc:  # a run failing on a full disk must not hide its first error
                log.warning("could not close %s: %s", self.dir / self._name, exc)
                self._file = None


_WORKER_WRITERS: dict[tuple[str, int], PackWriter] = {}
_WORKER_WRITERS_LOCK = threading.Lock()


def worker_writer(work_path: Path, attempt: int) -> PackWriter:
    """This process's own writer for a run (a dask worker's raw labels go there)."""
    key = (str(work_path), attempt)
    with _WORKER_WRITERS_LOCK:
        if key not in _WORKER_WRITERS:
            name = f"w{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            _WORKER_WRITERS[key] = PackWriter(Path(work_path) / "packs", attempt, name)
        return _WORKER_WRITERS[key]


class _PackReader:
    """Reads byte ranges of pack files (``os.pread``: safe from several threads at once)."""

    def __init__(self, packs_dir: Path):
        self.dir = packs_dir
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, pack: str) -> int:
        fd = self._fds.get(pack)
        if fd is None:
            with self._lock:
                fd = self._fds.get(pack)
                if fd is None:
                    fd = os.open(self.dir / pack, os.O_RDONLY)
                    self._fds[pack] = fd
        return fd

    def read(self, pack: str, offset: int, n: int) -> bytes:
        data = os.pread(self._fd(pack), n, offset)
        if len(data) != n:
            raise DamagedEntry(f"{pack} ends at byte {offset + len(data)}, inside an entry")
        return data

    def entry(self, ref: EntryRef) -> Entry:
        fixed = self.read(ref.pack, ref.offset, _FIXED.size)
        magic, header_len, payload_len, header_crc = _FIXED.unpack(fixed)
        if magic != _MAGIC or _FIXED.size + header_len + payload_len != ref.length:
            raise DamagedEntry(f"no entry at byte {ref.offset} of {ref.pack}")
        header = self.read(ref.pack, ref.offset + _FIXED.size, header_len)
        if zlib.crc32(header) != header_crc:
            raise DamagedEntry(f"the entry at byte {ref.offset} of {ref.pack} is damaged")
        return Entry(json.loads(header), ref, ref.offset + _FIXED.size + header_len, self)

    def scan(self, pack: str) -> list[Entry]:
        """Every intact entry of a pack file, in order; stops at a torn or damaged one."""
        path = self.dir / pack
        size = path.stat().st_size
        found, offset = [], 0
        while offset + _FIXED.size <= size:
            fixed = self.read(pack, offset, _FIXED.size)
            magic, header_len, payload_len, header_crc = _FIXED.unpack(fixed)
            length = _FIXED.size + header_len + payload_len
            if magic != _MAGIC or offset + length > size:
                break
            header = self.read(pack, offset + _FIXED.size, header_len)
            if zlib.crc32(header) != header_crc:
                break
            try:
                found.append(Entry(json.loads(header), EntryRef(pack, offset, length),
                                   offset + _FIXED.size + header_len, self))
            except (ValueError, KeyError):
                break
            offset += length
        if offset < size:
            log.warning("%s is damaged or was cut short at byte %d of %d; the tiles recorded "
                        "after that point will run again", path, offset, size)
        return found

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# -- the index of a run's entries -------------------------------------------------------------
class RefTable(MutableMapping[int, EntryRef]):
    """Tile id -> :class:`EntryRef`, in arrays: 20 bytes a tile, where a dict of refs takes
    about 400 (a run of a million tiles keeps two of these)."""

    def __init__(self, n_tiles: int):
        self._pack = np.full(n_tiles, -1, np.int32)
        self._offset = np.zeros(n_tiles, np.int64)
        self._length = np.zeros(n_tiles, np.int64)
        self._packs: list[str] = []
        self._pack_ids: dict[str, int] = {}
        self._len = 0

    def __getitem__(self, tile: int) -> EntryRef:
        if tile not in self:
            raise KeyError(tile)
        return EntryRef(self._packs[self._pack[tile]], int(self._offset[tile]),
                        int(self._length[tile]))

    def __setitem__(self, tile: int, ref: EntryRef) -> None:
        pack = self._pack_ids.get(ref.pack)
        if pack is None:
            pack = self._pack_ids[ref.pack] = len(self._packs)
            self._packs.append(ref.pack)
        if self._pack[tile] < 0:
            self._len += 1
        self._pack[tile], self._offset[tile], self._length[tile] = pack, ref.offset, ref.length

    def __delitem__(self, tile: int) -> None:
        if tile not in self:
            raise KeyError(tile)
        self._pack[tile] = -1
        self._len -= 1

    def __contains__(self, tile: object) -> bool:
        return bool(isinstance(tile, (int, np.integer)) and 0 <= tile < len(self._pack)
                    and self._pack[tile] >= 0)

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._pack >= 0).tolist())

    def __len__(self) -> int:
        return self._len


class TileSet(MutableSet[int]):
    """A set of tile ids as one byte per tile of the run."""

    def __init__(self, n_tiles: int):
        self._in = np.zeros(n_tiles, bool)
        self._len = 0

    def __contains__(self, tile: object) -> bool:
        return bool(isinstance(tile, (int, np.integer)) and 0 <= tile < len(self._in)
                    and self._in[tile])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._in).tolist())

    def __len__(self) -> int:
        return self._len

    def add(self, tile: int) -> None:
        if not self._in[tile]:
            self._in[tile] = True
            self._len += 1

    def discard(self, tile: int) -> None:
        if tile in self:
            self._in[tile] = False
            self._len -= 1

    def update(self, tiles: Iterable[int]) -> None:
        for tile in tiles:
            self.add(tile)

    def difference_update(self, tiles: Iterable[int]) -> None:
        for tile in tiles:
            self.discard(tile)


class RunState:
    """What the work directory says about every tile, read from its pack files.

    Built once when a run starts (or an output is inspected); the engine keeps it up to date
    as it appends entries (:meth:`note`).
    """

    def __init__(self, work: WorkDir, n_tiles: int):
        self.work = work
        self.n_tiles = n_tiles
        self.reader = _PackReader(work.packs_dir)
        self.seg = RefTable(n_tiles)
        self.assignment = RefTable(n_tiles)  # the seg or asg entry holding glabels
        self.written = TileSet(n_tiles)
        self.failed: dict[int, EntryRef] = {}
        self.backups: dict[int, EntryRef] = {}
        self.fixed = TileSet(n_tiles)
        self.uint64 = False
        self.attempts = 0
        self.damaged: list[str] = []
        self._load()

    def _load(self) -> None:
        packs = sorted(p.name for p in self.work.packs_dir.glob("*.bbr")) \
            if self.work.packs_dir.is_dir() else []
        for pack in packs:
            with contextlib.suppress(ValueError):
                self.attempts = max(self.attempts, int(pack.split("-", 1)[0]))
            for entry in self.reader.scan(pack):
                if (entry.kind != "raw" and 0 <= entry.tile < self.n_tiles) or entry.kind == "u64":
                    self._check_and_note(entry)

    def _check_and_note(self, entry: Entry) -> None:
        if entry.kind in ("seg", "asg", "bak"):
            try:
                entry.verify()
                raw = entry.meta.get("raw")
                if raw is not None:  # the tile's labels must still be readable
                    self.reader.entry(EntryRef.from_json(raw)).verify()
            except (DamagedEntry, OSError, ValueError) as exc:
                self.damaged.append(f"tile {entry.tile}: {exc}")
                log.warning("a %s entry of tile %d is damaged (%s); the tile will run again",
                            entry.kind, entry.tile, exc)
                return
        self.note(entry.kind, entry.tile, entry.ref, entry.meta)

    def note(self, kind: str, tile: int, ref: EntryRef, meta: dict[str, Any]) -> None:
        """Record an entry that was just appended (or read)."""
        if kind == "seg":
            self.seg[tile] = ref
            self.failed.pop(tile, None)
            for table in (self.assignment, self.backups):
                table.pop(tile, None)
            self.written.discard(tile)
            self.fixed.discard(tile)
            if meta.get("assigned"):
                self.assignment[tile] = ref
            if meta.get("written"):
                self.written.add(tile)
        elif kind == "asg":
            self.assignment[tile] = ref
            if meta.get("written"):
                self.written.add(tile)
        elif kind == "put":  # one tile, or the tiles of a shard written whole
            self.written.update(meta.get("tiles", [tile]))
        elif kind == "fail":
            if tile not in self.seg:
                self.failed[tile] = ref
        elif kind == "bak":
            self.backups.setdefault(tile, ref)
        elif kind == "fix":
            self.fixed.add(tile)
        elif kind == "u64":
            self.uint64 = True

    def entry(self, ref: EntryRef) -> Entry:
        return self.reader.entry(ref)

    def record(self, tile: int) -> Entry:
        """The ``seg`` entry of a segmented tile."""
        return self.reader.entry(self.seg[tile])

    def assigned_labels(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """``(glabels, merges)`` of an assigned tile."""
        entry = self.reader.entry(self.assignment[tile])
        return entry.get("glabels"), entry.get("merges")

    def forget_from(self, first: int, keep_pending: bool = True) -> list[int]:
        """Make tiles ``first..`` unassigned (after a damaged entry in the assigned prefix).

        Tiles whose core labels were kept (``raw``) stay segmented and are assigned again; the
        others are forgotten and run again. Returns the forgotten tiles.
        """
        forgotten = []
        for t in [t for t in self.assignment if t >= first]:
            del self.assignment[t]
            self.written.discard(t)
            self.fixed.discard(t)
            self.backups.pop(t, None)
            seg = self.seg.get(t)
            if seg is None or not (keep_pending and "raw" in self.reader.entry(seg).meta):
                self.seg.pop(t, None)
                forgotten.append(t)
        return forgotten

    def close(self) -> None:
        self.reader.close()


# -- the work directory -----------------------------------------------------------------------
class WorkDir:
    """A run's work directory (see the module docstring for the layout)."""

    #: Everything a run may create in its work directory. Nothing else is ever deleted.
    KNOWN_ENTRIES = frozenset({"manifest.json", "manifest.tmp", "lock", "packs"})
    # (clear() names them again, in the order they are deleted)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = RunLock(self.path / "lock", f"the work directory {self.path}")

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def packs_dir(self) -> Path:
        return self.path / "packs"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # -- lifecycle --------------------------------------------------------------------------
    def create(self, manifest: dict[str, Any]) -> None:
        """Start a new run here (the directory must not hold another run)."""
        with writing("the work directory", self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.manifest_path, {**manifest, "state_format": STATE_FORMAT})

    def read_manifest(self) -> dict[str, Any]:
        """The run's manifest; a damaged or foreign one is a :class:`WorkDirError`."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkDirError(
                f"the manifest of the unfinished run in {self.path} cannot be read "
                f"({self.manifest_path.name}: {exc}); the run cannot be resumed. Pass "
                "$overwrite to start again") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("params"), dict):
            raise WorkDirError(f"the manifest {self.manifest_path} is damaged (no parameters); "
                               "the run cannot be resumed. Pass $overwrite to start again")
        if manifest.get("state_format") != STATE_FORMAT:
            raise WorkDirError(
                f"the unfinished run in {self.path} was written by another version of "
                "blockbuster and cannot be resumed by this one. Pass $overwrite to start again")
        return manifest

    def check_same_run(self, manifest: dict[str, Any]) -> None:
        """Refuse to resume a run that was started with different parameters."""
        check_same_params(self.read_manifest()["params"], manifest["params"], str(self.path))

    def foreign_entries(self) -> list[str]:
        """Entries of the directory that no blockbuster run makes (then it is not ours)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in self.KNOWN_ENTRIES and not p.name.endswith(".tmp"))

    def check_usable(self) -> None:
        """Refuse a work directory that is a file, or a folder holding things we did not make."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"the work directory {self.path} is a file; pass another "
                                    "work_dir (a new or empty folder)")
        check_parent_is_folder(self.path, "the work directory")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"the work directory {self.path} holds files blockbuster did not write "
                f"({shown}); it only keeps its state in a new or empty folder, or in one of its "
                "own work directories. Pass another work_dir")

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
        self.clear()
        (self.path / "lock").unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            log.warning("left %s in place: it holds files blockbuster did not write (%s)",
                        self.path, ", ".join(self.foreign_entries()[:5]))

    def clear(self) -> None:
        """Forget the run kept here (for ``overwrite=True``), keeping the lock.

        The manifest goes last: a clean-up cut short still names the run it belonged to.
        """
        for name in ("packs", "manifest.tmp", "manifest.json"):
            _remove_entry(self.path / name)
        for tmp in self.path.glob("*.tmp") if self.path.is_dir() else []:
            _remove_entry(tmp)

    def clear_tiles(self) -> None:
        """Forget every tile (their output is gone): they all run again."""
        _remove_entry(self.packs_dir)

    # -- what a user (and info) asks --------------------------------------------------------
    def n_tiles(self) -> int | None:
        try:
            chunks = self.read_manifest()["params"]["tile_chunks"]
            return int(np.prod([len(c) for c in chunks])) if chunks else None
        except (WorkDirError, KeyError, TypeError):
            return None

    def state(self) -> RunState:
        """The run's tile state; a :class:`WorkDirError` that says why when there is none."""
        self.read_manifest()  # a damaged manifest is named as such
        n = self.n_tiles()
        if n is None:
            raise WorkDirError(f"{self.path} holds no resumable run (its manifest has no tiles)")
        return RunState(self, n)

    def done_tiles(self) -> set[int]:
        """Tiles that were segmented (their record is kept)."""
        if not self.packs_dir.is_dir():
            return set()
        state = self.state()
        try:
            return set(state.seg)
        finally:
            state.close()

    def failed_tiles(self) -> set[int]:
        """Tiles whose ``fn`` failed and that have not been done since."""
        if not self.packs_dir.is_dir():
            return set()
        state = self.state()
        try:
            return set(state.failed)
        finally:
            state.close()


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_same_params(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatchError` naming every parameter that differs (and only them).

    Examples
    --------
    >>> check_same_params({"diameter": 12, "stitch": "iou"}, {"diameter": 13, "stitch": "iou"},
    ...                   "out.zarr")
    Traceback (most recent call last):
    blockbuster.errors.ResumeMismatchError: cannot resume out.zarr: it was started with other \
arguments (diameter: 12 -> 13). Rerun with the original arguments, or pass overwrite=True to \
start over.
    """
    diffs = [d for key in sorted(set(old) | set(new))
             for d in _differences(old.get(key), new.get(key), key)]
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume {where}: it was started with other arguments ("
            + "; ".join(diffs)
            + "). Rerun with the original arguments, or pass $overwrite to start over."
        )


def _differences(old: Any, new: Any, key: str) -> list[str]:
    """What differs between two values of a parameter: the keys that differ, for dicts."""
    if _canon(old) == _canon(new):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [f"{key}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) \
        else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
