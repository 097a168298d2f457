"""The segmenter registry: entry points, third-party plugins, broken plugins, missing extras."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import blockbuster.plugins as plugins
from blockbuster.errors import InputError, PluginNotInstalledError
from blockbuster.plugins import (
    ModelCache,
    available_segmenters,
    get_segmenter,
    resolve_fn,
)
from blockbuster.plugins.watershed import WatershedSegmenter
from blockbuster.segmenter import Segmenter

from helpers import write_plugin_dist

TOY_MODULE = '''
import numpy as np
from scipy import ndimage
from blockbuster.segmenter import MemoryModel, Segmenter


class ToySegmenter(Segmenter):
    """Threshold and connected components: a minimal third-party plugin."""

    name = "toy"
    preferred_overlap = 4
    preferred_stitch = "iou"
    memory_model = MemoryModel(bytes_per_voxel=8)

    def __init__(self, threshold=0.5):
        self.threshold = threshold

    def config(self):
        return {"threshold": self.threshold}

    def segment(self, tile):
        return ndimage.label(tile > self.threshold)[0]


def make_toy(threshold=0.5):
    return ToySegmenter(threshold)


def not_a_segmenter():
    return "oops"
'''


@pytest.fixture
def toy_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A third-party package registering 'toy' and 'toyfactory', installed on sys.path."""
    write_plugin_dist(tmp_path, "bb-toy-plugin",
                      {"toy": "bb_toy_plugin:ToySegmenter", "toyfactory": "bb_toy_plugin:make_toy",
                       "notseg": "bb_toy_plugin:not_a_segmenter"},
                      {"bb_toy_plugin": TOY_MODULE})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("bb_toy_plugin", None)


@pytest.fixture
def broken_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A third-party plugin whose module fails on import."""
    write_plugin_dist(tmp_path, "bb-broken-plugin", {"broken": "bb_broken_plugin:Nope"},
                      {"bb_broken_plugin": "raise ImportError('needs libfoo 3')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


# -- built-in registrations -------------------------------------------------------------------
def test_builtin_segmenters_are_registered() -> None:
    names = available_segmenters()
    assert {"watershed", "cellpose", "stardist"} <= set(names)
    assert names["watershed"].load() is WatershedSegmenter


def test_get_segmenter_passes_arguments() -> None:
    seg = get_segmenter("watershed", diameter=8, threshold_method="li")
    assert isinstance(seg, WatershedSegmenter)
    assert (seg.diameter, seg.threshold_method) == (8.0, "li")
    with pytest.raises(InputError, match="diameter"):
        get_segmenter("watershed", diameter=-1)


def test_unknown_name_lists_installed_segmenters() -> None:
    with pytest.raises(InputError) as info:
        get_segmenter("cellpos")
    message = str(info.value)
    assert "'cellpos'" in message
    for name in ("watershed", "cellpose", "stardist"):
        assert name in message


def test_name_must_be_a_string() -> None:
    with pytest.raises(InputError, match="must be a str"):
        get_segmenter(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "modules"), [("cellpose", ["cellpose", "torch"]),
                                               ("stardist", ["stardist", "tensorflow"])])
def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, name: str,
                                             modules: list[str]) -> None:
    # Pretend the optional packages are absent, whatever this environment has.
    monkeypatch.setattr(plugins, "_importable", lambda m: m not in modules)
    with pytest.raises(PluginNotInstalledError) as info:
        get_segmenter(name)
    assert f'pip install "blockbuster[{name}]"' in str(info.value)
    assert isinstance(info.value, ImportError)


@pytest.mark.skipif(plugins._importable("cellpose"), reason="cellpose is installed here")
def test_missing_cellpose_for_real() -> None:
    from blockbuster.plugins.cellpose import cellpose_fn

    with pytest.raises(PluginNotInstalledError, match=r"blockbuster\[cellpose\]"):
        cellpose_fn()


@pytest.mark.skipif(plugins._importable("stardist") and plugins._importable("tensorflow"),
                    reason="stardist is installed here")
def test_missing_stardist_for_real() -> None:
    from blockbuster.plugins.stardist import stardist_fn

    with pytest.raises(PluginNotInstalledError, match=r"blockbuster\[stardist\]"):
        stardist_fn()


def test_plugin_modules_import_nothing_heavy() -> None:
    """Importing the plugin modules and listing plugins must not import torch or tensorflow."""
    code = textwrap.dedent("""
        import sys
        import blockbuster.plugins.cellpose, blockbuster.plugins.stardist
        import blockbuster.plugins.watershed
        from blockbuster.plugins import available_segmenters
        available_segmenters()
        heavy = ("torch", "tensorflow", "keras", "cellpose", "stardist", "csbdeep")
        print(",".join(m for m in heavy if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""


# -- resolve_fn -------------------------------------------------------------------------------
def test_resolve_fn_instantiates_names_and_passes_objects_through() -> None:
    seg = resolve_fn("watershed", diameter=6)
    assert isinstance(seg, WatershedSegmenter) and seg.diameter == 6
    ws = WatershedSegmenter()
    assert resolve_fn(ws) is ws
    assert resolve_fn(np.zeros_like) is np.zeros_like


def test_resolve_fn_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="only be given with a segmenter name"):
        resolve_fn(WatershedSegmenter(), diameter=3)
    with pytest.raises(InputError, match="callable"):
        resolve_fn(42)


# -- third-party plugins ----------------------------------------------------------------------
@pytest.mark.usefixtures("toy_dist")
def test_third_party_plugin_is_found_and_configured() -> None:
    names = available_segmenters()
    assert {"toy", "toyfactory", "watershed"} <= set(names)
    assert names["toy"].dist.name == "bb-toy-plugin"
    seg = get_segmenter("toy", threshold=0.2)
    assert isinstance(seg, Segmenter) and seg.config() == {"threshold": 0.2}
    # A factory function works as well as a class.
    assert get_segmenter("toyfactory", threshold=0.7).threshold == 0.7
    labels = seg(np.array([[0.0, 0.9, 0.0, 0.9]]))
    assert labels.tolist() == [[0, 1, 0, 2]]


@pytest.mark.usefixtures("toy_dist")
def test_third_party_plugin_runs_through_tile_process_by_name() -> None:
    from blockbuster.api import tile_process

    image = np.zeros((40, 40), np.float32)
    image[5:12, 5:30] = 1.0  # crosses tile borders
    image[25:35, 25:35] = 1.0
    out = tile_process(image, "toy", tile_shape=(16, 16), progress=False)
    labels = np.asarray(out[...])
    assert labels.shape == image.shape
    assert len(np.unique(labels[image > 0])) == 2
    assert not labels[image == 0].any()


@pytest.mark.usefixtures("toy_dist")
def test_factory_returning_something_else_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"not a blockbuster\.segmenter\.Segmenter"):
        get_segmenter("notseg")


@pytest.mark.usefixtures("broken_dist")
def test_broken_plugin_warns_and_is_skipped() -> None:
    with pytest.warns(RuntimeWarning, match=r"'broken'.*bb-broken-plugin.*needs libfoo 3"):
        names = available_segmenters()
    assert "broken" not in names
    assert "watershed" in names  # the others still work


@pytest.mark.usefixtures("broken_dist")
def test_asking_for_a_broken_plugin_says_why() -> None:
    with pytest.raises(InputError, match=r"'broken'.*failed to load.*needs libfoo 3"):
        get_segmenter("broken")
    # Other plugins are not affected and are looked up without warnings.
    assert isinstance(get_segmenter("watershed"), WatershedSegmenter)


def test_name_clash_keeps_the_builtin_and_warns(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin_dist(tmp_path, "bb-clash-plugin", {"watershed": "bb_clash_plugin:ToySegmenter"},
                      {"bb_clash_plugin": TOY_MODULE})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="registered by several packages"):
        seg = get_segmenter("watershed")
    assert isinstance(seg, WatershedSegmenter)


# -- ModelCache -------------------------------------------------------------------------------
def test_model_cache_loads_each_key_once() -> None:
    cache = ModelCache("test")
    calls = []

    def loader(tag):
        def load():
            calls.append(tag)
            return object()
        return load

    first = cache.get("a", loader("a"))
    assert cache.get("a", loader("a")) is first
    second = cache.get("b", loader("b"))
    assert second is not first
    assert calls == ["a", "b"]
    assert (cache.load_count("a"), cache.load_count(), len(cache)) == (1, 2, 2)
    cache.clear()
    assert "a" not in cache
    cache.get("a", loader("a"))
    assert cache.load_count("a") == 2


def test_model_cache_loads_once_under_concurrent_first_use() -> None:
    cache = ModelCache("test")
    calls = []

    def slow_load():
        calls.append(1)
        time.sleep(0.05)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow_load)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_model_cache_pickles_empty() -> None:
    cache = ModelCache("test")
    cache.get("k", lambda: np.ones(10_000))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.name == "test" and len(copy) == 0
    assert len(pickle.dumps(cache)) < 200
