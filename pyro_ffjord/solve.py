"""The one place that calls torchdiffeq: option checks, step budget and solver errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

# Function evaluations per step of the fixed-grid solvers (adaptive ones read their tableau).
_FIXED_GRID_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
# Evaluations an adaptive solver spends choosing its first step.
_INITIAL_STEP_EVALS = 2
# Arguments of the solvers' constructors that are not user options.
_NOT_OPTIONS = {"self", "func", "y0", "rtol", "atol", "dtype", "unused_kwargs"}


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
    names = {"norm"}
    for cls in SOLVERS[method].__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names - _NOT_OPTIONS


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
    return dict(options)


def evals_per_step(method: str) -> int:
    """Function evaluations one step of ``method`` costs (rejected adaptive steps included)."""
    solver = SOLVERS[method]
    if issubclass(solver, RKAdaptiveStepsizeODESolver):
        return len(solver.tableau.alpha)
    return _FIXED_GRID_STAGES.get(method, 2)


def nfe_budget(method: str, max_num_steps: int) -> int:
    """Largest number of function evaluations a solve of ``max_num_steps`` steps may use."""
    return max_num_steps * evals_per_step(method) + _INITIAL_STEP_EVALS


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
