"""Progress of long loops, wherever the run is watched from.

* On a terminal: a tqdm bar on stderr (tiles done / total, rate, ETA, failed and skipped).
* In a Jupyter notebook (stderr is not a terminal there): tqdm's notebook widget, when
  ipywidgets is installed (else the text bar, which notebooks also show).
* Anywhere else (a SLURM log, ``2> run.log``, a pipeline): log lines on the ``blockbuster``
  logger at INFO, at each tenth of the run and at least every :data:`DEFAULT_INTERVAL_S`
  seconds, whether or not a tile finished in between (so a log shows a run is alive)::

      segmenting: tiles 512/4096 (12.5 %), 3 failed, 1.9 tiles/s, ETA 31 min

The log interval can be set with the ``BLOCKBUSTER_PROGRESS_INTERVAL`` environment variable
(seconds). ``progress=False`` shows nothing; ``"bar"`` or ``"log"`` force one kind.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

__all__ = [
    "DEFAULT_INTERVAL_S",
    "INTERVAL_ENV",
    "Progress",
    "format_duration",
    "in_notebook",
    "make_progress",
    "progress_kind",
    "progress_line",
]

log = logging.getLogger("blockbuster")

#: Seconds between two progress log lines when no tenth of the run was crossed meanwhile.
DEFAULT_INTERVAL_S = 60.0
#: Environment variable overriding :data:`DEFAULT_INTERVAL_S`.
INTERVAL_ENV = "BLOCKBUSTER_PROGRESS_INTERVAL"

Kind = Literal["bar", "notebook", "log", "off"]


# -- where are we? ------------------------------------------------------------------------------
def in_notebook(modules: Mapping[str, Any] | None = None) -> bool:
    """Whether this process is a Jupyter kernel (notebook, JupyterLab, VS Code, Colab).

    Only looks at an IPython that is already imported (``modules``: default ``sys.modules``);
    an IPython terminal is not a notebook.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> class ZMQInteractiveShell: config = {}
    >>> in_notebook({"IPython": SimpleNamespace(get_ipython=ZMQInteractiveShell)})
    True
    >>> in_notebook({})
    False
    """
    modules = sys.modules if modules is None else modules
    ipython = modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:  # noqa: BLE001 -- a half-initialised IPython: not a notebook we can use
        return False
    if shell is None:
        return False
    name = type(shell).__name__
    if name == "ZMQInteractiveShell":  # Jupyter's kernel (notebook, lab, VS Code)
        return True
    if name == "TerminalInteractiveShell":
        return False
    # Other kernels (Colab's shell subclasses the ZMQ one under another name) run an IPKernelApp.
    try:
        return "IPKernelApp" in getattr(shell, "config", {})
    except TypeError:
        return False


def _interval(environ: Mapping[str, str]) -> float:
    text = environ.get(INTERVAL_ENV)
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", INTERVAL_ENV, text,
                    DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S
    return value if value > 0 and math.isfinite(value) else DEFAULT_INTERVAL_S


def progress_kind(progress: bool | str | None, *, stream: Any = None,
                  modules: Mapping[str, Any] | None = None,
                  widgets: bool | None = None) -> Kind:
    """What ``progress=`` shows here: a terminal ``"bar"``, a ``"notebook"`` bar, ``"log"``
    lines or nothing (``"off"``).

    Parameters
    ----------
    progress : bool, {"bar", "log", "notebook"} or None
        False: nothing. None or True: a notebook bar in Jupyter, a bar on a terminal, log lines
        elsewhere. A string forces that kind.
    stream : file, optional
        Where a bar would go (default ``sys.stderr``): a bar only when it is a terminal.
    modules : mapping, optional
        ``sys.modules`` (injectable for tests), see :func:`in_notebook`.
    widgets : bool, optional
        Whether ipywidgets (the notebook bar's widget) is installed; default: looked up.

    Examples
    --------
    >>> import io
    >>> progress_kind(None, stream=io.StringIO(), modules={})
    'log'
    >>> progress_kind(False), progress_kind("bar")
    ('off', 'bar')
    """
    if progress is False:
        return "off"
    if isinstance(progress, str):
        if progress not in ("bar", "log", "notebook"):
            from .errors import InputError

            raise InputError(f"progress={progress!r}: use True, False, None, 'bar', 'log' or "
                             "'notebook'")
        return progress  # type: ignore[return-value]
    if progress not in (None, True):
        from .errors import InputError

        raise InputError(f"progress={progress!r}: use True, False, None, 'bar' or 'log'")
    if in_notebook(modules):
        if widgets is None:
            widgets = importlib.util.find_spec("ipywidgets") is not None
        return "notebook" if widgets else "bar"  # the text bar shows in a notebook too
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return "bar" if tty else "log"


# -- the log line -------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """A duration as a person says it: ``45 s``, ``31 min``, ``5 h 20 min``.

    Examples
    --------
    >>> format_duration(44.6), format_duration(1860), format_duration(5 * 3600 + 1210)
    ('45 s', '31 min', '5 h 20 min')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


def progress_line(desc: str, done: int, total: int, *, failed: int = 0, skipped: int = 0,
                  rate: float | None = None, unit: str = "tile", elapsed: float | None = None,
                  ) -> str:
    """One progress log line.

    ``rate`` is in units per second (None: not known yet); ``elapsed`` ends a finished pass
    with its duration instead of an ETA.

    Examples
    --------
    >>> progress_line("segmenting", 512, 4096, failed=3, rate=1.9)
    'segmenting: tiles 512/4096 (12.5 %), 3 failed, 1.9 tiles/s, ETA 31 min'
    >>> progress_line("merging", 4, 4, rate=0.25, elapsed=16)
    'merging: tiles 4/4 (100.0 %), 4.0 s/tile, done in 16 s'
    """
    percent = 100.0 * done / total if total else 100.0
    parts = [f"{desc}: {unit}s {done}/{total} ({percent:.1f} %)"]
    if failed:
        parts.append(f"{failed} failed")
    if skipped:
        parts.append(f"{skipped} skipped")
    if rate:
        parts.append(f"{rate:.1f} {unit}s/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}")
    if elapsed is not None:
        parts.append(f"done in {format_duration(elapsed)}")
    elif rate and done < total:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    elif done < total:
        parts.append("ETA unknown")
    return ", ".join(parts)


# -- the bars -----------------------------------------------------------------------------------
class Progress:
    """Counts tiles done, failed and skipped, and shows them (see the module docstring).

    The engine calls :meth:`update` for every tile handled (failed and skipped ones included)
    and, in addition, :meth:`fail` or :meth:`skip` for those; it never cares what is shown.

    Parameters
    ----------
    total : int
        Tiles (or other units) in the pass.
    desc : str
        What the pass does, e.g. ``"segmenting"``.
    enabled : bool, str or None
        ``progress=`` of the caller, see :func:`progress_kind`.
    initial : int
        Units already done before this process started (a resumed run); they do not count in
        the rate.
    interval : float, optional
        Seconds between log lines (default: :data:`INTERVAL_ENV` or
        :data:`DEFAULT_INTERVAL_S`).
    clock : callable
        Monotonic seconds (injectable for tests).
    """

    def __init__(self, total: int, desc: str, enabled: bool | str | None, initial: int = 0,
                 unit: str = "tile", *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, stream: Any = None):
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.initial = int(initial)
        self.failed = 0
        self.skipped = 0
        self.kind: Kind = progress_kind(enabled, stream=stream)
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._bar: Any = None
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self.interval = _interval(os.environ) if interval is None else float(interval)
        self._last_line = self.started
        self._logged_tenth = self._tenth(self.n)
        self._logged_any = False
        if self.kind in ("bar", "notebook"):
            self._bar = _make_bar(self.kind, total=total, desc=desc, unit=unit,
                                  initial=initial, stream=stream)
        elif self.kind == "log" and self.total > self.initial:
            self._ticker = threading.Thread(target=self._tick, daemon=True,
                                            name="blockbuster-progress")
            self._ticker.start()

    # -- counting ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """``n`` more units handled (done, failed or skipped)."""
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.kind == "log":
                self._maybe_log()

    def skip(self, n: int = 1) -> None:
        """Count units that needed no work (empty, masked out); call :meth:`update` too."""
        self.skipped += n
        self._postfix()

    def fail(self, n: int = 1) -> None:
        """Count failed units; call :meth:`update` too."""
        self.failed += n
        self._postfix()

    def _postfix(self) -> None:
        if self._bar is not None:
            shown = {k: v for k, v in (("failed", self.failed), ("skipped", self.skipped)) if v}
            self._bar.set_postfix(shown, refresh=False)

    @property
    def rate(self) -> float | None:
        """Units per second handled by this process so far (None before the first)."""
        elapsed = self._clock() - self.started
        ran = self.n - self.initial
        return ran / elapsed if ran > 0 and elapsed > 0 else None

    def line(self, *, finished: bool = False) -> str:
        return progress_line(self.desc, self.n, self.total, failed=self.failed,
                             skipped=self.skipped, rate=self.rate, unit=self.unit,
                             elapsed=self._clock() - self.started if finished else None)

    # -- log lines --------------------------------------------------------------------------
    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 10

    def _maybe_log(self) -> None:
        """Log at each tenth of the run, at the end, and when the interval has passed."""
        now = self._clock()
        tenth = self._tenth(self.n)
        if self.n >= self.total:
            return  # close() logs the last line, with the pass's duration
        if tenth > self._logged_tenth or now - self._last_line >= self.interval:
            self._emit(self.line(), now, tenth)

    def _emit(self, text: str, now: float, tenth: int) -> None:
        log.info("%s", text)
        self._last_line = now
        self._logged_tenth = max(self._logged_tenth, tenth)
        self._logged_any = True

    def _tick(self) -> None:
        """Log at the interval even when no tile finishes (a long tile, a hung call)."""
        while not self._closed.wait(min(self.interval, 5.0)):
            with self._lock:
                now = self._clock()
                if now - self._last_line >= self.interval and self.n < self.total:
                    self._emit(self.line(), now, self._tenth(self.n))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._bar is not None:
            self._bar.close()
        elif self.kind == "log":
            with self._lock:
                if self.n > self.initial or self._logged_any:
                    self._emit(self.line(finished=self.n >= self.total), self._clock(),
                               self._tenth(self.n))
        if self._ticker is not None:
            self._ticker.join(timeout=1.0)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_bar(kind: Kind, *, total: int, desc: str, unit: str, initial: int,
              stream: Any) -> Any:
    if kind == "notebook":
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=True)
    from tqdm.std import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                leave=True, file=stream if stream is not None else sys.stderr)


def make_progress(total: int, desc: str, progress: bool | str | None,
                  initial: int = 0) -> Progress:
    """A :class:`Progress` for a pass of ``total`` tiles (``progress``: the caller's
    ``progress=`` argument)."""
    return Progress(total, desc, progress, initial=initial)
