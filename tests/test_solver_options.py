"""torchdiffeq options: step budgets per solver, allowed names, units of time under a learned T, net output shapes."""

import inspect

import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

import pyro_ffjord as pf
from pyro_ffjord.settings import ADAPTIVE_STAGES, METHOD_OPTIONS, TIME_POINT_OPTIONS, TIME_STEP_OPTIONS, SolverSettings

METHODS = sorted(set(SOLVERS) - {"scipy_solver"})
FIXED_GRID = [method for method in METHODS if issubclass(SOLVERS[method], FixedGridODESolver)]
# Every option each torchdiffeq 0.2.5 solver takes, by whether it is a time (converted under a learned T).
UNITLESS_OPTIONS = {"norm", "safety", "ifactor", "dfactor", "max_num_steps", "interp", "perturb"}
UNITLESS_OPTIONS |= {"implicit", "max_iters", "max_order"}
# Solvers whose steps all cost the same number of evaluations (Adams steps vary with their history).
RUNGE_KUTTA_GRID = ["euler", "midpoint", "heun2", "heun3", "rk4"]


def _run(t, x: torch.Tensor) -> None:
    """A forward solve and the adjoint backward solve."""
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    d.log_prob(x).sum().backward()


def test_every_fixed_grid_method_is_covered():
    assert set(RUNGE_KUTTA_GRID) | {"explicit_adams", "implicit_adams", "fixed_adams"} == set(FIXED_GRID)
    assert FIXED_GRID == [method for method in METHODS if method not in ADAPTIVE_STAGES]
    assert all(SolverSettings(method=method, options={"step_size": 1}).fixed_grid for method in FIXED_GRID)


def _constructor_keywords(method: str) -> set[str]:
    """The keywords of a torchdiffeq solver's constructors, less those that are not user options."""
    names = {"norm"}
    for cls in SOLVERS[method].__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            names |= {n for n, p in inspect.signature(init).parameters.items() if p.kind not in kinds}
    return names - {"self", "func", "y0", "rtol", "atol", "dtype"}


@pytest.mark.parametrize("method", METHODS)
def test_option_table_matches_torchdiffeq(method):
    """The static table of option names is what the installed torchdiffeq's constructors take (``max_num_steps``
    is a setting of its own; explicit_adams sets ``implicit`` itself)."""
    expected = _constructor_keywords(method) - {"max_num_steps"}
    if method == "explicit_adams":
        expected -= {"implicit"}
    assert set(METHOD_OPTIONS) == set(METHODS)
    assert METHOD_OPTIONS[method] == expected


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", FIXED_GRID)
def test_fixed_grid_runs_within_its_number_of_steps(method):
    torch.manual_seed(0)
    t = pf.ffjord(2, hidden_dims=(8,), method=method, options={"step_size": 0.25}, max_num_steps=4)
    _run(t, torch.randn(5, 2))
    assert t.nfe.forward >= 4 and t.nfe.backward >= 4
    t = pf.ffjord(2, hidden_dims=(8,), method=method, options={"step_size": 0.25}, max_num_steps=3)
    with pytest.raises(pf.ODESolveError, match="needs 4 steps"):
        t.inv(torch.randn(5, 2))


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", FIXED_GRID)
def test_grid_constructor_budget_is_its_number_of_steps(method):
    """A user's grid is checked against max_num_steps when torchdiffeq builds it, forward and backward."""

    def grid(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 5, dtype=t.dtype)

    torch.manual_seed(0)
    t = pf.ffjord(2, hidden_dims=(8,), method=method, options={"grid_constructor": grid}, max_num_steps=4)
    _run(t, torch.randn(5, 2))
    t.flow.settings = t.flow.settings.replace(max_num_steps=3)
    with pytest.raises(pf.ODESolveError, match="forward solve needs 4 steps, more than its step budget"):
        t.inv(torch.randn(5, 2))


class Stiff(nn.Module):
    """dz/dt = -20 z: with steps of 0.25, the Adams-Moulton fixed-point iteration diverges and never converges."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(-20.0))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.rate * z


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
def test_adams_budget_follows_max_iters():
    """A corrector that never converges runs max_iters evaluations per step, here more than the default 4."""
    options = {"step_size": 0.25, "max_iters": 10}
    t = pf.FFJORD(Stiff(), 2, divergence="exact", method="implicit_adams", options=options, max_num_steps=4)
    _run(t, torch.randn(5, 2))
    # two rk4 start-up steps, then two Adams steps of f(t0) and 10 corrector evaluations
    assert t.nfe == pf.NFE(2 * 4 + 2 * (1 + 10), 2 * 4 + 2 * (1 + 10))


@pytest.mark.parametrize("max_iters", [0, 2.5, True])
def test_bad_max_iters(max_iters):
    with pytest.raises(ValueError, match="max_iters"):
        pf.ffjord(2, method="implicit_adams", options={"step_size": 0.25, "max_iters": max_iters})


@pytest.mark.parametrize("train_T", [False, True])
@pytest.mark.parametrize("method,per_step", [("euler", 1), ("rk4", 4)])
def test_step_count_ignores_the_rounding_of_T(method, per_step, train_T):
    """0.6 / 0.1 is 6 steps although T = exp(log 0.6) in float32 is a little more than 0.6."""
    t = pf.ffjord(2, hidden_dims=(8,), T=0.6, train_T=train_T, method=method, options={"step_size": 0.1})
    t.flow.settings = t.flow.settings.replace(max_num_steps=6)
    with torch.no_grad():
        t.inv(torch.randn(5, 2))
    assert t.nfe.forward == 6 * per_step


@pytest.mark.parametrize("method", METHODS)
def test_allowed_options_are_named_options(method):
    names = METHOD_OPTIONS[method]
    assert not names & {"args", "kwargs", "unused_kwargs", "self"}
    assert names <= set(TIME_STEP_OPTIONS) | set(TIME_POINT_OPTIONS) | UNITLESS_OPTIONS | {"grid_constructor"}


@pytest.mark.parametrize("name", ["args", "kwargs"])
def test_varargs_are_not_options(name):
    with pytest.raises(ValueError, match="options has names") as info:
        pf.ffjord(2, options={name: 3})
    allowed = str(info.value).split("allowed:")[1]
    assert "'args'" not in allowed and "'kwargs'" not in allowed


TIMES = [0.05 * k for k in range(1, 10)]  # in (0, T) for T = 0.5


@pytest.mark.parametrize(
    "method,options",
    [
        ("dopri5", {"max_step": 0.1}),
        ("bosh3", {"max_step": 0.1}),
        ("dopri5", {"first_step": 0.05}),
        ("dopri8", {"first_step": 0.05}),
        # torchdiffeq's choice of the first step is not invariant to the unit of time: first_step sets it
        ("dopri5", {"step_t": TIMES, "first_step": 0.01}),
        ("bosh3", {"jump_t": TIMES, "first_step": 0.01}),
        ("fehlberg2", {"min_step": 0.1, "first_step": 0.01}),
        ("rk4", {"step_size": 0.125}),
    ],
)
def test_time_options_are_in_units_of_t_under_a_learned_T(method, options):
    """The solve of a learned T runs over s = t / T; the options must mean the same steps as for a fixed T."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    nfe = []
    for train_T in (False, True):
        torch.manual_seed(0)
        t = pf.ffjord(2, hidden_dims=(8,), T=0.5, train_T=train_T, method=method, options=options)
        with torch.no_grad():
            t.inv(x)
        nfe.append(t.nfe.forward)
    assert nfe[0] == nfe[1]


def test_grid_constructor_needs_a_fixed_T():
    def grid(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 5, dtype=t.dtype)

    options = {"grid_constructor": grid}
    with pytest.raises(ValueError, match="grid_constructor.*train_T"):
        pf.ffjord(2, train_T=True, method="euler", options=options)
    t = pf.ffjord(2, train_T=True, method="euler", options={"step_size": 0.25})
    with pytest.raises(ValueError, match="grid_constructor"):
        t.flow.settings = t.flow.settings.replace(options=options)
    t.flow.log_T.requires_grad_(False)  # a frozen T is integrated over [0, T] as it is
    t.flow.settings = t.flow.settings.replace(options=options)
    with torch.no_grad():
        t.inv(torch.randn(5, 2))
    assert t.nfe.forward == 4


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("train_T", [False, True])
def test_time_points_given_as_a_list_are_honoured_both_ways(train_T, reverse):
    """torchdiffeq negates ``jump_t`` for a backward solve only if it is a tensor: a list must work alike."""
    x = torch.randn(4, 2)
    nfe = []
    for jump_t in ([0.3, 0.6], torch.tensor([0.3, 0.6]), None):
        torch.manual_seed(0)
        options = {} if jump_t is None else {"jump_t": jump_t}
        t = pf.ffjord(2, hidden_dims=(8,), train_T=train_T, divergence="exact", options=options)
        with torch.no_grad():
            t(x) if reverse else t.inv(x)
        nfe.append(t.nfe.forward)
    assert nfe[0] == nfe[1] > nfe[2]  # the jumps restart the solver: more evaluations than without


def test_grid_constructor_with_step_size_none():
    def grid(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 3, dtype=t.dtype)

    t = pf.ffjord(2, hidden_dims=(8,), method="rk4", options={"step_size": None, "grid_constructor": grid})
    with torch.no_grad():
        t.inv(torch.randn(5, 2))
    assert t.nfe.forward == 8


class WrongShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_net_output_shape_is_checked(divergence, grad):
    t = pf.FFJORD(WrongShape(), 2, divergence=divergence, method="rk4", options={"step_size": 0.25})
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"net WrongShape .*\(5, 2\).*\(5, 3\)"):
        t.inv(torch.randn(5, 2))


def test_options_a_solver_sets_itself_are_not_options():
    assert "implicit" in METHOD_OPTIONS["implicit_adams"] and "implicit" not in METHOD_OPTIONS["explicit_adams"]
    with pytest.raises(ValueError, match=r"options has names \['implicit'\] unknown to method 'explicit_adams'"):
        pf.ffjord(2, method="explicit_adams", options={"step_size": 0.25, "implicit": True})
