"""Under DeepSpeed ZeRO-2 and ZeRO-3: ``grad_norm`` scores on one scale across param groups
and ZeRO-3 sub-groups (fp16 loss scaling, bf16, clipping, with and without offload), and
``lr_scale`` restored when an update raises.

All cases run in one 2-process launch of tests/workers/zero_step_scale_worker.py (see its
docstring). ZeRO unscales and clips each param group's (ZeRO-3: sub-group's) gradient just
before stepping it, after the scorer has read every group: the split into groups must not change
the scores, and under ZeRO-3 the scorer must see, bit for bit, the gradient DeepSpeed steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow

Z3_CASES = ["fp16_z3_one_group", "fp16_z3_two_groups", "fp16_z3_two_groups_offload", "fp16_z3_sub_groups",
            "bf16_z3_one_group", "bf16_z3_two_groups"]
CASES = ["fp16_one_group", "fp16_two_groups", "fp16_two_groups_offload", *Z3_CASES, "lr_raise_once"]
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


@pytest.mark.parametrize("reference_case, case", [
    ("fp16_one_group", "fp16_two_groups"),
    ("fp16_one_group", "fp16_two_groups_offload"),
    ("fp16_z3_one_group", "fp16_z3_two_groups"),
    ("fp16_z3_one_group", "fp16_z3_two_groups_offload"),
    ("fp16_z3_one_group", "fp16_z3_sub_groups"),
    ("bf16_z3_one_group", "bf16_z3_two_groups"),
])
def test_grad_norm_scores_do_not_depend_on_param_groups(results, reference_case, case):
    reference, split = results[reference_case], results[case]
    if case.startswith("fp16"):
        assert reference["loss_scale"] > 1.0  # loss scaling was on
    assert all(norm > reference["clip"] for norm in reference["grad_norms"]), reference["grad_norms"]  # clipping acted
    assert split["steps"] == reference["steps"] == STEPS
    assert len(split["scores"]) == len(reference["scores"]) == STEPS
    for step, (want, got) in enumerate(zip(reference["scores"], split["scores"])):
        assert got.keys() == want.keys(), f"step {step}: other units trained"
        for name, score in want.items():
            assert got[name] == pytest.approx(score, rel=1e-3), f"step {step}, {name}: {got[name]} vs {score}"


@pytest.mark.parametrize("case", Z3_CASES)
def test_zero3_scorers_see_the_gradient_deepspeed_steps(results, case):
    result = results[case]
    if case.endswith("sub_groups"):
        assert result["sub_groups"] > 1, result["sub_groups"]
    assert result["compared"] > 0
    # (micro-step, unit, norm the scorer saw / norm DeepSpeed stepped) for each unit that differs
    assert result["differ"] == [], result["differ"][:10]


def test_lr_scale_is_restored_when_the_zero_update_raises(results):
    result = results["lr_raise_once"]
    assert result["raised"] and result["caught"] == 1
    assert result["steps"] == STEPS  # the failed step is not counted
    assert result["seen"] and all(lrs == [pytest.approx(3 * LR)] for lrs in result["seen"]), result["seen"]
    assert all(lrs == [LR] for lrs in result["lr_after"]), result["lr_after"]
