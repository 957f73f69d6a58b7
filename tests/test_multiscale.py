import math
from copy import deepcopy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

import pyro_ffjord as pf
from pyro_ffjord.dynamics import ContinuousFlow
from pyro_ffjord.multiscale import ConcatSquashConv2d, ConvODENet, LogitTransform, Squeeze

EXACT = dict(divergence="exact", adjoint=False, rtol=1e-9, atol=1e-9)
FAST = dict(method="rk4", options={"step_size": 0.5})


def multiscale(shape=(1, 4, 4), n_scales=2, layer="concat", **options):
    return pf.MultiscaleFFJORD(shape, n_scales=n_scales, n_blocks=1, hidden_channels=(8,), layer=layer, **options)


def images(*batch, shape=(1, 4, 4)):
    return torch.rand(*batch, *shape) * 0.98 + 0.01


def jacobian_logdet(fn, x):
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).flatten(), x.flatten())
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize(
    "shape,n_scales,out_shapes",
    [
        ((1, 4, 4), 1, [(1, 4, 4)]),
        ((1, 4, 4), 2, [(2, 2, 2), (2, 2, 2)]),
        ((3, 8, 8), 3, [(6, 4, 4), (12, 2, 2), (12, 2, 2)]),
    ],
)
def test_shapes_and_invertibility(float64, shape, n_scales, out_shapes):
    t = multiscale(shape, n_scales, **{**EXACT, "divergence": "hutchinson"})
    assert t.out_shapes == out_shapes
    assert len(t.flows) == 2 * n_scales - 1
    x = images(2, 3, shape=shape)
    z = t.inv(x)
    assert z.shape == x.shape
    assert torch.allclose(t(z.clone()), x, atol=1e-7)
    assert t.log_abs_det_jacobian(z, x).shape == (2, 3)


@pytest.mark.parametrize("layer", ["concat", "concatsquash"])
def test_logdet_matches_the_brute_force_jacobian(float64, layer):
    t = multiscale(layer=layer, **EXACT)
    x = images(1)
    z = t.inv(x)
    expected = jacobian_logdet(lambda v: t.inv(v), x)  # each call is a fresh tensor: a fresh solve
    assert torch.allclose(-t.log_abs_det_jacobian(z, x), expected, atol=1e-6)
    base = dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, [t])
    assert torch.allclose(d.log_prob(x), base.log_prob(z) - t.log_abs_det_jacobian(z, x))


def test_squeeze_is_a_permutation_with_zero_logdet(float64):
    s = Squeeze()
    x = torch.randn(2, 3, 4, 6)
    y = s(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(s.inv(y), x)
    assert torch.equal(y[0, 4 * 1 + 2 * 1 + 0, 1, 2], x[0, 1, 3, 4])  # channel 4c + 2i + j holds (2h + i, 2w + j)
    jac = torch.autograd.functional.jacobian(lambda v: s(v.reshape(1, 3, 4, 6)).flatten(), x[0].flatten())
    assert torch.equal(jac.sum(0), torch.ones(72)) and torch.equal(jac.sum(1), torch.ones(72))
    assert torch.equal(s.log_abs_det_jacobian(x, y), torch.zeros(2))
    with pytest.raises(ValueError, match="even"):
        s(torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_logdet_is_exact(float64, alpha):
    t = LogitTransform(alpha)
    x = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(16)]).reshape(2, 1, 3, 3)
    y = t(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(t.inv(y), x, atol=1e-9)
    for i in range(2):
        assert torch.allclose(t.log_abs_det_jacobian(x, y)[i], jacobian_logdet(t, x[i : i + 1]))
    extreme = t.inv(torch.tensor([-20.0, 20.0]).reshape(1, 1, 1, 2))  # just outside [0, 1]: still in the domain
    assert t.domain.check(extreme).all() and torch.isfinite(t(extreme)).all()


def test_bits_per_dim_of_a_known_distribution(float64):
    """Pixels drawn i.i.d. from a categorical P, scored by its piecewise-constant density: bits/dim = H(P)."""
    num_bins, num_dims = 4, 6
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    k = dist.Categorical(probs).sample((20000, num_dims))
    x = pf.dequantize(k, num_bins)
    assert torch.equal((x * num_bins).floor().long(), k)
    log_density = (probs.log()[k] + math.log(num_bins)).sum(-1)  # density P(k) * B on each bin
    entropy = -(probs * probs.log2()).sum()
    bpd = pf.bits_per_dim(log_density, num_dims, num_bins)
    assert abs(bpd.mean() - entropy) < 4 * bpd.std() / math.sqrt(len(bpd))
    assert torch.allclose(pf.bits_per_dim(torch.zeros(3), 784), torch.full((3,), 8.0))  # uniform on [0, 1)^D


def test_one_solve_per_block_and_no_stale_cache(monkeypatch):
    t = multiscale(**FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
    calls = []
    forward = ContinuousFlow.forward
    monkeypatch.setattr(ContinuousFlow, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    x = d.rsample((3,))
    d.log_prob(x)
    assert len(calls) == len(t.flows) == 3
    y = images(3)
    first = d.log_prob(y)
    assert torch.equal(d.log_prob(y), first) and len(calls) == 6
    with torch.no_grad():
        t.pre[0][0].net.layers[0].conv.bias.add_(1.0)
    assert not torch.equal(d.log_prob(y), first) and len(calls) == 9
    copy = deepcopy(t)
    assert copy._record is None
    dist.TransformedDistribution(d.base_dist, [copy]).log_prob(y)
    assert len(calls) == 12


def test_no_grad_samples_solve_the_states_alone(float64):
    """Image samples drawn without gradients skip every block's trace; their density, asked for later, is the
    density of the same images solved afresh."""
    t = multiscale(divergence="exact", adjoint=False, **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
    with torch.no_grad():
        x = d.sample((3,))
        assert all(solution.logdet is None for solution in t.solutions) and len(t.solutions) == len(t.flows)
        log_p = d.log_prob(x)
    torch.testing.assert_close(
        log_p, dist.TransformedDistribution(d.base_dist, [deepcopy(t)]).log_prob(x.clone()).detach()
    )


def test_solver_settings_and_regularization_reach_every_block():
    t = multiscale(**FAST, regularization={"kinetic": 0.1, "jacobian": 0.1})
    with pf.solver_settings(t, method="dopri5", options=None):
        assert all(f.settings.method == "dopri5" for f in t.flows)
    assert all(f.settings.method == "rk4" for f in t.flows)
    t.inv(images(2))
    assert t.regularization_loss() > 0
    assert t.nfe.forward == 3 * 8
    assert t.T.shape == (3,)
    assert t.flows == [t.pre[0][0], t.post[0][0], t.pre[1][0]]  # data to base


def test_svi_step_with_pyro_sample():
    t = multiscale(**FAST)
    data = images(4)

    def model(x):
        pyro.module("flow", t)
        base = dist.Normal(x.new_zeros(1, 4, 4), 1.0).to_event(3)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.TransformedDistribution(base, [t]), obs=x)

    before = [p.detach().clone() for p in t.parameters()]
    svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(data))
    assert all(not torch.equal(a, b) for a, b in zip(before, t.parameters()))


def test_bad_inputs_name_the_argument():
    t = multiscale(**FAST)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 1, 4, 4\)"):
        t.inv(torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="x contains NaN"):
        t.inv(torch.full((2, 1, 4, 4), math.nan))
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\]"):
        t.inv(torch.full((2, 1, 4, 4), 255.0))
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
    assert d.support.check(torch.rand(2, 1, 4, 4)).all() and not d.support.check(torch.full((1, 4, 4), -0.1))
    with pytest.raises(ValueError, match="support"):  # torch's validation of the observed value
        d.log_prob(torch.full((2, 1, 4, 4), -0.1))
    with pytest.raises(TypeError, match="z must have dtype"):
        t(torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        multiscale((1, 6, 6), n_scales=3)
    with pytest.raises(ValueError, match="n_blocks"):
        pf.MultiscaleFFJORD((1, 4, 4), n_blocks=0)
    with pytest.raises(ValueError, match="input_shape"):
        pf.MultiscaleFFJORD((4, 4))
    with pytest.raises(ValueError, match="layer"):
        ConvODENet((1, 4, 4), layer="squash")
    with pytest.raises(TypeError, match="unknown FFJORD options"):
        multiscale(step_size=0.1)
    with pytest.raises(ValueError, match="alpha"):
        multiscale(alpha=0.5)
    with pytest.raises(ValueError, match="images must hold integers"):
        pf.dequantize(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="num_dims"):
        pf.bits_per_dim(torch.zeros(2), 0)


def test_adjoint_gradients_match_backprop(float64):
    x = images(2)
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(0)
        t = multiscale(**{**EXACT, "adjoint": adjoint, "rtol": 1e-8, "atol": 1e-8})
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
        grads.append(torch.autograd.grad(d.log_prob(x).sum(), list(t.parameters())))
    for with_adjoint, with_backprop in zip(*grads):
        assert torch.allclose(with_adjoint, with_backprop, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    t = multiscale(**FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
    x = torch.rand(0, 1, 4, 4)  # (torch's support check of log_prob cannot reshape an empty batch)
    z = t.inv(x)
    assert z.shape == (0, 1, 4, 4) and t.log_abs_det_jacobian(z, x).shape == (0,)
    assert d.rsample((0,)).shape == (0, 1, 4, 4)


def test_conv_gate_folded_into_the_kernel_equals_the_formula(float64):
    """(W * x + b) sigmoid(a t + c) + d t, with the gate folded into the kernel and bias once per evaluation."""
    layer = ConcatSquashConv2d(2, 3)
    t, x, tangents = torch.tensor(0.3), torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    tt = t.reshape(1, 1)
    gate = torch.sigmoid(layer.gate(tt)).reshape(1, -1, 1, 1)
    out, jvp = layer.forward_and_jvp(t, x, tangents)
    assert torch.allclose(out, layer.conv(x) * gate + layer.shift(tt).reshape(1, -1, 1, 1), atol=1e-12)
    assert torch.allclose(jvp, F.conv2d(tangents, layer.conv.weight, padding=1) * gate, atol=1e-12)


@pytest.mark.parametrize("layer", ["concat", "concatsquash"])
@pytest.mark.parametrize("activation", ["softplus", "tanh"])
def test_conv_forward_and_jacobian_matches_autograd(float64, layer, activation):
    """Jacobian-vector products (and, on a tiny image, the whole Jacobian) of the conv dynamics."""
    net = ConvODENet((2, 4, 4), (5, 6), layer, activation)
    t, z = torch.tensor(0.4), torch.randn(3, 32)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], zi) for zi in z])
    f, jacobian_t = net.forward_and_jacobian(t, z)
    assert torch.allclose(f, net(t, z))
    assert torch.allclose(jacobian_t, expected.transpose(1, 2), atol=1e-12)
    tangents = torch.randn(3, 2, 32)
    _, jvp = net.forward_and_jacobian(t, z, tangents)
    assert torch.allclose(jvp, torch.einsum("nij,nkj->nki", expected, tangents), atol=1e-12)
