"""Density estimation of 8-bit images (MNIST, CIFAR-10) with a multiscale FFJORD or a flow-matched CNF, in bits/dim.

The model is ``pyro.sample("x", TransformedDistribution(Normal(0, I), [pf.MultiscaleFFJORD(...)]), obs=x)``
on uniformly dequantized pixels ``x = (k + u) / 256``, fit with Pyro's ``Trace_ELBO`` and an empty
guide (maximum likelihood), Pyro's optimizer and param store. Training uses a cheap
fixed-grid solver (rk4) with Rademacher Hutchinson noise and the RNODE penalties (``--kinetic``,
``--jacobian``, 0.01 each; they keep the dynamics smooth enough for the grid); the test bits/dim
are computed with an adaptive solver (Hutchinson trace by default: the exact trace needs C*H*W
vector-Jacobian products). It ends with a grid of samples as PNG and the test bits/dim in
``metrics.json``.

``--objective fm`` trains one CNF over the whole image instead, whose field is a U-Net (``pf.UNet``), by
flow matching (``pf.flow_matching_loss``: one network evaluation per image, no solve): the model is
``Normal(0, I)`` on ``C*H*W`` dimensions, the CNF, a reshape to ``(C, H, W)`` and the affine map
``x = (y + 1) / 2`` from ``[-1, 1]`` to the dequantized pixels (its log-determinant, ``-D log 2``, is in
every log-density); the bits/dim use the same uniform dequantization and adaptive Hutchinson evaluation.

The default is CPU-sized (2,000 MNIST training images, a small network, a few minutes on one core).
The paper's setting (as in its code: 3 scales on MNIST, 4 on CIFAR-10, 2 blocks before and after
each squeeze, 64-channel concat conv nets, T = 1, batch 200, Adam 1e-3 with 1,000 warm-up steps,
1,000 epochs, adaptive dopri5 1e-5 with the adjoint for training) is one command on a GPU:

    python examples/images.py --dataset mnist --num-train 0 --num-test 0 --n-scales 3 --n-blocks 2 \\
        --hidden-channels 64,64,64 --batch-size 200 --lr 1e-3 --warmup 1000 --lr-decay none -n 300000 \\
        --fixed-T --train-method dopri5 --adjoint --kinetic 0 --jacobian 0 --num-samples 100 \\
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
from torch.distributions.transforms import AffineTransform, ReshapeTransform
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import pyro_ffjord as pf
from pyro_ffjord.datasets.images import IMAGE_DATASETS, load_image_dataset
from pyro_ffjord.solve import is_fixed_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.training import (  # noqa: E402
    CSVLog,
    Processes,
    TrainingGuard,
    add_common_args,
    add_evaluation_args,
    add_objective_args,
    compile_option,
    evaluation_solver,
    init_distributed,
    load_checkpoint,
    loop_state,
    non_negative_float,
    non_negative_int,
    parse_ints,
    positive_float,
    positive_int,
    resolve_device,
    write_json,
)


class ImageCNF(nn.Module):
    """One CNF over the whole image with a U-Net field, for flow matching; base to data: CNF, reshape, affine."""

    def __init__(self, cnf: pf.FFJORD, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cnf = cnf
        self.input_shape = shape
        self.transforms = [cnf, ReshapeTransform((cnf.flow.input_dim,), shape), AffineTransform(0.5, 0.5, event_dim=3)]

    @property
    def nfe(self) -> pf.NFE:
        return self.cnf.nfe


class FlowMatchingLoss(nn.Module):
    """:func:`pyro_ffjord.flow_matching_loss` on images in ``[-1, 1]`` as a module, so that DDP can wrap it."""

    def __init__(self, flow: ImageCNF, coupling: str) -> None:
        super().__init__()
        self.flow, self.coupling = flow, coupling

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loss = pf.flow_matching_loss(self.flow.cnf, 2 * x.flatten(1) - 1, coupling=self.coupling)
        return loss, loss.detach()


def build_flow(args: argparse.Namespace, shape: tuple[int, int, int]) -> pf.MultiscaleFFJORD | ImageCNF:
    if args.objective == "fm":
        net = pf.UNet(shape, args.unet_channels, time_frequencies=8)
        cnf = pf.FFJORD(net, math.prod(shape), rtol=args.tol, atol=args.tol, max_num_steps=args.max_num_steps)
        return ImageCNF(cnf, shape)
    regularization = {name: w for name, w in (("kinetic", args.kinetic), ("jacobian", args.jacobian)) if w > 0}
    try:
        fixed_grid = is_fixed_grid(args.train_method)
    except KeyError:
        raise ValueError(f"unknown --train-method {args.train_method!r}") from None
    return pf.MultiscaleFFJORD(
        shape,
        n_scales=args.n_scales,
        n_blocks=args.n_blocks,
        hidden_channels=args.hidden_channels,
        layer=args.layer,
        alpha=args.alpha,
        T=args.T,
        train_T=not args.fixed_T,
        method=args.train_method,
        options={"step_size": args.step_size} if fixed_grid else None,
        rtol=args.tol,
        atol=args.tol,
        adjoint=args.adjoint,
        max_num_steps=args.max_num_steps,
        regularization=regularization,
        compile=compile_option(args),
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


class NegativeELBO(nn.Module):
    """Pyro's ``Trace_ELBO`` loss of :func:`model` as a module, so that ``DistributedDataParallel`` can wrap it.

    Returns the loss per image plus the RNODE penalty, and the loss per image alone (detached), which
    with the empty guide is the mean negative log-likelihood.
    """

    def __init__(self, flow: pf.MultiscaleFFJORD) -> None:
        super().__init__()
        self.flow = flow
        self.elbo = Trace_ELBO()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        nll = self.elbo.differentiable_loss(model, guide, x, self.flow) / len(x)
        # read after the loss: Pyro scores the sample site once the model has run, with this step's solve
        return nll + self.flow.regularization_loss(), nll.detach()


def batch_seed(data_seed: int, step: int, procs: Processes) -> int:
    """One seed per (run, step, rank): the batch, its dequantization noise and the Hutchinson noise."""
    return (data_seed * 1_000_003 + step) * procs.world_size + procs.rank


def training_batch(train: Tensor, size: int, seed: int, device: torch.device) -> Tensor:
    """``size`` images drawn with replacement from ``train`` and dequantized, all from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    images = train[torch.randint(len(train), (size,), generator=g)]
    return pf.dequantize(images, generator=g).to(device)


@torch.no_grad()
def evaluate_bits_per_dim(flow: pf.MultiscaleFFJORD, test: Tensor, args, procs: Processes) -> tuple[float, float]:
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


def in_sync(module: nn.Module, procs: Processes) -> bool:
    """Whether every process holds exactly the same parameters."""
    if procs.world_size == 1:
        return True
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    low, high = flat.clone(), flat.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    return torch.equal(low, high)


def main(args: argparse.Namespace) -> dict:
    procs = init_distributed(resolve_device(args.device, args.threads), args.distributed)
    try:
        return run(args, procs)
    finally:
        if args.distributed:
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, procs: Processes) -> dict:
    device = procs.device
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    try:
        data = load_image_dataset(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    train = data.train[: args.num_train or None]
    test = data.test[: args.num_test or None]
    try:
        flow = build_flow(args, data.shape).to(device)
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
    pyro.module("flow", flow)
    start, saved, state = 0, None, loop_state()
    checkpoint = out / "checkpoint.pt"
    if args.resume:
        saved = load_checkpoint(checkpoint, scheduler, device)
        pyro.module("flow", flow, update_module_params=True)  # the module now holds the restored tensors
        start, state = saved["step"], saved["state"]
    params = list(flow.parameters())
    objective = FlowMatchingLoss(flow, args.coupling) if args.objective == "fm" else NegativeELBO(flow)
    if args.distributed:  # after the resume: DDP holds on to the parameter tensors it is given
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    log = None
    if procs.is_writer:
        fields = ["step", "loss", "bits_per_dim", "nfe_forward", "seconds"]
        log = CSVLog(out / "log.csv", fields, start if args.resume else None)

    def train_step(step: int, state: dict) -> float:
        seed = batch_seed(guard.data_seed, step, procs)
        x = training_batch(train, args.batch_size, seed, device)
        torch.manual_seed(seed)  # the Hutchinson noise of this step
        loss, nll = objective(x)
        loss.backward()  # under DDP, the gradients are averaged over the processes here
        scheduler(params)
        for p in params:
            p.grad = None
        state["losses"].append(loss.item() if args.objective == "fm" else pf.bits_per_dim(-nll, num_dims).item())
        scheduler.step()
        return loss.item()

    def report(step: int, loss: float, state: dict) -> None:
        bpd, nfe = state["losses"][-1], flow.nfe.forward
        if args.objective == "fm":  # the flow-matching loss is no likelihood: no bits/dim to show
            bpd = ""
            bar.set_postfix(loss=f"{loss:.3f}")
        else:
            bar.set_postfix(bpd=f"{bpd:.3f}", nfe=nfe)
        bar.update()
        if log is not None:
            seconds = round(state["seconds"], 2)
            log.write(step=step, loss=loss, bits_per_dim=bpd, nfe_forward=nfe, seconds=seconds)

    bar = tqdm(initial=start, total=args.num_steps, disable=args.no_progress or not procs.is_writer)
    guard = TrainingGuard(args, checkpoint, scheduler, flow, log=log, bar=bar, resumed=saved, writer=procs.is_writer)
    with guard:
        state = guard.run_steps(
            state, start, args.num_steps, train_step, report, lambda step: step % args.checkpoint_every == 0
        )
    bar.close()
    train_seconds = state["seconds"]

    with evaluation_solver(flow, args):
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
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.time() - eval_started, 1),
            "eval_divergence": args.eval_divergence,
            "eval_nfe": flow.nfe.forward,
            "objective": args.objective,
            "ranks_in_sync": in_sync(flow, procs),
        }
        if procs.is_writer:
            save_samples(Path(args.plot or out / f"{args.dataset}_samples.png"), flow, args, device)
    if procs.is_writer:
        write_json(out / "metrics.json", metrics)
        solver = f"{args.eval_divergence} trace, {args.eval_method} rtol {args.eval_rtol} atol {args.eval_atol}"
        print(f"{args.dataset}: test {bpd:.3f} ± {se:.3f} bits/dim on {len(test)} images ({solver})")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=IMAGE_DATASETS, default="mnist")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--num-train", type=non_negative_int, default=2000, help="training images (0: all)")
    parser.add_argument("--num-test", type=non_negative_int, default=500, help="test images (0: all)")
    add_common_args(parser, num_steps=200, out="outputs/images")
    parser.add_argument("--distributed", action="store_true", help="data parallel over the processes of torchrun")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step and process")
    parser.add_argument("--lr", type=positive_float, default=5e-3)
    parser.add_argument("--warmup", type=non_negative_int, default=20, help="linear learning-rate warm-up steps")
    parser.add_argument("--lr-decay", choices=["cosine", "none"], default="cosine", help="after the warm-up")
    add_objective_args(parser, default="ml", choices=("ml", "fm"))
    parser.add_argument(
        "--unet-channels", type=parse_ints, default=(32, 64, 64), help="U-Net channels per resolution (fm)"
    )
    parser.add_argument("--n-scales", type=positive_int, default=2)
    parser.add_argument("--n-blocks", type=positive_int, default=1, help="CNF blocks before and after each squeeze")
    parser.add_argument("--hidden-channels", type=parse_ints, default=(16, 16, 16))
    parser.add_argument("--layer", choices=["concat", "concatsquash"], default="concat")
    parser.add_argument("--alpha", type=positive_float, default=1e-6, help="logit pre-processing")
    parser.add_argument("--T", type=positive_float, default=1.0, help="initial integration time of each block")
    parser.add_argument("--fixed-T", action="store_true", help="do not learn T")
    parser.add_argument("--train-method", default="rk4", help="training solver: fixed grid (rk4...) or adaptive")
    parser.add_argument("--step-size", type=positive_float, default=0.5, help="step of a fixed-grid training solver")
    parser.add_argument("--tol", type=positive_float, default=1e-5, help="rtol=atol of an adaptive training solver")
    parser.add_argument("--adjoint", action="store_true", help="adjoint gradients (O(1) memory)")
    parser.add_argument("--kinetic", type=non_negative_float, default=0.01, help="RNODE kinetic-energy weight")
    parser.add_argument("--jacobian", type=non_negative_float, default=0.01, help="RNODE Jacobian-norm weight")
    add_evaluation_args(parser, tol=1e-5, max_steps=1000, divergence="hutchinson")
    parser.add_argument("--eval-batch-size", type=positive_int, default=250)
    parser.add_argument("--num-samples", type=positive_int, default=64, help="samples in the PNG grid")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
