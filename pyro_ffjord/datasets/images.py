"""8-bit image datasets for density estimation (MNIST, CIFAR-10), read from torchvision's file layouts.

Nothing is downloaded unless asked (:func:`download_image_dataset`); paths are relative to the data root
(see :mod:`._paths`):

* MNIST: ``MNIST/raw/{train,t10k}-images-idx3-ubyte.gz`` (the original idx files, as torchvision
  downloads them);
* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python version, as
  torchvision's ``CIFAR10`` downloads it; pickled dicts whose ``data`` rows are 3x32x32 pixels).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._paths import require_file, resolve_root

IMAGE_DATASETS = ("mnist", "cifar10")

_FILES = {
    "mnist": [f"MNIST/raw/{split}-images-idx3-ubyte.gz" for split in ("train", "t10k")],
    "cifar10": [f"cifar-10-batches-py/{name}" for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")],
}
_WHAT = {
    "mnist": "MNIST in torchvision's layout (the original idx .gz files)",
    "cifar10": "CIFAR-10 in torchvision's layout (the extracted cifar-10-python.tar.gz)",
}
_SOURCE = {
    "mnist": "torchvision.datasets.MNIST(root, download=True) fetches it (images.py --download)",
    "cifar10": "from https://www.cs.toronto.edu/~kriz/cifar.html; torchvision.datasets.CIFAR10(root, download=True) "
    "fetches it (images.py --download)",
}


@dataclass(frozen=True)
class ImageData:
    """Train and test images of one dataset.

    Attributes:
        train: ``uint8`` pixels, shape ``(N, C, H, W)``.
        test: same layout.
        name: ``"mnist"`` or ``"cifar10"``.
    """

    train: torch.Tensor
    test: torch.Tensor
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train.shape[1:])


def _read_idx_images(path: Path) -> torch.Tensor:
    """Reads an idx3 ``uint8`` image file (gzipped or not) as ``(N, 1, H, W)``."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if raw[:4] != b"\x00\x00\x08\x03" or len(raw) != 16 + n * h * w:
        raise ValueError(f"{path} is not an idx3 file of uint8 images (corrupt or truncated?)")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, 1, h, w)


def _read_cifar_batch(path: Path) -> torch.Tensor:
    """Reads one pickled CIFAR-10 batch as ``(N, 3, 32, 32)`` ``uint8``."""
    try:
        with open(path, "rb") as f:
            data = np.asarray(pickle.load(f, encoding="latin1")["data"], dtype=np.uint8)
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except Exception as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (corrupt or truncated?): {err!r}") from err


def load_image_dataset(name: str, root: str | os.PathLike | None = None) -> ImageData:
    """Loads MNIST (60000/10000, 1x28x28) or CIFAR-10 (50000/10000, 3x32x32) as ``uint8`` tensors.

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        root: data root; ``None`` for ``$PYRO_FFJORD_DATA`` or ``../shared/data``.

    Raises:
        FileNotFoundError: a file is missing; the message names it and says what to put there.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"name must be one of {list(IMAGE_DATASETS)}, got {name!r}")
    root = resolve_root(root)
    paths = [require_file(root / path, _WHAT[name], _SOURCE[name]) for path in _FILES[name]]
    if name == "mnist":
        return ImageData(_read_idx_images(paths[0]), _read_idx_images(paths[1]), name)
    train = torch.cat([_read_cifar_batch(path) for path in paths[:-1]])
    return ImageData(train, _read_cifar_batch(paths[-1]), name)


def download_image_dataset(name: str, root: str | os.PathLike | None = None) -> None:
    """Fetches MNIST or CIFAR-10 into ``root`` with torchvision's own downloader (``download=True``), in the
    layout :func:`load_image_dataset` reads. Needs internet access and torchvision."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"name must be one of {list(IMAGE_DATASETS)}, got {name!r}")
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    for train in (True, False):
        cls(str(resolve_root(root)), train=train, download=True)
