"""Fine-tune a BERT-style classifier on Rotten Tomatoes with SlimFit, under any Accelerate setup.

Read top to bottom: arguments -> Accelerator -> data -> model -> SlimFit -> optimizer ->
prepare -> evaluate -> train -> evaluate -> report. Copy it and change what you need.

    accelerate launch --config_file accelerate_configs/cpu.yaml -m slimfit_accel.finetune
    accelerate launch --config_file accelerate_configs/zero2_offload.yaml launch/finetune.py \\
        --slimfit-config launch/configs/demo.yaml
    python -m slimfit_accel.finetune --no-slimfit          # plain full fine-tuning, to compare
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
import contextlib  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import resources  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    set_seed,
)
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from slimfit_accel import SlimFit  # noqa: E402
from slimfit_accel.model_assets import default_model_path  # noqa: E402
from slimfit_accel.rotten_tomatoes import LABEL_NAMES, load_rotten_tomatoes, tokenize_splits  # noqa: E402


def default_slimfit_config() -> str:
    """The packaged demo config (a copy to edit lives in ``launch/configs/demo.yaml``)."""
    return str(resources.files("slimfit_accel") / "configs" / "demo.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slimfit_accel.finetune",
        description="Fine-tune a sequence classifier on Rotten Tomatoes with SlimFit.",
    )
    slimfit = parser.add_mutually_exclusive_group()
    slimfit.add_argument("--slimfit-config", metavar="PATH", default=None,
                         help="SlimFit YAML config (default: the packaged demo config)")
    slimfit.add_argument("--no-slimfit", action="store_true",
                         help="plain full fine-tuning, for comparison")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="local Hugging Face checkpoint folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--train-size", type=int, default=2000, help="training snippets")
    parser.add_argument("--test-size", type=int, default=1000, help="test snippets")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per snippet")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--seed", type=int, default=0, help="data split, shuffling, head init")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="if given, save the final state with accelerator.save_state")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps (smoke tests)")
    return parser.parse_args(argv)


def build_accelerator(grad_accum: int, find_unused_parameters: bool) -> Accelerator:
    """An Accelerator that also works with no GPU.

    Without a GPU, Accelerate only sets up a process group when told to: gloo for DeepSpeed
    (else each process thinks it is alone and DeepSpeed's batch-size check fails), and
    ``cpu=True`` for DDP (torchrun gives MULTI_CPU). ``cpu=True`` would switch DeepSpeed off,
    so it is only set without DeepSpeed; a single unlaunched process must not ask for gloo (no
    process group is made for it). Frozen units get no gradient, so under SlimFit DDP must not
    expect one (``find_unused_parameters``).
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    cpu = False
    if not torch.cuda.is_available():
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
        if launched:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, test_dl) -> float:
    """Accuracy over the whole test set, gathered from every process (no duplicates)."""
    model.eval()
    correct = total = 0
    for batch in test_dl:
        predictions = model(**batch).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # The SlimFit config first: a bad one fails here, before any data or model is loaded.
    slimfit = None if args.no_slimfit else SlimFit.from_config(args.slimfit_config or default_slimfit_config())
    accelerator = build_accelerator(args.grad_accum, find_unused_parameters=not args.no_slimfit)
    if not accelerator.is_local_main_process:  # one copy of the logs and progress bars
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    set_seed(args.seed)
    model_path = args.model or default_model_path()

    # Data: tokenized once, on the main process first so the others reuse its work.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with accelerator.main_process_first():
        splits = load_rotten_tomatoes(args.train_size, args.test_size, seed=args.seed)
        splits = tokenize_splits(splits, tokenizer, max_length=args.max_length)
    train_dl = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True)
    test_dl = DataLoader(splits["test"], batch_size=args.batch_size * 2)

    # Model: the pretrained encoder plus a new, randomly initialised classifier head.
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(LABEL_NAMES),
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
    )

    # SlimFit wraps the model before `prepare`: DDP and ZeRO record every candidate as trainable.
    if slimfit is not None:
        model = slimfit.prepare_model(model)

    # Optimizer steps per process: the prepared dataloader is sharded across processes, and
    # Accelerate syncs (steps) at the end of each epoch even mid-accumulation.
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    total_steps = math.ceil(batches_per_process / args.grad_accum) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Accelerate steps a prepared scheduler once per process per optimizer step.
    lr_sched = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=0, num_training_steps=total_steps * accelerator.num_processes
    )

    model, optimizer, train_dl, lr_sched = accelerator.prepare(model, optimizer, train_dl, lr_sched)
    test_dl = accelerator.prepare(test_dl)

    accuracy_before = evaluate(accelerator, model, test_dl)
    accelerator.print(f"test accuracy before training (untrained head): {accuracy_before:.3f}")

    if slimfit is not None:
        slimfit.attach(accelerator, model, optimizer, total_steps=total_steps)
    slimfit_step = slimfit.step if slimfit is not None else contextlib.nullcontext

    # Train.
    model.train()
    progress = tqdm(total=total_steps, desc="fine-tuning", disable=not accelerator.is_local_main_process)
    steps, started = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for batch in train_dl:
            with accelerator.accumulate(model), slimfit_step():
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                steps += 1
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}",
                                     lr=f"{lr_sched.get_last_lr()[0]:.2e}")
            if steps >= total_steps:
                break
        if steps >= total_steps:
            break
    progress.close()
    train_seconds = time.perf_counter() - started
    seconds_per_step = train_seconds / max(steps, 1)
    accelerator.print(f"trained {steps} optimizer steps in {train_seconds:.1f} s "
                      f"({seconds_per_step:.2f} s/step, {accelerator.num_processes} process(es))")

    accuracy_after = evaluate(accelerator, model, test_dl)
    accelerator.print(f"test accuracy before: {accuracy_before:.3f}  after: {accuracy_after:.3f}")

    report = None
    if slimfit is not None:
        report = slimfit.report()  # every rank calls it: the report may gather across ranks
        accelerator.print(report.render())

    if args.output_dir:
        accelerator.save_state(args.output_dir)
        accelerator.print(f"saved state to {args.output_dir}")

    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "steps": steps,
        "seconds_per_step": seconds_per_step,
        "report": report.to_dict() if report is not None else None,
    }


def cli() -> None:
    """``main`` for the command line: a bad config or setup exits 2 with one clear line."""
    from slimfit_accel.errors import SlimFitError

    try:
        main()
    except SlimFitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
