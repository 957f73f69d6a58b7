"""The dynamics networks: forward-mode Jacobians against brute-force autograd, in float64."""

import itertools

import pytest
import torch
from torch import nn

import pyro_ffjord as pf
from pyro_ffjord.dynamics import CNFDynamics
from pyro_ffjord.nets import ACTIVATIONS, LAYERS


def autograd_jacobian(net, t, z, context):
    """Per-sample Jacobians of ``net`` from ``torch.autograd.functional.jacobian``, shape (N, D, D)."""
    rows = []
    for i in range(len(z)):
        c = None if context is None else context[i : i + 1]
        rows.append(torch.autograd.functional.jacobian(lambda v, c=c: net(t, v[None], c)[0], z[i]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "layer, activation, context_dim, hidden_dims",
    list(itertools.product(LAYERS, ACTIVATIONS, [0, 2], [(), (5, 6)])),
)
def test_forward_and_jacobian_matches_autograd(float64, layer, activation, context_dim, hidden_dims):
    net = pf.ODENet(3, hidden_dims, context_dim, layer, activation)
    t, z = torch.tensor(0.3), torch.randn(4, 3) * 2
    context = torch.randn(4, context_dim) if context_dim else None
    f, jacobian = net.forward_and_jacobian(t, z, context)
    assert torch.allclose(f, net(t, z, context))
    assert torch.allclose(jacobian, autograd_jacobian(net, t, z, context), atol=1e-12)


@pytest.mark.parametrize("layer, activation", list(itertools.product(LAYERS, ["tanh", "softplus"])))
def test_amortized_forward_and_jacobian_matches_autograd(float64, layer, activation):
    net = pf.AmortizedLowRankODENet(3, (5, 6), rank=2, layer=layer, activation=activation)
    t, z, context = torch.tensor(0.7), torch.randn(4, 3), torch.randn(4, net.context_dim)
    f, jacobian = net.forward_and_jacobian(t, z, context)
    assert torch.allclose(f, net(t, z, context))
    assert torch.allclose(jacobian, autograd_jacobian(net, t, z, context), atol=1e-12)


class _OpaqueNet(nn.Module):
    """The same network without ``forward_and_jacobian``: the dynamics fall back to autograd VJPs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, z, context=None):
        return self.net(t, z, context)


@pytest.mark.parametrize("grad", [False, True])
def test_exact_divergence_and_its_gradients_agree_with_the_autograd_fallback(float64, grad):
    """Both exact-trace paths give the same dynamics (f, trace, Jacobian norm) and the same gradients."""
    outputs = []
    for wrap in (False, True):
        torch.manual_seed(0)
        net = pf.ODENet(3, (8, 8), 2)
        flow = pf.conditional_ffjord(3, 2, hidden_dims=(8, 8), divergence="exact").flow
        flow.net = _OpaqueNet(net) if wrap else net
        z, context = torch.randn(5, 3, requires_grad=True), torch.randn(5, 2)
        dynamics = CNFDynamics(flow, flow.T, False, context, None, regularize=True)
        with torch.set_grad_enabled(grad):
            f, div, kinetic, frobenius = dynamics(torch.tensor(0.2), (z, None))
        result = [f, div, frobenius]
        if grad:
            inputs = [z, *net.parameters()]
            grads = torch.autograd.grad(div.sum() + frobenius.sum(), inputs, allow_unused=True)
            result += [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        outputs.append(result)
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, atol=1e-12)
