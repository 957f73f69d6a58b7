"""Property-based tests: every public constructor and call either succeeds with finite outputs of the right
shape or raises a ValueError/TypeError naming the offending argument; never a hang, a NaN or a raw torch
RuntimeError. Cheap solver settings (euler, step 0.5) and tiny nets keep the file well under 30 s.

Known gaps of the package found by these properties are pinned as strict xfails at the end of the file.
"""

from __future__ import annotations

import math
from collections import Counter

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_ffjord as pf
from pyro_ffjord.settings import SETTINGS as SETTING_NAMES

CHEAP = dict(method="euler", options={"step_size": 0.5})
D, C = 2, 3
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CASES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(f"\nhypothesis cases tried: {sum(CASES.values())} {dict(CASES)}")


def answered(error: BaseException, *names: str) -> None:
    """``error`` is a ValueError/TypeError (not a raw torch RuntimeError) naming one of ``names``."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert not (isinstance(error, RuntimeError) and not isinstance(error, pf.ODESolveError)), error
    assert any(name in str(error) for name in names), f"{error!r} names none of {names}"


batch_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool])
poison = st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf])))


@st.composite
def values(draw, size: int = D, allow_empty: bool = True):
    """A tensor of random batch shape, dtype, event size and NaN/inf position; and whether it is valid."""
    batch = draw(batch_shapes)
    if not allow_empty:
        batch = tuple(max(b, 1) for b in batch)
    event = draw(st.one_of(st.just(size), st.integers(0, 4)))
    dtype = draw(dtypes)
    shape = (*batch, event) if draw(st.integers(0, 9)) else ()
    x = torch.randn(shape).clamp(-3, 3)
    bad = draw(poison)
    if bad is not None and x.numel():
        x.view(-1)[bad[0] % x.numel()] = bad[1]
    else:
        bad = None
    valid = dtype == torch.float32 and shape != () and event == size and bad is None
    return x.to(dtype), valid


def check_output(out: torch.Tensor, shape: tuple) -> None:
    assert tuple(out.shape) == tuple(shape)
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def flow():
    pyro.set_rng_seed(0)
    return pf.ffjord(D, hidden_dims=(4,), **CHEAP)


@pytest.fixture(scope="module")
def conditional():
    pyro.set_rng_seed(0)
    return pf.conditional_ffjord(D, C, hidden_dims=(4,), **CHEAP)


@SETTINGS
@given(value=values(), direction=st.sampled_from(["forward", "inverse"]))
def test_transform_calls(flow, value, direction):
    CASES["t(z)/t.inv(x)"] += 1
    x, valid = value
    call = flow if direction == "forward" else flow.inv
    try:
        out = call(x)
    except Exception as e:
        assert not valid, f"valid input rejected: {e}"
        answered(e, "z" if direction == "forward" else "x")
        return
    assert valid
    check_output(out, x.shape)


@SETTINGS
@given(value=values(allow_empty=False), sample_shape=batch_shapes)
def test_log_prob_and_rsample(flow, value, sample_shape):
    CASES["log_prob/rsample"] += 1
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [flow])
    check_output(d.rsample(sample_shape), (*sample_shape, D))
    x, valid = value
    try:
        lp = d.log_prob(x)
    except Exception as e:
        assert not valid, f"valid input rejected: {e}"
        answered(e, "x", "value")
        return
    assert valid
    check_output(lp, x.shape[:-1])


@SETTINGS
@given(context=values(size=C), value=values(), direction=st.sampled_from(["forward", "inverse"]))
def test_condition_and_conditioned_calls(conditional, context, value, direction):
    CASES["condition/t(z)/t.inv(x)"] += 1
    c, c_valid = context
    try:
        t = conditional.condition(c)
    except Exception as e:
        assert not c_valid, f"valid context rejected: {e}"
        answered(e, "context")
        return
    assert c_valid
    x, valid = value
    try:
        batch = torch.broadcast_shapes(x.shape[:-1], c.shape[:-1]) if x.dim() else None
    except RuntimeError:
        batch = None
    call = t if direction == "forward" else t.inv
    try:
        out = call(x)
    except Exception as e:
        assert not (valid and batch is not None), f"valid input rejected: {e}"
        answered(e, "z" if direction == "forward" else "x")
        return
    assert valid and batch is not None
    check_output(out, (*batch, D))


def _options(method: str) -> dict:
    return {} if method in ("dopri5", "bosh3") else {"options": {"step_size": 0.5}}


OPTION_VALUES = {
    "T": ([0.5, 1, 2.0], [0, -1.0, math.inf, math.nan, "1", True, None]),
    "train_T": ([True, False], [1, "yes", None]),
    "divergence": (["exact", "hutchinson"], ["trace", 1, None]),
    "noise": (["rademacher", "gaussian"], ["uniform", None, 0]),
    "method": (["euler", "rk4", "midpoint", "dopri5"], ["dopri6", "scipy_solver", 3, None]),
    "rtol": ([1e-3, 1], [0, -1.0, math.inf, math.nan, "a", True]),
    "atol": ([1e-3, 1], [0, -1e-5, math.inf, "a", None]),
    "options": (
        [{"step_size": 0.5}, {"step_size": 1}],
        [{"stepsize": 0.1}, [0.1], {"step_size": 0}, {"step_size": -1}],
    ),
    "adjoint": ([True, False], ["yes", 1, None]),
    "max_num_steps": ([1000, 50], [0, -1, 1.5, True, "10", None]),
    "regularization": ([None, {}, {"kinetic": 0.1}, {"jacobian": 0.0}], [{"kinetc": 1}, {"kinetic": -1}]),
    "metod": ([], ["rk4"]),
    "step_size": ([], [0.5]),
    "tol": ([], [1e-5]),
}
HELPER_VALUES = {
    "hidden_dims": ([(4,), (2, 2), ()], [(0,), (-1,), "8", (2.5,)]),
    "layer": (["concatsquash", "squash", "concat", "ignore"], ["hyper", None]),
    "activation": (["tanh", "softplus", "elu", "silu", "swish"], ["sigmoidal", None]),
}


@st.composite
def option_draws(draw, pools: dict):
    """A cheap valid option set with 1-2 options replaced by random valid or invalid values."""
    names = draw(st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=2, unique=True))
    kwargs, bad = dict(CHEAP), []
    for name in names:
        good, wrong = pools[name]
        if good and draw(st.booleans()):
            kwargs[name] = draw(st.sampled_from(good))
        else:
            kwargs[name] = draw(st.sampled_from(wrong))
            bad.append(name)
    if "method" in names and "options" not in names:
        kwargs.pop("options")
        kwargs.update(_options(kwargs["method"]) if isinstance(kwargs["method"], str) else {})
    if "options" in names and kwargs.get("method") == "dopri5":
        bad.append("options")
    return kwargs, bad


def constructed(build, kwargs: dict, bad: list, sample) -> None:
    """``build(**kwargs)`` fails naming a bad option iff there is one; built, it answers finite numbers."""
    try:
        module = build(**kwargs)
    except Exception as e:
        assert bad, f"valid options {kwargs} rejected: {e}"
        answered(e, *bad, "options" if "method" in bad else "method")
        return
    assert not bad, f"invalid {bad} accepted in {kwargs}"
    out = sample(module)
    assert torch.isfinite(out).all()


def _unconditional_sample(t) -> torch.Tensor:
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [t])
    x = torch.randn(3, D)
    return torch.cat([d.log_prob(x), d.rsample((2,)).flatten()])


def _conditional_sample(ct) -> torch.Tensor:
    d = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [ct])
    d = d.condition(torch.randn(3, C))
    return torch.cat([d.log_prob(torch.randn(3, D)), d.rsample().flatten()])


@SETTINGS
@given(draw=option_draws({**OPTION_VALUES, **HELPER_VALUES}), which=st.sampled_from(["ffjord", "conditional_ffjord"]))
def test_helper_constructors(draw, which):
    CASES["pf.ffjord/pf.conditional_ffjord"] += 1
    kwargs, bad = draw
    if which == "ffjord":
        constructed(lambda **kw: pf.ffjord(D, **kw), kwargs, bad, _unconditional_sample)
    else:
        constructed(lambda **kw: pf.conditional_ffjord(D, C, **kw), kwargs, bad, _conditional_sample)


@SETTINGS
@given(draw=option_draws(OPTION_VALUES), which=st.sampled_from(["FFJORD", "ConditionalFFJORD"]))
def test_class_constructors(draw, which):
    CASES["pf.FFJORD/pf.ConditionalFFJORD"] += 1
    kwargs, bad = draw
    if which == "FFJORD":
        constructed(lambda **kw: pf.FFJORD(pf.ODENet(D, (4,)), D, **kw), kwargs, bad, _unconditional_sample)
    else:
        build = lambda **kw: pf.ConditionalFFJORD(pf.ODENet(D, (4,), C), D, C, **kw)  # noqa: E731
        constructed(build, kwargs, bad, _conditional_sample)


def _guide_model():
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.LogNormal(torch.zeros(2), 1.0).to_event(1))


GUIDE_VALUES = {
    **OPTION_VALUES,
    **HELPER_VALUES,
    "num_transforms": ([1, 2], [0, -1, 1.5, True, "2"]),
    "init_scale": ([0.1, 1], [0, -1.0, math.inf, "1", True]),
    "prefix": (["q", None], ["", 3]),
}


@SETTINGS
@given(draw=option_draws(GUIDE_VALUES))
def test_autoffjord_constructor(draw):
    CASES["pf.AutoFFJORD"] += 1
    kwargs, bad = draw

    def sample(guide) -> torch.Tensor:
        values = guide()
        return torch.cat([values["a"].reshape(1), values["b"], guide.transform(torch.randn(2, 3)).flatten()])

    pyro.clear_param_store()
    constructed(lambda **kw: pf.AutoFFJORD(_guide_model, **kw), kwargs, bad, sample)


SETTING_VALUES = {name: OPTION_VALUES[name] for name in SETTING_NAMES}
SETTING_VALUES.update(T=([], [1.0]), train_T=([], [True]), regularization=([], [{}]), metod=([], ["rk4"]))


@SETTINGS
@given(draw=option_draws(SETTING_VALUES))
def test_solver_settings(flow, draw):
    CASES["pf.solver_settings"] += 1
    kwargs, bad = draw
    kwargs = {k: v for k, v in kwargs.items() if k not in CHEAP or k in ("method", "options")}
    if kwargs.get("method") == "dopri5" and "options" not in kwargs:
        kwargs["options"] = None  # the flow's step_size is no dopri5 option
    before = flow.flow.settings
    try:
        with pf.solver_settings(flow, **kwargs):
            assert not bad, f"invalid {bad} accepted in {kwargs}"
            out = _unconditional_sample(flow)
            assert torch.isfinite(out).all()
    except AssertionError:
        raise
    except Exception as e:
        assert bad, f"valid settings {kwargs} rejected: {e}"
        answered(e, *bad, "options" if "method" in bad else "method")
    assert flow.flow.settings is before, "the settings must be restored, also after an error"


# --- gaps the properties above found in the package, now closed -------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: pf.FFJORD(pf.ODENet(3, (4,)), 2, **CHEAP),
        lambda: pf.FFJORD(pf.ODENet(2, (4,), context_dim=3), 2, **CHEAP),
        lambda: pf.ConditionalFFJORD(pf.ODENet(2, (4,)), 2, 3, **CHEAP),
    ],
)
def test_net_of_the_wrong_size_is_rejected(build):
    with pytest.raises(ValueError, match="input_dim|context_dim"):
        build()


@pytest.mark.parametrize("input_dim", [0, "2", 2.0, True])
def test_ffjord_checks_input_dim(input_dim):
    with pytest.raises(ValueError, match="input_dim"):
        pf.FFJORD(torch.nn.Linear(2, 2), input_dim, **CHEAP)


def test_regularization_not_a_mapping():
    with pytest.raises(TypeError, match="regularization"):
        pf.ffjord(2, regularization=["kinetic"], **CHEAP)


def test_infinite_step_size_is_rejected():
    with pytest.raises(ValueError, match="step_size"):
        pf.ffjord(2, hidden_dims=(4,), method="euler", options={"step_size": math.inf})


def test_fixed_grid_that_needs_too_many_steps_raises():
    t = pf.ffjord(2, hidden_dims=(4,), T=1e30, **CHEAP)
    with pytest.raises(pf.ODESolveError, match="needs .* steps, more than its step budget.*T=1e\\+30"):
        t(torch.randn(3, 2))


def test_tiny_T_takes_one_step_and_is_nearly_the_identity():
    t = pf.ffjord(2, hidden_dims=(4,), T=1e-30, **CHEAP)
    z = torch.randn(3, 2)
    assert torch.allclose(t(z), z) and t.nfe.forward == 1


def test_hidden_dims_none():
    with pytest.raises(TypeError, match="hidden_dims"):
        pf.ffjord(2, hidden_dims=None, **CHEAP)


def test_solver_settings_on_a_non_module():
    with pytest.raises(TypeError, match="module must be"), pf.solver_settings("flow", method="rk4"):
        pass
