"""A separately packaged plugin, installed for real, is listed and selectable by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "third_party_plugin"
CLI = [sys.executable, "-m", "slimfit_accel.cli"]

RUN_WITH_PLUGIN = """
import torch
from slimfit_accel import SlimFit
slimfit = SlimFit.from_config({"scheduler": {"name": "every_other"}})
model = slimfit.prepare_model(torch.nn.Sequential(*[torch.nn.Linear(3, 3, bias=False) for _ in range(4)]))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
slimfit.attach(None, model, optimizer)
for _ in range(2):
    with slimfit.step():
        print(sorted(slimfit.controller.trainable))
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step(); optimizer.zero_grad()
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """Build and install the fixture package (wheel + dist-info, entry point included)."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    shutil.copytree(FIXTURE, source)
    site = work / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(site.glob("slimfit_every_other-0.1.0.dist-info/entry_points.txt"))
    return site


def env_with(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SLIMFIT_ACCEL_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_installed_plugin_is_listed(plugin_site):
    out = subprocess.run([*CLI, "plugins", "--json"], env=env_with(plugin_site), capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["every_other"]["builtin"] is False
    assert rows["every_other"]["strategies"] == {"scheduler": ["every_other"]}
    assert rows["every_other"]["hooks"] == ["register_schedulers"]
    assert rows["ils"]["builtin"] is True
    text = subprocess.run([*CLI, "plugins"], env=env_with(plugin_site), capture_output=True, text=True, check=True).stdout
    assert "every_other  (third-party, slimfit_every_other)" in text


def test_installed_plugin_is_selectable_by_name(plugin_site):
    out = subprocess.run([sys.executable, "-c", RUN_WITH_PLUGIN], env=env_with(plugin_site), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["['0.weight', '2.weight']", "['1.weight', '3.weight']"]


def test_env_var_restricts_plugins(plugin_site, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("scheduler: {name: every_other}\n")
    only_builtins = env_with(plugin_site, SLIMFIT_ACCEL_PLUGINS="")
    listed = json.loads(subprocess.run([*CLI, "plugins", "--json"], env=only_builtins, capture_output=True, text=True, check=True).stdout)
    assert "every_other" not in {row["name"] for row in listed}
    rejected = subprocess.run([*CLI, "check-config", str(config)], env=only_builtins, capture_output=True, text=True)
    assert rejected.returncode == 2
    assert "unknown scheduler 'every_other'. Known schedulers: ils, progressive, random_layers, static" in rejected.stderr
    chosen = env_with(plugin_site, SLIMFIT_ACCEL_PLUGINS="every_other")
    accepted = subprocess.run([*CLI, "check-config", str(config)], env=chosen, capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    unknown = subprocess.run([*CLI, "plugins"], env=env_with(plugin_site, SLIMFIT_ACCEL_PLUGINS="nope"), capture_output=True, text=True)
    assert unknown.returncode == 2 and "names ['nope']" in unknown.stderr


# -- name clashes: distributions made by hand (a dist-info folder is all importlib.metadata reads) --
TOPK_PLUGIN = """
from slimfit_accel.hookspecs import hookimpl
from slimfit_accel.strategies.compression.none import NoCompression

@hookimpl
def register_compressors(register):
    register({name!r}, NoCompression)
"""


def fake_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Install distribution ``dist`` into ``site``: its modules and a dist-info with ``entry_points``."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[slimfit_accel]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMFIT_ACCEL_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_registering_a_builtin_strategy_name_is_an_error_naming_both(site):
    from slimfit_accel.errors import PluginError
    from slimfit_accel.plugins import StrategyRegistry

    fake_distribution(site, "slimfit-fast-topk", {"fast_topk": "fast_topk_plugin"},
                      {"fast_topk_plugin": TOPK_PLUGIN.format(name="topk")})
    with pytest.raises(PluginError) as raised:
        StrategyRegistry.load()
    assert str(raised.value) == (
        "plugin 'fast_topk': (distribution 'slimfit-fast-topk', entry point fast_topk_plugin) registers compressor "
        "'topk', already registered by plugin 'topk' (built into slimfit-accel). Rename one of them, or leave the "
        "third-party one out with SLIMFIT_ACCEL_PLUGINS."
    )


def test_a_plugin_named_like_a_builtin_is_an_error_naming_both(site):
    from slimfit_accel.errors import PluginError
    from slimfit_accel.plugins import StrategyRegistry

    fake_distribution(site, "slimfit-my-topk", {"topk": "my_topk_plugin"}, {"my_topk_plugin": TOPK_PLUGIN.format(name="my_topk")})
    with pytest.raises(PluginError, match=r"plugin 'topk': \(distribution 'slimfit-my-topk', entry point my_topk_plugin\) "
                                          r"has the name of plugin 'topk' \(built into slimfit-accel\)"):
        StrategyRegistry.load()


def test_two_entry_points_with_one_name_and_different_modules_are_an_error(site):
    from slimfit_accel.errors import PluginError
    from slimfit_accel.plugins import StrategyRegistry

    fake_distribution(site, "slimfit-alpha", {"fancy": "alpha_plugin"}, {"alpha_plugin": TOPK_PLUGIN.format(name="alpha")})
    fake_distribution(site, "slimfit-beta", {"fancy": "beta_plugin"}, {"beta_plugin": TOPK_PLUGIN.format(name="beta")})
    with pytest.raises(PluginError) as raised:
        StrategyRegistry.load()
    message = str(raised.value)
    assert message.startswith("plugin 'fancy': two installed entry points")
    assert "alpha_plugin (distribution 'slimfit-alpha')" in message and "beta_plugin (distribution 'slimfit-beta')" in message


def test_the_same_entry_point_listed_twice_loads_once(site, tmp_path_factory, monkeypatch):
    from slimfit_accel.plugins import StrategyRegistry

    fake_distribution(site, "slimfit-alpha", {"fancy": "alpha_plugin"}, {"alpha_plugin": TOPK_PLUGIN.format(name="alpha")})
    again = tmp_path_factory.mktemp("again")  # e.g. an editable install next to a regular one
    fake_distribution(again, "slimfit-alpha", {"fancy": "alpha_plugin"}, {})
    monkeypatch.syspath_prepend(str(again))
    registry = StrategyRegistry.load()
    assert registry.strategies["compressor"]["alpha"].plugin == "fancy"


def test_builtins_load_with_no_entry_points_at_all(monkeypatch):
    from importlib import metadata

    from slimfit_accel import plugins

    monkeypatch.delenv("SLIMFIT_ACCEL_PLUGINS", raising=False)
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda **_: metadata.EntryPoints(()))
    registry = plugins.StrategyRegistry.load()
    assert sorted(registry.strategies["scheduler"]) == ["ils", "progressive", "random_layers", "static"]
    assert {"topk", "int8", "bitmask", "none"} <= set(registry.strategies["compressor"])
    assert sorted(registry.strategies["scorer"]) == ["grad_norm", "random", "weight_delta"]
    assert all(row["builtin"] for row in registry.describe())
    assert len(registry.describe()) == len(plugins.BUILTIN_PLUGINS)
