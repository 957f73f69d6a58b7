"""Every bad input gets a clear ValueError/TypeError naming the argument; solver faults raise ODESolveError."""

import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_ffjord as pf

FAST = dict(method="rk4", options={"step_size": 0.25})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(T=0.0), ValueError, "T must be"),
        (dict(T=-1.0), ValueError, "T must be"),
        (dict(T=float("inf")), ValueError, "T must be"),
        (dict(rtol=0.0), ValueError, "rtol"),
        (dict(atol=-1e-5), ValueError, "atol"),
        (dict(method="dopri6"), ValueError, "method must be one of"),
        (dict(divergence="trace"), ValueError, "divergence must be one of"),
        (dict(noise="uniform"), ValueError, "noise must be one of"),
        (dict(layer="hyper"), ValueError, "layer must be one of"),
        (dict(activation="sigmoidal"), ValueError, "activation must be one of"),
        (dict(hidden_dims=(8, 0)), ValueError, "hidden_dims"),
        (dict(max_num_steps=0), ValueError, "max_num_steps"),
        (dict(options={"stepsize": 0.1}), ValueError, "options has names"),
        (dict(options=[0.1]), TypeError, "options must be a dict"),
        (dict(method="rk4"), ValueError, "step_size"),
        (dict(method="euler", options={"step_size": -0.1}), ValueError, "step_size"),
        (dict(regularization={"kinetc": 0.1}), ValueError, "regularization has unknown"),
        (dict(regularization={"kinetic": -1.0}), ValueError, "regularization"),
        (dict(adjoint="yes"), TypeError, "adjoint must be a bool"),
        (dict(train_T=1), TypeError, "train_T must be a bool"),
        (dict(metod="rk4"), TypeError, "unknown FFJORD options"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        pf.ffjord(2, **kwargs)


def test_bad_dimensions():
    with pytest.raises(ValueError, match="input_dim"):
        pf.ffjord(0)
    with pytest.raises(ValueError, match="context_dim"):
        pf.conditional_ffjord(2, 0)
    with pytest.raises(TypeError, match="net must be"):
        pf.FFJORD(lambda t, z: z, 2)


@pytest.fixture
def transform():
    return pf.ffjord(3, hidden_dims=(8,), **FAST)


@pytest.mark.parametrize(
    "value,error,match",
    [
        (torch.randn(4, 2), ValueError, r"shape \(\.\.\., 3\)"),
        (torch.randn(()), ValueError, r"shape \(\.\.\., 3\)"),
        (torch.randn(4, 3).double(), TypeError, "dtype"),
        (torch.ones(4, 3, dtype=torch.long), TypeError, "dtype"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), ValueError, "NaN or inf"),
        ([[0.0, 1.0, 2.0]], TypeError, "must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_bad_values(transform, value, error, match, direction):
    call = transform if direction == "forward" else transform.inv
    with pytest.raises(error, match=match) as info:
        call(value)
    assert str(info.value).startswith("z" if direction == "forward" else "x")


@pytest.mark.parametrize(
    "value", [torch.randn(4, 2), torch.randn(4, 3).double(), torch.tensor([[0.0, float("nan"), 1.0]])]
)
def test_bad_log_prob_values(transform, value):
    """Through a distribution, Pyro's own checks or ours answer with a ValueError/TypeError."""
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [transform])
    with pytest.raises((ValueError, TypeError)):
        d.log_prob(value)


def test_bad_context():
    ct = pf.conditional_ffjord(3, 2, hidden_dims=(8,), **FAST)
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 2\)"):
        ct.condition(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context contains NaN"):
        ct.condition(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(TypeError, match="context must have dtype"):
        ct.condition(torch.randn(4, 2).double())
    with pytest.raises(ValueError, match="does not broadcast with the context"):
        ct.condition(torch.randn(4, 2))(torch.randn(5, 3))


class Explosive(nn.Module):
    """dz/dt = z^3 blows up in finite time from |z| > 1 when T is large."""

    def forward(self, t, z):
        return z.pow(3) * 50


def test_step_budget_raises():
    t = pf.FFJORD(Explosive(), 2, T=1.0, max_num_steps=20, rtol=1e-8, atol=1e-8)
    with pytest.raises(
        pf.ODESolveError, match=r"forward solve failed \(max_num_steps exceeded.*method='dopri5'.*T=1.*nfe="
    ):
        t.inv(torch.full((1, 2), 2.0))


def test_non_finite_dynamics_raise():
    t = pf.FFJORD(Explosive(), 2, T=1.0, method="euler", options={"step_size": 0.1})
    with pytest.raises(pf.ODESolveError, match="non-finite") as info:
        t.inv(torch.full((1, 2), 50.0))
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_budget_applies_to_adjoint_backward():
    t = pf.ffjord(2, hidden_dims=(8,), method="euler", options={"step_size": 0.25}, max_num_steps=4)
    x = torch.randn(3, 2)
    loss = t.log_abs_det_jacobian(t.inv(x), x).sum()
    assert t.nfe.forward == 4
    loss.backward()
    assert t.nfe.backward == 4


def test_value_on_another_device(transform):
    with pytest.raises(ValueError, match="z is on meta but the flow's parameters are on cpu"):
        transform(torch.empty(4, 3, device="meta"))
    with pytest.raises(ValueError, match="context is on meta"):
        pf.conditional_ffjord(3, 2, hidden_dims=(8,), **FAST).condition(torch.empty(4, 2, device="meta"))


_NET = pf.ODENet(2, (8,))
_CONTEXT_NET = pf.ODENet(2, (8,), context_dim=3)
_LOW_RANK = pf.AmortizedLowRankODENet(2, (8,), rank=2)


@pytest.mark.parametrize(
    "net, args, kwargs, error, match",
    [
        (_NET, (0.5, torch.randn(4, 2)), {}, TypeError, "t must be a torch.Tensor"),
        (_NET, (torch.tensor(0.5), torch.randn(4, 3)), {}, ValueError, r"z must be a tensor of shape \(\.\.\., 2\)"),
        (_NET, (torch.tensor(0.5), torch.randn(4, 2), torch.randn(4, 3)), {}, ValueError, "takes no context"),
        (_CONTEXT_NET, (torch.tensor(0.5), torch.randn(4, 2)), {}, ValueError, r"context must have shape \(4, 3\)"),
        (_LOW_RANK, (torch.tensor(0.5), torch.randn(4, 2), torch.randn(3, 50)), {}, ValueError, "context must"),
    ],
)
@pytest.mark.parametrize("method", ["forward", "forward_and_jacobian"])
def test_bad_net_calls(net, args, kwargs, error, match, method):
    with pytest.raises(error, match=match):
        getattr(net, method)(*args, **kwargs)


def test_bad_tangents():
    with pytest.raises(ValueError, match=r"tangents must have shape \(4, k, 2\)"):
        _NET.forward_and_jacobian(torch.tensor(0.5), torch.randn(4, 2), tangents=torch.randn(4, 2))


@pytest.mark.parametrize(
    "log_prob, error, match",
    [([1.0], TypeError, "log_prob must be a torch.Tensor"), (torch.tensor(float("nan")), ValueError, "NaN")],
)
def test_bad_bits_per_dim(log_prob, error, match):
    with pytest.raises(error, match=match):
        pf.bits_per_dim(log_prob, 784)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: pf.conditional_ffjord(2, "3"), "context_dim must be a positive integer, got '3'"),
        (lambda: pf.amortized_ffjord(2, 0), "feature_dim must be a positive integer, got 0"),
        (lambda: pf.ODENet(2, context_dim=-1), "context_dim must be a non-negative integer, got -1"),
        (lambda: pf.bits_per_dim(torch.zeros(1), 784, num_bins=1), "num_bins must be an integer >= 2, got 1"),
    ],
)
def test_integer_arguments_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_conditional_transforms_have_T():
    conditional = pf.conditional_ffjord(2, 3, T=0.5)
    amortized = pf.amortized_ffjord(2, 4, hidden_dims=(8,), T=0.25)
    assert conditional.T.item() == pytest.approx(0.5) == conditional.condition(torch.randn(1, 3)).T.item()
    assert amortized.T.item() == pytest.approx(0.25) == amortized.condition(torch.randn(1, 4)).T.item()


class Switch(nn.Module):
    """dz/dt = -z, which turns into a fast oscillation once ``wild`` is set: an easy forward solve whose adjoint
    backward solve cannot finish within the step budget."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(-1.0))
        self.wild = False

    def forward(self, t, z):
        return self.rate * z * (1 + torch.sin(1e4 * t) if self.wild else 1)


def test_budget_applies_to_adaptive_adjoint_backward():
    t = pf.FFJORD(Switch(), 2, divergence="exact", max_num_steps=20, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 2)
    loss = t.log_abs_det_jacobian(t.inv(x), x).sum()
    t.flow.net.wild = True
    with pytest.raises(pf.ODESolveError, match=r"adjoint backward solve exceeded its step budget \(122 evaluations\)"):
        loss.backward()
    assert t.nfe.backward == 123
