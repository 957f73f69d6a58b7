"""The fixed-grid solve without torchdiffeq: the same arithmetic as torchdiffeq's, and the net's folded time terms."""

import pytest
import torch

import pyro_ffjord as pf


def _solve(t, x, reverse, grad):
    with torch.set_grad_enabled(grad):
        y, logdet = t.flow(x, reverse=reverse)
    return y, logdet, t.flow.regularization_loss()


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("train_T", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layer", ["concatsquash", "concat", "squash", "ignore"])
def test_matches_torchdiffeq(method, train_T, reverse, layer):
    torch.manual_seed(0)
    options = dict(
        T=0.7, train_T=train_T, method=method, adjoint=False, regularization={"kinetic": 1.0, "jacobian": 1.0}
    )
    # T / step_size = 2.8: two full steps and a shorter last one
    lean = pf.ffjord(3, (8, 8), layer=layer, time_frequencies=2, options={"step_size": 0.25}, **options).double()
    # perturb=False is torchdiffeq's default: the same solve, but an option only torchdiffeq takes
    reference = pf.ffjord(
        3, (8, 8), layer=layer, time_frequencies=2, options={"step_size": 0.25, "perturb": False}, **options
    ).double()
    reference.load_state_dict(lean.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    for grad in (False, True):
        torch.manual_seed(1)
        expected = _solve(reference, x, reverse, grad)
        torch.manual_seed(1)
        got = _solve(lean, x, reverse, grad)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert lean.flow.nfe.forward == reference.flow.nfe.forward == 3 * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    grads = []
    for t in (reference, lean):
        torch.manual_seed(2)  # the same Hutchinson noise
        grads.append(torch.autograd.grad(sum(o.sum() for o in _solve(t, x, reverse, True)), list(t.parameters())))
    for e, g in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_folded_time_terms_equal_per_time_terms():
    """``fold_time`` gives each layer's weight and bias at every time, as ``affine`` does one time at a time."""
    torch.manual_seed(0)
    net = pf.ODENet(3, (8,), time_frequencies=3).double()
    times = torch.tensor([0.0, 0.3, 1.2], dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    for k, affines in enumerate(net.fold_time(times)):
        expected = net.forward_and_jacobian(times[k], z)
        got = net.forward_and_jacobian(times[k], z, affines=affines)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-14)
    assert pf.ODENet(3, (8,), context_dim=2).fold_time(times) is None  # per-sample terms: nothing to fold
