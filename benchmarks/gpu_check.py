"""The GPU check: measured CUDA memory and tokens/s of the fine-tuning arms beside the estimate's
prediction, for SmolLM2-135M's and the 536M Llama's geometry in bf16 (random init, 8 x 512).

Run it whenever a GPU is lent (``benchmarks/gpu_check.sh``; at most 8 minutes on one H100);
no test needs a GPU: ``--dry-run`` runs the same path on CPU with tiny geometries, one step per
arm, and is what ``tests/test_gpu_check.py`` runs.

Per geometry:

1. measured: ``benchmarks/memory.py --device cuda --precision bf16`` for the arms ``full``,
   ``full_checkpointing``, ``lora``, ``slimfit_default``, ``slimfit_best``: the CUDA allocator
   peak (``torch.cuda.max_memory_allocated``, reset at each step), the meter's exact total,
   and tokens/s (batch x length / mean measured step time; the meter runs every step);
2. predicted: ``slimfit_accel.estimate`` (the same arms' steps on fake tensors, no GPU) for the
   model's config.json: the device total (meter total + working set) and the meter total.

Timing (H100, sized from the arms' step times: well under a second per step at 8 x 512):
2 warm-up + 4 measured steps per arm, 5 arms, 2 geometries; most of the time goes to building
the models (random init on the host) and the estimates on CPU. Each geometry runs under its own
time limit (``--geometry-limit-s``, 210 s by default) so one slow arm cannot eat the other's.

Output: one JSON (``--out``, a folder: ``gpu_check.json`` in it) with, per geometry and arm,
``measured`` and ``predicted`` side by side, ``complete`` false until every geometry ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

ARMS = ["full", "full_checkpointing", "lora", "slimfit_default", "slimfit_best"]
MODELS = ROOT / "slimfit_accel" / "configs" / "models"
#: name -> (config.json folder for the estimate, the same geometry as benchmarks/memory.py flags)
GEOMETRIES: dict[str, dict[str, Any]] = {
    "smollm2": {"config_dir": MODELS / "smollm2-135m", "hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3,
                "intermediate": 1536, "vocab": 49152, "tied": True, "batch": 8, "seq_len": 512},
    "llama_536m": {"config_dir": MODELS / "bench-llama-536m", "hidden": 2048, "layers": 8, "heads": 16, "kv_heads": 16,
                   "intermediate": 5504, "vocab": 32000, "tied": False, "batch": 8, "seq_len": 512},
}
#: --dry-run: the same two shapes of model (GQA + tied head; plain MHA + untied), tiny
DRY_GEOMETRIES: dict[str, dict[str, Any]] = {
    "smollm2": {"hidden": 48, "layers": 2, "heads": 3, "kv_heads": 1, "intermediate": 96, "vocab": 256, "tied": True,
                "batch": 2, "seq_len": 16},
    "llama_536m": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 320,
                   "tied": False, "batch": 2, "seq_len": 16},
}


def memory_args(geometry: dict[str, Any], arms: list[str], device: str, warmup: int, steps: int, out: Path) -> list[str]:
    """``benchmarks/memory.py`` arguments for this geometry."""
    args = ["--model", "llama", "--hidden", str(geometry["hidden"]), "--layers", str(geometry["layers"]),
            "--heads", str(geometry["heads"]), "--kv-heads", str(geometry["kv_heads"]),
            "--intermediate", str(geometry["intermediate"]), "--vocab", str(geometry["vocab"]),
            "--seq-len", str(geometry["seq_len"]), "--batch", str(geometry["batch"]), "--precision", "bf16",
            "--device", device, "--warmup", str(warmup), "--steps", str(steps), "--arms", *arms, "--json", str(out)]
    return args + (["--tie-embeddings"] if geometry["tied"] else [])


def write_model_config(geometry: dict[str, Any], folder: Path) -> Path:
    """A config.json of the geometry, for the estimate (dry run: the tiny geometries have none)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": geometry["hidden"],
              "num_hidden_layers": geometry["layers"], "num_attention_heads": geometry["heads"],
              "num_key_value_heads": geometry["kv_heads"], "intermediate_size": geometry["intermediate"],
              "vocab_size": geometry["vocab"], "max_position_embeddings": max(512, geometry["seq_len"]),
              "tie_word_embeddings": geometry["tied"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def predict(config_dir: Path, geometry: dict[str, Any], arms: list[str], device: str) -> dict[str, Any]:
    """The estimate's prediction per arm, or why there is none."""
    try:
        from slimfit_accel import estimate as planner
    except ImportError as err:  # hook: the estimate is not in this checkout
        return {"available": False, "why": f"slimfit_accel.estimate not importable: {err}"}
    setup = planner.Setup(config_dir, seq_len=geometry["seq_len"], batch=geometry["batch"], precision="bf16",
                          task="causal-lm", device=device).load()
    started = time.perf_counter()
    results = planner.estimate(setup, arms=arms)
    by_arm = {r.name: {"device_total_bytes": r.device_total, "meter_total_bytes": r.meter_total,
                       "working_set_bytes": r.working_set, "activations_stored_bytes": r.activations_stored,
                       "note": r.note} for r in results}
    return {"available": True, "seconds": time.perf_counter() - started, "arms": by_arm}


def measure(geometry: dict[str, Any], arms: list[str], device: str, warmup: int, steps: int, out: Path) -> dict[str, Any]:
    """Run ``benchmarks/memory.py`` in this process; its JSON per arm (kept even if an arm failed)."""
    import memory as memory_benchmark

    started = time.perf_counter()
    error = None
    try:
        memory_benchmark.main(memory_args(geometry, arms, device, warmup, steps, out))
    except BaseException as err:  # noqa: BLE001 (an OOM or a bug in one arm: keep the others)
        error = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    document = json.loads(out.read_text()) if out.is_file() else {"arms": []}
    tokens = geometry["batch"] * geometry["seq_len"]
    by_arm = {}
    for arm in document["arms"]:
        by_arm[arm["name"]] = {
            "cuda_max_memory_allocated_bytes": arm["peak_cuda_bytes"],
            "meter_total_bytes": arm["bytes"]["total"],
            "steady_total_bytes": arm["steady_state"]["total_bytes"],
            "step_time_s": arm["step_time_s"],
            "tokens_per_s": tokens / arm["step_time_s"] if arm["step_time_s"] else None,
        }
    return {"seconds": time.perf_counter() - started, "error": error or document.get("failed"), "arms": by_arm}


def side_by_side(measured: dict[str, Any], predicted: dict[str, Any], arms: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in arms:
        m = measured["arms"].get(name)
        p = predicted.get("arms", {}).get(name) if predicted.get("available") else None
        row = {"arm": name, "measured": m, "predicted": p}
        if m and p and m["cuda_max_memory_allocated_bytes"]:
            row["predicted_over_measured_cuda_peak"] = p["device_total_bytes"] / m["cuda_max_memory_allocated_bytes"]
        if m and p and m["steady_total_bytes"]:  # the meter's figures: equal when the estimate is exact
            row["predicted_over_measured_meter_total"] = p["meter_total_bytes"] / m["steady_total_bytes"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny geometries, one step per arm (what the tests run)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: $OUT or benchmarks/results/gpu)")
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps per arm (default 2; dry run 0)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 4; dry run 1)")
    parser.add_argument("--geometry-limit-s", type=float, default=210.0,
                        help="skip a geometry's remaining work once this much time has gone on it")
    args = parser.parse_args(argv)

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run (CPU, tiny) or on a GPU machine", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (0 if dry else 2)
    steps = args.steps if args.steps is not None else (1 if dry else 4)
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "gpu_check.json"
    document: dict[str, Any] = {
        "dry_run": dry, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "precision": "bf16 autocast (fp32 weights and AdamW; LoRA with a bf16 base, slimfit_best with fp32 masters on host, as benchmarks/memory.py)",
        "warmup_steps": warmup, "measured_steps": steps, "arms": args.arms, "torch": torch.__version__,
        "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False, "geometries": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.geometries:
            geometry = dict(DRY_GEOMETRIES[name] if dry else GEOMETRIES[name])
            config_dir = write_model_config(geometry, Path(scratch) / name) if dry else geometry.pop("config_dir")
            print(f"== {name}: batch {geometry['batch']} x {geometry['seq_len']}, arms {' '.join(args.arms)}", flush=True)
            begun = time.perf_counter()
            measured = measure(geometry, args.arms, device, warmup, steps, out_dir / f"memory_{name}.json")
            if time.perf_counter() - begun < args.geometry_limit_s:
                try:
                    predicted = predict(config_dir, geometry, args.arms, device)
                except Exception as err:  # noqa: BLE001 (the measurement stands without it)
                    predicted = {"available": False, "why": f"{type(err).__name__}: {err}"}
            else:
                predicted = {"available": False, "why": f"skipped: the geometry's {args.geometry_limit_s:.0f} s were spent measuring"}
            document["geometries"][name] = {
                "geometry": {k: v for k, v in geometry.items()}, "config_dir": str(config_dir),
                "measured_error": measured["error"], "measure_s": measured["seconds"],
                "estimate_s": predicted.get("seconds"), "estimate_available": predicted.get("available", False),
                "estimate_note": predicted.get("why"), "arms": side_by_side(measured, predicted, args.arms),
            }
            out.write_text(json.dumps(document, indent=2, default=str))
            for row in document["geometries"][name]["arms"]:
                m, p = row["measured"], row["predicted"]
                peak = m["cuda_max_memory_allocated_bytes"] if m else None
                print(f"  {row['arm']:20s} measured CUDA peak {peak / 2**30 if peak else float('nan'):.2f} GiB, "
                      f"meter {m['meter_total_bytes'] / 2**30 if m else float('nan'):.2f} GiB, "
                      f"{m['tokens_per_s'] if m and m['tokens_per_s'] else float('nan'):.0f} tokens/s; "
                      f"predicted {p['device_total_bytes'] / 2**30 if p else float('nan'):.2f} GiB", flush=True)
    document["complete"] = all(not g["measured_error"] for g in document["geometries"].values())
    document["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"wrote {out} ({document['seconds']:.0f} s)")
    return 0 if document["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
