"""Smoke-runs every example with tiny settings; a new example without an entry here fails."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY = {
    "tabular.py": [
        "--num-train",
        "2000",
        "--num-val",
        "500",
        "--num-test",
        "1000",
        "-n",
        "2",
        "--batch-size",
        "64",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--num-hidden",
        "1",
        "--hidden-mult",
        "1",
        "--num-blocks",
        "1",
        "--train-steps",
        "2",
        "--bn-rows",
        "200",
        "--eval-rtol",
        "1e-3",
        "--eval-atol",
        "1e-3",
        "--eval-batch-size",
        "1000",
        "--no-progress",
        "--threads",
        "1",
    ],
    "vae.py": [
        "--num-train",
        "20",
        "--num-val",
        "10",
        "--num-test",
        "4",
        "-n",
        "1",
        "--batch-size",
        "10",
        "--is-samples",
        "2",
        "--hidden-dims",
        "8",
        "--max-rank",
        "2",
        "--no-progress",
        "--threads",
        "1",
    ],
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


def run(name: str, args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    """Runs ``examples/<name>`` with ``args``; unless ``ok`` is False it must succeed."""
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path):
    run(name, [*TINY[name], "--out", str(tmp_path)])
    assert list(tmp_path.glob("*.png")), "the example must end with a plot"
    assert (tmp_path / "checkpoint.pt").is_file()


def test_toy_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL mid-training, then --resume: same numbers as an uninterrupted run with the same seed."""
    args = [*TINY["toy_2d.py"], "-n", "60", "--checkpoint-every", "1", "--data", "checkerboard"]
    run("toy_2d.py", [*args, "--out", str(tmp_path / "straight")])
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())

    out = tmp_path / "killed"
    cmd = [sys.executable, str(EXAMPLES / "toy_2d.py"), *args, "--out", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.csv"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > 10) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "metrics.json").exists(), "the run must have been killed before finishing"
    run("toy_2d.py", [*args, "--out", str(out), "--resume"])
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["test_nll"] == expected["test_nll"]
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps == list(range(60))


def test_toy_rnode_penalty_trains_under_svi(tmp_path):
    """The RNODE factor must belong to the current step's solve (Pyro scores sample sites lazily)."""
    run("toy_2d.py", [*TINY["toy_2d.py"], "--kinetic", "0.1", "--jacobian", "0.1", "--out", str(tmp_path)])
    assert math.isfinite(json.loads((tmp_path / "metrics.json").read_text())["test_nll"])
