"""``--compare full,slimfit,...``: several arms on the same data, split and seed, side by side.

Each arm is one training run of the same recipe (same model, rows, head initialisation and
batch order), run by ``finetune.compare``; only what is frozen and compressed differs:

- ``full``: full fine-tuning, memory measured by the same meter with nothing frozen;
- ``slimfit``: the SlimFit config given (default: the packaged demo config);
- ``freeze_only``: the same config without activation compression;
- ``lisa``: LISA-style random blocks (``random_layers``: 2 blocks, switched every 20 steps);
- ``lora``: PEFT LoRA (r=8 on every linear layer of the body, the head trained whole).

Written to OUTPUT: ``compare.json`` (every arm's metrics), ``compare.md`` (the table), and
two pictures: ``freeze_timeline.png`` (units by steps, trained or frozen, per arm) and
``memory_breakdown.png`` (memory by category per arm).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimfit_accel import SlimFit
from slimfit_accel.config import load_config
from slimfit_accel.memory import format_bytes

from . import RecipeError

ARMS = ("full", "slimfit", "freeze_only", "lisa", "lora")
LORA_RANK = 8
CATEGORIES = ("params", "grads", "optimizer", "activations")


def arm_slimfits(spec: str, slimfit_config: str) -> dict[str, SlimFit | None]:
    """The SlimFit (``None`` for full fine-tuning) of each named arm, built and checked now."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise RecipeError(f"--compare: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise RecipeError(f"--compare needs two or more different arms, got {spec!r}")
    base = load_config(slimfit_config)
    configs = {
        "full": None,
        "slimfit": base,
        "freeze_only": base.model_copy(update={"compression": "none"}),
        "lisa": {"seed": base.seed, "units": {"granularity": "tensor", "always_train": ["head"]},
                 "scheduler": {"name": "random_layers", "n_blocks": 2, "interval": 20}, "compression": "none"},
        "lora": None,
    }
    if "lora" in names and importlib.util.find_spec("peft") is None:
        raise RecipeError("--compare lora needs PEFT: pip install peft")
    return {name: None if configs[name] is None else SlimFit.from_config(configs[name]) for name in names}


def write_comparison(results: dict[str, dict], output: Path, accelerator, data_sizes: dict[str, int]) -> dict:
    """Print the table; write ``compare.json``, ``compare.md`` and the two pictures (main process).

    Returns ``{"arms": {name: metrics}, "output_dir": ...}``.
    """
    accelerator.print(render_table(results))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "compare.json").write_text(json.dumps({"arms": results, "data": data_sizes}, indent=2, default=str))
        (output / "compare.md").write_text(render_markdown(results))
        plot_freeze_timeline(results, output / "freeze_timeline.png")
        plot_memory(results, output / "memory_breakdown.png")
        accelerator.print(f"wrote {output}/compare.json, compare.md, freeze_timeline.png, memory_breakdown.png")
    accelerator.wait_for_everyone()
    return {"arms": results, "output_dir": str(output)}


def add_lora(model):
    """LoRA adapters on the body's linear layers; the task head trains whole, the rest is frozen."""
    from peft import LoraConfig, get_peft_model

    from slimfit_accel.units import head_patterns

    heads = [pattern[: -len(".*")] for pattern in head_patterns(model)]
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", modules_to_save=heads)
    return get_peft_model(model, config)


def render_table(results: dict[str, dict]) -> str:
    """Accuracy, memory by category (peak of each over the steps) and step time, one row per arm."""
    table = Table(title="Side by side (same data, split and seed)", header_style="bold")
    for column in ("arm", "accuracy", "macro-F1", "params", "grads", "optimizer", "activations stored (raw)", "peak total", "s/step"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, result in results.items():
        peak = result["memory"]["peak"]
        table.add_row(
            name, f"{result['accuracy_after']:.3f}", f"{result['macro_f1']:.3f}",
            format_bytes(peak["params"]), format_bytes(peak["grads"]), format_bytes(peak["optimizer"]),
            f"{format_bytes(peak['activations'])} ({format_bytes(peak['activations_raw'])})",
            format_bytes(peak["total"]), f"{result['seconds_per_step']:.2f}",
        )
    baseline = next(iter(results.values()))["majority_baseline"]
    out = io.StringIO()
    Console(file=out, width=140, force_terminal=False, color_system=None).print(table)
    return out.getvalue() + f"majority-class baseline (always {baseline['class']!r}): accuracy {baseline['accuracy']:.3f}\n"


def render_markdown(results: dict[str, dict]) -> str:
    """The same table as Markdown, for a README or an issue."""
    lines = ["| arm | accuracy | macro-F1 | params | grads | optimizer | activations stored (raw) | peak total | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        peak = result["memory"]["peak"]
        lines.append(
            f"| {name} | {result['accuracy_after']:.3f} | {result['macro_f1']:.3f} | {format_bytes(peak['params'])} | "
            f"{format_bytes(peak['grads'])} | {format_bytes(peak['optimizer'])} | {format_bytes(peak['activations'])} "
            f"({format_bytes(peak['activations_raw'])}) | {format_bytes(peak['total'])} | {result['seconds_per_step']:.2f} |"
        )
    baseline = next(iter(results.values()))["majority_baseline"]
    lines.append(f"\nMajority-class baseline (always {baseline['class']!r}): accuracy {baseline['accuracy']:.3f}, "
                 f"macro-F1 {baseline['macro_f1']:.3f}.")
    return "\n".join(lines) + "\n"


def plot_freeze_timeline(results: dict[str, dict], path: Path) -> None:
    """Units (rows) by optimizer steps (columns): dark where the unit trained. Full fine-tuning trains all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grids = {}
    for name, result in results.items():
        steps = result["steps"]
        if result["adapters"]:  # LoRA: the base weights never train (adapters are not units)
            grid = np.zeros((1, max(steps, 1)))
        elif result["units"]:
            grid = np.zeros((len(result["units"]), max(steps, 1)))
            for step, trained in enumerate(result["timeline"]):
                grid[trained, step] = 1
        else:
            grid = np.ones((1, max(steps, 1)))
        grids[name] = grid
    fig, axes = plt.subplots(len(grids), 1, figsize=(10, 1.2 + 2.2 * len(grids)), squeeze=False)
    for ax, (name, grid) in zip(axes[:, 0], grids.items()):
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
        share = grid.mean()
        note = " (LoRA adapters train; base weights frozen)" if results[name]["adapters"] else (" (every unit, every step)" if grid.shape[0] == 1 else "")
        ax.set_title(f"{name}: {share:.0%} of unit-steps trained" + note, fontsize=10)
        ax.set_ylabel("units" if grid.shape[0] > 1 else "")
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("optimizer step (dark: trained, light: frozen)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(results: dict[str, dict], path: Path) -> None:
    """Stacked bars per arm: parameters, gradients, optimizer state, stored activations (MiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(4.5 + 1.4 * len(names), 4.5))
    bottom = [0.0] * len(names)
    for category in CATEGORIES:
        values = [results[n]["memory"]["peak"][category] / 2**20 for n in names]
        ax.bar(names, values, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, values)]
    raw = [(results[n]["memory"]["peak"]["activations_raw"] - results[n]["memory"]["peak"]["activations"]) / 2**20 for n in names]
    ax.bar(names, raw, bottom=bottom, fill=False, hatch="//", edgecolor="grey", label="activations saved by compression")
    ax.set_ylabel("MiB (peak of each category over the steps)")
    ax.set_title("Training memory by category")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


