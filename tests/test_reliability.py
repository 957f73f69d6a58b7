"""Reliability of the examples: solver faults and NaNs stop the run with a good checkpoint, SIGTERM writes an
atomic checkpoint and --resume continues exactly, checkpoints are loaded without running code, the same
seed gives bit-identical numbers, and data-parallel updates equal one update on the union of the batches.

The faults are real: an adaptive training solver with a step budget of one step (``--max-num-steps 1``)
exceeds it at once, and a learning rate of 20 sends log T to ~20 after one Adam step, which the next
solve cannot integrate within its budget.
"""

from __future__ import annotations

import json
import math
import os
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
from common.training import _fault, update  # noqa: E402

TOY = [*TINY["toy_2d.py"], "--threads", "1"]
BUDGET_FAULT = ["--method", "dopri5", "--max-num-steps", "1"]  # adaptive dopri5 with a one-step budget
LR_FAULT = ["--method", "dopri5", "--max-num-steps", "20", "--lr", "20", "--checkpoint-every", "1"]


def run_example(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs an example that may fail (the tests below check how)."""
    return run(name, args, ok=False)


def error_paragraph(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def load_finite_checkpoint(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    tensors = list(state["module"].values())
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return state


def test_toy_budget_fault_stops_with_a_clear_message_and_a_good_checkpoint(tmp_path):
    result = run_example("toy_2d.py", [*TOY, *BUDGET_FAULT, "--out", str(tmp_path)])
    assert result.returncode == 1
    message = error_paragraph(result.stderr)
    for part in ("at step 0", "ODESolveError", "max_num_steps exceeded", "method='dopri5'", "rtol=", "T=0.5", "nfe="):
        assert part in message
    assert "--max-num-steps" in message and "--resume" in message and str(tmp_path) in message
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 0 and state["state"]["log"] == []
    assert not (tmp_path / "metrics.json").exists()


def test_toy_diverging_lr_keeps_the_state_before_the_failing_step(tmp_path):
    result = run_example("toy_2d.py", [*TOY, *LR_FAULT, "--out", str(tmp_path)])
    assert result.returncode == 1
    assert "at step 1" in error_paragraph(result.stderr)
    state = load_finite_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 1 and len(state["state"]["log"]) == 1 and math.isfinite(state["state"]["log"][0]["loss"])


def test_tabular_budget_fault_stops_with_a_good_checkpoint(tmp_path):
    table = write_table(tmp_path / "table.csv")
    args = ["--csv", str(table), *TABULAR_TINY, *BUDGET_FAULT]
    result = run_example("tabular.py", [*args, "--out", str(tmp_path / "stop")])
    assert result.returncode == 1
    message = error_paragraph(result.stderr)
    assert "ODESolveError" in message and "max_num_steps=1" in message
    state = load_finite_checkpoint(tmp_path / "stop" / "checkpoint.pt")
    assert state["step"] == 0 and state["state"]["log"] == []


def test_evaluation_budget_fault_is_one_clear_error_after_training_is_saved(tmp_path):
    result = run_example("toy_2d.py", [*TOY, "-n", "1", "--eval-max-num-steps", "1", "--out", str(tmp_path)])
    assert result.returncode == 1
    message = error_paragraph(result.stderr)
    assert "an evaluation solve failed" in message and "max_num_steps=1" in message and "--eval-rtol" in message
    assert load_finite_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_toy_sigterm_checkpoints_and_resumes_to_the_same_result(tmp_path):
    """SIGTERM mid-training: the step finishes, a checkpoint is written, --resume matches."""
    args = [*TOY, "-n", "40", "--checkpoint-every", "5", "--data", "checkerboard"]
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
    assert "Traceback" not in stderr and "SIGTERM" in stderr and "--resume" in stderr
    assert not (out / "metrics.json").exists()
    state = load_finite_checkpoint(out / "checkpoint.pt")
    assert 5 <= state["step"] < 40 and len(state["state"]["log"]) == state["step"]

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
        assert _fault(wrapped) is cause
    assert _fault(ValueError("unrelated")) is None


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_update_changes_nothing(bad):
    """No parameter or Adam moment moves when the loss or a gradient is NaN; the gradients are cleared."""
    pyro.clear_param_store()
    module = torch.nn.Linear(2, 1)
    pyro.module("m", module)
    optimizer = pyro.optim.Adam({"lr": 0.1})
    params = list(module.parameters())

    def step(nan: str | None) -> float:
        loss = module(torch.ones(1, 2)).pow(2).sum()
        loss.backward()
        if nan == "gradient":
            module.bias.grad[0] = math.nan
        return update(math.nan if nan == "loss" else loss.detach(), params, optimizer)

    step(None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    moments = {k: v["state"][0]["exp_avg"].clone() for k, v in optimizer.get_state().items()}
    with pytest.raises(FloatingPointError):
        step(bad)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(optimizer.get_state()[k]["state"][0]["exp_avg"], v) for k, v in moments.items())
    assert all(p.grad is None for p in params)


def _data_parallel_step(rank: int, world_size: int, init: str, out: str) -> None:
    """One :func:`update` of a 2-process Gloo group, each process on its half of the batch."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    torch.manual_seed(0)
    module, x = torch.nn.Linear(3, 1).double(), torch.randn(8, 3, dtype=torch.float64)
    pyro.module("m", module)
    loss = module(x.chunk(world_size)[rank]).pow(2).mean()
    loss.backward()
    value = update(loss.detach(), list(module.parameters()), pyro.optim.SGD({"lr": 0.1}))
    torch.save({"loss": value, "weight": module.weight.detach()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_data_parallel_update_equals_one_update_on_the_union_of_the_batches(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_data_parallel_step, args=(2, init, str(tmp_path / "r")), nprocs=2)
    ranks = [torch.load(tmp_path / f"r.{rank}", weights_only=True) for rank in range(2)]
    torch.manual_seed(0)
    module, x = torch.nn.Linear(3, 1).double(), torch.randn(8, 3, dtype=torch.float64)
    loss = module(x).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        expected = module.weight - 0.1 * module.weight.grad
    for r in ranks:
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(r["weight"], expected, rtol=1e-12, atol=1e-12)


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


def test_toy_resume_refuses_a_checkpoint_holding_python_objects(tmp_path):
    """Checkpoints are read with weights_only=True: a pickled object (which could run code) is refused."""
    run("toy_2d.py", [*TOY, "--out", str(tmp_path)])
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state"]["payload"] = Path("anything")
    torch.save(checkpoint, path)
    result = run_example("toy_2d.py", [*TOY, "--resume", "--out", str(tmp_path)])
    message = error_paragraph(result.stderr)
    assert result.returncode != 0 and "holds a pickled Python object" in message and "PosixPath" in message


def test_outputs_have_the_users_permissions(tmp_path):
    """The atomically written files get the mode of a normal file under the user's umask, like the plot."""
    run("toy_2d.py", [*TOY, "--out", str(tmp_path)])
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes) == {"checkpoint.pt", "metrics.json", "log.csv", "toy_8gaussians.png"}
    assert set(modes.values()) == {0o666 & ~umask}


@pytest.mark.parametrize(
    "flag, value", [("--eval-batch-size", "0"), ("-n", "-5"), ("--lr", "nan"), ("--threads", "0"), ("--lr", "x")]
)
def test_bad_flag_values_fail_at_parse_time(flag, value, tmp_path):
    result = run_example("toy_2d.py", [*TOY, flag, value, "--out", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {flag}" in result.stderr and "expected a positive" in result.stderr
    assert f"got {value!r}" in result.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_unknown_device_is_a_clear_error(tmp_path):
    result = run_example("toy_2d.py", [*TOY, "--device", "gpu", "--out", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --device: expected cpu, or cuda[:N] on a machine with CUDA, got 'gpu'" in result.stderr
