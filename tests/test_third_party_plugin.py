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
