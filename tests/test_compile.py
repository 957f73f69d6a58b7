"""``compile=``: the compiled dynamics give the eager log-densities and gradients, for every net with
``forward_and_jacobian``, with and without the adjoint; bad arguments fail clearly.

The default tests compile with torch's ``aot_eager`` backend, wrapped to count the calls of the
compiled graphs (so a silent fallback to eager code fails them): it traces the nets through dynamo and
AOTAutograd like inductor does, without generating C++; the slow tests use inductor itself.
"""

import copy
import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch.distributions import Distribution

import pyro_ffjord as pf
from pyro_ffjord import AutoFFJORD


class CountingBackend:
    """``aot_eager``, counting the calls of the graphs it compiled."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, graph, example_inputs):
        compiled = lookup_backend("aot_eager")(graph, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # same calling convention
        return run


@pytest.fixture
def backend():
    torch._dynamo.reset()  # no compiled code from other tests
    yield CountingBackend()
    torch._dynamo.reset()


_TRANSFORMS = (pf.FFJORD, pf.ConditionalFFJORD, pf.MultiscaleFFJORD)


def _evaluations(module) -> int:
    """Evaluations of the last solves of every CNF transform in ``module``."""
    return sum(sum(m.nfe) for m in module.modules() if isinstance(m, _TRANSFORMS))


def _solves(module) -> int:
    """CNF solves of the last call of every CNF transform in ``module`` (a lean solve compiles into one graph)."""
    return sum(len(m.solutions) for m in module.modules() if isinstance(m, (pf.FFJORD, pf.MultiscaleFFJORD)))


def _log_prob_and_grads(transform, x, *context):
    """log p(x) under a standard normal base and the gradients of its sum, with the noise seeded."""
    params = [p for p in transform.parameters() if p.requires_grad]
    conditioned = transform.condition(*context) if context else transform
    base = dist.Normal(torch.zeros(x.shape[1:]), 1.0).to_event(x.dim() - 1)
    torch.manual_seed(7)
    log_prob = dist.TransformedDistribution(base, [conditioned]).log_prob(x)
    return log_prob, torch.autograd.grad(log_prob.sum(), params)


def _twins(make, compile):
    """An eager transform and a compiled one with the same weights."""
    torch.manual_seed(0)
    eager = make()
    compiled = make(compile=compile)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _assert_same(eager, compiled, x, *context, backend=None):
    """Same log-densities, gradients and NFE; with a counting ``backend``, every evaluation ran compiled code."""
    log_prob, grads = _log_prob_and_grads(eager, x, *context)
    compiled_log_prob, compiled_grads = _log_prob_and_grads(compiled, x, *context)
    torch.testing.assert_close(compiled_log_prob, log_prob)
    for a, b in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b)
    assert _evaluations(compiled) == _evaluations(eager) > 0
    if backend is not None:
        assert backend.calls >= _evaluations(compiled)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_compiled_ffjord_matches_eager(float64, backend, adjoint, divergence):
    def make(**compile):
        return pf.ffjord(3, hidden_dims=(8, 8), divergence=divergence, adjoint=adjoint, train_T=True, **compile)

    _assert_same(*_twins(make, {"backend": backend}), torch.randn(6, 3), backend=backend)


@pytest.mark.parametrize("kind", ["conditional", "amortized"])
def test_compiled_conditional_flows_match_eager(float64, backend, kind):
    def make(**compile):
        if kind == "conditional":
            return pf.conditional_ffjord(3, 2, hidden_dims=(8,), regularization={"kinetic": 0.1}, **compile)
        return pf.amortized_ffjord(3, 2, hidden_dims=(8,), rank=2, **compile)

    _assert_same(*_twins(make, {"backend": backend}), torch.randn(6, 3), torch.randn(6, 2), backend=backend)


def test_compiled_multiscale_matches_eager(float64, backend):
    """Three scales: more compiled variants (weight shapes x grad modes) than torch's default limit of 8."""

    def make(**compile):
        return pf.MultiscaleFFJORD(
            (1, 8, 8), n_scales=3, n_blocks=1, hidden_channels=(4,), method="rk4", options={"step_size": 0.5}, **compile
        )

    eager, compiled = _twins(make, {"backend": backend})
    _assert_same(eager, compiled, torch.rand(3, 1, 8, 8), backend=backend)
    calls = backend.calls
    with (
        torch.no_grad(),
        pf.solver_settings(compiled, divergence="exact"),
        pf.solver_settings(eager, divergence="exact"),
    ):
        x = torch.rand(2, 1, 8, 8)
        torch.testing.assert_close(compiled.inv(x), eager.inv(x))
    assert backend.calls - calls >= _solves(compiled) == 5  # every lean rk4 solve compiled whole


def test_a_lean_solve_of_a_fixed_T_is_compiled_whole(float64, backend):
    """rk4 on a grid without the adjoint: every evaluation of a solve, and the solver's arithmetic, in one graph."""

    def make(**compile):
        return pf.ffjord(2, hidden_dims=(8,), method="rk4", options={"step_size": 0.25}, adjoint=False, **compile)

    eager, compiled = _twins(make, {"backend": backend})
    _assert_same(eager, compiled, torch.randn(5, 2))
    x = torch.randn(5, 2)
    calls = backend.calls
    torch.testing.assert_close(compiled.inv(x), eager.inv(x))
    assert backend.calls - calls == 1 and compiled.nfe.forward == 16


def test_compiled_evaluation_without_grad_and_new_batch_sizes(float64, backend):
    eager, compiled = _twins(lambda **c: pf.ffjord(2, hidden_dims=(8,), divergence="exact", **c), {"backend": backend})
    with torch.no_grad():
        for n in (5, 9, 2):
            x = torch.randn(n, 2)
            calls = backend.calls
            torch.testing.assert_close(compiled.inv(x), eager.inv(x))
            assert backend.calls - calls >= compiled.nfe.forward > 0


def test_copies_of_a_compiled_flow_run_their_own_weights(float64, backend):
    """A deep copy, and a whole-model torch.save/load after a solve: each copy compiles again, with a copy
    of the arguments (here its own counting backend), and runs its own weights."""
    t = pf.ffjord(2, hidden_dims=(8,), compile={"backend": backend})
    x = torch.randn(4, 2)
    y = t(x)  # compiles
    twin = copy.deepcopy(t)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(twin(x), y)
    torch.testing.assert_close(t(x.clone()), y)
    buffer = io.BytesIO()
    torch.save(twin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x.clone()), twin(x.clone()))
    for copied in (twin, loaded):
        assert copied.flow.compile_options["backend"].calls >= copied.nfe.forward > 0


def test_compile_arguments_are_checked():
    with pytest.raises(ValueError, match=r"compile has arguments that torch.compile does not take.*backnd"):
        pf.ffjord(2, hidden_dims=(8,), compile={"backnd": "eager"})
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        pf.ffjord(2, hidden_dims=(8,), compile="inductor")
    with pytest.raises(Exception, match="inductr"):  # torch's own error, at construction
        pf.ffjord(2, hidden_dims=(8,), compile={"backend": "inductr"})

    class Plain(nn.Module):
        def forward(self, t, z):
            return -z

    with pytest.raises(ValueError, match="compile needs a net class with a forward_and_jacobian method.*Plain has"):
        pf.FFJORD(Plain(), 2, compile=True)


def test_compile_false_runs_eagerly():
    t = pf.ffjord(2, hidden_dims=(8,), compile=False)
    t(torch.randn(3, 2))
    assert t.flow.compile_options is False and t.flow._compiled is None


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", [False, True])
def test_inductor_compiled_training_step_matches_eager(float64, adjoint):
    """The default backend (C++ code generated by inductor; needs a compiler on CPU)."""

    def make(**compile):
        return pf.ffjord(2, hidden_dims=(16, 16), adjoint=adjoint, **compile)

    _assert_same(*_twins(make, True), torch.randn(32, 2))


@pytest.mark.parametrize("adjoint", [False, True])
def test_autoffjord_with_compiled_dynamics_gives_the_eager_elbo_and_gradients(float64, backend, adjoint):
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    results = []
    for compile in (False, {"backend": backend}):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = AutoFFJORD(model, hidden_dims=(8,), adjoint=adjoint, compile=compile)
        calls = backend.calls
        loss = Trace_ELBO().differentiable_loss(model, guide)
        params = dict(guide.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        expected = _evaluations(guide) if adjoint else _solves(guide)  # rk4 without the adjoint: compiled whole
        assert (backend.calls - calls >= expected > 0) == bool(compile)
        results.append((loss, dict(zip(params, grads))))
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss)
    assert compiled_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name])


@pytest.mark.parametrize("validate", [True, False])
def test_compiling_keeps_the_distribution_validation_setting(backend, validate):
    """torch's first compilation in a process switches torch.distributions' validation off for good."""
    torch._dynamo.eval_frame.TorchPatcher.patch.cache_clear()  # make this the first compilation again
    old = Distribution._validate_args
    Distribution.set_default_validate_args(validate)
    try:
        pf.ffjord(2, hidden_dims=(8,), compile={"backend": backend})(torch.randn(3, 2))
        assert backend.calls > 0 and Distribution._validate_args is validate
    finally:
        Distribution.set_default_validate_args(old)
