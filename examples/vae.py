"""VAEs with amortized CNF posteriors: the FFJORD paper's VAE experiments, the Pyro way.

The model is ``z ~ N(0, I)``, ``x ~ p(x | z)`` (a gated-convolution decoder; Bernoulli pixels, or a
256-way categorical per pixel for Frey faces); the guide is ``z ~ q(z | x)``: a diagonal Gaussian from a
gated-convolution encoder pushed through CNF blocks amortized on the encoder's 256 features (the
architecture of the Sylvester-flows code that the paper followed). Posteriors (``--posterior``):

* ``ffjord``: per-data-point low-rank dynamics weights (``pf.amortized_ffjord``), the paper's model;
* ``ffjord-context``: dynamics conditioned on the features (``pf.conditional_ffjord``);
* ``iaf``: Pyro's conditional inverse autoregressive flow (``conditional_affine_autoregressive``);
* ``gaussian``: the plain diagonal Gaussian; ``all`` trains every one with the same budget.

Training is SVI (``Trace_ELBO``) with Adamax, a KL warm-up (``poutine.scale`` of the latent site in the
model and the guide by ``beta = min(1, epoch / warmup)``), a cheap fixed-grid solver with Hutchinson's
estimator, and early stopping on the validation -ELBO. The test -ELBO and the importance-sampled NLL
(``log p(x) ~ log mean_k p(x, z_k) / q(z_k | x)``, K samples) use an adaptive solver and the exact trace,
in nats (Frey: bits per dimension).

The defaults are CPU-sized (a subset of MNIST, narrow CNFs, a few epochs: minutes on 2 cores). The
paper's setting for a dataset (its CNF per dataset, full data, dopri5, 2000 epochs with warm-up 100 and
early stopping after 35, IS with 5000 samples) is

    python examples/vae.py --dataset mnist --paper --device cuda

    python examples/vae.py                                   # MNIST subset, amortized low-rank CNF
    python examples/vae.py --posterior all                   # the same budget for every posterior
    python examples/vae.py --dataset frey -n 20              # bits/dim on Frey faces
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor, nn
from tqdm import tqdm

import pyro_ffjord as pf
from pyro_ffjord.datasets.vae import VAEData, load_vae_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training  # noqa: E402
from common.training import int_list, non_negative_int, positive_float, positive_int  # noqa: E402

DATASETS = ("mnist", "omniglot", "caltech", "frey")
POSTERIORS = ("ffjord", "ffjord-context", "iaf", "gaussian")
FEATURES = 256  # width of the encoder's last gated convolution, the input of every amortizer


class CNFSettings(NamedTuple):
    """The paper's posterior CNF for a dataset: rank of the amortized weights, hidden widths, stacked blocks."""

    rank: int
    hidden_dims: tuple[int, ...]
    num_blocks: int


# FFJORD (Grathwohl et al., 2019), Sec. 4.2 and Appendix B.3: rank 64 on MNIST, 20 elsewhere; tanh.
PAPER_CNF = {
    "mnist": CNFSettings(64, (1024, 1024), 2),
    "omniglot": CNFSettings(20, (512, 512), 5),
    "frey": CNFSettings(20, (512, 512), 2),
    "caltech": CNFSettings(20, (2048,), 1),
}
PAPER_NEG_ELBO = {"mnist": 82.82, "omniglot": 98.33, "caltech": 104.03, "frey": 4.39}  # Table 3, FFJORD


class GatedConv2d(nn.Module):
    r"""Gated (transposed) convolution of the Sylvester-flows VAE: :math:`h = (W * x) \odot \sigma(V * x)`."""

    def __init__(self, c_in: int, c_out: int, kernel: Any, stride: int, padding: int, output_padding: int = -1):
        super().__init__()
        if output_padding < 0:
            self.h, self.g = (nn.Conv2d(c_in, c_out, kernel, stride, padding) for _ in range(2))
        else:
            self.h, self.g = (
                nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding) for _ in range(2)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class VAE(nn.Module):
    """Gated-convolution VAE (Sylvester flows, van den Berg et al., 2018) with a flow posterior.

    Args:
        data: the benchmark (its image shape and likelihood).
        z_dim: latent dimension.
        flows: conditional transforms of the posterior, conditioned on the encoder features.
    """

    def __init__(self, data: VAEData, z_dim: int, flows: list[nn.Module]) -> None:
        super().__init__()
        channels, height, width = data.input_shape
        self.input_shape = data.input_shape
        self.categorical = data.likelihood == "categorical256"
        self.z_dim = z_dim
        last = (7, 5) if width == 20 else 7
        self.encoder = nn.Sequential(
            GatedConv2d(channels, 32, 5, 1, 2),
            GatedConv2d(32, 32, 5, 2, 2),
            GatedConv2d(32, 64, 5, 1, 2),
            GatedConv2d(64, 64, 5, 2, 2),
            GatedConv2d(64, 64, 5, 1, 2),
            GatedConv2d(64, FEATURES, last, 1, 0),
            nn.Flatten(),
        )
        self.loc = nn.Linear(FEATURES, z_dim)
        # the encoder outputs a variance, clamped to [0.01, 7] for the categorical model as in Sylvester
        variance = [nn.Linear(FEATURES, z_dim), nn.Softplus()] + ([nn.Hardtanh(0.01, 7.0)] if self.categorical else [])
        self.variance = nn.Sequential(*variance)
        self.decoder = nn.Sequential(
            GatedConv2d(z_dim, 64, last, 1, 0, 0),
            GatedConv2d(64, 64, 5, 1, 2, 0),
            GatedConv2d(64, 32, 5, 2, 2, 1),
            GatedConv2d(32, 32, 5, 1, 2, 0),
            GatedConv2d(32, 32, 5, 2, 2, 1),
            GatedConv2d(32, 32, 5, 1, 2, 0),
        )
        if self.categorical:
            self.logits = nn.Sequential(nn.Conv2d(32, 256, 5, 1, 2), nn.Conv2d(256, channels * 256, 1))
        else:
            self.logits = nn.Conv2d(32, channels, 1)
        self.flows = nn.ModuleList(flows)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The base Gaussian's mean and standard deviation, and the features that condition the flows."""
        features = self.encoder(x / 255 if self.categorical else x)
        return self.loc(features), self.variance(features).sqrt(), features

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """:math:`q(z | x)`: the encoder's Gaussian pushed through the flows conditioned on its features."""
        loc, scale, features = self.encode(x)
        base = dist.Normal(loc, scale).to_event(1)
        if not self.flows:
            return base
        return dist.TransformedDistribution(base, [flow.condition(features) for flow in self.flows])

    def likelihood(self, z: Tensor) -> dist.TorchDistribution:
        """:math:`p(x | z)` for latents of any batch shape."""
        batch = z.shape[:-1]
        logits = self.logits(self.decoder(z.reshape(-1, self.z_dim, 1, 1)))
        if self.categorical:  # (M, 256 C, H, W) -> (..., C, H, W, 256)
            logits = logits.unflatten(1, (256, -1)).movedim(1, -1)
            return dist.Categorical(logits=logits.reshape(batch + logits.shape[1:])).to_event(3)
        return dist.Bernoulli(logits=logits.reshape(batch + logits.shape[1:])).to_event(3)

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("vae", self)
        prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0], dim=-1):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood(z), obs=x.long() if self.categorical else x)

    def guide(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            with poutine.scale(scale=beta):
                pyro.sample("z", self.posterior(x))

    def mean_image(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1]."""
        d = self.likelihood(z).base_dist
        if self.categorical:
            return (d.probs * torch.arange(256, device=z.device)).sum(-1) / 255
        return d.probs


def cnf_settings(args: argparse.Namespace) -> CNFSettings:
    """The paper's CNF for the dataset, with the flags' overrides and the CPU caps on width and rank."""
    paper = PAPER_CNF[args.dataset]
    hidden = args.hidden_dims or paper.hidden_dims
    if args.max_width:
        hidden = tuple(min(h, args.max_width) for h in hidden)
    rank = args.rank or paper.rank
    if args.max_rank:
        rank = min(rank, args.max_rank)
    return CNFSettings(rank, hidden, args.num_blocks or paper.num_blocks)


def build_flows(name: str, args: argparse.Namespace) -> list[nn.Module]:
    """The conditional transforms of the ``name`` posterior."""
    if name == "gaussian":
        return []
    if name == "iaf":
        hidden = [args.iaf_hidden, args.iaf_hidden]
        return [T.conditional_affine_autoregressive(args.z_dim, FEATURES, hidden) for _ in range(args.iaf_layers)]
    settings = cnf_settings(args)
    options = dict(
        T=args.T,
        train_T=args.train_T,
        noise=args.noise,
        layer=args.layer,
        activation=args.activation,
        **training.solver_options(args),
    )
    if name == "ffjord":
        make = partial(pf.amortized_ffjord, args.z_dim, FEATURES, settings.hidden_dims, settings.rank, **options)
    else:
        make = partial(pf.conditional_ffjord, args.z_dim, FEATURES, settings.hidden_dims, **options)
    return [make() for _ in range(settings.num_blocks)]


def log_weights(vae: VAE, x: Tensor, num_particles: int) -> Tensor:
    r"""Importance weights :math:`\log p(x, z_k) - \log q(z_k | x)`, :math:`z_k \sim q(z | x)`, shape ``(K, N)``.

    One vectorized pass: the guide and the replayed model run under a ``particles`` plate.
    """
    with pyro.plate("particles", num_particles, dim=-2):
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    return _log_prob(model, "x") + _log_prob(model, "z") - _log_prob(guide, "z")


def _log_prob(trace: poutine.Trace, name: str) -> Tensor:
    """Unscaled log-density of a sample site at its value, with its batch shape."""
    site = trace.nodes[name]
    return site["fn"].log_prob(site["value"])


@torch.no_grad()
def evaluate(vae: VAE, x: Tensor, num_samples: int, batch_size: int, chunk: int) -> dict[str, float]:
    """Mean -ELBO and importance-sampled NLL (K = ``num_samples``) in nats, with standard errors.

    Data points go ``batch_size`` at a time, and their K samples ``chunk // batch_size`` particles at a
    time, so that at most ``chunk`` latents are solved at once and memory stays bounded.
    """
    neg_elbo, nll = [], []
    for xb in x.split(batch_size):
        particles = max(1, chunk // len(xb))
        weights = torch.cat(
            [log_weights(vae, xb, min(particles, num_samples - k)) for k in range(0, num_samples, particles)]
        )
        neg_elbo.append(-weights.mean(0))
        nll.append(math.log(num_samples) - weights.logsumexp(0))
    neg_elbo, nll = torch.cat(neg_elbo), torch.cat(nll)
    se = math.sqrt(len(x))
    return {
        "neg_elbo": neg_elbo.mean().item(),
        "neg_elbo_se": (neg_elbo.std() / se).item() if len(x) > 1 else 0.0,
        "nll": nll.mean().item(),
        "nll_se": (nll.std() / se).item() if len(x) > 1 else 0.0,
    }


def in_paper_units(nats: float, vae: VAE) -> float:
    """Nats per image, or bits per dimension for the categorical (Frey faces) model."""
    return nats / (math.prod(vae.input_shape) * math.log(2)) if vae.categorical else nats


def subset(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` images drawn without replacement with a fixed seed (all if ``n <= 0``): the test file is sorted by
    digit, so its first images would not be a fair sample."""
    if n <= 0 or n >= len(x):
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def fit(name: str, data: VAEData, splits: dict[str, Tensor], args: argparse.Namespace, procs: training.Processes):
    """Trains one posterior with KL warm-up and early stopping, then evaluates its best parameters on the test set.

    Its checkpoint (written atomically each epoch) and log live in ``<out>`` or, for ``--posterior all``,
    in ``<out>/<name>``.
    """
    run_dir = Path(args.out) if args.posterior != "all" else Path(args.out) / name
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    try:
        vae = VAE(data, args.z_dim, build_flows(name, args)).to(procs.device)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: invalid {name} posterior settings: {e}") from None
    train, val, test = splits["train"], splits["val"], splits["test"]
    cnfs = [m for m in vae.flows if isinstance(m, pf.ConditionalFFJORD)]

    def test_metrics(num_samples: int) -> dict[str, float]:
        with training.evaluation_solver(vae, args) if cnfs else contextlib.nullcontext():
            return evaluate(vae, test, num_samples, args.eval_batch_size, args.is_chunk)

    optimizer, elbo = pyro.optim.Adamax({"lr": args.lr, "eps": 1e-7}), Trace_ELBO()
    # an epoch is one pass over the data by all the processes together
    steps_per_epoch = max(len(train) // (args.batch_size * procs.world_size), 1)
    num_steps = args.num_epochs * steps_per_epoch
    checkpoint = run_dir / "checkpoint.pt"
    pyro.module("vae", vae)
    resume = training.resuming(args, checkpoint, later_model=args.posterior == "all" and name != POSTERIORS[0])
    trainer = training.Trainer(checkpoint, vae, optimizer, training.early_stopping_state(vae), resume, procs.rank == 0)
    if not resume:  # the -ELBO of the initialization, the baseline any training must beat; kept in the checkpoints
        trainer.state["untrained_neg_elbo"] = test_metrics(1)["neg_elbo"]

    def beta_of(step: int) -> float:
        epoch = step // steps_per_epoch + 1
        return min(epoch / args.warmup, args.max_beta) if args.warmup > 0 else args.max_beta

    def train_step(step: int, state: dict[str, Any]) -> float:
        vae.train()
        batch = training.train_batches(len(train), args.batch_size, args.seed, step, procs)
        x = train[batch.to(procs.device)]
        if data.dynamic_binarization:
            x = torch.bernoulli(x)
        loss = training.svi_step(elbo, optimizer, vae.model, vae.guide, x, beta_of(step)) / len(x)
        if (step + 1) % steps_per_epoch == 0:  # end of an epoch: validation -ELBO (training solver)
            val_loss = evaluate(vae, val, 1, args.eval_batch_size, args.is_chunk)["neg_elbo"]
            # as in Sylvester, epochs of the KL warm-up do not count towards early stopping
            warm = beta_of(step) >= args.max_beta
            training.record_validation(state, (step + 1) // steps_per_epoch, val_loss, vae, args.patience, count=warm)
        return loss

    def report(step: int, loss: float, state: dict[str, Any]) -> None:
        nfe = sum(c.nfe.forward for c in cnfs)
        bar.set_postfix(neg_elbo=f"{loss:.2f}", best_val=f"{state['best_val']:.2f}", nfe=nfe)
        bar.update()
        epoch = step // steps_per_epoch + 1
        val = state["val"][-1][1] if state["val"] and (step + 1) % steps_per_epoch == 0 else ""
        row = {"step": step, "epoch": epoch, "beta": beta_of(step), "loss": loss, "val_neg_elbo": val, "nfe": nfe}
        state["log"].append({**row, "seconds": state["seconds"]})

    bar = tqdm(initial=trainer.start, total=num_steps, disable=args.no_progress or procs.rank > 0, desc=name)
    state = trainer.run(num_steps, train_step, report, lambda step: step % steps_per_epoch == 0)
    bar.close()
    if state["stopped"]:
        print(f"{name}: early stop after epoch {len(state['val'])}, best at epoch {state['best_at']}")

    vae.load_state_dict(state["best_module"])
    vae.eval()
    started = time.time()
    result = test_metrics(args.is_samples)
    metrics = {
        **{f"test_{k}": v for k, v in result.items()},
        "untrained_test_neg_elbo": state["untrained_neg_elbo"],
        "paper_units": "bits/dim" if vae.categorical else "nats",  # of the *_paper_units fields; the rest in nats
        "test_neg_elbo_paper_units": in_paper_units(result["neg_elbo"], vae),
        "test_nll_paper_units": in_paper_units(result["nll"], vae),
        "best_val_neg_elbo": state["best_val"],
        "best_epoch": state["best_at"],
        "epochs": len(state["val"]),
        "stopped_early": state["stopped"],
        "train_seconds": round(state["seconds"], 1),
        "eval_seconds": round(time.time() - started, 1),
        "num_params": sum(p.numel() for p in vae.parameters()),
        "ranks_in_sync": training.in_sync(vae),
    }
    return {"vae": vae, "losses": [row["loss"] for row in state["log"]], "val": state["val"], "metrics": metrics}


@torch.no_grad()
def plot(path: Path, data: VAEData, test: Tensor, results: dict[str, dict[str, Any]]) -> None:
    """Test images, then for each posterior its reconstructions, samples from the model and learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    def grid(images: Tensor) -> Any:
        return make_grid(images.float().cpu(), nrow=8, padding=1, pad_value=0.5).permute(1, 2, 0).numpy()

    x = test[:32]
    shown = x / 255 if data.likelihood == "categorical256" else x
    fig, axes = plt.subplots(len(results), 4, figsize=(16, 3.6 * len(results)), squeeze=False)
    generator = torch.Generator(device=test.device).manual_seed(0)
    for row, (name, r) in zip(axes, results.items()):
        vae, m = r["vae"], r["metrics"]
        z = vae.posterior(x).sample()
        prior = torch.randn(32, vae.z_dim, device=test.device, generator=generator)
        units = m["paper_units"]
        row[0].imshow(grid(shown))
        row[0].set_title(f"{data.name}: test images")
        row[1].imshow(grid(vae.mean_image(z)))
        row[1].set_title(f"{name}: reconstructions")
        row[2].imshow(grid(vae.mean_image(prior)))
        row[2].set_title(f"{name}: samples (decoder means)")
        for ax in row[:3]:
            ax.axis("off")
        scale = in_paper_units(1.0, vae)
        row[3].plot([loss * scale for loss in r["losses"]], lw=0.6, label="train (beta-weighted)")
        if r["val"]:
            steps = len(r["losses"]) / max(len(r["val"]), 1)
            epochs, values = zip(*r["val"])
            row[3].plot([e * steps for e in epochs], [v * scale for v in values], "o-", label="validation")
        row[3].set_xlabel("iteration")
        row[3].set_ylabel(f"-ELBO ({units})")
        row[3].set_title(f"test -ELBO {m['test_neg_elbo_paper_units']:.3f}, NLL {m['test_nll_paper_units']:.3f}")
        row[3].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_splits(args: argparse.Namespace, device: torch.device) -> tuple[VAEData, dict[str, Tensor]]:
    try:
        data = load_vae_dataset(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    return data, {split: subset(getattr(data, split), n).to(device) for split, n in sizes.items()}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the posterior(s), writes metrics.json and the plot, and prints the table in the paper's units."""
    with training.processes(args) as procs:
        return run(args, procs)


def run(args: argparse.Namespace, procs: training.Processes) -> dict[str, Any]:
    device = procs.device
    if args.is_samples is None:
        args.is_samples = 5000 if device.type == "cuda" else 5
    if args.is_chunk is None:  # the CPU's transposed convolutions need ~3 MB of buffers per image
        args.is_chunk = 5000 if device.type == "cuda" else 500
    data, splits = load_splits(args, device)
    print(
        f"{data.name}: {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} images "
        f"{data.input_shape}, {data.likelihood} likelihood; test NLL by importance sampling with K={args.is_samples}"
    )
    results = {}
    for name in POSTERIORS if args.posterior == "all" else (args.posterior,):
        try:
            results[name] = fit(name, data, splits, args, procs)
        except pf.ODESolveError as e:
            raise SystemExit(f"error: {name}: the ODE solve failed ({e}); try a smaller --lr or --eval-rtol") from None
    units = "bits/dim" if data.likelihood == "categorical256" else "nats"
    metrics = {
        "dataset": data.name,
        "paper_units": units,  # of paper_neg_elbo and the posteriors' *_paper_units fields
        "paper_neg_elbo": PAPER_NEG_ELBO[data.name],
        "num_train": len(splits["train"]),
        "num_val": len(splits["val"]),
        "num_test": len(splits["test"]),
        "is_samples": args.is_samples,
        "world_size": procs.world_size,
        "cnf": cnf_settings(args)._asdict(),
        "eval_solver": {"method": args.eval_method, "rtol": args.eval_rtol, "atol": args.eval_atol},
        "posteriors": {name: r["metrics"] for name, r in results.items()},
    }
    if procs.rank > 0:
        return metrics
    out = Path(args.out)
    training.write_json(out / "metrics.json", metrics)
    plot(Path(args.plot or out / f"vae_{data.name}.png"), data, splits["test"], results)
    print(f"\n{data.name}: test metrics in {units} (the paper's FFJORD -ELBO: {PAPER_NEG_ELBO[data.name]})")
    print(f"{'posterior':<16}{'-ELBO':>9}{'NLL':>9}{'untrained -ELBO':>17}{'epochs':>8}{'seconds':>9}")
    for name, m in metrics["posteriors"].items():
        vae = results[name]["vae"]
        print(
            f"{name:<16}{m['test_neg_elbo_paper_units']:>9.3f}{m['test_nll_paper_units']:>9.3f}"
            f"{in_paper_units(m['untrained_test_neg_elbo'], vae):>17.3f}{m['epochs']:>8}{m['train_seconds']:>9.1f}"
        )
    return metrics


# The paper's training setting: all data, its CNF (uncapped), dopri5 1e-5 with the adjoint, 2000 epochs,
# warm-up 100. --paper makes these the defaults, so flags given with it still win.
PAPER_SETTINGS = dict(
    num_train=0,
    num_val=0,
    num_test=0,
    max_width=0,
    max_rank=0,
    num_epochs=2000,
    warmup=100,
    patience=35,
    method="dopri5",
    rtol=1e-5,
    atol=1e-5,
    adjoint=True,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="mnist", help="dataset")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--num-train", type=non_negative_int, default=5000, help="training images used (0: all)")
    parser.add_argument("--num-val", type=non_negative_int, default=1000, help="validation images (0: all)")
    parser.add_argument("--num-test", type=non_negative_int, default=500, help="test images (0: all)")
    parser.add_argument("--posterior", choices=[*POSTERIORS, "all"], default="ffjord", help="posterior to train")
    parser.add_argument(
        "--paper", action="store_true", help="the paper's full setting as defaults (flags given with it win)"
    )
    training.add_common_args(parser, out="outputs/vae", num_steps=10, step_name="epochs")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per step and process")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="Adamax step size (the paper's)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="KL warm-up epochs (paper: 100; 0: none)")
    parser.add_argument("--max-beta", type=positive_float, default=1.0, help="KL weight after the warm-up")
    parser.add_argument("--patience", type=positive_int, default=35, help="epochs without improvement before stopping")
    parser.add_argument("--z-dim", type=positive_int, default=64, help="latent dimension")
    parser.add_argument(
        "--rank", type=positive_int, default=None, help="of the amortized weights (default: the paper's)"
    )
    parser.add_argument("--hidden-dims", type=int_list, default=None, help="CNF widths (default: the paper's)")
    parser.add_argument("--num-blocks", type=positive_int, default=None, help="stacked CNFs (default: the paper's)")
    parser.add_argument(
        "--max-width", type=non_negative_int, default=128, help="cap on the CNF widths (0: none, the paper)"
    )
    parser.add_argument("--max-rank", type=non_negative_int, default=8, help="cap on the rank (0: none, the paper)")
    parser.add_argument("--layer", default="concat", help="time conditioning of the CNF layers (the paper's)")
    parser.add_argument("--activation", default="tanh", help="of the CNF layers")
    parser.add_argument("--T", type=positive_float, default=0.5, help="integration time (the paper's)")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=False, help="learn T")
    parser.add_argument("--noise", choices=["rademacher", "gaussian"], default="rademacher", help="Hutchinson noise")
    training.add_solver_args(parser, method="rk4", step_size=0.25, tol=1e-5, max_steps=1000)
    parser.add_argument("--iaf-layers", type=positive_int, default=4, help="IAF baseline: flows (Sylvester's default)")
    parser.add_argument("--iaf-hidden", type=positive_int, default=320, help="IAF baseline: MADE width (Sylvester's)")
    parser.add_argument(
        "--is-samples", type=positive_int, default=None, help="K of the IS NLL (default: 5000 on GPU, 5 on CPU)"
    )
    parser.add_argument("--eval-batch-size", type=positive_int, default=100, help="test images per evaluation batch")
    parser.add_argument(
        "--is-chunk",
        type=positive_int,
        default=None,
        help="latents evaluated at once (default: 5000 on GPU, 500 on CPU)",
    )
    args = parser.parse_args(argv)
    if args.paper:
        parser.set_defaults(**PAPER_SETTINGS)
        args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    main(parse_args())
