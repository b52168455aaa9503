"""FSDP under SlimFit, through Accelerate, with 2 CPU processes (gloo).

One launch of tests/workers/fsdp2_worker.py (see there) trains the same SlimFit setup under DDP
and under FSDP2, an FSDP2 bf16 run with whole blocks as units, and tries FSDP1. Checked here:
FSDP2 freezes for real (frozen weights and optimizer state bit-identical, gathered from the
shards), the ranks agree, the run equals DDP's (decisions, saved-activation bytes under
compression, weights), the memory report counts shards and says so, optimizer paging is a
warned no-op, and FSDP1 is refused with one line. Resume under FSDP2 is in test_resume.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import WORKERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / "fsdp2_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("run", ["fsdp2", "bf16_blocks"])
def test_fsdp2_freezes_for_real_and_ranks_agree(ranks, run):
    for rank, data in enumerate(ranks):
        result = data[run]
        assert result["backend"] == "FSDP2StepBackend" and result["param_types"] == ["DTensor"], rank
        assert len(result["steps"]) == 4
        for index, step in enumerate(result["steps"]):
            where = f"{run} rank {rank} step {index}"
            assert step["frozen_unchanged"], f"{where}: frozen weights or optimizer state moved"
            assert step["trained_all_moved"], f"{where}: a trained parameter did not move"
            assert step["frozen_grads_none"], where
            assert step["decisions_of_ranks"][0] == step["decisions_of_ranks"][1] == step["trainable"], where
        assert len({tuple(s["trainable"]) for s in result["steps"]}) > 1, "the frozen set never changed"


def test_fsdp2_trains_exactly_as_ddp_with_compression(ranks):
    """Same decisions, same saved-activation bytes (raw and compressed: no FSDP2 parameter is
    compressed as an activation) and the same weights as DDP on the same data."""
    ddp, fsdp2 = ranks[0]["ddp"], ranks[0]["fsdp2"]
    assert [s["trainable"] for s in fsdp2["steps"]] == [s["trainable"] for s in ddp["steps"]]
    for a, b in zip(ddp["steps"], fsdp2["steps"]):
        assert (b["activations"], b["activations_raw"]) == (a["activations"], a["activations_raw"])
        assert b["activations"] < b["activations_raw"]  # compression did run
    for x, y in zip(ddp["scores"], fsdp2["scores"]):
        assert math.isclose(x, y, rel_tol=1e-5), (x, y)
    assert fsdp2["weights"].keys() == ddp["weights"].keys()
    assert fsdp2["weights"] == ddp["weights"], "FSDP2 weights differ from DDP's"


def test_memory_report_counts_this_ranks_shards(ranks):
    for rank, data in enumerate(ranks):
        result = data["fsdp2"]
        memory = result["report"]["memory"]
        assert memory["scope"] == {"rank": rank, "world_size": 2, "zero_stage": None, "fsdp2": True}
        title = " ".join(result["rendered"].split())  # the table title wraps
        assert "FSDP2: parameters, gradients and optimizer state are this rank's shard" in title
        everyone = memory["all_ranks"]
        assert everyone["params"] == 4 * result["model_numel"]  # fp32, the shards cover the model once
        assert memory["last"]["params"] < everyone["params"]
        # Adam's two moments of every parameter with state, plus each rank's 0-d step counters
        assert everyone["optimizer"] == 8 * result["numel_with_state"] + 2 * 4 * result["params_with_state"]
        assert 0 < memory["peak"]["grads"] < memory["last"]["params"]


def test_optimizer_paging_is_a_warned_no_op_under_fsdp2(ranks):
    fsdp2, ddp = ranks[0]["fsdp2"], ranks[0]["ddp"]
    assert ddp["paging"] and not ddp["paging_warning"]
    assert not fsdp2["paging"]
    assert len(fsdp2["paging_warning"]) == 1 and "no effect under FSDP2" in fsdp2["paging_warning"][0]


def test_fsdp1_is_refused_at_attach_with_one_line(ranks):
    for data in ranks:
        refusals = data["fsdp1"]
        assert refusals.keys() == {"accelerate", "by_hand"}
        for message in refusals.values():
            assert "\n" not in message
            assert "FSDP1" in message and "fsdp_version: 2" in message
