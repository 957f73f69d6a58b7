"""The four VAE benchmarks of the FFJORD paper, prepared as in the Sylvester-flows ``utils/load_data.py``.

FFJORD's VAE code reuses the Sylvester-flows loaders; these functions mirror their splits, seeds, pixel
orientation and binarization, read local files under the data root (see :mod:`._paths`) and never download.
Every split is a float32 tensor shaped ``(N, 1, H, W)``. Paths below are relative to the data root.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch

from ._paths import require_file, resolve_root

OMNIGLOT_VALIDATION = 1345  # Sylvester: the last 1345 images of the shuffled Omniglot training set
OMNIGLOT_BINARIZE_SEED = 777  # Sylvester: fixed Bernoulli draw for the Omniglot validation and test sets
CALTECH_SPLIT = (4100, 2264, 2307)  # sizes of Marlin's split1 (train, val, test); 8671 images in all
FREY_SPLIT = (1565, 200, 200)
FREY_SEED = 123  # Sylvester's default --freyseed (the paper also used 321 and 231)


@dataclass(frozen=True)
class VAEData:
    """Train/validation/test images of one VAE benchmark.

    Attributes:
        train: Training images, float32, shape ``(N, *input_shape)``.
        val: Validation images, same layout.
        test: Test images, same layout.
        name: ``"mnist"``, ``"omniglot"``, ``"caltech"`` or ``"frey"``.
        input_shape: ``(1, 28, 28)``, or ``(1, 28, 20)`` for Frey faces.
        likelihood: ``"bernoulli"`` (pixels in {0, 1}) or ``"categorical256"`` (integer pixels 0..255).
        dynamic_binarization: If True, ``train`` holds grey values in [0, 1] that the training loop must
            binarize afresh each epoch (``torch.bernoulli``); ``val``/``test`` are binarized once already.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    name: str
    input_shape: tuple[int, int, int]
    likelihood: str
    dynamic_binarization: bool = False


def _read(path: Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)``, with any failure turned into a ``ValueError`` that names the file."""
    try:
        return load(path)
    except Exception as err:
        raise ValueError(f"could not read {path} (corrupt, truncated or not the expected format): {err!r}") from err


def _loadmat(path: Path, *keys: str) -> list[np.ndarray]:
    return _read(path, lambda p: [scipy.io.loadmat(p)[k] for k in keys])


def _images(x: np.ndarray, path: Path, height: int = 28, width: int = 28, transpose: bool = False) -> np.ndarray:
    """Rows of ``height * width`` pixels as ``(N, 1, H, W)`` float32; ``transpose`` for column-major files."""
    x = np.asarray(x)
    if x.ndim not in (2, 3) or x[0].size != height * width:
        raise ValueError(f"{path}: expected images of {height}x{width} pixels, got an array of shape {x.shape}")
    x = x.reshape(len(x), height, width)
    return (x.transpose(0, 2, 1) if transpose else x)[:, None].astype(np.float32)


def _check_range(x: np.ndarray, path: Path, binary: bool) -> np.ndarray:
    ok = ((x == 0) | (x == 1)).all() if binary else ((x >= 0) & (x <= 1)).all()
    if not ok:
        raise ValueError(f"{path}: expected pixel values in {'{0, 1}' if binary else '[0, 1]'}")
    return x


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]


def load_binarized_mnist(root: str | os.PathLike | None = None) -> VAEData:
    """Statically binarized MNIST (Larochelle & Murray), 50000/10000/10000, Bernoulli likelihood.

    Reads ``binarized_mnist/binarized_mnist_{train,valid,test}.mat`` (key ``X``: ``(N, 784)`` in {0, 1},
    row-major), the same bits as the ``.amat`` text files Sylvester reads. The file's splits are kept, in file
    order (Sylvester shuffles the training rows, which a shuffling data loader does anyway).

    Args:
        root: Data root; ``None`` uses :func:`~pyro_ffjord.datasets._paths.default_data_dir`.

    Raises:
        FileNotFoundError: A split file is missing.
        ValueError: A file is unreadable or not 784-pixel binary images.
    """
    folder = resolve_root(root) / "binarized_mnist"
    splits = []
    for split in ("train", "valid", "test"):
        path = require_file(
            folder / f"binarized_mnist_{split}.mat",
            f"statically binarized MNIST ({split} split)",
            "converted from http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/ (docs/data.md)",
        )
        (x,) = _loadmat(path, "X")
        splits.append(_check_range(_images(x, path), path, binary=True))
    return VAEData(*_tensors(*splits), name="mnist", input_shape=(1, 28, 28), likelihood="bernoulli")


def _read_npz_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        return npz["train_images"], npz["test_images"]


def load_omniglot(root: str | os.PathLike | None = None, seed: int = 0) -> VAEData:
    """Omniglot 28x28 with dynamic binarization, Bernoulli likelihood.

    If ``omniglot28/chardata.mat`` (IWAE's file) exists it is read as Sylvester does: ``data``/``testdata``
    transposed to ``(N, 784)`` column-major images (24345 train+val, 8070 test). Otherwise the **substitute**
    ``omniglot28/omniglot28_substitute.npz`` is read (``train_images`` 19280 / ``test_images`` 13180, uint8
    row-major, background/evaluation alphabets, own 105->28 downsampling; see ``PROVENANCE.md``): its
    likelihoods are not comparable with published chardata numbers.

    As in Sylvester, the training images are shuffled (``np.random.RandomState(seed)``, the same order as
    ``np.random.seed(seed); np.random.shuffle``) and the last 1345 become the validation set; validation and
    test are binarized once with a Bernoulli draw from ``RandomState(777)`` (validation first); training
    images stay grey in [0, 1] with ``dynamic_binarization=True``. Substitute sizes: 17935/1345/13180.

    Args:
        root: Data root; ``None`` uses the default data directory.
        seed: Seed of the train/validation shuffle.

    Raises:
        FileNotFoundError: Neither file exists.
        ValueError: The file is unreadable, has no more than 1345 training images, or values outside [0, 1].
    """
    folder = resolve_root(root) / "omniglot28"
    chardata = folder / "chardata.mat"
    if chardata.is_file():
        path = chardata
        train, test = (_images(x.T, path, transpose=True) for x in _loadmat(path, "data", "testdata"))
    else:
        what = f"Omniglot 28x28 substitute (see PROVENANCE.md; or put IWAE's chardata.mat at {chardata})"
        source = "built from torchvision.datasets.Omniglot(root, download=True) (docs/data.md)"
        path = require_file(folder / "omniglot28_substitute.npz", what, source)
        train, test = (_images(x, path) / 255 for x in _read(path, _read_npz_images))
    train, test = _check_range(train, path, binary=False), _check_range(test, path, binary=False)
    if len(train) <= OMNIGLOT_VALIDATION:
        raise ValueError(f"{path}: needs more than {OMNIGLOT_VALIDATION} training images, got {len(train)}")
    train = train[np.random.RandomState(seed).permutation(len(train))]
    rng = np.random.RandomState(OMNIGLOT_BINARIZE_SEED)
    val, test = rng.binomial(1, train[-OMNIGLOT_VALIDATION:]), rng.binomial(1, test)
    return VAEData(
        *_tensors(train[:-OMNIGLOT_VALIDATION], val, test),
        name="omniglot",
        input_shape=(1, 28, 28),
        likelihood="bernoulli",
        dynamic_binarization=True,
    )


def load_caltech101_silhouettes(root: str | os.PathLike | None = None, seed: int = 0) -> VAEData:
    """Caltech101 Silhouettes 28x28, 4100/2264/2307, Bernoulli likelihood.

    If ``caltech101_silhouettes/caltech101_silhouettes_28_split1.mat`` exists, Marlin's split1 is used as in
    Sylvester (keys ``train_data``/``val_data``/``test_data``). Otherwise all 8671 images of
    ``caltech101_silhouettes/caltech101_silhouettes_28.mat`` (key ``X``) are split 4100/2264/2307 by
    ``np.random.RandomState(seed).permutation``: same sizes, but **not** Marlin's split1. Both files store
    images column-major with the object 0; like Sylvester, images are transposed upright and inverted
    (``1 - x``) so the object is 1.

    Args:
        root: Data root; ``None`` uses the default data directory.
        seed: Seed of the permutation (unused with the split1 file).

    Raises:
        FileNotFoundError: Neither file exists.
        ValueError: The file is unreadable, not binary, or (full file) not 8671 images.
    """
    folder = resolve_root(root) / "caltech101_silhouettes"
    path = folder / "caltech101_silhouettes_28_split1.mat"
    if path.is_file():
        parts = _loadmat(path, "train_data", "val_data", "test_data")
    else:
        path = require_file(
            folder / "caltech101_silhouettes_28.mat",
            "Caltech101 Silhouettes 28x28 (all images)",
            "from https://people.cs.umass.edu/~marlin/data.shtml",
        )
        (x,) = _loadmat(path, "X")
        if len(x) != sum(CALTECH_SPLIT):
            raise ValueError(f"{path}: expected {sum(CALTECH_SPLIT)} images, got {len(x)}")
        parts = np.split(x[np.random.RandomState(seed).permutation(len(x))], np.cumsum(CALTECH_SPLIT)[:2])
    splits = [1 - _check_range(_images(p, path, transpose=True), path, binary=True) for p in parts]
    return VAEData(*_tensors(*splits), name="caltech", input_shape=(1, 28, 28), likelihood="bernoulli")


def _read_pickle_first(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.asarray(pickle.load(f, encoding="latin1")[0])


def load_freyfaces(root: str | os.PathLike | None = None, seed: int = FREY_SEED) -> VAEData:
    """Frey faces 28x20, 1565/200/200, 256-way categorical likelihood.

    Reads ``freyfaces/freyfaces.pkl`` (a pickled list whose element 0 is ``(1965, 560)`` uint8, row-major;
    only open pickles you trust). As in Sylvester, all 1965 images are shuffled before the split with
    ``np.random.RandomState(seed)`` (equal to ``np.random.seed(freyseed); np.random.shuffle``; default 123 as
    Sylvester's ``--freyseed``), so the test set depends on ``seed``.

    Returns integer pixel values 0..255 as float32 (the categorical class labels). Sylvester stores
    ``x / 255`` and recovers labels as ``(x * 255).long()``; divide by 255 to get its encoder input.

    Args:
        root: Data root; ``None`` uses the default data directory.
        seed: Seed of the shuffle that precedes the split.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: The file is unreadable or not 1965 uint8 images of 560 pixels.
    """
    path = require_file(
        resolve_root(root) / "freyfaces" / "freyfaces.pkl",
        "Frey faces (freyfaces.pkl)",
        "from https://cs.nyu.edu/~roweis/data.html, as pickled by riannevdberg/sylvester-flows (docs/data.md)",
    )
    data = _read(path, _read_pickle_first)
    if data.dtype != np.uint8 or data.shape != (sum(FREY_SPLIT), 28 * 20):
        raise ValueError(f"{path}: expected uint8 of shape {(sum(FREY_SPLIT), 560)}, got {data.dtype} {data.shape}")
    data = _images(data[np.random.RandomState(seed).permutation(len(data))], path, 28, 20)
    splits = np.split(data, np.cumsum(FREY_SPLIT)[:2])
    return VAEData(*_tensors(*splits), name="frey", input_shape=(1, 28, 20), likelihood="categorical256")


def load_vae_dataset(name: str, root: str | os.PathLike | None = None, seed: int | None = None) -> VAEData:
    """Loads ``"mnist"``, ``"omniglot"``, ``"caltech"`` or ``"frey"``.

    Args:
        name: Benchmark name.
        root: Data root; ``None`` uses the default data directory.
        seed: Split seed passed to the loader; ``None`` keeps its default (0, or 123 for Frey). MNIST has
            fixed splits and ignores it.

    Raises:
        ValueError: Unknown ``name``.
    """
    if name == "mnist":
        return load_binarized_mnist(root)
    loaders = {"omniglot": load_omniglot, "caltech": load_caltech101_silhouettes, "frey": load_freyfaces}
    if name not in loaders:
        raise ValueError(f"unknown VAE dataset {name!r}; expected one of mnist, {', '.join(loaders)}")
    return loaders[name](root) if seed is None else loaders[name](root, seed)
