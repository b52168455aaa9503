"""Trainer + DeepSpeed ZeRO-2 + SlimFitCallback (torchrun, 2 CPU processes): same as the Accelerate loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")


def test_trainer_under_deepspeed_matches_the_accelerate_loop_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "trainer_deepspeed_worker.py"), "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)):
        assert rank["world"] == 2
        assert rank["trainer"] == rank["reference"]
        assert len({tuple(d) for d in rank["trainer"]}) > 1
        assert rank["resumed"] == rank["trainer"][len(rank["trainer"]) // 2:]
        assert rank["trainer_vs_reference"] <= 1e-6 and rank["resumed_vs_trainer"] <= 1e-6
        assert rank["report_steps"] == len(rank["trainer"])
