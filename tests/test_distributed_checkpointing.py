"""Gradient checkpointing with SlimFit under DDP and DeepSpeed ZeRO-3, both reentrant settings.

One 2-process launch of tests/workers/ddp_zero3_checkpointing_worker.py runs the four cases.
Three train with frozen units bit-identical; DDP with reentrant checkpointing cannot work
(``find_unused_parameters=True``, which frozen units need, and a reentrant backward make DDP
mark parameters ready twice) and must fail at ``attach`` with a message naming the combination.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow

CASES = ["ddp_nonreentrant", "ddp_reentrant", "zero3_nonreentrant", "zero3_reentrant"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("checkpointing") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / "ddp_zero3_checkpointing_worker.py"), str(out), *CASES]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["ddp_nonreentrant", "zero3_nonreentrant", "zero3_reentrant"])
def test_trains_with_frozen_units_bit_identical(results, case):
    result = results[case]
    assert "error" not in result, result.get("traceback")
    assert result["world"] == 2 and result["checkpointing"]
    for step in result["steps"]:
        assert step["n_frozen"] > 0 and step["n_trained"] > 0
        assert step["frozen_moved"] == [], "frozen weights or optimizer state moved"
        assert step["trained_still"] == [], "trained weights did not move"


def test_ddp_with_reentrant_checkpointing_fails_at_attach_naming_it(results):
    error = results["ddp_reentrant"].get("error", "")
    assert error.startswith("IntegrationError: gradient checkpointing with use_reentrant=True does not work under DDP")
    assert "'use_reentrant': False" in error
    assert "in attach" in results["ddp_reentrant"]["traceback"]
