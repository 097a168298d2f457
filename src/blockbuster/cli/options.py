"""Option groups that ``segment`` and ``info`` share: the method, the tiles, the input."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from .common import (
    non_negative_int,
    params_file,
    parse_bytes,
    parse_channels,
    parse_overlap,
    parse_param,
    parse_tile_shape,
    positive_length,
)

if TYPE_CHECKING:
    from ..io import ImageSource
    from ..segmenter import Segmenter

__all__ = ["add_input_options", "add_method_options", "add_planning_options", "input_options",
           "make_method", "method_params"]

log = logging.getLogger("blockbuster")

#: Shortcuts for the parameters most methods take (``--diameter 12`` = ``--param diameter=12``).
SHORTCUTS = ("diameter", "model")


def add_method_options(parser: argparse.ArgumentParser) -> None:
    from ..plugins.catalog import installed_methods

    names = ", ".join(installed_methods()) or "none found"
    group = parser.add_argument_group("method")
    group.add_argument("--method", default="watershed", metavar="NAME",
                       help=f"segmenter to run (installed here: {names}; default: watershed; "
                            "'blockbuster methods' lists them with their parameters)")
    group.add_argument("--param", action="append", type=parse_param, default=[],
                       metavar="KEY=VALUE",
                       help="a parameter of the method, repeatable; VALUE is read as JSON "
                            "where it parses (12, 0.5, true, null, [1,2]), else as text")
    group.add_argument("--params", type=params_file, metavar="FILE.json",
                       help="parameters of the method from a JSON object ({\"diameter\": 12, "
                            "...}); --param overrides them")
    group.add_argument("--diameter", type=positive_length, metavar="D",
                       help="typical object diameter in voxels, or with a unit (6um: converted "
                            "with the image's voxel size; the default overlap then follows it "
                            "per axis) (= --param diameter=D)")
    group.add_argument("--model", metavar="M",
                       help="pretrained model name or path (= --param model=M)")


def method_params(args: argparse.Namespace) -> dict[str, Any]:
    """The method's parameters: ``--params`` file, then ``--param``, then the shortcuts.

    Examples
    --------
    >>> ns = argparse.Namespace(params={"diameter": 10, "sigma": 1}, param=[("sigma", 2)],
    ...                         diameter=None, model="nuclei")
    >>> method_params(ns)
    {'diameter': 10, 'sigma': 2, 'model': 'nuclei'}
    """
    from ..errors import InputError

    params = dict(args.params or {})
    params.update(dict(args.param or []))
    for name in SHORTCUTS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in params and params[name] != value:
            raise InputError(f"--{name} {value} and --param {name}={params[name]} disagree; "
                             "give one of them")
        params[name] = value
    return params


def make_method(args: argparse.Namespace, image: ImageSource | None = None) -> Segmenter:
    """The segmenter the options name, with its parameters checked by the plugin catalogue.

    A ``--diameter`` with a unit is converted with ``image``'s voxel size; when no
    ``--overlap`` is given, the overlap becomes one diameter per axis.
    """
    from ..plugins.catalog import make_segmenter
    from ..units import diameter_in_voxels, is_length

    if is_length(args.diameter):
        if image is None:
            from ..errors import InputError

            raise InputError(f"--diameter {args.diameter}: a length needs the image's voxel size")
        voxels, overlap = diameter_in_voxels(args.diameter, image)
        log.info("diameter %s is %.3g voxels (overlap %s)", args.diameter, voxels, overlap)
        args.diameter = voxels
        if args.overlap is None:
            args.overlap = overlap
    return make_segmenter(args.method, method_params(args), gpu=args.gpu)


def add_planning_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiles")
    group.add_argument("--tile-shape", type=parse_tile_shape, default="auto",
                       metavar="auto|Z,Y,X",
                       help="tile (core) size per spatial axis, -1 = whole axis; 'auto' "
                            "sizes tiles from free memory (default)")
    group.add_argument("--overlap", type=parse_overlap, metavar="N|N,N,N|auto",
                       help="halo around every tile, in voxels or with a unit (6um, per axis "
                            "with the voxel size), or auto: the smallest at which a sample "
                            "window tiles exactly (default: the method's choice, about one "
                            "object diameter)")
    group.add_argument("--channel-axis", type=int, metavar="N",
                       help="axis holding channels (default: from OME-Zarr metadata, else none)")
    group.add_argument("--gpu", action="store_true",
                       help="run the method on the GPU and size tiles from free GPU memory")
    group.add_argument("--memory", type=parse_bytes, metavar="BYTES",
                       help="memory budget per tile for --tile-shape auto, e.g. 8GB (default: "
                            "half the free RAM, or 80%% of free GPU memory with --gpu); with "
                            "--cluster also the memory of each job")


def add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--channel", action="append", metavar="NAME|INDEX",
                       help="segment only this channel, by name (from the file's metadata) or "
                            "index; repeat or separate with commas for several (default: all "
                            "channels). Not the same as --channel-axis")
    group.add_argument("--series", type=non_negative_int, metavar="N",
                       help="series of a multi-series file (bioformats2raw, OME-TIFF, CZI/LIF "
                            "scenes; default: 0)")
    group.add_argument("--dataset", metavar="PATH",
                       help="array inside a container: zarr group member, HDF5 dataset, N5 "
                            "dataset (or append it to the path: file.h5/raw/volume)")
    group.add_argument("--level", type=non_negative_int, default=0, metavar="N",
                       help="pyramid level of an OME-Zarr / pyramidal TIFF (default: 0, full "
                            "resolution)")


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The open_image options of the command line (only those given)."""
    options = {"channels": parse_channels(getattr(args, "channel", None)),
               "series": getattr(args, "series", None),
               "dataset": getattr(args, "dataset", None),
               "level": getattr(args, "level", 0) or 0}
    return {k: v for k, v in options.items() if v not in (None, 0)}


def open_input(args: argparse.Namespace, path: str | None = None) -> ImageSource:
    from ..io import open_image

    return open_image(path or args.input, args.channel_axis, **input_options(args))


def selection_line(src: ImageSource) -> str:
    """What a run segments: shape, channels and time points (for the run log)."""
    from ..io import describe_channels

    parts = [f"{src.meta.format}, tiled axes "
             f"{','.join(src.axes[a].name for a in src.tiled_axes)} {src.tiled_shape}"]
    if src.channel_axis is not None:
        chosen = src.channel_names or tuple(str(i) for i in src.channel_indices)
        parts.append(f"channel(s) {', '.join(chosen)} of {describe_channels(src)}")
    if src.time_axis is not None:
        parts.append(f"{src.shape[src.time_axis]} time point(s)")
    return "; ".join(parts)
