"""The one place that calls torchdiffeq: option checks, step budget and solver errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.fixed_adams import _MAX_ITERS, AdamsBashforth, AdamsBashforthMoulton
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from ._checks import check_int

# Function evaluations per step of the fixed-grid Runge-Kutta solvers: f(t0, y0), then one per further
# stage (torchdiffeq's fixed_grid.py; rk4 is rk_common.rk4_alt_step_func). Adaptive ones read their tableau.
_FIXED_GRID_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
# Evaluations after f(t0, y0) of the rk4 step that the Adams solvers take until they have enough history.
_ADAMS_STARTUP_EVALS = 3
# Evaluations an adaptive solver spends choosing its first step.
_INITIAL_STEP_EVALS = 2
# Arguments of the solvers' constructors that are not user options.
_NOT_OPTIONS = {"self", "func", "y0", "rtol", "atol", "dtype"}
# Arguments a solver class passes to its base class itself, so that a user value would clash.
_SET_BY_SOLVER = {AdamsBashforth: {"implicit"}}
# Options in units of the solver's time (torchdiffeq 0.2.5's constructors): step lengths, and lists of times.
TIME_STEP_OPTIONS = ("step_size", "first_step", "min_step", "max_step")
TIME_POINT_OPTIONS = ("step_t", "jump_t")


class ODESolveError(ValueError, RuntimeError):
    """A solve that exceeded its step budget or produced non-finite values.

    Derives from both ``ValueError`` (the configuration cannot solve this input) and
    ``RuntimeError`` (the failure happened while running), so either ``except`` catches it.
    """


def is_fixed_grid(method: str) -> bool:
    """Whether ``method`` is a torchdiffeq fixed-grid solver (which needs a ``step_size``)."""
    return issubclass(SOLVERS[method], FixedGridODESolver)


def allowed_options(method: str) -> set[str]:
    """Option names that torchdiffeq's ``method`` accepts, read off its constructors."""
    names, fixed = {"norm"}, set()
    for cls in SOLVERS[method].__mro__:
        fixed |= _SET_BY_SOLVER.get(cls, set())
        init = cls.__dict__.get("__init__")
        if init is not None:
            # *args and **kwargs (object's, or those forwarded to a base class) name no option
            names.update(
                name
                for name, parameter in inspect.signature(init).parameters.items()
                if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
            )
    return names - _NOT_OPTIONS - fixed


def check_solver_options(method: str, rtol: float, atol: float, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validates the torchdiffeq options and returns a copy of ``options``.

    Raises:
        ValueError: unknown ``method`` or option names, non-positive tolerances, or a fixed-grid
            method without ``options={"step_size": ...}``.
    """
    if not isinstance(method, str) or method not in SOLVERS or method == "scipy_solver":
        allowed = sorted(set(SOLVERS) - {"scipy_solver"})
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of torchdiffeq options, got {type(options).__name__}")
    unknown = set(options) - allowed_options(method)
    if unknown:
        raise ValueError(
            f"options has names {sorted(unknown)} unknown to method {method!r}; "
            f"allowed: {sorted(allowed_options(method))}"
        )
    if is_fixed_grid(method):
        step_size = options.get("step_size")
        if step_size is None and options.get("grid_constructor") is None:
            raise ValueError(f"fixed-grid method {method!r} needs options={{'step_size': h}} with h > 0")
        if step_size is not None and (
            isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < float("inf")
        ):
            raise ValueError(f"options['step_size'] must be a positive finite number, got {step_size!r}")
    check_int("options['max_iters']", options.get("max_iters", _MAX_ITERS))  # bounds the step budget
    options = dict(options)
    for name in TIME_POINT_OPTIONS:
        if options.get(name) is not None:  # torchdiffeq negates these for a backward solve only if tensors
            options[name] = torch.as_tensor(options[name], dtype=torch.float64)
    return options


def evals_per_step(method: str, options: Mapping[str, Any] | None = None) -> int:
    """Most function evaluations one step of ``method`` costs (rejected adaptive steps included).

    An Adams step evaluates :math:`f(t_0, y_0)`, then either finishes an rk4 step (while its history is
    short) or, implicit, runs up to ``options["max_iters"]`` Adams-Moulton corrector evaluations.
    """
    solver = SOLVERS[method]
    if issubclass(solver, RKAdaptiveStepsizeODESolver):
        return len(solver.tableau.alpha)
    if issubclass(solver, AdamsBashforthMoulton):
        options = options or {}
        implicit = not issubclass(solver, AdamsBashforth) and options.get("implicit", True)
        corrector = options.get("max_iters", _MAX_ITERS) if implicit else 0
        return 1 + max(_ADAMS_STARTUP_EVALS, corrector)
    if method not in _FIXED_GRID_STAGES:
        raise ValueError(f"method {method!r} has no known number of evaluations per step, so no step budget")
    return _FIXED_GRID_STAGES[method]


def nfe_budget(method: str, max_num_steps: int, options: Mapping[str, Any] | None = None) -> int:
    """Largest number of function evaluations a solve of ``max_num_steps`` steps may use.

    Besides its steps, an adaptive solve evaluates ``f`` to choose its first step, and a fixed-grid one
    with ``interp="cubic"`` once more at the end time.
    """
    if not is_fixed_grid(method):
        extra = _INITIAL_STEP_EVALS
    else:
        extra = int((options or {}).get("interp") == "cubic")
    return max_num_steps * evals_per_step(method, options) + extra


# Butcher tableaus (nodes, stage coefficients, weights) of the fixed-grid solvers that run without torchdiffeq:
# the same arithmetic as torchdiffeq's euler, midpoint and rk4 (its 3/8-rule rk4_alt_step_func).
_TABLEAUS: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "rk4": ((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (0.125, 0.375, 0.375, 0.125)),
}
LEAN_METHODS = tuple(_TABLEAUS)


def _combine(y: tuple[Tensor, ...], h: float, weights: Sequence[float], ks: Sequence[tuple[Tensor, ...]]):
    r""":math:`y + h \sum_j w_j k_j` for every component of the state."""
    out = []
    for i, yi in enumerate(y):
        for w, k in zip(weights, ks):
            if w:
                yi = torch.add(yi, k[i], alpha=h * w)
        out.append(yi)
    return tuple(out)


def stage_times(grid: Sequence[float], method: str) -> list[float]:
    """The times at which :func:`integrate_fixed_grid` evaluates the dynamics, in order."""
    nodes = _TABLEAUS[method][0]
    return [s0 + c * (s1 - s0) for s0, s1 in zip(grid[:-1], grid[1:]) for c in nodes]


def integrate_fixed_grid(
    func: Callable[[int, tuple[Tensor, ...]], tuple[Tensor, ...]],
    state: tuple[Tensor, ...],
    *,
    grid: Sequence[float],
    method: str,
) -> tuple[Tensor, ...]:
    """Runge-Kutta steps of ``d state/ds = f(s, state)`` between consecutive times of ``grid``.

    The solve path without an ODE library's per-step bookkeeping: a loop over the stages, differentiated by
    autograd (no adjoint). ``func(i, state)`` is :math:`f` at the i-th of :func:`stage_times`, so that
    whatever depends on the time alone can be computed for all of them beforehand.

    Returns:
        The state at ``grid[-1]``.
    """
    _, stages, weights = _TABLEAUS[method]
    evaluation = 0
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h = s1 - s0
        ks: list[tuple[Tensor, ...]] = []
        for stage in stages:
            ks.append(func(evaluation, _combine(state, h, stage, ks)))
            evaluation += 1
        state = _combine(state, h, weights, ks)
    return state


def step_size_grid(num_steps: int, step_size: float) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """A torchdiffeq ``grid_constructor``: ``num_steps`` steps of ``step_size`` from ``t[0]``, the last one ending
    at ``t[-1]``.

    It is the grid of torchdiffeq's ``step_size`` option with the number of steps decided by the caller:
    torchdiffeq's count, a ceiling rounded in the dtype of ``t``, adds a step of ~1e-7 where the span is a
    multiple of ``step_size`` up to that rounding.
    """

    def grid_constructor(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        # t decreases in a reverse solve and in the adjoint pass: torchdiffeq passes it to us unflipped
        direction = 1.0 if t[-1] >= t[0] else -1.0
        grid = t[0] + direction * step_size * torch.arange(num_steps + 1, dtype=t.dtype, device=t.device)
        grid[-1] = t[-1]
        return grid

    return grid_constructor


def check_rescalable(options: Mapping[str, Any]) -> None:
    """Checks that every time-valued option can be converted to the rescaled time :math:`s = t / T`.

    Raises:
        ValueError: ``options["grid_constructor"]`` is set: a callable's grid in units of ``t`` cannot be rescaled.
    """
    if options.get("grid_constructor") is not None:
        raise ValueError(
            "options['grid_constructor'] builds a grid in units of t, which a learned T (train_T=True) "
            "cannot rescale; use options['step_size'] or a fixed T"
        )


def time_options_in_units_of_s(options: Mapping[str, Any], T: float) -> dict[str, Any]:
    """Converts the time-valued ``options`` from units of ``t`` to units of :math:`s = t / T`.

    Raises:
        ValueError: see :func:`check_rescalable`.
    """
    check_rescalable(options)
    converted = dict(options)
    for name in TIME_STEP_OPTIONS + TIME_POINT_OPTIONS:
        if converted.get(name) is not None:
            converted[name] = converted[name] / T
    return converted


def integrate(
    func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    state: tuple[Tensor, ...],
    *,
    end: float,
    reverse: bool,
    method: str,
    rtol: float,
    atol: float,
    options: Mapping[str, Any],
    adjoint: bool,
    adjoint_params: Sequence[Tensor],
) -> tuple[Tensor, ...]:
    """Integrates ``d state/ds = func(s, state)`` over ``s`` from 0 to ``end`` (back to 0 if ``reverse``).

    With ``adjoint`` the gradients come from the adjoint ODE (Chen et al., 2018) with respect to
    the initial state and every tensor in ``adjoint_params``; otherwise autograd backpropagates
    through the solver's operations.

    Returns:
        The state at the final time.
    """
    s = torch.tensor([end, 0.0] if reverse else [0.0, end], dtype=state[0].dtype, device=state[0].device)
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=dict(options))
    try:
        if adjoint and torch.is_grad_enabled():
            solution = odeint_adjoint(func, state, s, adjoint_params=tuple(adjoint_params), **kwargs)
        else:
            solution = odeint(func, state, s, **kwargs)
    except AssertionError as error:  # torchdiffeq reports a vanishing step with an assert
        raise ODESolveError(f"{method} (rtol={rtol}, atol={atol}) failed: {error}") from error
    return tuple(component[-1] for component in solution)
