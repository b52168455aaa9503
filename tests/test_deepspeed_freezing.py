"""Freeze-true stepping under DeepSpeed ZeRO-1/2/3 (with and without CPU offload).

Each case launches tests/workers/zero_freeze_worker.py with ``torchrun --nproc_per_node 2`` on
CPU (DS_ACCELERATOR=cpu, gloo): a real engine built with everything trainable, a changing frozen
set every step, each rank on its own data. The worker writes what it measured as JSON; the
assertions live here. The first run JIT-builds DeepSpeed's CPU ops (FusedAdam, CPUAdam, shm
comm) into ~/.cache/torch_extensions, which takes a few minutes once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "zero_freeze_worker.py"
REPO = Path(__file__).resolve().parents[1]
STEPS = 4

pytest.importorskip("deepspeed")


def run_worker(tmp_path: Path, config: str, *extra: str) -> dict:
    out = tmp_path / f"{config}.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), config, str(out), *extra]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, basic_optimizer",
    [
        ("z1_torch_adamw", "AdamW"),
        ("z2_fused_adamw", "FusedAdam"),
        ("z3_torch_adamw", "AdamW"),
        ("z2_offload_cpuadam", "DeepSpeedCPUAdam"),
        ("z3_offload_cpuadam", "DeepSpeedCPUAdam"),
        ("z2_sgd_momentum", "SGD"),
        ("z2_bf16_torch_adamw", "AdamW"),
    ],
)
def test_frozen_parameters_and_state_do_not_move(tmp_path, config, basic_optimizer):
    report = run_worker(tmp_path, config)
    assert report["basic_optimizer"] == basic_optimizer
    assert len(report["steps"]) == STEPS
    for step in report["steps"]:
        where = f"step {step['step']}"
        assert step["frozen"], where
        assert step["frozen_moved"] == [], f"{where}: frozen weights moved"
        assert step["state_moved"] == [], f"{where}: frozen optimizer state moved"
        assert step["trainable_unchanged"] == [], f"{where}: trainable parameters did not move"
        # Same update as a per-tensor torch optimizer that skips frozen tensors (incl. clipping
        # by the norm of the trainable gradients only, and per-tensor Adam step counts).
        assert step["ref_mismatch"] == {}, f"{where}: differs from the torch reference"
        for name, view in step["views"].items():
            assert view["numel"] == view["ref_numel"], f"{where} {name}: views cover the parameter once"
            if report["bf16"]:
                continue  # a bf16 forward is no match for the fp32 reference
            assert math.isclose(view["weight_sq"], view["ref_weight_sq"], rel_tol=1e-4), f"{where} {name}"
            if view["grad_sq"] is not None:
                # Before-step gradients are averaged over ranks; DeepSpeed may already have
                # clipped the group being stepped.
                ref, clipped = view["ref_grad_sq"], view["ref_grad_sq"] * step["clip_coef"] ** 2
                assert math.isclose(view["grad_sq"], ref, rel_tol=1e-3) or math.isclose(
                    view["grad_sq"], clipped, rel_tol=1e-3), f"{where} {name}: grad view"
    assert report["after_step_calls"] == STEPS
    assert report["counts"] == report["expected_counts"]
    assert report["resumed_counts_match"]
    assert report["removed_cleanly"]


@pytest.mark.slow
def test_without_backend_frozen_weights_move_and_stage0_is_refused(tmp_path):
    """The failure the backend fixes: ZeRO steps frozen slices with zero gradients, so AdamW
    weight decay and momentum move them. (The same launch checks that a stage-0 engine is
    refused with an IntegrationError, to save a two-process start.)"""
    report = run_worker(tmp_path, "z2_torch_adamw", "--no-backend")
    moved = [name for step in report["steps"] for name in step["frozen_moved"]]
    assert moved, "expected frozen weights to move without the backend"
    assert report["stage0_refusal"] and "ZeRO stage 1, 2 or 3" in report["stage0_refusal"]
