"""Quality per second: test NLL reached at equal wall-clock by flow matching, maximum likelihood and discrete flows.

Every contender sees the same data, the same data scaling (:func:`pyro_ffjord.standardization`, Cholesky
whitening fit on the training rows, its log-determinant inside every NLL) and the same test points; each trains
in its own process on one CPU thread, with Adam and a cosine learning-rate decay over its wall-clock budget
(so a 180 s run is not a 600 s run cut short), and is then evaluated:

* ``fm`` / ``fm-ot``: one pyro_ffjord CNF (``ODENet``: SiLU, ``--cnf-layer`` layers of ``--cnf-width`` units, 8
  sinusoidal time features; per-task default width: 768 on the patches, ``--width`` elsewhere) trained by
  :func:`pyro_ffjord.flow_matching_loss` with independent / minibatch-OT coupling, the times drawn from
  ``--fm-time`` (per-task default: logit-normal on the patches, uniform elsewhere);
* ``ml``: the same CNF trained by maximum likelihood through the solve (rk4 on a fixed grid, Hutchinson's
  trace above 2 dimensions, backpropagation through the steps);
* ``fm+ml``: ``fm`` for the first half of the budget, then ``ml``;
* ``maf`` / ``spline``: Pyro's MAF (``affine_autoregressive``, used in the scoring direction) and spline
  coupling, ``--layers`` layers with random permutations between them;
* ``nsf``: zuko's neural spline flow, if zuko is installed.

CNF test NLLs use dopri5 at rtol = atol = 1e-5 and the exact trace; ``sample_nfe`` is the number of
evaluations of a 1,000-sample draw at the same tolerance (straighter paths need fewer; None beyond 500 steps).

    python benchmarks/bench_flow_matching.py --task toy --budgets 30
    python benchmarks/bench_flow_matching.py --task bsds300 --budgets 180,600 --jobs 2 --out outputs/bench_fm.json
    python benchmarks/bench_flow_matching.py --task power --budgets 600 --jobs 2   # POWER rebuilt from the UCI data
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import Permute, affine_autoregressive, spline_coupling
from torch import Tensor

import pyro_ffjord as pf
from pyro_ffjord.datasets.tabular import load_tabular
from pyro_ffjord.datasets.toy import sample_toy, toy_log_density

CONTENDERS = ("fm", "fm-ot", "ml", "fm+ml", "maf", "spline", "nsf")
EVAL_SOLVER = {
    "divergence": "exact",
    "method": "dopri5",
    "rtol": 1e-5,
    "atol": 1e-5,
    "options": None,
    "max_num_steps": 10000,
}


def load_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Train and test rows of the task (float32)."""
    if args.task == "toy":
        train = sample_toy("8gaussians", args.num_train, seed=args.seed).numpy()
        test = sample_toy("8gaussians", args.num_test, seed=args.seed + 10_000).numpy()
        return {"train": train.astype(np.float32), "test": test.astype(np.float32)}
    if args.task == "power":  # all training rows, a fixed random subset of the test split
        data = load_tabular("power", args.data_dir)
        print(f"power: {data.source}")
        test = data.test[np.random.default_rng(args.seed).permutation(len(data.test))[: args.num_test]]
        return {"train": data.train, "test": test}
    data = load_tabular("bsds300-images", args.data_dir, n_train=args.num_train, n_val=1, n_test=args.num_test)
    return {"train": data.train.astype(np.float32), "test": data.test.astype(np.float32)}


class Contender:
    """A density on the scaled data: its trainable modules, a training loss and a test log-density."""

    def __init__(self, name: str, dim: int, args: argparse.Namespace) -> None:
        self.name, self.fm_time = name, args.fm_time
        hidden = (args.width,) * args.depth
        self.cnf = None
        if name in ("fm", "fm-ot", "ml", "fm+ml"):
            self.cnf = pf.ffjord(
                dim,
                hidden_dims=(args.cnf_width,) * args.depth,
                layer=args.cnf_layer,
                activation="silu",
                time_frequencies=8,
                divergence="exact" if dim <= 2 else "hutchinson",
                method="rk4",
                options={"step_size": 1.0 / args.train_steps},
                adjoint=False,
            )
            self.transforms = [self.cnf]
            self.modules = torch.nn.ModuleList([self.cnf])
        elif name == "nsf":
            import zuko

            self.zuko = zuko.flows.NSF(dim, transforms=args.layers, hidden_features=hidden[:2])
            self.modules = torch.nn.ModuleList([self.zuko])
        else:
            layers, self.transforms = [], []
            for _ in range(args.layers):
                if name == "maf":
                    layer = affine_autoregressive(dim, hidden_dims=[max(args.width, dim)] * 2)
                    self.transforms.append(layer.inv)  # one pass to score data
                else:
                    layer = spline_coupling(dim, hidden_dims=[args.width] * 2, count_bins=8, bound=4.0)
                    self.transforms.append(layer)
                layers.append(layer)
                self.transforms.append(Permute(torch.randperm(dim)))
            self.modules = torch.nn.ModuleList(layers)

    def log_prob(self, y: Tensor) -> Tensor:
        """Log-density of scaled rows ``y``."""
        if self.name == "nsf":
            return self.zuko().log_prob(y)
        base = dist.Normal(y.new_zeros(y.shape[-1]), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms).log_prob(y)

    def loss(self, y: Tensor, progress: float) -> Tensor:
        """The training loss at ``progress`` (elapsed share of the budget)."""
        if self.name in ("fm", "fm-ot") or (self.name == "fm+ml" and progress < 0.5):
            coupling = "ot" if self.name == "fm-ot" else "independent"
            return pf.flow_matching_loss(self.cnf, y, coupling=coupling, time=self.fm_time)
        return -self.log_prob(y).mean()


def run_contender(name: str, budget: float, data: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Trains one contender for ``budget`` seconds on one thread and evaluates it."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train, test = torch.from_numpy(data["train"]), torch.from_numpy(data["test"])
    scaling = pf.standardization(train)
    y_train, y_test = scaling.inv(train), scaling.inv(test)
    contender = Contender(name, train.shape[1], args)
    lr = args.fm_lr if name in ("fm", "fm-ot", "fm+ml") else args.lr
    optimizer = torch.optim.Adam(contender.modules.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(args.seed)
    steps, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        rows = torch.randint(len(y_train), (args.batch_size,), generator=generator)
        optimizer.zero_grad()
        contender.loss(y_train[rows], elapsed / budget).backward()
        optimizer.step()
        steps += 1
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scaled_log_det = scaling.log_abs_det_jacobian(y_test[:1], test[:1]).item()  # log|det L|, the same for all rows
    result: dict[str, Any] = {"contender": name, "budget_s": budget, "steps": steps, "train_s": round(train_seconds, 1)}
    with torch.no_grad():
        scoring = nullcontext() if contender.cnf is None else pf.solver_settings(contender.cnf, **EVAL_SOLVER)
        with scoring:
            nll = torch.cat([-contender.log_prob(chunk) for chunk in y_test.split(args.eval_batch_size)])
        if contender.cnf is not None:
            result["eval_nfe"] = contender.cnf.nfe.forward
            # sampling runs the field backward from the base, where a field fit on a coarse grid can be stiff:
            # capped, and reported as None beyond the cap
            sampling = {**EVAL_SOLVER, "divergence": "hutchinson", "max_num_steps": 500}
            with pf.solver_settings(contender.cnf, **sampling):
                base = dist.Normal(torch.zeros(train.shape[1]), 1.0).to_event(1)
                try:
                    dist.TransformedDistribution(base, [contender.cnf]).sample((1000,))
                    result["sample_nfe"] = contender.cnf.nfe.forward
                except pf.ODESolveError:
                    result["sample_nfe"] = None
    nll = nll.double() + scaled_log_det
    result.update(
        nll=nll.tolist(),
        test_nll=nll.mean().item(),
        test_nll_se=(nll.std() / math.sqrt(len(nll))).item(),
        eval_s=round(time.perf_counter() - started, 1),
    )
    return result


def _run(job: tuple) -> dict[str, Any]:
    try:
        return run_contender(*job)
    except Exception as e:  # a failed contender is reported, the others go on
        return {"contender": job[0], "budget_s": job[1], "error": f"{type(e).__name__}: {e}"}


def reference_nll(args: argparse.Namespace, data: dict[str, np.ndarray]) -> dict[str, float]:
    """The true test NLL (toy) or that of the full-covariance Gaussian fit on the train rows."""
    test = torch.from_numpy(data["test"]).double()
    if args.task == "toy":
        values = -toy_log_density("8gaussians", test)
        name = "true density"
    else:
        train = torch.from_numpy(data["train"]).double()
        values = -dist.MultivariateNormal(train.mean(0), torch.cov(train.T, correction=0)).log_prob(test)
        name = "full-covariance Gaussian"
    return {"name": name, "test_nll": values.mean().item(), "test_nll_se": (values.std() / len(values) ** 0.5).item()}


def main(args: argparse.Namespace) -> dict[str, Any]:
    contenders = [c for c in args.contenders.split(",") if c != "nsf" or importlib.util.find_spec("zuko")]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {list(CONTENDERS)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    data = load_data(args)
    reference = reference_nll(args, data)
    jobs = [(name, budget, data, args) for budget in budgets for name in contenders]
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = []
        for r in pool.imap(_run, jobs, chunksize=1):  # in order, each reported as soon as it and those before are done
            results.append(r)
            outcome = r.get("error") or f"test NLL {r['test_nll']:.3f} after {r['steps']} steps"
            print(f"{r['contender']} ({r['budget_s']:.0f} s): {outcome}", flush=True)
            if args.out:  # every finished contender is kept, whatever happens to the others
                with open(Path(args.out).with_suffix(".jsonl"), "a") as f:
                    f.write(json.dumps({key: value for key, value in r.items() if key != "nll"}) + "\n")
    report = {
        "task": args.task,
        "dim": data["train"].shape[1],
        "num_train": len(data["train"]),
        "num_test": len(data["test"]),
        "reference": reference,
        "settings": vars(args),
        "results": results,
    }
    print(
        f"\n{args.task}: D = {report['dim']}, {report['num_train']} train / {report['num_test']} test rows; "
        f"{reference['name']}: {reference['test_nll']:.3f} ± {reference['test_nll_se']:.3f} nats"
    )
    header = f"{'budget':>7} {'contender':<9}{'test NLL':>10}{'± SE':>7}{'- maf':>8}{'± SE':>6}{'steps':>8}"
    print(f"{header}{'eval NFE':>9}{'sample NFE':>11}")
    for budget in budgets:
        rows = {r["contender"]: r for r in results if r["budget_s"] == budget}
        maf = torch.tensor(rows["maf"]["nll"]) if "nll" in rows.get("maf", {}) else None
        for name, r in rows.items():
            if "error" in r:
                print(f"{budget:>7.0f} {name:<9} failed: {r['error']}")
                continue
            delta = f"{'':>14}"
            if maf is not None:  # paired over the same test points
                difference = torch.tensor(r["nll"]) - maf
                r["minus_maf"] = difference.mean().item()
                r["minus_maf_se"] = (difference.std() / len(difference) ** 0.5).item()
                delta = f"{r['minus_maf']:+8.2f}{r['minus_maf_se']:>6.2f}"
            print(
                f"{budget:>7.0f} {name:<9}{r['test_nll']:>10.3f}{r['test_nll_se']:>7.3f}{delta}{r['steps']:>8}"
                f"{r.get('eval_nfe', ''):>9}{str(r.get('sample_nfe', '')):>11}"
            )
    for r in results:
        r.pop("nll", None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


_DEFAULT_NAMES = (
    "width",
    "cnf_width",
    "depth",
    "lr",
    "fm_lr",
    "fm_time",
    "batch_size",
    "train_steps",
    "num_train",
    "num_test",
)
TASK_DEFAULTS = {  # the rk4 steps of likelihood training (train_steps) cover t in [0, 1]; num_train 0: all rows
    task: dict(zip(_DEFAULT_NAMES, values))
    for task, values in {
        "toy": (64, 64, 3, 5e-3, 5e-3, "uniform", 512, 8, 200_000, 20_000),
        "power": (256, 256, 3, 1e-3, 3e-3, "uniform", 1024, 4, 0, 20_000),
        "bsds300": (512, 768, 3, 1e-3, 3e-3, "logit-normal", 256, 4, 200_000, 1_000),
    }.items()
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="bsds300")
    parser.add_argument("--budgets", default="180,600", help="training seconds per contender, comma-separated")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--jobs", type=int, default=1, help="contenders trained at once (one thread each)")
    parser.add_argument("--width", type=int, default=None, help="hidden width of the discrete flows' networks")
    parser.add_argument("--cnf-width", type=int, default=None, help="hidden width of the CNF's network")
    parser.add_argument("--cnf-layer", choices=list(pf.nets.LAYERS), default="concat", help="the CNF's layers")
    parser.add_argument("--depth", type=int, default=None, help="hidden layers of the CNF's network")
    parser.add_argument("--layers", type=int, default=5, help="layers of the discrete flows")
    parser.add_argument("--lr", type=float, default=None, help="Adam step size of maximum-likelihood training")
    parser.add_argument("--fm-lr", type=float, default=None, help="Adam step size of flow matching")
    parser.add_argument("--fm-time", choices=pf.flow_matching.TIMES, default=None, help="time law of flow matching")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None, help="rk4 steps over t in [0, 1] for ml training")
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON report path")
    args = parser.parse_args(argv)
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    main(parse_args())
