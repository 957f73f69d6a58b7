"""Tabular density estimation, the FFJORD paper's UCI/BSDS300 experiments, the Pyro way.

The model is ``pyro.sample("x", TransformedDistribution(Normal(0, I), transforms), obs=x)`` under a
``pyro.plate``. With ``--objective ml``, ``transforms`` are stacked CNF blocks (``pf.ffjord``) with batch
normalization (Pyro's ``BatchNorm``) before, between and after them, as in the paper's code, fit with SVI
and an empty guide (maximum likelihood) through a cheap fixed-grid solve with Hutchinson's trace. With
``--objective fm`` they are one CNF (SiLU, 8 sinusoidal time features) followed by the Cholesky whitening
fit on the train rows (``pf.standardization``, its log-determinant in every NLL), trained by flow
matching (``pf.flow_matching_loss``: no solve in training); ``fm+ml`` fine-tunes that by maximum
likelihood. Adam with early stopping on the validation loss (the best parameters are kept). The test
NLL is computed with an adaptive solver and the exact trace, in nats, with its standard error, next to a
full-covariance Gaussian fit on the train set.
``--model maf``, ``spline`` or ``all`` trains Pyro's MAF and spline-coupling flows on the same data with
the same step budget.

The default is CPU-sized: 8x8 patches of the real BSDS300 images (63 dimensions, 20,000/2,000/5,000
patches) and hidden layers capped at 64 units, a few minutes on 2 CPU cores. The paper's setting
(its per-dataset architecture, full data, dopri5 with atol 1e-8 and rtol 1e-6 in training and test) is

    python examples/tabular.py --data power --num-train 0 --num-val 0 --num-test 0 --max-width 0 \\
        --lr 1e-3 --batch-size 10000 -n 100000 --patience 30 --eval-every 200 --method dopri5 \\
        --atol 1e-8 --rtol 1e-6 --adjoint --eval-atol 1e-8 --eval-rtol 1e-6 --device cuda

    python examples/tabular.py                                  # BSDS300 patches, a few minutes on 2 cores
    python examples/tabular.py --model all                      # FFJORD, MAF and spline flows, one table
    python examples/tabular.py --csv my_table.csv --model maf   # any numeric CSV/NPY table
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor
from tqdm import tqdm

import pyro_ffjord as pf
from pyro_ffjord.datasets.tabular import TabularData, load_tabular

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import flags, training  # noqa: E402

DATASETS = ("power", "gas", "hepmass", "miniboone", "bsds300", "bsds300-images")
MODELS = ("ffjord", "maf", "spline")


class Architecture(NamedTuple):
    """CNF architecture: hidden layers of ``hidden_mult * D`` units (at most ``max_width``), ``num_blocks`` CNFs."""

    num_hidden: int
    hidden_mult: int
    num_blocks: int
    activation: str
    max_width: int = 64  # CPU-sized
    layer: str = "concatsquash"
    time_frequencies: int = 0


# FFJORD paper (Grathwohl et al., 2019), Appendix B, and the train_tabular.py commands of its repository.
PAPER_ARCHITECTURES = {
    "power": Architecture(3, 10, 5, "tanh"),
    "gas": Architecture(3, 20, 5, "tanh"),
    "hepmass": Architecture(2, 10, 10, "softplus"),
    "miniboone": Architecture(2, 20, 1, "softplus"),
    "bsds300": Architecture(3, 20, 2, "softplus"),
    "bsds300-images": Architecture(3, 20, 2, "softplus"),
}
CSV_ARCHITECTURE = Architecture(2, 10, 2, "tanh")  # our choice for a user's table
# Flow matching: one CNF; a wide net costs one evaluation per sample, and time features let it vary quickly in t.
FM_ARCHITECTURE = Architecture(3, 20, 1, "silu", max_width=512, layer="concat", time_frequencies=8)


class Flow(torch.nn.Module):
    """A normalizing flow ``base -> data``: its transforms, and the modules that hold their parameters.

    The transforms are kept as a list rather than composed, so that ``log_prob`` inverts each one exactly
    once; a ``ComposeTransform`` would recompute the intermediate values with forward calls, which for a
    batch norm in training mode (batch statistics one way, moving averages the other) are not the same.
    """

    def __init__(self, transforms: list[dist.transforms.Transform], modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.transforms = transforms
        self.layers = torch.nn.ModuleList(modules)

    def distribution(self, dim: int, like: Tensor) -> dist.TransformedDistribution:
        """The flow's density on ``R^dim``, on the device and dtype of ``like``."""
        base = dist.Normal(like.new_zeros(dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms)

    def cnfs(self) -> list[pf.FFJORD]:
        """The CNF blocks (none for the baselines)."""
        return [m for m in self.layers if isinstance(m, pf.FFJORD)]

    def scaled(self, x: Tensor) -> Tensor:
        """``x`` in the CNF's units: through the inverse of the data scaling that ends the transforms."""
        return self.transforms[-1].inv(x)


def architecture(args: argparse.Namespace) -> Architecture:
    """The paper's architecture for the dataset (one wide CNF for flow matching), with the command line's overrides."""
    if args.objective != "ml":
        default = FM_ARCHITECTURE
    else:
        default = CSV_ARCHITECTURE if args.csv else PAPER_ARCHITECTURES[args.data]
    overrides = {
        "num_hidden": args.num_hidden,
        "hidden_mult": args.hidden_mult,
        "num_blocks": args.num_blocks,
        "activation": args.activation,
        "max_width": args.max_width,
        "layer": args.layer,
        "time_frequencies": args.time_frequencies,
    }
    return default._replace(**{key: value for key, value in overrides.items() if value is not None})


def hidden_width(dim: int, args: argparse.Namespace) -> int:
    """``hidden_mult * dim``, capped at ``max_width`` (0: no cap)."""
    arch = architecture(args)
    width = arch.hidden_mult * dim
    return min(width, arch.max_width) if arch.max_width else width


def build_flow(name: str, train: Tensor, args: argparse.Namespace, device: torch.device) -> Flow:
    """FFJORD (CNF blocks), MAF or spline-coupling flow, each with batch norms around every layer; under flow
    matching, one CNF followed by the whitening fit on the ``train`` rows."""
    dim = train.shape[1]
    arch, width = architecture(args), hidden_width(dim, args)
    flow_matching = name == "ffjord" and args.objective != "ml"
    transforms: list[dist.transforms.Transform] = [] if flow_matching else [T.BatchNorm(dim)]
    modules: list[torch.nn.Module] = list(transforms)
    for _ in range(arch.num_blocks if name == "ffjord" else args.baseline_layers):
        if name == "ffjord":
            layer = pf.ffjord(
                dim,
                hidden_dims=(width,) * arch.num_hidden,
                layer=arch.layer,
                activation=arch.activation,
                time_frequencies=arch.time_frequencies,
                T=args.T,
                train_T=args.train_T,
                divergence="hutchinson",
                **flags.solver_options(args),
            )
            transforms.append(layer)
        elif name == "maf":
            # Pyro's autoregressive transform is an IAF (one pass to sample); its inverse is a MAF (one pass
            # to score data). MADE needs at least D hidden units.
            layer = T.affine_autoregressive(dim, hidden_dims=[max(width, dim)] * 2)
            transforms += [layer.inv, T.Permute(torch.randperm(dim, device=device))]
        else:
            layer = T.spline_coupling(dim, hidden_dims=[width] * 2, count_bins=8, bound=4.0)
            transforms += [layer, T.Permute(torch.randperm(dim, device=device))]
        modules.append(layer)
        if not flow_matching:
            bn = T.BatchNorm(dim)
            transforms.append(bn)
            modules.append(bn)
    if flow_matching:
        transforms.append(pf.standardization(train))
    return Flow(transforms, modules).to(device)


def model(x: Tensor, flow: Flow, name: str) -> None:
    """Observed rows ``x`` under the flow's density; the flow's parameters are Pyro parameters."""
    pyro.module(name, flow)
    with pyro.plate("data", len(x)):
        pyro.sample("x", flow.distribution(x.shape[-1], x), obs=x)


def guide(x: Tensor, flow: Flow, name: str) -> None:
    """Nothing is latent: the ELBO is the exact log-likelihood."""


@torch.no_grad()
def calibrate_batchnorm(flow: Flow, x: Tensor) -> None:
    """Sets every batch norm's moving averages to the statistics of the rows ``x`` under the current flow.

    Pyro's ``BatchNorm`` normalizes with the batch's statistics in training mode but with moving averages
    (momentum 0.1, starting at mean 0 and variance 1) in evaluation mode. While the layers below a batch norm
    still change quickly, as in a short run, those averages lag behind them and the evaluation-mode NLL is
    off by tens of nats; so before every validation the averages are recomputed on a fixed set of train rows
    (in one batch, each batch norm sees the statistics of the normalized output of the layers below it).
    """
    flow.train()
    norms = [m for m in flow.layers if isinstance(m, T.BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 1.0
    try:
        flow.distribution(x.shape[-1], x).log_prob(x)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum


@torch.no_grad()
def flow_matching_validation(flow: Flow, x: Tensor, args: argparse.Namespace) -> float:
    """The flow-matching loss on validation rows, with fixed times and noise (the training RNG is untouched)."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        losses = [
            pf.flow_matching_loss(flow.cnfs()[0], flow.scaled(chunk), sigma_min=args.sigma_min) * len(chunk)
            for chunk in x.split(args.eval_batch_size)
        ]
    return (sum(losses) / len(x)).item()


@torch.no_grad()
def nll(flow: Flow, x: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean negative log-likelihood in nats and its standard error (batch norms use their moving averages)."""
    flow.eval()
    d = flow.distribution(x.shape[-1], x)
    values = torch.cat([-d.log_prob(chunk) for chunk in x.split(batch_size)]).double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def gaussian_nll(train: Tensor, test: Tensor) -> tuple[float, float]:
    """Test NLL (mean, SE) of the maximum-likelihood full-covariance Gaussian of the train set."""
    x = train.double().cpu()
    cov = torch.atleast_2d(torch.cov(x.T, correction=0))
    values = -dist.MultivariateNormal(x.mean(0), covariance_matrix=cov).log_prob(test.double().cpu())
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def load_data(args: argparse.Namespace) -> TabularData:
    """The dataset (or the user's table), subsampled to ``--num-train/--num-val/--num-test`` rows.

    A missing file, NaN/inf values, a corrupt file or a missing optional reader ends the program with a
    one-line message; a dropped constant column is reported as a one-line warning.
    """
    sizes = (args.num_train, args.num_val, args.num_test)
    what = args.csv or args.data
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.csv:
                data = load_tabular("csv", path=args.csv, seed=args.seed)
            elif args.data == "bsds300-images":
                full = (1_000_000, 50_000, 250_000)  # MAF's sizes
                n_train, n_val, n_test = (n or m for n, m in zip(sizes, full))
                data = load_tabular(
                    args.data, args.data_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=args.seed
                )
            else:
                data = load_tabular(args.data, args.data_dir)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: cannot load {what}: {e}") from None
    for w in caught:
        print(f"warning: {what}: {w.message}", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    splits = [a[rng.permutation(len(a))[:n]] if 0 < n < len(a) else a for a, n in zip(data.splits, sizes)]
    data = TabularData(*splits, data.name, data.source, data.columns)
    if data.dim < 2 or min(len(a) for a in data.splits) < 2:
        raise SystemExit(f"error: {what}: need at least 2 columns and 2 rows per split, got {data.splits[0].shape}")
    return data


def fit(name: str, data: dict[str, Tensor], args: argparse.Namespace, procs: training.Processes) -> dict[str, Any]:
    """Trains one flow with early stopping, restores its best parameters and evaluates it on the test set.

    Its checkpoint and log live in ``<out>`` (one model) or ``<out>/<name>`` (``--model all``).

    Returns:
        The flow, its learning curves and its metrics.
    """
    run_dir = Path(args.out) if args.model != "all" else Path(args.out) / name
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    try:
        flow = build_flow(name, data["train"], args, procs.device)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: invalid {name} settings: {e}") from None
    optimizer, elbo = pyro.optim.Adam({"lr": args.lr}), Trace_ELBO()
    checkpoint = run_dir / "checkpoint.pt"
    pyro.module(name, flow)  # every objective keeps the parameters in Pyro's param store
    resume = training.resuming(args, checkpoint, later_model=args.model == "all" and name != MODELS[0])
    state = training.early_stopping_state(flow)
    trainer = training.Trainer(checkpoint, flow, optimizer, state, resume, writer=procs.rank == 0)

    train = data["train"]
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.bn_rows]
    calibration = train[rows.to(procs.device)]

    def train_step(step: int, state: dict[str, Any]) -> float:
        """One optimizer step, and the validation loss when it is due (recorded in ``state``): the NLL, or the
        flow-matching loss while training by flow matching (a new early-stopping record starts with the NLL)."""
        flow.train()
        batch = training.train_batches(len(train), args.batch_size, args.seed, step, procs)
        x = train[batch.to(procs.device)]
        matching = name == "ffjord" and flags.flow_matching_now(args, step, args.num_steps)
        if name == "ffjord" and not matching and flags.flow_matching_now(args, step - 1, args.num_steps):
            state.update(best_val=math.inf, bad_evals=0)  # the first likelihood step of fm+ml
        if matching:
            loss = training.flow_matching_step(flow.cnfs()[0], flow.scaled(x), optimizer, args)
        else:
            loss = training.svi_step(elbo, optimizer, model, guide, x, flow, name) / len(x)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
            if matching:
                value = flow_matching_validation(flow, data["val"], args)
            else:
                calibrate_batchnorm(flow, calibration)
                value = nll(flow, data["val"], args.eval_batch_size)[0]
            training.record_validation(state, step + 1, value, flow, args.patience)
        return loss

    def report(step: int, loss: float, state: dict[str, Any]) -> None:
        cnfs = flow.cnfs()
        nfe = sum(c.nfe.forward for c in cnfs)
        T_mean = sum(c.T.item() for c in cnfs) / len(cnfs) if cnfs else ""
        bar.set_postfix(loss=f"{loss:.3f}", best_val=f"{state['best_val']:.3f}", nfe=nfe)
        bar.update()
        val = state["val"][-1][1] if state["val"] and state["val"][-1][0] == step + 1 else ""
        row = {"step": step, "loss": loss, "val_loss": val, "nfe_forward": nfe, "T": T_mean}
        state["log"].append({**row, "seconds": state["seconds"]})

    bar = tqdm(initial=trainer.start, total=args.num_steps, disable=args.no_progress or procs.rank > 0, desc=name)
    state = trainer.run(args.num_steps, train_step, report, lambda s: s % args.checkpoint_every == 0)
    bar.close()
    losses = [row["loss"] for row in state["log"]]
    if state["stopped"]:
        print(f"{name}: early stop after {len(losses)} steps, best validation loss at step {state['best_at']}")

    flow.load_state_dict(state["best_module"])
    started = time.time()
    with flags.evaluation_solver(flow, args) if flow.cnfs() else contextlib.nullcontext():
        test, se = nll(flow, data["test"], args.eval_batch_size)
        eval_nfe = sum(c.nfe.forward for c in flow.cnfs())
    metrics = {
        "test_nll": test,
        "test_nll_se": se,
        "best_val_loss": state["best_val"],
        "best_step": state["best_at"],
        "steps": len(losses),
        "stopped_early": state["stopped"],
        "train_seconds": round(state["seconds"], 1),
        "eval_seconds": round(time.time() - started, 1),
        "eval_nfe": eval_nfe,
        "num_params": sum(p.numel() for p in flow.parameters()),
        "ranks_in_sync": training.in_sync(flow),
    }
    return {"flow": flow, "losses": losses, "val": state["val"], "metrics": metrics}


def moving_average(values: list[float], width: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    cumsum = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - width, 0)
    return (cumsum[1:] - cumsum[lo]) / (np.arange(1, len(values) + 1) - lo)


@torch.no_grad()
def plot(path: Path, data: TabularData, test: Tensor, results: dict[str, dict[str, Any]], gaussian: float) -> None:
    """Learning curves (train and validation NLL vs step) and pairwise marginals of 4 dims, data vs samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim, title = test.shape[1], data.name

    def label(i: int) -> str:
        return data.columns[i] if data.columns else f"dim {i}"

    dims = sorted(set(np.linspace(0, dim - 1, min(dim, 4)).round().astype(int).tolist()))
    pairs = list(combinations(dims, 2))
    rows = test[:2000].cpu().numpy()
    lo, hi = np.quantile(rows, 0.005, axis=0), np.quantile(rows, 0.995, axis=0)
    samples = {"data": rows}
    for name, result in results.items():
        flow = result["flow"].eval()
        samples[name] = flow.distribution(dim, test).sample((len(rows),)).cpu().numpy()
    fig, axes = plt.subplots(len(samples), len(pairs) + 1, figsize=(3 * (len(pairs) + 1), 3 * len(samples)))
    axes = np.atleast_2d(axes)
    for row, (name, points) in zip(axes, samples.items()):
        for ax, (i, j) in zip(row[1:], pairs):
            ax.scatter(points[:, i], points[:, j], s=1, alpha=0.3, color="k" if name == "data" else "C0")
            ax.set_xlim(lo[i], hi[i])
            ax.set_ylim(lo[j], hi[j])
            ax.set_title(f"{name}: {label(i)} vs {label(j)}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = row[0]
        if name == "data":
            ax.axis("off")
            ax.text(0, 0.5, f"{title}\nD = {dim}\nGaussian test NLL {gaussian:.2f}", fontsize=10, va="center")
            continue
        result = results[name]
        losses = result["losses"]
        ax.plot(np.arange(1, len(losses) + 1), moving_average(losses, 20), lw=1, label="train (moving avg.)")
        if result["val"]:
            ax.plot(*zip(*result["val"]), "o-", ms=3, label="validation")
        ax.axhline(gaussian, color="k", ls="--", lw=1, label="Gaussian (test)")
        metrics = result["metrics"]
        ax.set_title(f"{name}: test NLL {metrics['test_nll']:.2f} ± {metrics['test_nll_se']:.2f}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("NLL (nats)")
        ymin = min(min(losses), *(v for _, v in result["val"])) if result["val"] else min(losses)
        ax.set_ylim(ymin - 0.05 * abs(ymin) - 1, max(gaussian, ymin) + 0.3 * abs(gaussian - ymin) + 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the data, fits the Gaussian reference and each flow, writes metrics.json and the plot."""
    if args.objective != "ml" and architecture(args).num_blocks != 1:
        raise SystemExit(f"error: --objective {args.objective} trains one CNF: use --num-blocks 1")
    with training.processes(args) as procs:
        return run(args, procs)


def run(args: argparse.Namespace, procs: training.Processes) -> dict[str, Any]:
    device = procs.device
    data = load_data(args)
    tensors = {split: torch.from_numpy(a).to(device) for split, a in zip(("train", "val", "test"), data.splits)}
    gaussian, gaussian_se = gaussian_nll(tensors["train"], tensors["test"])
    if data.source:
        print(f"{data.name}: {data.source}")
    print(
        f"{data.name}: D = {data.dim}, {len(data.train)}/{len(data.val)}/{len(data.test)} rows; "
        f"full-covariance Gaussian test NLL {gaussian:.3f} ± {gaussian_se:.3f} nats"
    )
    results = {}
    for name in MODELS if args.model == "all" else (args.model,):
        try:
            results[name] = fit(name, tensors, args, procs)
        except pf.ODESolveError as e:
            raise SystemExit(f"error: {name}: the ODE solve failed ({e}); try a smaller --lr or --eval-rtol") from None
    metrics = {
        "data": data.name,
        "source": data.source,
        "dim": data.dim,
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test),
        "world_size": procs.world_size,
        "gaussian_nll": gaussian,
        "gaussian_nll_se": gaussian_se,
        "eval_solver": {"method": args.eval_method, "rtol": args.eval_rtol, "atol": args.eval_atol},
        "models": {name: r["metrics"] for name, r in results.items()},
    }
    if procs.rank > 0:
        return metrics
    training.write_json(Path(args.out) / "metrics.json", metrics)
    plot(Path(args.plot or Path(args.out) / f"tabular_{data.name}.png"), data, tensors["test"], results, gaussian)
    print(f"\n{data.name} (D = {data.dim}), test NLL in nats (exact trace, {args.eval_method}):")
    print(f"{'model':<9}{'NLL':>10}{'± SE':>8}{'seconds':>9}{'steps':>7}{'best':>6}")
    print(f"{'gaussian':<9}{gaussian:>10.3f}{gaussian_se:>8.3f}")
    for name, m in metrics["models"].items():
        print(
            f"{name:<9}{m['test_nll']:>10.3f}{m['test_nll_se']:>8.3f}{m['train_seconds']:>9.1f}"
            f"{m['steps']:>7}{m['best_step']:>6}"
        )
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", choices=DATASETS, default="bsds300-images", help="dataset")
    source.add_argument("--csv", default=None, help="a numeric .csv/.npy table instead (split and standardized)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument(
        "--num-train", type=flags.non_negative_int, default=20000, help="rows used for training (0: all)"
    )
    parser.add_argument("--num-val", type=flags.non_negative_int, default=2000, help="validation rows (0: all)")
    parser.add_argument("--num-test", type=flags.non_negative_int, default=5000, help="test rows (0: all)")
    parser.add_argument("--model", choices=[*MODELS, "all"], default="ffjord", help="flow to train")
    flags.add_common_args(parser, num_steps=800, out="outputs/tabular")
    parser.add_argument("--batch-size", type=flags.positive_int, default=500, help="rows per step and process")
    parser.add_argument("--lr", type=flags.positive_float, default=3e-3, help="Adam step size (paper: 1e-3)")
    flags.add_objective_args(parser, default="ml")
    parser.add_argument("--eval-every", type=flags.positive_int, default=50, help="steps between validation NLLs")
    parser.add_argument(
        "--patience", type=flags.positive_int, default=10, help="validations without improvement before stopping"
    )
    parser.add_argument(
        "--num-hidden", type=flags.positive_int, default=None, help="hidden layers (default: the paper's)"
    )
    parser.add_argument(
        "--hidden-mult", type=flags.positive_int, default=None, help="hidden width / D (default: the paper's)"
    )
    parser.add_argument(
        "--max-width",
        type=flags.non_negative_int,
        default=None,
        help="cap on the hidden width (0: none, the paper; default: 64, 512 for flow matching)",
    )
    parser.add_argument(
        "--num-blocks", type=flags.positive_int, default=None, help="stacked CNFs (default: the paper's)"
    )
    parser.add_argument("--layer", default=None, help="time conditioning (default: concatsquash, concat for fm)")
    parser.add_argument(
        "--time-frequencies",
        type=flags.non_negative_int,
        default=None,
        help="sinusoidal time features (default: 0, 8 for fm)",
    )
    parser.add_argument("--activation", default=None, help="tanh, softplus, ... (default: the paper's)")
    parser.add_argument("--T", type=flags.positive_float, default=1.0, help="initial integration time of each block")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=True, help="learn T")
    # the paper: dopri5 with atol 1e-8 and rtol 1e-6 in training and evaluation
    flags.add_solver_args(parser, method="rk4", step_size=0.25, tol=1e-5, max_steps=10000)
    parser.add_argument(
        "--bn-rows", type=flags.positive_int, default=5000, help="train rows that set the batch-norm averages"
    )
    parser.add_argument("--baseline-layers", type=flags.positive_int, default=5, help="MAF / spline-coupling layers")
    parser.add_argument("--eval-batch-size", type=flags.positive_int, default=1000, help="rows per evaluation solve")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
