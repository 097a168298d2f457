"""N5 datasets through TensorStore (zarr-python 3 no longer reads N5).

N5 lists dimensions fastest-first (x, y, z); like zarr v2's N5 store, blockbuster presents them
in C order (z, y, x), a free transposed view. Axis names come from the ``axes`` attribute and the
voxel size from ``pixelResolution`` / ``resolution`` (n5-viewer, BigStitcher conventions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from ..location import Location
from ..model import Axis, ImageMetadata, axis_type_of_name, guessed_axes
from ..registry import Reader
from ..source import ImageSource

__all__ = ["N5Reader", "N5Ref", "TensorStoreArray"]


class TensorStoreArray:
    """A TensorStore as a NumPy-like array: ``arr[index]`` reads into NumPy."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.shape = tuple(int(s) for s in store.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        chunk = store.chunk_layout.read_chunk.shape
        self.chunks = tuple(int(c) if c else s for c, s in zip(chunk, self.shape, strict=True))

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.asarray(self.store[index].read().result())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _kvstore(location: Location) -> dict[str, Any]:
    if location.path is not None:
        return {"driver": "file", "path": str(location.path)}
    assert location.url is not None
    if location.url.startswith(("http://", "https://")):
        return {"driver": "http", "base_url": location.url}
    return {"url": location.url}


@dataclass(frozen=True)
class N5Ref:
    """Reopens an N5 dataset (TensorStore), transposed to C order."""

    location: Location

    def open(self) -> TensorStoreArray:
        import tensorstore as ts

        try:
            store = ts.open({"driver": "n5", "kvstore": _kvstore(self.location)},
                            read=True).result()
        except Exception as exc:
            raise InputError(f"cannot open N5 dataset {self.location.text}: {exc}") from exc
        return TensorStoreArray(store.T)


def _attributes(location: Location) -> dict[str, Any] | None:
    try:
        with location.join("attributes.json").open_file() as f:
            value = json.loads(f.read())
    except Exception:  # noqa: BLE001 -- no readable attributes: not N5
        return None
    return value if isinstance(value, dict) else None


class N5Reader(Reader):
    """N5 datasets (and N5 containers with one dataset or an ``s0`` scale level)."""

    name = "n5"
    description = "N5 datasets (TensorStore)"
    suffixes = (".n5",)
    requires = ("tensorstore",)
    extra = "n5"
    options = ("dataset", "level")

    def guess_can_open(self, location: Location) -> bool:
        if location.path is not None and not location.path.is_dir():
            return False
        attrs = _attributes(location)
        return attrs is not None and ("dimensions" in attrs or "n5" in attrs
                                      or location.has_suffix((".n5",)))

    def open(self, location: Location, dataset: str | None = None, level: int | None = None,
             **_: Any) -> ImageSource:
        target = location.join(dataset) if dataset else location
        attrs = _attributes(target)
        if attrs is None:
            raise InputError(f"{target.text} is not an N5 dataset or group")
        if "dimensions" not in attrs:
            child = f"s{level or 0}"
            if _attributes(target.join(child)) is not None:
                target, attrs = target.join(child), _attributes(target.join(child)) or {}
                group_attrs = _attributes(location.join(dataset) if dataset else location)
                attrs = {**(group_attrs or {}), **attrs}
            else:
                raise InputError(f"{target.text} is an N5 group; point to one of its "
                                 "datasets (path or dataset=)")
        elif level:
            raise InputError(f"level={level}: {target.text} is a single N5 dataset")
        ref = N5Ref(target)
        arr = ref.open()
        meta = ImageMetadata(*_axes(attrs, arr.ndim), reader="n5", format="N5",
                             dataset=dataset, level=level or 0)
        return ImageSource(arr.shape, arr.dtype, meta.channel_axis, arr.chunks, "n5",
                           path=target.path, dataset=dataset, metadata=meta, url=target.url,
                           _ref=ref, _array=arr)


def _axes(attrs: dict[str, Any], ndim: int) -> tuple[tuple[Axis, ...], None]:
    """Axes in C order from N5 attributes (listed fastest-first there)."""
    names = attrs.get("axes")
    res = attrs.get("pixelResolution") or attrs.get("resolution")
    unit = None
    sizes: list[float] | None = None
    if isinstance(res, dict):
        sizes, unit = res.get("dimensions"), res.get("unit")
    elif isinstance(res, list):
        sizes = res
        units = attrs.get("units")
        unit = units[0] if isinstance(units, list) and units else None
    if isinstance(names, list) and len(names) == ndim and all(isinstance(n, str) for n in names):
        axes = [Axis(n.lower(), axis_type_of_name(n)) for n in reversed(names)]
    else:
        axes = list(guessed_axes(ndim))
    if isinstance(sizes, list) and len(sizes) == ndim:
        axes = [Axis(a.name, a.type, unit if a.type == "space" else None, float(s))
                for a, s in zip(axes, reversed(sizes), strict=True)]
    return tuple(axes), None
