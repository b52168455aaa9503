"""Accuracy of fine-tuning arms on real data: the packaged MiniLM on Rotten Tomatoes.

Every arm trains on the same snippets (one movie split, fixed by ``--split-seed``); the run seeds
vary the head initialisation and the data order. Each finished run is appended to the results
JSON at once, and a run already there (same setting, arm, seed and arm definition) is skipped, so
the experiment can be completed over several sittings. Run it in the background, one at a time.

    # the acceptance setting: 6000 / 3000 snippets, 3 seeds per arm
    python benchmarks/fidelity.py --setting main --arms full,slimfit_default --seeds 0,1,2
    # the demo's short setting
    python benchmarks/fidelity.py --setting demo --arms full,slimfit_default --seeds 0
    # only print the tables of what is recorded
    python benchmarks/fidelity.py --table

Arms are plain data in ``ARMS``: a SlimFit config (None for full fine-tuning) and training
options. ``slimfit_default`` reads the packaged default config, so it always measures what a
user gets; its record keeps the config it ran with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity.json"

SETTINGS: dict[str, dict[str, int]] = {
    # The acceptance setting: >= 6000 training and 3000 test snippets, 2 epochs.
    "main": {"train_size": 6000, "test_size": 3000, "epochs": 2},
    # The demo's setting (make demo).
    "demo": {"train_size": 2000, "test_size": 1000, "epochs": 2},
}


def default_config() -> dict[str, Any]:
    return yaml.safe_load((resources.files("slimfit_accel") / "configs" / "demo.yaml").read_text())


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with top-level keys replaced (nested dicts merged one level)."""
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# The SlimFit reference's recipe, as closely as our units allow: tensor units, ILS, weight_delta.
REFERENCE = {
    "seed": 0,
    "units": {"granularity": "tensor", "always_train": ["classifier.*"]},
    "scorer": {"name": "weight_delta"},
    "scheduler": {"name": "ils", "freeze_ratio": 0.8},
    "compression": "slimfit",
}


def arms() -> dict[str, dict[str, Any]]:
    """Arm name -> {"slimfit": config dict or None, "lr_scale": float, "warmup_ratio": float}."""
    default = default_config()
    table: dict[str, dict[str, Any]] = {
        "full": {"slimfit": None},
        "slimfit_default": {"slimfit": default},
        "freeze_only": {"slimfit": _with(default, compression="none")},
        "lisa": {"slimfit": {
            "seed": 0, "units": {"granularity": "tensor", "always_train": ["classifier.*"]},
            "scheduler": {"name": "random_layers", "n_blocks": 2, "interval": 20}, "compression": "none",
        }},
        # Ablations around the reference recipe (ILS over tensors, weight_delta, ratio 0.8).
        "ils_ref": {"slimfit": REFERENCE},
        "ils_ref_nocomp": {"slimfit": _with(REFERENCE, compression="none")},
        "ils_ref_lr2": {"slimfit": REFERENCE, "lr_scale": 2.0},
        "ils_ref_lr3": {"slimfit": REFERENCE, "lr_scale": 3.0},
        "ils_ref_lr5": {"slimfit": REFERENCE, "lr_scale": 5.0},
        "ils_ref_warmup": {"slimfit": REFERENCE, "warmup_ratio": 0.1},
        "ils_r0.5": {"slimfit": _with(REFERENCE, scheduler={"freeze_ratio": 0.5})},
        "ils_r0.9": {"slimfit": _with(REFERENCE, scheduler={"freeze_ratio": 0.9})},
        "ils_random_scorer": {"slimfit": _with(REFERENCE, scorer={"name": "random"})},
        "ils_grad_norm": {"slimfit": _with(REFERENCE, scorer={"name": "grad_norm"})},
        "ils_pooler": {"slimfit": _with(REFERENCE, units={"always_train": ["classifier.*", "*pooler*"]})},
        "ils_no_embeddings": {"slimfit": _with(REFERENCE, units={"exclude": ["*word_embeddings*"]})},
        "ils_block": {"slimfit": _with(REFERENCE, units={"granularity": "module"})},
        "full_lr2": {"slimfit": None, "lr_scale": 2.0},
        "default_r0.5": {"slimfit": _with(default, scheduler={"freeze_ratio": 0.5})},
        "default_r0.7": {"slimfit": _with(default, scheduler={"freeze_ratio": 0.7})},
        "default_r0.9": {"slimfit": _with(default, scheduler={"freeze_ratio": 0.9})},
        "default_r0.9_lr5": {"slimfit": _with(default, scheduler={"freeze_ratio": 0.9}, lr_scale=5.0)},
        "default_lr1": {"slimfit": _with(default, lr_scale=1.0)},
        "full_lr3": {"slimfit": None, "lr_scale": 3.0},
        "ils_r0.9_lr3": {"slimfit": _with(REFERENCE, scheduler={"freeze_ratio": 0.9}), "lr_scale": 3.0},
        "ils_r0.9_lr5": {"slimfit": _with(REFERENCE, scheduler={"freeze_ratio": 0.9}), "lr_scale": 5.0},
        "default_norms": {"slimfit": _with(default, units={"always_train": ["head", "norms"]})},
        "default_abs": {"slimfit": _with(default, scorer={"name": "weight_delta", "relative": False})},
        "default_units": {"slimfit": _with(default, scheduler={"budget": "units"})},
        "ils_age1": {"slimfit": _with(REFERENCE, scheduler={"age_exponent": 1.0})},
        "ils_age2": {"slimfit": _with(REFERENCE, scheduler={"age_exponent": 2.0})},
        "ils_age1_lr2": {"slimfit": _with(REFERENCE, scheduler={"age_exponent": 1.0}), "lr_scale": 2.0},
        "ils_age1_lr3": {"slimfit": _with(REFERENCE, scheduler={"age_exponent": 1.0}), "lr_scale": 3.0},
        "ils_age1_r0.9_lr3": {"slimfit": _with(REFERENCE, scheduler={"age_exponent": 1.0, "freeze_ratio": 0.9}), "lr_scale": 3.0},
    }
    return table


def code_version() -> str:
    """The commit the run used (+dirty when the work tree had changes): results follow the code."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def arm_fingerprint(arm: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(arm, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ data
def load_data(setting: dict[str, int], split_seed: int, max_length: int, model_path: str):
    from transformers import AutoTokenizer

    from slimfit_accel.recipes.rotten_tomatoes import load_rotten_tomatoes, tokenize_splits

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_rotten_tomatoes(setting["train_size"], setting["test_size"], seed=split_seed)
    return tokenize_splits(splits, tokenizer, max_length=max_length)


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


@torch.no_grad()
def evaluate(model, loader) -> dict[str, float]:
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        predictions.append(model(**batch).logits.argmax(-1))
        labels.append(batch["labels"])
    model.train()
    p, y = torch.cat(predictions), torch.cat(labels)
    majority = max((y == c).float().mean().item() for c in y.unique())
    return {"accuracy": (p == y).float().mean().item(), "macro_f1": macro_f1(p, y, 2), "majority": majority}


# ------------------------------------------------------------------------------------ one run
def run(arm: dict[str, Any], data, seed: int, args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, get_scheduler, set_seed

    from slimfit_accel import SlimFit
    from slimfit_accel.memory import MemoryMeter

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    generator = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, generator=generator)
    test_dl = DataLoader(data["test"], batch_size=128)
    epochs = args.epochs
    total_steps = len(train_dl) * epochs

    slimfit = None
    if arm["slimfit"] is not None:
        config = _with(arm["slimfit"], seed=seed, memory_meter="always")  # exact memory of every step
        slimfit = SlimFit.from_config(config)
        model = slimfit.prepare_model(model)
    lr = args.lr * arm.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    schedule = get_scheduler(
        arm.get("lr_scheduler", "linear"), optimizer,
        num_warmup_steps=int(arm.get("warmup_ratio", 0.0) * total_steps), num_training_steps=total_steps,
    )
    if slimfit is not None:
        slimfit.attach(None, model, optimizer, total_steps=total_steps)
        meter, step_context = None, slimfit.step
    else:
        meter = MemoryMeter(model, optimizer)
        step_context = meter.step

    model.train()
    losses, started = [], time.perf_counter()
    for _ in range(epochs):
        for batch in train_dl:
            with step_context():
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds_per_step = (time.perf_counter() - started) / total_steps

    metrics = evaluate(model, test_dl)
    record: dict[str, Any] = {
        **metrics,
        "steps": total_steps,
        "seconds_per_step": seconds_per_step,
        "final_loss_mean_last_20": statistics.fmean(losses[-20:]),
        "lr": lr,
    }
    if slimfit is not None:
        report = slimfit.report().to_dict()
        counts = sorted(report["trained_steps"].values())
        record.update(
            trainable_fraction=report["mean_trainable_fraction"],
            updates_per_unit={"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]},
            trained_steps=report["trained_steps"],
            memory=report["memory"],
        )
        slimfit.detach()
    else:
        record.update(trainable_fraction=1.0, memory=meter.summary().to_dict())
        meter.close()
    return record


# ------------------------------------------------------------------------------------ results
def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written file


def run_key(setting: str, arm: str, seed: int) -> str:
    return f"{setting}/{arm}/seed{seed}"


def table(results: dict[str, Any]) -> str:
    """One row per (setting, arm): seeds, mean and spread of accuracy and macro-F1, step time."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, rec in results["runs"].items():
        setting, arm, _ = key.split("/")
        groups.setdefault((setting, arm), []).append(rec)
    lines = [
        "| setting | arm | seeds | accuracy mean | spread (min-max) | macro-F1 mean | s/step | trainable share | updates/unit (min/med/max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (setting, arm), recs in sorted(groups.items()):
        accs = [r["accuracy"] for r in recs]
        f1s = [r["macro_f1"] for r in recs]
        upd = recs[0].get("updates_per_unit")
        upd_s = f"{upd['min']}/{upd['median']}/{upd['max']}" if upd else "all"
        lines.append(
            f"| {setting} | {arm} | {','.join(str(r['seed']) for r in recs)} | {statistics.fmean(accs):.4f} | "
            f"{min(accs):.4f}-{max(accs):.4f} | {statistics.fmean(f1s):.4f} | "
            f"{statistics.fmean(r['seconds_per_step'] for r in recs):.2f} | "
            f"{statistics.fmean(r['trainable_fraction'] for r in recs):.3f} | {upd_s} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="main")
    parser.add_argument("--arms", default="full,slimfit_default", help=f"comma-separated, from: {', '.join(arms())}")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds (head initialisation, data order)")
    parser.add_argument("--split-seed", type=int, default=0, help="the movie split, the same for every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--table", action="store_true", help="only print the tables of recorded runs")
    args = parser.parse_args(argv)
    args.epochs = SETTINGS[args.setting]["epochs"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = load_results(args.results)
    if args.table:
        print(table(results))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimfit_accel.model_assets import default_model_path

    known = arms()
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise SystemExit(f"error: unknown arm(s) {unknown}; known: {', '.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    model_path = default_model_path()
    setting = SETTINGS[args.setting]
    data = None
    for seed in seeds:  # seed-major: a partial sitting still gives every arm the same seeds
        for name in chosen:
            arm = known[name]
            key = run_key(args.setting, name, seed)
            done = results["runs"].get(key)
            if done is not None and done.get("arm_fingerprint") == arm_fingerprint(arm) and done.get("split_seed") == args.split_seed:
                print(f"skip {key} (recorded: accuracy {done['accuracy']:.4f})", flush=True)
                continue
            if data is None:
                data = load_data(setting, args.split_seed, args.max_length, model_path)
            print(f"run  {key} ...", flush=True)
            record = run(arm, data, seed, args, model_path)
            record.update(
                seed=seed, split_seed=args.split_seed, arm=arm, arm_fingerprint=arm_fingerprint(arm),
                setting={**setting, "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr},
                torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(), code=code_version(),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
            results = load_results(args.results)  # another sitting may have written meanwhile
            results["runs"][key] = record
            save_results(results, args.results)
            print(f"done {key}: accuracy {record['accuracy']:.4f} macro-F1 {record['macro_f1']:.4f} "
                  f"{record['seconds_per_step']:.2f} s/step", flush=True)
    print(table(load_results(args.results)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
