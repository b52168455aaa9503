"""``benchmarks/memory.py`` runs end to end on a tiny geometry, and its steady-state figures hold.

The benchmark is where the memory claims live; this keeps it runnable with the current defaults
(the real geometry takes an hour on CPU and is run by hand, see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
TINY = ["--layers", "2", "--hidden", "64", "--heads", "2", "--intermediate", "128", "--vocab", "512",
        "--seq-len", "32", "--batch", "4", "--warmup", "2", "--steps", "1"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "memory.json"
    assert load_benchmark().main([*TINY, *extra, "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["complete"] is True
    return {arm["name"]: arm for arm in document["arms"]}


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_memory_benchmark_default_config_saves_at_steady_state(tmp_path, model):
    arms = run_benchmark(tmp_path, "--model", model, "--arms", "full", "full_checkpointing", "slimfit_default", "slimfit_best")
    full = arms["full"]["steady_state"]["total_bytes"]
    for name in ("slimfit_default", "slimfit_best"):
        steady = arms[name]["steady_state"]
        assert steady["total_bytes"] < full, name
        # primed to the steady state and paged: AdamW state for every parameter, all on host
        # after the step (on the device only while the step streams it)
        assert steady["optimizer_host_bytes"] == arms["full"]["steady_state"]["optimizer_device_bytes"], name
    # The default config's ILS budget bounds one step's resident optimizer state: AdamW's two
    # moments for at most 20% of the schedulable parameters, plus the always-trained ones.
    assert arms["slimfit_default"]["steady_state"]["optimizer_device_bytes"] < 0.5 * arms["full"]["steady_state"]["optimizer_device_bytes"]
    assert arms["slimfit_best"]["steady_state"]["total_bytes"] < arms["full_checkpointing"]["steady_state"]["total_bytes"]


def test_bf16_arms_of_issue_17_run_and_int8_frozen_weights_hold_the_least(tmp_path):
    """``--precision bf16`` runs every arm a bf16 user compares (its default list), on a tiny Llama
    with a tied vocabulary: pure bf16 weights are half of Accelerate's fp32 ones, and frozen
    weights in int8 hold fewer weight bytes and less in total than slimfit_best."""
    bench = load_benchmark()
    assert bench.BF16_ARMS == ["full_amp", "full_bf16", "full_checkpointing", "lora", "badam", "slimfit_default",
                               "slimfit_best", "slimfit_int8"]
    arms = run_benchmark(tmp_path, "--model", "llama", "--precision", "bf16", "--tie-embeddings", "--freeze-ratio", "0.8")
    assert list(arms) == bench.BF16_ARMS
    assert arms["full_bf16"]["bytes"]["params"] * 2 == arms["full_amp"]["bytes"]["params"]
    int8, best = arms["slimfit_int8"], arms["slimfit_best"]
    assert int8["bytes"]["params"] < 0.8 * best["bytes"]["params"]
    assert int8["steady_state"]["total_bytes"] < best["steady_state"]["total_bytes"]
    assert min(a["steady_state"]["total_bytes"] for a in arms.values()) == int8["steady_state"]["total_bytes"]


def test_bf16_only_arms_are_refused_in_fp32_with_one_line(capsys):
    with pytest.raises(SystemExit):
        load_benchmark().main([*TINY, "--arms", "full_bf16"])
    assert "add --precision bf16" in capsys.readouterr().err


def test_missing_packages_stop_the_run_before_the_first_arm_with_one_line(tmp_path, capsys, monkeypatch):
    """As a newcomer without the bench extra: refused at once, not after the arms before BAdam."""
    module = load_benchmark()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("badam", "galore_torch") else find_spec(name, *a))
    out = tmp_path / "memory.json"
    assert module.main([*TINY, "--arms", "full", "badam", "lisa", "galore", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "error: arms badam, galore need packages badam, galore-torch: pip install 'slimfit-accel[bench]' (or leave those arms out with --arms)"
    ]
    assert "arm full" not in captured.out and not out.exists()


def test_missing_packages_names_each_arms_packages_and_extra():
    module = load_benchmark()
    assert module.missing_packages(["full", "lora", "badam"], installed=lambda name: True) is None
    assert module.missing_packages(["full", "lora", "badam"], installed=lambda name: name != "peft") == (
        "arm lora needs package peft: pip install 'slimfit-accel[bench]'")
    every = module.missing_packages(["full", "lora"], installed=lambda name: name not in ("transformers", "peft"))
    assert every == "arms full, lora need packages transformers, peft: pip install 'slimfit-accel[bench,recipes]'"


def test_the_extras_named_hold_the_packages():
    import tomllib

    extras = tomllib.loads((BENCHMARK.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (distribution, extra) in load_benchmark().PACKAGES.items():
        names = {re.split(r"[<>=!~;\[ ]", requirement)[0].lower() for requirement in extras[extra]}
        assert distribution in names, (module, extra)


def test_results_are_written_after_every_arm_and_kept_when_an_arm_fails(tmp_path, monkeypatch):
    module = load_benchmark()
    seen_at_second_arm = []
    run_arm = module.run_arm

    def spy(name, *args):
        if name == "full_checkpointing":
            seen_at_second_arm.append(json.loads(out.read_text()))
        return run_arm(name, *args)

    def crash(args, device):
        raise ModuleNotFoundError("No module named 'badam'")

    monkeypatch.setattr(module, "run_arm", spy)
    monkeypatch.setitem(module.ARM_BUILDERS, "lisa", crash)
    out = tmp_path / "memory.json"
    with pytest.raises(ModuleNotFoundError):
        module.main([*TINY, "--arms", "full", "full_checkpointing", "lisa", "--json", str(out)])
    [after_first] = seen_at_second_arm
    assert after_first["complete"] is False and [a["name"] for a in after_first["arms"]] == ["full"]
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and [a["name"] for a in kept["arms"]] == ["full", "full_checkpointing"]
    assert kept["failed"] == {"arm": "lisa", "batch": 4, "error": "ModuleNotFoundError: No module named 'badam'"}
