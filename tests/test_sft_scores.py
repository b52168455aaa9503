"""SFT batches and scores: padding sides, token-weighted held-out loss, greedy exact match."""

from __future__ import annotations

import math

import torch
from datasets import Dataset, DatasetDict
from sft_fixtures import chat_tokenizer, tiny_llama
from torch.utils.data import DataLoader

from slimfit_accel.recipes.sft import IGNORE, SFTCollator, completion_loss, generate_exact_match, normalize_answer, pad_token_id, tokenize_sft


def test_pad_token_defaults_to_eos():
    tok = chat_tokenizer()
    assert tok.pad_token is None
    assert pad_token_id(tok) == tok.eos_token_id and tok.pad_token == "<|im_end|>"


def test_collator_pads_right_for_training_and_left_for_prompts():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    left = SFTCollator(pad_token_id=0, padding_side="left")([{"prompt_ids": [5, 6]}, {"prompt_ids": [7]}])
    assert left["input_ids"].tolist() == [[5, 6], [0, 7]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def sft_rows(n: int = 6) -> list[dict]:
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    return [{"prompt": [{"role": "user", "content": " ".join(words[: 1 + i % 5])}],
             "completion": [{"role": "assistant", "content": " ".join(words[i % 3: i % 3 + 1 + i % 4])}]} for i in range(n)]


def test_completion_loss_is_the_token_weighted_mean_whatever_the_batching():
    tok = chat_tokenizer()
    data = tokenize_sft(DatasetDict(test=Dataset.from_list(sft_rows())), tok, max_length=32)
    model = tiny_llama(len(tok))
    collate = SFTCollator(pad_token_id(tok))
    whole = collate(list(data.splits["test"]))
    expected = model(**whole).loss.item()  # transformers: mean over every label token of the batch
    for batch_size in (1, 4):
        scores = completion_loss(model, DataLoader(data.splits["test"], batch_size=batch_size, collate_fn=collate))
        assert math.isclose(scores["eval_loss"], expected, rel_tol=1e-5)
        assert math.isclose(scores["perplexity"], math.exp(expected), rel_tol=1e-5)
        assert scores["eval_tokens"] == data.counts["test"].loss_tokens
    assert not model.training


def test_greedy_exact_match_batched_equals_one_by_one_and_normalizes():
    tok = chat_tokenizer()
    model = tiny_llama(len(tok), seed=0, tied=False, initializer_range=0.5)
    data = tokenize_sft(DatasetDict(test=Dataset.from_list(sft_rows(8))), tok, max_length=32)
    one_by_one = generate_exact_match(model, tok, data.prompts, batch_size=1, max_new_tokens=3, examples=8)
    batched = generate_exact_match(model, tok, data.prompts, batch_size=5, max_new_tokens=3, examples=8)
    answers = [e["generated"] for e in one_by_one["examples"]]
    assert len(set(answers)) >= 4 and len({len(a.split()) for a in answers}) >= 2  # varied, some stop early
    assert answers == [e["generated"] for e in batched["examples"]]  # left padding changes nothing
    # references equal to the model's own answers (up to case and spaces) for the first half: 0.5 exact match
    references = [("  " + a.upper() + " ") if i < 4 else "no such answer" for i, a in enumerate(answers)]
    prompts = Dataset.from_dict({"prompt_ids": data.prompts["prompt_ids"], "reference": references})
    scores = generate_exact_match(model, tok, prompts, batch_size=3, max_new_tokens=3, examples=2)
    assert scores["exact_match"] == 0.5 and scores["generated"] == 8 and len(scores["examples"]) == 2
    assert generate_exact_match(model, tok, prompts, n=4, max_new_tokens=3)["exact_match"] == 1.0


def test_normalize_answer():
    assert normalize_answer("  Fresh\n ") == "fresh"
    assert normalize_answer("The  Capital\tis Paris") == "the capital is paris"
