"""Solver settings: one immutable, validated object per CNF, chosen once and swapped whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from ._checks import check_choice, check_int, check_number

NOISES = ("rademacher", "gaussian")
DIVERGENCES = ("hutchinson", "exact")

# The option names of torchdiffeq 0.2.5's solvers (their constructors' keywords); max_num_steps is a setting.
_ADAPTIVE = frozenset(
    {"first_step", "safety", "ifactor", "dfactor", "max_step", "min_step", "step_t", "jump_t", "norm"}
)
_GRID = frozenset({"step_size", "grid_constructor", "perturb", "interp", "norm"})
_ADAMS = _GRID | {"max_iters", "max_order"}
METHOD_OPTIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        **dict.fromkeys(("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"), _ADAPTIVE),
        **dict.fromkeys(("euler", "midpoint", "heun2", "heun3", "rk4"), _GRID),
        "explicit_adams": _ADAMS,
        "implicit_adams": _ADAMS | {"implicit"},
        "fixed_adams": _ADAMS | {"implicit"},
    }
)
# Function evaluations per step of torchdiffeq's adaptive Runge-Kutta methods (stages after the first),
# the unit of the adjoint backward solve's budget.
ADAPTIVE_STAGES = MappingProxyType({"dopri8": 13, "dopri5": 6, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 1})
# Options in units of the solver's time: step lengths, and lists of times.
TIME_STEP_OPTIONS = ("step_size", "first_step", "min_step", "max_step")
TIME_POINT_OPTIONS = ("step_t", "jump_t")


@dataclass(frozen=True, eq=False)
class SolverSettings:
    """How a CNF solves: its trace estimator and its torchdiffeq solver, checked once at construction.

    Immutable: :meth:`replace` returns a changed copy, so a solve, or a cache entry, that saw a settings
    object saw exactly these values.

    Args:
        divergence: ``"hutchinson"`` (noise drawn once per solve) or ``"exact"``.
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        method, rtol, atol, options: the torchdiffeq solver and its settings; fixed-grid methods need
            ``options={"step_size": h}`` (or a ``grid_constructor``). Time-valued options are in units of ``t``.
        adjoint: gradients from the adjoint ODE (memory flat in the number of steps).
        max_num_steps: solver steps allowed per solve (and per adjoint backward solve) before
            :class:`~pyro_ffjord.ODESolveError`.
    """

    divergence: str = "hutchinson"
    noise: str = "rademacher"
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    options: Mapping[str, Any] = field(default_factory=dict)
    adjoint: bool = True
    max_num_steps: int = 1000

    def __post_init__(self) -> None:
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("noise", self.noise, NOISES)
        check_choice("method", self.method, tuple(METHOD_OPTIONS))
        check_number("rtol", self.rtol)
        check_number("atol", self.atol)
        if not isinstance(self.adjoint, bool):
            raise TypeError(f"adjoint must be a bool, got {self.adjoint!r}")
        check_int("max_num_steps", self.max_num_steps)
        options = {} if self.options is None else self.options
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict of torchdiffeq options, got {type(options).__name__}")
        allowed = METHOD_OPTIONS[self.method]
        unknown = set(options) - allowed
        if unknown:
            hint = " (pass max_num_steps= itself)" if "max_num_steps" in unknown else ""
            raise ValueError(
                f"options has names {sorted(unknown)} unknown to method {self.method!r}{hint}; "
                f"allowed: {sorted(allowed)}"
            )
        if self.fixed_grid:
            if options.get("step_size") is None and options.get("grid_constructor") is None:
                raise ValueError(f"fixed-grid method {self.method!r} needs options={{'step_size': h}} with h > 0")
            if options.get("step_size") is not None:
                check_number("options['step_size']", options["step_size"])
        if "max_iters" in options:
            check_int("options['max_iters']", options["max_iters"])
        options = dict(options)
        for name in TIME_POINT_OPTIONS:
            if options.get(name) is not None:  # torchdiffeq negates these for a backward solve only if tensors
                options[name] = torch.as_tensor(options[name], dtype=torch.float64)
        object.__setattr__(self, "options", MappingProxyType(options))

    @property
    def fixed_grid(self) -> bool:
        """Whether the method steps on a grid (``step_size`` or ``grid_constructor``) rather than adaptively."""
        return self.method not in ADAPTIVE_STAGES

    def replace(self, **changes: Any) -> SolverSettings:
        """A copy with ``changes`` (any of :data:`SETTINGS`), checked like the original."""
        unknown = set(changes) - set(SETTINGS)
        if unknown:
            raise TypeError(f"unknown solver settings {sorted(unknown)}; allowed: {list(SETTINGS)}")
        return replace(self, **changes)

    def __reduce__(self) -> tuple:  # a mappingproxy cannot be pickled: rebuilt (and checked again) from a dict
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return SolverSettings, tuple({**values, "options": dict(self.options)}.values())


SETTINGS = tuple(f.name for f in fields(SolverSettings))
