"""The dynamics networks: forward-mode Jacobians against brute-force autograd, in float64."""

import itertools
import math

import pytest
import torch
from torch import nn

import pyro_ffjord as pf
from pyro_ffjord.dynamics import _evaluation
from pyro_ffjord.nets import ACTIVATIONS, LAYERS, time_features


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
@pytest.mark.parametrize("time_frequencies", [0, 3])
def test_forward_and_jacobian_matches_autograd(float64, layer, activation, context_dim, hidden_dims, time_frequencies):
    net = pf.ODENet(3, hidden_dims, context_dim, layer, activation, time_frequencies)
    t, z = torch.tensor(0.3), torch.randn(4, 3) * 2
    context = torch.randn(4, context_dim) if context_dim else None
    check_forward_and_jacobian(net, t, z, context)


def check_forward_and_jacobian(net, t, z, context):
    """Without tangents the result is the transposed Jacobian; with tangents (N, k, D), J v for each."""
    expected = autograd_jacobian(net, t, z, context)
    f, jacobian_t = net.forward_and_jacobian(t, z, context)
    assert torch.allclose(f, net(t, z, context))
    assert torch.allclose(jacobian_t, expected.transpose(1, 2), atol=1e-12)
    tangents = torch.randn(len(z), 2, z.shape[1])
    f, jvp = net.forward_and_jacobian(t, z, context, tangents=tangents)
    assert torch.allclose(jvp, torch.einsum("nij,nkj->nki", expected, tangents), atol=1e-12)


@pytest.mark.parametrize("layer, activation", list(itertools.product(LAYERS, ["tanh", "softplus"])))
def test_amortized_forward_and_jacobian_matches_autograd(float64, layer, activation):
    net = pf.AmortizedLowRankODENet(3, (5, 6), rank=2, layer=layer, activation=activation)
    check_forward_and_jacobian(net, torch.tensor(0.7), torch.randn(4, 3), torch.randn(4, net.context_dim))


class _OpaqueNet(nn.Module):
    """The same network without ``forward_and_jacobian``: the dynamics fall back to autograd VJPs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, z, context=None):
        return self.net(t, z, context)


@pytest.mark.parametrize("layer", LAYERS)
def test_time_folded_layer_equals_its_per_sample_form(float64, layer):
    """Without context a layer folds its time conditioning into one weight and bias per evaluation; the
    output and the pushed tangents equal the per-sample form's (the same layer given an empty context)."""
    module = LAYERS[layer](3, 4, context_dim=0, time_dim=5)
    t, x, tangents = time_features(torch.tensor(0.3), torch.tensor([1.0, 2.0])), torch.randn(5, 3), torch.randn(5, 2, 3)
    folded = module.forward_and_jvp(t, x, tangents)
    per_sample = module.conditioned(t, x, tangents, x.new_zeros(5, 0), jvp=True)
    for a, b in zip(folded, per_sample):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
@pytest.mark.parametrize(
    "context_dim, activation", [(2, "tanh"), (0, "tanh"), (0, "softplus"), (0, "elu"), (0, "silu")]
)
def test_divergence_and_its_gradients_agree_with_the_autograd_fallback(
    float64, divergence, grad, context_dim, activation
):
    """Forward-mode (JVP/Jacobian) and autograd (VJP) paths give the same dynamics and gradients.

    For Hutchinson, e^T (J e) and (e^T J) e are the same number; only the Jacobian-norm rows differ
    (J e versus e^T J, both unbiased for the Frobenius norm), so they are compared for the exact trace.
    """
    outputs = []
    for wrap in (False, True):
        torch.manual_seed(0)
        net = pf.ODENet(3, (8, 8), context_dim, activation=activation)
        z = torch.randn(5, 3, requires_grad=True)
        context = torch.randn(5, context_dim) if context_dim else None
        noise = torch.randn(5, 3) if divergence == "hutchinson" else None
        forward_and_jacobian = None if wrap else pf.ODENet.forward_and_jacobian
        evaluate = _evaluation(
            _OpaqueNet(net) if wrap else net, forward_and_jacobian, context, noise, False, True, True
        )
        with torch.set_grad_enabled(grad):
            f, div, rows = evaluate(torch.tensor(0.2), (z, None), None)
        norm = rows.pow(2).sum((0, 2)) if divergence == "exact" else torch.zeros(())
        result = [f, div, norm]
        if grad:
            inputs = [z, *net.parameters()]
            grads = torch.autograd.grad(div.sum() + norm.sum(), inputs, allow_unused=True)
            result += [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        outputs.append(result)
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, atol=1e-12)


def per_sample_nets():
    """Every net class and time-conditioning scheme, with the context it takes."""
    from pyro_ffjord.multiscale import CONV_LAYERS, ConvODENet

    for layer in LAYERS:
        for context_dim in (0, 2):
            yield f"ODENet-{layer}-{context_dim}", pf.ODENet(3, (5, 6), context_dim, layer), context_dim
            net = pf.ODENet(3, (5, 6), context_dim, layer, time_frequencies=4)
            yield f"ODENet-{layer}-{context_dim}-frequencies", net, context_dim
        net = pf.AmortizedLowRankODENet(3, (5,), rank=2, layer=layer, time_frequencies=2)
        yield f"Amortized-{layer}", net, net.context_dim
    for layer in CONV_LAYERS:
        yield f"ConvODENet-{layer}", ConvODENet((2, 3, 3), (4,), layer, "softplus"), 0


@pytest.mark.parametrize("name, net, context_dim", list(per_sample_nets()), ids=[n for n, _, _ in per_sample_nets()])
def test_per_sample_time_matches_per_sample_loop(float64, name, net, context_dim):
    """A time per sample gives, row by row, what one call per sample with a scalar time gives."""
    net = net.double()
    n, d = 4, net.input_dim
    t, z = torch.rand(n), torch.randn(n, d)
    context = torch.randn(n, context_dim) if context_dim else None
    ctx = () if context is None else (context,)
    tangents = torch.randn(n, 2, d)
    f = net(t, z, *ctx)
    f_jac, jacobian_t = net.forward_and_jacobian(t, z, *ctx)
    _, jvp = net.forward_and_jacobian(t, z, *ctx, tangents=tangents)
    for i in range(n):
        ctx_i = tuple(c[i : i + 1] for c in ctx)
        f_i = net(t[i], z[i : i + 1], *ctx_i)
        jf_i, jt_i = net.forward_and_jacobian(t[i], z[i : i + 1], *ctx_i)
        _, jvp_i = net.forward_and_jacobian(t[i], z[i : i + 1], *ctx_i, tangents=tangents[i : i + 1])
        torch.testing.assert_close(f[i], f_i[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f_jac[i], jf_i[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jacobian_t[i], jt_i[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jvp[i], jvp_i[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.rand(3), torch.rand(4, 1), torch.rand(2, 2)])
def test_time_of_wrong_shape_is_refused(bad):
    net = pf.ODENet(2, (4,))
    with pytest.raises(ValueError, match="t must have one element or the batch shape"):
        net(bad, torch.randn(4, 2))


def test_time_features_are_the_time_and_its_sinusoids(float64):
    net = pf.ODENet(2, (4,), layer="concat", time_frequencies=2)
    t = torch.tensor([0.0, 0.25])
    expected = torch.stack([t, torch.cos(math.pi * t), torch.cos(2 * math.pi * t), torch.sin(math.pi * t)], -1)
    expected = torch.cat([expected, torch.sin(2 * math.pi * t)[:, None]], -1)
    torch.testing.assert_close(time_features(t, net.frequencies), expected)
    torch.testing.assert_close(time_features(t[1], net.frequencies), expected[1])
