"""Smoke tests of the benchmarks: every contender runs and reports finite numbers.

No timing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from synthetic_data import example_data_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cnf.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cnf", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _numbers(value: object) -> list[float]:
    """Every int/float inside nested dicts and lists (bools and None excluded)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def test_reference_matches_pyro_ffjord_at_equal_weights():
    """The in-benchmark reference FFJORD computes the same exact log-density as pyro_ffjord."""
    bench = _load_bench()
    w = bench.WORKLOADS["toy2d"]
    x = bench.batch(w, 32, 0, torch.device("cpu"))
    ours = bench.build("pf_hutchinson", w, torch.device("cpu"), 0)
    reference = bench.build("reference", w, torch.device("cpu"), 0)
    with torch.no_grad(), ours.evaluation(), reference.evaluation():
        torch.testing.assert_close(ours.log_prob(x), reference.log_prob(x), rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # 77 s; the subset test below runs the benchmark end to end in the default suite
def test_bench_cnf_smoke(tmp_path):
    """Every contender on the 2-D workload with a 2-second budget and tiny batches, plus the D=16 extras
    (compiled contenders traced with ``aot_eager``: no C++ compilation in the smoke test)."""
    bench = _load_bench()
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--workloads", "toy2d", "--budget", "2", "--timing-iters", "1"]
    command += ["--batch-size", "64", "--num-test", "256", "--compile-backend", "aot_eager", "--out", str(out)]
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    results = json.loads(out.read_text())
    rows = results["workloads"]["toy2d"]["contenders"]
    assert set(rows) == set(bench.CONTENDERS)
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("traceback"))
        assert row["race_iters"] >= 1
        assert math.isfinite(row["test_nll"]) and math.isfinite(row["sec_per_iter_vs_ref"])
    assert set(results["exact_vs_hutchinson"]) == {"pf_hutchinson", "reference"}
    assert len(results["adjoint_memory"]) == 6
    assert all("error" not in row for row in results["adjoint_memory"])
    numbers = _numbers(results["workloads"]) + _numbers(results["exact_vs_hutchinson"])
    numbers += _numbers(results["adjoint_memory"])
    assert numbers and all(math.isfinite(n) for n in numbers)


def test_bench_cnf_subset_of_contenders_without_extras(tmp_path):
    """``--contenders`` without the reference: those rows only, no ratios, no extra measurements."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--workloads", "toy2d", "--budget", "1", "--timing-iters", "1"]
    command += ["--batch-size", "32", "--num-test", "64", "--contenders", "pf_fast", "spline_coupling"]
    command += ["--no-extras", "--seed", "3", "--out", str(out)]
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    results = json.loads(out.read_text())
    rows = results["workloads"]["toy2d"]["contenders"]
    assert set(rows) == {"pf_fast", "spline_coupling"} and results["config"]["seed"] == 3
    assert all(math.isfinite(row["test_nll"]) and "sec_per_iter_vs_ref" not in row for row in rows.values())
    assert "exact_vs_hutchinson" not in results and "adjoint_memory" not in results


def test_fixed_T_solve_takes_the_reference_number_of_steps():
    """With a fixed T the adaptive solver sees the same ODE as the reference, hence the same NFE."""
    bench = _load_bench()
    w = bench.WORKLOADS["toy2d"]
    x = bench.batch(w, 64, 0, torch.device("cpu"))
    ours = bench.build("pf_hutchinson", w, torch.device("cpu"), 0)
    reference = bench.build("reference", w, torch.device("cpu"), 0)
    ours.log_prob(x).sum().backward()
    reference.log_prob(x).sum().backward()
    assert ours.nfe()[0] == reference.nfe()[0]


def test_rnode_flag_sets_the_penalty_weights():
    """``--rnode w`` reaches pf_rnode's kinetic and Jacobian weights, and its penalty enters the loss."""
    bench = _load_bench()
    args = bench.parse_args(["--rnode", "0.1"])
    w = bench.WORKLOADS["toy2d"]
    model = bench.build("pf_rnode", w, torch.device("cpu"), 0, args.rnode)
    assert model.module.flow.regularization == {"kinetic": 0.1, "jacobian": 0.1}
    model.log_prob(bench.batch(w, 16, 0, torch.device("cpu")))
    assert model.penalty() > 0


BENCH_FM = BENCH.parent / "bench_flow_matching.py"


def test_bench_flow_matching_smoke(tmp_path):
    """Every contender of the flow-matching race trains, is scored on the same points and is compared with MAF."""
    out = tmp_path / "bench_fm.json"
    command = [sys.executable, str(BENCH_FM), "--task", "toy", "--budgets", "0.5", "--num-train", "2000"]
    command += ["--num-test", "100", "--width", "8", "--depth", "2", "--layers", "2", "--jobs", "2", "--out", str(out)]
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    report = json.loads(out.read_text())
    rows = {r["contender"]: r for r in report["results"]}
    assert set(rows) == {"fm", "fm-ot", "ml", "fm+ml", "maf", "spline", "nsf"}
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["steps"] >= 1 and math.isfinite(row["test_nll"]) and math.isfinite(row["minus_maf"])
    assert rows["maf"]["minus_maf"] == 0
    assert all(rows[name]["sample_nfe"] > 0 for name in ("fm", "fm-ot", "ml", "fm+ml"))
    assert report["reference"]["name"] == "true density" and math.isfinite(report["reference"]["test_nll"])


def test_bench_svi_smoke(tmp_path):
    """AutoFFJORD's defaults against AutoIAFNormal on the banana, one second each: every figure finite, the
    guide's log-determinant that of its map, and ratios to AutoIAFNormal."""
    out = tmp_path / "svi.json"
    command = [sys.executable, str(BENCH.parent / "bench_svi.py"), "--models", "banana", "--contenders", "ffjord,iaf"]
    command += ["--budget", "1", "--steps", "2", "--predictive", "20", "--out", str(out)]
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    rows = {row["contender"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"ffjord", "iaf"} and all("error" not in row for row in rows.values()), rows
    assert rows["ffjord"]["logdet_error"] < 1e-3
    assert rows["iaf"]["ratio_to_iaf_1"] == 1.0 and rows["ffjord"]["ratio_to_iaf_8"] > 0
    assert all(math.isfinite(n) for n in _numbers(list(rows.values())))


def test_bench_images_smoke(tmp_path):
    """The images example's two models race on MNIST's format: each trains, and is scored in finite bits/dim on
    the same test images."""
    out = tmp_path / "bench_images.json"
    command = [sys.executable, str(BENCH.parent / "bench_images.py"), "--budget", "1", "--num-train", "64"]
    command += ["--num-test", "4", "--jobs", "2", "--data-dir", str(example_data_dir()), "--out", str(out)]
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    rows = {r["contender"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"fm", "ml"}
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["steps"] >= 1 and row["num_test"] == 4 and row["eval_nfe"] > 0
        assert math.isfinite(row["bits_per_dim"]) and row["bits_per_dim_se"] > 0
