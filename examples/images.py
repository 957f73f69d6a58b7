"""Density estimation of 8-bit images (MNIST, CIFAR-10) with a multiscale FFJORD or a flow-matched CNF, in bits/dim.

With ``--objective ml``, the model is
``pyro.sample("x", TransformedDistribution(Normal(0, I), [pf.MultiscaleFFJORD(...)]), obs=x)``
on uniformly dequantized pixels ``x = (k + u) / 256``, fit with Pyro's ``Trace_ELBO`` and an empty
guide (maximum likelihood), Pyro's optimizer and param store. Training uses a cheap
fixed-grid solver (rk4) with Rademacher Hutchinson noise and the RNODE penalties (``--kinetic``,
``--jacobian``, 0.01 each; they keep the dynamics smooth enough for the grid); the test bits/dim
are computed with an adaptive solver (Hutchinson trace by default: the exact trace needs C*H*W
vector-Jacobian products). It ends with a grid of samples as PNG and the test bits/dim in
``metrics.json``.

``--objective fm``, the default (1.35 bits/dim on MNIST after 161 s of training against the multiscale model's
1.96 after 203 s; see docs/images.md), trains one CNF over the whole image, whose field is a U-Net (``pf.UNet``), by
flow matching (``pf.flow_matching_loss``: one network evaluation per image, no solve): the model is
``Normal(0, I)`` on ``C*H*W`` dimensions, the CNF, a reshape to ``(C, H, W)``, the affine map
``y = m + s u`` and the inverse of the multiscale model's logit ``y = logit(alpha + (1 - 2 alpha) x)``, with
the mean ``m`` and standard deviation ``s`` of the training images' logits: the field is fit where the
dequantized pixels spread out (a black pixel's interval of width 1/256 becomes one of width 8). Every
log-determinant is in the density; the bits/dim use the same uniform dequantization and adaptive Hutchinson
evaluation.

The default is CPU-sized (2,000 MNIST training images, a small network, a few minutes on one core).
The paper's setting (as in its code: 3 scales on MNIST, 4 on CIFAR-10, 2 blocks before and after
each squeeze, 64-channel concat conv nets, T = 1, batch 200, Adam 1e-3 with 1,000 warm-up steps,
1,000 epochs, adaptive dopri5 1e-5 with the adjoint for training) is one command on a GPU:

    python examples/images.py --objective ml --dataset mnist --num-train 0 --num-test 0 --n-scales 3 --n-blocks 2 \\
        --hidden-channels 64,64,64 --batch-size 200 --lr 1e-3 --warmup 1000 --lr-decay none -n 300000 \\
        --no-train-T --method dopri5 --adjoint --kinetic 0 --jacobian 0 --num-samples 100 \\
        --eval-batch-size 500 --device cuda          # CIFAR-10: --dataset cifar10 --n-scales 4 -n 250000

Data parallel on several GPUs or machines with PyTorch's engine (``--batch-size`` is per process):

    torchrun --nproc_per_node=8 examples/images.py --distributed --device cuda ...
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 examples/images.py --distributed --device cuda ...
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor, nn
from torch.distributions.transforms import AffineTransform, ComposeTransform, ReshapeTransform

import pyro_ffjord as pf
from pyro_ffjord.datasets.images import IMAGE_DATASETS, download_image_dataset, load_image_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training  # noqa: E402
from common.training import int_list, non_negative_float, non_negative_int, positive_float, positive_int  # noqa: E402


class ImageCNF(nn.Module):
    """One CNF over the whole image with a U-Net field, for flow matching; base to data: the CNF, then
    :attr:`scaling` (reshape, affine, inverse logit), whose inverse maps images to the space of the field."""

    def __init__(self, cnf: pf.FFJORD, shape: tuple[int, int, int], alpha: float, loc: float, scale: float) -> None:
        super().__init__()
        self.cnf = cnf
        self.input_shape = shape
        logit = pf.multiscale.LogitTransform(alpha)
        self.scaling = ComposeTransform(
            [ReshapeTransform((cnf.flow.input_dim,), shape), AffineTransform(loc, scale, event_dim=3), logit.inv]
        )
        self.transforms = [cnf, self.scaling]

    @property
    def nfe(self) -> pf.NFE:
        return self.cnf.nfe


def build_flow(args: argparse.Namespace, train: Tensor) -> pf.MultiscaleFFJORD | ImageCNF:
    shape = tuple(train.shape[1:])
    if args.objective == "fm":
        net = pf.UNet(shape, args.unet_channels, time_frequencies=8)
        cnf = pf.FFJORD(net, math.prod(shape), rtol=args.rtol, atol=args.atol, max_num_steps=args.max_num_steps)
        # the same numbers in every process and on --resume: a seeded dequantization of the first images
        logits = pf.multiscale.LogitTransform(args.alpha)(training_batch(train[:2000], 2000, args.seed, train.device))
        return ImageCNF(cnf, shape, args.alpha, logits.mean().item(), logits.std().item())
    return pf.MultiscaleFFJORD(
        shape,
        n_scales=args.n_scales,
        n_blocks=args.n_blocks,
        hidden_channels=args.hidden_channels,
        layer=args.layer,
        alpha=args.alpha,
        **training.solver_options(args),
    )


def distribution(flow: pf.MultiscaleFFJORD | ImageCNF, like: Tensor) -> dist.TransformedDistribution:
    if isinstance(flow, ImageCNF):
        base = dist.Normal(like.new_zeros(math.prod(flow.input_shape)), 1.0).to_event(1)
        return dist.TransformedDistribution(base, flow.transforms)
    base = dist.Normal(like.new_zeros(flow.input_shape), 1.0).to_event(3)
    return dist.TransformedDistribution(base, [flow])


def model(x: Tensor, flow: pf.MultiscaleFFJORD) -> None:
    with pyro.plate("data", len(x)):
        pyro.sample("x", distribution(flow, x), obs=x)


def guide(x: Tensor, flow: pf.MultiscaleFFJORD) -> None:
    """Nothing is latent: the ELBO is the exact log-likelihood."""


def training_batch(train: Tensor, size: int, seed: int, device: torch.device) -> Tensor:
    """``size`` images drawn with replacement from ``train`` and dequantized, all from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    images = train[torch.randint(len(train), (size,), generator=g)]
    return pf.dequantize(images, generator=g).to(device)


@torch.no_grad()
def evaluate_bits_per_dim(
    flow: pf.MultiscaleFFJORD, test: Tensor, args, procs: training.Processes
) -> tuple[float, float]:
    """Mean test bits/dim and its standard error; each process scores its share, the sums are all-reduced."""
    g = torch.Generator().manual_seed(args.seed + 10_000)
    x = pf.dequantize(test, generator=g)[procs.rank :: procs.world_size]  # same noise for every world size
    num_dims = math.prod(flow.input_shape)
    chunks = (chunk.to(procs.device) for chunk in x.split(args.eval_batch_size))
    bpd = torch.cat([pf.bits_per_dim(distribution(flow, c).log_prob(c).double(), num_dims) for c in chunks])
    sums = torch.stack([bpd.sum(), bpd.pow(2).sum(), bpd.new_tensor(len(bpd))])
    if procs.world_size > 1:
        torch.distributed.all_reduce(sums)
    total, squares, n = sums.tolist()
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean**2, 0.0) / n)


@torch.no_grad()
def save_samples(path: Path, flow: pf.MultiscaleFFJORD, args, device: torch.device) -> None:
    """A grid of ``--num-samples`` samples, quantized to 8 bits."""
    from torchvision.utils import save_image

    torch.manual_seed(args.seed)
    d = distribution(flow, torch.zeros((), device=device))
    images = torch.cat(
        [d.sample((len(chunk),)) for chunk in torch.arange(args.num_samples).split(args.eval_batch_size)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images * 256).floor().clamp(0, 255) / 255, path, nrow=int(math.sqrt(args.num_samples)))


def main(args: argparse.Namespace) -> dict:
    with training.processes(args) as procs:
        return run(args, procs)


def run(args: argparse.Namespace, procs: training.Processes) -> dict:
    device = procs.device
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    if args.download and procs.rank == 0:
        download_image_dataset(args.dataset, args.data_dir)
    if args.download and procs.world_size > 1:
        torch.distributed.barrier()
    try:
        data = load_image_dataset(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    train = data.train[: args.num_train or None]
    test = data.test[: args.num_test or None]
    try:
        flow = build_flow(args, train).to(device)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: invalid flow settings: {e}") from None
    num_dims = math.prod(data.shape)

    warmup = max(args.warmup, 1)

    def decay(step: int) -> float:
        if args.lr_decay == "none":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step / max(args.num_steps, 1), 1.0)))

    scheduler = pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": args.lr},
            "lr_lambda": lambda step: min((step + 1) / warmup, 1.0) * decay(step),
        }
    )
    elbo, params = Trace_ELBO(), list(flow.parameters())
    pyro.module("flow", flow)
    trainer = training.Trainer(args, flow, scheduler, procs)

    def train_step(step: int, state: dict) -> dict:
        seed = training.batch_seed(args.seed, step, procs)
        x = training_batch(train, args.batch_size, seed, device)
        torch.manual_seed(seed)  # the Hutchinson noise of this step
        if args.objective == "fm":  # the flow-matching loss is no likelihood: no bits/dim to show
            value, bits_per_dim = training.flow_matching_step(flow.cnf, flow.scaling.inv(x), scheduler, args), ""
        else:  # with the empty guide, the -ELBO is the NLL
            nll = elbo.differentiable_loss(model, guide, x, flow) / len(x)
            # read after the loss: Pyro scores the sample site once the model has run, with this step's solve
            loss = nll + flow.regularization_loss()
            bits_per_dim = pf.bits_per_dim(-nll.detach(), num_dims).item()
            loss.backward()
            value = training.update(loss.detach(), params, scheduler)
        scheduler.step()
        return {"loss": value, "bits_per_dim": bits_per_dim, "nfe": flow.nfe.forward}

    state = trainer.run(train_step, args.num_steps, args.checkpoint_every)

    with training.evaluation_solver(flow, args):
        eval_started = time.time()
        bpd, se = evaluate_bits_per_dim(flow, test, args, procs)
        metrics = {
            "dataset": args.dataset,
            "test_bits_per_dim": bpd,
            "test_bits_per_dim_se": se,
            "num_test": len(test),
            "num_train": len(train),
            "num_steps": args.num_steps,
            "world_size": procs.world_size,
            "train_seconds": round(state["seconds"], 1),
            "eval_seconds": round(time.time() - eval_started, 1),
            "eval_divergence": args.eval_divergence,
            "eval_nfe": flow.nfe.forward,
            "objective": args.objective,
            "ranks_in_sync": training.in_sync(flow),
        }
        if procs.rank == 0:
            save_samples(Path(args.plot or out / f"{args.dataset}_samples.png"), flow, args, device)
    if procs.rank == 0:
        training.write_json(out / "metrics.json", metrics)
        solver = f"{args.eval_divergence} trace, {args.eval_method} rtol {args.eval_rtol} atol {args.eval_atol}"
        print(f"{args.dataset}: test {bpd:.3f} ± {se:.3f} bits/dim on {len(test)} images ({solver})")
    return metrics


# the CPU-sized defaults of each objective, measured on MNIST (docs/images.md)
OBJECTIVE_DEFAULTS = {
    "fm": {"num_steps": 600, "batch_size": 64, "lr": 2e-3},
    "ml": {"num_steps": 200, "batch_size": 32, "lr": 5e-3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--dataset", choices=IMAGE_DATASETS, default="mnist", help="dataset")
    parser.add_argument("--download", action="store_true", help="fetch the dataset with torchvision first")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--num-train", type=non_negative_int, default=2000, help="training images (0: all)")
    parser.add_argument("--num-test", type=non_negative_int, default=500, help="test images (0: all)")
    training.add_common_args(parser, num_steps="600 for fm, 200 for ml", out="outputs/images")
    parser.add_argument("--batch-size", type=positive_int, help="images per step and process (default: 64 fm, 32 ml)")
    parser.add_argument("--lr", type=positive_float, help="Adam's step size (default: 2e-3 for fm, 5e-3 for ml)")
    parser.add_argument("--warmup", type=non_negative_int, default=20, help="linear learning-rate warm-up steps")
    parser.add_argument("--lr-decay", choices=["cosine", "none"], default="cosine", help="after the warm-up")
    training.add_objective_args(parser, default="fm", choices=("ml", "fm"))
    parser.add_argument(
        "--unet-channels", type=int_list, default=(16, 32, 32), help="U-Net channels per resolution (fm)"
    )
    parser.add_argument("--n-scales", type=positive_int, default=2, help="squeeze levels of the multiscale model")
    parser.add_argument("--n-blocks", type=positive_int, default=1, help="CNF blocks before and after each squeeze")
    parser.add_argument("--hidden-channels", type=int_list, default=(16, 16, 16), help="of each conv net")
    parser.add_argument("--layer", choices=["concat", "concatsquash"], default="concat", help="time conditioning")
    parser.add_argument("--alpha", type=positive_float, default=1e-6, help="logit pre-processing (both objectives)")
    parser.add_argument("--T", type=positive_float, default=1.0, help="initial integration time of each block")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=True, help="learn T")
    training.add_solver_args(parser, method="rk4", step_size=0.5, tol=1e-5, max_steps=1000, trace="hutchinson")
    parser.add_argument("--kinetic", type=non_negative_float, default=0.01, help="RNODE kinetic-energy weight")
    parser.add_argument("--jacobian", type=non_negative_float, default=0.01, help="RNODE Jacobian-norm weight")
    parser.add_argument("--eval-batch-size", type=positive_int, default=250, help="test images per solve")
    parser.add_argument("--num-samples", type=positive_int, default=64, help="samples in the PNG grid")
    args = parser.parse_args(argv)
    for name, value in OBJECTIVE_DEFAULTS[args.objective].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


if __name__ == "__main__":
    main(parse_args())
