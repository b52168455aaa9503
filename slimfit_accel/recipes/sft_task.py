"""Supervised fine-tuning (SFT) of a causal language model as a recipe task.

The rows come in TRL's formats (``recipes/sft.py``): conversational ``messages``, ``prompt`` +
``completion`` (strings or message lists) or plain ``text``; the tokenizer's chat template
renders message lists. The loss is on the completion / assistant tokens unless
``--train-on-prompt``. ``--max-length`` truncation is counted, never silent: rows whose
completion lost tokens and rows skipped with nothing left to learn are printed once and recorded
in ``summary.json``. Scores: held-out loss and perplexity on the completion tokens, and with
``--eval-generate N`` greedy answers to N test prompts, exact match after whitespace and case
normalisation (a few examples printed after training).

Example::

    task = SFTTask()
    task.check_model(resolve_model("smollm2"))         # files only: nothing is read yet
    inputs = task.load_inputs(args, path)              # rows read, checked and tokenized
    model = task.build_model(inputs)                   # AutoModelForCausalLM, fp32
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from . import RecipeError
from .protocol import Inputs
from .sft import (
    MESSAGES,
    TEXT,
    SFTCollator,
    SFTData,
    completion_loss,
    detect_format,
    generate_exact_match,
    pad_token_id,
    tokenize_sft,
)
from .tasks import _load, check_model_folder, check_vocabulary, ensure_pad_token

#: ``--max-length`` when none is given (TRL's ``SFTConfig`` default).
DEFAULT_MAX_LENGTH = 1024
#: Generated answers printed after training.
SHOWN_EXAMPLES = 3


def is_sft_columns(columns: list[str] | None) -> bool:
    """Columns only SFT data has: ``messages``, ``prompt`` or ``completion`` (one without the
    other is SFT data with a column missing, which the SFT task then names)."""
    return columns is not None and bool({MESSAGES, "prompt", "completion"} & set(columns))


def peek_columns(args: argparse.Namespace) -> list[str] | None:
    """The training rows' column names, read cheaply (a CSV header, the first JSON line, a
    Parquet schema, a ``save_to_disk`` folder's features); None when they cannot be told
    without loading the data (a Hub name, a built-in set, an unreadable file: the loader says why)."""
    if args.train_file:
        path = Path(args.train_file)
        suffix = path.suffix.lower()
        try:
            if suffix == ".csv":
                with path.open(newline="") as handle:
                    return next(csv.reader(handle), [])
            if suffix in (".json", ".jsonl"):
                with path.open() as handle:
                    for line in handle:
                        if line.strip():
                            first = json.loads(line)
                            return list(first) if isinstance(first, dict) else None
                    return None
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                return list(pq.read_schema(path).names)
        except (OSError, ValueError, UnicodeDecodeError):
            return None  # the loader reports the file's problem in its own words
        return None
    folder = Path(args.dataset)
    for info in (folder / "dataset_info.json", folder / "train" / "dataset_info.json"):
        if info.is_file():
            try:
                return list(json.loads(info.read_text()).get("features") or {}) or None
            except (OSError, ValueError):
                return None
    return None


@dataclass
class SFTRows:
    """The task's view of the data: the tokenized rows, the tokenizer, and where they came from."""

    sft: SFTData
    tokenizer: Any
    source: str
    eval_generate: int
    sizes: dict[str, int] = field(default_factory=dict)


class SFTTask:
    """See the module docstring; implements ``protocol.Task``."""

    name = "sft"
    untrained = "as loaded"
    new_head = False  # the LM head is the pretrained output embeddings
    peft_task_type = "CAUSAL_LM"
    default_max_length = DEFAULT_MAX_LENGTH
    compare_columns = (("eval loss", "eval_loss", ".3f"), ("perplexity", "perplexity", ".2f"), ("exact match", "exact_match", ".3f"))

    def check_model(self, model_path: str) -> None:
        """A model folder (config.json, tokenizer files) whose config is a causal language model."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        check_model_folder(model_path)
        config = AutoConfig.from_pretrained(model_path)
        causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                  for name in ([names] if isinstance(names, str) else names)}
        saved = list(getattr(config, "architectures", None) or [])
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (saved and not set(saved) & causal):
            what = saved[0] if saved else f"{config.model_type!r} model"
            raise RecipeError(f"--model {model_path}: a {what} is not a causal language model, which --task sft trains "
                              f"(its head would start random); pass a decoder LM (Llama, GPT-2, SmolLM2...) or --task classification")

    def load_inputs(self, args: argparse.Namespace, model_path: str) -> Inputs:
        from transformers import AutoTokenizer

        splits, source = load_rows(args)
        tokenizer = _load(lambda: AutoTokenizer.from_pretrained(model_path), model_path, "tokenizer")
        notes = [note] if (note := ensure_pad_token(tokenizer, model_path)) else []
        check_vocabulary(tokenizer, _sample_texts(splits["train"]), model_path)
        data = tokenize_sft(splits, tokenizer, args.max_length, train_on_prompt=args.train_on_prompt, where=source)
        if args.eval_generate:
            if data.format == TEXT:
                raise RecipeError(f"--eval-generate {args.eval_generate}: {source} is plain 'text' rows, which have no prompt "
                                  f"to answer; give 'prompt' + 'completion' or 'messages' rows, or drop --eval-generate")
            if args.eval_generate > len(data.prompts):
                notes.append(f"--eval-generate {args.eval_generate}: the test rows hold {len(data.prompts)} prompts; generating for all of them")
        notes += data.notes()
        rows = SFTRows(data, tokenizer, source, min(args.eval_generate or 0, len(data.prompts)),
                       sizes={name: len(split) for name, split in data.splits.items()})
        return Inputs(model_path, tokenizer, data.splits, rows, notes, collate=SFTCollator(pad_token_id(tokenizer)))

    def build_model(self, inputs: Inputs) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = _load(lambda: AutoModelForCausalLM.from_pretrained(inputs.model_path, dtype=torch.float32),
                      inputs.model_path, "causal language model")
        # Training builds no key/value cache (it would hold every layer's keys and values uncompressed
        # for the whole forward); generation makes its own. final/config.json gets the value back.
        model.config.use_cache = False
        return model

    def evaluate(self, accelerator: Any, model: torch.nn.Module, test_dl: Any, inputs: Inputs) -> dict[str, Any]:
        rows: SFTRows = inputs.data
        scores: dict[str, Any] = completion_loss(model, test_dl, accelerator)
        if rows.eval_generate:
            generated = generate_exact_match(model, rows.tokenizer, rows.sft.prompts, rows.eval_generate,
                                             examples=SHOWN_EXAMPLES, accelerator=accelerator)
            scores.update(exact_match=generated["exact_match"], generated=generated["generated"], examples=generated["examples"])
        return scores

    def describe(self, scores: dict[str, Any], inputs: Inputs) -> str:
        line = (f"eval loss {scores['eval_loss']:.4f} (perplexity {scores['perplexity']:.2f}) on "
                f"{scores['eval_tokens']} completion tokens")
        if "exact_match" in scores:
            line += f", exact match {scores['exact_match']:.3f} of {scores['generated']} prompts"
        return line

    def details(self, scores: dict[str, Any], inputs: Inputs) -> list[str]:
        """A few generated answers next to their references."""
        return [f"  prompt ...{_tail(e['prompt'])!r} -> generated {e['generated']!r} (reference {e['reference']!r})"
                for e in scores.get("examples", [])]

    def results(self, before: dict[str, Any], after: dict[str, Any], inputs: Inputs) -> dict[str, Any]:
        return {
            "eval_loss_before": before["eval_loss"],
            "perplexity_before": before["perplexity"],
            "exact_match_before": before.get("exact_match"),
            "eval_loss": after["eval_loss"],
            "perplexity": after["perplexity"],
            "exact_match": after.get("exact_match"),
            "eval_tokens": after["eval_tokens"],
            "generated": after.get("generated", 0),
            "examples": after.get("examples", []),
        }

    def compare_note(self, result: dict[str, Any]) -> str:
        """What the untrained model scored (the same for every arm)."""
        note = f"before training: eval loss {result['eval_loss_before']:.3f}, perplexity {result['perplexity_before']:.2f}"
        if result.get("exact_match_before") is not None:
            note += f", exact match {result['exact_match_before']:.3f} ({result['generated']} prompts)"
        return note

    def data_summary(self, inputs: Inputs) -> dict[str, Any]:
        rows: SFTRows = inputs.data
        return {"source": rows.source, "task": "sft", "sizes": rows.sizes, **rows.sft.summary()}

    def save_extras(self, inputs: Inputs, output_dir: Path) -> None:
        """``final/`` gets the tokenizer (with its chat template) and the config's own ``use_cache``."""
        from transformers import AutoConfig

        final = output_dir / "final"
        inputs.preprocessor.save_pretrained(final)
        config_file = final / "config.json"
        config = json.loads(config_file.read_text())
        config["use_cache"] = AutoConfig.from_pretrained(inputs.model_path).use_cache
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_rows(args: argparse.Namespace) -> tuple[DatasetDict, str]:
    """Train and test rows (``--test-file`` or ``--test-fraction`` held out with the split seed),
    drawn to ``--train-size`` / ``--test-size``; ``--text-column`` names plain text."""
    from .data import BUILTIN, _draw, _read_files, _read_named, _split_off_test

    if args.train_file:
        raw, source = _read_files(args.train_file, args.test_file), args.train_file
    elif args.dataset in BUILTIN:
        raise RecipeError(f"--dataset {args.dataset} is classification data; --task sft needs rows with 'messages', "
                          f"'prompt' + 'completion' or 'text' (pass --train-file)")
    else:
        raw, source = _read_named(args.dataset), args.dataset
    if "test" not in raw:
        raw = _split_off_test(raw, source, args.test_fraction, args.split_seed)
    if args.text_column and args.text_column != TEXT:
        for split in raw:
            if args.text_column not in raw[split].column_names:
                raise RecipeError(f"{source}: no column {args.text_column!r} in the {split} rows "
                                  f"(columns: {', '.join(raw[split].column_names)}); pass --text-column with one of them")
        raw = DatasetDict({s: raw[s].select_columns([args.text_column]).rename_column(args.text_column, TEXT) for s in raw})
    for split in raw:
        detect_format(raw[split].column_names, f"{source} ({split})")  # one line naming what is missing
    return DatasetDict({
        split: _draw(raw[split], size, split, source, args.split_seed)
        for split, size in (("train", args.train_size), ("test", args.test_size))
    }), source


def _sample_texts(rows, n: int = 200) -> list[str]:
    """The words of the first rows (every string in them), for the vocabulary check."""
    texts: list[str] = []

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for row in rows.select(range(min(n, len(rows)))):
        collect({k: v for k, v in row.items() if k in (MESSAGES, "prompt", "completion", TEXT)})
    return [t for t in texts if t.strip()]


def _tail(text: str, n: int = 80) -> str:
    return " ".join(text.split())[-n:]

