"""Where an input lives: a local path, or a URL read through fsspec."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import InputError, PluginNotInstalledError

__all__ = ["Location", "as_location"]

#: fsspec protocols that need an extra (pip package) to be installed.
_PROTOCOL_EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", None), "gcs": ("gcsfs", None),
                    "az": ("adlfs", None), "abfs": ("adlfs", None)}


@dataclass(frozen=True)
class Location:
    """A local path or a remote URL, as a reader sees it.

    Attributes
    ----------
    text : str
        The location as the user gave it.
    path : pathlib.Path or None
        Local path (``file://`` URLs become paths).
    url : str or None
        Remote URL (``http(s)://``, ``s3://``...), read through fsspec.
    storage_options : dict
        fsspec options for the remote filesystem (credentials, anonymous access...).
    """

    text: str
    path: Path | None = None
    url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def name(self) -> str:
        """Last component, lower case (for suffix checks)."""
        if self.path is not None:
            return self.path.name.lower()
        assert self.url is not None
        return self.url.rstrip("/").rsplit("/", 1)[-1].lower()

    def has_suffix(self, suffixes: tuple[str, ...]) -> bool:
        return self.name.endswith(suffixes)

    def join(self, *parts: str) -> Location:
        """A location inside this one."""
        if self.path is not None:
            return Location(str(self.path.joinpath(*parts)), self.path.joinpath(*parts))
        assert self.url is not None
        url = "/".join([self.url.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(url, None, url, self.storage_options)

    def fs(self) -> tuple[Any, str]:
        """The fsspec filesystem and the path in it."""
        import fsspec

        if self.url is None:
            return fsspec.filesystem("file"), str(self.path)
        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:
            protocol = self.url.split("://", 1)[0]
            package, extra = _PROTOCOL_EXTRAS.get(protocol, (str(exc.name or protocol), None))
            how = f'pip install "blockbuster[{extra}]"' if extra else f"pip install {package}"
            raise PluginNotInstalledError(
                f"reading {self.url} needs {package} ({how})") from exc

    def exists(self) -> bool:
        if self.path is not None:
            return self.path.exists()
        fs, path = self.fs()
        try:
            return bool(fs.exists(path))
        except Exception:  # noqa: BLE001 -- an unreachable server is not an existing input
            return False

    def unreachable(self) -> str | None:
        """Why a remote location cannot be asked anything (no such host, connection refused,
        a timeout...), or None when its server answers (or it is a local path)."""
        if self.url is None:
            return None
        if self.url.split("://", 1)[0].lower() in ("http", "https"):
            return _http_unreachable(self.url)  # fsspec reports a dead server as "not found"
        fs, path = self.fs()
        try:
            fs.info(path)
        except FileNotFoundError:
            return None  # the server answered: there is nothing there
        except Exception as exc:  # noqa: BLE001 -- every network library has its own errors
            return f"{type(exc).__name__}: {exc}"
        return None

    def is_file(self) -> bool:
        if self.path is not None:
            return self.path.is_file()
        fs, path = self.fs()
        try:
            return bool(fs.isfile(path))
        except Exception:  # noqa: BLE001 -- an unreachable server is not a file
            return False

    def child_exists(self, name: str) -> bool:
        """Whether ``name`` exists inside this location (a zarr marker file, a group)."""
        return self.join(name).exists()

    def open_file(self) -> Any:
        """A binary, seekable file object (for TIFF and HDF5)."""
        if self.path is not None:
            return open(self.path, "rb")
        fs, path = self.fs()
        return fs.open(path, "rb")


def _http_unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why an HTTP server does not answer for ``url`` (None: it answered, even with 404)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # an answer (404, 403...): the server is there
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def as_location(image: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
                ) -> Location:
    """A :class:`Location` for a path or URL.

    Examples
    --------
    >>> as_location("file:///data/img.zarr").path.as_posix()
    '/data/img.zarr'
    >>> loc = as_location("https://example.org/img.zarr/")
    >>> loc.is_remote, loc.name
    (True, 'img.zarr')
    """
    text = os.fspath(image)
    if not isinstance(text, str):
        raise InputError(f"cannot read an image from the bytes path {text!r}")
    if "://" not in text:
        if storage_options:
            raise InputError("storage_options are for URLs (s3://, https://...), not paths")
        return Location(text, Path(text))
    parsed = urlparse(text)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        return Location(text, path)
    return Location(text, None, text.rstrip("/"), dict(storage_options or {}))
