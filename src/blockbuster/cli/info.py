"""``blockbuster info``: what an image is and how a run would tile it (the library's plan), or
what state an output is in (the library's :func:`~blockbuster.status.output_status`)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    HelpFormatter,
    add_json_option,
    add_message_options,
    plural,
)
from .options import add_input_options, add_method_options, add_planning_options, make_method

if TYPE_CHECKING:
    from ..io import ImageSource
    from ..status import OutputStatus, WorkStatus

__all__ = ["add_info_command", "cmd_info", "guess_channel_axis"]

INFO_EPILOG = """\
examples:
  blockbuster info brain.ome.zarr                       # shape, chunks, the plan of a run
  blockbuster info scan.tif --method cellpose --gpu     # tile plan for Cellpose on the GPU
  blockbuster info big.zarr --memory 8GB --overlap 32   # ... within an 8 GB budget
  blockbuster info brain.labels.zarr                    # is this output complete?
  blockbuster info brain.labels.zarr --check && next-step.sh   # ... as an exit code
  blockbuster info brain.ome.zarr --json                # the same, as one JSON object

For an output, --json prints its status (complete, objects, the run's parameters and report,
an unfinished run's tiles done and failed); for an image, its axes, calibration and the plan.

exit codes: 0 success; with --check: 0 only for a complete output, 1 when it is not (not
complete, being written, or nothing there yet), 2 when INPUT is not a blockbuster output.
"""


def add_info_command(commands: Any) -> None:
    info = commands.add_parser(
        "info", help="describe an image, or check an output", formatter_class=HelpFormatter,
        epilog=INFO_EPILOG,
        description="Describe INPUT (shape, dtype, chunks, size, channel axis) and the plan of "
                    "a run on it (tiles, overlap, predicted memory) for a method; or, for "
                    "labels written by blockbuster, whether they are complete.")
    info.add_argument("input", metavar="INPUT", help="an image, or labels written by blockbuster")
    info.add_argument("--check", action="store_true",
                      help="exit 0 only if INPUT is a complete output (1 if not)")
    add_json_option(info, "the image and its plan, or the output's status,")
    add_method_options(info)
    add_planning_options(info)
    add_input_options(info)
    add_message_options(info)
    info.set_defaults(func=cmd_info, parser=info)


def cmd_info(args: argparse.Namespace) -> int:
    """``blockbuster info``: describe an image, or the state of an output."""
    from ..errors import InputError
    from ..status import output_status

    status = None if "://" in args.input else output_status(args.input)
    if status is not None and (status.written_by_blockbuster or status.work):
        return _report_output(args, status)
    if args.check:
        if status is not None and not status.exists:
            return _report_output(args, status)  # nothing there yet: not complete
        raise InputError(f"{args.input} is not an output of blockbuster (info --check checks "
                         "labels written by 'blockbuster segment'); 'blockbuster info "
                         f"{args.input}' describes it as an image")
    src = _open(args)
    segmenter = make_method(args, src)
    from .segment import plan_for, plan_lines

    plan = plan_for(args, src, segmenter)
    if args.json:
        args.json_result = {"kind": "image", "image": image_summary(src),
                            "plan": plan.summary()}
        return EXIT_OK
    print("\n".join([*describe_image(args, src), *plan_lines(plan, args.method)]))
    return EXIT_OK


def _open(args: argparse.Namespace) -> ImageSource:
    from .options import open_input

    return open_input(args)


# -- outputs ----------------------------------------------------------------------------------
def _done(status: OutputStatus) -> bool:
    return status.complete and status.running is None


def _report_output(args: argparse.Namespace, status: OutputStatus) -> int:
    code = EXIT_OK if _done(status) or not args.check else EXIT_FAILED
    if args.json:
        args.json_result = {"kind": "output", **status.as_dict()}
        return code
    print("\n".join(describe_output(status)))
    return code


def describe_output(status: OutputStatus) -> list[str]:
    """An output's state, as ``info`` prints it."""
    if not status.exists and not status.work:
        return [f"labels:     {status.path} (nothing there: no output and no unfinished run)"]
    if not status.written_by_blockbuster:
        lines = [f"labels:     {status.path} (not written yet)",
                 "status:     INCOMPLETE: a run writing these labels started but has not "
                 f"finished (or died); {_how_to_finish(status)}"]
    else:
        lines = [f"labels:     {status.path} ({status.kind}, written by blockbuster)",
                 f"shape:      {tuple(status.shape or ())}  dtype {status.dtype}  chunks "
                 f"(tiles) {tuple(status.chunks or ())}"]
        if status.complete:
            n = status.n_labels
            lines.append(f"status:     complete, {n:,} objects" if isinstance(n, int)
                         else "status:     complete")
        else:
            lines.append("status:     INCOMPLETE: the run writing these labels has not "
                         f"finished (or died); {_how_to_finish(status)}")
        lines += _run_lines(status)
    for work in status.work:
        lines.append(_work_line(work))
        if status.complete:
            lines.append("note:       the labels are complete; this work directory is a "
                         "leftover and can be deleted")
    if status.running:
        lines.append(f"running:    a run is writing this output now ({status.running})")
    return lines


def _how_to_finish(status: OutputStatus) -> str:
    """--resume, unless no unfinished run's state can be resumed (a damaged manifest)."""
    if status.work and not any(w.resumable for w in status.work):
        return ("its work directory cannot be resumed (see below): start again by rerunning the "
                "same command with --overwrite")
    return "finish it by rerunning the same command with --resume"


def _run_lines(status: OutputStatus) -> list[str]:
    from ..sizing import format_bytes

    params = status.params
    segmenter = params.get("segmenter", {})
    chunks = params.get("tile_chunks") or []
    n_tiles = 1
    for c in chunks:
        n_tiles *= len(c)
    lines = [f"run:        {segmenter.get('fn', segmenter)} on {params.get('input')}; "
             f"{plural(n_tiles, 'tile')}, overlap {tuple(params.get('depth', ()))}, stitch "
             f"{params.get('stitch')}"]
    report = status.report
    if report:
        seconds = report.get("seconds", {})
        tiles = report.get("tiles", {})
        line = (f"report:     {plural(tiles.get('run', 0), 'tile')} run in "
                f"{seconds.get('total', 0):.1f} s (segmenting {seconds.get('segment', 0):.1f} s)")
        if report.get("peak_memory_bytes"):
            line += f", peak memory {format_bytes(report['peak_memory_bytes'])}"
        if report.get("finished"):
            line += f", finished {report['finished']} on {report.get('host')}"
        lines.append(line)
        if report.get("seams"):
            lines += seam_lines(report["seams"])
    return lines


def seam_lines(seams: dict[str, Any], limit: int = 5) -> list[str]:
    """The seam report (:mod:`blockbuster.seams`) in a few lines."""
    def pct(rate: Any) -> str:
        return "n/a" if rate is None else f"{100 * rate:.1f}%"

    verdict = seams.get("verdict", "?")
    head = f"seams:      {verdict.upper() if verdict != 'clean' else verdict}"
    head += f", {plural(seams.get('borders', 0), 'border')}"
    if seams.get("flagged"):
        head += f", {seams['flagged']} flagged"
    lines = [head]
    for ax in seams.get("axes", []):
        seam, ctrl = ax["seam"], ax["control"]
        near = ax.get("near_border", {})
        lines.append(f"  along {ax['axis']}: {pct(seam['orphan_rate'])} of "
                     f"{seam['objects']} objects end at borders ({pct(ctrl['orphan_rate'])} of "
                     f"{ctrl['objects']} at control planes, {pct(near.get('orphan_rate'))} next "
                     f"to tile faces), {pct(seam['ambiguous_rate'])} ambiguous "
                     f"({pct(ctrl['ambiguous_rate'])}, {pct(near.get('ambiguous_rate'))})"
                     + ("  <- worse" if ax.get("worse") else ""))
    worst = seams.get("worst", [])
    if worst and verdict != "clean":
        lines.append("  worst borders (tiles a|b, axis=position: orphans/objects):")
        lines += [f"    {w['tile_a']}|{w['tile_b']} {w['axis']}={w['position']}: "
                  f"{w['orphans']}/{w['objects']}" for w in worst[:limit]]
    return lines


def _work_line(work: WorkStatus) -> str:
    if not work.resumable:
        return f"work dir:   {work.path}: cannot be resumed ({work.problem})"
    of = f" of {work.tiles_total}" if work.tiles_total is not None else ""
    failed = work.tiles_failed
    line = f"work dir:   {work.path}: {work.tiles_done}{of} tiles done, {len(failed)} failed"
    if failed:
        listed = ", ".join(str(t) for t in failed[:10])
        line += f" (tile ids {listed}{', ...' if len(failed) > 10 else ''})"
    return line


# -- images -----------------------------------------------------------------------------------
def guess_channel_axis(shape: Sequence[int], axes: Sequence[Any] | None = None
                       ) -> tuple[int | None, str, bool]:
    """Which axis holds channels: ``(axis or None, why, is_a_guess)``.

    OME-Zarr axes of type ``"channel"`` (or TIFF axes ``C``/``S``) are taken as they are. Else,
    in a 3-D or 4-D image, a last or first axis of size <= 4 looks like channels, but that is a
    guess (it could be a thin stack).

    Parameters
    ----------
    shape : sequence of int
        Full image shape.
    axes : sequence of dict or str, optional
        OME-Zarr axes (``{"name": "c", "type": "channel"}``) or a TIFF axes string (``"CYX"``).

    Examples
    --------
    >>> guess_channel_axis((2, 512, 512), [{"name": "c", "type": "channel"},
    ...                                    {"name": "y", "type": "space"},
    ...                                    {"name": "x", "type": "space"}])
    (0, 'OME-Zarr axis type "channel"', False)
    >>> guess_channel_axis((512, 512, 3))
    (2, 'the last axis has only 3 entries', True)
    >>> guess_channel_axis((40, 512, 512))[0] is None
    True
    """
    if axes:
        if isinstance(axes, str):
            for i, name in enumerate(axes.upper()):
                if name in "CS" and len(axes) == len(shape):
                    return i, f"TIFF axes {axes!r}", False
        else:
            for i, axis in enumerate(axes):
                if isinstance(axis, dict) and axis.get("type") == "channel":
                    return i, 'OME-Zarr axis type "channel"', False
            return None, "OME-Zarr axes have no channel axis", False
    if len(shape) in (3, 4):
        for i, where in ((len(shape) - 1, "last"), (0, "first")):
            if shape[i] <= 4:
                return i, f"the {where} axis has only {shape[i]} entries", True
    return None, "no axis looks like channels", True


def image_summary(src: ImageSource) -> dict[str, Any]:
    """An image as plain data (``info --json``)."""
    meta = src.meta
    return {
        "input": str(src.path) if src.path is not None else src.url,
        "format": meta.format,
        "reader": meta.reader,
        "series": meta.series,
        "dataset": src.dataset,
        "level": meta.level,
        "shape": list(src.shape),
        "axes": [a.as_dict() for a in src.axes],
        "dtype": str(src.dtype),
        "chunks": list(src.storage_chunks) if src.storage_chunks else None,
        "nbytes": int(src.nbytes),
        "channel_axis": src.channel_axis,
        "channel_names": list(meta.channel_names) if meta.channel_names else None,
        "channels": list(src.channels) if src.channels is not None else None,
        "time_points": src.shape[src.time_axis] if src.time_axis is not None else None,
        "tiled_axes": [src.axes[a].name for a in src.tiled_axes],
        "tiled_shape": list(src.tiled_shape),
        "ome_labels": _ome_label_names(src.path) if src.kind == "ome-zarr" and src.path else [],
    }


def describe_image(args: argparse.Namespace, src: ImageSource) -> list[str]:
    from ..sizing import format_bytes

    meta = src.meta
    kind = meta.format
    if meta.series is not None:
        kind += f", series {meta.series}"
    if src.dataset is not None:
        kind += f", dataset {src.dataset!r}"
    if meta.level:
        kind += f", level {meta.level}"
    lines = [f"input:      {args.input} ({kind}; reader {meta.reader})",
             f"shape:      {src.shape}  axes {','.join(src.axis_names)}",
             f"dtype:      {src.dtype}",
             f"chunks:     {src.storage_chunks}",
             f"size:       {_on_disk(src)}{format_bytes(src.nbytes)} uncompressed",
             _calibration_line(src),
             _channel_line(args, src),
             *_time_lines(src),
             f"tiled axes: {', '.join(src.axes[a].name for a in src.tiled_axes)} "
             f"{src.tiled_shape}" + _dropped_text(src)]
    problem = meta.extra.get("metadata_problem")
    if problem:
        lines.append(f"warning:    metadata {problem}")
    labels = _ome_label_names(src.path) if src.kind == "ome-zarr" and src.path else []
    if labels:
        lines.append(f"OME labels: {', '.join(labels)}")
    return lines


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def _on_disk(src: ImageSource) -> str:
    from ..sizing import format_bytes

    if src.path is None or not src.path.exists():
        return ""
    return f"{format_bytes(_disk_size(src.path))} on disk, "


def _calibration_line(src: ImageSource) -> str:
    parts = []
    for a in src.spatial_axes:
        axis = src.axes[a]
        parts.append(f"{axis.name} {axis.scale:g} {axis.unit or 'voxel'}"
                     + (f" (origin {axis.translation:g})" if axis.translation else ""))
    if not any(src.axes[a].unit for a in src.spatial_axes) and all(
            src.axes[a].scale == 1 for a in src.spatial_axes):
        return "voxel size: unknown (1 voxel); outputs will be in voxels"
    return "voxel size: " + ", ".join(parts)


def _time_lines(src: ImageSource) -> list[str]:
    if src.time_axis is None:
        return []
    n = src.shape[src.time_axis]
    axis = src.axes[src.time_axis]
    step = f", every {axis.scale:g} {axis.unit}" if axis.unit else ""
    return [f"time:       axis {src.time_axis} ({axis.name!r}), {n} time point(s){step}; "
            "each time point is segmented on its own"]


def _dropped_text(src: ImageSource) -> str:
    dropped = [src.axes[a].name for a in src.squeezed_axes]
    return f"; singleton axes {', '.join(dropped)} not tiled" if dropped else ""


def _channel_line(args: argparse.Namespace, src: ImageSource) -> str:
    from ..io import describe_channels

    if src.channel_axis is not None:
        how = "given" if args.channel_axis is not None else f"from the {src.meta.format} metadata"
        line = (f"channels:   axis {src.channel_axis} ({src.axes[src.channel_axis].name!r}, "
                f"{how}), {src.shape[src.channel_axis]} channel(s): {describe_channels(src)}")
        if src.channels is not None:
            chosen = src.channel_names or tuple(str(i) for i in src.channel_indices)
            return line + f"; segmenting {', '.join(chosen)}"
        return line + "; all are given to the method (--channel NAME|INDEX chooses)"
    axis, why, _ = guess_channel_axis(src.shape)
    if src.meta.axes_known or axis is None:
        return ("channels:   none" + ("" if src.meta.axes_known else f" ({why})")
                + "; pass --channel-axis N if an axis holds channels")
    return (f"channels:   axis {axis} may hold channels ({why}; a guess: it could also be a "
            f"thin stack); pass --channel-axis {axis} if so")


def _ome_label_names(path: Path) -> list[str]:
    import zarr

    with contextlib.suppress(Exception):
        group = zarr.open_group(str(path / "labels"), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        return [str(n) for n in dict(attrs.get("ome", attrs)).get("labels", [])]
    return []
