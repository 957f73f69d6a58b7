"""Smoke-runs every example with tiny settings; a new example without an entry here fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY = {
    "toy_2d.py": [
        "-n",
        "3",
        "--batch-size",
        "64",
        "--hidden-dims",
        "8,8",
        "--num-test",
        "200",
        "--eval-batch-size",
        "200",
        "--train-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--no-progress",
    ],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY)


def run(name: str, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path):
    run(name, [*TINY[name], "--out", str(tmp_path)])
    assert list(tmp_path.glob("*.png")), "the example must end with a plot"
    assert (tmp_path / "checkpoint.pt").is_file()


def test_toy_resume_continues(tmp_path):
    args = [*TINY["toy_2d.py"], "--out", str(tmp_path), "--objective", "ml", "--data", "checkerboard"]
    run("toy_2d.py", args)
    first = json.loads((tmp_path / "metrics.json").read_text())
    run("toy_2d.py", [*args, "-n", "5", "--resume"])
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 1, 2, 3, 4]
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["num_steps"] == 5 and first["true_nll"] == pytest.approx(resumed["true_nll"])
