"""CNF guides against Pyro's autoguides: time per SVI step, and posterior quality at equal wall-clock.

Models (all latents unconstrained, so the guide's packed latent is the model's):

* ``conjugate``: a 2-D Gaussian mean with Gaussian observations; the posterior is known in closed form;
* ``banana``: :math:`z_1 \\sim N(0, 1)`, :math:`z_2 \\sim N(z_1^2 - 1, 0.5^2)`, normalized (log Z = 0);
* ``funnel``: Neal's 10-D funnel, :math:`y \\sim N(0, 3^2)`, :math:`x_{1..9} \\sim N(0, e^{y})`, normalized;
* ``logistic``: Bayesian logistic regression, 24 coefficients, 200 synthetic rows; its posterior moments come from
  a NUTS run (1,000 draws after 500 warm-up steps).

Contenders: ``ffjord`` (AutoFFJORD with its defaults), ``ffjord-adaptive`` (dopri5 with the adjoint at
rtol = atol = 1e-3, Hutchinson's trace: the settings of the FFJORD paper, loosened), ``iaf`` (AutoIAFNormal),
``mvn`` (AutoMultivariateNormal), ``spline`` (AutoNormalizingFlow with one spline coupling) and ``nsf`` (zuko's
neural spline flow through ``pyro.contrib.zuko``). Each runs in its own process on one CPU thread with Adam
(lr 0.01). Timing: median of ``--steps`` SVI steps after 5 warm-up steps, for 1 and 8 vectorized particles.
Quality: each guide trains for ``--budget`` seconds (8 particles); then the ELBO from 4,000 draws, and the
error of the posterior mean and covariance (largest entry, in posterior standard deviations for the mean);
for AutoFFJORD also ``logdet_error``, the largest gap between the log-determinant of a solve and that of the map
it computes (autograd Jacobian), and on ``banana`` the seconds of ``Predictive(..., num_samples=2000)``
(``--predictive``), parallel (median of 11 calls) and sequential (one call).

    python benchmarks/bench_svi.py                          # every model and contender
    python benchmarks/bench_svi.py --models conjugate --contenders ffjord,iaf --budget 10
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import spline_coupling
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoIAFNormal, AutoMultivariateNormal, AutoNormalizingFlow
from pyro.optim import Adam

import pyro_ffjord as pf

MODELS = ("conjugate", "banana", "funnel", "logistic")
CONTENDERS = ("ffjord", "ffjord-adaptive", "iaf", "mvn", "spline", "nsf")
NOISE_SCALE = 0.5  # of the conjugate model's observations


def conjugate(data: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(z, NOISE_SCALE).to_event(1), obs=data)


def banana(data: None) -> None:
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    pyro.sample("z2", dist.Normal(z1**2 - 1.0, 0.5))


def funnel(data: None) -> None:
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), torch.exp(y / 2).unsqueeze(-1)).to_event(1))


def logistic(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    features, labels = data
    w = pyro.sample("w", dist.Normal(torch.zeros(features.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(w * features).sum(-1)), obs=labels)  # w: (..., 1, 24)


def make_data(name: str) -> Any:
    """The model's data, drawn on the CPU (the same on every device), on the default device."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        generator = torch.Generator().manual_seed(0)
        if name == "conjugate":
            return (torch.tensor([1.0, -0.5]) + NOISE_SCALE * torch.randn(5, 2, generator=generator)).to(device)
        if name == "logistic":
            features = torch.randn(200, 24, generator=generator)
            labels = torch.bernoulli(
                torch.sigmoid(features @ torch.randn(24, generator=generator)), generator=generator
            )
            return features.to(device), labels.to(device)
    return None


def true_moments(name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and covariance of the packed latent: closed forms, or a NUTS run."""
    if name == "conjugate":
        precision = 1.0 + data.shape[0] / NOISE_SCALE**2
        return (data.sum(0) / NOISE_SCALE**2) / precision, torch.eye(2) / precision
    if name == "banana":  # z2 = z1^2 - 1 + e: Var z2 = Var(z1^2) + 0.25 = 2.25, Cov(z1, z2) = E z1^3 = 0
        return torch.zeros(2), torch.diag(torch.tensor([1.0, 2.25]))
    if name == "funnel":  # E e^y = e^{9/2}
        return torch.zeros(10), torch.diag(torch.tensor([9.0] + [math.exp(4.5)] * 9))
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(logistic), num_samples=1000, warmup_steps=500, disable_progbar=True)
    mcmc.run(data)
    w = mcmc.get_samples()["w"]
    return w.mean(0), w.T.cov()


class AutoZukoNSF(AutoContinuous):
    """zuko's neural spline flow as a posterior over the packed latent (``pyro.contrib.zuko``)."""

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        import zuko

        super()._setup_prototype(*args, **kwargs)
        self.flow = zuko.flows.NSF(self.latent_dim, transforms=2, hidden_features=(32, 32))

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        from pyro.contrib.zuko import ZukoToPyro

        return ZukoToPyro(self.flow())


def make_guide(contender: str, model: Callable, ffjord_options: dict[str, Any]) -> Any:
    if contender == "ffjord":
        return pf.AutoFFJORD(model, **ffjord_options)
    if contender == "ffjord-adaptive":
        return pf.AutoFFJORD(model, method="dopri5", rtol=1e-3, atol=1e-3, divergence="hutchinson", adjoint=True)
    if contender == "iaf":
        return AutoIAFNormal(model)
    if contender == "mvn":
        return AutoMultivariateNormal(model)
    if contender == "spline":
        return AutoNormalizingFlow(model, partial(spline_coupling, hidden_dims=[32, 32]))
    return AutoZukoNSF(model)


def fit(
    name: str, contender: str, particles: int, ffjord_options: dict[str, Any], *, steps: int = 0, budget: float = 0.0
) -> tuple[Any, list[float]]:
    """Trains a fresh guide for ``steps`` steps or ``budget`` seconds; returns it and the time of each step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, data = globals()[name], make_data(name)
    guide = make_guide(contender, model, ffjord_options)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, Adam({"lr": 0.01}), elbo)
    times: list[float] = []
    start = time.perf_counter()
    while (steps and len(times) < steps) or (budget and time.perf_counter() - start < budget):
        tic = time.perf_counter()
        svi.step(data)
        times.append(time.perf_counter() - tic)
    return guide, times


@torch.no_grad()
def quality(name: str, guide: Any, truth: tuple[torch.Tensor, torch.Tensor], draws: int = 4000) -> dict[str, float]:
    """ELBO (Pyro's ``Trace_ELBO`` over ``draws`` draws, in 8 batches for its standard error) and moment errors."""
    model, data = globals()[name], make_data(name)
    elbo = Trace_ELBO(num_particles=draws // 8, vectorize_particles=True, max_plate_nesting=1)
    batches = torch.tensor([-elbo.loss(model, guide, data) for _ in range(8)])
    latent = guide.get_posterior(data)((draws,))  # a Pyro distribution's call, which zuko's wrapper implements
    mean, cov = truth
    sd = cov.diagonal().sqrt()
    return {
        **({"logdet_error": logdet_error(guide)} if isinstance(guide, pf.AutoFFJORD) else {}),
        "elbo": float(batches.mean()),
        "elbo_se": float(batches.std() / math.sqrt(len(batches))),
        "mean_error_sd": float(((latent.mean(0) - mean).abs() / sd).max()),
        "cov_error": float((latent.T.cov() - cov).abs().max()),
        "sd_rel_error": float((latent.std(0) / sd - 1).abs().max()),
    }


def logdet_error(guide: pf.AutoFFJORD, draws: int = 100) -> float:
    """Largest gap between the log-determinant of a solve and that of the map the solve computes, by autograd.

    The guide's density is exact for the map it applies only if its integrated divergence is that map's
    log-determinant: the gap is what a fixed grid gets wrong.
    """
    transform = guide.get_posterior().transforms[0].parts[0]  # the first CNF block, as the guide trains it
    u = torch.randn(draws, guide.latent_dim)
    with torch.enable_grad():
        jacobians = torch.stack([torch.autograd.functional.jacobian(transform, ui.unsqueeze(0))[0, :, 0] for ui in u])
    with torch.no_grad():
        solver = transform.log_abs_det_jacobian(u, transform(u))
    return float((torch.linalg.slogdet(jacobians)[1] - solver).abs().max())


def run_one(
    task: tuple[str, str, float, int, dict[str, Any], int, str], truth: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, Any]:
    name, contender, budget, steps, ffjord_options, predictive_samples, device = task
    torch.set_num_threads(1)
    torch.set_default_device(device)  # the models', guides' and data's tensors
    truth = tuple(x.to(device) for x in truth) if truth is not None else None
    row: dict[str, Any] = {"model": name, "contender": contender}
    if contender == "ffjord" and ffjord_options:
        row["options"] = ffjord_options
    try:
        for particles in (1, 8):
            _, times = fit(name, contender, particles, ffjord_options, steps=steps + 5)
            row[f"ms_per_step_{particles}"] = 1e3 * statistics.median(times[5:])
        if budget <= 0:  # timing only
            return row
        guide, times = fit(name, contender, 8, ffjord_options, budget=budget)
        row["steps_in_budget"] = len(times)
        row.update(quality(name, guide, truth))
        if name == "banana":  # drawing from the fitted guide the usual Pyro ways (a model without plates, which
            # Predictive(parallel=True) needs when a site has an event shape)
            for parallel, calls in ((True, 11), (False, 1)):  # a parallel call takes milliseconds: the median of 11
                seconds = []
                for _ in range(calls):
                    tic = time.perf_counter()
                    Predictive(banana, guide=guide, num_samples=predictive_samples, parallel=parallel)(None)
                    seconds.append(time.perf_counter() - tic)
                row[f"predictive_{'parallel' if parallel else 'sequential'}_s"] = statistics.median(seconds)
    except Exception as error:  # a contender that cannot run this model is reported, not fatal
        row["error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def main(args: argparse.Namespace) -> None:
    rows = []
    for name in args.models.split(","):
        truth = true_moments(name, make_data(name)) if args.budget > 0 else None
        options = json.loads(args.ffjord)
        tasks = [
            (name, c, args.budget, args.steps, options, args.predictive, args.device)
            for c in args.contenders.split(",")
        ]
        # one process per contender: no state shared through Pyro's param store or torch's caches
        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            results = pool.starmap(run_one, [(task, truth) for task in tasks])
        reference = next((r for r in results if r["contender"] == "iaf" and "error" not in r), None)
        for row in results:
            if reference is not None and "error" not in row:
                for particles in (1, 8):
                    key = f"ms_per_step_{particles}"
                    row[f"ratio_to_iaf_{particles}"] = row[key] / reference[key]
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from %(default)s")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, from %(default)s")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds of training per guide (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=50, help="timed SVI steps (default: %(default)s)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="contenders run at once, one thread each (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the models and guides (default: %(default)s)")
    parser.add_argument("--predictive", type=int, default=2000, help="Predictive draws timed (default: %(default)s)")
    parser.add_argument("--ffjord", default="{}", help="AutoFFJORD options of the ffjord contender, as JSON")
    parser.add_argument("--out", default="", help="JSON file for the rows")
    main(parser.parse_args())
