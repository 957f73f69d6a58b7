"""VAE benchmark loaders: synthetic files in the real formats, plus the real files when present."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from pyro_ffjord.datasets._paths import default_data_dir
from pyro_ffjord.datasets.vae import (
    load_binarized_mnist,
    load_caltech101_silhouettes,
    load_freyfaces,
    load_omniglot,
    load_vae_dataset,
)

RNG = np.random.default_rng(0)


def _mat(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, arrays, do_compression=True)
    return path


def _bits(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 2, (n, *shape), dtype=np.uint8)


def _id_images(n: int) -> np.ndarray:
    """Binary 28x28 images whose first row spells the image index, so shuffles can be traced."""
    x = _bits(n, (28, 28))
    x[:, 0, :16] = (np.arange(n)[:, None] >> np.arange(16)) & 1
    return x


def _ids(x: torch.Tensor) -> np.ndarray:
    return (x[:, 0, 0, :16].numpy().astype(np.int64) << np.arange(16)).sum(1)


def _assert_binary(*xs: torch.Tensor) -> None:
    for x in xs:
        assert x.dtype == torch.float32 and bool(((x == 0) | (x == 1)).all()) and x.min() == 0 and x.max() == 1


def _write_mnist(root: Path, sizes=(6, 4, 3)) -> list[np.ndarray]:
    images = [_bits(n, (28, 28)) for n in sizes]
    for split, x in zip(("train", "valid", "test"), images, strict=True):
        _mat(root / "binarized_mnist" / f"binarized_mnist_{split}.mat", X=x.reshape(len(x), 784))
    return images


def test_mnist_keeps_file_splits_order_and_row_major_layout(tmp_path):
    images = _write_mnist(tmp_path)
    d = load_binarized_mnist(tmp_path)
    assert (d.name, d.input_shape, d.likelihood, d.dynamic_binarization) == ("mnist", (1, 28, 28), "bernoulli", False)
    for got, want in zip((d.train, d.val, d.test), images, strict=True):
        assert got.shape == (len(want), 1, 28, 28)
        assert torch.equal(got[:, 0], torch.from_numpy(want).float())
    _assert_binary(d.train, d.val, d.test)


def test_mnist_rejects_non_binary_pixels(tmp_path):
    _write_mnist(tmp_path)
    path = _mat(tmp_path / "binarized_mnist" / "binarized_mnist_valid.mat", X=np.full((2, 784), 7, np.uint8))
    with pytest.raises(ValueError, match=str(path)):
        load_binarized_mnist(tmp_path)


def _write_substitute(root: Path, n_train: int = 1400, n_test: int = 30) -> Path:
    train = _id_images(n_train) * 255
    train[:, 27, 27] = 128  # one grey pixel: training images must stay grey
    path = root / "omniglot28" / "omniglot28_substitute.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, train_images=train, test_images=np.full((n_test, 28, 28), 255, np.uint8))
    return path


def test_omniglot_substitute_split_and_binarization(tmp_path):
    _write_substitute(tmp_path)
    d = load_omniglot(tmp_path, seed=3)
    assert (d.train.shape, d.val.shape, d.test.shape) == ((55, 1, 28, 28), (1345, 1, 28, 28), (30, 1, 28, 28))
    assert (d.name, d.likelihood, d.dynamic_binarization) == ("omniglot", "bernoulli", True)
    perm = np.random.RandomState(3).permutation(1400)
    assert np.array_equal(_ids(d.train), perm[:55]) and np.array_equal(_ids(d.val), perm[55:])
    assert torch.allclose(d.train[:, 0, 27, 27], torch.tensor(128 / 255))  # grey, for dynamic binarization
    _assert_binary(d.val)
    assert torch.all(d.test == 1)  # p = 255/255
    assert torch.equal(load_omniglot(tmp_path, seed=3).val, d.val)


def test_omniglot_binarization_uses_fixed_seed_777(tmp_path):
    path = tmp_path / "omniglot28" / "omniglot28_substitute.npz"
    path.parent.mkdir()
    np.savez(path, train_images=np.full((1350, 28, 28), 128, np.uint8), test_images=np.full((4, 28, 28), 64, np.uint8))
    d = load_omniglot(tmp_path, seed=5)
    rng = np.random.RandomState(777)
    want_val, want_test = rng.binomial(1, np.full((1345, 784), 128 / 255)), rng.binomial(1, np.full((4, 784), 64 / 255))
    assert np.array_equal(d.val.reshape(1345, -1).numpy(), want_val)
    assert np.array_equal(d.test.reshape(4, -1).numpy(), want_test)


def test_omniglot_reads_chardata_column_major_and_prefers_it(tmp_path):
    _write_substitute(tmp_path)
    train, test = _id_images(1350).astype(np.float32), _id_images(2).astype(np.float32)
    data, testdata = (x.transpose(0, 2, 1).reshape(len(x), 784).T for x in (train, test))  # (784, N), column-major
    _mat(tmp_path / "omniglot28" / "chardata.mat", data=data, testdata=testdata)
    d = load_omniglot(tmp_path)
    assert (len(d.train), len(d.val), len(d.test)) == (5, 1345, 2)
    assert torch.equal(d.test[:, 0], torch.from_numpy(test))  # binary p: binarization keeps it
    perm = np.random.RandomState(0).permutation(1350)
    assert torch.equal(d.train[:, 0], torch.from_numpy(train[perm[:5]]))


def test_omniglot_needs_more_than_validation_size(tmp_path):
    _write_substitute(tmp_path, n_train=1345)
    with pytest.raises(ValueError, match="more than 1345"):
        load_omniglot(tmp_path)


def _write_caltech(root: Path) -> np.ndarray:
    x = _id_images(8671)
    _mat(
        root / "caltech101_silhouettes" / "caltech101_silhouettes_28.mat",
        X=x.transpose(0, 2, 1).reshape(8671, 784),  # Marlin's files are column-major, object = 0
        Y=np.ones((1, 8671), np.uint8),
    )
    return x


def test_caltech_full_file_seeded_split(tmp_path):
    x = _write_caltech(tmp_path)
    d = load_caltech101_silhouettes(tmp_path, seed=7)
    assert (d.train.shape, d.val.shape, d.test.shape) == ((4100, 1, 28, 28), (2264, 1, 28, 28), (2307, 1, 28, 28))
    _assert_binary(d.train, d.val, d.test)
    perm = np.random.RandomState(7).permutation(8671)
    assert torch.equal(d.test[:, 0], torch.from_numpy(1 - x[perm[6364:]]).float())  # upright, inverted
    ids = np.concatenate([_ids(1 - s) for s in (d.train, d.val, d.test)])
    assert np.array_equal(ids, perm)
    again, other = load_caltech101_silhouettes(tmp_path, seed=7), load_vae_dataset("caltech", tmp_path, seed=8)
    assert torch.equal(again.train, d.train) and torch.equal(again.test, d.test)
    assert not torch.equal(other.test, d.test)
    assert torch.equal(load_vae_dataset("caltech", tmp_path).test, load_caltech101_silhouettes(tmp_path, 0).test)


def test_caltech_full_file_needs_8671_images(tmp_path):
    path = _mat(tmp_path / "caltech101_silhouettes" / "caltech101_silhouettes_28.mat", X=_bits(10, (784,)))
    with pytest.raises(ValueError, match=f"{path}.*8671"):
        load_caltech101_silhouettes(tmp_path)


def test_caltech_prefers_split1_file(tmp_path):
    parts = [_bits(n, (28, 28)) for n in (5, 4, 3)]
    keys = ("train_data", "val_data", "test_data")
    arrays = {k: p.transpose(0, 2, 1).reshape(len(p), 784) for k, p in zip(keys, parts, strict=True)}
    _mat(tmp_path / "caltech101_silhouettes" / "caltech101_silhouettes_28_split1.mat", **arrays)
    d = load_caltech101_silhouettes(tmp_path)
    for got, want in zip((d.train, d.val, d.test), parts, strict=True):
        assert torch.equal(got[:, 0], torch.from_numpy(1 - want).float())


def _write_frey(root: Path) -> np.ndarray:
    data = RNG.integers(0, 256, (1965, 560), dtype=np.uint8)
    data[:, 0], data[:, 1] = np.arange(1965) % 256, np.arange(1965) // 256
    data[0, 2], data[1, 2] = 0, 255
    (root / "freyfaces").mkdir()
    with open(root / "freyfaces" / "freyfaces.pkl", "wb") as f:
        pickle.dump([data], f, protocol=2)
    return data


def test_frey_seeded_shuffle_split_and_integer_pixels(tmp_path):
    data = _write_frey(tmp_path)
    d = load_vae_dataset("frey", tmp_path)  # default seed 123, as Sylvester's --freyseed
    assert (d.train.shape, d.val.shape, d.test.shape) == ((1565, 1, 28, 20), (200, 1, 28, 20), (200, 1, 28, 20))
    assert (d.input_shape, d.likelihood) == ((1, 28, 20), "categorical256")
    everything = torch.cat([d.train, d.val, d.test])
    assert everything.dtype == torch.float32 and everything.min() == 0 and everything.max() == 255
    assert torch.equal(everything, everything.round())
    perm = np.random.RandomState(123).permutation(1965)
    assert torch.equal(everything[:, 0], torch.from_numpy(data[perm].reshape(-1, 28, 20)).float())
    assert not torch.equal(load_freyfaces(tmp_path, seed=321).test, d.test)


def test_frey_rejects_wrong_shape(tmp_path):
    (tmp_path / "freyfaces").mkdir()
    path = tmp_path / "freyfaces" / "freyfaces.pkl"
    path.write_bytes(pickle.dumps([np.zeros((10, 560), np.uint8)]))
    with pytest.raises(ValueError, match=str(path)):
        load_freyfaces(tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "binarized_mnist/binarized_mnist_train.mat"),
        ("omniglot", "omniglot28/omniglot28_substitute.npz"),
        ("caltech", "caltech101_silhouettes/caltech101_silhouettes_28.mat"),
        ("frey", "freyfaces/freyfaces.pkl"),
    ],
)
def test_missing_file_names_expected_path(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / expected)):
        load_vae_dataset(name, tmp_path)


@pytest.mark.parametrize("name", ["mnist", "omniglot", "caltech", "frey"])
def test_truncated_file_raises_value_error_naming_it(tmp_path, name):
    {"mnist": _write_mnist, "omniglot": _write_substitute, "caltech": _write_caltech, "frey": _write_frey}[name](
        tmp_path
    )
    path = max((p for p in tmp_path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(path)):
        load_vae_dataset(name, tmp_path)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown VAE dataset 'cifar'"):
        load_vae_dataset("cifar")


def _real(relative: str) -> Path:
    path = default_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"real data file absent: {path}")
    return path


def test_real_binarized_mnist():
    _real("binarized_mnist/binarized_mnist_train.mat")
    d = load_vae_dataset("mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (50000, 10000, 10000)
    _assert_binary(d.train, d.val, d.test)
    assert abs(d.test.mean().item() - 0.1325) < 1e-3


def test_real_omniglot_substitute():
    _real("omniglot28/omniglot28_substitute.npz")
    d = load_vae_dataset("omniglot")
    assert (len(d.train), len(d.val), len(d.test)) == (19280 - 1345, 1345, 13180)
    _assert_binary(d.val, d.test)
    assert 0 <= d.train.min() and d.train.max() <= 1 and not torch.equal(d.train, d.train.round())


def test_real_caltech():
    _real("caltech101_silhouettes/caltech101_silhouettes_28.mat")
    d = load_vae_dataset("caltech")
    assert (len(d.train), len(d.val), len(d.test)) == (4100, 2264, 2307)
    _assert_binary(d.train, d.val, d.test)
    assert abs(torch.cat([d.train, d.val, d.test]).mean().item() - (1 - 0.544)) < 1e-3  # object = 1


def test_real_frey():
    _real("freyfaces/freyfaces.pkl")
    d = load_vae_dataset("frey")
    assert (d.train.shape, d.val.shape, d.test.shape) == ((1565, 1, 28, 20), (200, 1, 28, 20), (200, 1, 28, 20))
    everything = torch.cat([d.train, d.val, d.test])
    assert everything.min() == 8 and everything.max() == 238 and torch.equal(everything, everything.round())
