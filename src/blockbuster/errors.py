"""Exceptions raised by blockbuster.

Every error a user can trigger is a :class:`BlockbusterError`, so scripts can catch one type.

A message names the options a user can act on with placeholders (``$overwrite``,
``$resume``...): ``str(error)`` says them the Python way (``overwrite=True``), and
:meth:`BlockbusterError.cli_message` the command-line way (``--overwrite``), so that each
interface speaks its own language without rewriting the other's messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from string import Template

__all__ = [
    "OPTION_WORDS",
    "BlockbusterError",
    "ClusterError",
    "IncompleteOutputError",
    "InputError",
    "InputReadError",
    "NoGPUError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "PluginNotInstalledError",
    "ResumeMismatchError",
    "TileError",
    "TileFailures",
    "TileSizeError",
    "WorkDirError",
    "render_message",
    "writing",
]

#: How messages name an option: ``$name`` -> (in Python, on the command line).
OPTION_WORDS: dict[str, tuple[str, str]] = {
    "overwrite": ("overwrite=True", "--overwrite"),
    "resume": ("resume=True", "--resume"),
    "use_gpu": ("use_gpu=True", "--gpu"),
    "memory": ("memory=", "--memory "),
    "tile_shape": ("tile_shape=", "--tile-shape "),
    "overlap": ("overlap=", "--overlap "),
    "channel_axis": ("channel_axis=", "--channel-axis "),
    "work_dir": ("work_dir=", "--work-dir "),
    "output": ("output=", "OUTPUT "),
    "stitch": ("stitch=", "--stitch "),
    "table": ("table=", "--table "),
    "seam_table": ("seam_table=", "--seam-table "),
    "mask": ("mask=", "--mask "),
    "label_name": ("label_name=", "--label-name "),
    "client": ("client=", "--workers/--cluster "),
    "retries": ("retries=", "--retries "),
    "timeout": ("timeout=", "--tile-timeout "),
    "params": ("keyword arguments", "--param KEY=VALUE"),
}


def render_message(message: str, *, cli: bool) -> str:
    """``message`` with its ``$option`` placeholders in Python or command-line wording.

    Examples
    --------
    >>> render_message("pass $overwrite to replace it", cli=False)
    'pass overwrite=True to replace it'
    >>> render_message("pass $overwrite to replace it", cli=True)
    'pass --overwrite to replace it'
    """
    words = {name: pair[1 if cli else 0] for name, pair in OPTION_WORDS.items()}
    return Template(message).safe_substitute(words)


class BlockbusterError(Exception):
    """Base class of every error blockbuster raises on purpose."""

    def __str__(self) -> str:
        return render_message(super().__str__(), cli=False)

    def cli_message(self) -> str:
        """The message in command-line wording (``--overwrite`` for ``overwrite=True``)."""
        return render_message(super().__str__(), cli=True)


class InputError(BlockbusterError, ValueError):
    """The input image or an argument is unusable."""


class InputReadError(InputError):
    """Part of the input cannot be read: a corrupt or missing chunk, a truncated file, a server
    that stopped answering. The message names the file, the region and, where the format has
    them, the chunk.

    Raised before any tile runs (a segmenter's global statistics read a sample of the image), it
    fails the run like any bad input; met by a tile, it fails that tile only: the other tiles
    are kept, and a resume (after the input is repaired) redoes it.
    """


class OutputWriteError(BlockbusterError, OSError):
    """Writing the output, the object table, the work directory or a lock failed (disk full,
    quota, read-only file system...). The run failed; the message names the path.

    ``errno`` is the operating system's error number (``errno.ENOSPC`` for a full disk) and
    ``path`` the file or folder that could not be written.
    """

    def __init__(self, message: str, *, path: str | Path | None = None,
                 errno: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.path = None if path is None else str(path)

    def __reduce__(self):  # pickles (dask sends it back from workers) with its attributes
        return (_rebuild_write_error, (self.args[0], self.path, self.errno))


def _rebuild_write_error(message: str, path: str | None, errno: int | None) -> OutputWriteError:
    return OutputWriteError(message, path=path, errno=errno)


@contextlib.contextmanager
def writing(what: str, path: str | Path | None) -> Iterator[None]:
    """Turn an :class:`OSError` raised while writing ``what`` at ``path`` into an
    :class:`OutputWriteError` that names the path.

    Examples
    --------
    >>> import errno
    >>> with writing("the output", "/data/out.zarr"):
    ...     raise OSError(errno.ENOSPC, "No space left on device")
    Traceback (most recent call last):
    blockbuster.errors.OutputWriteError: the run failed: cannot write the output /data/out.zarr: \
No space left on device (errno 28 ENOSPC); free space or choose another location, then rerun \
with resume=True
    """
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise write_error(exc, what, path) from exc


def write_error(exc: OSError, what: str, path: str | Path | None) -> OutputWriteError:
    """The :class:`OutputWriteError` for ``exc``, raised while writing ``what`` at ``path``."""
    import errno as errnos

    name = errnos.errorcode.get(exc.errno or 0)
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = path if path is not None else exc.filename
    code = f" (errno {exc.errno} {name})" if name else ""
    filename = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(where) else ""
    if exc.errno in (errnos.ENOSPC, getattr(errnos, "EDQUOT", -1), errnos.EFBIG):
        advice = "free space or choose another location"
    elif exc.errno in (errnos.EACCES, errnos.EPERM, errnos.EROFS):
        advice = "make it writable or choose another location"
    else:
        advice = "fix the cause"
    return OutputWriteError(
        f"the run failed: cannot write {what} {where}{filename}: {reason}{code}; {advice}, "
        "then rerun with $resume", path=where, errno=exc.errno)


class OutputExistsError(BlockbusterError, FileExistsError):
    """The output exists and ``overwrite=False``."""


class TileError(BlockbusterError, RuntimeError):
    """The segmentation function failed, or returned something unusable, on one tile.

    Attributes
    ----------
    tile_index : tuple of int
        Position of the tile in the tile grid.
    region : tuple of slice
        Voxel region (with halo) that was passed to the function.
    fn_name : str
        Name of the function that failed.
    """

    def __init__(self, message: str, *, tile_index=None, region=None, fn_name=None, tb=None):
        super().__init__(message)
        self.tile_index = tile_index
        self.region = region
        self.fn_name = fn_name
        self.traceback_text = tb


class TileFailures(TileError):
    """One or more tiles failed; the rest were kept and a resume redoes only the failed ones.

    ``failures`` lists one :class:`TileError` per failed tile; the attributes of the first one
    are also set on this error.
    """

    def __init__(self, message: str, failures: list[TileError]):
        first = failures[0] if failures else None
        super().__init__(message, tile_index=getattr(first, "tile_index", None),
                         region=getattr(first, "region", None),
                         fn_name=getattr(first, "fn_name", None),
                         tb=getattr(first, "traceback_text", None))
        self.failures = failures


class ResumeMismatchError(BlockbusterError, ValueError):
    """A resumed run's arguments differ from the run that started the output."""


class OutputLockedError(BlockbusterError, RuntimeError):
    """Another run is writing the same output right now."""


class NoGPUError(BlockbusterError, RuntimeError):
    """``use_gpu=True`` but no usable GPU was found."""


class TileSizeError(BlockbusterError, ValueError):
    """No tile shape fits the memory budget, or a tile-shape callable returned nonsense."""


class IncompleteOutputError(BlockbusterError, RuntimeError):
    """The labels on disk come from a run that did not finish."""


class PluginNotInstalledError(BlockbusterError, ImportError):
    """A segmenter needs an optional dependency that is not installed."""


class WorkDirError(BlockbusterError, RuntimeError):
    """The state an unfinished run left is damaged, or from another version: it cannot resume."""


class ClusterError(BlockbusterError, RuntimeError):
    """The job queue refused a cluster's jobs, or its jobs kept ending before the run finished."""
