"""The fixed-grid solve without torchdiffeq: the same arithmetic as torchdiffeq's, and the net's folded time terms."""

import pytest
import torch

import pyro_ffjord as pf


def _solve(t, x, reverse, grad):
    with torch.set_grad_enabled(grad):
        solution = t.flow(x, reverse=reverse)
    return solution.y, solution.logdet, 0.0 if solution.penalty is None else solution.penalty.mean()


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
    with torch.no_grad():
        nfe = [t.flow(x, reverse=reverse).nfe.forward for t in (lean, reference)]
    assert nfe[0] == nfe[1] == 3 * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    grads = []
    for t in (reference, lean):
        torch.manual_seed(2)  # the same Hutchinson noise
        grads.append(torch.autograd.grad(sum(o.sum() for o in _solve(t, x, reverse, True)), list(t.parameters())))
    for e, g in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_folded_time_terms_equal_per_time_terms():
    """``fold_time`` gives each layer's weight and bias at every time, as ``affine`` does one time at a time, for
    ``forward_and_jacobian`` and for ``forward`` (the solve of the states alone)."""
    torch.manual_seed(0)
    net = pf.ODENet(3, (8,), time_frequencies=3).double()
    times = torch.tensor([0.0, 0.3, 1.2], dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    for k, affines in enumerate(net.fold_time(times)):
        expected = net.forward_and_jacobian(times[k], z)
        got = net.forward_and_jacobian(times[k], z, affines=affines)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-14)
        torch.testing.assert_close(net(times[k], z, affines=affines), net(times[k], z), rtol=0, atol=1e-14)
    assert pf.ODENet(3, (8,), context_dim=2).fold_time(times) is None  # per-sample terms: nothing to fold


def _brute_force_logdet(flow, x, context, reverse):
    def solve(v, c):
        return flow(v.unsqueeze(0), None if c is None else c.unsqueeze(0), reverse=reverse)[0][0]

    rows = range(x.shape[0])
    jacobians = torch.stack([torch.func.jacrev(solve)(x[i], None if context is None else context[i]) for i in rows])
    return torch.linalg.slogdet(jacobians).logabsdet


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["ffjord", "train_T", "conditional", "amortized"])
def test_exact_logdet_is_the_numerical_maps(method, reverse, kind):
    """On a fixed grid the exact log-determinant is that of the map the solve computes, even on a coarse grid
    (one step over T = 2), where the integral of the trace is not."""
    torch.manual_seed(0)
    options = dict(method=method, options={"step_size": 2.0}, T=2.0, adjoint=False, divergence="exact")
    context = torch.randn(4, 3, dtype=torch.float64)
    if kind == "conditional":
        t = pf.conditional_ffjord(3, 3, (16, 16), **options).double()
    elif kind == "amortized":
        t = pf.amortized_ffjord(3, 3, (16, 16), rank=2, **options).double()
        context = t.amortizer.double()(context)
    else:
        t = pf.ffjord(3, (16, 16), train_T=kind == "train_T", **options).double()
        context = None
    x = torch.randn(4, 3, dtype=torch.float64)
    logdet = t.flow(x, context, reverse=reverse).logdet
    expected = _brute_force_logdet(t.flow, x, context, reverse)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-12)
    integral = pf.ffjord(3, (16, 16), **{**options, "options": {"step_size": 2.0, "perturb": False}}).double()
    if kind in ("ffjord", "train_T"):
        integral.load_state_dict(t.state_dict())
        assert (integral.flow(x, reverse=reverse)[1] - expected).abs().max() > 1e-6  # what the map's log-det fixes


def test_exact_logdet_keeps_the_penalties():
    """The RNODE terms of a map-Jacobian solve are those of the trace-integral solve on the same grid."""
    torch.manual_seed(0)
    options = dict(
        method="rk4", T=1.0, adjoint=False, divergence="exact", regularization={"kinetic": 1.0, "jacobian": 2.0}
    )
    lean = pf.ffjord(3, (8,), options={"step_size": 0.5}, **options).double()
    reference = pf.ffjord(3, (8,), options={"step_size": 0.5, "perturb": False}, **options).double()
    reference.load_state_dict(lean.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lean.flow(x).penalty, reference.flow(x).penalty, rtol=1e-12, atol=0)
