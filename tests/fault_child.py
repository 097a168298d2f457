"""Run tile_process in a child process that kills itself (SIGKILL) at a chosen moment.

Usage: python fault_child.py IMAGE OUTPUT CALL_LOG KILL_POINT N [--resume] [--overwrite]
                             [--ome] [inverse] [--workers] [--whole] [--sharded]

KILL_POINT: none | segment | chunk-write | shard-write | record | assign | fix | fix-written |
            finalize | cleanup
N: the N-th time that moment is reached, the process dies with no chance to clean up.
--whole: stitch="whole" (else "iou").
--sharded: a sharded output of 4 tiles per shard (a row of tiles), as runs of many small
           tiles get.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from scipy import ndimage


class Segment:
    """Connected components (of the image, or of its inverse); logs every call."""

    def __init__(self, log_path: str, die_at: int | None, inverse: bool = False):
        self.log_path = log_path
        self.die_at = die_at
        self.inverse = inverse
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
        return ndimage.label((tile == 0) if self.inverse else (tile > 0))[0]


def _die_on_nth(n: int):
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    return tick


def _wrap(owner, name: str, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(*args, **kwargs)
        return result

    setattr(owner, name, wrapped)


def main() -> None:
    image, output, log_path, point, n = sys.argv[1:6]
    resume, overwrite, ome = "--resume" in sys.argv, "--overwrite" in sys.argv, "--ome" in sys.argv
    inverse = "inverse" in sys.argv
    if "--sharded" in sys.argv:
        import blockbuster.output

        blockbuster.output.SHARD_MIN_TILES, blockbuster.output.SHARD_TILES = 2, 4
    n = int(n)
    import zarr.storage._local as local

    import blockbuster.api as api
    import blockbuster.engine.commit as commit
    import blockbuster.engine.run as run
    import blockbuster.engine.state as state

    tick = _die_on_nth(n)
    if point == "chunk-write":  # die half way through writing a label chunk (torn, non-atomic)
        original_put = local._put
        count = [0]

        def put(path, value, exclusive=False):
            if "/c/" in str(path) or "/0/c" in str(path):
                count[0] += 1
                if count[0] == n:
                    data = bytes(value.as_buffer_like())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_put(path, value, exclusive=exclusive)

        local._put = put
    elif point == "record":  # die half way through appending a tile's record (a torn entry)
        original_append = state.PackWriter.append
        count = [0]

        def append(self, kind, tile, meta=None, arrays=None, *, sync=False):
            if kind == "seg":
                count[0] += 1
                if count[0] == n:
                    data = state._encode(kind, tile, meta or {}, arrays or {})
                    if self._file is None:
                        self._open_next()
                    self._file.write(data[: len(data) // 2])
                    self._file.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_append(self, kind, tile, meta, arrays, sync=sync)

        state.PackWriter.append = append
    elif point == "shard-write":  # a shard about to be written (stores write it atomically)
        from blockbuster.output import ShardBuffer

        _wrap(ShardBuffer, "_write", before=lambda *a, **k: tick())
    elif point == "assign":  # while a tile is matched and labelled
        _wrap(commit.Committer, "_assign", before=lambda *a, **k: tick())
        _wrap(commit.Committer, "_assign_whole", before=lambda *a, **k: tick())
    elif point == "fix":  # at the start of rewriting a tile joined late
        _wrap(run, "_fix_tiles", before=lambda *a, **k: tick())
    elif point == "fix-written":  # a tile rewritten, its "fix" entry not yet appended
        original_append = state.PackWriter.append

        def append_fix(self, kind, *args, **kwargs):
            if kind == "fix":
                tick()
            return original_append(self, kind, *args, **kwargs)

        state.PackWriter.append = append_fix
    elif point == "finalize":  # complete, but the work directory is not removed yet
        _wrap(run, "mark_complete", after=lambda *a, **k: tick())
    elif point == "cleanup":  # part of the work directory deleted
        _wrap(state, "_remove_entry", after=lambda *a, **k: tick())
    fn = Segment(log_path, n if point == "segment" else None, inverse=inverse)
    stitch = "whole" if "--whole" in sys.argv else "iou"
    kwargs = {"output": output} if not ome else {}
    if "--workers" in sys.argv:  # the tiles on a local dask cluster of 2 worker processes
        from distributed import Client

        from blockbuster.cluster import local_cluster

        with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as client:
            api.tile_process(image, fn, (30, 30), 4, stitch=stitch, resume=resume,
                             overwrite=overwrite, table=True, progress=False, client=client,
                             **kwargs)
        return
    api.tile_process(image, fn, (30, 30), 4, stitch=stitch, resume=resume, overwrite=overwrite,
                     table=True, progress=False, **kwargs)


if __name__ == "__main__":
    main()
