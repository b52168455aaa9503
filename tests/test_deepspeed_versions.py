"""The ZeRO backend starts only on the DeepSpeed releases it is tested with (or when told to)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from slimfit_accel.errors import IntegrationError
from slimfit_accel.integrations.deepspeed_versions import ALLOW_UNTESTED_ENV, TESTED_DEEPSPEED, check_deepspeed_version

deepspeed = pytest.importorskip("deepspeed")


def test_installed_deepspeed_is_in_the_tested_range():
    check_deepspeed_version()


@pytest.mark.parametrize("version", ["0.15.4", "0.18.9", "0.19.7", "0.20.0", "1.0.0", "not-a-version"])
def test_backend_refuses_an_untested_deepspeed_with_one_line(monkeypatch, version):
    from slimfit_accel.integrations.deepspeed import ZeroStepBackend

    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.raises(IntegrationError) as raised:
        ZeroStepBackend(engine=None)  # refused before the engine is looked at
    message = str(raised.value)
    assert "\n" not in message
    assert f"DeepSpeed {version} is installed" in message and TESTED_DEEPSPEED in message
    assert f"pip install 'deepspeed{TESTED_DEEPSPEED}'" in message and ALLOW_UNTESTED_ENV in message


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9", "0.19.8+cpu"])
def test_tested_versions_pass(version):
    check_deepspeed_version(version)


def test_opting_in_runs_an_untested_deepspeed_with_a_warning(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="running it untested"):
        check_deepspeed_version("0.18.9")


def test_pyproject_declares_the_same_range():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in ("deepspeed", "test"):
        assert f"deepspeed{TESTED_DEEPSPEED}" in extras[extra], extra
