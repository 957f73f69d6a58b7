import gzip
import pickle

import pytest
import torch

from pyro_ffjord.datasets import default_data_dir
from pyro_ffjord.datasets.images import download_image_dataset, load_image_dataset


def write_fake_cifar10(root, per_batch=8, seed=0):
    """Random pixels in CIFAR-10's python layout under ``root``; returns the (train, test) images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, per_batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    for name, batch in zip([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], images):
        entry = {"data": batch.reshape(per_batch, -1).numpy(), "labels": [0] * per_batch}
        (folder / name).write_bytes(pickle.dumps(entry))
    return images[:5].reshape(-1, 3, 32, 32), images[5]


HAVE_MNIST = (default_data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST is not in the data folder")
def test_mnist_is_uint8_images():
    data = load_image_dataset("mnist")
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert data.train.dtype == torch.uint8 and data.shape == (1, 28, 28)
    assert data.test.max() == 255 and data.test.min() == 0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        load_image_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_image_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        load_image_dataset("svhn", tmp_path)


def test_idx_files_are_read_gzipped_and_checked(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (3, 2, 5), dtype=torch.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 2, 5))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.numpy().tobytes()))
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(header + b"\0")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is not an idx3 file"):
        load_image_dataset("mnist", tmp_path)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(header + images.numpy().tobytes())
    assert torch.equal(load_image_dataset("mnist", tmp_path).test, images.unsqueeze(1))


def test_cifar10_batches_are_read_in_channel_first_layout(tmp_path):
    train, test = write_fake_cifar10(tmp_path)
    data = load_image_dataset("cifar10", tmp_path)
    assert torch.equal(data.train, train) and torch.equal(data.test, test) and data.shape == (3, 32, 32)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python batch"):
        load_image_dataset("cifar10", tmp_path)


def test_download_delegates_to_torchvision(tmp_path, monkeypatch):
    """--download calls torchvision's own downloader for both splits (no internet here: a recording stand-in)."""
    import torchvision.datasets

    calls = []
    monkeypatch.setattr(
        torchvision.datasets, "MNIST", lambda root, train, download: calls.append((root, train, download))
    )
    download_image_dataset("mnist", tmp_path)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    with pytest.raises(ValueError, match="name must be one of"):
        download_image_dataset("svhn", tmp_path)


def test_missing_files_say_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"torchvision\.datasets\.MNIST\(root, download=True\)"):
        load_image_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"kriz/cifar\.html"):
        load_image_dataset("cifar10", tmp_path)
