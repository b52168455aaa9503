"""The recipe end to end on the real packaged MiniLM and Rotten Tomatoes data (a few steps)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RECIPE = [sys.executable, "-m", "slimfit_accel.finetune"]
SMALL = ["--train-size", "64", "--test-size", "64", "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--max-steps", "3"]


def test_recipe_runs_slimfit_on_the_real_model(tmp_path):
    out = tmp_path / "state"
    done = subprocess.run([*RECIPE, *SMALL, "--output-dir", str(out), "--checkpointing-steps", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before training (untrained head): accuracy" in done.stdout and "majority-class baseline" in done.stdout
    assert "trained 3 optimizer steps" in done.stdout
    assert "SlimFit freezing" in done.stdout and "weight_delta / ils" in done.stdout
    assert (out / "checkpoints" / "step_000003" / "custom_checkpoint_0.pkl").exists()  # the controller's state, for resuming
    assert (out / "summary.json").is_file() and (out / "final" / "model.safetensors").is_file()


def test_recipe_rejects_a_bad_config_before_anything_is_written(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("scheduler: {name: ils, freeze_ratio: 1.5}\n")
    out = tmp_path / "state"
    done = subprocess.run([*RECIPE, *SMALL, "--slimfit-config", str(config), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "freeze_ratio must be in [0, 1), got 1.5" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
