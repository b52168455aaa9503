"""Tiny models and datasets for the recipe's tests: seconds per run, no download.

A word-level tokenizer over a 20-word vocabulary, 2-layer random BERT / GPT-2 / ViT models saved
with ``save_pretrained``, and synthetic reviews whose label follows the words they contain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "love", "superb"]
NEGATIVE = ["bad", "awful", "poor", "hate", "dull"]
NEUTRAL = ["the", "movie", "plot", "acting", "was", "is", "a", "very", "film", "story"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def reviews(n: int = 48, seed: int = 0) -> list[dict]:
    """Rows {'review': ..., 'sentiment': 'pos'|'neg'}: the label follows the sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(POSITIVE if label == "pos" else NEGATIVE, k=2) + rng.choices(NEUTRAL, k=4)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


def write_table(path: Path, rows: list[dict]) -> Path:
    """CSV, JSON lines or Parquet, by the file's suffix."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return path


def tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"unk_token": "[UNK]", "eos_token": "<eos>"}
    if pad:
        specials |= {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def write_bert(folder: Path, with_tokenizer: bool = True) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    if with_tokenizer:
        tokenizer().save_pretrained(folder)
    return folder


def write_gpt2(folder: Path) -> Path:
    """A GPT-2 classifier whose tokenizer has no pad token (as GPT-2's own)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    vocab = len(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=4, eos_token_id=4)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer(pad=False).save_pretrained(folder)
    return folder


def write_vit(folder: Path, with_processor: bool = True) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4)
    ViTForImageClassification(config).save_pretrained(folder)
    if with_processor:
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int = 40) -> Path:
    """A save_to_disk dataset of 16x16 images: bright squares top-left ('top') or bottom-right ('bottom')."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
        corner = i % 2
        pixels[corner * 8:(corner + 1) * 8, corner * 8:(corner + 1) * 8] = 255
        images.append(PILImage.fromarray(pixels))
        labels.append(corner)
    features = Features({"image": Image(), "label": ClassLabel(names=["top", "bottom"])})
    Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return folder
