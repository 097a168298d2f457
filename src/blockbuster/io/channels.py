"""Choosing channels by index or by name (``channels=`` / ``--channel``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from .source import ImageSource

__all__ = ["describe_channels", "resolve_channels"]


def describe_channels(source: ImageSource) -> str:
    """``0 'DAPI', 1 'GFP'`` (or just the indices when the format names none).

    Examples
    --------
    >>> import numpy as np
    >>> from blockbuster.io import open_image
    >>> describe_channels(open_image(np.zeros((2, 4, 4)), channel_axis=0))
    '0, 1'
    """
    if source.channel_axis is None:
        return "none (the image has no channel axis)"
    names = source.meta.channel_names
    n = source.shape[source.channel_axis]
    if names is None:
        return ", ".join(str(i) for i in range(n))
    return ", ".join(f"{i} {name!r}" for i, name in enumerate(names))


def resolve_channels(source: ImageSource, channels: Any) -> tuple[int, ...] | None:
    """Stored channel indices for ``channels``: an index, a name, or a sequence of them.

    Names match the channel names of the metadata exactly, else ignoring case. A string of
    digits is an index. None selects every channel.
    """
    if channels is None:
        return None
    if source.channel_axis is None:
        raise InputError(f"channels={channels!r} but the image has no channel axis; pass "
                         "channel_axis= (--channel-axis) if one of its axes holds channels")
    items: Sequence[Any]
    if isinstance(channels, (str, int, np.integer)):
        items = [channels]
    else:
        items = list(channels)
    if not items:
        raise InputError("channels=[] selects nothing; leave it out to use every channel")
    chosen = tuple(_one_channel(source, item) for item in items)
    if len(set(chosen)) != len(chosen):
        raise InputError(f"channels={channels!r} names a channel twice")
    return chosen


def _one_channel(source: ImageSource, item: Any) -> int:
    assert source.channel_axis is not None
    n = source.shape[source.channel_axis]
    if isinstance(item, str) and item.strip().lstrip("-").isdigit():
        item = int(item)
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if not -n <= item < n:
            raise InputError(f"channel {item} is out of range: the image has {n} channel(s): "
                             f"{describe_channels(source)}")
        return int(item) % n
    if isinstance(item, str):
        names = source.meta.channel_names
        if names is None:
            raise InputError(f"channel {item!r}: this {source.meta.format} does not name its "
                             f"channels; choose by index: {describe_channels(source)}")
        if item in names:
            return names.index(item)
        lowered = [n.lower() for n in names]
        if lowered.count(item.lower()) == 1:
            return lowered.index(item.lower())
        raise InputError(f"no channel named {item!r}; the channels are: "
                         f"{describe_channels(source)}")
    raise InputError(f"channel {item!r} must be an index or a name")
