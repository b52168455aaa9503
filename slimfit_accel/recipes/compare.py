"""``--compare full,slimfit,...``: several arms on the same data, split and seed, side by side.

Each arm is one training run of the same recipe (same model, rows, head initialisation and
batch order), run by ``finetune.compare``; only what is frozen and compressed differs:

- ``full``: full fine-tuning, memory measured by the same meter with nothing frozen;
- ``slimfit``: the SlimFit config given (default: the packaged demo config);
- ``freeze_only``: the same config without activation compression;
- ``lisa``: LISA-style random blocks (``random_layers``: 2 blocks, switched every 20 steps);
- ``lora``: PEFT LoRA (r=8 on every linear layer of the body; a new classification head trained
  whole, a language model's head left as it is);
- ``badam``: BAdam (``badam``'s ``BlockOptimizer``): one block trains at a time with AdamW,
  switched so that every block trains once over the run (a new head trains throughout);
- ``galore``: GaLore (``galore-torch``'s ``GaLoreAdamW``): the blocks' weight matrices get
  rank-128 projected Adam state (projection renewed every 200 steps, scale 0.25), the rest AdamW.

The task (classification or SFT) decides the score columns and the note under the table.

Written to OUTPUT: ``compare.json`` (every arm's metrics), ``compare.md`` (the table), and
two pictures: ``freeze_timeline.png`` (units by steps, trained or frozen, per arm) and
``memory_breakdown.png`` (memory by category per arm).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from slimfit_accel import SlimFit
from slimfit_accel.config import load_config
from slimfit_accel.memory import format_bytes

from . import RecipeError

ARMS = ("full", "slimfit", "freeze_only", "lisa", "lora", "badam", "galore")
LORA_RANK = 8
GALORE = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
BENCH_INSTALL = "pip install 'slimfit-accel[bench]'"
#: arm -> (import name, install command) of the package it needs
ARM_PACKAGES = {"lora": ("peft", "pip install peft"), "badam": ("badam", BENCH_INSTALL), "galore": ("galore_torch", BENCH_INSTALL)}
CATEGORIES = ("params", "grads", "optimizer", "activations")


def arm_slimfits(spec: str, slimfit_config: str, mixed_precision: str | None = None) -> dict[str, SlimFit | None]:
    """The SlimFit (``None`` for full fine-tuning) of each named arm, built and checked now (under
    bf16, the arms that page the optimizer keep fp32 masters on host: ``finetune.with_bf16_masters``)."""
    from slimfit_accel.finetune import build_slimfit

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
        "badam": None,
        "galore": None,
    }
    for name in names:
        module, install = ARM_PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise RecipeError(f"--compare {name} needs the {module!r} package, which is not installed: {install}")
    # every step measured: the summary's memory figures are exact, and the same for every arm
    return {name: None if configs[name] is None else build_slimfit(configs[name], mixed_precision) for name in names}


def arm_options(name: str, task) -> dict[str, Any]:
    """What ``finetune.setup`` builds differently for arm ``name``: ``adapt`` (the model that
    trains, e.g. LoRA around it) and ``make_optimizer`` (BAdam, GaLore); SlimFit arms need
    neither (their SlimFit comes from ``arm_slimfits``)."""
    if name == "lora":
        return {"adapt": partial(add_lora, new_head=task.new_head, task_type=task.peft_task_type)}
    if name == "badam":
        return {"make_optimizer": partial(badam_optimizer, new_head=task.new_head)}
    if name == "galore":
        return {"make_optimizer": galore_optimizer}
    return {}


def write_comparison(results: dict[str, dict], output: Path, accelerator, data_sizes: dict[str, int], task) -> dict:
    """Print the table; write ``compare.json``, ``compare.md`` and the two pictures (main process).

    Returns ``{"arms": {name: metrics}, "output_dir": ...}``.
    """
    accelerator.print(render_table(results, task))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "compare.json").write_text(json.dumps({"task": task.name, "arms": results, "data": data_sizes}, indent=2, default=str))
        (output / "compare.md").write_text(render_markdown(results, task))
        plot_freeze_timeline(results, output / "freeze_timeline.png")
        plot_memory(results, output / "memory_breakdown.png")
        accelerator.print(f"wrote {output}/compare.json, compare.md, freeze_timeline.png, memory_breakdown.png")
    accelerator.wait_for_everyone()
    return {"arms": results, "output_dir": str(output)}


def add_lora(model, new_head: bool = True, task_type: str | None = None):
    """LoRA adapters on the body's linear layers, the rest frozen; a new task head (``new_head``)
    trains whole. A language model's head is its pretrained output embeddings: left frozen."""
    from peft import LoraConfig, get_peft_model

    heads = _head_prefixes(model) if new_head else []
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear",
                        modules_to_save=heads or None, task_type=task_type)
    return get_peft_model(model, config)


def badam_optimizer(model, args: argparse.Namespace, total_steps: int, new_head: bool = True):
    """BAdam's ``BlockOptimizer`` around AdamW: one block (``find_blocks``) trains at a time, in a
    random order drawn from torch's generator (seeded), switched every ``total_steps / blocks``
    steps so each block trains once per run; a new task head trains at every step. The meter
    reads the state of its base optimizer (its fp32 copy of the block included)."""
    import torch
    from badam import BlockOptimizer

    from slimfit_accel.units import find_blocks

    blocks = [f"{path}." for path in find_blocks(model)]
    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "BAdam expects fp16/bf16 weights": fp32 masters here, as in every arm
        return BlockOptimizer(
            base_optimizer=base, named_parameters_list=list(model.named_parameters()),
            block_prefix_list=[[prefix] for prefix in blocks],
            active_modules=[f"{h}." for h in _head_prefixes(model)] if new_head else [],
            switch_block_every=max(1, math.ceil(total_steps / len(blocks))), switch_mode="random", verbose=0,
        )


def galore_optimizer(model, args: argparse.Namespace, total_steps: int):
    """``GaLoreAdamW``: the blocks' 2-D weights with low-rank projected Adam state (``GALORE``),
    every other parameter plain AdamW."""
    from galore_torch import GaLoreAdamW

    from slimfit_accel.units import find_blocks

    blocks = tuple(f"{path}." for path in find_blocks(model))
    low_rank = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith(blocks)]
    chosen = {id(p) for p in low_rank}
    regular = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": regular}, {"params": low_rank, **GALORE}]
    return GaLoreAdamW(groups, lr=args.lr, weight_decay=args.weight_decay, no_deprecation_warning=True)


def _head_prefixes(model) -> list[str]:
    from slimfit_accel.units import head_patterns

    return [pattern[: -len(".*")] for pattern in head_patterns(model)]


def _cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


MEMORY_COLUMNS = ("params", "grads", "optimizer", "activations stored (raw)", "peak total", "s/step")


def _rows(results: dict[str, dict], task) -> list[list[str]]:
    """One row per arm: the task's scores, memory by category (peak of each over the steps), step time."""
    rows = []
    for name, result in results.items():
        peak = result["memory"]["peak"]
        rows.append([
            name, *(_cell(result, key, fmt) for _, key, fmt in task.compare_columns),
            format_bytes(peak["params"]), format_bytes(peak["grads"]), format_bytes(peak["optimizer"]),
            f"{format_bytes(peak['activations'])} ({format_bytes(peak['activations_raw'])})",
            format_bytes(peak["total"]), f"{result['seconds_per_step']:.2f}",
        ])
    return rows


def render_table(results: dict[str, dict], task) -> str:
    """The task's scores, memory by category and step time, one row per arm; the task's note under it."""
    table = Table(title="Side by side (same data, split and seed)", header_style="bold")
    for column in ("arm", *(header for header, _, _ in task.compare_columns), *MEMORY_COLUMNS):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in _rows(results, task):
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False, color_system=None).print(table)
    return out.getvalue() + task.compare_note(next(iter(results.values()))) + "\n"


def render_markdown(results: dict[str, dict], task) -> str:
    """The same table as Markdown, for a README or an issue."""
    headers = ["arm", *(header for header, _, _ in task.compare_columns), *MEMORY_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results, task)]
    note = task.compare_note(next(iter(results.values())))
    lines.append(f"\n{note[0].upper()}{note[1:]}.")
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
        elif name == "badam":  # BAdam picks its blocks itself: not recorded step by step
            grid = np.full((1, max(steps, 1)), 0.5)
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
        if name == "badam":
            title = f"{name}: one block at a time, in BAdam's own order (not recorded per step)"
        else:
            note = " (LoRA adapters train; base weights frozen)" if results[name]["adapters"] else (" (every unit, every step)" if grid.shape[0] == 1 else "")
            title = f"{name}: {share:.0%} of unit-steps trained" + note
        ax.set_title(title, fontsize=10)
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


