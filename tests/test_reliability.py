"""Reliability of the examples: solver faults and NaNs caught with a good checkpoint, --on-nan recoveries,
SIGTERM with an atomic checkpoint and an exact resume, and bit-identical numbers for the same seed.

The faults are real: an adaptive training solver with a step budget of one step (``--max-num-steps 1``)
exceeds it at once, and a learning rate of 20 sends log T to ~20 after one Adam step, which the next
solve cannot integrate within its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_examples import EXAMPLES, TINY, run
from test_tabular_example import TINY as TABULAR_TINY
from test_tabular_example import write_table

import pyro_ffjord as pf

sys.path.insert(0, str(EXAMPLES))
from common.training import Rollback, TrainingGuard, scale_learning_rate, solver_fault  # noqa: E402

TOY = [*TINY["toy_2d.py"], "--threads", "1"]
BUDGET_FAULT = ["--train-steps", "0", "--max-num-steps", "1"]  # adaptive dopri5 with a one-step budget
LR_FAULT = ["--train-steps", "0", "--max-num-steps", "20", "--lr", "20", "--checkpoint-every", "1"]


def run_example(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs an example that may fail (the tests below check how)."""
    return run(name, args, ok=False)


def error_paragraph(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def load_finite_checkpoint(path: Path) -> dict:
    state = torch.load(path, weights_only=False)
    tensors = [*state["param_store"]["params"].values(), *state["module"].values()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return state


def test_toy_budget_fault_stops_with_a_clear_message_and_a_good_checkpoint(tmp_path):
    result = run_example("toy_2d.py", [*TOY, *BUDGET_FAULT, "--out", str(tmp_path)])
    assert result.returncode == 1
    message = error_paragraph(result.stderr)
    for part in ("step 0 failed", "ODESolveError", "step budget", "method='dopri5'", "rtol=", "T=0.5", "nfe="):
        assert part in message
    assert "--on-nan reduce-lr" in message and "--resume" in message and str(tmp_path) in message
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 0 and state["state"]["losses"] == []
    assert not (tmp_path / "metrics.json").exists()


def test_toy_diverging_lr_keeps_the_state_before_the_failing_step(tmp_path):
    result = run_example("toy_2d.py", [*TOY, *LR_FAULT, "--out", str(tmp_path)])
    assert result.returncode == 1
    assert "step 1 failed" in error_paragraph(result.stderr)
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 1 and len(state["state"]["losses"]) == 1 and math.isfinite(state["state"]["losses"][0])


def test_toy_reduce_lr_recovers_and_completes(tmp_path):
    args = [*TOY, *LR_FAULT, "-n", "5", "--on-nan", "reduce-lr", "--max-retries", "8", "--out", str(tmp_path)]
    result = run_example("toy_2d.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    recoveries = [line for line in result.stderr.splitlines() if "halved the learning rate" in line]
    assert 1 <= len(recoveries) <= 8
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nll"])
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["fault"]["lr_scale"] == 0.5 ** len(recoveries)
    assert state["step"] == 5 and all(math.isfinite(v) for v in state["state"]["losses"])
    steps = [int(line.split(",")[0]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(5)), "rows of rolled-back steps must be dropped from the log"


def test_toy_restart_from_checkpoint_is_bounded(tmp_path):
    args = [*TOY, *LR_FAULT, "--on-nan", "restart-from-checkpoint", "--max-retries", "2", "--out", str(tmp_path)]
    result = run_example("toy_2d.py", args)
    assert result.returncode == 1
    restarts = [line for line in result.stderr.splitlines() if "reloaded the checkpoint of step" in line]
    assert len(restarts) == 2
    assert "after 2 recoveries" in error_paragraph(result.stderr)
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["fault"]["seed_offset"] == 2


def test_tabular_budget_fault_stops_then_reduce_lr_is_bounded(tmp_path):
    table = write_table(tmp_path / "table.csv")
    args = ["--csv", str(table), *TABULAR_TINY, "--train-method", "dopri5", *BUDGET_FAULT]
    result = run_example("tabular.py", [*args, "--out", str(tmp_path / "stop")])
    assert result.returncode == 1
    message = error_paragraph(result.stderr)
    assert "ODESolveError" in message and "max_num_steps=1" in message
    state = load_finite_checkpoint(tmp_path / "stop" / "checkpoint.pt")
    assert state["step"] == 0 and state["state"]["losses"] == []

    result = run_example(
        "tabular.py", [*args, "--on-nan", "reduce-lr", "--max-retries", "1", "--out", str(tmp_path / "r")]
    )
    assert result.returncode == 1
    assert "halved the learning rate (retry 1/1" in result.stderr
    assert "after 1 recoveries" in error_paragraph(result.stderr)
    load_finite_checkpoint(tmp_path / "r" / "checkpoint.pt")


def test_toy_sigterm_checkpoints_and_resumes_to_the_same_result(tmp_path):
    """SIGTERM mid-training: the step finishes, a checkpoint is written (none was due), --resume matches."""
    args = [*TOY, "-n", "40", "--checkpoint-every", "1000", "--data", "checkerboard"]
    run("toy_2d.py", [*args, "--out", str(tmp_path / "straight")])
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())

    out = tmp_path / "stopped"
    cmd = [sys.executable, str(EXAMPLES / "toy_2d.py"), *args, "--out", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "log.csv"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > 5) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stderr and "--resume" in stderr
    assert not (out / "metrics.json").exists()
    state = load_finite_checkpoint(out / "checkpoint.pt")
    assert 5 <= state["step"] < 40 and len(state["state"]["losses"]) == state["step"]

    run("toy_2d.py", [*args, "--out", str(out), "--resume"])
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["test_nll"] == expected["test_nll"]
    losses = [
        [line.split(",")[1] for line in (d / "log.csv").read_text().splitlines()[1:]]
        for d in (tmp_path / "straight", out)
    ]
    assert losses[1] == losses[0]


def test_toy_same_seed_gives_bit_identical_metrics(tmp_path):
    for name in ("a", "b"):
        run("toy_2d.py", [*TOY, "-n", "4", "--out", str(tmp_path / name)])
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b
    losses = [[line.split(",")[:4] for line in (tmp_path / n / "log.csv").read_text().splitlines()] for n in "ab"]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_prob_is_bit_identical_under_the_same_seed(noise):
    def log_prob(seed: int) -> torch.Tensor:
        pyro.set_rng_seed(seed)
        t = pf.ffjord(2, hidden_dims=(8,), noise=noise, method="euler", options={"step_size": 0.25})
        x = torch.randn(16, 2)
        return dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t]).log_prob(x)

    first, second, other = log_prob(3), log_prob(3), log_prob(4)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_solver_fault_is_found_behind_pyros_value_error():
    """Pyro re-raises errors in log_prob as a plain ValueError chained to ours."""
    cause = pf.ODESolveError("CNF forward solve exceeded its step budget")
    try:
        try:
            raise cause
        except ValueError as e:
            raise ValueError("Error while computing log_prob at site 'x'") from e
    except ValueError as wrapped:
        assert solver_fault(wrapped) is cause
    assert solver_fault(ValueError("unrelated")) is None


def test_guard_restores_the_last_good_state_in_process(tmp_path):
    """A NaN update is rolled back exactly (parameters, Adam moments) and the learning rate is halved."""
    module = torch.nn.Linear(2, 1)
    pyro.module("m", module)
    optimizer = pyro.optim.Adam({"lr": 0.1})
    args = argparse.Namespace(on_nan="reduce-lr", max_retries=1, seed=0)

    def good_step() -> float:
        loss = module(torch.ones(1, 2)).pow(2).sum()
        loss.backward()
        optimizer(list(module.parameters()))
        for p in module.parameters():
            p.grad = None
        return loss.item()

    def nan_step() -> float:
        good_step()
        with torch.no_grad():
            module.weight[0, 0] = float("nan")
        return 1.0

    with TrainingGuard(args, tmp_path / "checkpoint.pt", optimizer, module) as guard:
        assert math.isfinite(guard.run(0, good_step)) and math.isfinite(guard.run(1, good_step))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        moments = {k: v["state"][0]["exp_avg"].clone() for k, v in optimizer.get_state().items()}
        outcome = guard.run(2, nan_step)
        assert outcome == Rollback(2, {})
        assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
        assert all(torch.equal(optimizer.get_state()[k]["state"][0]["exp_avg"], v) for k, v in moments.items())
        assert all(g["lr"] == 0.05 for obj in optimizer.optim_objs.values() for g in obj.param_groups)
        with pytest.raises(SystemExit, match="after 1 recoveries: step 2 failed: NonFiniteError"):
            guard.run(2, nan_step)
    assert torch.isfinite(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["module"]["weight"]).all()


def test_scale_learning_rate_reaches_schedulers_and_pending_states():
    module = torch.nn.Linear(2, 1)
    pyro.module("m", module)
    scheduler = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1.0}, "lr_lambda": lambda s: 1}
    )
    scheduler(list(module.parameters()))
    scale_learning_rate(scheduler, 0.5)
    for obj in scheduler.optim_objs.values():
        obj.step()  # a LambdaLR recomputes the rate from its base rates
        assert obj.base_lrs == [0.5] and obj.optimizer.param_groups[0]["lr"] == 0.5
    assert scheduler.pt_optim_args["lr"] == 0.5


def test_toy_resumes_a_checkpoint_of_the_earlier_layout(tmp_path):
    """Checkpoints written before the loop state moved under "state" (losses at the top level) still load."""
    args = [*TOY, "-n", "4", "--out", str(tmp_path)]
    run("toy_2d.py", args)
    expected = json.loads((tmp_path / "metrics.json").read_text())
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["losses"] = checkpoint.pop("state")["losses"]
    torch.save(checkpoint, path)
    run("toy_2d.py", [*args, "--resume"])  # nothing left to train: restore, evaluate, plot the losses
    assert json.loads((tmp_path / "metrics.json").read_text())["test_nll"] == expected["test_nll"]


def test_toy_resume_rejects_foreign_and_damaged_checkpoints(tmp_path):
    run("toy_2d.py", [*TOY, "--out", str(tmp_path)])
    other = run_example("toy_2d.py", [*TOY, "--hidden-dims", "16", "--resume", "--out", str(tmp_path)])
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "holds another model" in other.stderr and "shape" in other.stderr
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    damaged = run_example("toy_2d.py", [*TOY, "--resume", "--out", str(tmp_path)])
    assert damaged.returncode != 0 and "Traceback" not in damaged.stderr
    assert "is not a readable checkpoint" in damaged.stderr


@pytest.mark.parametrize("flag, value", [("--eval-batch-size", "0"), ("-n", "-5"), ("--lr", "nan"), ("--threads", "0")])
def test_bad_flag_values_fail_at_parse_time(flag, value, tmp_path):
    result = run_example("toy_2d.py", [*TOY, flag, value, "--out", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {flag}" in result.stderr and "must be a positive" in result.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_unknown_device_is_a_clear_error(tmp_path):
    result = run_example("toy_2d.py", [*TOY, "--device", "gpu", "--out", str(tmp_path)])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--device gpu: expected cpu, cuda or cuda:N" in result.stderr
