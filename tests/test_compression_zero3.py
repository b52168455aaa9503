"""The compression swaps under DeepSpeed ZeRO-3, 2 processes: decided by behaviour, exact.

SlimFit attaches after ``accelerator.prepare``, when ZeRO-3 has emptied every weight. The swaps
must still be decided by what each module computes (a Gemma RMSNorm, ``(1 + w) * x_hat``, and a
``FakeRMSNorm`` are not RMSNorms), and the model must compute the same with SlimFit attached.
One launch of tests/workers/zero3_swaps_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3_swaps") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / "zero3_swaps_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and out.exists(), f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    found = json.loads(out.read_text())
    assert "error" not in found, found.get("traceback")
    assert found["world"] == 2
    return found


def test_norms_that_are_not_plain_rmsnorms_are_not_swapped_on_empty_partitions(result):
    assert "GemmaRMSNorm" not in result["swapped"] and "FakeRMSNorm" not in result["swapped"]
    assert result["swapped"] == ["GemmaMLP"] == result["exact_swapped"]  # probed on a copy: no weights needed


def test_the_model_computes_the_same_with_slimfit_attached(result):
    assert result["slimfit_logits_diff"] <= 1e-5 * result["logits_scale"]
    assert result["exact_logits_diff"] <= 1e-5 * result["logits_scale"]


def test_swapped_gradients_equal_the_plain_ones_under_zero3(result):
    assert result["grad_diff"] and max(result["grad_diff"].values()) <= 1e-4, result["grad_diff"]
