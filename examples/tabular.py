"""Tabular density estimation, the FFJORD paper's UCI/BSDS300 experiments, the Pyro way.

The model is ``pyro.sample("x", TransformedDistribution(Normal(0, I), [*flows, whitening]), obs=x)`` under a plate,
where ``whitening`` is the Cholesky whitening of the train rows (``pf.standardization``; its log-determinant keeps
every NLL in the data's units). ``--objective fm`` (the default; on the default patches -134.07 nats after 27 s of
training, against -103.60 after 154 s for ``ml``) trains one CNF by flow matching, with no solve; ``ml`` fits
stacked CNF blocks by SVI with an empty guide on a fixed grid with Hutchinson's trace; ``fm+ml`` fine-tunes the
flow-matched CNF by likelihood; ``--model maf|spline`` fits Pyro's MAF or spline coupling. Adam, early stopping on
the validation loss; the test NLL (nats, with its standard error) from an adaptive solve with the exact trace,
beside a full-covariance Gaussian fit on the train rows.

The default is CPU-sized: 8x8 patches of the real BSDS300 images (63 dimensions, 20,000/2,000/1,000 patches),
hidden layers capped at 512 units (64 for ``ml``). The paper's setting (its model, full data, dopri5 1e-8/1e-6):

    python examples/tabular.py --objective ml --data power --num-train 0 --num-val 0 --num-test 0 --max-width 0 \\
        --lr 1e-3 --batch-size 10000 -n 100000 --patience 30 --eval-every 200 --method dopri5 \\
        --atol 1e-8 --rtol 1e-6 --adjoint --eval-atol 1e-8 --eval-rtol 1e-6 --device cuda

    python examples/tabular.py                                  # BSDS300 patches, a few minutes on 1 core
    python examples/tabular.py --csv my_table.csv --model maf   # any numeric CSV/NPY table
"""

from __future__ import annotations

import argparse
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

import pyro_ffjord as pf
from pyro_ffjord.datasets.tabular import TabularData, load_tabular

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training  # noqa: E402
from common.training import non_negative_int, positive_float, positive_int  # noqa: E402


class Architecture(NamedTuple):
    """Hidden layers of ``hidden_mult * D`` units (at most ``max_width``; 0: no cap), ``num_blocks`` CNFs."""

    num_hidden: int
    hidden_mult: int
    num_blocks: int
    activation: str
    max_width: int = 64  # CPU-sized
    layer: str = "concatsquash"
    time_frequencies: int = 0


# FFJORD (Grathwohl et al., 2019), Appendix B, and the train_tabular.py commands of its repository.
PAPER = {
    "power": Architecture(3, 10, 5, "tanh"),
    "gas": Architecture(3, 20, 5, "tanh"),
    "hepmass": Architecture(2, 10, 10, "softplus"),
    "miniboone": Architecture(2, 20, 1, "softplus"),
    "bsds300": Architecture(3, 20, 2, "softplus"),
    "bsds300-images": Architecture(3, 20, 2, "softplus"),
}
CSV = Architecture(2, 10, 2, "tanh")  # our choice for a user's table
# Flow matching: one wide CNF (one evaluation per sample), with time features to vary quickly in t.
FLOW_MATCHING = Architecture(3, 20, 1, "silu", max_width=512, layer="concat", time_frequencies=8)


class Flow(torch.nn.Module):
    """A flow ``base -> data``: its transforms (an inverted MAF is no module) and the modules holding their
    parameters."""

    def __init__(self, transforms: list[dist.transforms.Transform], modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.transforms, self.layers = transforms, torch.nn.ModuleList(modules)

    def distribution(self, like: Tensor) -> dist.TransformedDistribution:
        base = dist.Normal(like.new_zeros(like.shape[-1]), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms)

    def cnfs(self) -> list[pf.FFJORD]:
        return [m for m in self.layers if isinstance(m, pf.FFJORD)]


def build_flow(train: Tensor, args: argparse.Namespace) -> Flow:
    """FFJORD blocks (the paper's architecture for the data, or one wide CNF for flow matching), MAF or spline
    coupling layers, followed by the whitening fit on the ``train`` rows."""
    dim = train.shape[1]
    arch = FLOW_MATCHING if args.objective != "ml" else CSV if args.csv else PAPER[args.data]
    arch = arch._replace(**{k: v for k, v in vars(args).items() if k in Architecture._fields and v is not None})
    width = min(arch.hidden_mult * dim, arch.max_width or math.inf)
    transforms, modules = [], []
    for _ in range(arch.num_blocks if args.model == "ffjord" else args.baseline_layers):
        if args.model == "ffjord":
            net = {"layer": arch.layer, "activation": arch.activation, "time_frequencies": arch.time_frequencies}
            solver = {"divergence": "hutchinson", **training.solver_options(args)}
            layer = pf.ffjord(dim, hidden_dims=(width,) * arch.num_hidden, **net, **solver)
            transforms.append(layer)
        elif args.model == "maf":  # Pyro's IAF inverted: one pass to score data; MADE needs >= D hidden units
            layer = T.affine_autoregressive(dim, hidden_dims=[max(width, dim)] * 2)
            transforms += [layer.inv, T.Permute(torch.randperm(dim, device=train.device))]
        else:
            layer = T.spline_coupling(dim, hidden_dims=[width] * 2, count_bins=8, bound=4.0)
            transforms += [layer, T.Permute(torch.randperm(dim, device=train.device))]
        modules.append(layer)
    if args.model == "ffjord" and args.objective != "ml" and len(modules) != 1:
        raise SystemExit(f"error: --objective {args.objective} trains one CNF: use --num-blocks 1")
    return Flow([*transforms, pf.standardization(train)], modules)


def model(x: Tensor, flow: Flow) -> None:
    pyro.module("flow", flow)
    with pyro.plate("data", len(x)):
        pyro.sample("x", flow.distribution(x), obs=x)


def guide(x: Tensor, flow: Flow) -> None:
    """Nothing is latent: the ELBO is the exact log-likelihood."""


@torch.no_grad()
def flow_matching_validation(flow: Flow, x: Tensor, args: argparse.Namespace) -> float:
    """The flow-matching loss on validation rows, with fixed times and noise (the training RNG is untouched)."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        z, cnf = flow.transforms[-1].inv(x), flow.cnfs()[0]  # z in the CNF's units
        losses = [
            pf.flow_matching_loss(cnf, b, sigma_min=args.sigma_min, time=args.fm_time) * len(b) for b in z.split(1000)
        ]
    return (sum(losses) / len(x)).item()


@torch.no_grad()
def nll(d: dist.Distribution, x: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean negative log-likelihood in nats and its standard error."""
    values = torch.cat([-d.log_prob(chunk) for chunk in x.split(batch_size)]).double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def load_data(args: argparse.Namespace) -> TabularData:
    """The dataset or the user's table, subsampled to ``--num-train/--num-val/--num-test`` rows; a bad file is a
    one-line error, a dropped constant column a one-line warning."""
    sizes, what = (args.num_train, args.num_val, args.num_test), args.csv or args.data
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.csv:
                data = load_tabular("csv", path=args.csv, seed=args.seed)
            elif args.data == "bsds300-images":  # built from the images; MAF's sizes by default
                n = dict(zip(("n_train", "n_val", "n_test"), (s or f for s, f in zip(sizes, (10**6, 50000, 250000)))))
                data = load_tabular(args.data, args.data_dir, seed=args.seed, **n)
            else:
                data = load_tabular(args.data, args.data_dir)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: cannot load {what}: {e}") from None
    for w in caught:
        print(f"warning: {what}: {w.message}", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    splits = [a[rng.permutation(len(a))[:n]] if 0 < n < len(a) else a for a, n in zip(data.splits, sizes)]
    if data.dim < 2 or min(len(a) for a in splits) < 2:
        raise SystemExit(f"error: {what}: need at least 2 columns and 2 rows per split, got {splits[0].shape}")
    return TabularData(*splits, data.name, data.source, data.columns)


@torch.no_grad()
def plot(path: Path, data: TabularData, test: Tensor, flow: Flow, state: dict, gaussian: float, title: str) -> None:
    """Learning curves, then pairwise marginals of up to 4 columns: test rows above, the flow's samples below."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to choose

    dims = sorted(set(np.linspace(0, data.dim - 1, min(data.dim, 4)).round().astype(int).tolist()))
    pairs, label = list(combinations(dims, 2)), lambda i: data.columns[i] if data.columns else f"dim {i}"
    rows = {"data": test[:2000].cpu().numpy(), "samples": flow.distribution(test).sample((2000,)).cpu().numpy()}
    lo, hi = np.quantile(rows["data"], [0.005, 0.995], axis=0)
    fig = Figure(figsize=(3 * (len(pairs) + 1), 6))
    axes = fig.subplots(2, len(pairs) + 1, squeeze=False)
    losses = [row["loss"] for row in state["log"]]
    axes[0, 0].plot(losses, lw=0.5, label="train")
    if state["val"]:
        axes[0, 0].plot(*zip(*state["val"]), "o-", ms=3, label="validation")
    axes[0, 0].axhline(gaussian, color="k", ls="--", lw=1, label="Gaussian (test NLL)")
    axes[0, 0].set(xlabel="step", ylabel="loss (nats; fm: its own)", title=title)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].axis("off")
    for row, (name, points) in zip(axes, rows.items()):
        for ax, (i, j) in zip(row[1:], pairs):
            ax.scatter(points[:, i], points[:, j], s=1, alpha=0.3, color="k" if name == "data" else "C0")
            ax.set(xlim=(lo[i], hi[i]), ylim=(lo[j], hi[j]), xticks=[], yticks=[])
            ax.set_title(f"{name}: {label(i)} vs {label(j)}", fontsize=9)
    training.save_figure(fig, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fits the Gaussian reference and the flow with early stopping, scores the best parameters on the test rows,
    and writes metrics.json and the plot."""
    with training.processes(args) as procs:
        data = load_data(args)
        train, val, test = (torch.from_numpy(a).to(procs.device) for a in data.splits)
        gaussian = nll(dist.MultivariateNormal(train.mean(0), torch.cov(train.T, correction=0)), test, len(test))
        print(f"{data.name}: D = {data.dim}, {len(train)}/{len(val)}/{len(test)} rows")
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        try:
            flow = build_flow(train, args).to(procs.device)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: invalid {args.model} settings: {e}") from None
        optimizer, elbo, cnfs = pyro.optim.Adam({"lr": args.lr}), Trace_ELBO(), flow.cnfs()
        pyro.module("flow", flow)  # every objective keeps the parameters in Pyro's param store
        trainer = training.Trainer(args, flow, optimizer, procs)

        def train_step(step: int, state: dict[str, Any]) -> dict[str, Any]:
            """One step; when due, the validation loss: the NLL, or the fm loss (fm+ml's first ml step resets it)."""
            x = training.train_batch(train, args.batch_size, args.seed, step, procs)
            matching = bool(cnfs) and training.flow_matching_now(args, step, args.num_steps)
            if cnfs and not matching and training.flow_matching_now(args, step - 1, args.num_steps):
                state.update(best_val=math.inf, bad_evals=0)
            if matching:
                loss = training.flow_matching_step(cnfs[0], flow.transforms[-1].inv(x), optimizer, args)
            else:
                loss = training.svi_step(elbo, optimizer, model, guide, x, flow) / len(x)
            value = ""
            if (step + 1) % args.eval_every == 0 or step + 1 == args.num_steps:
                if matching:
                    value = flow_matching_validation(flow, val, args)
                else:
                    value = nll(flow.distribution(val), val, args.eval_batch_size)[0]
                training.record_validation(state, step + 1, value, flow, args.patience)
            T_mean = sum(c.T.item() for c in cnfs) / len(cnfs) if cnfs else ""
            return {"loss": loss, "val_loss": value, "nfe_forward": sum(c.nfe.forward for c in cnfs), "T": T_mean}

        state = trainer.run(train_step, args.num_steps, args.checkpoint_every)
        flow.load_state_dict(state["best_module"])
        started = time.time()
        with training.evaluation_solver(flow, args):
            test_nll, se = nll(flow.distribution(test), test, args.eval_batch_size)
        metrics = {
            "data": data.name,
            "model": args.model,
            "test_nll": test_nll,
            "test_nll_se": se,
            "gaussian_nll": gaussian[0],
            "best_step": state["best_at"],
            "steps": len(state["log"]),
            "train_seconds": round(state["seconds"], 1),
            "eval_seconds": round(time.time() - started, 1),
            "eval_nfe": sum(c.nfe.forward for c in cnfs),
            "world_size": procs.world_size,
            "ranks_in_sync": training.in_sync(flow),
        }
        if procs.rank > 0:
            return metrics
    title = f"{args.model} on {data.name}: test NLL {test_nll:.2f} ± {se:.2f}"
    training.write_json(Path(args.out) / "metrics.json", metrics)
    plot(Path(args.plot or Path(args.out) / f"tabular_{data.name}.png"), data, test, flow, state, gaussian[0], title)
    print(f"{title} nats (exact trace, {args.eval_method}); full-covariance Gaussian {gaussian[0]:.2f}")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", choices=list(PAPER), default="bsds300-images", help="dataset")
    source.add_argument("--csv", default=None, help="a numeric .csv/.npy table instead (split and standardized)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--num-train", type=non_negative_int, default=20000, help="rows used for training (0: all)")
    parser.add_argument("--num-val", type=non_negative_int, default=2000, help="validation rows (0: all)")
    parser.add_argument("--num-test", type=non_negative_int, default=1000, help="test rows (0: all)")
    parser.add_argument("--model", choices=["ffjord", "maf", "spline"], default="ffjord", help="flow to train")
    training.add_common_args(parser, num_steps=800, out="outputs/tabular")
    parser.add_argument("--batch-size", type=positive_int, default=500, help="rows per step and process")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="Adam step size (paper: 1e-3)")
    training.add_objective_args(parser, default="fm")
    parser.add_argument("--eval-every", type=positive_int, default=50, help="steps between validation losses")
    parser.add_argument("--patience", type=positive_int, default=10, help="validations without improvement to stop")
    parser.add_argument("--num-hidden", type=positive_int, help="hidden layers (default: the paper's)")
    parser.add_argument("--hidden-mult", type=positive_int, help="hidden width / D (default: the paper's)")
    parser.add_argument("--max-width", type=non_negative_int, help="width cap (0: none; default: 64, fm 512)")
    parser.add_argument("--num-blocks", type=positive_int, help="stacked CNFs (default: the paper's)")
    parser.add_argument("--activation", help="tanh, softplus, ... (default: the paper's)")
    parser.add_argument("--T", type=positive_float, default=1.0, help="initial integration time of each block")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=True, help="learn T")
    training.add_solver_args(parser, method="rk4", step_size=0.25, tol=1e-5, max_steps=10000)
    parser.add_argument("--baseline-layers", type=positive_int, default=5, help="MAF / spline-coupling layers")
    parser.add_argument("--eval-batch-size", type=positive_int, default=1000, help="rows per evaluation solve")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
