"""The recipe's two tasks, text and image classification: model folder, preprocessor, model, batches.

A model folder is what ``save_pretrained`` writes: ``config.json``, the weights, and the
tokenizer (text) or image processor (image). Each is checked before training, with one line
that says what to change: a folder without tokenizer files would otherwise load an empty
vocabulary and train on nothing but [UNK].

Decoder classifiers (GPT-2, Llama ``ForSequenceClassification``) often ship without a pad
token: the recipe pads with the end-of-sequence token then, and tells the model which id that
is (they find the last real token by it).

Example::

    check_model_folder("./my-bert")
    tokenizer, note = load_preprocessor("./my-bert", "text")
    model = load_model("./my-bert", "text", ["neg", "pos"], pad_token_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from . import RecipeError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
PROCESSOR_FILES = ("preprocessor_config.json",)
#: More [UNK] than this share of the training text's tokens means the tokenizer does not fit.
MAX_UNKNOWN_SHARE = 0.5


def check_model_folder(path: str) -> Path:
    """The folder exists and holds a transformers ``config.json`` and the tokenizer (text) or image
    processor (image) files its task needs. Reads only ``config.json``: made before any data is read."""
    folder = Path(path)
    if not folder.exists():
        raise RecipeError(f"--model {path}: no such folder; pass a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not folder.is_dir():
        raise RecipeError(f"--model {path}: is a file; pass the folder save_pretrained wrote (config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        raise RecipeError(f"--model {path}: no config.json there, so not a Hugging Face model folder (write one with model.save_pretrained)")
    check_preprocessor_files(path, model_task(path))
    return folder


def check_preprocessor_files(path: str, task: str) -> None:
    """The tokenizer (text) or image processor (image) files are in the folder."""
    folder = Path(path)
    if task == "image":
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            raise RecipeError(
                f"--model {path}: no image processor (preprocessor_config.json) in the folder; save the "
                f"model's processor there with processor.save_pretrained({path!r})"
            )
    elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(
            f"--model {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in the folder, so every "
            f"word would become [UNK]; save the tokenizer there with tokenizer.save_pretrained({path!r})"
        )


def model_task(path: str) -> str:
    """``image`` for a vision classifier's config (ViT, ConvNeXT...), else ``text``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        raise RecipeError(f"--model {path}: cannot read its config.json ({type(err).__name__}: {_first_line(err)})") from None
    kind = config.model_type
    if kind in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    return "text"


def load_preprocessor(path: str, task: str) -> tuple[Any, str | None]:
    """The tokenizer (text) or image processor (image) saved with the model, and a note on any fallback."""
    check_preprocessor_files(path, task)
    if task == "image":
        from transformers import AutoImageProcessor

        return _load(lambda: AutoImageProcessor.from_pretrained(path), path, "image processor"), None
    from transformers import AutoTokenizer

    tokenizer = _load(lambda: AutoTokenizer.from_pretrained(path), path, "tokenizer")
    return tokenizer, ensure_pad_token(tokenizer, path)


def ensure_pad_token(tokenizer, path: str = "the model") -> str | None:
    """Give a tokenizer without a pad token one (end-of-sequence, else unknown); say what was done."""
    if tokenizer.pad_token is not None:
        return None
    for role in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, role)
        if token is not None:
            tokenizer.pad_token = token
            return f"the tokenizer has no pad token: padding with its {role.split('_')[0]} token {token!r}"
    raise RecipeError(f"--model {path}: the tokenizer has no pad, end-of-sequence or unknown token to pad batches with; add a pad token and save it")


def check_vocabulary(tokenizer, texts: list[str], path: str) -> float:
    """Share of the texts' tokens that are [UNK]; a ``RecipeError`` when most of them are."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return 0.0
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(row) for row in ids)
    share = sum(1 for row in ids for i in row if i == unk) / max(total, 1)
    if share > MAX_UNKNOWN_SHARE:
        raise RecipeError(
            f"--model {path}: its tokenizer turns {share:.0%} of the training text's tokens into {tokenizer.unk_token} "
            f"(vocabulary of {len(tokenizer)}); use the tokenizer the model was trained with"
        )
    return share


def load_model(path: str, task: str, label_names: list[str], pad_token_id: int | None = None):
    """The pretrained body with a new head for ``label_names`` (a pretrained head of another size is replaced)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if task == "image" else AutoModelForSequenceClassification
    model = _load(
        lambda: auto.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        ),
        path,
        f"{task} classifier",
    )
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def encode(splits: DatasetDict, task: str, preprocessor, max_length: int, num_channels: int = 3) -> DatasetDict:
    """Batches for ``model(**batch)``: tokenized text (fixed length), or images as pixel values."""
    if task == "text":
        return tokenize_splits(splits, preprocessor, max_length=max_length)
    mode = "L" if num_channels == 1 else "RGB"

    def to_pixels(batch):
        pixels = preprocessor([image.convert(mode) for image in batch["image"]], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(batch["label"])}

    return splits.with_transform(to_pixels)  # on the fly: images stay small until a batch needs them


def tokenize_splits(splits: DatasetDict, tokenizer, max_length: int = 64) -> DatasetDict:
    """Tokenize every split to ``max_length`` tokens (truncated and padded), as torch tensors.

    Columns afterwards: the tokenizer's (input_ids, attention_mask, ...) and ``labels``, ready
    for ``model(**batch)`` with the default collate function. Fixed-length batches keep the
    memory of every step the same, which makes memory reports comparable across steps.
    """

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=max_length)

    columns = splits["train"].column_names
    encoded = splits.map(tokenize, batched=True, remove_columns=[c for c in columns if c != "label"])
    encoded = encoded.rename_column("label", "labels")
    encoded.set_format("torch")
    return encoded


def _load(build, path: str, what: str):
    try:
        return build()
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(f"--model {path}: cannot load its {what} ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
