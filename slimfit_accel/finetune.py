"""Fine-tune a classifier or a causal language model (SFT) with SlimFit, under any Accelerate
setup: your data, your model.

Read top to bottom. ``main``: arguments -> cheap checks of every input (flags, the task, SlimFit
configs, checkpoint, model folder; nothing is read or written yet) -> Accelerator -> data -> one
run, or one per ``--compare`` arm. Each run has four phases: ``setup`` (model, SlimFit, optimizer,
schedule, prepare, first evaluation), ``train_loop`` (steps, checkpoints, per-epoch evaluation),
``finish`` (report, summary.json, final model) and ``cleanup`` (SlimFit detached, every
reference dropped, device memory freed). What depends on the task (model, data, scores) comes
from a task object (``slimfit_accel/recipes/protocol.py``); the rest is shared. Copy it and
change what you need; data sources and tasks live in ``slimfit_accel/recipes/``.

    slimfit-accel finetune --train-file reviews.csv --text-column review --label-column stars \\
        --model ./my-bert --output-dir runs/reviews
    slimfit-accel finetune --task sft --model smollm2 --train-file chats.jsonl --eval-generate 100 \\
        --mixed-precision bf16 --output-dir runs/chat
    accelerate launch --config_file accelerate_configs/zero2_offload.yaml launch/finetune.py \\
        --slimfit-config launch/configs/demo.yaml
    python -m slimfit_accel.finetune --compare full,slimfit --output-dir runs/compare
    torchrun --nproc_per_node 2 -m slimfit_accel.finetune  # DDP on CPU (gloo)

``--task auto`` (the default) is SFT (``recipes/sft_task.py``) when the training rows have a
``messages`` column or ``prompt`` and ``completion`` columns, else classification
(``recipes/classification.py``); plain ``text`` rows are language modelling with ``--task sft``.

Defaults: the packaged all-MiniLM-L6-v2 and 2000 / 1000 Rotten Tomatoes snippets (split by
movie), 2 epochs, batch 32, 64 tokens (SFT: 1024), AdamW with linear decay and no warm-up (as SlimFit).
The command line (``cli``) runs offline unless ``HF_HUB_OFFLINE`` says otherwise; importing
this module changes no setting.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slimfit_accel.quiet import quiet_import_noise

quiet_import_noise()  # before transformers imports peft (see quiet.py)

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from slimfit_accel import SlimFit
from slimfit_accel.config import SlimFitConfig, load_config
from slimfit_accel.memory import MemoryMeter
from slimfit_accel.model_assets import PACKAGED, default_model_path, resolve_model
from slimfit_accel.recipes import RecipeError
from slimfit_accel.recipes.checkpoints import checkpoint_dir, read_state, resolve_resume, save_checkpoint
from slimfit_accel.recipes.classification import ClassificationTask
from slimfit_accel.recipes.data import BUILTIN
from slimfit_accel.recipes.protocol import Inputs, Task
from slimfit_accel.recipes.sft_task import SFTTask, is_sft_columns, peek_columns
from slimfit_accel.recipes.summary import write_summary

LR_SCHEDULERS = ("linear", "constant", "cosine")
TRACKERS = ("tensorboard", "wandb", "all", "none")
TASKS = ("auto", "classification", "sft")
PRECISIONS = ("no", "bf16", "fp16")
#: Settings a resumed run must share with the run that saved the checkpoint (else batches and steps differ).
RESUME_SAME = ("train_file", "test_file", "dataset", "train_size", "test_size", "split_seed", "seed", "epochs",
               "batch_size", "grad_accum", "max_length", "lr", "lr_scheduler", "warmup_ratio", "max_steps", "task",
               "train_on_prompt")


def with_bf16_masters(config: SlimFitConfig, mixed_precision: str | None) -> SlimFitConfig:
    """Under bf16 mixed precision, ``master_weights: host``: each weight once on the device in bf16,
    the fp32 masters on host with the (paged) optimizer state, as LLMs train; Accelerate's own bf16
    would keep fp32 weights on the device and only autocast. Applied when the config pages the
    optimizer and does not set ``master_weights`` itself (``null`` keeps fp32 weights), and not
    under DeepSpeed (its bf16 keeps fp32 masters itself) or FSDP (which has its own)."""
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    sharded = any(os.environ.get(flag, "false").lower() == "true" for flag in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
    if precision != "bf16" or sharded or not config.optimizer_paging or "master_weights" in config.model_fields_set:
        return config
    return config.model_copy(update={"master_weights": "host"})


def build_slimfit(source: str | dict | SlimFitConfig, mixed_precision: str | None) -> SlimFit:
    """``SlimFit.from_config`` measuring every step, with ``with_bf16_masters`` applied (the
    source itself when nothing changes, so errors still name its file)."""
    config = load_config(source)
    changed = with_bf16_masters(config, mixed_precision)
    return SlimFit.from_config(source if changed is config else changed, memory_meter="always")


def default_slimfit_config(task: str | None = None) -> str:
    """The packaged default config for ``task``: ``sft.yaml`` for supervised fine-tuning of a
    decoder (the tensors take turns: within 1% / 1 point of full fine-tuning on both SFT tasks of
    ``benchmarks/RESULTS.md``, where the demo config was 1.6% above in loss), else
    the demo config (a copy to edit lives in ``launch/configs/demo.yaml``)."""
    from .configs import packaged_config

    return packaged_config("sft" if task == "sft" else "demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slimfit-accel finetune",
        description="Fine-tune a text or image classifier, or a causal language model (SFT), with SlimFit "
                    "(or compare it with full fine-tuning and its peers).",
    )
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="auto: sft when the rows have 'messages' or 'prompt' + 'completion' columns, else classification; "
                             "sft also trains on plain 'text' rows (language modelling)")
    slimfit = parser.add_mutually_exclusive_group()
    slimfit.add_argument("--slimfit-config", metavar="PATH", default=None,
                         help="SlimFit YAML config (default: the packaged demo config; for --task sft the packaged sft.yaml)")
    slimfit.add_argument("--no-slimfit", action="store_true",
                         help="plain full fine-tuning, for comparison")
    parser.add_argument("--model", metavar="PATH|NAME", default=None,
                        help=f"local Hugging Face model folder, a .gguf file or a folder holding one, or a packaged model "
                             f"({', '.join(PACKAGED)}) (default: packaged all-MiniLM-L6-v2)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", metavar="NAME|DIR", default="rotten_tomatoes",
                      help=f"built-in offline set ({', '.join(BUILTIN)}), a save_to_disk folder or a datasets name")
    data.add_argument("--train-file", metavar="FILE", help="CSV, JSON, JSONL or Parquet file of training rows (instead of --dataset)")
    data.add_argument("--test-file", metavar="FILE", help="test rows, same format (default: hold out --test-fraction)")
    data.add_argument("--test-fraction", type=float, default=None, help="share of the rows held out for testing when there is no test split (default 0.2)")
    data.add_argument("--text-column", metavar="NAME", help="column with the text (default: 'text')")
    data.add_argument("--image-column", metavar="NAME", help="column with images or image file paths (makes it an image task)")
    data.add_argument("--label-column", metavar="NAME", default="label", help="column with the class (strings or integers)")
    data.add_argument("--train-size", type=int, default=None, help="training rows to draw (default: 2000 for rotten_tomatoes, else all)")
    data.add_argument("--test-size", type=int, default=None, help="test rows to draw (default: 1000 for rotten_tomatoes, else all)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split and the rows drawn (the same data for every --seed)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--batch-size", type=int, default=32, help="per process")
    train.add_argument("--max-length", type=int, default=None, help="tokens per row (default: 64; SFT: 1024); SFT counts "
                                                                      "the completions it cuts and skips rows left with nothing to learn")
    train.add_argument("--mixed-precision", choices=PRECISIONS, default=None,
                       help="autocast precision given to the Accelerator (default: Accelerate's, e.g. from its config); "
                            "with bf16 and a SlimFit config with optimizer_paging (the default's) the weights live on the "
                            "device once, in bf16, their fp32 masters on host (master_weights: host; 'master_weights: null' "
                            "in the config keeps fp32 weights); fp16 needs a GPU")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps spent warming the learning rate up")
    train.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear", help="learning-rate schedule after warm-up")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--seed", type=int, default=0, help="head initialisation and data order (not the split: --split-seed)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")

    sft = parser.add_argument_group("supervised fine-tuning (--task sft)")
    labels = sft.add_mutually_exclusive_group()
    labels.add_argument("--completion-only", dest="train_on_prompt", action="store_false",
                        help="loss on the completion / assistant tokens only (the default)")
    labels.add_argument("--train-on-prompt", dest="train_on_prompt", action="store_true",
                        help="loss on every token, prompts included")
    sft.set_defaults(train_on_prompt=False)
    sft.add_argument("--eval-generate", type=int, default=0, metavar="N",
                     help="greedy answers to the first N test prompts, scored by exact match (after whitespace/case normalisation)")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", metavar="DIR", default=None,
                     help="write summary.json, checkpoints and the final model (final/) here")
    out.add_argument("--checkpointing-steps", type=int, default=None, metavar="N", help="save a resumable checkpoint every N optimizer steps")
    out.add_argument("--resume-from-checkpoint", metavar="DIR|latest", default=None,
                     help="continue from OUTPUT/checkpoints/step_N, or the newest one under --output-dir")
    out.add_argument("--report-to", choices=TRACKERS, default="none", help="log loss, lr, trainable share and activation bytes per step")
    out.add_argument("--compare", metavar="ARMS", default=None,
                     help="train these arms on the same data, split and seed and compare them: "
                          "full,slimfit[,freeze_only,lisa,lora,badam,galore]")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Numbers that cannot train, refused before anything is loaded or written."""
    at_least_one = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--epochs": args.epochs,
                    "--max-length": args.max_length, "--train-size": args.train_size, "--test-size": args.test_size,
                    "--max-steps": args.max_steps, "--checkpointing-steps": args.checkpointing_steps}
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise RecipeError(f"{flag} must be at least 1, got {value}")
    if args.eval_generate < 0:
        raise RecipeError(f"--eval-generate must be 0 or more, got {args.eval_generate}")
    if not args.lr > 0:
        raise RecipeError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise RecipeError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        raise RecipeError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.test_file and not args.train_file:
        raise RecipeError("--test-file needs --train-file")
    check_precision(args.mixed_precision)
    if args.compare and args.resume_from_checkpoint:
        raise RecipeError("--resume-from-checkpoint resumes one run; it cannot be combined with --compare")
    if args.report_to in ("tensorboard", "all") or args.report_to == "wandb":
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        missing = [name for name, ok in (("tensorboard", is_tensorboard_available()), ("wandb", is_wandb_available()))
                   if args.report_to in (name, "all") and not ok]
        if missing:
            raise RecipeError(f"--report-to {args.report_to}: {', '.join(missing)} is not installed (pip install {' '.join(missing)})")
        if args.output_dir is None:
            raise RecipeError(f"--report-to {args.report_to} needs --output-dir (the logs go to OUTPUT/logs)")


def check_precision(flag: str | None) -> None:
    """fp16 without a GPU is refused: Accelerate then turns it off without a word (no autocast, no
    loss scaling; ``Accelerator.__init__`` enables them on accelerators only), so the run would be
    fp32 while it says fp16. DeepSpeed decides fp16 itself (and refuses it where unsupported)."""
    precision = flag or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if precision == "fp16" and not torch.cuda.is_available() and not deepspeed:
        where = "--mixed-precision fp16" if flag else "mixed_precision fp16 (from the accelerate config)"
        raise RecipeError(f"{where}: Accelerate runs fp16 on a GPU only and would train in fp32 here without saying so; "
                          f"use --mixed-precision bf16 (CPU autocast) or no")


def build_accelerator(grad_accum: int, find_unused_parameters: bool, report_to: str = "none", output_dir: str | None = None,
                      mixed_precision: str | None = None) -> Accelerator:
    """An Accelerator that also works with no GPU, with a reproducible data order.

    Without a GPU, Accelerate only sets up a process group when told to: gloo for DeepSpeed
    (else each process thinks it is alone and DeepSpeed's batch-size check fails), and
    ``cpu=True`` for DDP (torchrun gives MULTI_CPU). ``cpu=True`` would switch DeepSpeed off,
    so it is only set without DeepSpeed; a single unlaunched process must not ask for gloo (no
    process group is made for it). Frozen units get no gradient, so under SlimFit DDP must not
    expect one (``find_unused_parameters``). The seedable sampler draws epoch e's order from
    (seed, e), which is what lets a resumed run take the same batches. ``mixed_precision``: None
    leaves Accelerate's own choice (its config or environment).
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    cpu = False
    if not torch.cuda.is_available():
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
        if launched:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers = None if report_to == "none" else report_to
    _forget_other_precision(mixed_precision)
    return Accelerator(
        cpu=cpu, gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers, mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers, project_dir=output_dir if trackers else None,
    )


def _forget_other_precision(mixed_precision: str | None) -> None:
    """Accelerate keeps one precision per process (``AcceleratorState``): a second run in the same
    process (``main`` called again, a test) would keep the first run's autocast without a word
    when it asks for Accelerate's default, and fail when it asks for another. The state is
    dropped then (the process group, ``PartialState``, stays), so each run gets what it asks for."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")  # noqa: SLF001 (Accelerate keeps it there)
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if held is not None and held != wanted:
        AcceleratorState._reset_state()  # noqa: SLF001


@dataclass
class Plan:
    """What the cheap checks settled: the model folder, the task, each run's SlimFit, the checkpoint."""

    model_path: str
    task: Task
    arms: dict[str, SlimFit | None]  # {"run": ...} for one run; the --compare arms otherwise
    resume: Path | None


def choose_task(args: argparse.Namespace) -> Task:
    """``--task``; ``auto`` looks at the training rows' column names only (``peek_columns``)."""
    if args.task == "sft" or (args.task == "auto" and is_sft_columns(peek_columns(args))):
        return SFTTask()
    return ClassificationTask()


def check_inputs(args: argparse.Namespace, task: Task | None = None) -> Plan:
    """Every input that can be checked without reading data, checked: a ``RecipeError`` (or the
    config's ``ConfigError``) names the first problem before anything is loaded or written.
    Settles ``args.max_length`` (the task's default when not given)."""
    check_args(args)
    task = task or choose_task(args)
    args.task = getattr(task, "name", args.task)  # what auto chose: recorded, and what a resumed run must match
    if args.max_length is None:
        args.max_length = getattr(task, "default_max_length", 64)
    if getattr(task, "name", None) != "sft":
        for flag, given in (("--eval-generate", args.eval_generate), ("--train-on-prompt", args.train_on_prompt)):
            if given:
                raise RecipeError(f"{flag} is for supervised fine-tuning, and these rows make a classification task; "
                                  f"pass --task sft with 'messages', 'prompt' + 'completion' or 'text' rows")
    config = args.slimfit_config or default_slimfit_config(args.task)
    if args.compare:
        from slimfit_accel.recipes.compare import arm_slimfits

        arms = arm_slimfits(args.compare, config, args.mixed_precision)
    else:
        arms = {"run": None if args.no_slimfit else build_slimfit(config, args.mixed_precision)}
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if resume is not None:
        changed = {k: (v, getattr(args, k)) for k, v in read_state(resume).get("args", {}).items() if getattr(args, k) != v}
        if changed:
            key, (then, now) = next(iter(changed.items()))
            raise RecipeError(f"--resume-from-checkpoint {resume}: it was made with --{key.replace('_', '-')} {then}, "
                              f"this run has {now}; resume with the same settings")
    try:
        model_path = resolve_model(args.model) if args.model else default_model_path()  # a GGUF file converts once, cached
    except ImportError as err:
        raise RecipeError(" ".join(str(err).split())) from None
    task.check_model(model_path)
    return Plan(model_path, task, arms, resume)


def main(argv: list[str] | None = None, task: Task | None = None) -> dict:
    """Run the recipe; returns the run's metrics (``--compare``: every arm's). ``task``: another
    task than classification (see ``recipes/protocol.py``)."""
    args = parse_args(argv)
    plan = check_inputs(args, task)
    accelerator = build_accelerator(args.grad_accum, find_unused_parameters=plan.arms.get("run") is not None,
                                    report_to=args.report_to, output_dir=args.output_dir, mixed_precision=args.mixed_precision)
    if not accelerator.is_local_main_process:  # one copy of the logs and progress bars
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    with accelerator.main_process_first():  # the main process loads and tokenizes, the others reuse its cache
        inputs = plan.task.load_inputs(args, plan.model_path)
    for note in inputs.notes:
        accelerator.print(f"note: {note}")
    if args.compare:
        return compare(args, plan.task, inputs, plan.arms, accelerator)
    run = run_once(args, plan.task, inputs, accelerator, plan.arms["run"], output_dir=args.output_dir, resume=plan.resume)
    return run.result


def run_once(args: argparse.Namespace, task: Task, inputs: Inputs, accelerator: Accelerator, slimfit: SlimFit | None,
             **options: Any) -> "TrainingRun":
    """setup -> train_loop -> finish, and cleanup whatever happens; the run keeps its result."""
    run = setup(args, task, inputs, accelerator, slimfit, **options)
    try:
        train_loop(run)
        finish(run)
    finally:
        cleanup(run)
    return run


def compare(args: argparse.Namespace, task: Task, inputs: Inputs, arms: dict[str, SlimFit | None], accelerator: Accelerator) -> dict:
    """``--compare``: each arm in turn on the same inputs, then the table and pictures (``accelerator``
    prints and writes them).

    Each arm trains under an Accelerator of its own (nothing of the previous arm stays registered) and is
    cleaned up before the next starts; ``arms`` is emptied as they run, because an arm's SlimFit
    holds its model.
    """
    from slimfit_accel.recipes.compare import arm_options, write_comparison

    output = Path(args.output_dir or "runs/compare")
    results: dict[str, dict] = {}
    before = None  # the same untrained model in every arm: evaluated once
    for name in list(arms):
        slimfit = arms.pop(name)
        options = arm_options(name, task)
        arm_accelerator = build_accelerator(args.grad_accum, find_unused_parameters=slimfit is not None or name == "badam",
                                            report_to=args.report_to, output_dir=args.output_dir, mixed_precision=args.mixed_precision)
        run = run_once(args, task, inputs, arm_accelerator, slimfit, output_dir=str(output / name), label=f"[{name}] ",
                       before=before, **options)
        results[name], before = run.result, run.before
        del run, slimfit, arm_accelerator  # the accelerator still lists the arm's freeze controller
    return write_comparison(results, output, accelerator, inputs.data.sizes, task)


@dataclass
class TrainingRun:
    """One run: what ``setup`` built, the progress ``train_loop`` made, the ``result`` of ``finish``.

    ``cleanup`` sets the model, optimizer, loaders, schedule, meter and SlimFit to None.
    """

    args: argparse.Namespace
    task: Task
    inputs: Inputs
    accelerator: Accelerator
    slimfit: SlimFit | None
    model: Any
    optimizer: Any
    lr_sched: Any
    train_dl: Any
    test_dl: Any
    meter: MemoryMeter
    step_context: Callable[[], Any]  # wraps each micro-batch: SlimFit's step, or the meter's
    total_steps: int
    before: dict[str, float]
    output_dir: str | None = None
    label: str = ""
    adapters: bool = False
    # progress (restored from a checkpoint when resuming)
    start_epoch: int = 0
    skip: int = 0  # micro-batches of start_epoch already taken
    steps: int = 0
    timeline: list[list[int]] = field(default_factory=list)  # per optimizer step: the schedulable units trained
    epochs: list[dict] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    after: dict[str, float] = field(default_factory=dict)
    result: dict | None = None


def setup(args: argparse.Namespace, task: Task, inputs: Inputs, accelerator: Accelerator, slimfit: SlimFit | None,
          output_dir: str | None = None, resume: Path | None = None, label: str = "", before: dict | None = None,
          adapt: Callable | None = None, make_optimizer: Callable | None = None) -> TrainingRun:
    """Model, SlimFit, loaders, optimizer and schedule, prepared; the first evaluation; a checkpoint loaded.

    ``slimfit=None``: full fine-tuning, measured by the same meter. ``before``: the untrained
    model's scores when already known (arms of a comparison share them). ``adapt``: turns the
    loaded model into what trains (e.g. LoRA adapters around it). ``make_optimizer(model, args,
    total_steps)``: another optimizer than AdamW (BAdam, GaLore); one wrapping a
    ``base_optimizer`` is measured by that base's state.
    """
    set_seed(args.seed)  # head initialisation and the data order
    model = task.build_model(inputs)
    if adapt is not None:
        model = adapt(model)
    # SlimFit wraps the model before `prepare`: DDP and ZeRO record every candidate as trainable.
    if slimfit is not None:
        model = slimfit.prepare_model(model)

    # The loader's own generator: starting an epoch then draws nothing from the global RNG, so a
    # run resumed mid-epoch sees the same dropout masks as one that never stopped.
    order = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(inputs.encoded["train"], batch_size=args.batch_size, shuffle=True, generator=order, collate_fn=inputs.collate)
    test_dl = DataLoader(inputs.encoded["test"], batch_size=args.batch_size * 2, collate_fn=inputs.collate)
    # Optimizer steps per process: the prepared dataloader is sharded across processes, and
    # Accelerate syncs (steps) at the end of each epoch even mid-accumulation.
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    total_steps = math.ceil(batches_per_process / args.grad_accum) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if make_optimizer is not None:
        optimizer = make_optimizer(model, args, total_steps)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Accelerate steps a prepared scheduler once per process per optimizer step.
    warm_constant = args.lr_scheduler == "constant" and args.warmup_ratio > 0  # transformers names it apart
    lr_sched = get_scheduler(
        "constant_with_warmup" if warm_constant else args.lr_scheduler, optimizer,
        num_warmup_steps=int(args.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, train_dl, lr_sched = accelerator.prepare(model, optimizer, train_dl, lr_sched)
    test_dl = accelerator.prepare(test_dl)

    # The first freeze decision is made here: a config that cannot schedule this model fails now.
    if slimfit is not None:
        slimfit.attach(accelerator, model, optimizer, total_steps=total_steps)
        meter, step_context = slimfit.memory, slimfit.step
    else:  # full fine-tuning: the same meter, nothing frozen
        wrapped = getattr(optimizer.optimizer, "base_optimizer", None) if make_optimizer is not None else None
        meter = MemoryMeter(model, wrapped or optimizer)
        step_context = meter.step

    before = before or task.evaluate(accelerator, model, test_dl, inputs)
    accelerator.print(f"{label}before training ({task.untrained}): {task.describe(before, inputs)}")
    run = TrainingRun(args, task, inputs, accelerator, slimfit, model, optimizer, lr_sched, train_dl, test_dl, meter,
                      step_context, total_steps, before, output_dir=output_dir, label=label, adapters=adapt is not None)
    if resume is not None:
        # After the first evaluation, as in the run that saved it: the random states restored here
        # are the ones its next step started from.
        accelerator.load_state(str(resume))  # weights, optimizer, schedule, random states, freeze controller
        state = read_state(resume)
        run.start_epoch, run.skip, run.steps = state["epoch"], state["batches_in_epoch"], state["step"]
        run.timeline, run.epochs = state["timeline"], state["epochs"]
        accelerator.print(f"resumed from {resume} at optimizer step {run.steps} (epoch {run.start_epoch}, batch {run.skip})")
    if args.report_to != "none":
        accelerator.init_trackers("slimfit-finetune" + (f"-{label.strip(' []')}" if label else ""), config=_flat_config(args))
    return run


def train_loop(run: TrainingRun) -> None:
    """Train to ``total_steps``: accumulate, step, record; checkpoint every N steps; evaluate each epoch."""
    args, accelerator, model, optimizer = run.args, run.accelerator, run.model, run.optimizer
    model.train()
    progress = tqdm(total=run.total_steps, initial=run.steps, desc=f"{run.label}fine-tuning", disable=not accelerator.is_local_main_process)
    run.after = run.before
    try:
        for epoch in range(run.start_epoch, args.epochs):
            if run.steps >= run.total_steps:
                break
            run.train_dl.set_epoch(epoch)  # this epoch's order comes from (seed, epoch)
            loader = accelerator.skip_first_batches(run.train_dl, run.skip) if run.skip else run.train_dl
            seen, run.skip = run.skip, 0
            step_started = time.perf_counter()
            for batch in loader:
                seen += 1
                with accelerator.accumulate(model), run.step_context():
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    run.lr_sched.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                run.step_seconds.append(time.perf_counter() - step_started)
                record_step(run, epoch, seen, loss.item(), progress)
                if run.steps >= run.total_steps:
                    break
                step_started = time.perf_counter()
            run.after = run.task.evaluate(accelerator, model, run.test_dl, run.inputs)
            numbers = {name: value for name, value in run.after.items() if isinstance(value, (int, float))}
            run.epochs.append({"epoch": epoch + 1, "step": run.steps, **numbers})
            if args.report_to != "none":
                accelerator.log({f"test_{name}": value for name, value in numbers.items()}, step=run.steps)
            if accelerator.is_main_process:  # above the progress bar, not glued to it
                progress.write(f"{run.label}epoch {epoch + 1}: {run.task.describe(run.after, run.inputs)}", file=sys.stdout)
    finally:
        progress.close()


def record_step(run: TrainingRun, epoch: int, seen: int, loss: float, progress: tqdm) -> None:
    """After an optimizer step: the freeze timeline, the progress bar, the trackers, a checkpoint when due."""
    args, accelerator = run.args, run.accelerator
    run.steps += 1
    if run.slimfit is not None:
        units = run.slimfit.units
        trained = set(run.slimfit.controller.trainable)
        run.timeline.append([i for i, unit in enumerate(units.schedulable) if unit.name in trained])
        trained_numel = sum(u.numel for u in units.always_trained) + sum(u.numel for u in units.schedulable if u.name in trained)
        fraction = trained_numel / sum(u.numel for u in units.all)
    else:
        fraction = 1.0
    lr = run.lr_sched.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(epoch=epoch, loss=f"{loss:.3f}", lr=f"{lr:.2e}")
    if args.report_to != "none":
        last = run.meter.last
        accelerator.log({"loss": loss, "lr": lr, "trainable_fraction": fraction,
                         "activation_bytes_stored": last.activations if last else 0,
                         "activation_bytes_raw": last.activations_raw if last else 0}, step=run.steps)
    if run.output_dir and args.checkpointing_steps and run.steps % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, checkpoint_dir(run.output_dir, run.steps),
                        {"step": run.steps, "epoch": epoch, "batches_in_epoch": seen, "timeline": run.timeline,
                         "epochs": run.epochs, "args": {k: getattr(args, k) for k in RESUME_SAME}})


def finish(run: TrainingRun) -> dict:
    """Print the outcome and SlimFit's report; write summary.json and the final model; set ``run.result``."""
    args, accelerator, label = run.args, run.accelerator, run.label
    seconds_per_step = sum(run.step_seconds) / max(len(run.step_seconds), 1)
    accelerator.print(f"{label}trained {run.steps} optimizer steps ({seconds_per_step:.2f} s/step, {accelerator.num_processes} process(es))")
    accelerator.print(f"{label}before training: {run.task.describe(run.before, run.inputs)}")
    accelerator.print(f"{label}after training:  {run.task.describe(run.after, run.inputs)}")
    for line in run.task.details(run.after, run.inputs):
        accelerator.print(f"{label}{line}")
    report = None
    if run.slimfit is not None:
        report = run.slimfit.report()  # every rank calls it: the report may gather across ranks
        accelerator.print(report.render())
    run.result = {
        "task": getattr(run.task, "name", type(run.task).__name__),
        **run.task.results(run.before, run.after, run.inputs),
        "epochs": run.epochs,
        "steps": run.steps,
        "seconds_per_step": seconds_per_step,
        "memory": run.meter.summary().to_dict(),
        "report": report.to_dict() if report is not None else None,
        "units": [u.name for u in run.slimfit.units.schedulable] if run.slimfit is not None else [],
        "timeline": run.timeline,
        "adapters": run.adapters,
    }
    if run.output_dir:
        output_dir = Path(run.output_dir)
        save_final(accelerator, run.model, run.task, run.inputs, output_dir, masters=run.slimfit.master_weights if run.slimfit else None)
        if accelerator.is_main_process:
            write_summary(output_dir / "summary.json", {
                **{k: v for k, v in run.result.items() if k != "report"}, "freeze": _freeze_summary(run.result["report"]),
                "data": run.task.data_summary(run.inputs),
                "args": vars(args), "slimfit_config": run.slimfit.config.model_dump(mode="json") if run.slimfit is not None else None,
                "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            })
        accelerator.print(f"{label}wrote {output_dir}/summary.json and the model to {output_dir}/final")
    if args.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return run.result


def cleanup(run: TrainingRun) -> None:
    """Leave nothing of the run behind: SlimFit detached (hooks removed, every unit trainable
    again) or the meter closed, the Accelerator's and the run's references dropped, garbage
    collected and the device cache emptied (``free_memory`` does both). Safe after an error."""
    if run.slimfit is not None:
        run.slimfit.detach()
    elif run.meter is not None:
        run.meter.close()
    run.model = run.optimizer = run.lr_sched = run.train_dl = run.test_dl = None
    run.meter = run.step_context = run.slimfit = None
    run.accelerator.free_memory()


def save_final(accelerator: Accelerator, model, task: Task, inputs: Inputs, output_dir: Path, masters=None) -> None:
    """``OUTPUT/final``: the model, loadable with ``from_pretrained``, and the task's files with it
    (classification: tokenizer or image processor, and ``OUTPUT/labels.json``). With
    ``master_weights: host`` (``masters``) the trained weights are their fp32 masters, not the
    bf16 copies the device computed with."""
    final = output_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "merge_and_unload"):  # LoRA: fold the adapters in, so final/ is a plain model
        if accelerator.is_main_process:
            unwrapped.merge_and_unload().save_pretrained(final)
    else:
        try:
            state = accelerator.get_state_dict(model)  # every rank: ZeRO-3 gathers the partitions
        except ValueError as err:  # ZeRO-3 without 16-bit gathering on save
            raise RecipeError(f"cannot save {final}: {str(err).splitlines()[0]} (set zero3_save_16bit_model: true "
                              f"in the accelerate config, as accelerate_configs/zero3.yaml does)") from None
        if masters is not None:
            params = dict(unwrapped.named_parameters(remove_duplicate=False))
            for name in state:
                master = masters.of(params[name]) if name in params else None
                if master is not None:
                    state[name] = master.host
        unwrapped.save_pretrained(final, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state)
    if accelerator.is_main_process:
        task.save_extras(inputs, output_dir)
    accelerator.wait_for_everyone()


def _freeze_summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {k: v for k, v in report.items() if k not in ("memory", "trained_steps")} | {"trained_steps": report["trained_steps"]}


def _flat_config(args: argparse.Namespace) -> dict:
    """Tracker configs take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def offline_by_default() -> None:
    """The command line never reaches for the Hub (the model and data are local, or inside installed
    packages) unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set. The Hub libraries read
    it when imported, which this module has done, so their flags are set as well."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return  # the user's choice
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read by transformers and huggingface_hub per call
    if "HF_DATASETS_OFFLINE" not in os.environ:
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def cli(argv: list[str] | None = None) -> None:
    """``main`` for the command line, offline by default: bad input or setup exits 2 with one clear line."""
    from slimfit_accel.errors import SlimFitError

    offline_by_default()
    try:
        main(argv)
    except SlimFitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
