"""Text and image classification as a recipe task: a classifier with a new head for the data's
classes, scored by accuracy and macro-F1 next to the majority-class baseline.

Example::

    task = ClassificationTask()
    task.check_model("./my-bert")                      # files only: nothing is read yet
    inputs = task.load_inputs(args, "./my-bert")       # data read, checked and tokenized
    model = task.build_model(inputs)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from . import RecipeError
from .data import LabeledData, load_data
from .evaluation import baseline_scores, describe, evaluate
from .protocol import Inputs
from .tasks import check_model_folder, check_vocabulary, encode, load_model, load_preprocessor, model_task


class ClassificationTask:
    """See the module docstring; implements ``protocol.Task``."""

    name = "classification"
    untrained = "untrained head"
    new_head = True
    peft_task_type = None
    default_max_length = 64
    compare_columns = (("accuracy", "accuracy_after", ".3f"), ("macro-F1", "macro_f1", ".3f"))

    def check_model(self, model_path: str) -> None:
        check_model_folder(model_path)

    def load_inputs(self, args: argparse.Namespace, model_path: str) -> Inputs:
        data = load_data(
            args.dataset, train_file=args.train_file, test_file=args.test_file, test_fraction=args.test_fraction,
            text_column=args.text_column, image_column=args.image_column, label_column=args.label_column,
            train_size=args.train_size, test_size=args.test_size, split_seed=args.split_seed,
        )
        kind = model_task(model_path)
        if kind != data.task:
            raise RecipeError(f"--model {model_path} is a{'n' if kind == 'image' else ''} {kind} model but {data.source} holds {data.task}; "
                              f"pass a {data.task} model or the {kind} column")
        preprocessor, note = load_preprocessor(model_path, kind)
        if kind == "text":
            check_vocabulary(preprocessor, list(data.splits["train"][:200]["text"]), model_path)
        channels = getattr(transformers.AutoConfig.from_pretrained(model_path), "num_channels", 3)
        encoded = encode(data.splits, kind, preprocessor, args.max_length, num_channels=channels)
        return Inputs(model_path, preprocessor, encoded, data, [note] if note else [])

    def build_model(self, inputs: Inputs) -> torch.nn.Module:
        data: LabeledData = inputs.data
        pad_id = getattr(inputs.preprocessor, "pad_token_id", None)
        return load_model(inputs.model_path, data.task, data.label_names, pad_token_id=pad_id)

    def evaluate(self, accelerator: Any, model: torch.nn.Module, test_dl: Any, inputs: Inputs) -> dict[str, float]:
        return evaluate(accelerator, model, test_dl, len(inputs.data.label_names))

    def describe(self, scores: dict[str, float], inputs: Inputs) -> str:
        majority, baseline = self._baseline(inputs)
        return describe(scores, baseline, inputs.data.label_names[majority])

    def details(self, scores: dict[str, float], inputs: Inputs) -> list[str]:
        return []

    def results(self, before: dict[str, float], after: dict[str, float], inputs: Inputs) -> dict[str, Any]:
        majority, baseline = self._baseline(inputs)
        return {
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "macro_f1": after["macro_f1"],
            "macro_f1_before": before["macro_f1"],
            "majority_baseline": {"class": inputs.data.label_names[majority], **baseline},
        }

    def compare_note(self, result: dict[str, Any]) -> str:
        baseline = result["majority_baseline"]
        return (f"majority-class baseline (always {baseline['class']!r}): accuracy {baseline['accuracy']:.3f}, "
                f"macro-F1 {baseline['macro_f1']:.3f}")

    def data_summary(self, inputs: Inputs) -> dict[str, Any]:
        data: LabeledData = inputs.data
        return {"source": data.source, "task": data.task, "labels": data.label_names, "sizes": data.sizes}

    def save_extras(self, inputs: Inputs, output_dir: Path) -> None:
        """``final/`` gets the tokenizer or image processor; ``labels.json`` maps class ids to names."""
        inputs.preprocessor.save_pretrained(output_dir / "final")
        (output_dir / "labels.json").write_text(json.dumps(dict(enumerate(inputs.data.label_names)), indent=2))

    @staticmethod
    def _baseline(inputs: Inputs) -> tuple[int, dict[str, float]]:
        data: LabeledData = inputs.data
        majority = data.majority_class()
        test_labels = torch.tensor(data.splits["test"]["label"])
        return majority, baseline_scores(majority, test_labels, len(data.label_names))
