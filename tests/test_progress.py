"""Progress: which kind shows where (terminal, notebook, log), and what the log lines say."""

from __future__ import annotations

import io
import logging
import re
import time
from types import SimpleNamespace
from typing import ClassVar

import pytest

from blockbuster.errors import InputError
from blockbuster.progress import Progress, in_notebook, progress_kind, progress_line


class ZMQInteractiveShell:  # the class name Jupyter's kernel shell has
    config: ClassVar[dict] = {}


class TerminalInteractiveShell:
    config: ClassVar[dict] = {}


class Shell:  # Colab's shell: another name, an IPKernelApp in its config
    config: ClassVar[dict] = {"IPKernelApp": {"connection_file": "kernel.json"}}


def ipython(shell_class=None) -> dict:
    """A ``sys.modules`` with an IPython whose get_ipython returns ``shell_class()``."""
    return {"IPython": SimpleNamespace(
        get_ipython=lambda: shell_class() if shell_class is not None else None)}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("modules, expected", [
    ({}, False),  # IPython not imported: never a notebook (and never imported by us)
    (ipython(None), False),  # IPython imported, but no shell (a plain script)
    (ipython(ZMQInteractiveShell), True),
    (ipython(TerminalInteractiveShell), False),
    (ipython(Shell), True),
    ({"IPython": SimpleNamespace()}, False),  # something else named IPython
])
def test_notebook_detection(modules: dict, expected: bool) -> None:
    assert in_notebook(modules) is expected


def test_a_broken_ipython_is_not_a_notebook() -> None:
    def broken():
        raise RuntimeError("not initialised")

    assert in_notebook({"IPython": SimpleNamespace(get_ipython=broken)}) is False


@pytest.mark.parametrize("progress, modules, stream, widgets, expected", [
    (None, ipython(ZMQInteractiveShell), io.StringIO(), True, "notebook"),
    (True, ipython(ZMQInteractiveShell), io.StringIO(), False, "bar"),  # no ipywidgets
    (None, ipython(TerminalInteractiveShell), Terminal(), True, "bar"),
    (None, {}, Terminal(), True, "bar"),
    (None, {}, io.StringIO(), True, "log"),  # a log file, a SLURM job
    (True, {}, io.StringIO(), True, "log"),
    (False, ipython(ZMQInteractiveShell), Terminal(), True, "off"),
    ("log", {}, Terminal(), True, "log"),
    ("bar", {}, io.StringIO(), True, "bar"),
])
def test_progress_kind(progress, modules, stream, widgets, expected) -> None:
    assert progress_kind(progress, stream=stream, modules=modules, widgets=widgets) == expected


def test_progress_kind_refuses_nonsense() -> None:
    with pytest.raises(InputError, match="progress='loud'"):
        progress_kind("loud")
    with pytest.raises(InputError, match="progress=3"):
        progress_kind(3)  # type: ignore[arg-type]


def test_progress_line() -> None:
    assert progress_line("segmenting", 512, 4096, failed=3, rate=1.9) == \
        "segmenting: tiles 512/4096 (12.5 %), 3 failed, 1.9 tiles/s, ETA 31 min"
    assert progress_line("segmenting", 10, 100, skipped=4, rate=1 / 120) == \
        "segmenting: tiles 10/100 (10.0 %), 4 skipped, 120.0 s/tile, ETA 3 h 00 min"
    assert progress_line("merging", 0, 4) == "merging: tiles 0/4 (0.0 %), ETA unknown"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "blockbuster"]


def test_log_lines_at_each_tenth_and_at_the_interval(caplog) -> None:
    caplog.set_level(logging.INFO, logger="blockbuster")
    clock = Clock()
    bar = Progress(40, "segmenting", "log", interval=1e9, clock=clock)
    for i in range(40):
        clock.now += 2.0  # two seconds a tile
        if i == 5:
            bar.fail()
        bar.update()
    bar.close()
    lines = messages(caplog)
    assert len(lines) == 10  # 4/40, 8/40, ... 36/40, and the last line
    assert "1 failed" in lines[1]
    assert lines[0] == "segmenting: tiles 4/40 (10.0 %), 2.0 s/tile, ETA 72 s"
    assert lines[-1] == "segmenting: tiles 40/40 (100.0 %), 1 failed, 2.0 s/tile, done in 80 s"
    # a steady interval: every update logs when the interval has passed
    caplog.clear()
    bar = Progress(1000, "merging", "log", interval=5.0, clock=clock)
    for _ in range(10):
        clock.now += 3.0
        bar.update()
    bar.close()
    lines = messages(caplog)
    assert [int(re.search(r"tiles (\d+)/", line).group(1)) for line in lines] == \
        [2, 4, 6, 8, 10, 10]


def test_a_resumed_pass_counts_only_its_own_rate(caplog) -> None:
    caplog.set_level(logging.INFO, logger="blockbuster")
    clock = Clock()
    bar = Progress(100, "segmenting", "log", initial=50, interval=1e9, clock=clock)
    assert bar.rate is None
    for _ in range(10):
        clock.now += 1.0
        bar.update()
    assert bar.rate == pytest.approx(1.0)
    assert messages(caplog) == ["segmenting: tiles 60/100 (60.0 %), 1.0 tiles/s, ETA 40 s"]
    bar.close()


def test_log_lines_keep_coming_while_a_tile_runs(caplog) -> None:
    """No tile finishes (a long tile, a hung call): the log still says where the run is."""
    caplog.set_level(logging.INFO, logger="blockbuster")
    with Progress(10, "segmenting", "log", interval=0.05) as bar:
        bar.update()
        deadline = time.monotonic() + 30
        while len(messages(caplog)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = messages(caplog)
    assert len(lines) >= 3
    assert all(line.startswith("segmenting: tiles 1/10 (10.0 %)") for line in lines)


def test_nothing_is_logged_when_off_or_for_an_empty_pass(caplog) -> None:
    caplog.set_level(logging.INFO, logger="blockbuster")
    with Progress(10, "segmenting", False) as bar:
        bar.update(10)
    with Progress(0, "merging", "log"):
        pass
    assert messages(caplog) == []


def test_a_terminal_bar_counts_failed_and_skipped() -> None:
    stream = Terminal()
    with Progress(4, "segmenting", None, stream=stream) as bar:
        assert bar.kind == "bar"
        bar.skip()
        bar.update()
        bar.fail()
        bar.update(3)
    shown = stream.getvalue()
    assert "segmenting" in shown and "4/4" in shown
    assert "failed=1" in shown and "skipped=1" in shown
    assert (bar.n, bar.failed, bar.skipped) == (4, 1, 1)
