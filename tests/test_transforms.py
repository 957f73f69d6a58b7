"""Generic harness every CNF transform passes (after Pyro's tests/distributions/test_transforms.py)."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_ffjord as pf
from pyro_ffjord.dynamics import ContinuousFlow

TIGHT = dict(method="dopri5", rtol=1e-10, atol=1e-10)
FAST = dict(method="rk4", options={"step_size": 0.25})


def make(kind: str, **options):
    """A transform of each flavour on D=3, plus the context its conditioned form uses."""
    if kind == "conditioned":
        ct = pf.conditional_ffjord(3, 2, hidden_dims=(8, 8), **options)
        return ct.condition(torch.randn(2)), ct
    if kind == "amortized":
        at = pf.amortized_ffjord(3, 2, hidden_dims=(8, 8), rank=2, **options)
        return at.condition(torch.randn(2)), at
    layer = {"ffjord": "concatsquash", "concat": "concat", "ignore": "ignore", "squash": "squash"}[kind]
    t = pf.ffjord(3, hidden_dims=(8, 8), layer=layer, activation="softplus" if kind == "concat" else "tanh", **options)
    return t, t


KINDS = ["ffjord", "concat", "ignore", "squash", "conditioned", "amortized"]


def brute_force_log_abs_det(t, z):
    """log|det dx/dz| from the autograd Jacobian of the (uncached) solve, one sample at a time."""
    rows = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(lambda v: t._solve(v, "z", reverse=True)[0], zi)
        rows.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adjoint", [True, False])
def test_inverse(float64, kind, adjoint):
    t, _ = make(kind, adjoint=adjoint, **TIGHT)
    z = torch.randn(5, 3)
    x = t(z)
    assert x.shape == z.shape
    assert not torch.allclose(x, z)
    assert torch.allclose(t.inv(x.clone()), z, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_exact_matches_autograd_jacobian(float64, kind):
    t, _ = make(kind, divergence="exact", adjoint=False, **TIGHT)
    z = torch.randn(4, 3)
    x = t(z)
    expected = brute_force_log_abs_det(t, z)
    assert torch.allclose(t.log_abs_det_jacobian(z, x), expected, rtol=1e-7, atol=1e-8)
    # data -> base direction agrees too: log|det dz/dx| = -log|det dx/dz|
    x2 = x.detach().clone()
    t.inv(x2)
    assert torch.allclose(t.log_abs_det_jacobian(t.inv(x2), x2), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(float64, noise):
    exact, _ = make("ffjord", divergence="exact", **TIGHT)
    hutch = pf.ffjord(3, hidden_dims=(8, 8), divergence="hutchinson", noise=noise, **TIGHT)
    hutch.load_state_dict(exact.state_dict())
    x = torch.randn(1, 3).expand(2000, 3)  # every row draws its own noise
    with torch.no_grad():
        estimates = -hutch.log_abs_det_jacobian(hutch.inv(x), x)
        truth = -exact.log_abs_det_jacobian(exact.inv(x[:1]), x[:1])
    assert estimates.std() > 1e-4  # the estimator really is stochastic
    standard_error = estimates.std() / len(estimates) ** 0.5
    assert (estimates.mean() - truth).abs() < 3 * standard_error


def make_conditional(kind: str, input_dim: int, hidden_dims: tuple[int, ...], **options):
    """A conditional CNF with a 1-D context: plain context conditioning, or amortized low-rank weights."""
    if kind == "amortized":
        return pf.amortized_ffjord(input_dim, 1, hidden_dims=hidden_dims, rank=2, **options)
    return pf.conditional_ffjord(input_dim, 1, hidden_dims=hidden_dims, **options)


@pytest.mark.parametrize("kind", ["conditional", "amortized"])
def test_gradcheck(float64, kind):
    """Backprop-through-solver gradients w.r.t. input, context, weights and T vs finite differences."""
    ct = make_conditional(kind, 2, (4,), divergence="exact", train_T=True, adjoint=False, **TIGHT)
    names, params = zip(*ct.named_parameters())

    def f(x, context, *values):
        with torch.nn.utils.stateless._reparametrize_module(ct, dict(zip(names, values))):
            t = ct.condition(context)
            z = t.inv(x)
            return z, t.log_abs_det_jacobian(z, x)

    x = torch.randn(3, 2, requires_grad=True)
    context = torch.randn(3, 1, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, (x, context, *weights), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["conditional", "amortized"])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_gradients_match_backprop(float64, kind, divergence):
    """The adjoint ODE gives the same gradients (input, context, weights, T) as backprop."""
    ct = make_conditional(kind, 2, (4,), divergence=divergence, train_T=True, **TIGHT)
    grads = []
    for adjoint in (True, False):
        ct.flow.settings = ct.flow.settings.replace(adjoint=adjoint)
        ct.zero_grad()
        torch.manual_seed(3)  # same Hutchinson noise in both runs
        x = torch.randn(3, 2, requires_grad=True)
        context = torch.randn(3, 1, requires_grad=True)
        t = ct.condition(context)
        z = t.inv(x)
        (z.pow(2).sum() + t.log_abs_det_jacobian(z, x).sum()).backward()
        grads.append([x.grad, context.grad] + [p.grad for p in ct.parameters()])
    for adjoint_grad, backprop_grad in zip(*grads):
        assert adjoint_grad.abs().sum() > 0
        assert torch.allclose(adjoint_grad, backprop_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)])
def test_shapes(kind, sample_shape):
    t, _ = make(kind, **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    x = d.rsample(sample_shape)
    assert x.shape == sample_shape + (3,)
    assert d.log_prob(x).shape == sample_shape
    assert d.log_prob(torch.randn(sample_shape + (3,))).shape == sample_shape


@pytest.mark.parametrize("kind", ["ffjord", "conditioned"])
def test_empty_batch(kind):
    t, _ = make(kind, **FAST)
    z = torch.zeros(0, 3)
    x = t(z)
    assert x.shape == (0, 3) and t.inv(x).shape == (0, 3)
    assert t.log_abs_det_jacobian(z, x).shape == (0,)


def test_context_batch_broadcasts():
    ct = pf.conditional_ffjord(3, 2, hidden_dims=(8,), **FAST)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    d = dist.ConditionalTransformedDistribution(base, [ct]).condition(torch.randn(5, 2))
    assert d.rsample((7, 1)).shape == (7, 5, 3)
    assert d.log_prob(torch.randn(4, 1, 3)).shape == (4, 5)


class _SolveCounter:
    def __init__(self, monkeypatch):
        self.count = 0
        original = ContinuousFlow.forward

        def counted(flow, *args, **kwargs):
            self.count += 1
            return original(flow, *args, **kwargs)

        monkeypatch.setattr(ContinuousFlow, "forward", counted)


def test_one_solve_per_log_prob_and_per_sample_then_log_prob(monkeypatch):
    solves = _SolveCounter(monkeypatch)
    t, _ = make("ffjord", **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    d.log_prob(torch.randn(6, 3))
    assert solves.count == 1
    x = d.rsample((6,))
    d.log_prob(x)
    assert solves.count == 2


def fit_step(t, x):
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    loss = -d.log_prob(x).mean()
    optimizer = torch.optim.SGD(t.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return d


def test_cache_never_stale_after_update():
    t, _ = make("ffjord", divergence="exact", **FAST)
    x = torch.randn(6, 3)
    d = fit_step(t, x)
    fresh, _ = make("ffjord", divergence="exact", **FAST)
    fresh.load_state_dict(t.state_dict())
    reference = dist.TransformedDistribution(d.base_dist, [fresh]).log_prob(x)
    assert torch.allclose(d.log_prob(x), reference)


def test_cache_never_stale_after_deepcopy_and_state_dict():
    t, _ = make("ffjord", divergence="exact", **FAST)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    x = torch.randn(6, 3)
    before = dist.TransformedDistribution(base, [t]).log_prob(x)
    clone = copy.deepcopy(t)
    assert clone._record is None
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.3)
    changed = dist.TransformedDistribution(base, [clone]).log_prob(x)
    assert not torch.allclose(changed, before)
    t.load_state_dict(clone.state_dict())
    assert torch.allclose(dist.TransformedDistribution(base, [t]).log_prob(x), changed)


def test_cache_never_stale_after_in_place_change_of_the_input(monkeypatch):
    """A reused input buffer is solved again once its values change, inference tensors included."""
    t, _ = make("ffjord", divergence="exact", **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            x = torch.randn(6, 3)
            before = d.log_prob(x)
            solves = _SolveCounter(monkeypatch)
            assert torch.equal(d.log_prob(x), before) and solves.count == 0  # unchanged: cached
            x.mul_(3.0)
            assert torch.allclose(d.log_prob(x), d.log_prob(x.clone()))
            assert not torch.allclose(d.log_prob(x), before)


def test_conditional_flow_under_inference_mode(monkeypatch):
    ct = pf.conditional_ffjord(3, 2, hidden_dims=(8,), divergence="exact", **FAST)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    context, x = torch.randn(5, 2), torch.randn(5, 3)
    expected = dist.ConditionalTransformedDistribution(base, [ct]).condition(context).log_prob(x)
    with torch.inference_mode():
        d = dist.ConditionalTransformedDistribution(base, [ct]).condition(context.clone())
        solves = _SolveCounter(monkeypatch)
        log_p = d.log_prob(x.clone())
        assert solves.count == 1
    torch.testing.assert_close(log_p, expected.detach(), rtol=1e-4, atol=1e-4)


def test_no_grad_sampling_and_evaluation():
    t, _ = make("ffjord", **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    with torch.no_grad():
        x = d.sample((5,))
        log_p = d.log_prob(x)
    assert not log_p.requires_grad and torch.isfinite(log_p).all()
    # the same tensor, now with grad: must recompute with a graph, not answer from the no-grad cache
    assert d.log_prob(x).requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_samples_solve_the_states_alone_and_score_them_on_demand(float64, kind, monkeypatch):
    """Without gradients a sample solves the states only (no trace); asked for its log-determinant afterwards, the
    transform solves again with it, and both equal the solve with gradients (a fixed grid: the same map)."""
    t, _ = make(kind, divergence="exact", adjoint=False, **FAST)
    z = torch.randn(4, 3)
    x_grad = t(z)
    log_det_grad = t.log_abs_det_jacobian(z, x_grad)
    solves = _SolveCounter(monkeypatch)
    with torch.no_grad():
        z_sampled = z.clone()
        x = t(z_sampled)
        assert solves.count == 1 and t.solutions[0].logdet is None
        assert torch.allclose(x, x_grad, rtol=1e-12, atol=1e-12)
        log_det = t.log_abs_det_jacobian(z_sampled, x)
        assert solves.count == 2 and t.solutions[0].logdet is not None
        assert t.log_abs_det_jacobian(z_sampled, x) is log_det and solves.count == 2  # now cached
        assert t.inv(x) is z_sampled  # the record keeps the sample it handed out
    torch.testing.assert_close(log_det, log_det_grad.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, brute_force_log_abs_det(t, z), rtol=1e-7, atol=1e-8)


def test_no_grad_sample_then_log_prob_is_the_density_of_the_sample(float64):
    t, _ = make("ffjord", divergence="exact", adjoint=False, **TIGHT)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    with torch.no_grad():
        x = d.sample((5,))
        log_p = d.log_prob(x)
        assert t.solutions[0].logdet is not None
    fresh = dist.TransformedDistribution(d.base_dist, [copy.deepcopy(t)]).log_prob(x.clone())  # solved from x
    torch.testing.assert_close(log_p, fresh.detach(), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("adjoint", [True, False])
def test_train_T_learns(adjoint):
    t = pf.ffjord(3, hidden_dims=(8,), T=0.5, train_T=True, adjoint=adjoint, **FAST)
    before = t.T.item()
    fit_step(t, torch.randn(16, 3) * 3)
    assert t.flow.log_T.grad is not None and t.flow.log_T.grad.abs() > 0
    assert t.T.item() != pytest.approx(before)


def test_fixed_T_is_not_a_parameter():
    t = pf.ffjord(3, hidden_dims=(8,), T=0.5, **FAST)
    assert all("log_T" not in name for name, _ in t.named_parameters())
    assert t.T.item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "method,step_size,T,per_step", [("euler", 0.25, 1.0, 1), ("rk4", 0.25, 1.0, 4), ("rk4", 0.25, 0.5, 4)]
)
def test_nfe_counts_each_evaluation_once(method, step_size, T, per_step):
    t = pf.ffjord(3, hidden_dims=(8,), T=T, method=method, options={"step_size": step_size}, adjoint=True)
    steps = round(T / step_size)
    x = torch.randn(4, 3)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    loss = -d.log_prob(x).sum()
    assert t.nfe == pf.NFE(steps * per_step, 0)
    loss.backward()
    assert t.nfe == pf.NFE(steps * per_step, steps * per_step)


class Linear(nn.Module):
    """f(t, z) = A z: its flow, log-det and RNODE integrals are known in closed form."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T


def test_linear_dynamics_closed_form(float64):
    A = torch.tensor([[0.3, -0.5], [0.8, -0.2]])
    T = 0.7
    t = pf.FFJORD(Linear(A), 2, T=T, divergence="exact", regularization={"kinetic": 1.0, "jacobian": 1.0}, **TIGHT)
    z0 = torch.randn(3, 2)
    x = t.inv(z0)  # data -> base: z(T) = expm(A T) z(0)
    assert torch.allclose(x, z0 @ torch.linalg.matrix_exp(A * T).T, atol=1e-8)
    assert torch.allclose(t.log_abs_det_jacobian(x, z0), -torch.full((3,), T * A.trace().item()), atol=1e-8)
    # RNODE: int ||A z(t)||^2 dt by Simpson's rule on the exact trajectory, and int ||A||_F^2 dt
    grid = torch.linspace(0, T, 2001)
    speed = torch.stack([(z0 @ torch.linalg.matrix_exp(A * s).T @ A.T).pow(2).sum(-1) for s in grid])
    weights = torch.ones(2001)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    kinetic = (weights[:, None] * speed).sum(0) * (T / 2000) / 3
    expected = kinetic.mean() + T * A.pow(2).sum()
    assert torch.allclose(t.regularization_loss(), expected, rtol=1e-6)


def test_regularization_zero_when_off_and_trains_when_on():
    t = pf.ffjord(3, hidden_dims=(8,), **FAST)
    fit_step(t, torch.randn(4, 3))
    assert t.regularization_loss() == 0
    r = pf.ffjord(3, hidden_dims=(8,), regularization={"kinetic": 0.1}, **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [r])
    d.log_prob(torch.randn(4, 3))
    loss = r.regularization_loss()
    assert loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())


def test_regularizer_states_do_not_set_the_adaptive_step_size():
    """The RNODE integrals ride along in the state but stay out of the step-error norm: the solve takes
    the same steps with and without them (same weights, same noise), and its log-density is unchanged."""
    x = torch.randn(64, 2) * 2
    results = []
    for regularization in (None, {"kinetic": 1.0, "jacobian": 1.0}):
        torch.manual_seed(0)
        flow = pf.ffjord(2, hidden_dims=(32, 32), regularization=regularization, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            flow.flow.net.layers[0].linear.weight.mul_(3)  # stiffer dynamics: more steps
        torch.manual_seed(1)
        solution = flow.flow(x)
        results.append((solution.nfe.forward, solution.logdet))
    (nfe, logdet), (nfe_regularized, logdet_regularized) = results
    assert nfe > 8 and nfe_regularized == nfe
    assert torch.equal(logdet_regularized, logdet)


def test_pyro_module_registration_and_svi_density_fit():
    """Maximum likelihood through pyro.sample(obs=...) moves the flow towards the data."""
    t = pf.ffjord(2, hidden_dims=(16, 16), adjoint=False, **FAST)
    data = torch.randn(256, 2) * torch.tensor([0.3, 2.0]) + torch.tensor([1.0, -1.0])
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def model(x):
        pyro.module("flow", t)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.TransformedDistribution(base, [t]), obs=x)

    svi = pyro.infer.SVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.02}), pyro.infer.Trace_ELBO())
    first = svi.step(data)
    for _ in range(60):
        last = svi.step(data)
    assert "flow$$$flow.net.layers.0.linear.weight" in pyro.get_param_store()
    assert last < first - 0.3 * len(data)


@pytest.mark.parametrize("kind", ["conditional", "amortized"])
def test_amortized_conditional_guide_trains(kind):
    """z ~ N(0, 1), x ~ N(z, 0.5^2): the amortized CNF posterior learns q(z|x) = N(0.8 x, 0.2)."""
    ct = make_conditional(kind, 1, (16, 16), adjoint=False, **FAST)
    base = dist.Normal(torch.zeros(1), 1.0).to_event(1)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("cnf", ct)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.ConditionalTransformedDistribution(base, [ct]).condition(x))

    optimizer = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / 300)})  # decays to 0.002
    svi = pyro.infer.SVI(model, guide, optimizer, pyro.infer.Trace_ELBO())
    for _ in range(300):
        svi.step(torch.randn(64, 1) * 1.2)
    x = torch.tensor([[-1.0], [1.5]])
    with torch.no_grad():
        z = dist.ConditionalTransformedDistribution(base, [ct]).condition(x).sample((4000, 1))
    assert z.shape == (4000, 2, 1)
    assert torch.allclose(z.mean(0), 0.8 * x, atol=0.12)
    assert torch.allclose(z.var(0), torch.full((2, 1), 0.2), atol=0.06)


def test_solver_settings_switch_and_restore(monkeypatch):
    t, _ = make("ffjord", **FAST)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
    x = torch.randn(5, 3)
    with torch.no_grad():
        train_solver = d.log_prob(x)
        with pf.solver_settings(t, method="dopri5", options=None, divergence="exact", rtol=1e-7, atol=1e-7):
            solves = _SolveCounter(monkeypatch)
            exact = d.log_prob(x)  # same tensor, other settings: solved again, not answered from the cache
            assert solves.count == 1 and t.nfe.forward > 16
        with pytest.raises(RuntimeError, match="boom"), pf.solver_settings(t, divergence="exact"):
            raise RuntimeError("boom")
    assert (t.flow.settings.method, t.flow.settings.divergence, dict(t.flow.settings.options)) == (
        "rk4",
        "hutchinson",
        {"step_size": 0.25},
    )
    assert not torch.allclose(train_solver, exact)
    with pytest.raises(TypeError, match="unknown solver settings"), pf.solver_settings(t, T=2.0):
        pass
    with pytest.raises(ValueError, match="contains no CNF"), pf.solver_settings(nn.Linear(2, 2)):
        pass


def test_an_empty_context_batch_broadcasts_to_an_empty_result():
    """A context of batch (0,) and one unbatched value: the joint batch is empty, and so are the results."""
    t = pf.conditional_ffjord(2, 3, hidden_dims=(4,), **FAST).condition(torch.zeros(0, 3))
    z = torch.randn(2)
    assert t(z).shape == t.inv(z).shape == (0, 2)
    assert t.log_abs_det_jacobian(z, t(z)).shape == (0,)
