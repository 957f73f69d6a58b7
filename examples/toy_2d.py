"""Fit the 2-D toy densities of the FFJORD paper with a CNF, the Pyro way.

The model is ``pyro.sample("x", TransformedDistribution(Normal(0, I), [ffjord...]), obs=x)``.
``--objective ml`` fits it with SVI and an empty guide, which is maximum likelihood through a cheap
fixed-grid solve; ``--objective fm`` trains the same transform by flow matching (one network evaluation
per sample, no solve); ``fm+ml`` does one, then the other. The test NLL is computed with an adaptive
solver and the exact trace, and compared with the true NLL where the density is known (8gaussians,
checkerboard).

    python examples/toy_2d.py                       # 8gaussians, a few minutes on 2 CPU cores
    python examples/toy_2d.py --data checkerboard -n 4000 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.infer import Trace_ELBO

import pyro_ffjord as pf
from pyro_ffjord.datasets.toy import TOY_DATASETS, sample_toy, toy_log_density

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training  # noqa: E402
from common.training import int_list, non_negative_float, positive_float, positive_int  # noqa: E402


def build_flow(args: argparse.Namespace) -> ComposeTransformModule:
    blocks = [
        pf.ffjord(
            2,
            hidden_dims=args.hidden_dims,
            layer=args.layer,
            activation=args.activation,
            divergence=args.divergence,
            **training.solver_options(args),
        )
        for _ in range(args.num_blocks)
    ]
    return ComposeTransformModule(blocks)


def model(x: torch.Tensor, flow: ComposeTransformModule) -> None:
    pyro.module("flow", flow)
    base = dist.Normal(x.new_zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    with pyro.plate("data", len(x)):
        pyro.sample("x", d, obs=x)
    if any(block.flow.regularization for block in flow.parts):
        # Pyro scores sample statements lazily, after the model has run: score x now, so that the RNODE
        # penalty belongs to this step's solve (the later score is answered from the transform's cache).
        d.log_prob(x)
        pyro.factor("rnode", -len(x) * regularization(flow))


def guide(x: torch.Tensor, flow: ComposeTransformModule) -> None:
    """Nothing is latent: the ELBO is the exact log-likelihood."""


def regularization(flow: ComposeTransformModule) -> torch.Tensor:
    return sum(block.regularization_loss() for block in flow.parts)


@torch.no_grad()
def test_nll(flow: ComposeTransformModule, x: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean negative log-likelihood in nats and its standard error."""
    base = dist.Normal(x.new_zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    nll = torch.cat([-d.log_prob(chunk) for chunk in x.split(batch_size)])
    return nll.mean().item(), (nll.std() / math.sqrt(len(nll))).item()


@torch.no_grad()
def plot(path: Path, args, flow, data: torch.Tensor, losses: list[float], metrics: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to choose

    lim = 4.0
    side = args.plot_resolution
    grid = torch.linspace(-lim, lim, side, dtype=data.dtype, device=data.device)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    base = dist.Normal(data.new_zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    density = torch.cat([d.log_prob(chunk).exp() for chunk in points.split(args.eval_batch_size)])
    samples = d.sample((4000,))
    fig = Figure(figsize=(17, 4.2))
    axes = fig.subplots(1, 4)
    axes[0].hist2d(*data[:20000].cpu().T.numpy(), bins=side, range=[[-lim, lim]] * 2, cmap="viridis")
    axes[0].set_title(f"data: {args.data}")
    axes[1].imshow(density.reshape(side, side).cpu().numpy(), extent=[-lim, lim, -lim, lim], origin="lower")
    axes[1].set_title("learned density (exact trace)")
    axes[2].hist2d(*samples.cpu().T.numpy(), bins=100, range=[[-lim, lim]] * 2, cmap="viridis")
    axes[2].set_title("samples")
    for ax in axes[:3]:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[3].plot(losses)
    axes[3].set_xlabel("iteration")
    axes[3].set_ylabel("training loss (NLL in nats; FM: flow-matching loss)")
    true = metrics.get("true_nll")
    title = f"test NLL {metrics['test_nll']:.3f}" + (f" (true {true:.3f})" if true is not None else "")
    axes[3].set_title(title)
    if true is not None:
        axes[3].axhline(true, color="k", ls="--", lw=1)
    training.save_figure(fig, path)


def main(args: argparse.Namespace) -> dict:
    """Trains the flow, scores it on fresh samples, and writes metrics.json and the plot."""
    with training.processes(args) as procs:
        device = procs.device
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        out = Path(args.out)
        if args.objective != "ml" and args.num_blocks != 1:
            raise SystemExit(f"error: --objective {args.objective} trains one CNF: use --num-blocks 1")
        try:
            flow = build_flow(args).to(device)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: invalid flow settings: {e}") from None
        test = sample_toy(args.data, args.num_test, seed=args.seed + 10_000).float().to(device)

        # cosine decay of the learning rate over the whole run
        scheduler = pyro.optim.LambdaLR(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": args.lr},
                "lr_lambda": lambda step: 0.5 * (1 + math.cos(math.pi * min(step / args.num_steps, 1.0))),
            }
        )
        elbo = Trace_ELBO()
        pyro.module("flow", flow)  # every objective keeps the parameters in Pyro's param store
        trainer = training.Trainer(args, flow, scheduler, procs)

        def train_step(step: int, state: dict) -> dict:
            x = (
                sample_toy(args.data, args.batch_size, seed=training.batch_seed(args.seed, step, procs))
                .float()
                .to(device)
            )
            if training.flow_matching_now(args, step, args.num_steps):
                loss = training.flow_matching_step(flow.parts[0], x, scheduler, args)
            else:
                loss = training.svi_step(elbo, scheduler, model, guide, x, flow) / len(x)
            scheduler.step()  # before the checkpoint, so that a resumed run has the learning rate of step + 1
            return {"loss": loss, "nfe_forward": flow.parts[0].nfe.forward, "T": flow.parts[0].T.item()}

        state = trainer.run(train_step, args.num_steps, args.checkpoint_every)
        losses = [row["loss"] for row in state["log"]]

        with training.evaluation_solver(flow, args):
            nll, se = test_nll(flow, test, args.eval_batch_size)
            nfe = flow.parts[0].nfe.forward
            log_density = toy_log_density(args.data, test)
            metrics = {
                "data": args.data,
                "test_nll": nll,
                "test_nll_se": se,
                "true_nll": None if log_density is None else -log_density.mean().item(),
                "eval_nfe": nfe,
                "train_seconds": round(state["seconds"], 1),
                "num_steps": args.num_steps,
                "world_size": procs.world_size,
                "ranks_in_sync": training.in_sync(flow),
            }
            if procs.rank > 0:
                return metrics
            plot(Path(args.plot or out / f"toy_{args.data}.png"), args, flow, test, losses, metrics)
        training.write_json(out / "metrics.json", metrics)
        true = "" if metrics["true_nll"] is None else f"  true NLL {metrics['true_nll']:.3f} nats"
        solver = f"exact trace, {args.eval_method} rtol {args.eval_rtol} atol {args.eval_atol}"
        print(f"{args.data}: test NLL {nll:.3f} ± {se:.3f} nats ({solver}){true}")
        return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--data", choices=TOY_DATASETS, default="8gaussians", help="toy density")
    training.add_common_args(parser, out="outputs/toy_2d", num_steps=1500)
    parser.add_argument("--batch-size", type=positive_int, default=512, help="samples per step")
    parser.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate (cosine decay)")
    training.add_objective_args(parser, default="ml")
    parser.add_argument("--hidden-dims", type=int_list, default=(64, 64, 64), help="widths of the field's layers")
    parser.add_argument("--num-blocks", type=positive_int, default=1, help="stacked CNFs")
    parser.add_argument("--layer", default="concatsquash", help="time conditioning of the layers")
    parser.add_argument("--activation", default="tanh", help="of the field's layers")
    parser.add_argument("--T", type=positive_float, default=0.5, help="(initial) integration time")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=True, help="learn T")
    parser.add_argument("--divergence", choices=["exact", "hutchinson"], default="exact", help="training trace")
    training.add_solver_args(parser, method="rk4", step_size=0.125, tol=1e-5, max_steps=1000)
    parser.add_argument("--kinetic", type=non_negative_float, default=0.0, help="RNODE kinetic-energy weight")
    parser.add_argument("--jacobian", type=non_negative_float, default=0.0, help="RNODE Jacobian-norm weight")
    parser.add_argument("--num-test", type=positive_int, default=20000, help="test samples")
    parser.add_argument("--eval-batch-size", type=positive_int, default=10000, help="test samples per solve")
    parser.add_argument("--plot-resolution", type=positive_int, default=200, help="density grid points per axis")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
