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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_resume_like_one_node(tmp_path):
    """Two torchrun agents on this machine play two nodes (LOCAL_RANK 0 on both, RANK 0 and 1,
    one shared checkpoint folder): DDP and ZeRO-2 train, save, resume in new processes and
    match the uninterrupted run, so nothing mistakes a local rank for a global one."""
    from test_resume import SAVE_AT, STEPS, decided_steps, load, max_abs_diff

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    for phase in ("straight", "resume"):
        port = str(free_port())
        nodes = [
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                 str(WORKERS / "resume_worker.py"), phase, str(tmp_path), "ddp", "zero2"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for node in range(2)
        ]
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
        assert all(node.returncode == 0 for node in nodes), "\n".join(o[-4000:] for o in outputs)
    for backend in ("ddp", "zero2"):
        straight, straight_state = load(tmp_path / backend, "straight")
        resumed, resumed_state = load(tmp_path / backend, "resumed")
        assert straight["world"] == 2
        assert resumed["decisions"] == [d for d in straight["decisions"] if d[0] >= SAVE_AT]
        assert decided_steps(resumed["events"]) == list(range(SAVE_AT, STEPS))
        assert max_abs_diff(resumed_state["weights"], straight_state["weights"]) <= 1e-6
        ranks = [json.loads((tmp_path / backend / f"report_rank{r}.json").read_text()) for r in range(2)]
        assert [r["report"]["memory"]["scope"]["rank"] for r in ranks] == [0, 1]
