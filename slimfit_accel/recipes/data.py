"""Where the recipe's examples come from, checked before anything trains.

Every source becomes a ``DatasetDict(train, test)`` with the columns ``text`` (or ``image``)
and ``label`` (class ids), plus the class names; all through the ``datasets`` library:

- a local file: CSV, JSON, JSONL or Parquet (``train_file``, and ``test_file`` or a
  ``test_fraction`` split drawn with the split seed);
- a ``save_to_disk`` folder, or a ``datasets`` name (needs the Hub, or its cache, to be reachable);
- a built-in offline set: ``rotten_tomatoes`` (text), ``mnist_5k`` and ``fashion_mnist`` (images).

String labels are mapped to ids in sorted order (``label_names[i]`` is the string of id ``i``);
so are integer labels that are not already ``0..K-1``. Each problem (missing file or column,
one class, text where images were asked for, more rows asked than there are) is a
``RecipeError`` with one line that says what to change.

Example::

    data = load_data(train_file="reviews.csv", text_column="review", label_column="stars")
    data.splits["train"][0]     # {'text': '...', 'label': 2}
    data.label_names            # ['1', '2', '3', '4', '5']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import ClassLabel, DatasetDict, Image, Value

from . import RecipeError

BUILTIN = ("rotten_tomatoes", "mnist_5k", "fashion_mnist")
#: Rows drawn when no size is given: Rotten Tomatoes' usual 2000 / 1000; every row elsewhere.
DEFAULT_SIZES = {"rotten_tomatoes": (2000, 1000)}
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class LabeledData:
    """Train and test examples with class ids, the class names, and which task they make."""

    splits: DatasetDict
    task: str  # "text" or "image"
    label_names: list[str]
    source: str
    sizes: dict[str, int] = field(default_factory=dict)

    def majority_class(self) -> int:
        """The most frequent class in the training rows (the baseline's constant answer)."""
        labels = self.splits["train"]["label"]
        return max(range(len(self.label_names)), key=lambda c: (sum(1 for y in labels if y == c), -c))


def load_data(
    dataset: str = "rotten_tomatoes",
    *,
    train_file: str | None = None,
    test_file: str | None = None,
    test_fraction: float | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    train_size: int | None = None,
    test_size: int | None = None,
    split_seed: int = 0,
) -> LabeledData:
    """Load, check and size the examples; see the module docstring. Raises ``RecipeError``."""
    if train_file is not None:
        raw, source = _read_files(train_file, test_file), train_file
    elif dataset in BUILTIN:
        default_train, default_test = DEFAULT_SIZES.get(dataset, (None, None))
        train_size = default_train if train_size is None else train_size
        test_size = default_test if test_size is None else test_size
        raw, source = _builtin(dataset, train_size, test_size, split_seed), dataset
        train_size = test_size = None  # already drawn
    else:
        raw, source = _read_named(dataset), dataset

    if "test" not in raw:
        raw = _split_off_test(raw, source, test_fraction, split_seed)
    task, column = _feature_column(raw["train"], source, text_column, image_column)
    for split in ("train", "test"):
        for name, flag in ((column, f"--{task}-column"), (label_column, "--label-column")):
            if name not in raw[split].column_names:
                raise RecipeError(
                    f"{source}: no column {name!r} in the {split} rows (columns: {', '.join(raw[split].column_names)}); "
                    f"pass {flag} with one of them"
                )
    if column == label_column:
        raise RecipeError(f"{source}: column {column!r} cannot be both the {task} and the label; pass --label-column")
    rename = {old: new for old, new in ((column, task), (label_column, "label")) if old != new}
    splits = DatasetDict({split: raw[split].select_columns([column, label_column]) for split in ("train", "test")})
    splits = splits.rename_columns(rename) if rename else splits
    splits = _check_features(splits, task, column, source, base=Path(train_file).parent if train_file else None)
    splits, label_names = _label_ids(splits, label_column, source)
    splits = DatasetDict({
        split: _draw(splits[split], size, split, source, split_seed)
        for split, size in (("train", train_size), ("test", test_size))
    })
    present = sorted(set(splits["train"]["label"]))
    if len(present) < 2:
        only = label_names[present[0]] if present else "none"
        raise RecipeError(
            f"{source}: label column {label_column!r} holds one class ({only!r}) in the training rows; "
            f"a classifier needs at least two (check --label-column, or draw more rows with --train-size)"
        )
    return LabeledData(splits, task, label_names, source, sizes={s: len(splits[s]) for s in splits})


# -- sources ----------------------------------------------------------------------------------
def _read_files(train_file: str, test_file: str | None) -> DatasetDict:
    files = {"train": train_file} | ({"test": test_file} if test_file else {})
    builders = set()
    for split, path in files.items():
        flag = f"--{split}-file"
        if not Path(path).is_file():
            raise RecipeError(f"{flag} {path}: no such file")
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise RecipeError(f"{flag} {path}: unknown file type {suffix or '(none)'}; use .csv, .json, .jsonl or .parquet")
        builders.add(FILE_BUILDERS[suffix])
    if len(builders) > 1:
        raise RecipeError(f"--train-file and --test-file must be the same type of file, got {train_file} and {test_file}")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files)
    except Exception as err:  # the parsers' errors are many and long: keep their first line
        raise RecipeError(f"{train_file}: cannot be read as a table ({type(err).__name__}: {_first_line(err)})") from None


def _builtin(name: str, train_size: int | None, test_size: int | None, seed: int) -> DatasetDict:
    from .images import load_fashion_mnist, load_mnist_5k
    from .rotten_tomatoes import load_rotten_tomatoes

    loader = {"rotten_tomatoes": load_rotten_tomatoes, "mnist_5k": load_mnist_5k, "fashion_mnist": load_fashion_mnist}[name]
    try:
        return loader(train_size=train_size, test_size=test_size, seed=seed)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).replace("train_size=", "--train-size ").replace("test_size=", "--test-size ")
        raise RecipeError(f"--dataset {name}: {' '.join(message.split())}") from None


def _read_named(name: str) -> DatasetDict:
    try:
        loaded = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name)
    except Exception as err:
        raise RecipeError(
            f"--dataset {name}: cannot load it ({type(err).__name__}: {_first_line(err)}); offline, pass a "
            f"--train-file, a save_to_disk folder, or one of {', '.join(BUILTIN)}"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise RecipeError(f"--dataset {name}: no 'train' split (splits: {', '.join(loaded)})")
    if "test" not in loaded and "validation" in loaded:
        loaded["test"] = loaded["validation"]
    return DatasetDict({k: loaded[k] for k in ("train", "test") if k in loaded})


def _split_off_test(raw: DatasetDict, source: str, fraction: float | None, seed: int) -> DatasetDict:
    fraction = DEFAULT_TEST_FRACTION if fraction is None else fraction
    rows = len(raw["train"])
    if rows < 2 or round(fraction * rows) < 1:
        raise RecipeError(f"{source}: {rows} rows are too few to hold out a test fraction of {fraction}; pass --test-file")
    parts = raw["train"].train_test_split(test_size=fraction, seed=seed)
    return DatasetDict(train=parts["train"], test=parts["test"])


# -- columns ----------------------------------------------------------------------------------
def _feature_column(train: datasets.Dataset, source: str, text_column: str | None, image_column: str | None) -> tuple[str, str]:
    if image_column is not None:
        return "image", image_column
    if text_column is not None:
        return "text", text_column
    if "text" in train.column_names:
        return "text", "text"
    images = [name for name, feature in train.features.items() if isinstance(feature, Image)]
    if "image" in train.column_names or images:
        return "image", "image" if "image" in train.column_names else images[0]
    raise RecipeError(
        f"{source}: no 'text' or 'image' column (columns: {', '.join(train.column_names)}); "
        f"pass --text-column or --image-column"
    )


def _check_features(splits: DatasetDict, task: str, column: str, source: str, base: Path | None) -> DatasetDict:
    feature = splits["train"].features[task]
    if task == "text":
        if isinstance(feature, Image):
            raise RecipeError(f"{source}: column {column!r} holds images, not text; pass it as --image-column")
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise RecipeError(f"{source}: column {column!r} holds {_describe(feature)}, not text; pass --text-column with a column of text")
        for split in splits:
            empty = sum(1 for text in splits[split]["text"] if text is None)
            if empty:
                raise RecipeError(f"{source}: text column {column!r} is empty in {empty} {split} rows; fill or drop them")
        return splits
    if isinstance(feature, Image):
        return splits
    first = splits["train"][0][task] if len(splits["train"]) else None
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string") and isinstance(first, str):
        # A column of image file paths (relative to the data file) is fine: datasets decodes them.
        resolve = (lambda p: p if os.path.isabs(p) or base is None else str(base / p))
        sample = splits["train"][:5][task]
        if all(isinstance(p, str) and os.path.isfile(resolve(p)) for p in sample):
            splits = splits.map(lambda row: {task: resolve(row[task])})
            return splits.cast_column(task, Image())
        raise RecipeError(
            f"{source}: column {column!r} holds text ({first[:40]!r}), not images or image file paths; "
            f"pass --image-column with a column of images, or --text-column for text"
        )
    raise RecipeError(f"{source}: column {column!r} holds {_describe(feature)}, not images; pass --image-column with a column of images")


def _label_ids(splits: DatasetDict, column: str, source: str) -> tuple[DatasetDict, list[str]]:
    feature = splits["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return splits, list(feature.names)
    values = {split: splits[split]["label"] for split in splits}
    for split, column_values in values.items():
        missing = sum(1 for v in column_values if v is None)
        if missing:
            raise RecipeError(f"{source}: label column {column!r} is empty in {missing} {split} rows; fill or drop them")
    kinds = {type(v) for vs in values.values() for v in vs}
    if not kinds <= {int, str, bool}:
        raise RecipeError(f"{source}: label column {column!r} holds {', '.join(sorted(k.__name__ for k in kinds))}; labels must be strings or integers")
    if len(kinds) > 1:
        raise RecipeError(f"{source}: label column {column!r} mixes {', '.join(sorted(k.__name__ for k in kinds))} values; use one type")
    classes = sorted(set(values["train"]) | set(values["test"]))
    if kinds == {int} and classes == list(range(len(classes))):
        return splits, [str(c) for c in classes]
    ids = {value: i for i, value in enumerate(classes)}
    mapped = DatasetDict({split: splits[split].map(lambda row: {"label": ids[row["label"]]}) for split in splits})
    mapped = mapped.cast_column("label", ClassLabel(names=[str(c) for c in classes]))
    return mapped, [str(c) for c in classes]


def _draw(rows: datasets.Dataset, size: int | None, split: str, source: str, seed: int) -> datasets.Dataset:
    if size is None:
        return rows
    if size > len(rows):
        raise RecipeError(f"--{split}-size {size} but {source} has only {len(rows)} {split} rows; ask for at most {len(rows)}")
    return rows.shuffle(seed=seed).select(range(size))


def _describe(feature) -> str:
    return f"{feature.dtype} values" if isinstance(feature, Value) else type(feature).__name__


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
