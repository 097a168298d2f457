"""The segmenter catalogue: availability without importing, parameters, checked configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blockbuster.errors import InputError
from blockbuster.plugins.catalog import (
    installed_methods,
    make_segmenter,
    method_catalog,
    method_parameters,
)
from blockbuster.plugins.watershed import WatershedSegmenter

from helpers import write_plugin_dist

PLUGINS = '''
from blockbuster import Segmenter


class NeedsMissing(Segmenter):
    """Needs a module that is not installed."""

    requires = ("surely_not_installed_module_xyz",)
    extra = "xyz"


class NeedsBroken(Segmenter):
    """Needs a module that is installed but fails to import."""

    requires = ("catalog_broken_dependency",)


class OnGpu(Segmenter):
    """Takes gpu and passes other keyword arguments on."""

    def __init__(self, size: int = 3, gpu: bool = False, **predict_kwargs):
        self.size, self.gpu, self.predict_kwargs = size, gpu, predict_kwargs
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch) -> Path:
    """Plugins registered through a dist-info folder on sys.path, as pip would install them."""
    write_plugin_dist(tmp_path, "catalog-plugins",
                      {"needs-missing": "catalog_plugins:NeedsMissing",
                       "needs-broken": "catalog_plugins:NeedsBroken",
                       "on-gpu": "catalog_plugins:OnGpu",
                       "unloadable": "catalog_unloadable:Anything"},
                      {"catalog_plugins": PLUGINS,
                       "catalog_unloadable": "import definitely_missing_xyz_module\n",
                       "catalog_broken_dependency": "raise ImportError('libbar.so')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("catalog_plugins", "catalog_unloadable", "catalog_broken_dependency"):
        sys.modules.pop(name, None)


def test_parameters_of_a_segmenter() -> None:
    params, forwards = method_parameters(WatershedSegmenter)
    assert [p.name for p in params] == ["diameter", "sigma", "threshold", "threshold_method",
                                        "min_distance", "min_size", "channel"]
    assert params[0].default == 12 and not params[0].required and forwards is None
    assert params[3].describe() == 'threshold_method="otsu"'


def test_the_catalogue_says_what_runs_and_why_not(plugins) -> None:
    catalog = {m.name: m for m in method_catalog()}
    assert catalog["watershed"].available
    missing = catalog["needs-missing"]
    assert not missing.available and missing.requires == ["surely_not_installed_module_xyz"]
    assert missing.problem == ('needs surely_not_installed_module_xyz, not installed: pip '
                               'install "blockbuster[xyz]"')
    assert "failed to load" in catalog["unloadable"].problem
    assert catalog["needs-broken"].available  # a lookup only finds it
    assert catalog["on-gpu"].forwards == "predict_kwargs"
    names = installed_methods()
    assert "watershed" in names and "needs-missing" not in names and "unloadable" not in names
    imported = {m.name: m for m in method_catalog(["needs-broken", "watershed"],
                                                  import_check=True)}
    assert set(imported) == {"needs-broken", "watershed"} and imported["watershed"].available
    assert not imported["needs-broken"].available
    assert "fails to import: ImportError: libbar.so" in imported["needs-broken"].problem


def test_make_segmenter_checks_parameters(plugins) -> None:
    assert make_segmenter("watershed", {"diameter": 20, "sigma": 1.5}).sigma == 1.5
    with pytest.raises(InputError) as refused:
        make_segmenter("watershed", {"diameter": 20, "diamter": 3, "modle": "x"})
    message = str(refused.value)
    assert "segmenter 'watershed' has no parameters 'diamter', 'modle'" in message
    assert "diameter=12, sigma=null" in message and "keyword arguments" in message
    assert "--param KEY=VALUE" in refused.value.cli_message()
    # a factory with **kwargs passes the others on (it checks them itself)
    seg = make_segmenter("on-gpu", {"size": 5, "tile_overlap": 0.2}, gpu=True)
    assert (seg.size, seg.gpu, seg.predict_kwargs) == (5, True, {"tile_overlap": 0.2})
    assert make_segmenter("on-gpu", {"gpu": False}, gpu=True).gpu is False  # explicit wins
    assert make_segmenter("on-gpu").gpu is False
    with pytest.raises(InputError, match="no segmenter named 'nope'"):
        make_segmenter("nope")
    with pytest.raises(InputError, match="no segmenter named 'nope'; installed"):
        method_catalog(["nope"])
