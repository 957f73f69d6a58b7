r"""The continuous normalizing flow without Pyro: augmented dynamics and the solve around them.

FFJORD (Grathwohl et al., 2019) integrates the state together with its log-density change,

.. math::

    \frac{d}{dt} \begin{bmatrix} z \\ \log|\det \partial z(t)/\partial z(0)| \end{bmatrix}
    = \begin{bmatrix} f(z, t) \\ \operatorname{tr}(\partial f / \partial z) \end{bmatrix}.

With ``train_T`` the time is rescaled to :math:`s = t / T \in [0, 1]`, so that the integration
time :math:`T` is an ordinary parameter of the dynamics, differentiated through the adjoint like
any weight; a fixed :math:`T` is integrated over :math:`[0, T]` as it is. Solver options are in units of
:math:`t` either way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch._functorch.config
from torch import Tensor, nn
from torch.distributions import Distribution
from torchdiffeq._impl.misc import _mixed_norm

from ._checks import check_choice, check_int
from .divergence import (
    DIVERGENCES,
    NOISES,
    divergence_exact,
    divergence_from_jacobian,
    divergence_hutchinson,
    divergence_hutchinson_jvp,
    sample_noise,
)
from .regularizers import REGULARIZERS, jacobian_frobenius, kinetic_energy
from .solve import (
    LEAN_METHODS,
    ODESolveError,
    check_rescalable,
    check_solver_options,
    integrate,
    integrate_fixed_grid,
    is_fixed_grid,
    nfe_budget,
    stage_times,
    step_size_grid,
    time_options_in_units_of_s,
)

# Relative distance from an integer below which T / step_size counts as that many steps.
_STEP_COUNT_RTOL = 1e-6

SOLVER_SETTINGS = ("divergence", "noise", "method", "rtol", "atol", "options", "adjoint", "max_num_steps")

_COMPILE_ARGUMENTS = tuple(name for name in inspect.signature(torch.compile).parameters if name != "model")
# Every ODENet-like class shares one compiled-code cache (dynamo's is per code object), with an entry per
# weight shape, grad mode and tangents-or-not: torch's default of 8 entries would send a multiscale
# model's later blocks back to eager code.
_RECOMPILE_LIMIT = 64


def _check_compile(compile: bool | Mapping[str, Any], net: nn.Module) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the net's ``forward_and_jacobian``; None: run it eagerly."""
    if isinstance(compile, bool):
        arguments = {} if compile else None
    elif isinstance(compile, Mapping):
        arguments = dict(compile)
        unknown = set(arguments) - set(_COMPILE_ARGUMENTS)
        if unknown:
            raise ValueError(
                f"compile has unknown torch.compile arguments {sorted(unknown)}; allowed: {list(_COMPILE_ARGUMENTS)}"
            )
    else:
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
    if arguments is None:
        return None
    if not callable(getattr(type(net), "forward_and_jacobian", None)):
        raise ValueError(
            f"compile needs a net class with a forward_and_jacobian method (ODENet, AmortizedLowRankODENet, "
            f"ConvODENet); {type(net).__name__} has none, and its autograd divergence needs a double backward, "
            "which torch.compile does not support"
        )
    if "recompile_limit" in _COMPILE_ARGUMENTS:
        arguments.setdefault("recompile_limit", _RECOMPILE_LIMIT)
    return arguments


def _compile_forward_and_jacobian(net: nn.Module, arguments: dict[str, Any]) -> Callable[..., tuple[Tensor, Tensor]]:
    """``type(net).forward_and_jacobian`` through ``torch.compile`` (lazy: the code is built at the first call).

    The unbound method takes the net as an argument, so that a copy of a flow runs its own net.
    """
    # torchdiffeq's adjoint differentiates with retain_graph=True, which compiled backwards that donate
    # their saved buffers (torch >= 2.6) refuse; the flag is also read in the backward pass, outside any
    # call of ours, so it is cleared for the process.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    with _keeping_distribution_validation():
        return torch.compile(type(net).forward_and_jacobian, **arguments)


@contextmanager
def _keeping_distribution_validation() -> Iterator[None]:
    """Puts back torch.distributions' argument validation (``pyro.enable_validation``'s switch), which
    dynamo turns off for good the first time ``torch.compile`` is called in a process."""
    validate = Distribution._validate_args
    try:
        yield
    finally:
        if Distribution._validate_args != validate:
            Distribution.set_default_validate_args(validate)


def _density_error_norm(state: tuple[Tensor, ...]) -> Tensor:
    """Step-error norm over ``(z, logdet)`` only: the RNODE integrals are penalties, not outputs whose
    accuracy should set the step size (with them in the norm, adaptive solves take more steps)."""
    return _mixed_norm(state[:2])  # torchdiffeq's default norm (max of RMS norms), restricted


class NFE(NamedTuple):
    """Function evaluations of the last solve: its forward pass and its adjoint backward pass."""

    forward: int
    backward: int


class CNFDynamics:
    r"""Augmented dynamics of one solve: ``(z, logdet[, kinetic, jacobian])``.

    With ``map_jacobian`` the second state is instead :math:`\Phi^\top`, the transposed Jacobian of the state
    with respect to its start, whose rows move as :math:`d(\Phi^\top)/dt = (J \Phi)^\top`: D tangents pushed
    forward through the net, the cost of the exact trace. Runge-Kutta steps commute with this linearization, so
    after a fixed-grid solve it is the Jacobian of the numerical map itself.

    A fresh instance per solve holds that solve's noise and context, so that the adjoint backward
    pass, which may run after other solves, integrates exactly the forward pass's dynamics.
    """

    def __init__(
        self,
        flow: ContinuousFlow,
        T: Tensor,
        rescaled: bool,
        context: Tensor | None,
        noise: Tensor | None,
        regularize: bool,
        map_jacobian: bool = False,
    ) -> None:
        self.flow = flow
        self.map_jacobian = map_jacobian
        self.T = T
        self.rescaled = rescaled
        self.context = context
        self.noise = noise
        self.regularize = regularize
        self.budget = nfe_budget(flow.method, flow.max_num_steps, flow.options)
        # An adaptive solve must stop at the first non-finite evaluation (its step control would spin on
        # NaNs); a fixed grid has a known number of steps, and a NaN reaches the final state, which is
        # checked once per solve: that spares one device synchronization per evaluation on GPUs.
        self.check_each_evaluation = not is_fixed_grid(flow.method)
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.forward_done = False

    def _fail(self, what: str) -> ODESolveError:
        f = self.flow
        nfe = self.nfe_backward if self.forward_done else self.nfe_forward
        phase = "adjoint backward" if self.forward_done else "forward"
        return ODESolveError(
            f"CNF {phase} solve {what}: method={f.method!r}, rtol={f.rtol}, atol={f.atol}, "
            f"T={float(self.T.detach()):.4g}, nfe={nfe}, max_num_steps={f.max_num_steps}"
        )

    def _check_output(self, f: Any, z: Tensor) -> None:
        # Checked once per solve: a wrong shape otherwise surfaces as an autograd error in the divergence.
        if not isinstance(f, Tensor) or f.shape != z.shape:
            got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"net {type(self.flow.net).__name__} must return dz/dt shaped like z {tuple(z.shape)}, got {got}"
            )

    def on_grid(self, times: Sequence[float]) -> Callable[[int, tuple[Tensor, ...]], tuple[Tensor, ...]]:
        """The dynamics at the i-th of ``times`` (for :func:`~pyro_ffjord.solve.integrate_fixed_grid`), with
        the net's time terms folded for all of them at once where the net allows."""
        like = self.flow.log_T
        s = torch.tensor(times, dtype=like.dtype, device=like.device)
        t = s * self.T if self.rescaled else s
        fold_time = getattr(self.flow.net, "fold_time", None)
        folded = fold_time(t) if fold_time is not None and self.flow.compile_arguments is None else None
        t = t.unbind(0)
        return lambda i, state: self(t[i], state, None if folded is None else folded[i], rescaled_time=False)

    def __call__(
        self,
        s: Tensor,
        state: tuple[Tensor, ...],
        affines: list[tuple[Tensor, Tensor]] | None = None,
        rescaled_time: bool = True,
    ) -> tuple[Tensor, ...]:
        """The derivatives at solver time ``s`` (``t = s T`` when rescaled, unless ``rescaled_time`` is False:
        ``s`` is then ``t``); ``affines``: the net's folded time terms at that time (see ``ODENet.fold_time``)."""
        if self.forward_done:
            self.nfe_backward += 1
            nfe = self.nfe_backward
        else:
            self.nfe_forward += 1
            nfe = self.nfe_forward
        if nfe > self.budget:
            raise self._fail(f"exceeded its step budget ({self.budget} evaluations)")
        create_graph = torch.is_grad_enabled()
        z = state[0]
        t = s * self.T if self.rescaled and rescaled_time else s
        context = () if self.context is None else (self.context,)
        if hasattr(self.flow.net, "forward_and_jacobian"):
            forward_and_jacobian = self.flow._forward_and_jacobian
            folded = {} if affines is None else {"affines": affines}
            # forward mode: an ordinary graph (none at all under no_grad), no create_graph, no double backward
            if self.map_jacobian:
                d = z.shape[-1]
                identity = torch.eye(d, dtype=z.dtype, device=z.device).expand(z.shape[0], d, d)
                tangents = torch.cat([state[1], identity], dim=1) if self.regularize else state[1]
                f, jvp = forward_and_jacobian(t, z, *context, tangents=tangents, **folded)
                div, rows = jvp[:, :d], jvp[:, d:].transpose(0, 1)  # d(Phi^T)/dt, and J^T's rows for the penalty
            elif self.noise is None:
                f, jacobian = forward_and_jacobian(t, z, *context, **folded)
                div, rows = divergence_from_jacobian(jacobian)
            else:
                f, jvp = forward_and_jacobian(t, z, *context, tangents=self.noise.unsqueeze(-2), **folded)
                div, rows = divergence_hutchinson_jvp(jvp.squeeze(-2), self.noise)
        else:
            with torch.enable_grad():
                if not (create_graph and z.requires_grad):
                    z = z.detach().requires_grad_(True)
                f = self.flow.net(t, z, *context)
                if nfe == 1:
                    self._check_output(f, z)
                if self.noise is None:
                    div, rows = divergence_exact(f, z, create_graph)
                else:
                    div, rows = divergence_hutchinson(f, z, self.noise, create_graph)
        if self.check_each_evaluation and not (torch.isfinite(f).all() and torch.isfinite(div).all()):
            raise self._fail("produced non-finite values")
        derivatives = [f, div]
        if self.regularize:
            derivatives += [kinetic_energy(f), jacobian_frobenius(rows)]
        if self.rescaled:  # d/ds = T d/dt
            derivatives = [d * self.T for d in derivatives]
        if not create_graph:
            derivatives = [d.detach() for d in derivatives]
        return tuple(derivatives)


class ContinuousFlow(nn.Module):
    r"""A CNF on ``(N, D)`` states: solves the augmented ODE forward (0→T) or backward (T→0).

    Args:
        net: dynamics ``f(t, z)`` (or ``f(t, z, context)`` when ``context_dim > 0``).
        input_dim: dimension D of the state.
        context_dim: dimension of the context, 0 for none.
        T: integration time, > 0.
        train_T: learn ``T`` (parameterized as :math:`\log T`).
        divergence: ``"hutchinson"`` or ``"exact"``. On a fixed ``euler``/``midpoint``/``rk4`` grid solved
            without the adjoint, ``"exact"`` gives the log-determinant of the numerical map itself (see
            :class:`CNFDynamics`), so the density is exactly that of the map the solve applies.
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``, drawn once per solve.
        method, rtol, atol, options: the torchdiffeq solver and its settings; time-valued options
            (``step_size``, ``first_step``, ``min_step``, ``max_step``, ``step_t``, ``jump_t``) are in
            units of ``t`` (a learned ``T`` cannot rescale a ``grid_constructor``).
        adjoint: gradients from the adjoint ODE (memory flat in the number of steps).
        max_num_steps: solver steps allowed per solve before :class:`ODESolveError`.
        regularization: RNODE weights, e.g. ``{"kinetic": 0.01, "jacobian": 0.01}``.
        compile: run the net's ``forward_and_jacobian`` (the whole evaluation but the solver's
            arithmetic) through ``torch.compile``: True, or a dict of its arguments (e.g.
            ``{"mode": "max-autotune"}``). Compiled on the first solve; instances of one net class
            share the compiled code (up to 64 variants: weight shapes, grad modes, ...). Compiled nets
            support first derivatives only (no ``create_graph`` through a solve). Turns off torch's
            donated buffers (a memory saving of compiled backward passes that forbids the adjoint's
            ``retain_graph=True``) for the process.
    """

    def __init__(
        self,
        net: nn.Module,
        input_dim: int,
        context_dim: int = 0,
        *,
        T: float = 1.0,
        train_T: bool = False,
        divergence: str = "hutchinson",
        noise: str = "rademacher",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: Mapping[str, Any] | None = None,
        adjoint: bool = True,
        max_num_steps: int = 1000,
        regularization: Mapping[str, float] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        for name, value, least in (("input_dim", input_dim, 1), ("context_dim", context_dim, 0)):
            check_int(name, value, least)
            declared = getattr(net, name, value)  # nets that declare their sizes (ODENet does) must agree
            if declared != value:
                raise ValueError(f"net has {name}={declared} but the flow was given {name}={value}")
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not 0 < T < math.inf:
            raise ValueError(f"T must be a positive finite number, got {T!r}")
        if not isinstance(train_T, bool):
            raise TypeError(f"train_T must be a bool, got {train_T!r}")
        if regularization is not None and not isinstance(regularization, Mapping):
            raise TypeError(f"regularization must be a dict of weights, got {type(regularization).__name__}")
        regularization = dict(regularization or {})
        unknown = set(regularization) - set(REGULARIZERS)
        if unknown:
            raise ValueError(f"regularization has unknown terms {sorted(unknown)}; allowed: {list(REGULARIZERS)}")
        for name, weight in regularization.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
                raise ValueError(f"regularization[{name!r}] must be a non-negative number, got {weight!r}")
        self.compile_arguments = _check_compile(compile, net)
        # built now so that torch.compile rejects a bad backend or mode at construction
        self._compiled = (
            None if self.compile_arguments is None else _compile_forward_and_jacobian(net, self.compile_arguments)
        )
        self.net = net
        self.input_dim = input_dim
        self.context_dim = context_dim
        log_T = torch.tensor(math.log(T))
        if train_T:
            self.log_T = nn.Parameter(log_T)
        else:
            self.register_buffer("log_T", log_T)
        self.regularization = regularization
        self.set_solver(
            divergence=divergence,
            noise=noise,
            method=method,
            rtol=rtol,
            atol=atol,
            options=options,
            adjoint=adjoint,
            max_num_steps=max_num_steps,
        )
        self._last_solve: CNFDynamics | None = None
        self._last_regularization: dict[str, Tensor] = {}

    def set_solver(self, **settings: Any) -> dict[str, Any]:
        """Changes solver settings (any of :data:`SOLVER_SETTINGS`) after checking them.

        Typical use: a cheap fixed-grid solver with Hutchinson's estimator for training, then an
        adaptive solver with the exact trace for evaluation (see :func:`pyro_ffjord.solver_settings`).

        Returns:
            The previous values of the settings that were changed.
        """
        unknown = set(settings) - set(SOLVER_SETTINGS)
        if unknown:
            raise TypeError(f"unknown solver settings {sorted(unknown)}; allowed: {list(SOLVER_SETTINGS)}")
        new = {name: settings.get(name, getattr(self, name, None)) for name in SOLVER_SETTINGS}
        check_choice("divergence", new["divergence"], DIVERGENCES)
        check_choice("noise", new["noise"], NOISES)
        if not isinstance(new["adjoint"], bool):
            raise TypeError(f"adjoint must be a bool, got {new['adjoint']!r}")
        check_int("max_num_steps", new["max_num_steps"])
        new["options"] = check_solver_options(new["method"], new["rtol"], new["atol"], new["options"])
        if self.log_T.requires_grad:  # fail now rather than at the first solve
            check_rescalable(new["options"])
        previous = {name: getattr(self, name) for name in settings if hasattr(self, name)}
        for name, value in new.items():
            setattr(self, name, value)
        return previous

    @property
    def T(self) -> Tensor:
        """The integration time :math:`T = \\exp(\\log T)`."""
        return self.log_T.exp()

    @property
    def nfe(self) -> NFE:
        """Function evaluations of the last solve (forward, and adjoint backward once run)."""
        if self._last_solve is None:
            return NFE(0, 0)
        return NFE(self._last_solve.nfe_forward, self._last_solve.nfe_backward)

    def _forward_and_jacobian(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``net.forward_and_jacobian(*args, **kwargs)``, compiled if ``compile`` was set."""
        if self.compile_arguments is None:
            return self.net.forward_and_jacobian(*args, **kwargs)
        if self._compiled is None:  # unpickled
            self._compiled = _compile_forward_and_jacobian(self.net, self.compile_arguments)
        return self._compiled(self.net, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # dynamo's wrapper cannot be pickled (torch.save of a whole model); it is rebuilt at the next solve
        return {**self.__dict__, "_compiled": None}

    def regularization_loss(self) -> Tensor:
        """Weighted RNODE terms of the last solve, averaged over its batch (0 when none)."""
        loss = self.log_T.new_zeros(())
        for name, value in self._last_regularization.items():
            loss = loss + self.regularization[name] * value.mean()
        return loss

    def _num_steps(self, T: float) -> int:
        """Steps of a fixed-grid solve with ``options["step_size"]`` over ``[0, T]``: T / step_size, the last one
        shorter; a count that is an integer up to the rounding of T (a float32) is that integer, not one more
        step of ~1e-7 that would cost a full step's evaluations."""
        step_size = self.options["step_size"]
        num_steps = T / step_size
        if math.isclose(num_steps, round(num_steps), rel_tol=_STEP_COUNT_RTOL):
            num_steps = round(num_steps)
        num_steps = math.ceil(num_steps)
        if num_steps > self.max_num_steps:
            raise ODESolveError(
                f"{self.method} with step_size={step_size} needs {num_steps} steps to "
                f"cover T={T:.4g}, more than max_num_steps={self.max_num_steps}"
            )
        return num_steps

    def _lean_grid(self, T: float, end: float, reverse: bool) -> list[float] | None:
        """The times of a solve that runs without torchdiffeq (see :func:`~pyro_ffjord.solve.integrate_fixed_grid`),
        from 0 to ``end`` (or back); None where torchdiffeq runs it: other methods, other options, or the adjoint."""
        if (
            self.method not in LEAN_METHODS
            or set(self.options) - {"step_size", "interp"}
            or (self.adjoint and torch.is_grad_enabled())
        ):
            return None
        num_steps = self._num_steps(T)
        step = end * self.options["step_size"] / T  # in units of the solve's time (s = t / T when rescaled)
        start, stop, direction = (end, 0.0, -1.0) if reverse else (0.0, end, 1.0)
        return [start + direction * k * step for k in range(num_steps)] + [stop]  # as step_size_grid

    def _solver_options(self, T: float, rescaled: bool, regularize: bool) -> dict[str, Any]:
        """The torchdiffeq options of one solve: ``self.options`` are in units of ``t``, converted to
        :math:`s = t / T` when the solve is ``rescaled``."""
        options = time_options_in_units_of_s(self.options, T) if rescaled else dict(self.options)
        if not is_fixed_grid(self.method):
            if regularize:
                options.setdefault("norm", _density_error_norm)
        elif options.get("step_size") is not None:
            options["grid_constructor"] = step_size_grid(self._num_steps(T), options.pop("step_size"))
        return options

    def forward(
        self, x: Tensor, context: Tensor | None = None, reverse: bool = False, exact: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Flows ``x`` from t=0 to t=T (from T to 0 if ``reverse``).

        Args:
            x: states, shape ``(N, D)``.
            context: shape ``(N, C)`` or None.
            reverse: integrate backward in time.
            exact: the exact divergence whatever ``divergence`` says (a deterministic log-determinant).

        Returns:
            The flowed states and :math:`\\log|\\det \\partial y / \\partial x|`, shape ``(N,)``.
        """
        T = self.T
        # A learned T is a parameter of the ODE rescaled to s = t / T in [0, 1]; a fixed T is integrated
        # over [0, T] as it is, which keeps torchdiffeq's step-size heuristics in the units of t.
        rescaled = self.log_T.requires_grad
        end = 1.0 if rescaled else float(T)
        regularize = bool(self.regularization) and torch.is_grad_enabled()
        noise = sample_noise(x, self.noise) if self.divergence == "hutchinson" and not exact else None
        T_value = float(T.detach())
        grid = self._lean_grid(T_value, end, reverse)
        # On a fixed grid without the adjoint, the exact log-determinant is that of the numerical map itself
        map_jacobian = grid is not None and noise is None and hasattr(self.net, "forward_and_jacobian")
        func = CNFDynamics(self, T, rescaled, context, noise, regularize, map_jacobian)
        zeros = x.new_zeros(x.shape[0])
        d = x.shape[-1]
        density = torch.eye(d, dtype=x.dtype, device=x.device).expand(x.shape[0], d, d) if map_jacobian else zeros
        state = (x, density, zeros, zeros) if regularize else (x, density)
        self._last_solve = func
        if grid is not None:
            final = integrate_fixed_grid(
                func.on_grid(stage_times(grid, self.method)), state, grid=grid, method=self.method
            )
        else:
            adjoint_params = [p for p in self.parameters() if p.requires_grad]
            if context is not None and context.requires_grad:
                adjoint_params.append(context)
            final = integrate(
                func,
                state,
                end=end,
                reverse=reverse,
                method=self.method,
                rtol=self.rtol,
                atol=self.atol,
                options=self._solver_options(T_value, rescaled, regularize),
                adjoint=self.adjoint,
                adjoint_params=adjoint_params,
            )
        func.forward_done = True
        y, logdet = final[:2]
        if map_jacobian:
            logdet = torch.linalg.slogdet(logdet).logabsdet
        if not (torch.isfinite(y).all() and torch.isfinite(logdet).all()):
            raise func._fail("produced non-finite values")
        # Integrated backward in time, the regularizer states accumulate with a negative sign.
        sign = -1.0 if reverse else 1.0
        self._last_regularization = (
            {name: sign * final[2 + i] for i, name in enumerate(REGULARIZERS) if name in self.regularization}
            if regularize
            else {}
        )
        return y, logdet
