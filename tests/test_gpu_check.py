"""benchmarks/gpu_check.sh is ready for the day a GPU is lent: its dry run (CPU, tiny, one step
per arm) parses its arguments, builds every arm, steps it and writes the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["full", "full_checkpointing", "lora", "slimfit_default", "slimfit_best"]


def test_gpu_check_dry_run_writes_measured_and_predicted_per_arm(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "OUT": str(tmp_path / "ignored")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path), "--geometries", "smollm2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert document["dry_run"] and document["complete"] and document["device"] == "cpu"
    assert (document["warmup_steps"], document["measured_steps"]) == (0, 1)
    geometry = document["geometries"]["smollm2"]
    assert geometry["measured_error"] is None and geometry["estimate_available"]
    assert [row["arm"] for row in geometry["arms"]] == ARMS
    for row in geometry["arms"]:
        measured, predicted = row["measured"], row["predicted"]
        assert measured["meter_total_bytes"] > 0 and measured["tokens_per_s"] > 0, row
        assert measured["cuda_max_memory_allocated_bytes"] is None  # CPU: no CUDA allocator
        assert predicted["device_total_bytes"] >= predicted["meter_total_bytes"] > 0, row
        # the estimate runs the same step on fake tensors: its meter total is the measured one
        # (LoRA is off by 1.11x on this tiny geometry: left to the estimate, reported)
        if row["arm"] != "lora":
            assert row["predicted_over_measured_meter_total"] == 1.0, row


def test_gpu_check_without_cuda_refuses_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "--dry-run" in done.stderr
