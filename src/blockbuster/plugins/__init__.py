"""Segmenter plugins: the registry of named segmenters and helpers for writing plugins.

Segmenters are registered under the entry-point group ``blockbuster.segmenters``. blockbuster
registers its own (``watershed``, ``cells``, ``cellpose``, ``stardist``); a third-party package
adds one
without touching blockbuster, in its ``pyproject.toml``::

    [project.entry-points."blockbuster.segmenters"]
    mymethod = "my_package.segment:MySegmenter"

The object an entry point names is a :class:`~blockbuster.segmenter.Segmenter` subclass, or a
factory function returning a Segmenter; ``get_segmenter("mymethod", **kwargs)`` calls it with
the keyword arguments. As in xarray's backend plugins, a third-party plugin that fails to import
is reported with a :class:`RuntimeWarning` and skipped when listing, never a crash.

Nothing heavy is imported here or when a plugin module is imported: Cellpose, StarDist, torch
and tensorflow are imported only when a model is first needed.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import numpy as np

from ..errors import InputError, PluginNotInstalledError
from ..segmenter import Segmenter

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModelCache",
    "available_segmenters",
    "get_segmenter",
    "jsonable",
    "require",
    "resolve_fn",
    "stack_plane_labels",
]

#: The entry-point group segmenter plugins register under.
ENTRY_POINT_GROUP = "blockbuster.segmenters"

#: The distribution that ships the built-in plugins; its entries win over same-named ones.
_OWN_DISTRIBUTION = "blockbuster"

T = TypeVar("T")


# -- entry points -----------------------------------------------------------------------------
def _registered() -> dict[str, list[EntryPoint]]:
    """Every entry point of the group by name, blockbuster's own first (no plugin is imported)."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    for eps in found.values():
        eps.sort(key=lambda ep: _distribution(ep) != _OWN_DISTRIBUTION)
    return found


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "an unknown package"


def _pick(name: str, eps: list[EntryPoint]) -> EntryPoint:
    """The entry point used for ``name``; a warning says which one when several packages claim
    it."""
    if len(eps) > 1:
        others = ", ".join(f"{ep.value} ({_distribution(ep)})" for ep in eps[1:])
        warnings.warn(
            f"segmenter {name!r} is registered by several packages; using {eps[0].value} "
            f"({_distribution(eps[0])}) and ignoring {others}",
            RuntimeWarning,
            stacklevel=3,
        )
    return eps[0]


def available_segmenters() -> dict[str, EntryPoint]:
    """The installed segmenter plugins that load, by name.

    Every registered plugin module is imported (plugin modules are light: models load only when
    used). A plugin that fails to import is skipped with a :class:`RuntimeWarning` naming it and
    the error, so one broken package does not break the others.

    Returns
    -------
    dict of str to importlib.metadata.EntryPoint
        Sorted by name; ``ep.load()`` gives the Segmenter class or factory.

    Examples
    --------
    >>> "watershed" in available_segmenters()
    True
    """
    usable: dict[str, EntryPoint] = {}
    for name, eps in sorted(_registered().items()):
        ep = _pick(name, eps)
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 -- a broken plugin must not stop the listing
            warnings.warn(
                f"segmenter plugin {name!r} ({ep.value}, from {_distribution(ep)}) failed to "
                f"load and is skipped: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        usable[name] = ep
    return usable


def get_segmenter(name: str, **kwargs: Any) -> Segmenter:
    """Create the segmenter registered as ``name``, configured with ``kwargs``.

    Parameters
    ----------
    name : str
        A registered name, e.g. ``"watershed"``, ``"cellpose"`` or ``"stardist"``.
    **kwargs
        Passed to the plugin's class or factory (e.g. ``diameter=20``).

    Returns
    -------
    Segmenter

    Raises
    ------
    InputError
        No plugin has that name (the message lists the installed ones), the plugin failed to
        import, or it did not produce a Segmenter.
    PluginNotInstalledError
        A built-in plugin whose optional dependency is missing; the message names the extra.

    Examples
    --------
    >>> seg = get_segmenter("watershed", diameter=10)
    >>> seg.name, seg.preferred_overlap
    ('watershed', 10)
    """
    if not isinstance(name, str):
        raise InputError(f"a segmenter name must be a str, not {type(name).__name__}")
    registered = _registered()
    if name not in registered:
        installed = ", ".join(sorted(registered)) or "none"
        raise InputError(
            f"no segmenter named {name!r}; installed segmenters: {installed}. Third-party "
            f"segmenters register under the entry-point group {ENTRY_POINT_GROUP!r}"
        )
    ep = _pick(name, registered[name])
    try:
        factory = ep.load()
    except Exception as exc:
        raise InputError(
            f"segmenter plugin {name!r} ({ep.value}, from {_distribution(ep)}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _instantiate(name, factory, kwargs)


def _instantiate(name: str, factory: Any, kwargs: dict[str, Any]) -> Segmenter:
    if isinstance(factory, Segmenter):  # an entry point may name a ready-made instance
        if kwargs:
            raise InputError(f"segmenter {name!r} is a fixed instance and takes no arguments; "
                             f"got {', '.join(sorted(kwargs))}")
        return factory
    if not callable(factory):
        raise InputError(f"segmenter plugin {name!r} names {factory!r}, which is not callable")
    _check_arguments(name, factory, kwargs)
    seg = factory(**kwargs)
    if not isinstance(seg, Segmenter):
        raise InputError(
            f"segmenter plugin {name!r} returned {type(seg).__name__}, not a "
            "blockbuster.segmenter.Segmenter; register a Segmenter subclass or a factory "
            "returning one"
        )
    return seg


def _check_arguments(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Refuse arguments the plugin does not take, naming them and the ones it takes."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: let the call say
        return
    params = signature.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return  # passed through (e.g. to Cellpose's eval): the plugin checks them itself
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            u, accepted, n=1)) else u for u in unknown]
        raise InputError(f"segmenter {name!r} takes no argument {', '.join(hints)}; it takes "
                         f"{', '.join(accepted) or 'no arguments'}")


def resolve_fn(fn: Any, **kwargs: Any) -> Callable:
    """Turn what a user passes as ``fn`` into something callable on a tile.

    Parameters
    ----------
    fn : str, Segmenter or callable
        A registered segmenter name (instantiated with ``kwargs``), or a Segmenter or plain
        callable (returned as it is).
    **kwargs
        Only for names: the segmenter's parameters.

    Returns
    -------
    callable

    Examples
    --------
    >>> resolve_fn("watershed").name
    'watershed'
    >>> import numpy as np
    >>> resolve_fn(np.zeros_like) is np.zeros_like
    True
    """
    if isinstance(fn, str):
        return get_segmenter(fn, **kwargs)
    if kwargs:
        raise InputError("segmenter parameters can only be given with a segmenter name, not "
                         f"with {type(fn).__name__}; configure the object itself instead")
    if not callable(fn):
        raise InputError(f"fn must be a callable, a Segmenter or a registered segmenter name; "
                         f"got {type(fn).__name__}")
    return fn


# -- helpers for plugins ----------------------------------------------------------------------
def require(modules: Sequence[str], extra: str, what: str) -> None:
    """Raise :class:`PluginNotInstalledError` unless all ``modules`` can be imported.

    Only looks the modules up (``importlib.util.find_spec``); nothing is imported.

    Parameters
    ----------
    modules : sequence of str
        Top-level modules the plugin needs, e.g. ``["stardist", "tensorflow"]``.
    extra : str
        The blockbuster extra that installs them.
    what : str
        The plugin's name for the message.

    Examples
    --------
    >>> require(["numpy"], "none", "numpy-based")
    >>> require(["surely_not_installed_xyz"], "xyz", "XYZ")
    Traceback (most recent call last):
    ...
    blockbuster.errors.PluginNotInstalledError: the XYZ segmenter needs ... "blockbuster[xyz]"
    """
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise PluginNotInstalledError(
            f"the {what} segmenter needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: "
            f'pip install "blockbuster[{extra}]"',
            name=missing[0],
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package fails to import, or a broken spec
        return False


class ModelCache:
    """Models loaded at most once per process, shared by every segmenter instance and tile.

    Segmenters are pickled to workers for every run; the model itself is never pickled. Each
    process loads it on first use and keeps it here, keyed by the configuration that defines it,
    so many tiles and many equal segmenter instances in one worker reuse one model. Loading is
    serialised by a lock so that threads of one worker do not load the same model twice.

    Parameters
    ----------
    name : str
        What the cache holds, for ``repr``.

    Attributes
    ----------
    loads : dict
        How many times each key was loaded in this process (tests check it stays 1).

    Examples
    --------
    >>> cache = ModelCache("demo")
    >>> cache.get(("m", 1), lambda: object()) is cache.get(("m", 1), lambda: object())
    True
    >>> cache.load_count(("m", 1)), cache.load_count()
    (1, 1)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._models: dict[Hashable, Any] = {}
        self.loads: dict[Hashable, int] = {}
        self._lock = threading.RLock()

    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The model for ``key``, calling ``loader()`` only if this process has none yet."""
        model = self._models.get(key)
        if model is not None:
            return model
        with self._lock:
            if key not in self._models:
                self._models[key] = loader()
                self.loads[key] = self.loads.get(key, 0) + 1
            return self._models[key]

    def load_count(self, key: Hashable | None = None) -> int:
        """Loads of ``key`` so far, or of all keys together."""
        if key is None:
            return sum(self.loads.values())
        return self.loads.get(key, 0)

    def clear(self) -> None:
        """Forget every model (they are freed once no segmenter call uses them)."""
        with self._lock:
            self._models.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"ModelCache({self.name!r}, {len(self._models)} model(s))"

    def __reduce__(self):
        # A segmenter that references its cache must still pickle cheaply: a cache travels as
        # an empty one (each process loads its own models).
        return (ModelCache, (self.name,))


def stack_plane_labels(planes: Sequence[np.ndarray], dtype: Any = np.uint32) -> np.ndarray:
    """Stack the labels of separately segmented z-planes into one volume of distinct labels.

    Each plane's objects are numbered after those of the planes before it, so that objects of
    different planes never share a label (a 2-D method links nothing across planes).

    Examples
    --------
    >>> a = np.array([[0, 1], [2, 2]]); b = np.array([[1, 0], [0, 0]])
    >>> stack_plane_labels([a, b]).tolist()
    [[[0, 1], [2, 2]], [[3, 0], [0, 0]]]
    """
    offset = 0
    out = []
    for labels in planes:
        labels = np.asarray(labels)
        out.append(np.where(labels > 0, labels.astype(dtype) + dtype(offset), 0).astype(dtype))
        offset += int(labels.max()) if labels.size else 0
    return np.stack(out)


def jsonable(value: Any) -> Any:
    """``value`` with JSON types only (for ``config()``): tuples become lists, NumPy scalars
    Python numbers, anything else its ``repr``.

    Examples
    --------
    >>> jsonable({"a": (1, np.float32(0.5)), "b": None})
    {'a': [1, 0.5], 'b': None}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
