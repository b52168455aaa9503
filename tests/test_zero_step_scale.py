"""Under DeepSpeed ZeRO-2: ``grad_norm`` scores on one scale across param groups (fp16 loss
scaling, clipping, with and without offload), and ``lr_scale`` restored when an update raises.

All cases run in one 2-process launch of tests/workers/zero_step_scale_worker.py (see its
docstring). ZeRO-1/2 unscales and clips each param group's gradient just before stepping that
group, after the scorer has read every group: the split into groups must not change the scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow

CASES = ["fp16_one_group", "fp16_two_groups", "fp16_two_groups_offload", "lr_raise_once"]
STEPS, LR = 5, 3e-3


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero_scale") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / "zero_step_scale_worker.py"), str(out), *CASES]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["fp16_two_groups", "fp16_two_groups_offload"])
def test_grad_norm_scores_do_not_depend_on_param_groups(results, case):
    reference, split = results["fp16_one_group"], results[case]
    assert reference["loss_scale"] > 1.0  # loss scaling was on
    assert split["steps"] == reference["steps"] == STEPS
    assert len(split["scores"]) == len(reference["scores"]) == STEPS
    for step, (want, got) in enumerate(zip(reference["scores"], split["scores"])):
        assert got.keys() == want.keys(), f"step {step}: other units trained"
        for name, score in want.items():
            assert got[name] == pytest.approx(score, rel=1e-3), f"step {step}, {name}: {got[name]} vs {score}"


def test_lr_scale_is_restored_when_the_zero_update_raises(results):
    result = results["lr_raise_once"]
    assert result["raised"] and result["caught"] == 1
    assert result["steps"] == STEPS  # the failed step is not counted
    assert result["seen"] and all(lrs == [pytest.approx(3 * LR)] for lrs in result["seen"]), result["seen"]
    assert all(lrs == [LR] for lrs in result["lr_after"]), result["lr_after"]
