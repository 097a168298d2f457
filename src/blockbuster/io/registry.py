"""Readers as plugins (in the style of xarray's backends).

A reader is a class with a ``name``, ``guess_can_open(location) -> bool`` and
``open(location, **options) -> ImageSource``. The built-in readers are always there; others are
found through the ``blockbuster.readers`` entry-point group::

    [project.entry-points."blockbuster.readers"]
    myformat = "mypackage.reader:MyFormatReader"

A reader whose module cannot be imported, or whose dependencies are missing, is listed as
unavailable (a broken plugin warns once instead of breaking every other format).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError, PluginNotInstalledError
from .location import Location

if TYPE_CHECKING:
    from .source import ImageSource

__all__ = [
    "READER_GROUP",
    "READER_OPTIONS",
    "Reader",
    "available_readers",
    "get_reader",
    "open_location",
    "reader_table",
]

READER_GROUP = "blockbuster.readers"
#: Options a reader may understand, besides the location itself.
READER_OPTIONS = ("series", "dataset", "level")

#: The built-in readers, in the order they are asked (most specific first).
BUILTIN_READERS = {
    "zarr": "blockbuster.io.readers.zarr_reader:ZarrReader",
    "n5": "blockbuster.io.readers.n5_reader:N5Reader",
    "tiff": "blockbuster.io.readers.tiff_reader:TiffReader",
    "hdf5": "blockbuster.io.readers.hdf5_reader:HDF5Reader",
    "bioio": "blockbuster.io.readers.bioio_reader:BioioReader",
}


class Reader:
    """Base class of image readers.

    Attributes
    ----------
    name : str
        Short name (``open_image(..., reader=name)`` forces it).
    description : str
        One line for listings (formats and what is read).
    suffixes : tuple of str
        File name endings it opens (lower case); used to tell a user which extra a file needs.
    requires : tuple of str
        Modules that must be importable for the reader to work.
    extra : str or None
        The ``blockbuster[extra]`` that installs them.
    options : tuple of str
        Which of ``series``, ``dataset``, ``level`` the reader understands.
    """

    name: ClassVar[str] = "reader"
    description: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def available(cls) -> bool:
        """Whether the modules the reader needs can be imported here."""
        return all(importlib.util.find_spec(m) is not None for m in cls.requires)

    @classmethod
    def install_hint(cls) -> str:
        if cls.extra:
            return f'pip install "blockbuster[{cls.extra}]"'
        return "pip install " + " ".join(cls.requires)

    def guess_can_open(self, location: Location) -> bool:
        """Whether this reader recognises the location (cheap: suffix or marker files)."""
        return location.has_suffix(self.suffixes) if self.suffixes else False

    def open(self, location: Location, **options: Any) -> ImageSource:
        """Open the image at ``location``; ``options`` are some of :data:`READER_OPTIONS`."""
        raise NotImplementedError

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = [k for k, v in options.items() if v is not None and k not in self.options]
        if unknown:
            raise InputError(f"{', '.join(f'{k}=' for k in unknown)} is not supported by the "
                             f"{self.name} reader (it understands: "
                             f"{', '.join(self.options) or 'no options'})")


def _load(target: str) -> type[Reader]:
    module, _, attr = target.partition(":")
    loaded: type[Reader] = getattr(importlib.import_module(module), attr)
    return loaded


@lru_cache(maxsize=1)
def _reader_classes() -> tuple[tuple[str, type[Reader]], ...]:
    found: dict[str, type[Reader]] = {}
    for name, target in BUILTIN_READERS.items():
        found[name] = _load(target)
    from importlib.metadata import entry_points

    for ep in entry_points(group=READER_GROUP):
        if ep.name in found and ep.value == BUILTIN_READERS.get(ep.name):
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 -- a broken plugin must not break the others
            warnings.warn(f"blockbuster reader plugin {ep.name!r} ({ep.value}) failed to load "
                          f"and is skipped: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=3)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Reader)):
            warnings.warn(f"blockbuster reader plugin {ep.name!r} ({ep.value}) is not a "
                          "blockbuster.io.Reader subclass and is skipped", RuntimeWarning,
                          stacklevel=3)
            continue
        found[ep.name] = cls
    return tuple(found.items())


def available_readers() -> dict[str, Reader]:
    """Every reader, installed or not, by name (built-ins first, then plugins)."""
    return {name: cls() for name, cls in _reader_classes()}


def get_reader(name: str) -> Reader:
    readers = available_readers()
    if name not in readers:
        raise InputError(f"unknown reader {name!r}; readers: {', '.join(readers)}")
    reader = readers[name]
    if not reader.available():
        raise PluginNotInstalledError(f"the {name} reader needs {', '.join(reader.requires)} "
                                      f"({reader.install_hint()})")
    return reader


def reader_table() -> list[tuple[str, bool, str]]:
    """``(name, installed, description)`` of every reader, for listings and errors."""
    return [(name, r.available(), r.description) for name, r in available_readers().items()]


def _installed_list() -> str:
    parts = []
    for name, ok, description in reader_table():
        parts.append(f"{name} ({description})" if ok else f"{name} (not installed)")
    return "; ".join(parts)


def open_location(location: Location, reader: str | None = None, **options: Any
                  ) -> ImageSource:
    """Open a path or URL with the named reader, or the first that recognises it."""
    if reader is not None:
        chosen = get_reader(reader)
        chosen.check_options(options)
        return chosen.open(location, **options)
    missing = []
    for r in available_readers().values():
        if not r.available():
            if r.suffixes and location.has_suffix(r.suffixes):
                missing.append(r)
            continue
        if r.guess_can_open(location):
            r.check_options(options)
            return r.open(location, **options)
    if not location.exists():
        problem = location.unreachable()
        if problem is not None:
            raise InputError(f"cannot reach {location.text}: {problem}. Check the address, "
                             "the network and any storage_options (credentials)")
        raise InputError(f"input not found: {location.text}") from FileNotFoundError(
            location.text)
    if missing:
        r = missing[0]
        raise PluginNotInstalledError(
            f"{location.text} looks like a {r.name} file ({r.description}), but that reader "
            f"needs {', '.join(r.requires)}: {r.install_hint()}")
    raise InputError(f"no reader recognises {location.text}. Readers: {_installed_list()}")
