"""The one place that calls torchdiffeq (its public API), and the lean fixed-grid solve beside it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

if TYPE_CHECKING:
    from .settings import SolverSettings


class ODESolveError(ValueError, RuntimeError):
    """A solve that exceeded its step budget or produced non-finite values.

    Derives from both ``ValueError`` (the configuration cannot solve this input) and
    ``RuntimeError`` (the failure happened while running), so either ``except`` catches it.
    """


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
    """Runge-Kutta steps of ``d state/ds = f(s, state)`` over ``grid``, differentiated by autograd (no adjoint)
    and without an ODE library's per-step bookkeeping. ``func(i, state)`` is :math:`f` at the i-th of
    :func:`stage_times`, so that what depends on the time alone can be computed beforehand; returns the final state.
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


def step_grid(num_steps: int, step_size: float) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """A torchdiffeq ``grid_constructor``: ``num_steps`` steps of ``step_size`` from ``t[0]``, the last ending at
    ``t[-1]`` (torchdiffeq's own count, a ceiling in ``t``'s dtype, can add a step of ~1e-7)."""

    def grid_constructor(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        # t decreases in a reverse solve and in the adjoint pass: torchdiffeq passes it to us unflipped
        direction = 1.0 if t[-1] >= t[0] else -1.0
        grid = t[0] + direction * step_size * torch.arange(num_steps + 1, dtype=t.dtype, device=t.device)
        grid[-1] = t[-1]
        return grid

    return grid_constructor


def integrate(
    func: Callable,
    state: tuple[Tensor, ...],
    settings: SolverSettings,
    options: Mapping[str, Any],
    *,
    end: float,
    reverse: bool,
    adjoint_params: Sequence[Tensor],
) -> tuple[Tensor, ...]:
    """Integrates ``d state/ds = func(s, state)`` over ``s`` from 0 to ``end`` (back to 0 if ``reverse``).

    ``settings`` gives ``method``, ``rtol``, ``atol`` and ``adjoint`` (a :class:`~pyro_ffjord.SolverSettings`): with
    ``adjoint`` the gradients come from the adjoint ODE (Chen et al., 2018) with respect to the initial state and
    ``adjoint_params``. ``options["max_num_steps"]`` bounds the forward solve only: ``func`` bounds the adjoint's.

    Raises:
        ODESolveError: the solver gave up (a vanishing step, or more than ``max_num_steps`` steps).
    """
    t = torch.tensor([end, 0.0] if reverse else [0.0, end], dtype=state[0].dtype, device=state[0].device)
    kwargs = dict(rtol=settings.rtol, atol=settings.atol, method=settings.method, options=dict(options))
    try:
        if settings.adjoint and torch.is_grad_enabled():
            backward = {k: v for k, v in options.items() if k not in ("norm", "max_num_steps")}
            solution = odeint_adjoint(
                func, state, t, adjoint_params=tuple(adjoint_params), adjoint_options=backward, **kwargs
            )
        else:
            solution = odeint(func, state, t, **kwargs)
    except AssertionError as error:  # torchdiffeq reports a vanishing step or its step limit with an assert
        raise ODESolveError(str(error)) from error
    return tuple(component[-1] for component in solution)
