"""What a task gives the recipe's shared training loop (``slimfit_accel/finetune.py``).

A task is the part of a fine-tuning run that depends on what is learnt: which model folders it
accepts, how its rows become batches for ``model(**batch)`` (which returns a ``loss``), how the
model is scored, and what a score line says. The loop (optimizer, schedule, SlimFit, checkpoints,
memory, summary, cleanup) is the same for every task.

``classification.ClassificationTask`` is text and image classification, ``sft_task.SFTTask``
supervised fine-tuning of a causal language model. Another task is one more class with these
attributes and methods; ``finetune.main(argv, task=...)`` runs it and the loop runs it unchanged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from datasets import DatasetDict
from torch import nn


@dataclass
class Inputs:
    """A task's loaded and checked inputs, shared by every run (and every ``--compare`` arm)."""

    model_path: str
    preprocessor: Any  # tokenizer or image processor: saved next to the final model
    encoded: DatasetDict  # "train" and "test" rows, ready for the loaders
    data: Any  # the task's own view of the rows (classification: ``LabeledData``)
    notes: list[str] = field(default_factory=list)  # printed once, before training
    collate: Callable | None = None  # the loaders' collate_fn (None: torch's default)


class Task(Protocol):
    """The per-task pieces; every method raises ``RecipeError`` for an input it cannot use."""

    name: str  # what --task calls it; recorded in summary.json
    untrained: str  # what the first evaluation scores ("untrained head", "as loaded")
    new_head: bool  # the model gets a newly initialised head (LoRA arms then train it whole)
    peft_task_type: str | None  # PEFT's task_type for LoRA arms (None: PEFT's generic wrapper)
    default_max_length: int  # --max-length when none is given
    compare_columns: tuple[tuple[str, str, str], ...]  # --compare table: (header, result key, format)

    def check_model(self, model_path: str) -> None:
        """Cheap checks of the model folder (files only), made before any data is read."""

    def load_inputs(self, args: argparse.Namespace, model_path: str) -> Inputs:
        """Read, check and encode the data for this model."""

    def build_model(self, inputs: Inputs) -> nn.Module:
        """The model to train (called after the seed is set: new heads start the same)."""

    def evaluate(self, accelerator: Any, model: nn.Module, test_dl: Any, inputs: Inputs) -> dict[str, Any]:
        """Scores on the test rows, gathered over every process (numbers; other values, such as
        examples to show, are kept out of the per-epoch records and the trackers)."""

    def describe(self, scores: dict[str, float], inputs: Inputs) -> str:
        """One line for a score dictionary (with whatever baseline makes it meaningful)."""

    def details(self, scores: dict[str, Any], inputs: Inputs) -> list[str]:
        """Lines printed once after training, below the final scores (may be none)."""

    def results(self, before: dict[str, float], after: dict[str, float], inputs: Inputs) -> dict[str, Any]:
        """The run result's score fields (they lead ``summary.json`` and ``compare.json``)."""

    def compare_note(self, result: dict[str, Any]) -> str:
        """The line under the ``--compare`` table (a baseline shared by every arm)."""

    def data_summary(self, inputs: Inputs) -> dict[str, Any]:
        """What ``summary.json`` records about the data."""

    def save_extras(self, inputs: Inputs, output_dir: Path) -> None:
        """Files that go with the final model (main process only): preprocessor, label names."""
