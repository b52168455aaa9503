"""Two real processes (torchrun, gloo, Accelerator(cpu=True)): freezing under DDP, rank agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow


def torchrun(tmp_path: Path, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "ddp_freeze_worker.py"), "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_ddp_frozen_units_do_not_move(tmp_path, optimizer):
    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "units": {"always_train": ["classifier.*"]}}
    ranks = torchrun(tmp_path, "--optimizer", optimizer, "--config", json.dumps(config))
    for rank in ranks:
        assert rank["world"] == 2
        assert len(rank["steps"]) == 5
        for step in rank["steps"]:
            assert step["n_frozen_params"] > 0
            assert step["frozen_unchanged"] and step["frozen_grads_none"]
            assert step["trained_moved"] >= step["n_trained_params"] - 1
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


@pytest.mark.parametrize(
    "scheduler",
    [{"name": "ils", "freeze_ratio": 0.7}, {"name": "random_layers", "n_blocks": 1, "interval": 2}],
    ids=["ils", "random_layers"],
)
def test_ranks_train_the_same_units_when_local_scores_differ(tmp_path, scheduler):
    config = {"scorer": {"name": "rank_noise"}, "scheduler": scheduler}
    ranks = torchrun(tmp_path, "--config", json.dumps(config), "--steps", "8", "--accum", "1")
    sets = [[s["trainable"] for s in r["steps"]] for r in ranks]
    assert sets[0] == sets[1]
    assert len({tuple(s) for s in sets[0]}) > 1  # the decision really changed over steps
