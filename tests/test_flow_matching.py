"""Flow matching: the loss against its closed-form optimum on Gaussian data, trained flows against brute force."""

import itertools
import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import pyro_ffjord as pf


class GaussianOptimalField(nn.Module):
    r"""The minimizer of the flow-matching loss for data :math:`\mathcal{N}(m, \Sigma)`, plus ``shift``.

    With :math:`a = 1 - s`, :math:`b = \sigma + (1 - \sigma) s`, :math:`x_s = a x + b \epsilon` is Gaussian with
    covariance :math:`C = a^2 \Sigma + b^2 I` and :math:`\operatorname{Cov}(u, x_s) = (1 - \sigma) b I - a \Sigma`,
    so :math:`E[u \mid x_s = z] = -m + \operatorname{Cov}(u, x_s) C^{-1} (z - a m)`, and :math:`f = E[u | z] / T`.
    """

    def __init__(self, mean, cov, T, sigma_min, shift=None):
        super().__init__()
        self.mean, self.cov, self.T, self.sigma = mean, cov, T, sigma_min
        self.shift = shift

    def forward(self, t, z):
        s = (t / self.T).expand(z.shape[:1]).reshape(-1, 1, 1)
        eye = torch.eye(len(self.mean), dtype=z.dtype)
        a, b = 1 - s, self.sigma + (1 - self.sigma) * s
        cov_x = a**2 * self.cov + b**2 * eye
        cov_ux = (1 - self.sigma) * b * eye - a * self.cov
        centred = (z - a.reshape(-1, 1) * self.mean).unsqueeze(-1)
        u = -self.mean + (cov_ux @ torch.linalg.solve(cov_x, centred)).squeeze(-1)
        f = u / self.T
        return f if self.shift is None else f + self.shift(z)


MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MEAN + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T


TIME_LAWS = ["uniform", "logit-normal", dist.Beta(torch.tensor(2.0).double(), torch.tensor(3.0).double())]


@pytest.mark.parametrize("time", TIME_LAWS, ids=["uniform", "logit-normal", "beta"])
@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_loss_is_lowest_at_the_closed_form_field(float64, sigma_min, T, time):
    """The minimizer is the closed-form field whatever the time law (the regression is pointwise in time)."""
    x = gaussian_data(20000)
    perturbations = [
        lambda z: torch.full_like(z, 0.05),
        lambda z: 0.05 * z.flip(-1),
        lambda z: -0.05 * torch.tanh(z),
    ]

    def loss(shift):
        torch.manual_seed(1)  # the same times and noise for every field: a paired comparison
        t = pf.FFJORD(GaussianOptimalField(MEAN, COV, T, sigma_min, shift), 2, T=T)
        return pf.flow_matching_loss(t, x, sigma_min=sigma_min, time=time).item()

    best = loss(None)
    for shift in perturbations:
        assert loss(shift) > best
        assert loss(lambda z, shift=shift: -shift(z)) > best


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("train_T", [False, True])
def test_flow_along_the_closed_form_field_has_the_gaussian_density(float64, sigma_min, train_T):
    """The optimal field carries N(m, Σ + σ² I) to N(0, I): log_prob is that Gaussian's log-density."""
    T = 0.7
    net = GaussianOptimalField(MEAN, COV, T, sigma_min)
    t = pf.FFJORD(net, 2, T=T, train_T=train_T, divergence="exact", rtol=1e-10, atol=1e-10, adjoint=False)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), [t])
    x = gaussian_data(50, seed=3) * 1.5
    expected = dist.MultivariateNormal(MEAN, COV + sigma_min**2 * torch.eye(2)).log_prob(x)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-7, atol=1e-7)


def test_trained_flow_log_prob_matches_brute_force_jacobian(float64):
    torch.manual_seed(0)
    t = pf.ffjord(2, hidden_dims=(16, 16), T=0.8, divergence="exact", rtol=1e-10, atol=1e-10, adjoint=False)
    t = t.double()
    optimizer = torch.optim.Adam(t.parameters(), lr=1e-2)
    x = gaussian_data(256)
    for _ in range(30):
        optimizer.zero_grad()
        pf.flow_matching_loss(t, x, coupling="ot").backward()
        optimizer.step()
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), [t])
    points = x[:5]
    with torch.no_grad():
        log_prob = flow.log_prob(points)

    def to_base(v):
        times = torch.tensor([0.0, 0.8], dtype=torch.float64)
        return odeint(lambda s, z: t.flow.net(s, z), v[None], times, rtol=1e-11, atol=1e-11)[-1, 0]

    for point, value in zip(points, log_prob):
        jacobian = torch.autograd.functional.jacobian(to_base, point)
        expected = dist.Normal(0.0, 1.0).log_prob(to_base(point)).sum() + torch.linalg.slogdet(jacobian)[1]
        torch.testing.assert_close(value, expected, rtol=1e-7, atol=1e-7)


def test_training_reaches_the_gaussian_density(float64):
    """A thousand flow-matching steps on Gaussian data get close to the true test NLL (no solve in training)."""
    torch.manual_seed(0)
    t = pf.ffjord(2, hidden_dims=(64, 64), activation="silu", divergence="exact", adjoint=False).double()
    optimizer = torch.optim.Adam(t.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1000)
    for step in range(1000):
        optimizer.zero_grad()
        pf.flow_matching_loss(t, gaussian_data(256, seed=step)).backward()
        optimizer.step()
        schedule.step()
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), [t])
    test = gaussian_data(2000, seed=10_000)
    with torch.no_grad():
        nll = -flow.log_prob(test).mean()
    true = -dist.MultivariateNormal(MEAN, COV).log_prob(test).mean()
    untrained = -dist.Normal(0.0, 1.0).log_prob(test).sum(-1).mean()
    assert abs(nll - true) < 0.03 < 1 < untrained - true


class _TimeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, t, z):
        self.times.append(t)
        return torch.zeros_like(z)


def test_times_follow_the_named_law(float64):
    """The net sees t = s T with s from the law: logit(s) standard normal, or a given distribution's draws."""
    net = _TimeRecorder()
    t = pf.FFJORD(net, 2, T=0.5)
    torch.manual_seed(0)
    pf.flow_matching_loss(t, torch.randn(20000, 2), time="logit-normal")
    logits = torch.logit(net.times[-1] / 0.5)
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
    pf.flow_matching_loss(t, torch.randn(1000, 2), time=dist.Uniform(0.2, 0.3))
    s = net.times[-1] / 0.5
    assert s.dtype == torch.float64 and 0.2 <= s.min() and s.max() <= 0.3 and s.std() > 0.02


@pytest.mark.parametrize("n", [1, 2, 6])
def test_ot_coupling_is_the_brute_force_optimal_permutation(float64, n):
    g = torch.Generator().manual_seed(n)
    x, noise = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    cost = torch.cdist(x, noise).pow(2)
    best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[i, j] for i, j in enumerate(p)))
    assert pf.ot_coupling(x, noise).tolist() == list(best)


def test_ot_coupling_shortens_the_pairs():
    x, noise = torch.randn(128, 4) + 3, torch.randn(128, 4)
    paired = noise[pf.ot_coupling(x, noise)]
    assert sorted(pf.ot_coupling(x, noise).tolist()) == list(range(128))
    assert (x - paired).pow(2).sum() < (x - noise).pow(2).sum()


def test_learned_T_gets_no_gradient_and_weights_do():
    t = pf.ffjord(2, hidden_dims=(8,), train_T=True)
    pf.flow_matching_loss(t, torch.randn(32, 2)).backward()
    assert t.flow.log_T.grad is None
    assert all(p.grad is not None for name, p in t.named_parameters() if name != "flow.log_T")


def test_conditional_and_amortized_flows_train_their_context_path():
    ct = pf.conditional_ffjord(2, 3, hidden_dims=(8,))
    context = torch.randn(16, 3, requires_grad=True)
    pf.flow_matching_loss(ct, torch.randn(16, 2), context).backward()
    assert context.grad is not None and all(p.grad is not None for p in ct.parameters())
    at = pf.amortized_ffjord(2, feature_dim=5, hidden_dims=(8,), rank=2)
    pf.flow_matching_loss(at, torch.randn(4, 16, 2), torch.randn(16, 5)).backward()  # context broadcasts
    assert at.amortizer.weight.grad is not None


def test_flow_matching_with_data_scaling_reports_data_units(float64):
    """The optimal CNF for whitened Gaussian rows, scored through the scaling transform: the Gaussian fit."""
    x = gaussian_data(5000)
    scaling = pf.standardization(x)
    field = GaussianOptimalField(torch.zeros(2), torch.eye(2), 1.0, 0.0)  # maps N(0, I) to itself
    cnf = pf.FFJORD(field, 2, divergence="exact", rtol=1e-10, atol=1e-10)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [cnf, scaling])
    fitted = dist.MultivariateNormal(x.mean(0), torch.cov(x.T))
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x[:20]), fitted.log_prob(x[:20]), rtol=1e-6, atol=1e-6)
    diagonal = pf.standardization(x, whiten=False)
    torch.testing.assert_close(diagonal.inv(x).std(0), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 3)), ValueError, r"x must have shape \(\.\.\., 2\)"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.tensor([[0.0, math.nan]])), ValueError, "x contains NaN"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.tensor([[0.0, math.inf]])), ValueError, "x contains NaN"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2).double()), TypeError, "x must have dtype"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.zeros(0, 2)), ValueError, "at least one sample"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), coupling="sinkhorn"), ValueError, "coupling must"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), sigma_min=-0.1), ValueError, "sigma_min must"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), sigma_min=1.0), ValueError, "sigma_min must"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), time="beta"), ValueError, "time must be one of"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), time=dist.Normal(0.5, 1.0)), ValueError, "time"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), time=dist.Uniform(0.0, 2.0)), ValueError, "time"),
        (lambda t, ct: pf.flow_matching_loss(t, torch.randn(4, 2), torch.randn(4, 3)), ValueError, "takes no context"),
        (lambda t, ct: pf.flow_matching_loss(ct, torch.randn(4, 2)), ValueError, "needs a context"),
        (lambda t, ct: pf.flow_matching_loss(ct, torch.randn(4, 2), torch.randn(3, 3)), ValueError, "broadcast"),
        (lambda t, ct: pf.flow_matching_loss(ct, torch.randn(4, 2), torch.randn(4, 2)), ValueError, "context must"),
        (
            lambda t, ct: pf.flow_matching_loss(ct, torch.randn(4, 2), torch.randn(4, 3), coupling="ot"),
            ValueError,
            "biases conditional densities",
        ),
        (
            lambda t, ct: pf.flow_matching_loss(pf.MultiscaleFFJORD((1, 4, 4), 1, 1, 4), torch.rand(2, 1, 4, 4)),
            TypeError,
            "multiscale or stacked flow",
        ),
        (lambda t, ct: pf.standardization(torch.randn(1, 2)), ValueError, "N >= 2"),
        (lambda t, ct: pf.standardization(torch.ones(5, 2)), ValueError, "singular covariance"),
        (lambda t, ct: pf.standardization(torch.ones(5, 2), whiten=False), ValueError, r"constant columns \[0, 1\]"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    t, ct = pf.ffjord(2, hidden_dims=(4,)), pf.conditional_ffjord(2, 3, hidden_dims=(4,))
    with pytest.raises(error, match=match):
        call(t, ct)
