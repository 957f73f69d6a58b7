"""MAF's POWER array rebuilt from the UCI "Individual household electric power consumption" data.

MAF's ``power/data.npy`` (Papamakarios et al., 2017) holds, in time order, the seven measurements of
every UCI row without a missing value plus the time of day in minutes since midnight: ``(N, 8)``.
It is rebuilt here from either source of the UCI data (dataset 235, https://archive.ics.uci.edu/dataset/235):

* the original ``household_power_consumption.txt`` (``;``-separated, ``Date`` dd/mm/yyyy, ``Time``
  hh:mm:ss, ``?`` for missing values): rows with ``?`` are dropped, which gives MAF's 2,049,280 rows;
* a copy in which every missing row was filled with the row of exactly 24 hours earlier
  (``householdpower.csv.gz``, a ``date_time`` column then the seven measurements; see the data folder's
  PROVENANCE.md): rows equal in all seven measurements to the row 24 hours earlier are dropped, which
  removes the filled rows and 22 genuine rows that happen to repeat, leaving 2,049,258.

The rebuilt array is cached beside its source (``<source>.power.npy``, written atomically) when that
folder is writable. Needs pandas (the ``data`` extra).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._optional import require

if TYPE_CHECKING:
    import pandas

MEASUREMENTS = (
    "Global_active_power",
    "Global_reactive_power",
    "Voltage",
    "Global_intensity",
    "Sub_metering_1",
    "Sub_metering_2",
    "Sub_metering_3",
)
UCI_FILE = "household_power/household_power_consumption.txt"
FILLED_FILE = "household_power/householdpower.csv.gz"


def _read(path: Path, columns: tuple[str, ...], **options) -> pandas.DataFrame:
    """The CSV at ``path`` with exactly ``columns``; a clear ``ValueError`` naming the file otherwise."""
    pd = require("pandas", "pandas", f"reading {path}")
    try:
        frame = pd.read_csv(path, **options)
    except (ValueError, EOFError, OSError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a readable household power file (truncated or malformed?): {e}") from e
    if tuple(frame.columns) != columns:
        raise ValueError(f"{path}: expected the columns {list(columns)}, got {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{path}: holds no rows")
    return frame


def _measurements(frame: pandas.DataFrame, path: Path) -> np.ndarray:
    try:
        values = frame[list(MEASUREMENTS)].to_numpy(dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric measurements: {e}") from e
    return values


def _minutes(times: pandas.Series, path: Path) -> np.ndarray:
    """Minutes since midnight of ``HH:MM[:SS]`` strings."""
    parts = times.str.extract(r"^(\d\d):(\d\d)")
    if parts.isna().any().any():
        raise ValueError(f"{path}: malformed times, e.g. {times[parts.isna().any(axis=1)].iloc[0]!r}")
    return parts[0].astype(np.int64).to_numpy() * 60 + parts[1].astype(np.int64).to_numpy()


def build_power_from_uci(path: str | os.PathLike) -> np.ndarray:
    """MAF's ``data.npy`` from the UCI original ``household_power_consumption.txt``: the rows with ``?`` dropped.

    Returns:
        float64 array ``(N, 8)``: the seven measurements, then minutes since midnight; in file (time) order.
    """
    path = Path(path)
    frame = _read(path, ("Date", "Time", *MEASUREMENTS), sep=";", na_values=["?"], dtype={"Date": str, "Time": str})
    frame = frame.dropna(subset=list(MEASUREMENTS))
    return np.column_stack([_measurements(frame, path), _minutes(frame["Time"], path)])


def build_power_from_filled(path: str | os.PathLike) -> np.ndarray:
    """MAF's ``data.npy`` from the copy whose missing rows hold the row of 24 hours earlier: those rows dropped.

    A row is dropped when all seven measurements equal those of the row whose time stamp is exactly one day
    earlier; the file must be in strictly increasing time order.

    Returns:
        float64 array ``(N, 8)``: the seven measurements, then minutes since midnight; in time order.
    """
    path = Path(path)
    pd = require("pandas", "pandas", f"reading {path}")
    frame = _read(path, ("date_time", *MEASUREMENTS), dtype={"date_time": str})
    try:
        stamps = pd.to_datetime(frame["date_time"], format="%Y-%m-%d %H:%M:%S")
    except ValueError as e:
        raise ValueError(f"{path}: malformed date_time values: {e}") from e
    if not stamps.is_monotonic_increasing or stamps.duplicated().any():
        raise ValueError(f"{path}: date_time must be strictly increasing")
    values = _measurements(frame, path)
    position = pd.Series(np.arange(len(frame)), index=pd.DatetimeIndex(stamps))
    earlier = position.reindex(pd.DatetimeIndex(stamps) - pd.Timedelta(days=1)).to_numpy()
    has_earlier = ~np.isnan(earlier)
    repeated = np.zeros(len(frame), dtype=bool)
    repeated[has_earlier] = (values[has_earlier] == values[earlier[has_earlier].astype(np.int64)]).all(axis=1)
    minutes = (stamps.dt.hour * 60 + stamps.dt.minute).to_numpy()
    return np.column_stack([values[~repeated], minutes[~repeated]])


def _cached(source: Path, build) -> np.ndarray:
    """``build(source)``, cached beside the source as ``<source>.power.npy`` (rebuilt when the source is newer)."""
    cache = source.with_name(source.name + ".power.npy")
    if cache.is_file() and cache.stat().st_mtime >= source.stat().st_mtime:
        try:
            return np.load(cache, allow_pickle=False)
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt
    x = build(source)
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(dir=source.parent, suffix=".npy.tmp", delete=False) as f:
            temporary = Path(f.name)
            np.save(f, x)
        temporary.chmod(0o644)
        os.replace(temporary, cache)
    except OSError:  # a read-only data folder: no cache
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return x


def load_power_source(root: Path) -> tuple[np.ndarray, str]:
    """The rebuilt array from the UCI original under ``root`` if present, else from the filled copy.

    Returns:
        The array and a description of its source.

    Raises:
        FileNotFoundError: neither file exists (the message names both and where to get them).
    """
    uci, filled = root / UCI_FILE, root / FILLED_FILE
    if uci.is_file():
        return _cached(uci, build_power_from_uci), f"rebuilt from the UCI data ({uci}, rows with '?' dropped)"
    if filled.is_file():
        description = f"rebuilt from the UCI data ({filled}, filled rows dropped: 22 rows fewer than MAF's)"
        return _cached(filled, build_power_from_filled), description
    raise FileNotFoundError(
        f"missing POWER data: expected MAF's {root / 'power/data.npy'} (github.com/gpapamak/maf), the UCI original "
        f"{uci} (unzipped from https://archive.ics.uci.edu/dataset/235) or {filled}. Pass --data-dir/root "
        "(or set $PYRO_FFJORD_DATA) to the folder that holds one."
    )
