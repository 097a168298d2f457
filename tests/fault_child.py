"""Run tile_process in a child process that kills itself (SIGKILL) at a chosen moment.

Usage: python fault_child.py IMAGE OUTPUT CALL_LOG KILL_POINT N [--resume]

KILL_POINT: none | segment | chunk-write | record | stitch | relabel | finalize
N: the N-th time that moment is reached, the process dies with no chance to clean up.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from scipy import ndimage


class Segment:
    """Connected components; logs every call so the parent can count them."""

    def __init__(self, log_path: str, die_at: int | None):
        self.log_path = log_path
        self.die_at = die_at
        self.calls = 0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        self.calls += 1
        with open(self.log_path, "a") as f:
            f.write("call\n")
        if os.environ.get("BLOCKBUSTER_TEST_SLOW"):
            import time

            time.sleep(0.1)
        if self.die_at is not None and self.calls == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return ndimage.label(tile > 0)[0]


def _die_on_nth(n: int):
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    return tick


def main() -> None:
    image, output, log_path, point, n = sys.argv[1:6]
    resume = "--resume" in sys.argv
    n = int(n)
    import blockbuster.runner as runner
    import blockbuster.store as store
    import zarr.storage._local as local

    tick = _die_on_nth(n)
    if point == "chunk-write":  # die half way through writing a chunk file
        original_put = local._put

        def put(path, value, exclusive=False):
            if "/c/" in str(path) and "final.zarr" not in str(path):  # a label chunk (output or raw)
                tick_partial(path, value)
            return original_put(path, value, exclusive=exclusive)

        def tick_partial(path, value):
            nonlocal_count[0] += 1
            if nonlocal_count[0] == n:
                data = bytes(value.as_buffer_like())
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:  # a torn, non-atomic write
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        nonlocal_count = [0]
        local._put = put
    elif point == "record":  # die after the record's temporary file, before the rename
        original_replace = store.os.replace

        def replace(src, dst):
            if str(dst).endswith(".tile"):
                tick()
            return original_replace(src, dst)

        store.os.replace = replace
    elif point in ("stitch", "relabel"):
        name = {"stitch": "assign_tile", "relabel": "fix_tile"}[point]
        original = getattr(runner, name)

        def wrapped(*args):
            tick()
            return original(*args)

        setattr(runner, name, wrapped)
    elif point == "finalize":
        original_mark = runner.mark_complete

        def mark(*args, **kwargs):
            original_mark(*args, **kwargs)
            tick()  # complete, but the work directory is not removed yet

        runner.mark_complete = mark
    fn = Segment(log_path, n if point == "segment" else None)
    runner.tile_process(image, fn, (30, 30), 4, stitch="iou", output=output, resume=resume,
                        table=True, progress=False)


if __name__ == "__main__":
    main()
