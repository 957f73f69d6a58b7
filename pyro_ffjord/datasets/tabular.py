"""The tabular density-estimation benchmarks of MAF (Papamakarios et al., 2017), read from local files.

POWER, GAS, HEPMASS, MINIBOONE and BSDS300 are read from the layout of the MAF repository
(github.com/gpapamak/maf, ``datasets/*.py``) under the data root (see :mod:`._paths`)::

    <root>/power/data.npy                        (N, 8) float array
    <root>/gas/ethylene_CO.pickle                pandas DataFrame (needs pandas)
    <root>/hepmass/1000_train.csv, 1000_test.csv UCI CSVs with a header line
    <root>/miniboone/data.npy                    (N, 43) float array
    <root>/BSDS300/BSDS300.hdf5                  datasets train/validation/test (needs h5py)

and apply MAF's preprocessing step for step (each loader says which). :func:`build_bsds300_from_images`
makes the BSDS300 patch data from the raw images instead, and :func:`load_table` reads any numeric CSV/NPY
file. Every loader returns a :class:`TabularData` of float32 **numpy** arrays (wrap them with
``torch.from_numpy`` when needed). Nothing is ever downloaded. pandas, h5py and Pillow come with the
``data`` extra (``pip install 'pyro-ffjord[data]'``).

Reference: G. Papamakarios, T. Pavlakou, I. Murray, "Masked Autoregressive Flow for Density Estimation",
NeurIPS 2017, Appendix D.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._optional import require
from ._paths import require_file, resolve_root
from .power import load_power_source

__all__ = [
    "TabularData",
    "build_bsds300_from_images",
    "load_bsds300",
    "load_gas",
    "load_hepmass",
    "load_miniboone",
    "load_power",
    "load_table",
    "load_tabular",
]

PathLike = str | os.PathLike


@dataclass
class TabularData:
    """Train/validation/test splits of one dataset, each a float32 numpy array of shape ``(N, dim)``.

    Attributes:
        train: Training rows.
        val: Validation rows.
        test: Test rows.
        name: Dataset name.
        source: Where the rows came from, when a dataset has several possible sources.
        columns: The columns' names, when the file has a header line.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str
    source: str = ""
    columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.train, self.val, self.test = (np.ascontiguousarray(a, dtype=np.float32) for a in self.splits)
        if any(a.ndim != 2 or a.shape[1] != self.dim for a in self.splits):
            raise ValueError(f"{self.name}: splits must be 2-D with equal widths, got {[a.shape for a in self.splits]}")

    @property
    def splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(train, val, test)``."""
        return self.train, self.val, self.test

    @property
    def dim(self) -> int:
        """Number of columns."""
        return self.train.shape[1]


def _maf_file(root: PathLike | None, rel: str, name: str) -> Path:
    path = resolve_root(root) / rel
    return require_file(
        path, f"{name} data", "MAF's preprocessed files, data.tar.gz from https://zenodo.org/record/1161203"
    )


def _check_finite(x: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0)).tolist()
        raise ValueError(f"{path}: {int(bad.sum())} NaN/inf value(s) in column(s) {cols}")


def _load_npy(path: Path, ncols: int | None = None) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy file (truncated or corrupt?): {e}") from e
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or (ncols is not None and x.shape[1] != ncols):
        want = f"(N, {ncols})" if ncols else "(N, D)"
        raise ValueError(f"{path}: expected an array of shape {want}, got {x.shape}")
    _check_finite(x, path)
    return x


def _read_csv(path: Path) -> tuple[list[str] | None, np.ndarray]:
    """Header names (None when the first line is numeric) and the numeric rows of a comma-separated file."""
    with open(path) as f:
        first = f.readline().split(",")
    try:
        float(first[0])
        names = None
    except ValueError:
        names = [s.strip() for s in first if s.strip()]
    ncols = len(names) if names else len(first)
    try:
        x = np.loadtxt(path, delimiter=",", skiprows=int(names is not None), usecols=range(ncols), ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: not a numeric CSV with {ncols} columns (truncated or corrupt?): {e}") from e
    _check_finite(x, path)
    return names, x


def _split_tail(x: np.ndarray, frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """MAF's split: the last ``int(frac * N)`` rows are held out."""
    n = int(frac * x.shape[0])
    return x[: x.shape[0] - n], x[x.shape[0] - n :]


def _maf_split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last 10 % is test, then the last 10 % of the rest is validation (MAF's power/gas/miniboone.py)."""
    rest, test = _split_tail(x)
    train, val = _split_tail(rest)
    return train, val, test


def _standardize_on_train_val(name: str, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> TabularData:
    """MAF's ``load_data_normalised``: mean and (population) std of train+validation, applied to all splits."""
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return TabularData((train - mu) / s, (val - mu) / s, (test - mu) / s, name)


def load_power(root: PathLike | None = None) -> TabularData:
    """POWER (UCI household electric power consumption), preprocessed as MAF's ``datasets/power.py``.

    Steps: load ``<root>/power/data.npy`` (8 columns; without it, the same array rebuilt from the UCI data
    under ``<root>/household_power/``, see :mod:`~pyro_ffjord.datasets.power`); shuffle rows with
    ``np.random.RandomState(42)``;
    delete columns 3 (global intensity) and 1 (global reactive power); add uniform noise drawn from the same
    generator in MAF's order (voltage ``0.01 U``, then active power ``0.001 U``, then the three sub-meterings
    ``U``; none on the time column); test = last 10 %, validation = last 10 % of the rest; standardize with the
    mean/std of train+validation. Result: 6 dimensions.

    Args:
        root: Data root; ``None`` uses :func:`~pyro_ffjord.datasets.resolve_root`'s default.

    Returns:
        The splits (MAF sizes: 1,659,917 / 184,435 / 204,928), with their ``source``.
    """
    root = resolve_root(root)
    maf = root / "power/data.npy"
    if maf.is_file():
        x, source = _load_npy(maf, ncols=8), f"MAF's {maf}"
    else:
        x, source = load_power_source(root)
    rng = np.random.RandomState(42)
    rng.shuffle(x)
    x = np.delete(x, [1, 3], axis=1)  # -> active power, voltage, sub-meterings 1-3, time
    n = x.shape[0]
    voltage, active, sub = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    x = x + np.hstack((active, voltage, sub, np.zeros((n, 1))))
    data = _standardize_on_train_val("power", *_maf_split(x))
    data.source = source
    return data


def _gas_preprocess(names: list[str], x: np.ndarray) -> np.ndarray:
    """MAF's GAS cleaning on a table with column ``names``: drop Meth/Eth/Time, prune correlated, standardize."""
    missing = {"Meth", "Eth", "Time"} - set(names)
    if missing:
        raise ValueError(f"GAS table lacks the column(s) {sorted(missing)} that MAF drops; columns: {names}")
    x = x[:, [i for i, c in enumerate(names) if c not in {"Meth", "Eth", "Time"}]]
    while True:  # drop the first column whose Pearson correlation with another exceeds 0.98, until none does
        with np.errstate(invalid="ignore", divide="ignore"):
            counts = (np.corrcoef(x, rowvar=False) > 0.98).sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if over.size == 0:
            break
        x = np.delete(x, over[0], axis=1)
    return (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)  # pandas' std (ddof=1), over the whole table


def load_gas(root: PathLike | None = None) -> TabularData:
    """GAS (UCI gas sensor array under dynamic mixtures, ethylene+CO), preprocessed as MAF's ``datasets/gas.py``.

    Steps: read the pandas pickle ``<root>/gas/ethylene_CO.pickle``; drop columns ``Meth``, ``Eth`` and
    ``Time``; repeatedly drop the first column whose correlation with some other column is above 0.98;
    standardize with the mean and (ddof=1) std of the *whole* table; then, without shuffling, test = last 10 %,
    validation = last 10 % of the rest. Result: 8 dimensions. Reading the pickle needs pandas (not a
    dependency of this package); a pickle runs code when loaded, so only read files you trust.

    Args:
        root: Data root; ``None`` uses the default.

    Returns:
        The splits (MAF sizes: 852,174 / 94,685 / 105,206).
    """
    path = _maf_file(root, "gas/ethylene_CO.pickle", "GAS")
    pd = require("pandas", "pandas", f"reading {path} (a pandas pickle)")
    try:
        frame = pd.read_pickle(path)
    except Exception as e:  # unpickling can fail in many ways; all mean the file is unusable
        raise ValueError(f"{path}: not a readable pandas pickle (truncated or corrupt?): {e}") from e
    x = frame.to_numpy(dtype=np.float64)
    _check_finite(x, path)
    train, val, test = _maf_split(_gas_preprocess([str(c) for c in frame.columns], x))
    return TabularData(train, val, test, "gas")


def load_hepmass(root: PathLike | None = None) -> TabularData:
    """HEPMASS (UCI), preprocessed as MAF's ``datasets/hepmass.py``.

    Steps: read ``<root>/hepmass/1000_train.csv`` and ``1000_test.csv`` (header line, label in column 0);
    keep the signal rows (label 1) and drop the label; standardize both files with the train file's mean and
    (ddof=1) std; drop every feature whose smallest value occurs more than 5 times in the train file (this is
    what MAF's ``sorted(Counter(...).items())[0]`` computes, see gpapamak/maf issue #8); validation = last 10 %
    of the train file. MAF drops the test file's last column and then matches columns to the train file by
    name (pandas alignment); we select the kept train columns by header name, which gives the same matrix.
    Repeat counts are taken before standardizing, which is equivalent except that a constant column (the mass,
    always 1000 among these signal rows) is dropped instead of turning into NaN. Result: 21 dimensions.

    Args:
        root: Data root; ``None`` uses the default.

    Returns:
        The splits (MAF sizes: 315,123 / 35,013 / 174,987).
    """
    tables = []
    for part in ("train", "test"):
        path = _maf_file(root, f"hepmass/1000_{part}.csv", "HEPMASS")
        names, x = _read_csv(path)
        if names is None:
            raise ValueError(f"{path}: expected a header line (# label, f0, ..., mass) as in the UCI HEPMASS files")
        tables.append((path, names[1:], x[x[:, 0] == 1, 1:]))
    (_, names, train), (test_path, test_names, test) = tables
    mu, s = train.mean(axis=0), train.std(axis=0, ddof=1)
    keep = [i for i in range(train.shape[1]) if np.sum(train[:, i] == train[:, i].min()) <= 5]
    lacking = [names[i] for i in keep if names[i] not in test_names]
    if lacking:
        raise ValueError(f"{test_path}: lacks the column(s) {lacking} of 1000_train.csv")
    test = test[:, [test_names.index(names[i]) for i in keep]]
    train, val = _split_tail((train[:, keep] - mu[keep]) / s[keep])
    return TabularData(train, val, (test - mu[keep]) / s[keep], "hepmass")


def load_miniboone(root: PathLike | None = None) -> TabularData:
    """MINIBOONE (UCI particle identification), preprocessed as MAF's ``datasets/miniboone.py``.

    Steps: load ``<root>/miniboone/data.npy`` (MAF already removed outliers and repeated-value features when
    it made this file: 43 columns); no shuffling; test = last 10 %, validation = last 10 % of the rest;
    standardize with the mean/std of train+validation. Result: 43 dimensions.

    Args:
        root: Data root; ``None`` uses the default.

    Returns:
        The splits (MAF sizes: 29,556 / 3,284 / 3,648).
    """
    x = _load_npy(_maf_file(root, "miniboone/data.npy", "MINIBOONE"))
    return _standardize_on_train_val("miniboone", *_maf_split(x))


def load_bsds300(root: PathLike | None = None) -> TabularData:
    """BSDS300 8x8 patches as shipped by MAF, read as MAF's ``datasets/bsds300.py``: no further preprocessing.

    Reads the datasets ``train``, ``validation`` and ``test`` of ``<root>/BSDS300/BSDS300.hdf5``; needs h5py
    (not a dependency of this package). Result: 63 dimensions.

    Args:
        root: Data root; ``None`` uses the default.

    Returns:
        The splits (MAF sizes: 1,000,000 / 50,000 / 250,000).
    """
    path = _maf_file(root, "BSDS300/BSDS300.hdf5", "BSDS300")
    h5py = require("h5py", "h5py", f"reading {path} (HDF5)")
    try:
        with h5py.File(path, "r") as f:
            splits = [f[k][:] for k in ("train", "validation", "test")]
    except (OSError, KeyError) as e:
        raise ValueError(f"{path}: not an HDF5 file with datasets train/validation/test: {e}") from e
    return TabularData(*splits, "bsds300")


def _grey_images(folder: Path) -> list[np.ndarray]:
    Image = require("PIL.Image", "Pillow", f"reading the BSDS300 images in {folder}")
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise FileNotFoundError(
            f"no BSDS300 images: expected {folder}/<id>.png or <id>.jpg "
            "(layout <root>/BSDS300/images/{train,test}/, as BSDS300-images.tgz from "
            "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/bsds/ unpacks)"
        )
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("L")))
        except OSError as e:
            raise ValueError(f"{p}: not a readable image (truncated or corrupt?): {e}") from e
    return images


def _patches(images: list[np.ndarray], n: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """``n`` MAF/RNADE patches: random image, random position, ``(p + U) / 256``, minus patch mean, last dropped."""
    which = rng.integers(len(images), size=n)
    raw = np.empty((n, size * size), dtype=np.float32)
    for i, img in enumerate(images):
        rows = np.flatnonzero(which == i)
        r = rng.integers(img.shape[0] - size + 1, size=rows.size)
        c = rng.integers(img.shape[1] - size + 1, size=rows.size)
        raw[rows] = sliding_window_view(img, (size, size))[r, c].reshape(rows.size, size * size)
    x = (raw + rng.random(raw.shape, dtype=np.float32)) / 256
    return (x - x.mean(axis=1, keepdims=True))[:, :-1]


def build_bsds300_from_images(
    root: PathLike | None = None,
    n_train: int = 1_000_000,
    n_val: int = 50_000,
    n_test: int = 250_000,
    n_val_images: int = 20,
    seed: int = 0,
) -> TabularData:
    """Builds MAF's BSDS300 patch dataset from the raw images in ``<root>/BSDS300/images/{train,test}/``.

    Follows MAF Appendix D.2 / Uria et al. (2013): images are made grey-scale; random 8x8 patches are cut
    (each patch from a uniformly chosen image at a uniformly chosen position); the 0-255 pixel values ``p``
    are dequantized and scaled to [0, 1) as ``(p + u) / 256`` with ``u ~ U[0, 1)``; each patch's mean is
    subtracted and its bottom-right pixel dropped (it is minus the sum of the others), giving 63 dimensions.
    Train and validation patches come from the 200 training images, the validation ones from the last
    ``n_val_images`` of them in file-name order (held-out images, our choice: MAF only ships the finished
    HDF5 file, so its exact image split could not be checked); test patches come from the 100 test images.
    Grey-scale is Pillow's ``convert("L")`` (ITU-R 601-2 luma, ``0.299 R + 0.587 G + 0.114 B`` rounded),
    the same weights as MATLAB's ``rgb2gray``, with which we assume the original data were made. The
    defaults are MAF's sizes (1,000,000 / 50,000 / 250,000). Results are reproducible for a fixed ``seed``
    but are not bit-identical to MAF's ``BSDS300.hdf5``. Needs Pillow.

    Args:
        root: Data root; ``None`` uses the default.
        n_train: Number of training patches.
        n_val: Number of validation patches.
        n_test: Number of test patches.
        n_val_images: How many training images (the last in name order) are kept for validation patches.
        seed: Seed of the ``numpy.random.default_rng`` that draws the patches and the noise.

    Returns:
        The splits, each of shape ``(n, 63)``.
    """
    folder = resolve_root(root) / "BSDS300" / "images"
    train_images, test_images = _grey_images(folder / "train"), _grey_images(folder / "test")
    if not 0 < n_val_images < len(train_images):
        raise ValueError(f"n_val_images must be in [1, {len(train_images) - 1}], got {n_val_images}")
    rng = np.random.default_rng(seed)
    train = _patches(train_images[:-n_val_images], n_train, rng)
    val = _patches(train_images[-n_val_images:], n_val, rng)
    return TabularData(train, val, _patches(test_images, n_test, rng), "bsds300-images")


def load_table(path: PathLike, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> TabularData:
    """Reads a user's numeric ``.csv`` (optional header line) or ``.npy`` table, split and standardized.

    Rows are shuffled with ``numpy.random.default_rng(seed)``, split into test (``int(test_fraction * N)``
    rows), validation (``int(val_fraction * N)``) and train (the rest), and standardized with the mean/std of
    the train split, in the spirit of MAF's preprocessing. Columns that are constant on the train split cannot
    be standardized: they are dropped with a ``UserWarning`` naming them.

    Args:
        path: The file.
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for test.
        seed: Shuffling seed.

    Returns:
        The splits, named after the file.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file is unreadable, holds NaN/inf (the message gives the count and the columns),
            or leaves no train row or no usable column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table at {path}: expected a numeric .csv or .npy file")
    names, x = (None, _load_npy(path)) if path.suffix.lower() == ".npy" else _read_csv(path)
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(x.shape[0])]
    n_test, n_val = int(test_fraction * x.shape[0]), int(val_fraction * x.shape[0])
    test, val, train = np.split(x, [n_test, n_test + n_val])
    if train.shape[0] == 0:
        raise ValueError(f"{path}: {x.shape[0]} row(s) leave no training rows")
    mu, s = train.mean(axis=0), train.std(axis=0)
    keep = s > 0
    if not keep.all():
        warnings.warn(f"{path}: dropping constant column(s) {np.flatnonzero(~keep).tolist()}", stacklevel=2)
    if not keep.any():
        raise ValueError(f"{path}: every column is constant on the training split")
    train, val, test = ((a[:, keep] - mu[keep]) / s[keep] for a in (train, val, test))
    columns = None if names is None else tuple(name for name, k in zip(names, keep) if k)
    return TabularData(train, val, test, path.stem, columns=columns)


_LOADERS = {
    "power": load_power,
    "gas": load_gas,
    "hepmass": load_hepmass,
    "miniboone": load_miniboone,
    "bsds300": load_bsds300,
    "bsds300-images": build_bsds300_from_images,
}


def load_tabular(name: str, root: PathLike | None = None, **kwargs) -> TabularData:
    """Loads a dataset by name: one of ``power, gas, hepmass, miniboone, bsds300, bsds300-images``, or ``csv``.

    Args:
        name: Dataset name; ``"csv"`` reads the user file ``kwargs["path"]`` with :func:`load_table`
            (which also reads ``.npy``).
        root: Data root for the named datasets.
        **kwargs: Passed on to the loader (e.g. ``n_train`` for ``bsds300-images``, ``seed`` for ``csv``).

    Returns:
        The splits.
    """
    if name == "csv":
        return load_table(**kwargs)
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_LOADERS)} or 'csv'")
    return _LOADERS[name](root, **kwargs)
