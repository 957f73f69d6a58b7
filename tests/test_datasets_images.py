import gzip

import pytest
import torch

from pyro_ffjord.datasets import default_data_dir
from pyro_ffjord.datasets.images import load_image_dataset

HAVE_MNIST = (default_data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST is not in the data folder")
def test_mnist_is_uint8_images():
    data = load_image_dataset("mnist")
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert data.train.dtype == torch.uint8 and data.shape == (1, 28, 28)
    assert data.test.max() == 255 and data.test.min() == 0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/batches.meta"):
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
