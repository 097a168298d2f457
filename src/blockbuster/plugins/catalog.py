"""What segmenters are installed, whether they can run here, and what parameters they take.

* :func:`installed_methods`: the names of the segmenters whose requirements are installed,
  cheaply (plugin modules are light; the heavy modules a plugin ``requires`` are looked up with
  ``importlib.util.find_spec``, never imported): for ``--help`` texts and listings.
* :func:`method_catalog`: every registered segmenter with its parameters and defaults, and
  why one is unavailable; ``import_check=True`` really imports what each one requires (slow
  with torch or TensorFlow, but it finds a broken installation).
* :func:`make_segmenter`: a segmenter by name with parameters checked against the ones it
  really takes, with an error that lists them.

A plugin declares its heavy requirements in the class attributes
:attr:`~blockbuster.segmenter.Segmenter.requires` and ``extra``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from ..segmenter import Segmenter
from . import _distribution, _importable, _pick, _registered, get_segmenter

__all__ = ["MethodInfo", "Parameter", "installed_methods", "make_segmenter", "method_catalog",
           "method_parameters"]

#: Parameters a factory may take that switch the GPU on (set by ``gpu=True``).
GPU_PARAMETERS = ("gpu", "use_gpu")


@dataclass(frozen=True)
class Parameter:
    """One parameter of a segmenter: its name, default (JSON-able) and type as written."""

    name: str
    default: Any = None
    required: bool = False
    annotation: str | None = None

    def describe(self) -> str:
        """``name=default`` (``name`` alone when it has no default).

        Examples
        --------
        >>> Parameter("diameter", 12).describe(), Parameter("model", required=True).describe()
        ('diameter=12', 'model')
        """
        return self.name if self.required else f"{self.name}={json.dumps(self.default)}"


@dataclass
class MethodInfo:
    """A registered segmenter as the catalogue sees it."""

    name: str
    entry_point: str
    package: str
    available: bool
    problem: str | None = None
    summary: str = ""
    parameters: list[Parameter] = field(default_factory=list)
    #: name of the ``**kwargs`` a factory forwards (e.g. Cellpose's eval arguments), or None
    forwards: str | None = None
    requires: list[str] = field(default_factory=list)
    extra: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jsonable_default(value: Any) -> Any:
    from . import jsonable

    return jsonable(value)


def method_parameters(factory: Any) -> tuple[list[Parameter], str | None]:
    """The named parameters of a segmenter class or factory, and its ``**kwargs`` name.

    Examples
    --------
    >>> from blockbuster.plugins.watershed import WatershedSegmenter
    >>> params, forwards = method_parameters(WatershedSegmenter)
    >>> [p.describe() for p in params][:2], forwards
    (['diameter=12', 'sigma=null'], None)
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins or C callables: cannot tell, it checks itself
        return [], "kwargs"
    params, forwards = [], None
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            forwards = p.name
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
            required = p.default is p.empty
            annotation = (p.annotation if isinstance(p.annotation, str) else
                          getattr(p.annotation, "__name__", None)
                          if p.annotation is not p.empty else None)
            params.append(Parameter(p.name, None if required else _jsonable_default(p.default),
                                    required, annotation))
    return params, forwards


def _requirements(factory: Any) -> tuple[list[str], str | None]:
    requires = getattr(factory, "requires", ()) or ()
    return [str(m) for m in requires], getattr(factory, "extra", None)


def _missing(modules: list[str], import_check: bool) -> tuple[list[str], str | None]:
    """Modules that are not installed (or, with ``import_check``, fail to import)."""
    missing = [m for m in modules if not _importable(m)]
    if missing or not import_check:
        return missing, None
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 -- any import failure makes it unusable
            return [module], f"{type(exc).__name__}: {exc}"
    return [], None


def method_catalog(names: Iterable[str] | None = None, *,
                   import_check: bool = False) -> list[MethodInfo]:
    """Every registered segmenter, sorted by name, with its parameters and availability.

    Parameters
    ----------
    names : iterable of str, optional
        Only these segmenters (default: all). An unknown name is an :class:`InputError`.
    import_check : bool
        Import the modules each segmenter requires (torch, TensorFlow...) to be sure they work,
        instead of only looking them up. Takes seconds when they are installed.

    Examples
    --------
    >>> watershed = {m.name: m for m in method_catalog()}["watershed"]
    >>> watershed.available, watershed.parameters[0].describe()
    (True, 'diameter=12')
    """
    found = []
    registered = _registered()
    wanted = set(registered) if names is None else set(names)
    unknown = sorted(wanted - set(registered))
    if unknown:
        raise InputError(f"no segmenter named {', '.join(map(repr, unknown))}; installed "
                         f"segmenters: {', '.join(sorted(registered)) or 'none'}")
    for name, eps in sorted(registered.items()):
        if name not in wanted:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # several packages: the first wins
            ep = _pick(name, eps)
        info = MethodInfo(name, ep.value, _distribution(ep), available=False)
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 -- a broken plugin is listed as such
            info.problem = f"the plugin failed to load: {type(exc).__name__}: {exc}"
            found.append(info)
            continue
        target = type(factory) if isinstance(factory, Segmenter) else factory
        info.summary = (inspect.getdoc(target) or "").split("\n", 1)[0]
        info.parameters, info.forwards = method_parameters(factory)
        info.requires, info.extra = _requirements(target)
        missing, failure = _missing(info.requires, import_check)
        if failure is not None:
            info.problem = f"{missing[0]} is installed but fails to import: {failure}"
        elif missing:
            how = f'pip install "blockbuster[{info.extra}]"' if info.extra else "install them"
            info.problem = (f"needs {', '.join(missing)}, not installed: {how}")
        info.available = info.problem is None
        found.append(info)
    return found


def installed_methods() -> list[str]:
    """Names of the segmenters that can run here (cheap check, see the module docstring).

    Examples
    --------
    >>> "watershed" in installed_methods()
    True
    """
    return [m.name for m in method_catalog() if m.available]


def make_segmenter(name: str, params: dict[str, Any] | None = None, *,
                   gpu: bool = False) -> Segmenter:
    """The segmenter registered as ``name``, with ``params`` checked against its parameters.

    A parameter the segmenter does not take is refused with an error that lists the ones it
    does (a factory with ``**kwargs`` checks those itself). With ``gpu``, a segmenter that
    takes ``gpu`` or ``use_gpu`` gets True unless ``params`` sets it.

    Examples
    --------
    >>> make_segmenter("watershed", {"diameter": 20.0}).diameter
    20.0
    >>> make_segmenter("watershed", {"model": "nuclei"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    blockbuster.errors.InputError: segmenter 'watershed' has no parameter 'model'; it takes ...
    """
    params = dict(params or {})
    registered = _registered()
    if name not in registered:
        return get_segmenter(name, **params)  # the registry's error lists the installed ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # get_segmenter warns once below
        ep = _pick(name, registered[name])
    try:
        factory = ep.load()
    except Exception:  # noqa: BLE001 -- get_segmenter raises the error that names the plugin
        return get_segmenter(name, **params)
    named, forwards = method_parameters(factory)
    names = [p.name for p in named]
    unknown = [k for k in params if k not in names]
    if unknown and forwards is None and not isinstance(factory, Segmenter):
        takes = ", ".join(p.describe() for p in named) or "no parameters"
        raise InputError(
            f"segmenter {name!r} has no parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; it takes {takes} (pass them as $params)")
    if gpu:
        for key in GPU_PARAMETERS:
            if key in names:
                params.setdefault(key, True)
                break
    return get_segmenter(name, **params)
