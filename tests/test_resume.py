"""Resume under every backend: 10 steps straight == 5 steps + save_state + new process + load_state + 5.

tests/workers/resume_worker.py runs each phase in one launch for several backends (2 processes
under torchrun: DDP, ZeRO-1, ZeRO-2, ZeRO-2 with CPU offload, ZeRO-3, FSDP2 through Accelerate;
plain python for a single process). The straight run saves at the end of step 5 and after the first micro-batch of step 5;
a new process loads each and trains on. Compared here: the freeze decision of every step, the
observer log (no decision announced for a step not trained), scores, and the fp32 weights.
The straight launch also writes every rank's gathered SlimFit report next to what DeepSpeed
holds on that rank, so the report's per-rank labels and ZeRO partition sizes are checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WORKERS

pytestmark = pytest.mark.slow

# fsdp2 before the DeepSpeed runs: a process that has run DeepSpeed builds no CPU Accelerator.
DISTRIBUTED = ["ddp", "fsdp2", "zero1", "zero2", "zero2_offload", "zero3"]
SAVE_AT, STEPS = 5, 10


def launch(phase: str, out: Path, backends: list[str], processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    worker = [str(WORKERS / "resume_worker.py"), phase, str(out), *backends]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *worker]
    else:
        command = [sys.executable, *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{phase} {backends} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    for backends, processes in ((["single"], 1), (DISTRIBUTED, 2)):
        for phase in ("straight", "resume"):  # each phase a new process
            launch(phase, out, backends, processes)
    return out


def load(folder: Path, name: str) -> tuple[dict, dict]:
    return json.loads((folder / f"{name}.json").read_text()), torch.load(folder / f"{name}.pt")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def decided_steps(events: list) -> list[int]:
    return [e[1] for e in events if e[0] == "decision"]


@pytest.mark.parametrize("backend", ["single", *DISTRIBUTED])
def test_resumed_run_matches_the_uninterrupted_one(runs, backend):
    straight, straight_state = load(runs / backend, "straight")
    resumed, resumed_state = load(runs / backend, "resumed")
    assert straight["world"] == (1 if backend == "single" else 2)
    assert ("DEEPSPEED" in straight["distributed_type"]) == backend.startswith("zero")
    assert ("FSDP" in straight["distributed_type"]) == (backend == "fsdp2")

    # Same freeze decision at every step, and the sequence really changes over steps.
    assert resumed["decisions"] == [d for d in straight["decisions"] if d[0] >= SAVE_AT]
    assert len({tuple(units) for _, units in straight["decisions"]}) > 1
    # Observers hear of each trained step once, in order, and of no other (attach announces nothing).
    assert decided_steps(straight["events"]) == list(range(STEPS))
    assert decided_steps(resumed["events"]) == list(range(SAVE_AT, STEPS))
    assert resumed["events"][0] == ["decision", SAVE_AT, straight["events"][2 * SAVE_AT][2]]
    assert resumed["controller_step"] == STEPS

    assert torch.equal(resumed_state["scores"], straight_state["scores"])
    diff = max_abs_diff(resumed_state["weights"], straight_state["weights"])
    assert diff <= 1e-6, f"{backend}: weights differ by {diff:.3g} after resuming"
    if backend == "fsdp2":
        assert diff == 0.0, f"fsdp2: weights differ by {diff:.3g} after resuming"


@pytest.mark.parametrize("backend", ["single", "ddp", "zero2", "zero3", "fsdp2"])
def test_state_saved_mid_accumulation_resumes_the_same_step(runs, backend):
    """Accelerate restores the accumulation position and RNG, not the gradients of micro-batches
    already run, so weights cannot match; the step saved in continues with its own decision, the
    save itself works under ZeRO with units frozen, and observers hear of that step once."""
    straight, _ = load(runs / backend, "straight")
    mid, mid_state = load(runs / backend, "resumed_mid")
    assert [step for step, _ in mid["decisions"]] == list(range(SAVE_AT, STEPS))
    assert mid["decisions"][0] == straight["decisions"][SAVE_AT]
    assert decided_steps(mid["events"]) == list(range(SAVE_AT, STEPS))
    # Saved while units were frozen and loaded while others were: DeepSpeed recorded none of
    # them as frozen, and the units frozen during the load are frozen after it.
    assert mid["saved_frozen"] == [] and mid["still_frozen_after_load"]
    assert all(torch.isfinite(w).all() for w in mid_state["weights"].values())


def rank_reports(runs: Path, backend: str) -> list[dict]:
    return [json.loads((runs / backend / f"report_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("backend", DISTRIBUTED)
def test_report_is_labelled_per_rank_and_matches_deepspeed_partitions(runs, backend):
    """The same straight launch writes every rank's gathered report and what DeepSpeed holds."""
    ranks = rank_reports(runs, backend)
    stage = {"ddp": None, "fsdp2": None, "zero1": 1, "zero2": 2, "zero2_offload": 2, "zero3": 3}[backend]
    for rank, data in enumerate(ranks):
        memory, held = data["report"]["memory"], data["deepspeed"]
        assert memory["scope"] == {"rank": rank, "world_size": 2, "zero_stage": stage, "fsdp2": backend == "fsdp2"}
        assert f"per rank (rank {rank} of 2)" in data["rendered"] and "sum of 2 ranks" in data["rendered"]
        for category in ("params", "grads", "optimizer", "activations"):
            assert memory["all_ranks"][category] == sum(r["report"]["memory"]["last"][category] for r in ranks)
        if stage is None:
            continue
        assert f"ZeRO-{stage}:" in data["rendered"]
        # Parameters: this rank's ZeRO-3 partition, else the whole model, as DeepSpeed holds them.
        assert memory["last"]["params"] == held["param_bytes"]
        # Optimizer: DeepSpeed's fp32 master partition plus Adam moments, and step counters.
        extra = memory["last"]["optimizer"] - (4 * held["master_numel"] + held["moment_bytes"])
        assert held["moment_bytes"] == 8 * held["master_numel"]
        assert 0 <= extra <= 4 * 64, extra
    # The partitions cover the model once (plus DeepSpeed's alignment padding).
    held = [r["deepspeed"] for r in ranks]
    if stage is not None:
        assert sum(h["master_numel"] for h in held) == held[0]["model_numel"] + sum(h["padding"] for h in held)
        params = [r["report"]["memory"]["last"]["params"] for r in ranks]
        partitioned = held[0]["model_numel"] + sum(h["padding"] for h in held)  # ZeRO-3 pads each parameter
        assert sum(params) == (4 * partitioned if stage == 3 else 2 * 4 * held[0]["model_numel"])
