"""Tests of examples/tabular.py on a tiny synthetic CSV table: outputs, resume, the baselines, bad data."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_examples import run as run_example

TINY = [  # stacked CNFs by likelihood; the flow-matching runs add --objective fm
    "--objective",
    "ml",
    "-n",
    "4",
    "--batch-size",
    "64",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--num-hidden",
    "1",
    "--hidden-mult",
    "2",
    "--num-blocks",
    "1",
    "--step-size",
    "0.5",
    "--baseline-layers",
    "1",
    "--eval-rtol",
    "1e-3",
    "--eval-atol",
    "1e-3",
    "--no-progress",
    "--threads",
    "1",
]


def write_table(path: Path, constant_column: bool = False, nan: bool = False) -> Path:
    """300 rows of a curved, correlated 3-D density (plus a constant column if asked), with a header."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    x = np.stack([a, a**2 + 0.3 * rng.normal(size=300), rng.gamma(2.0, size=300)], axis=1)
    if constant_column:
        x = np.hstack([x, np.full((300, 1), 7.0)])
    if nan:
        x[5, 1] = np.nan
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"c{i}" for i in range(x.shape[1])])
        writer.writerows(x.tolist())
    return path


def run(args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    return run_example("tabular.py", args, ok)


def finite_metrics(metrics: dict) -> None:
    for key in ("test_nll", "test_nll_se", "gaussian_nll", "train_seconds"):
        assert math.isfinite(metrics[key]), (key, metrics)


def test_smoke_outputs_and_constant_column_warning(tmp_path: Path) -> None:
    table = write_table(tmp_path / "table.csv", constant_column=True)
    out = tmp_path / "out"
    result = run(["--csv", str(table), *TINY, "--out", str(out)])
    assert "warning:" in result.stderr and "constant column(s) [3]" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "tabular_table.png").is_file() and (out / "checkpoint.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "ffjord" and metrics["steps"] == 4
    finite_metrics(metrics)


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    table = write_table(tmp_path / "table.csv")
    args = ["--csv", str(table), *TINY]
    run([*args, "-n", "6", "--out", str(tmp_path / "straight")])
    run([*args, "--out", str(tmp_path / "resumed")])
    run([*args, "-n", "6", "--resume", "--out", str(tmp_path / "resumed")])
    logs = [(tmp_path / d / "log.csv").read_text().splitlines() for d in ("straight", "resumed")]
    assert [int(line.split(",")[0]) for line in logs[1][1:]] == [0, 1, 2, 3, 4, 5]
    losses = [[float(line.split(",")[1]) for line in log[1:]] for log in logs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    straight, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert resumed["steps"] == 6
    assert resumed["test_nll"] == pytest.approx(straight["test_nll"], rel=1e-4)


@pytest.mark.parametrize("name", ["maf", "spline"])
def test_baseline_flows_train(name: str, tmp_path: Path) -> None:
    table = write_table(tmp_path / "table.csv")
    result = run(["--csv", str(table), *TINY, "--model", name, "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == name and metrics["steps"] == 4 and name in result.stdout
    finite_metrics(metrics)
    assert (tmp_path / "tabular_table.png").is_file() and (tmp_path / "checkpoint.pt").is_file()


def test_nan_in_data_is_a_clear_error(tmp_path: Path) -> None:
    table = write_table(tmp_path / "table.csv", nan=True)
    result = run(["--csv", str(table), *TINY, "--out", str(tmp_path)], ok=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "NaN/inf" in result.stderr and "column(s) [1]" in result.stderr
