"""VAEs with amortized CNF posteriors: the FFJORD paper's VAE experiments, the Pyro way.

The model is ``z ~ N(0, I)``, ``x ~ p(x | z)`` (a gated-convolution decoder; Bernoulli pixels, or a 256-way
categorical per pixel for Frey faces); the guide is ``z ~ q(z | x)``, the diagonal Gaussian of a gated-convolution
encoder pushed through CNF blocks amortized on its 256 features (the Sylvester-flows VAE the paper followed):
``--posterior ffjord``, per-data-point low-rank dynamics weights (``pf.amortized_ffjord``, the paper's);
``ffjord-context``, dynamics conditioned on the features (``pf.conditional_ffjord``); ``iaf``, Pyro's conditional
IAF; ``gaussian``, none. SVI (``Trace_ELBO``, Adamax) with a KL warm-up (``poutine.scale`` of the latent site by
``min(1, epoch / warmup)``) on a cheap fixed grid with Hutchinson's trace, early stopping on the validation
-ELBO; the test -ELBO and importance-sampled NLL (K samples) use an adaptive solver and the exact trace, in nats
(Frey: bits per dimension). The defaults are CPU-sized; the paper's setting is

    python examples/vae.py --dataset mnist --num-train 0 --num-val 0 --num-test 0 --max-width 0 --max-rank 0 \\
        -n 2000 --warmup 100 --method dopri5 --adjoint --device cuda

    python examples/vae.py                                   # 5,000 MNIST images, a few minutes on 2 cores
    python examples/vae.py --posterior iaf                   # Pyro's IAF with the same budget
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor, nn

import pyro_ffjord as pf
from pyro_ffjord.datasets.vae import VAEData, load_vae_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training  # noqa: E402
from common.training import int_list, non_negative_int, positive_float, positive_int  # noqa: E402

POSTERIORS = ("ffjord", "ffjord-context", "iaf", "gaussian")
FEATURES = 256  # width of the encoder's last gated convolution, the input of every amortizer
# FFJORD (Grathwohl et al., 2019), Sec. 4.2 and Appendix B.3: (rank, hidden widths, blocks); and its -ELBO, Table 3.
PAPER_CNF = {"mnist": (64, (1024,) * 2, 2), "omniglot": (20, (512,) * 2, 5), "frey": (20, (512,) * 2, 2)}
PAPER_CNF["caltech"] = (20, (2048,), 1)
PAPER_NEG_ELBO = {"mnist": 82.82, "omniglot": 98.33, "caltech": 104.03, "frey": 4.39}


class GatedConv2d(nn.Module):
    r"""Sylvester flows' gated convolution, transposed given an output padding: :math:`(W * x) \odot \sigma(V * x)`."""

    def __init__(self, c_in: int, c_out: int, kernel: Any, stride: int, padding: int, *output_padding: int) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if output_padding else nn.Conv2d
        self.h, self.g = (conv(c_in, c_out, kernel, stride, padding, *output_padding) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class VAE(nn.Module):
    """Gated-convolution VAE (Sylvester flows, van den Berg et al., 2018) whose posterior is the encoder's
    Gaussian pushed through ``flows``, conditional transforms conditioned on the encoder features."""

    def __init__(self, data: VAEData, z_dim: int, flows: list[nn.Module]) -> None:
        super().__init__()
        (channels, _, width), self.input_shape, self.z_dim = data.input_shape, data.input_shape, z_dim
        self.categorical, last = data.likelihood == "categorical256", (7, 5) if width == 20 else 7
        down = [(channels, 32, 5, 1, 2), (32, 32, 5, 2, 2), (32, 64, 5, 1, 2), (64, 64, 5, 2, 2), (64, 64, 5, 1, 2)]
        self.encoder = nn.Sequential(
            *(GatedConv2d(*a) for a in down), GatedConv2d(64, FEATURES, last, 1, 0), nn.Flatten()
        )
        self.loc = nn.Linear(FEATURES, z_dim)
        # the encoder outputs a variance, clamped to [0.01, 7] for the categorical model as in Sylvester
        clamp = [nn.Hardtanh(0.01, 7.0)] if self.categorical else []
        self.variance = nn.Sequential(nn.Linear(FEATURES, z_dim), nn.Softplus(), *clamp)
        up = [
            (64, 64, 5, 1, 2, 0),
            (64, 32, 5, 2, 2, 1),
            (32, 32, 5, 1, 2, 0),
            (32, 32, 5, 2, 2, 1),
            (32, 32, 5, 1, 2, 0),
        ]
        self.decoder = nn.Sequential(GatedConv2d(z_dim, 64, last, 1, 0, 0), *(GatedConv2d(*a) for a in up))
        if self.categorical:
            self.logits = nn.Sequential(nn.Conv2d(32, 256, 5, 1, 2), nn.Conv2d(256, channels * 256, 1))
        else:
            self.logits = nn.Conv2d(32, channels, 1)
        self.flows = nn.ModuleList(flows)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """:math:`q(z | x)`: the encoder's Gaussian pushed through the flows conditioned on its features."""
        features = self.encoder(x / 255 if self.categorical else x)
        base = dist.Normal(self.loc(features), self.variance(features).sqrt()).to_event(1)
        return dist.TransformedDistribution(base, [f.condition(features) for f in self.flows]) if self.flows else base

    def likelihood(self, z: Tensor) -> dist.TorchDistribution:
        """:math:`p(x | z)` for latents of any batch shape."""
        logits = self.logits(self.decoder(z.reshape(-1, self.z_dim, 1, 1)))
        if self.categorical:  # (M, 256 C, H, W) -> (..., C, H, W, 256)
            logits = logits.unflatten(1, (256, -1)).movedim(1, -1)
            return dist.Categorical(logits=logits.reshape(z.shape[:-1] + logits.shape[1:])).to_event(3)
        return dist.Bernoulli(logits=logits.reshape(z.shape[:-1] + logits.shape[1:])).to_event(3)

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", self.likelihood(z), obs=x.long() if self.categorical else x)

    def guide(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], dim=-1), poutine.scale(scale=beta):
            pyro.sample("z", self.posterior(x))

    def mean_image(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1]."""
        d = self.likelihood(z).base_dist
        return (d.probs * torch.arange(256, device=z.device)).sum(-1) / 255 if self.categorical else d.probs


def build_flows(name: str, args: argparse.Namespace) -> list[nn.Module]:
    """The conditional transforms of the ``name`` posterior: the paper's CNF for the dataset, with the flags'
    overrides and CPU caps on width and rank; Sylvester's IAF (4 flows, MADE of 320 units)."""
    if name == "gaussian":
        return []
    if name == "iaf":
        made = [args.iaf_hidden] * 2
        return [T.conditional_affine_autoregressive(args.z_dim, FEATURES, made) for _ in range(args.iaf_layers)]
    rank, hidden, blocks = PAPER_CNF[args.dataset]
    blocks = args.num_blocks or blocks
    hidden = tuple(min(h, args.max_width or h) for h in args.hidden_dims or hidden)
    rank = min(args.rank or rank, args.max_rank or math.inf)
    options = {"layer": "concat", **training.solver_options(args)}  # tanh
    if name == "ffjord":
        return [pf.amortized_ffjord(args.z_dim, FEATURES, hidden, rank, **options) for _ in range(blocks)]
    return [pf.conditional_ffjord(args.z_dim, FEATURES, hidden, **options) for _ in range(blocks)]


def log_weights(vae: VAE, x: Tensor, num_particles: int) -> Tensor:
    r"""Importance weights :math:`\log p(x, z_k) - \log q(z_k | x)`, :math:`z_k \sim q(z | x)`, shape ``(K, N)``:
    the guide and the replayed model run once, vectorized under a ``particles`` plate."""
    with pyro.plate("particles", num_particles, dim=-2):
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    log_p = [site["fn"].log_prob(site["value"]) for site in (model.nodes["x"], model.nodes["z"], guide.nodes["z"])]
    return log_p[0] + log_p[1] - log_p[2]


@torch.no_grad()
def evaluate(vae: VAE, x: Tensor, num_samples: int, batch_size: int, chunk: int) -> dict[str, float]:
    """Mean -ELBO and importance-sampled NLL (K = ``num_samples``) in nats, with standard errors; at most ``chunk``
    latents (``chunk // batch_size`` particles of ``batch_size`` images) are solved at once."""
    neg_elbo, nll = [], []
    for xb in x.split(batch_size):
        k = max(1, chunk // len(xb))
        weights = torch.cat([log_weights(vae, xb, min(k, num_samples - i)) for i in range(0, num_samples, k)])
        neg_elbo.append(-weights.mean(0))
        nll.append(math.log(num_samples) - weights.logsumexp(0))
    values = {"neg_elbo": torch.cat(neg_elbo), "nll": torch.cat(nll)}
    stats = {name: v.mean().item() for name, v in values.items()}
    return stats | {f"{name}_se": (v.std() / math.sqrt(len(x))).nan_to_num().item() for name, v in values.items()}


def subset(x: Tensor, n: int) -> Tensor:
    """``n`` images drawn with a fixed seed (all if ``n`` is 0): the test file is sorted by digit."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]] if 0 < n < len(x) else x


def in_paper_units(nats: float, vae: VAE) -> float:
    """Nats per image, or bits per dimension for the categorical (Frey faces) model."""
    return nats / (math.prod(vae.input_shape) * math.log(2)) if vae.categorical else nats


@torch.no_grad()
def plot(path: Path, vae: VAE, test: Tensor, state: dict, title: str) -> None:
    """Test images, their reconstructions, samples from the model (decoder means) and the learning curves."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to choose
    from torchvision.utils import make_grid

    x, generator = test[:32], torch.Generator(test.device).manual_seed(0)
    images = {"test images": x / 255 if vae.categorical else x}
    images["reconstructions"] = vae.mean_image(vae.posterior(x).sample())
    images["samples (decoder means)"] = vae.mean_image(torch.randn(32, vae.z_dim, device=x.device, generator=generator))
    fig = Figure(figsize=(16, 3.6))
    axes = fig.subplots(1, 4)
    for ax, (name, batch) in zip(axes, images.items()):
        ax.imshow(make_grid(batch.float().cpu(), nrow=8, padding=1, pad_value=0.5).permute(1, 2, 0).numpy())
        ax.set_title(name)
        ax.axis("off")
    steps_per_epoch = len(state["log"]) / max(len(state["val"]), 1)
    axes[3].plot([row["loss"] for row in state["log"]], lw=0.6, label="train (beta-weighted)")
    axes[3].plot([e * steps_per_epoch for e, _ in state["val"]], [v for _, v in state["val"]], "o-", label="validation")
    axes[3].set(xlabel="iteration", ylabel="-ELBO (nats)", title=title)
    axes[3].legend()
    training.save_figure(fig, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the posterior with KL warm-up and early stopping, evaluates its best parameters on the test set,
    and writes metrics.json and the plot."""
    with training.processes(args) as procs:
        cuda = procs.device.type == "cuda"  # the CPU's transposed convolutions need ~3 MB of buffers per image
        num_samples, chunk = args.is_samples or (5000 if cuda else 5), args.is_chunk or (5000 if cuda else 500)
        try:
            data = load_vae_dataset(args.dataset, args.data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
        train, val, test = (subset(getattr(data, split), n).to(procs.device) for split, n in sizes.items())
        print(f"{data.name}: {len(train)}/{len(val)}/{len(test)} images {data.input_shape}, {data.likelihood}")
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        try:
            vae = VAE(data, args.z_dim, build_flows(args.posterior, args)).to(procs.device)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: invalid {args.posterior} posterior settings: {e}") from None
        optimizer, elbo = pyro.optim.Adamax({"lr": args.lr, "eps": 1e-7}), Trace_ELBO()
        steps_per_epoch = max(len(train) // (args.batch_size * procs.world_size), 1)  # an epoch over all processes
        trainer = training.Trainer(args, vae, optimizer, procs)

        def train_step(step: int, state: dict[str, Any]) -> dict[str, Any]:
            """One SVI step; at the end of an epoch, the validation -ELBO (training solver)."""
            x = training.train_batch(train, args.batch_size, args.seed, step, procs)
            x = torch.bernoulli(x) if data.dynamic_binarization else x
            epoch, value = step // steps_per_epoch + 1, ""
            beta = min(epoch / args.warmup, 1.0) if args.warmup else 1.0
            loss = training.svi_step(elbo, optimizer, vae.model, vae.guide, x, beta) / len(x)
            if (step + 1) % steps_per_epoch == 0:  # epochs of the KL warm-up do not count towards early stopping
                value = evaluate(vae, val, 1, args.eval_batch_size, chunk)["neg_elbo"]
                training.record_validation(state, epoch, value, vae, args.patience, count=beta == 1.0)
            nfe = sum(m.nfe.forward for m in vae.flows if isinstance(m, pf.ConditionalFFJORD))
            return {"loss": loss, "epoch": epoch, "beta": beta, "val_neg_elbo": value, "nfe": nfe}

        state = trainer.run(train_step, args.num_epochs * steps_per_epoch, steps_per_epoch)
        vae.load_state_dict(state["best_module"])
        with training.evaluation_solver(vae, args):
            result = evaluate(vae, test, num_samples, args.eval_batch_size, chunk)
        metrics = {f"test_{k}": v for k, v in result.items()} | {
            "dataset": data.name,
            "posterior": args.posterior,
            "paper_units": "bits/dim" if vae.categorical else "nats",  # of the *_paper_units fields; the rest: nats
            "test_neg_elbo_paper_units": in_paper_units(result["neg_elbo"], vae),
            "test_nll_paper_units": in_paper_units(result["nll"], vae),
            "epochs": len(state["val"]),
            "train_seconds": round(state["seconds"], 1),
            "world_size": procs.world_size,
            "ranks_in_sync": training.in_sync(vae),
        }
        if procs.rank > 0:
            return metrics
    neg_elbo, nll, units = (metrics[k] for k in ("test_neg_elbo_paper_units", "test_nll_paper_units", "paper_units"))
    title = f"test -ELBO {neg_elbo:.3f}, NLL {nll:.3f} {units}"
    training.write_json(Path(args.out) / "metrics.json", metrics)
    plot(Path(args.plot or Path(args.out) / f"vae_{data.name}.png"), vae, test, state, f"{args.posterior}: {title}")
    print(f"{data.name}, {args.posterior}: {title} (K={num_samples}; paper's FFJORD -ELBO {PAPER_NEG_ELBO[data.name]})")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--dataset", choices=list(PAPER_CNF), default="mnist", help="dataset")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--num-train", type=non_negative_int, default=5000, help="training images used (0: all)")
    parser.add_argument("--num-val", type=non_negative_int, default=1000, help="validation images (0: all)")
    parser.add_argument("--num-test", type=non_negative_int, default=500, help="test images (0: all)")
    parser.add_argument("--posterior", choices=POSTERIORS, default="ffjord", help="posterior to train")
    training.add_common_args(parser, out="outputs/vae", num_steps=10, unit="epochs")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per step and process")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="Adamax step size (the paper's)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="KL warm-up epochs (paper: 100; 0: none)")
    parser.add_argument("--patience", type=positive_int, default=35, help="epochs without improvement to stop")
    parser.add_argument("--z-dim", type=positive_int, default=64, help="latent dimension")
    parser.add_argument("--rank", type=positive_int, help="of the amortized weights (default: the paper's)")
    parser.add_argument("--hidden-dims", type=int_list, help="CNF widths (default: the paper's)")
    parser.add_argument("--num-blocks", type=positive_int, help="stacked CNFs (default: the paper's)")
    parser.add_argument("--max-width", type=non_negative_int, default=128, help="cap on the CNF widths (0: none)")
    parser.add_argument("--max-rank", type=non_negative_int, default=8, help="cap on the rank (0: none)")
    parser.add_argument("--T", type=positive_float, default=0.5, help="integration time (the paper's)")
    parser.add_argument("--train-T", action=argparse.BooleanOptionalAction, default=False, help="learn T")
    training.add_solver_args(parser, method="rk4", step_size=0.25, tol=1e-5, max_steps=1000)
    parser.add_argument("--iaf-layers", type=positive_int, default=4, help="IAF flows (Sylvester's)")
    parser.add_argument("--iaf-hidden", type=positive_int, default=320, help="IAF's MADE width (Sylvester's)")
    parser.add_argument("--is-samples", type=positive_int, help="K of the IS NLL (default: 5000 on GPU, 5 on CPU)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=100, help="test images per batch")
    parser.add_argument("--is-chunk", type=positive_int, help="latents evaluated at once (default: GPU 5000, CPU 500)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
