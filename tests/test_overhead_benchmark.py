"""benchmarks/overhead.py attributes SlimFit's own time to the right sections (tiny model, one
round, in a subprocess: the benchmark wraps library classes with timers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_sections_per_arm(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--geometry", "tiny", "--rounds", "1",
                           "--warmup", "0", "--threads", "1", "--clock", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    arms = json.loads(out.read_text())["arms"]
    sections = {name: {k for k, v in arm["sections_s"].items() if v["median"] > 0} for name, arm in arms.items()}
    assert sections["full"] == set() and arms["full"]["own_s"]["median"] == 0
    assert {"freeze_decision", "scorer", "compression", "paging"} <= sections["slimfit_meter_off"]
    assert "meter" not in sections["slimfit_meter_off"] and "meter" in sections["slimfit_meter_on"]
    # the default checkpoints its first blocks: their recomputation is timed apart, not as SlimFit's own
    assert "recompute" in sections["slimfit_meter_off"] and "recompute" not in sections["machinery_only"]
    default = arms["slimfit_meter_off"]
    assert default["own_and_recompute_share_of_full_step"] > default["own_share_of_full_step"]
    assert "compression" not in sections["machinery_only"] and "paging" not in sections["machinery_only"]
    # compression none: no compression section; with the meter on, its counting engine is the meter's
    assert "compression" not in sections["slimfit_nocompression_meter_off"] | sections["slimfit_nocompression_meter_on"]
    assert "meter" in sections["slimfit_nocompression_meter_on"] and "meter" not in sections["slimfit_nocompression_meter_off"]
    assert "paging" in sections["slimfit_nocompression_meter_off"]
    # the optimizer's own update is timed apart and never counted as SlimFit's
    assert "optimizer_update" in sections["slimfit_meter_off"]
    for arm in arms.values():
        assert 0 <= arm["own_s"]["median"] <= arm["step_s"]["median"]
        assert arm["minor_faults"]["median"] >= 0  # fresh memory the step touched (page faults)
