"""Supervised fine-tuning (SFT) of a causal language model: data, batches and scores.

The rows come in TRL's dataset formats, told apart by their columns:

- ``messages``: a conversation, a list of ``{"role", "content"}``; the loss is on the assistant
  turns only (every other turn's labels are -100);
- ``prompt`` + ``completion``: both strings (plain text, an end-of-sequence token is appended
  to the completion) or both message lists (rendered with the tokenizer's chat template, the
  prompt with its generation prompt); the loss is on the completion only;
- ``text``: plain language modelling, the loss on every token.

``train_on_prompt=True`` puts the loss on every token of every format. As in TRL 1.16's
``SFTTrainer``, the completion starts where the tokenized prompt and the tokenized prompt +
completion diverge, and a conversation's assistant tokens come from the template's
``{% generation %}`` markers when it has them (``return_assistant_tokens_mask``); templates
without them (SmolLM2's ChatML) are rendered turn by turn, each assistant turn being the tokens
its own message adds. Truncation keeps the start of a row (``max_length`` tokens): rows whose
completion loses tokens are counted, rows left with nothing to learn are skipped and counted.

Example::

    data = tokenize_sft(DatasetDict(train=..., test=...), tokenizer, max_length=128)
    train_dl = DataLoader(data.splits["train"], batch_size=8, collate_fn=SFTCollator(pad_id))
    completion_loss(model, DataLoader(data.splits["test"], batch_size=8, collate_fn=SFTCollator(pad_id)))
    generate_exact_match(model, tokenizer, data.prompts, n=100)   # {'exact_match': .., 'examples': [...]}
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from datasets import Dataset, DatasetDict

from . import RecipeError

MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt_completion", "text"
IGNORE = -100
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ------------------------------------------------------------------------------------ format
def detect_format(columns: Iterable[str], where: str = "the data") -> str:
    """``messages``, ``prompt_completion`` or ``text``, from the column names."""
    columns = list(columns)
    if MESSAGES in columns:
        return MESSAGES
    if "prompt" in columns and "completion" in columns:
        return PROMPT_COMPLETION
    if "prompt" in columns or "completion" in columns:
        have, missing = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
        raise RecipeError(f"{where}: has a {have!r} column but no {missing!r} column; SFT rows need both (or a 'messages' or 'text' column)")
    if TEXT in columns:
        return TEXT
    raise RecipeError(f"{where}: no SFT columns among {columns}; give 'messages', 'prompt' + 'completion', or 'text'")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# ------------------------------------------------------------------------------------ counts and result
@dataclass
class SplitCounts:
    """What tokenizing one split did: ``kept`` rows train or score; ``truncated_completions`` of
    them lost completion tokens to ``max_length``; ``skipped_nothing_to_learn`` were dropped."""

    rows: int = 0
    kept: int = 0
    truncated_completions: int = 0
    skipped_nothing_to_learn: int = 0
    loss_tokens: int = 0


@dataclass
class SFTData:
    """Tokenized SFT rows: ``splits`` (``input_ids``, ``labels``) for training and loss,
    ``prompts`` (``prompt_ids``, ``reference``: the test rows' prompts and expected completions)
    for generation; empty for plain ``text``."""

    splits: DatasetDict
    prompts: Dataset
    format: str
    max_length: int
    train_on_prompt: bool
    counts: dict[str, SplitCounts] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records about the data."""
        return {
            "format": self.format, "max_length": self.max_length, "train_on_prompt": self.train_on_prompt,
            "counts": {split: asdict(c) for split, c in self.counts.items()}, "generation_prompts": len(self.prompts),
        }

    def notes(self) -> list[str]:
        """One line per split where truncation cut completions or skipped rows."""
        lines = []
        for split, c in self.counts.items():
            if c.truncated_completions or c.skipped_nothing_to_learn:
                lines.append(
                    f"{split}: max_length {self.max_length} cut the completion of {c.truncated_completions} of "
                    f"{c.rows} rows; skipped {c.skipped_nothing_to_learn} rows left with nothing to learn "
                    f"(raise --max-length to keep them)"
                )
        return lines


# ------------------------------------------------------------------------------------ tokenizing
def tokenize_sft(
    splits: Mapping[str, Dataset],
    tokenizer,
    max_length: int,
    *,
    train_on_prompt: bool = False,
    where: str = "the data",
    prompt_split: str = "test",
) -> SFTData:
    """Tokenize every split of ``splits`` (same format in each); see the module docstring.

    Raises ``RecipeError`` (one line: which split and row, what to do) for a missing column, an
    empty completion, a conversation without an assistant turn, message lists with a tokenizer
    that has no chat template, or a split where every row is left with nothing to learn.
    """
    if max_length < 2:
        raise RecipeError(f"max_length must be at least 2 tokens, got {max_length}")
    formats = {name: detect_format(rows.column_names, f"{where} ({name})") for name, rows in splits.items()}
    if len(set(formats.values())) > 1:
        raise RecipeError(f"{where}: the splits are in different formats {formats}; give every split the same columns")
    fmt = next(iter(formats.values()))
    eos = tokenizer.eos_token
    if eos is None and fmt != MESSAGES:
        raise RecipeError(f"{where}: the tokenizer has no end-of-sequence token to end completions with; set tokenizer.eos_token")
    out, counts, prompts = {}, {}, {"prompt_ids": [], "reference": []}
    for name, rows in splits.items():
        ids_col, labels_col, c = [], [], SplitCounts()
        for index, row in enumerate(rows):
            here = f"{where} ({name} row {index})"
            input_ids, learn, prompt_ids, reference = _tokenize_row(fmt, row, tokenizer, here)
            labels = [t if (m or train_on_prompt) else IGNORE for t, m in zip(input_ids, learn)]
            c.rows += 1
            if any(learn[max_length:]):
                c.truncated_completions += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            learnable = sum(1 for y in labels[1:] if y != IGNORE)  # the first label predicts nothing
            if not learnable:
                c.skipped_nothing_to_learn += 1
                continue
            c.kept += 1
            c.loss_tokens += learnable
            ids_col.append(input_ids)
            labels_col.append(labels)
            if name == prompt_split and prompt_ids is not None:
                prompts["prompt_ids"].append(prompt_ids)
                prompts["reference"].append(reference)
        if c.rows and not c.kept:
            raise RecipeError(
                f"{where} ({name}): all {c.rows} rows are left with nothing to learn at max_length {max_length} "
                f"(the prompts fill it); raise --max-length or shorten the prompts"
            )
        out[name], counts[name] = Dataset.from_dict({"input_ids": ids_col, "labels": labels_col}), c
    return SFTData(DatasetDict(out), Dataset.from_dict(prompts), fmt, max_length, train_on_prompt, counts)


def _tokenize_row(fmt: str, row: Mapping[str, Any], tokenizer, here: str):
    """(input ids, 1 where the completion / assistant tokens are, generation prompt ids or None,
    reference completion text or None) of one row."""
    if fmt == TEXT:
        text = _text(row, "text", here)
        ids = _encode(tokenizer, _with_eos(text, tokenizer.eos_token))
        return ids, [1] * len(ids), None, None
    if fmt == PROMPT_COMPLETION:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            _text(row, "completion", here)
            prompt_ids = _encode(tokenizer, prompt)
            ids = _encode(tokenizer, prompt + _with_eos(completion, tokenizer.eos_token))
            reference = completion
        elif isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, "prompt", here, tokenizer)
            _check_messages(completion, "completion", here, tokenizer)
            reference = "".join(m["content"] for m in completion)
            if not reference.strip():
                raise RecipeError(f"{here}: the completion is empty; every row needs a completion to learn")
            prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
            ids = _render(tokenizer, prompt + completion)
        else:
            raise RecipeError(
                f"{here}: 'prompt' and 'completion' must both be strings or both be message lists, "
                f"got {type(prompt).__name__} and {type(completion).__name__}"
            )
        start = common_prefix_length(prompt_ids, ids)
        return ids, [0] * start + [1] * (len(ids) - start), prompt_ids, reference
    messages = row[MESSAGES]
    _check_messages(messages, MESSAGES, here, tokenizer)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise RecipeError(f"{here}: the conversation has no assistant turn, so nothing to learn; add one or drop the row")
    last = assistant[-1]
    reference = messages[last]["content"]
    if not reference.strip():
        raise RecipeError(f"{here}: the last assistant turn is empty; every row needs a completion to learn")
    ids, mask = assistant_token_mask(tokenizer, messages, here)
    prompt_ids = _render(tokenizer, messages[:last], add_generation_prompt=True)
    return ids, mask, prompt_ids, reference


def assistant_token_mask(tokenizer, messages: Sequence[Mapping[str, str]], here: str = "conversation") -> tuple[list[int], list[int]]:
    """The conversation's token ids and 1 on the assistant turns' tokens (0 elsewhere).

    With ``{% generation %}`` markers in the template: transformers' ``assistant_masks``.
    Without: each assistant turn i spans from the end of ``messages[:i]`` rendered with the
    generation prompt to the end of ``messages[:i+1]``; the template must render every prefix
    of the conversation as a prefix of the whole (ChatML templates do), else a ``RecipeError``.
    """
    if _GENERATION_MARKER.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1])
        if common_prefix_length(through, ids) < len(through):
            raise RecipeError(
                f"{here}: the chat template renders the conversation up to turn {i} differently from the start of the "
                f"whole one, so its assistant tokens cannot be found; use a template with {{% generation %}} markers "
                f"or train on every token (train_on_prompt)"
            )
        start = common_prefix_length(_render(tokenizer, messages[:i], add_generation_prompt=True), ids)
        mask[start: len(through)] = [1] * (len(through) - start)
    return ids, mask


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share (TRL's ``common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _text(row: Mapping[str, Any], column: str, here: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise RecipeError(f"{here}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecipeError(f"{here}: {column!r} is empty; every row needs text to learn")
    return value


def _check_messages(messages: Any, column: str, here: str, tokenizer) -> None:
    if not has_chat_template(tokenizer):
        raise RecipeError(f"{here}: {column!r} holds messages but the tokenizer has no chat template; use a chat model or give plain-text 'prompt' / 'completion' or 'text'")
    if not isinstance(messages, list) or not messages:
        raise RecipeError(f"{here}: {column!r} must be a non-empty list of {{'role', 'content'}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecipeError(f"{here}: {column!r} message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")


# ------------------------------------------------------------------------------------ batches
@dataclass
class SFTCollator:
    """Pads rows of ``input_ids`` (and ``labels``, padded with -100) into tensors with an
    ``attention_mask``. ``padding_side="left"`` for generation prompts (``prompt_ids`` rows),
    ``"right"`` for training and loss."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        key = "input_ids" if "input_ids" in rows[0] else "prompt_ids"
        width = max(len(r[key]) for r in rows)
        batch = {
            "input_ids": self._pad([r[key] for r in rows], width, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(r[key]) for r in rows], width, 0),
        }
        if "labels" in rows[0]:
            batch["labels"] = self._pad([r["labels"] for r in rows], width, IGNORE)
        return batch

    def _pad(self, seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
        if self.padding_side == "left":
            return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id; its end-of-sequence token becomes the pad token when it has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with; add a pad token and save it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


# ------------------------------------------------------------------------------------ scores
@torch.no_grad()
def completion_loss(model, loader, accelerator=None) -> dict[str, float]:
    """Held-out loss on the label tokens (completion / assistant tokens by default): the mean
    over all tokens of the test set (not of batches), and its perplexity ``exp(loss)``."""
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )
        row_sums, row_counts = losses.sum(dim=1).double(), (labels != IGNORE).sum(dim=1)
        if accelerator is not None:
            row_sums, row_counts = accelerator.gather_for_metrics((row_sums, row_counts))
        total += row_sums.sum().cpu()
        tokens += row_counts.sum().cpu()
    model.train(was_training)
    loss = (total / tokens).item() if tokens else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "eval_tokens": int(tokens)}


def normalize_answer(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped: what exact match compares."""
    return " ".join(text.split()).lower()


@torch.no_grad()
def generate_exact_match(
    model,
    tokenizer,
    prompts: Dataset,
    n: int | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    examples: int = 3,
    accelerator=None,
) -> dict[str, Any]:
    """Greedy completions of the first ``n`` prompts (all when None) and the share equal to the
    reference after ``normalize_answer``; ``examples`` of them are returned to print.

    ``max_new_tokens`` defaults to the longest reference's token count plus 8 (room for the
    end-of-sequence token). Under an ``accelerator`` the prompts are split over the processes
    and the answers gathered, so every process returns the same scores.
    """
    rows = prompts.select(range(min(n, len(prompts)))) if n is not None else prompts
    if len(rows) == 0:
        return {"exact_match": float("nan"), "generated": 0, "examples": []}
    pad_id = pad_token_id(tokenizer)
    if max_new_tokens is None:
        max_new_tokens = max(len(_encode(tokenizer, r)) for r in rows["reference"]) + 8
    # longest prompts first, so a batch pads little and the largest batch comes first
    lengths = [len(ids) for ids in rows["prompt_ids"]]
    indices = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    unwrapped = model
    if accelerator is not None:
        unwrapped = accelerator.unwrap_model(model)
    device = next(unwrapped.parameters()).device
    collate = SFTCollator(pad_id, padding_side="left")
    was_training = unwrapped.training
    unwrapped.eval()
    answers: list[tuple[int, str]] = []
    mine = indices
    if accelerator is not None and accelerator.num_processes > 1:
        mine = indices[accelerator.process_index:: accelerator.num_processes]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start: start + batch_size]
        batch = collate([{"prompt_ids": rows[i]["prompt_ids"]} for i in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = unwrapped.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1]:]
        answers.extend(zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)))
    unwrapped.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        answers = gather_object(answers)
    answers.sort()
    references = rows["reference"]
    hits = [normalize_answer(text) == normalize_answer(references[i]) for i, text in answers]
    shown = [{"prompt": tokenizer.decode(rows[i]["prompt_ids"], skip_special_tokens=True)[-200:],
              "reference": references[i], "generated": text} for i, text in answers[:examples]]
    return {"exact_match": sum(hits) / len(hits), "generated": len(hits), "max_new_tokens": max_new_tokens, "examples": shown}
