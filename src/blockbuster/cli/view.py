"""``blockbuster view``: open an output in napari (the library's
:func:`~blockbuster.viewer.output_layers`); this module parses and hands over only."""

from __future__ import annotations

import argparse
from typing import Any

from .common import EXIT_OK, HelpFormatter, add_message_options

__all__ = ["add_view_command", "cmd_view"]

VIEW_EPILOG = """\
examples:
  blockbuster view brain.ome.zarr/labels/blockbuster    # image, labels, flagged seams
  blockbuster view cells.zarr --no-image                # the labels alone

napari shows the run's input (when it can still be opened), the labels at their physical scale
with the object table as features (hover over an object), and a red cross at each tile border
the seam report flags. Needs napari: pip install "blockbuster[napari]". napari's File > Open
also reads blockbuster outputs once blockbuster is installed with that extra.
"""


def add_view_command(commands: Any) -> None:
    view = commands.add_parser(
        "view", help="open an output in napari (image, labels, flagged seams)",
        formatter_class=HelpFormatter, epilog=VIEW_EPILOG,
        description="Open labels written by blockbuster in napari, with the image they were "
                    "made from and the tile borders the seam report flags.")
    view.add_argument("output", metavar="OUTPUT", help="labels written by blockbuster")
    view.add_argument("--no-image", dest="image", action="store_false",
                      help="do not open the input image")
    add_message_options(view)
    view.set_defaults(func=cmd_view, parser=view)


def cmd_view(args: argparse.Namespace) -> int:
    """``blockbuster view``: build the layers, then show them in napari."""
    import importlib.util

    from ..errors import PluginNotInstalledError
    from ..viewer import output_layers

    layers = output_layers(args.output, image=args.image)  # bad output: refused before napari
    if importlib.util.find_spec("napari") is None:
        raise PluginNotInstalledError(
            'blockbuster view needs napari, which is not installed: pip install '
            '"blockbuster[napari]"')
    import napari

    viewer = napari.Viewer(title=f"blockbuster: {args.output}")
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    napari.run()
    return EXIT_OK
