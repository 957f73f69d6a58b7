"""Tests of examples/vae.py: every posterior trains under SVI, importance weights, the IS bound, resume, errors."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from test_examples import EXAMPLES, TINY
from test_examples import run as run_example

import pyro_ffjord as pf
from pyro_ffjord.datasets.vae import VAEData

_spec = importlib.util.spec_from_file_location("vae_example", EXAMPLES / "vae.py")
vae_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vae_example)

EXACT = dict(divergence="exact", method="dopri5", rtol=1e-7, atol=1e-7, options=None)


def tiny_args(**overrides):
    argv = ["--z-dim", "4", "--hidden-dims", "8", "--max-rank", "2", "--iaf-hidden", "16", "--iaf-layers", "1"]
    args = vae_example.parse_args(argv)
    vars(args).update(overrides)
    return args


def synthetic(dataset: str, n: int = 6) -> VAEData:
    """Random images in the layout of the real loaders: binary 28x28, or Frey's 28x20 integer pixels."""
    g = torch.Generator().manual_seed(0)
    if dataset == "frey":
        images = torch.randint(0, 256, (3 * n, 1, 28, 20), generator=g).to(torch.get_default_dtype())
        return VAEData(*images.split(n), name="frey", input_shape=(1, 28, 20), likelihood="categorical256")
    images = torch.randint(0, 2, (3 * n, 1, 28, 28), generator=g).to(torch.get_default_dtype())
    return VAEData(*images.split(n), name="mnist", input_shape=(1, 28, 28), likelihood="bernoulli")


def make_vae(posterior: str, dataset: str = "mnist", **overrides):
    args = tiny_args(**overrides)
    data = synthetic(dataset)
    return vae_example.VAE(data, args.z_dim, vae_example.build_flows(posterior, args)), data


@pytest.mark.parametrize("dataset", ["mnist", "frey"])
@pytest.mark.parametrize("posterior", vae_example.POSTERIORS)
def test_one_svi_step_updates_every_parameter(posterior, dataset):
    pyro.set_rng_seed(0)
    vae, data = make_vae(posterior, dataset)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adamax({"lr": 1e-2}), Trace_ELBO())
    loss = svi.step(data.train, 0.5)
    assert math.isfinite(loss)
    unchanged = [name for name, p in vae.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"no gradient reached {unchanged}"
    if posterior.startswith("ffjord"):
        assert any("amortizer" in name or "flows" in name for name in before)


def test_kl_warmup_scales_only_the_latent_terms():
    """The beta-weighted loss is -log p(x|z) + beta (log q(z|x) - log p(z)) for the sampled z."""
    vae, data = make_vae("gaussian")
    x = data.train

    def loss(beta: float) -> float:
        pyro.set_rng_seed(1)
        return Trace_ELBO().loss(vae.model, vae.guide, x, beta)

    low, mid, high = loss(0.25), loss(0.5), loss(0.75)
    pyro.set_rng_seed(1)
    z = pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
    kl = (vae.posterior(x).log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)).sum().item()
    assert mid == pytest.approx((low + high) / 2, rel=1e-6)
    assert (high - low) / 0.5 == pytest.approx(kl, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("posterior", ["ffjord", "gaussian"])
def test_log_weights_match_a_hand_computation(float64, posterior):
    vae, data = make_vae(posterior)
    x = data.test[:3]
    with pf.solver_settings(vae, **EXACT) if vae.flows else contextlib.nullcontext():
        pyro.set_rng_seed(2)
        weights = vae_example.log_weights(vae, x, 5)
        pyro.set_rng_seed(2)
        with pyro.plate("particles", 5, dim=-2):
            z = pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].detach().clone()
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        expected = vae.likelihood(z).log_prob(x) + prior - vae.posterior(x).log_prob(z)
    assert weights.shape == (5, 3)
    assert torch.allclose(weights, expected, atol=1e-5)


def test_importance_sampling_recovers_the_exact_likelihood(float64):
    """With a decoder that ignores z, p(x) is known in closed form and E_q[p(x, z) / q(z|x)] = p(x) for any q.

    The -ELBO is above -log p(x) by KL(q || prior) > 0, and the IS estimate with many samples is on -log p(x):
    this fails if the CNF's log-determinant had the wrong sign or scale.
    """
    pyro.set_rng_seed(3)
    vae, data = make_vae("ffjord")
    with torch.no_grad():
        vae.logits.weight.zero_()
        vae.logits.bias.fill_(-0.3)  # p(pixel = 1) = sigmoid(-0.3) for every pixel, whatever z is
        for layer in (vae.loc, vae.variance[0]):
            layer.weight.zero_()
        vae.loc.bias.fill_(0.2)
        vae.variance[0].bias.fill_(math.log(math.expm1(1.2)))  # base variance 1.2: q is wider than the prior
    x = data.test[:2]
    p = torch.sigmoid(torch.tensor(-0.3, dtype=torch.float64))
    exact = -(x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3)).mean().item()
    with pf.solver_settings(vae, **EXACT):
        m = vae_example.evaluate(vae, x, num_samples=1000, batch_size=2, chunk=500)
    assert m["neg_elbo"] > exact + 0.1  # the KL of a posterior that is not the prior
    assert m["nll"] == pytest.approx(exact, abs=0.05)  # about 3 standard errors of the IS estimate
    assert m["nll"] <= m["neg_elbo"]


def test_bits_per_dim_for_frey():
    vae, _ = make_vae("gaussian", "frey")
    assert vae_example.in_paper_units(560 * math.log(2), vae) == pytest.approx(1.0)


def test_resume_continues_the_run(tmp_path):
    args = [a for a in TINY["vae.py"] if a != "--no-progress"]
    n = args.index("-n")
    first = [*args[:n], "-n", "1", *args[n + 2 :], "--no-progress", "--out", str(tmp_path)]
    run_example("vae.py", first)
    run_example("vae.py", [*first[: first.index("-n") + 1], "2", *first[first.index("-n") + 2 :], "--resume"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["posterior"] == "ffjord" and metrics["epochs"] == 2
    with open(tmp_path / "log.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == list(range(4))  # 20 images in batches of 10: 2 steps per epoch


def test_missing_data_names_the_file(tmp_path):
    result = run_example("vae.py", [*TINY["vae.py"], "--data-dir", str(tmp_path), "--out", str(tmp_path)], ok=False)
    assert result.returncode == 1
    assert "binarized_mnist_train.mat" in result.stderr
