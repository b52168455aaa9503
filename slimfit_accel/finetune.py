"""Fine-tune a classifier with SlimFit, under any Accelerate setup: your data, your model.

Read top to bottom: arguments -> checks (nothing is written until every input is known good)
-> Accelerator -> data -> model -> SlimFit -> optimizer -> prepare -> first freeze decision ->
train (checkpoints, per-epoch evaluation) -> summary and final model. Copy it and change what
you need; data sources and tasks live in ``slimfit_accel/recipes/``.

    slimfit-accel finetune --train-file reviews.csv --text-column review --label-column stars \\
        --model ./my-bert --output-dir runs/reviews
    accelerate launch --config_file accelerate_configs/zero2_offload.yaml launch/finetune.py \\
        --slimfit-config launch/configs/demo.yaml
    python -m slimfit_accel.finetune --compare full,slimfit --output-dir runs/compare
    torchrun --nproc_per_node 2 -m slimfit_accel.finetune  # DDP on CPU (gloo)

Defaults: the packaged all-MiniLM-L6-v2 and 2000 / 1000 Rotten Tomatoes snippets (split by
movie), 2 epochs, batch 32, 64 tokens, AdamW with linear decay and no warm-up (as SlimFit).
"""

from __future__ import annotations

import os

# The model and data come inside installed packages: never reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    set_seed,
)
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_scheduler  # noqa: E402

from slimfit_accel import SlimFit  # noqa: E402
from slimfit_accel.memory import MemoryMeter  # noqa: E402
from slimfit_accel.model_assets import default_model_path  # noqa: E402
from slimfit_accel.recipes import RecipeError  # noqa: E402
from slimfit_accel.recipes.checkpoints import checkpoint_dir, read_state, resolve_resume, save_checkpoint  # noqa: E402
from slimfit_accel.recipes.data import BUILTIN, LabeledData, load_data  # noqa: E402
from slimfit_accel.recipes.evaluation import baseline_scores, describe, evaluate  # noqa: E402
from slimfit_accel.recipes.summary import write_summary  # noqa: E402
from slimfit_accel.recipes.tasks import check_model_folder, check_vocabulary, encode, load_model, load_preprocessor, model_task  # noqa: E402

LR_SCHEDULERS = ("linear", "constant", "cosine")
TRACKERS = ("tensorboard", "wandb", "all", "none")
#: Settings a resumed run must share with the run that saved the checkpoint (else batches and steps differ).
RESUME_SAME = ("train_file", "test_file", "dataset", "train_size", "test_size", "split_seed", "seed", "epochs",
               "batch_size", "grad_accum", "max_length", "lr", "lr_scheduler", "warmup_ratio", "max_steps")


def default_slimfit_config() -> str:
    """The packaged demo config (a copy to edit lives in ``launch/configs/demo.yaml``)."""
    return str(resources.files("slimfit_accel") / "configs" / "demo.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slimfit-accel finetune",
        description="Fine-tune a text or image classifier with SlimFit (or compare it with full fine-tuning).",
    )
    slimfit = parser.add_mutually_exclusive_group()
    slimfit.add_argument("--slimfit-config", metavar="PATH", default=None,
                         help="SlimFit YAML config (default: the packaged demo config)")
    slimfit.add_argument("--no-slimfit", action="store_true",
                         help="plain full fine-tuning, for comparison")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="local Hugging Face model folder (default: packaged all-MiniLM-L6-v2)")

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
    train.add_argument("--max-length", type=int, default=64, help="tokens per text")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps spent warming the learning rate up")
    train.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear", help="learning-rate schedule after warm-up")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--seed", type=int, default=0, help="head initialisation and data order (not the split: --split-seed)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", metavar="DIR", default=None,
                     help="write summary.json, checkpoints and the final model (final/) here")
    out.add_argument("--checkpointing-steps", type=int, default=None, metavar="N", help="save a resumable checkpoint every N optimizer steps")
    out.add_argument("--resume-from-checkpoint", metavar="DIR|latest", default=None,
                     help="continue from OUTPUT/checkpoints/step_N, or the newest one under --output-dir")
    out.add_argument("--report-to", choices=TRACKERS, default="none", help="log loss, lr, trainable share and activation bytes per step")
    out.add_argument("--compare", metavar="ARMS", default=None,
                     help="train these arms on the same data, split and seed and compare them: full,slimfit[,freeze_only,lisa,lora]")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Numbers that cannot train, refused before anything is loaded or written."""
    at_least_one = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--epochs": args.epochs,
                    "--max-length": args.max_length, "--train-size": args.train_size, "--test-size": args.test_size,
                    "--max-steps": args.max_steps, "--checkpointing-steps": args.checkpointing_steps}
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise RecipeError(f"{flag} must be at least 1, got {value}")
    if not args.lr > 0:
        raise RecipeError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise RecipeError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        raise RecipeError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.test_file and not args.train_file:
        raise RecipeError("--test-file needs --train-file")
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


def build_accelerator(grad_accum: int, find_unused_parameters: bool, report_to: str = "none", output_dir: str | None = None) -> Accelerator:
    """An Accelerator that also works with no GPU, with a reproducible data order.

    Without a GPU, Accelerate only sets up a process group when told to: gloo for DeepSpeed
    (else each process thinks it is alone and DeepSpeed's batch-size check fails), and
    ``cpu=True`` for DDP (torchrun gives MULTI_CPU). ``cpu=True`` would switch DeepSpeed off,
    so it is only set without DeepSpeed; a single unlaunched process must not ask for gloo (no
    process group is made for it). Frozen units get no gradient, so under SlimFit DDP must not
    expect one (``find_unused_parameters``). The seedable sampler draws epoch e's order from
    (seed, e), which is what lets a resumed run take the same batches.
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    cpu = False
    if not torch.cuda.is_available():
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
        if launched:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers = None if report_to == "none" else report_to
    return Accelerator(
        cpu=cpu, gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers, project_dir=output_dir if trackers else None,
    )


@dataclass
class Inputs:
    """Everything checked before training: the model folder, its preprocessor, the data."""

    model_path: str
    task: str
    preprocessor: Any
    data: LabeledData
    encoded: datasets.DatasetDict
    notes: list[str]


def load_inputs(args: argparse.Namespace, accelerator: Accelerator) -> Inputs:
    """Model folder, preprocessor and data, each checked; a ``RecipeError`` names the first problem."""
    try:
        model_path = args.model or default_model_path()
    except ImportError as err:
        raise RecipeError(" ".join(str(err).split())) from None
    check_model_folder(model_path)
    with accelerator.main_process_first():  # the main process loads and tokenizes, the others reuse its cache
        data = load_data(
            args.dataset, train_file=args.train_file, test_file=args.test_file, test_fraction=args.test_fraction,
            text_column=args.text_column, image_column=args.image_column, label_column=args.label_column,
            train_size=args.train_size, test_size=args.test_size, split_seed=args.split_seed,
        )
        task = model_task(model_path)
        if task != data.task:
            raise RecipeError(f"--model {model_path} is a{'n' if task == 'image' else ''} {task} model but {data.source} holds {data.task}; "
                              f"pass a {data.task} model or the {task} column")
        preprocessor, note = load_preprocessor(model_path, task)
        if task == "text":
            check_vocabulary(preprocessor, list(data.splits["train"][:200]["text"]), model_path)
        channels = getattr(transformers.AutoConfig.from_pretrained(model_path), "num_channels", 3)
        encoded = encode(data.splits, task, preprocessor, args.max_length, num_channels=channels)
    return Inputs(model_path, task, preprocessor, data, encoded, [note] if note else [])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    # The SlimFit configs first: a bad one fails here, before any data or model is loaded.
    if args.compare:
        from slimfit_accel.recipes.compare import arm_slimfits

        arms = arm_slimfits(args.compare, args.slimfit_config or default_slimfit_config())
    else:
        arms = {"run": None if args.no_slimfit else SlimFit.from_config(args.slimfit_config or default_slimfit_config())}
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if resume is not None:
        changed = {k: (v, getattr(args, k)) for k, v in read_state(resume).get("args", {}).items() if getattr(args, k) != v}
        if changed:
            key, (then, now) = next(iter(changed.items()))
            raise RecipeError(f"--resume-from-checkpoint {resume}: it was made with --{key.replace('_', '-')} {then}, "
                              f"this run has {now}; resume with the same settings")
    accelerator = build_accelerator(args.grad_accum, find_unused_parameters=any(s is not None for s in arms.values()),
                                    report_to=args.report_to, output_dir=args.output_dir)
    if not accelerator.is_local_main_process:  # one copy of the logs and progress bars
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    inputs = load_inputs(args, accelerator)
    for note in inputs.notes:
        accelerator.print(f"note: {note}")
    if args.compare:
        from slimfit_accel.recipes.compare import run_compare

        def fresh_accelerator() -> Accelerator:  # each arm its own: nothing of the previous arm stays registered
            return build_accelerator(args.grad_accum, find_unused_parameters=True, report_to=args.report_to, output_dir=args.output_dir)

        return run_compare(args, accelerator, inputs, arms, train, fresh_accelerator)
    return train(args, accelerator, inputs, arms["run"], output_dir=args.output_dir, resume=resume)


def train(args, accelerator: Accelerator, inputs: Inputs, slimfit: SlimFit | None, output_dir: str | None,
          resume: Path | None = None, label: str = "", before: dict | None = None, adapt=None) -> dict:
    """One fine-tuning run; returns its metrics. ``slimfit=None``: full fine-tuning, measured the same way.

    ``before``: the untrained model's scores when already known (arms of a comparison share them).
    ``adapt``: turns the loaded model into what trains (e.g. LoRA adapters around it).
    """
    data = inputs.data
    num_classes = len(data.label_names)
    set_seed(args.seed)  # head initialisation and the data order

    # Model: the pretrained body plus a new, randomly initialised head for these classes.
    pad_id = getattr(inputs.preprocessor, "pad_token_id", None)
    model = load_model(inputs.model_path, inputs.task, data.label_names, pad_token_id=pad_id)
    # SlimFit wraps the model before `prepare`: DDP and ZeRO record every candidate as trainable.
    if adapt is not None:
        model = adapt(model)
    if slimfit is not None:
        model = slimfit.prepare_model(model)

    # The loader's own generator: starting an epoch then draws nothing from the global RNG, so a
    # run resumed mid-epoch sees the same dropout masks as one that never stopped.
    order = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(inputs.encoded["train"], batch_size=args.batch_size, shuffle=True, generator=order)
    test_dl = DataLoader(inputs.encoded["test"], batch_size=args.batch_size * 2)
    # Optimizer steps per process: the prepared dataloader is sharded across processes, and
    # Accelerate syncs (steps) at the end of each epoch even mid-accumulation.
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    total_steps = math.ceil(batches_per_process / args.grad_accum) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
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
        unit_numel = {u.name: u.numel for u in slimfit.units.all}
        always_numel = sum(u.numel for u in slimfit.units.always_trained)
        unit_names = [u.name for u in slimfit.units.schedulable]
    else:  # full fine-tuning: the same meter, nothing frozen
        meter = MemoryMeter(model, optimizer)
        step_context, unit_names = meter.step, []

    test_labels = torch.tensor(data.splits["test"]["label"])
    majority = data.majority_class()
    baseline = baseline_scores(majority, test_labels, num_classes)
    before = before or evaluate(accelerator, model, test_dl, num_classes)
    accelerator.print(f"{label}before training (untrained head): {describe(before, baseline, data.label_names[majority])}")

    start_epoch = skip = steps = 0
    timeline: list[list[int]] = []  # per optimizer step: the schedulable units trained
    epochs: list[dict] = []
    if resume is not None:
        # After the first evaluation, as in the run that saved it: the random states restored here
        # are the ones its next step started from.
        accelerator.load_state(str(resume))  # weights, optimizer, schedule, random states, freeze controller
        state = read_state(resume)
        start_epoch, skip, steps = state["epoch"], state["batches_in_epoch"], state["step"]
        timeline, epochs = state["timeline"], state["epochs"]
        accelerator.print(f"resumed from {resume} at optimizer step {steps} (epoch {start_epoch}, batch {skip})")

    if args.report_to != "none":
        accelerator.init_trackers("slimfit-finetune" + (f"-{label.strip(' []')}" if label else ""), config=_flat_config(args))

    # Train.
    model.train()
    progress = tqdm(total=total_steps, initial=steps, desc=f"{label}fine-tuning", disable=not accelerator.is_local_main_process)
    step_seconds, after = [], before
    for epoch in range(start_epoch, args.epochs):
        if steps >= total_steps:
            break
        train_dl.set_epoch(epoch)  # this epoch's order comes from (seed, epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        seen, skip = skip, 0
        step_started = time.perf_counter()
        for batch in loader:
            seen += 1
            with accelerator.accumulate(model), step_context():
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            steps += 1
            step_seconds.append(time.perf_counter() - step_started)
            if slimfit is not None:
                trained = set(slimfit.controller.trainable)
                timeline.append([i for i, name in enumerate(unit_names) if name in trained])
                fraction = (always_numel + sum(unit_numel[n] for n in trained)) / sum(unit_numel.values())
            else:
                fraction = 1.0
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
            if args.report_to != "none":
                last = meter.last
                accelerator.log({"loss": loss.item(), "lr": lr_sched.get_last_lr()[0], "trainable_fraction": fraction,
                                 "activation_bytes_stored": last.activations if last else 0,
                                 "activation_bytes_raw": last.activations_raw if last else 0}, step=steps)
            if output_dir and args.checkpointing_steps and steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, checkpoint_dir(output_dir, steps),
                                {"step": steps, "epoch": epoch, "batches_in_epoch": seen, "timeline": timeline, "epochs": epochs,
                                 "args": {k: getattr(args, k) for k in RESUME_SAME}})
            if steps >= total_steps:
                break
            step_started = time.perf_counter()
        after = evaluate(accelerator, model, test_dl, num_classes)
        epochs.append({"epoch": epoch + 1, "step": steps, **after})
        if args.report_to != "none":
            accelerator.log({"test_accuracy": after["accuracy"], "test_macro_f1": after["macro_f1"]}, step=steps)
        if accelerator.is_main_process:  # above the progress bar, not glued to it
            progress.write(f"{label}epoch {epoch + 1}: {describe(after, baseline, data.label_names[majority])}", file=sys.stdout)
    progress.close()
    seconds_per_step = sum(step_seconds) / max(len(step_seconds), 1)
    accelerator.print(f"{label}trained {steps} optimizer steps ({seconds_per_step:.2f} s/step, {accelerator.num_processes} process(es))")
    accelerator.print(f"{label}test accuracy before: {before['accuracy']:.3f}  after: {after['accuracy']:.3f}  "
                      f"(macro-F1 {after['macro_f1']:.3f}, majority baseline {baseline['accuracy']:.3f})")

    report = None
    if slimfit is not None:
        report = slimfit.report()  # every rank calls it: the report may gather across ranks
        accelerator.print(report.render())
    memory = meter.summary()
    if slimfit is None:
        meter.close()

    result = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "macro_f1": after["macro_f1"],
        "macro_f1_before": before["macro_f1"],
        "majority_baseline": {"class": data.label_names[majority], **baseline},
        "epochs": epochs,
        "steps": steps,
        "seconds_per_step": seconds_per_step,
        "memory": memory.to_dict(),
        "report": report.to_dict() if report is not None else None,
        "units": unit_names,
        "timeline": timeline,
        "adapters": adapt is not None,
    }
    if output_dir:
        save_final(accelerator, model, inputs, Path(output_dir))
        if accelerator.is_main_process:
            write_summary(Path(output_dir) / "summary.json", {
                **{k: v for k, v in result.items() if k != "report"}, "freeze": _freeze_summary(result["report"]),
                "data": {"source": data.source, "task": data.task, "labels": data.label_names, "sizes": data.sizes},
                "args": vars(args), "slimfit_config": slimfit.config.model_dump(mode="json") if slimfit is not None else None,
                "processes": accelerator.num_processes,
            })
        accelerator.print(f"{label}wrote {output_dir}/summary.json and the model to {output_dir}/final")
    if args.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return result


def save_final(accelerator: Accelerator, model, inputs: Inputs, output_dir: Path) -> None:
    """``OUTPUT/final``: model, config (with the class names) and tokenizer or image processor,
    loadable with ``from_pretrained``; ``OUTPUT/labels.json`` maps class ids to names."""
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
        unwrapped.save_pretrained(final, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state)
    if accelerator.is_main_process:
        inputs.preprocessor.save_pretrained(final)
        (output_dir / "labels.json").write_text(json.dumps(dict(enumerate(inputs.data.label_names)), indent=2))
    accelerator.wait_for_everyone()


def _freeze_summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {k: v for k, v in report.items() if k not in ("memory", "trained_steps")} | {"trained_steps": report["trained_steps"]}


def _flat_config(args: argparse.Namespace) -> dict:
    """Tracker configs take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def cli(argv: list[str] | None = None) -> None:
    """``main`` for the command line: bad input or setup exits 2 with one clear line."""
    from slimfit_accel.errors import SlimFitError

    try:
        main(argv)
    except SlimFitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
