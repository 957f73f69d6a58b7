"""POWER rebuilt from the UCI data: both source formats against hand computations, MAF's pipeline, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pyro_ffjord.datasets import default_data_dir
from pyro_ffjord.datasets.power import MEASUREMENTS, build_power_from_filled, build_power_from_uci
from pyro_ffjord.datasets.tabular import load_power

UCI_ROWS = [  # Date;Time;7 measurements (the second and fourth rows are missing in the UCI file)
    "16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000",
    "16/12/2006;17:25:00;?;?;?;?;?;?;",
    "16/12/2006;23:59:00;5.360;0.436;233.630;23.000;0.000;1.000;16.000",
    "17/12/2006;00:00:00;?;?;?;?;?;?;",
    "17/12/2006;00:01:00;3.666;0.528;235.680;15.800;0.000;2.000;17.000",
]


def write_uci(path: Path, rows: list[str] = UCI_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(";".join(("Date", "Time", *MEASUREMENTS)) + "\n" + "\n".join(rows) + "\n")
    return path


def test_uci_original_drops_missing_rows_and_adds_minutes(tmp_path):
    x = build_power_from_uci(write_uci(tmp_path / "household_power_consumption.txt"))
    expected = np.array(
        [
            [4.216, 0.418, 234.840, 18.400, 0.0, 1.0, 17.0, 17 * 60 + 24],
            [5.360, 0.436, 233.630, 23.000, 0.0, 1.0, 16.0, 23 * 60 + 59],
            [3.666, 0.528, 235.680, 15.800, 0.0, 2.0, 17.0, 1],
        ]
    )
    np.testing.assert_array_equal(x, expected)


def filled_table(days: int = 6, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Hourly rows over ``days`` days with filled rows, a coincidental 24 h repeat and near-repeats.

    Returns the time stamps, the measurements and the mask of rows the rule must keep.
    """
    rng = np.random.default_rng(seed)
    n = 24 * days
    stamps = [f"2007-01-{1 + i // 24:02d} {i % 24:02d}:00:00" for i in range(n)]
    values = np.round(rng.uniform(0, 10, size=(n, 7)), 3)
    keep = np.ones(n, dtype=bool)
    for i in range(30, 34):  # a gap of 4 hours filled from the day before
        values[i] = values[i - 24]
        keep[i] = False
    for i in range(50, 50 + 30):  # a gap longer than a day: filled from rows that were filled themselves
        values[i] = values[i - 24]
        keep[i] = False
    values[100] = values[76]  # a genuine row equal to the day before's: indistinguishable, dropped too
    keep[100] = False
    values[110] = values[109]  # equal to the row an hour earlier: kept
    values[120] = values[96]
    values[120, 3] += 0.001  # equal to the day before's in 6 of 7 columns: kept
    return stamps, values, keep


def write_filled(path: Path, stamps: list[str], values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(("date_time", *MEASUREMENTS))]
    lines += [",".join([stamp, *(f"{v:.3f}" for v in row)]) for stamp, row in zip(stamps, values)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def test_filled_copy_drops_rows_equal_to_the_day_before(tmp_path):
    stamps, values, keep = filled_table()
    x = build_power_from_filled(write_filled(tmp_path / "householdpower.csv.gz", stamps, values))
    minutes = np.array([int(s[11:13]) * 60 for s in stamps])
    np.testing.assert_allclose(x, np.column_stack([values, minutes])[keep], rtol=0, atol=1e-12)


def test_load_power_runs_mafs_pipeline_on_the_rebuilt_array_and_caches_it(tmp_path):
    stamps, values, keep = filled_table()
    source = write_filled(tmp_path / "household_power" / "householdpower.csv.gz", stamps, values)
    data = load_power(tmp_path)
    assert "rebuilt from the UCI data" in data.source and "householdpower.csv.gz" in data.source
    assert (source.parent / "householdpower.csv.gz.power.npy").is_file()
    (tmp_path / "power").mkdir()  # MAF's file with the same rows gives the same splits
    np.save(tmp_path / "power" / "data.npy", build_power_from_filled(source))
    maf = load_power(tmp_path)
    assert maf.source.startswith("MAF's")
    for rebuilt, reference in zip(data.splits, maf.splits):
        np.testing.assert_array_equal(rebuilt, reference)
    assert data.dim == 6 and sum(len(a) for a in data.splits) == keep.sum()


def test_uci_original_is_preferred_to_the_filled_copy(tmp_path):
    stamps, values, _ = filled_table()
    write_filled(tmp_path / "household_power" / "householdpower.csv.gz", stamps, values)
    write_uci(tmp_path / "household_power" / "household_power_consumption.txt", UCI_ROWS * 8)
    assert "household_power_consumption.txt" in load_power(tmp_path).source


def test_missing_truncated_and_malformed_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"power/data.npy.*household_power_consumption.txt.*csv.gz"):
        load_power(tmp_path)
    stamps, values, _ = filled_table()
    source = write_filled(tmp_path / "a" / "householdpower.csv.gz", stamps, values)
    truncated = tmp_path / "b" / "householdpower.csv.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 2])
    with pytest.raises(ValueError, match="b/householdpower.csv.gz: not a readable household power file"):
        build_power_from_filled(truncated)
    wrong = tmp_path / "household_power_consumption.txt"
    wrong.write_text("Date;Time;Voltage\n16/12/2006;17:24:00;234.84\n")
    with pytest.raises(ValueError, match="household_power_consumption.txt: expected the columns"):
        build_power_from_uci(wrong)
    shuffled = write_filled(tmp_path / "c" / "householdpower.csv.gz", stamps[::-1], values)
    with pytest.raises(ValueError, match="date_time must be strictly increasing"):
        build_power_from_filled(shuffled)
    bad = write_uci(tmp_path / "d.txt", ["16/12/2006;17:24:00;4.216;x;234.840;18.400;0.000;1.000;17.000"])
    with pytest.raises(ValueError, match="d.txt: non-numeric measurements"):
        build_power_from_uci(bad)


REAL = default_data_dir() / "household_power" / "householdpower.csv.gz"


@pytest.mark.skipif(not REAL.is_file(), reason="the household power data is not in the data folder")
def test_real_filled_copy_gives_the_documented_row_count():
    x = build_power_from_filled(REAL)
    assert x.shape == (2_049_258, 8)
    np.testing.assert_array_equal(x[0], [4.216, 0.418, 234.84, 18.4, 0, 1, 17, 17 * 60 + 24])
