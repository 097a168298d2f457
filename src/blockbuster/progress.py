"""Progress bars (tqdm): tiles done / total, throughput and ETA; off when not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress", "make_progress"]


class Progress:
    """A thin wrapper so the engine never cares whether a bar is shown."""

    def __init__(self, total: int, desc: str, enabled: bool | None, initial: int = 0,
                 unit: str = "tile"):
        if enabled is None:  # auto: only on an interactive terminal
            enabled = sys.stderr.isatty()
        self.skipped = 0
        self._bar: Any = tqdm(total=total, desc=desc, unit=unit, initial=initial,
                              disable=not enabled, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def skip(self, n: int = 1) -> None:
        """Count tiles that needed no work (empty, masked out) separately.

        Call it in addition to :meth:`update`: it only changes the "skipped" counter.
        """
        self.skipped += n
        self._bar.set_postfix(skipped=self.skipped, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_progress(total: int, desc: str, progress: bool | None, initial: int = 0) -> Progress:
    return Progress(total, desc, progress, initial=initial)
