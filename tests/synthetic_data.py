"""A data folder for the example tests: the real one where it holds the examples' default datasets, else tiny
random files written in the real formats, so that the test command passes on a clone with nothing beside it."""

from __future__ import annotations

import atexit
import functools
import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pyro_ffjord.datasets import default_data_dir

# What the examples read with their default flags: images.py (MNIST), tabular.py (BSDS300 images), vae.py.
EXAMPLE_FILES = (
    "MNIST/raw/train-images-idx3-ubyte.gz",
    "MNIST/raw/t10k-images-idx3-ubyte.gz",
    "BSDS300/images/train",
    "BSDS300/images/test",
    "binarized_mnist/binarized_mnist_train.mat",
    "binarized_mnist/binarized_mnist_valid.mat",
    "binarized_mnist/binarized_mnist_test.mat",
)


def write_mnist_idx(root: Path, n_train: int = 128, n_test: int = 32, seed: int = 0) -> None:
    """Random 28x28 uint8 images as gzipped idx3 files, MNIST's raw layout."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("t10k", n_test)):
        header = bytes([0, 0, 8, 3]) + b"".join(k.to_bytes(4, "big") for k in (n, 28, 28))
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{name}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))


def write_bsds300_images(root: Path, n_train: int = 24, n_test: int = 4, seed: int = 0) -> None:
    """Random 32x32 RGB PNGs in BSDS300's ``images/{train,test}`` folders (the last 20 train images: validation)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / "BSDS300" / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")


def write_binarized_mnist(root: Path, sizes: tuple[int, int, int] = (40, 20, 10), seed: int = 0) -> None:
    """Random binary 784-pixel rows in the ``.mat`` files of statically binarized MNIST."""
    rng = np.random.default_rng(seed)
    folder = root / "binarized_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes):
        x = rng.integers(0, 2, size=(n, 784)).astype(np.uint8)
        scipy.io.savemat(folder / f"binarized_mnist_{split}.mat", {"X": x}, do_compression=True)


@functools.cache
def example_data_dir() -> Path:
    """The real data folder if it has every file in :data:`EXAMPLE_FILES`, else a synthetic one (removed at exit)."""
    real = default_data_dir()
    if all((real / relative).exists() for relative in EXAMPLE_FILES):
        return real
    root = Path(tempfile.mkdtemp(prefix="pyro_ffjord_data_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_mnist_idx(root)
    write_bsds300_images(root)
    write_binarized_mnist(root)
    return root
