"""Tests of the MAF tabular loaders (Papamakarios et al., 2017) on tiny synthetic files in the real formats."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyro_ffjord.datasets import tabular
from pyro_ffjord.datasets.tabular import (
    TabularData,
    build_bsds300_from_images,
    load_bsds300,
    load_gas,
    load_hepmass,
    load_power,
    load_table,
    load_tabular,
)

REAL_BSDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "BSDS300"


def maf_sizes(n: int) -> tuple[int, int, int]:
    """MAF's split sizes: test = int(0.1 N), validation = int(0.1 * rest)."""
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


def assert_standardized(x: np.ndarray, ddof: int = 0) -> None:
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0, ddof=ddof), 1, atol=1e-4)


def test_power_matches_maf_pipeline(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).normal(size=(503, 8)) * np.arange(1, 9)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    data = load_power(tmp_path)
    # MAF's power.py, step by step, as the oracle.
    rng = np.random.RandomState(42)
    x = raw.copy()
    rng.shuffle(x)
    x = np.delete(np.delete(x, 3, axis=1), 1, axis=1)
    volt, gap, sm = 0.01 * rng.rand(503, 1), 0.001 * rng.rand(503, 1), rng.rand(503, 3)
    x = x + np.hstack((gap, volt, sm, np.zeros((503, 1))))
    n_train, n_val, _ = maf_sizes(503)
    mu, s = x[: n_train + n_val].mean(0), x[: n_train + n_val].std(0)
    expected = (x - mu) / s
    assert data.name == "power" and data.dim == 6 and data.train.dtype == np.float32
    assert [len(a) for a in data.splits] == list(maf_sizes(503))
    np.testing.assert_allclose(np.vstack(data.splits), expected, rtol=1e-5, atol=1e-5)
    assert_standardized(np.vstack((data.train, data.val)))


def test_miniboone_split_order_and_normalization(tmp_path: Path) -> None:
    raw = np.random.default_rng(2).gamma(2.0, size=(371, 43))
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    data = load_tabular("miniboone", root=tmp_path)
    n_train, n_val, n_test = maf_sizes(371)
    assert data.dim == 43 and [len(a) for a in data.splits] == [n_train, n_val, n_test]
    assert_standardized(np.vstack((data.train, data.val)))
    mu, s = raw[:-n_test].mean(0), raw[:-n_test].std(0)
    np.testing.assert_allclose(data.test, (raw[-n_test:] - mu) / s, rtol=1e-5, atol=1e-5)  # tail, unshuffled


def gas_table(n: int = 400) -> tuple[list[str], np.ndarray]:
    """16 sensors, the last 8 almost copies (corr > 0.98) of the first 8, plus Time/Meth/Eth, like the pickle."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(n, 8)) @ np.triu(np.full((8, 8), 0.3), 1) + rng.normal(size=(n, 8))
    sensors = np.hstack((base, 2 * base + 0.01 * rng.normal(size=(n, 8))))
    names = ["Time", "Meth", "Eth"] + [f"R{i}" for i in range(1, 17)]
    return names, np.hstack((np.arange(n)[:, None], rng.random((n, 2)), sensors))


def test_gas_cleaning_drops_correlated_columns_and_standardizes() -> None:
    names, table = gas_table()
    x = tabular._gas_preprocess(names, table)
    kept = table[:, 11:]  # MAF drops the *first* column of each correlated pair: R1..R8 go, R9..R16 stay
    np.testing.assert_allclose(x, (kept - kept.mean(0)) / kept.std(0, ddof=1))
    with pytest.raises(ValueError, match="Meth"):
        tabular._gas_preprocess(names[1:], table[:, 1:])


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas not installed")
def test_gas_from_pickle(tmp_path: Path) -> None:
    import pandas as pd

    names, table = gas_table()
    (tmp_path / "gas").mkdir()
    pd.DataFrame(table, columns=names).to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    data = load_gas(tmp_path)
    assert data.dim == 8 and [len(a) for a in data.splits] == list(maf_sizes(400))


def test_gas_without_pandas_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"\x80\x04.")
    with pytest.raises(ImportError, match="pip install pandas"):
        load_gas(tmp_path)


def write_hepmass(path: Path, n: int, rng: np.random.Generator, extra_column: bool = False) -> np.ndarray:
    """UCI layout: '# label,f0..f26,mass'; f21..f26 discrete (min value repeated), mass 1000 for signal."""
    label = rng.integers(0, 2, size=n)
    feats = np.hstack((rng.normal(size=(n, 21)), rng.integers(0, 3, size=(n, 6)).astype(float)))
    mass = np.where(label == 1, 1000.0, rng.choice([500.0, 1500.0], size=n))
    rows = np.column_stack((label, feats, mass))
    header = "# label," + ",".join(f"f{i}" for i in range(27)) + ",mass" + ("," if extra_column else "")
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.9g")
    return rows[label == 1, 1:22]


def test_hepmass_signal_only_drops_discrete_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "hepmass").mkdir()
    train_raw = write_hepmass(tmp_path / "hepmass" / "1000_train.csv", 600, rng)
    test_raw = write_hepmass(tmp_path / "hepmass" / "1000_test.csv", 300, rng, extra_column=True)
    data = load_hepmass(tmp_path)
    n_val = int(0.1 * len(train_raw))
    assert data.dim == 21
    assert [len(a) for a in data.splits] == [len(train_raw) - n_val, n_val, len(test_raw)]
    assert_standardized(np.vstack((data.train, data.val)), ddof=1)
    mu, s = train_raw.mean(0), train_raw.std(0, ddof=1)
    np.testing.assert_allclose(data.test, (test_raw - mu) / s, rtol=1e-4, atol=1e-4)


def test_bsds300_hdf5_without_h5py_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    (tmp_path / "BSDS300").mkdir()
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"\x89HDF")
    with pytest.raises(ImportError, match="pip install h5py"):
        load_bsds300(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="h5py not installed")
def test_bsds300_hdf5(tmp_path: Path) -> None:
    import h5py

    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, n in (("train", 30), ("validation", 5), ("test", 10)):
            f[key] = np.random.default_rng(n).normal(size=(n, 63))
    data = load_bsds300(tmp_path)
    assert data.dim == 63 and [len(a) for a in data.splits] == [30, 5, 10]


@pytest.mark.parametrize(
    ("name", "rel"),
    [
        ("power", "power/data.npy"),
        ("gas", "gas/ethylene_CO.pickle"),
        ("hepmass", "hepmass/1000_train.csv"),
        ("miniboone", "miniboone/data.npy"),
        ("bsds300", "BSDS300/BSDS300.hdf5"),
    ],
)
def test_missing_file_names_expected_path(tmp_path: Path, name: str, rel: str) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_tabular(name, root=tmp_path)
    assert str(tmp_path / rel) in str(err.value) and "MAF" in str(err.value)


def test_truncated_and_misshapen_files_raise_value_error(tmp_path: Path) -> None:
    (tmp_path / "power").mkdir()
    path = tmp_path / "power" / "data.npy"
    np.save(path, np.zeros((50, 8)))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="data.npy"):
        load_power(tmp_path)
    np.save(path, np.zeros((50, 7)))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        load_power(tmp_path)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)


def test_bsds300_images_builder_grey_and_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for split, count in (("train", 3), ("test", 1)):
        folder = tmp_path / "BSDS300" / "images" / split
        folder.mkdir(parents=True)
        for i in range(count):
            write_rgb(folder / f"{i}.png", rng.integers(0, 256, size=(12, 10, 3)))
    # An 8x8 test image has one patch position, so every test row is ((p + u) / 256 - mean)[:-1].
    rgb = rng.integers(0, 256, size=(8, 8, 3))
    write_rgb(tmp_path / "BSDS300" / "images" / "test" / "0.png", rgb)
    grey = (rgb @ np.array([19595, 38470, 7471]) + 0x8000) >> 16  # ITU-R 601-2 luma, rounded
    data = build_bsds300_from_images(tmp_path, n_train=500, n_val=40, n_test=400, n_val_images=1, seed=0)
    assert data.dim == 63 and [len(a) for a in data.splits] == [500, 40, 400]
    noise = 256 * (data.test - ((grey - grey.mean()) / 256).ravel()[:-1])  # = u_k - mean(u)
    assert np.abs(noise).max() < 1 and noise.std() > 0.25
    np.testing.assert_allclose(noise.mean(0), 0, atol=0.06)
    again = build_bsds300_from_images(tmp_path, n_train=500, n_val=40, n_test=400, n_val_images=1, seed=0)
    np.testing.assert_array_equal(again.train, data.train)


def test_bsds300_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"BSDS300/images/train"):
        build_bsds300_from_images(tmp_path, n_train=1, n_val=1, n_test=1)


@pytest.mark.skipif(not (REAL_BSDS / "images").is_dir(), reason="real BSDS300 images not present")
def test_bsds300_images_builder_on_real_images() -> None:
    data = load_tabular("bsds300-images", root=REAL_BSDS.parent, n_train=2000, n_val=200, n_test=500)
    assert data.dim == 63 and [len(a) for a in data.splits] == [2000, 200, 500]
    full = np.hstack((data.train, -data.train.sum(1, keepdims=True)))
    np.testing.assert_allclose(full.mean(1), 0, atol=1e-6)
    assert (full.max(1) - full.min(1)).max() <= 1
    assert 0.01 < data.train.std() < 0.3  # natural-image patch contrast in [0, 1] units


def test_load_table_csv_split_standardize_and_constant_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = np.column_stack((rng.normal(3, 2, size=200), np.full(200, 5.0), rng.exponential(size=200)))
    path = tmp_path / "mine.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c", comments="")
    with pytest.warns(UserWarning, match=r"constant column\(s\) \[1\]"):
        data = load_tabular("csv", path=path, seed=1)
    assert isinstance(data, TabularData) and data.name == "mine" and data.dim == 2
    assert [len(a) for a in data.splits] == [160, 20, 20]
    assert_standardized(data.train)
    np.save(tmp_path / "mine.npy", x[:, [0, 2]])
    np.testing.assert_allclose(load_table(tmp_path / "mine.npy", seed=1).train, data.train, rtol=1e-6)


def test_load_table_rejects_nan_with_file_count_and_column(tmp_path: Path) -> None:
    x = np.random.default_rng(7).normal(size=(20, 3))
    x[[2, 5], 2] = np.nan
    x[4, 0] = np.inf
    path = tmp_path / "bad.csv"
    np.savetxt(path, x, delimiter=",")
    with pytest.raises(ValueError, match=r"bad\.csv: 3 NaN/inf value\(s\) in column\(s\) \[0, 2\]"):
        load_table(path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_tabular("cifar")


def test_patches_when_an_image_gets_none():
    """More images than patches: some images contribute no patch, which must not break the builder."""
    images = [np.full((10, 10), float(i)) for i in range(20)]
    x = tabular._patches(images, 5, np.random.default_rng(0))
    assert x.shape == (5, 63) and np.isfinite(x).all()
