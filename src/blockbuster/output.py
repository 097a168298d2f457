"""Where labels are written: a zarr array, or an OME-Zarr label image, plus the work directory.

Also the completion marker: a finished output carries ``attrs["blockbuster"]["complete"]``
with the run's parameters, and :func:`open_labels` refuses anything else.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import IncompleteOutputError, InputError
from .io import ImageSource, default_output_path
from .store import WORK_SUFFIX, work_dir_for

__all__ = ["OutputTarget", "resolve_output", "open_labels", "completion", "mark_complete",
           "work_dirs_for"]

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

    @property
    def is_ome(self) -> bool:
        return self.ome_name is not None

    @property
    def array_path(self) -> Path | None:
        if self.path is None:
            return None
        return self.path / "0" if self.is_ome else self.path

    def exists(self) -> bool:
        if self.path is not None:
            return any((self.array_path / m).exists() for m in ("zarr.json", ".zarray"))
        try:
            zarr.open_array(store=self.store, mode="r")
            return True
        except Exception:
            return False

    def open(self, mode: str = "r") -> zarr.Array:
        store = str(self.array_path) if self.path is not None else self.store
        return zarr.open_array(store=store, mode=mode)

    def create(self, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
               attrs: dict[str, Any]) -> zarr.Array:
        if not self.is_ome:
            store = str(self.path) if self.path is not None else self.store
            return zarr.create_array(store=store, shape=shape, chunks=chunks, dtype=dtype,
                                     fill_value=0, overwrite=True, attributes=attrs)
        from .ome import create_label_level0

        arr = create_label_level0(self.ome_image, self.ome_name, shape, chunks, dtype,
                                  standalone_path=self.path if self.ome_standalone else None,
                                  overwrite=True)
        arr.attrs.update(attrs)
        return arr

    def finalize(self) -> None:
        """Add the multiscale pyramid and NGFF metadata (OME-Zarr outputs only)."""
        if self.is_ome:
            from .ome import finalize_ome_labels

            finalize_ome_labels(self.ome_image, self.ome_name,
                                standalone_path=self.path if self.ome_standalone else None)

    def remove(self) -> None:
        # An OME label image is replaced by create() (which also unlists it from the image).
        if self.path is not None and not self.is_ome:
            shutil.rmtree(self.path, ignore_errors=True)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else repr(self.store)


def ome_work_dir(image: Path, label_name: str) -> Path:
    """Work directory of the labels ``<image>/labels/<label_name>``: next to the image."""
    return image.with_name(f"{image.name}.{label_name}{WORK_SUFFIX}")


def work_dirs_for(path: str | Path) -> list[Path]:
    """The work directories an output at ``path`` can have (default locations).

    ``path`` is a labels array, a standalone label image, or ``<image>/labels/<name>``.
    """
    path = Path(path)
    found = [work_dir_for(path)]
    if path.parent.name == "labels":
        found.append(ome_work_dir(path.parent.parent, path.name))
    return found


def resolve_output(output: Any, source: ImageSource, work_dir: Any, ome: bool | None,
                    label_name: str) -> OutputTarget:
    def work_for(path: Path) -> Path:
        return Path(work_dir) if work_dir else work_dir_for(path)

    ome_input = source.kind == "ome-zarr"
    if output is None and ome_input and ome is not False:
        # The NGFF way: <image>/labels/<name>, listed in the image for napari & co.
        group = source.path / "labels" / label_name
        work = Path(work_dir) if work_dir else ome_work_dir(source.path, label_name)
        return OutputTarget(group, None, work, ome_name=label_name, ome_image=source.path)
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
        if source.path is not None and path.resolve() == source.path.resolve():
            raise InputError(f"output {path} is the input image; choose another path")
        standalone = ome if ome is not None else path.name.lower().endswith(".ome.zarr")
        return OutputTarget(path, None, work_for(path), ome_name=label_name if standalone else None,
                            ome_image=source.path if ome_input else None, ome_standalone=True)
    if ome:
        raise InputError("ome=True needs an output path (or an OME-Zarr input), not a store")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="blockbuster-work-"))
    return OutputTarget(None, output, work)


def completion(arr: zarr.Array) -> dict[str, Any] | None:
    meta = arr.attrs.get("blockbuster")
    return meta if isinstance(meta, dict) else None


def open_labels(path: str | Path, *, allow_incomplete: bool = False) -> zarr.Array:
    """Open labels written by :func:`tile_process`, refusing an unfinished output.

    ``path`` is a labels array, or an OME-Zarr label image group (its level 0 is opened).

    Raises
    ------
    IncompleteOutputError
        The run that writes this output has not finished (or died); resume it.
    """
    node = zarr.open(store=str(path), mode="r")
    arr = node["0"] if isinstance(node, zarr.Group) else node
    meta = completion(arr)
    if not allow_incomplete and (meta is None or not meta.get("complete")):
        raise IncompleteOutputError(
            f"{path} is not a complete blockbuster output (the run that writes it did not "
            "finish); rerun tile_process with resume=True to finish it")
    return arr


def mark_complete(out: zarr.Array, manifest: dict[str, Any], n_labels: int, *,
                  table: str | None = None) -> None:
    """Mark a finished output: written last, so its presence means everything is there."""
    meta = {"complete": True, "params": manifest["params"], "n_labels": int(n_labels),
            "format": FORMAT_VERSION}
    if table is not None:
        meta["table"] = table
    out.attrs["blockbuster"] = meta
