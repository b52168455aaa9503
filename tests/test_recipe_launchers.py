"""The recipe, with SlimFit on, under real launchers: torchrun DDP and accelerate launch + DeepSpeed.

A small random BERT with the packaged tokenizer keeps these to seconds per step; the freezing
guarantees themselves are tested in test_distributed.py and test_deepspeed_freezing.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train-size", "64", "--test-size", "32", "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--max-steps", "3"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A 2-layer random BERT with MiniLM's vocabulary, saved with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from slimfit_accel.model_assets import default_model_path

    folder = tmp_path_factory.mktemp("small-bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = Path(default_model_path()) / name
        if source.exists():
            shutil.copy(source, folder / name)
    return folder


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.mark.parametrize("config", ["zero2_offload.yaml", "zero3.yaml"])
def test_recipe_under_accelerate_launch_and_deepspeed(small_model, config):
    accelerate = Path(sys.executable).with_name("accelerate")
    done = launch([str(accelerate), "launch", "--config_file", f"accelerate_configs/{config}", "launch/finetune.py", "--model", str(small_model), *SMALL])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "trained 3 optimizer steps" in done.stdout and "2 process(es)" in done.stdout
    assert "SlimFit freezing" in done.stdout


def test_recipe_under_torchrun_ddp(small_model):
    done = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/finetune.py", "--model", str(small_model), *SMALL])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "trained 3 optimizer steps" in done.stdout and "2 process(es)" in done.stdout
