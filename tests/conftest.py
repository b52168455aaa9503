"""Shared fixtures: tiny random transformers (fast), and paths to the worker scripts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKERS = Path(__file__).parent / "workers"


def tiny_bert(num_labels: int = 2, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


@pytest.fixture
def bert():
    return tiny_bert()


def random_batch(batch: int = 4, length: int = 12, seed: int = 0, vocab: int = 99):
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=generator),
        "labels": torch.randint(0, 2, (batch,), generator=generator),
    }


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset before and after (a test that makes its own
    ``Accelerator(mixed_precision=...)`` leaves no precision behind)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()
