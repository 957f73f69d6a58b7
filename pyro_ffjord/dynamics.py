r"""The continuous normalizing flow without Pyro: augmented dynamics and the solve around them.

FFJORD (Grathwohl et al., 2019) integrates the state together with its log-density change,

.. math::

    \frac{d}{dt} \begin{bmatrix} z \\ \log|\det \partial z(t)/\partial z(0)| \end{bmatrix}
    = \begin{bmatrix} f(z, t) \\ \operatorname{tr}(\partial f / \partial z) \end{bmatrix},

and, with RNODE regularization (Finlay et al., 2020), the penalties

.. math::

    \mathcal{K} = \int_0^T \lVert f \rVert^2 \, dt, \qquad
    \mathcal{B} = \int_0^T \lVert \epsilon^\top \partial f / \partial z \rVert^2 \, dt,

where :math:`\mathbb{E}\lVert \epsilon^\top J \rVert^2 = \lVert J \rVert_F^2`, from the Jacobian rows the
trace already computed: the exact trace, or Hutchinson's :math:`\epsilon^\top J \epsilon` with one
forward-mode JVP (else one VJP). With ``train_T`` the time is rescaled to :math:`s = t / T \in [0, 1]`, so that the
integration time :math:`T` is an ordinary parameter of the dynamics, differentiated like any weight; a fixed
:math:`T` is integrated over :math:`[0, T]` as it is. Solver options are in units of :math:`t` either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch._functorch.config
from torch import Tensor, nn
from torch.distributions import Distribution

from ._checks import check_int, check_number
from .settings import ADAPTIVE_STAGES, SETTINGS, TIME_POINT_OPTIONS, TIME_STEP_OPTIONS, SolverSettings
from .solve import LEAN_METHODS, ODESolveError, integrate, integrate_fixed_grid, stage_times, step_grid

REGULARIZERS = ("kinetic", "jacobian")
# Relative distance from an integer below which T / step_size counts as that many steps.
_STEP_COUNT_RTOL = 1e-6
# Evaluations an adaptive solve spends choosing its first step.
_INITIAL_STEP_EVALS = 2
# Every ODENet-like class shares one compiled-code cache (dynamo's is per code object), with an entry per
# weight shape, grad mode and tangents-or-not: torch's default of 8 entries would send a multiscale
# model's later blocks back to eager code.
_RECOMPILE_LIMIT = 64


def _compile(net: nn.Module, compile: bool | Mapping[str, Any]) -> tuple[Callable, Callable] | None:
    """``type(net).forward_and_jacobian`` (unbound: a copy of a flow runs its own net) and
    :func:`~pyro_ffjord.solve.integrate_fixed_grid` through ``torch.compile``, built at the first call; None: eager."""
    if compile is False:
        return None
    if compile is not True and not isinstance(compile, Mapping):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
    arguments = {} if compile is True else dict(compile)
    if not callable(getattr(type(net), "forward_and_jacobian", None)):
        raise ValueError(
            f"compile needs a net class with a forward_and_jacobian method (ODENet, AmortizedLowRankODENet, "
            f"ConvODENet); {type(net).__name__} has none, and its autograd divergence needs a double backward, "
            "which torch.compile does not support"
        )
    arguments.setdefault("recompile_limit", _RECOMPILE_LIMIT)
    # torchdiffeq's adjoint differentiates with retain_graph=True, which compiled backwards that donate
    # their saved buffers (torch >= 2.6) refuse; the flag is also read in the backward pass, outside any
    # call of ours, so it is cleared for the process.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    validate = Distribution._validate_args  # pyro.enable_validation's switch, which dynamo turns off for good
    try:
        return tuple(torch.compile(f, **arguments) for f in (type(net).forward_and_jacobian, integrate_fixed_grid))
    except TypeError as error:
        raise ValueError(f"compile has arguments that torch.compile does not take: {error}") from None
    finally:
        Distribution.set_default_validate_args(validate)


def _density_error_norm(state: tuple[Tensor, ...]) -> Tensor:
    """torchdiffeq's step-error norm (the largest RMS norm) over ``(z, logdet)`` only: the RNODE integrals
    are penalties, not outputs whose accuracy should set the step size."""
    return torch.stack([s.pow(2).mean().sqrt() for s in state[:2]]).max()


class NFE(NamedTuple):
    """Function evaluations of a solve: its forward pass and its adjoint backward pass."""

    forward: int
    backward: int


class _Evaluations:
    """The evaluation counts of one solve; its adjoint backward pass adds to them after the solve returned."""

    def __init__(self) -> None:
        self.forward = self.backward = 0
        self.solved = False

    def count(self) -> int:
        if self.solved:
            self.backward += 1
            return self.backward
        self.forward += 1
        return self.forward


class Solution(NamedTuple):
    """What one solve returns."""

    y: Tensor  # the flowed states (N, D)
    logdet: Tensor | None  # log|det dy/dx| (N,); None for a solve of the states alone
    penalty: Tensor | None  # weighted RNODE terms per sample (N,); None when not regularized
    evaluations: _Evaluations

    @property
    def nfe(self) -> NFE:
        """Function evaluations of the solve (and of its adjoint backward pass once it ran)."""
        return NFE(self.evaluations.forward, self.evaluations.backward)


def _evaluation(
    net: nn.Module,
    forward_and_jacobian: Callable[..., tuple[Tensor, Tensor]] | None,
    context: Tensor | None,
    noise: Tensor | None,
    map_jacobian: bool,
    regularize: bool,
    density: bool,
) -> Callable[[Tensor, tuple[Tensor, ...], Any], tuple[Tensor, Tensor, Tensor]]:
    r"""The trace strategy of one solve: ``evaluate(t, state, folded) -> (f, d(state[1])/dt, Jacobian rows)``.

    With ``map_jacobian`` the second state is :math:`\Phi^\top`, the transposed Jacobian of the state with respect
    to its start, whose rows move as :math:`d(\Phi^\top)/dt = (J \Phi)^\top`: D tangents pushed forward through the
    net. Runge-Kutta steps commute with this linearization, so after a fixed-grid solve it is the Jacobian of the
    numerical map itself. Otherwise it is the log-density change, the exact trace (``noise`` None) or
    Hutchinson's, in forward mode where the net propagates tangents (no double backward), else by autograd.
    Without ``density``, the field alone (the state is ``(z,)``).
    """
    extra = () if context is None else (context,)
    if not density:

        def evaluate(t: Tensor, state: tuple[Tensor, ...], folded: Any) -> tuple[Tensor, Tensor, Tensor]:
            keywords = {} if folded is None else {"affines": folded}
            return net(t, state[0], *extra, **keywords), None, None

        return evaluate
    if forward_and_jacobian is None:

        def evaluate(t: Tensor, state: tuple[Tensor, ...], folded: Any) -> tuple[Tensor, Tensor, Tensor]:
            create_graph = torch.is_grad_enabled()
            z = state[0]
            with torch.enable_grad():
                if not (create_graph and z.requires_grad):
                    z = z.detach().requires_grad_(True)
                f = net(t, z, *extra)
                if not isinstance(f, Tensor) or f.shape != z.shape:
                    got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
                    raise ValueError(
                        f"net {type(net).__name__} must return dz/dt shaped like z {tuple(z.shape)}, got {got}"
                    )
                if noise is None:  # all D rows of J from one batched VJP over the basis
                    n, d = z.shape
                    basis = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, n, d)
                    (rows,) = torch.autograd.grad(f, z, basis, create_graph=create_graph, is_grads_batched=True)
                    return f, rows.diagonal(dim1=0, dim2=2).sum(-1), rows
                (rows,) = torch.autograd.grad(f, z, noise, create_graph=create_graph)  # e^T J
                return f, (rows * noise).sum(-1), rows

        return evaluate

    def call(t: Tensor, z: Tensor, folded: Any, tangents: Tensor | None = None) -> tuple[Tensor, Tensor]:
        affines = {} if folded is None else {"affines": folded}
        return forward_and_jacobian(net, t, z, *extra, tangents=tangents, **affines)

    if map_jacobian:

        def evaluate(t: Tensor, state: tuple[Tensor, ...], folded: Any) -> tuple[Tensor, Tensor, Tensor]:
            z, d = state[0], state[0].shape[-1]
            # with the penalty, D more tangents give J's rows for its exact Frobenius norm
            tangents = torch.cat([state[1], torch.eye(d).to(z).expand(z.shape[0], d, d)], 1) if regularize else state[1]
            f, jvp = call(t, z, folded, tangents)
            return f, jvp[:, :d], jvp[:, d:].transpose(0, 1)

    elif noise is None:

        def evaluate(t: Tensor, state: tuple[Tensor, ...], folded: Any) -> tuple[Tensor, Tensor, Tensor]:
            f, jacobian = call(t, state[0], folded)  # J^T (N, D, D); its rows returned as (D, N, D)
            return f, jacobian.diagonal(dim1=-2, dim2=-1).sum(-1), jacobian.transpose(0, 1)

    else:
        tangents = noise.unsqueeze(-2)

        def evaluate(t: Tensor, state: tuple[Tensor, ...], folded: Any) -> tuple[Tensor, Tensor, Tensor]:
            f, jvp = call(t, state[0], folded, tangents)
            jvp = jvp.squeeze(-2)  # J e: like e^T J, its squared norm is unbiased for |J|_F^2
            return f, (jvp * noise).sum(-1), jvp

    return evaluate


class ContinuousFlow(nn.Module):
    r"""A CNF on ``(N, D)`` states: solves the augmented ODE forward (0→T) or backward (T→0).

    Args:
        net: dynamics ``f(t, z)`` (or ``f(t, z, context)`` when ``context_dim > 0``).
        input_dim: dimension D of the state.
        context_dim: dimension of the context, 0 for none.
        T: integration time, > 0.
        train_T: learn ``T`` (parameterized as :math:`\log T`).
        divergence, noise, method, rtol, atol, options, adjoint, max_num_steps: the solver, see
            :class:`~pyro_ffjord.settings.SolverSettings` (a learned ``T`` cannot rescale a ``grid_constructor``).
            On a lean grid (below), ``divergence="exact"`` is the log-determinant of the numerical map itself.
        regularization: RNODE weights, e.g. ``{"kinetic": 0.01, "jacobian": 0.01}``.
        compile: ``torch.compile`` the solve: True, or a dict of its arguments. A lean solve (``euler``/``midpoint``/
            ``rk4`` with a ``step_size``, no adjoint) of a fixed T is compiled whole; any other, the net's
            ``forward_and_jacobian``. First derivatives only. Turns off torch's donated buffers for the process.
    """

    def __init__(
        self,
        net: nn.Module,
        input_dim: int,
        context_dim: int = 0,
        *,
        T: float = 1.0,
        train_T: bool = False,
        regularization: Mapping[str, float] | None = None,
        compile: bool | Mapping[str, Any] = False,
        **settings: Any,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        for name, value, least in (("input_dim", input_dim, 1), ("context_dim", context_dim, 0)):
            check_int(name, value, least)
            declared = getattr(net, name, value)  # nets that declare their sizes (ODENet does) must agree
            if declared != value:
                raise ValueError(f"net has {name}={declared} but the flow was given {name}={value}")
        check_number("T", T)
        if not isinstance(train_T, bool):
            raise TypeError(f"train_T must be a bool, got {train_T!r}")
        if regularization is not None and not isinstance(regularization, Mapping):
            raise TypeError(f"regularization must be a dict of weights, got {type(regularization).__name__}")
        regularization = dict(regularization or {})
        unknown = set(regularization) - set(REGULARIZERS)
        if unknown:
            raise ValueError(f"regularization has unknown terms {sorted(unknown)}; allowed: {list(REGULARIZERS)}")
        for name, weight in regularization.items():
            check_number(f"regularization[{name!r}]", weight, closed=True)
        self.compile_options = compile
        # built now so that torch.compile rejects a bad backend or mode at construction
        self._compiled = _compile(net, compile)
        self.net = net
        self.input_dim = input_dim
        self.context_dim = context_dim
        log_T = torch.tensor(math.log(T))
        if train_T:
            self.log_T = nn.Parameter(log_T)
        else:
            self.register_buffer("log_T", log_T)
        self.regularization = regularization
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            allowed = ["T", "train_T", "regularization", "compile", *SETTINGS]
            raise TypeError(f"unknown FFJORD options {sorted(unknown)}; allowed: {allowed}")
        self.settings = SolverSettings(**settings)

    @property
    def settings(self) -> SolverSettings:
        """How the flow solves; assign a new :class:`~pyro_ffjord.settings.SolverSettings` to change it."""
        return self._settings

    @settings.setter
    def settings(self, settings: SolverSettings) -> None:
        if not isinstance(settings, SolverSettings):
            raise TypeError(f"settings must be a SolverSettings, got {type(settings).__name__}")
        if self.log_T.requires_grad and settings.options.get("grid_constructor") is not None:
            raise ValueError(
                "options['grid_constructor'] builds a grid in units of t, which a learned T (train_T=True) "
                "cannot rescale; use options['step_size'] or a fixed T"
            )
        self._settings = settings

    @property
    def T(self) -> Tensor:
        """The integration time :math:`T = \\exp(\\log T)`."""
        return self.log_T.exp()

    def __getstate__(self) -> dict[str, Any]:  # dynamo's wrapper cannot be pickled (torch.save of a whole model)
        return {**self.__dict__, "_compiled": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._compiled = _compile(self.net, self.compile_options)

    def _num_steps(self, num_steps: float, fail: Callable[[str], ODESolveError]) -> int:
        """A grid's step count, checked against ``max_num_steps``; a count that is an integer up to the rounding
        of T (a float32) is that integer, not one more step of ~1e-7 that costs a full step's evaluations."""
        if math.isclose(num_steps, round(num_steps), rel_tol=_STEP_COUNT_RTOL):
            num_steps = round(num_steps)
        num_steps = math.ceil(num_steps)
        if num_steps > self.settings.max_num_steps:
            raise fail(f"needs {num_steps} steps, more than its step budget")
        return num_steps

    def _options(self, T: float, rescaled: bool, regularize: bool, fail: Callable[[str], ODESolveError]) -> dict:
        """The torchdiffeq options of one solve, in units of its time (:math:`s = t / T` when ``rescaled``)."""
        s = self.settings
        options = dict(s.options)
        if rescaled:
            for name in TIME_STEP_OPTIONS + TIME_POINT_OPTIONS:
                if options.get(name) is not None:
                    options[name] = options[name] / T
        if not s.fixed_grid:
            options["max_num_steps"] = s.max_num_steps
            if regularize:
                options.setdefault("norm", _density_error_norm)
        elif options.get("step_size") is not None:
            step_size = options.pop("step_size")
            options["grid_constructor"] = step_grid(self._num_steps(T / s.options["step_size"], fail), step_size)
        else:
            build = options["grid_constructor"]

            def grid_constructor(func: Any, y0: Tensor, t: Tensor) -> Tensor:
                grid = build(func, y0, t)
                self._num_steps(len(grid) - 1, fail)
                return grid

            options["grid_constructor"] = grid_constructor
        return options

    def forward(
        self, x: Tensor, context: Tensor | None = None, reverse: bool = False, exact: bool = False, density: bool = True
    ) -> Solution:
        """Flows ``x`` from t=0 to t=T (from T to 0 if ``reverse``).

        Args:
            x: states, shape ``(N, D)``.
            context: shape ``(N, C)`` or None.
            reverse: integrate backward in time.
            exact: the exact divergence whatever ``divergence`` says (a deterministic log-determinant).
            density: integrate the log-determinant (and RNODE penalties); without it the states alone, a solve
                that costs the net's evaluations only (its ``logdet`` is None).

        Returns:
            A :class:`Solution`: states, :math:`\\log|\\det \\partial y / \\partial x|`, RNODE penalty, evaluations.
        """
        s = self.settings
        T = self.T
        T_value = float(T.detach())
        # A learned T is a parameter of the ODE rescaled to s = t / T in [0, 1]; a fixed T is integrated
        # over [0, T] as it is, which keeps torchdiffeq's step-size heuristics in the units of t.
        rescaled = self.log_T.requires_grad
        end = 1.0 if rescaled else T_value
        regularize = bool(self.regularization) and torch.is_grad_enabled() and density
        noise = None  # Hutchinson's, drawn once per solve: E[e e^T] = I
        if density and s.divergence == "hutchinson" and not exact:
            noise = torch.randn_like(x) if s.noise == "gaussian" else torch.randint_like(x, 0, 2).mul_(2).sub_(1)
        evaluations = _Evaluations()

        def fail(what: str) -> ODESolveError:
            phase, nfe = (
                ("adjoint backward", evaluations.backward) if evaluations.solved else ("forward", evaluations.forward)
            )
            return ODESolveError(
                f"CNF {phase} solve {what}: method={s.method!r}, rtol={s.rtol}, atol={s.atol}, "
                f"T={T_value:.4g}, nfe={nfe}, max_num_steps={s.max_num_steps}"
            )

        lean = s.method in LEAN_METHODS and set(s.options) <= {"step_size", "interp"}
        lean = lean and not (s.adjoint and torch.is_grad_enabled())
        # Compiling, a lean solve of a fixed T is compiled whole, the net's evaluations inlined (a learned T moves
        # the grid, which would compile anew at every step); any other solve is compiled one evaluation at a time.
        compiled = self._compiled
        whole = compiled is not None and lean and not rescaled
        forward_and_jacobian = getattr(type(self.net), "forward_and_jacobian", None)
        if compiled is not None and not whole:
            forward_and_jacobian = compiled[0]
        map_jacobian = density and lean and noise is None and forward_and_jacobian is not None
        evaluate = _evaluation(self.net, forward_and_jacobian, context, noise, map_jacobian, regularize, density)
        # An adaptive solve must stop at the first non-finite evaluation (its step control would spin on NaNs);
        # a fixed grid's NaN reaches the final state, checked once: that spares a device synchronization per step.
        check_each = not s.fixed_grid
        # torchdiffeq bounds an adaptive forward solve's steps, and a grid is checked when it is built; an adaptive
        # adjoint backward solve is bounded here, in evaluations (an error inside torchdiffeq's backward pass would
        # surface as a bare AssertionError)
        backward_budget = s.max_num_steps * ADAPTIVE_STAGES[s.method] + _INITIAL_STEP_EVALS if check_each else math.inf

        def dynamics(t: Tensor, state: tuple[Tensor, ...], folded: Any = None) -> tuple[Tensor, ...]:
            if evaluations.count() > backward_budget and evaluations.solved:
                raise fail(f"exceeded its step budget ({backward_budget} evaluations)")
            f, change, rows = evaluate(t, state, folded)
            derivatives = (f,) if change is None else (f, change)
            if check_each and not all(torch.isfinite(d).all() for d in derivatives):
                raise fail("produced non-finite values")
            if regularize:  # squared speed, and the squared Frobenius norm from the rows the trace computed
                derivatives += (f.pow(2).sum(-1), rows.pow(2).sum((0, 2) if rows.dim() == 3 else -1))
            if rescaled:  # d/ds = T d/dt
                derivatives = tuple(d * T for d in derivatives)
            return derivatives if torch.is_grad_enabled() else tuple(d.detach() for d in derivatives)

        zeros = x.new_zeros(x.shape[0])
        d = x.shape[-1]
        log_density = torch.eye(d).to(x).expand(x.shape[0], d, d) if map_jacobian else zeros  # or the map's Jacobian
        state = (x, log_density, zeros, zeros) if regularize else (x, log_density) if density else (x,)
        if lean:
            num_steps = self._num_steps(T_value / s.options["step_size"], fail)
            step = end * s.options["step_size"] / T_value  # in units of the solve's time
            start, stop, sign = (end, 0.0, -1.0) if reverse else (0.0, end, 1.0)
            grid = [start + sign * k * step for k in range(num_steps)] + [stop]  # as step_grid
            times = torch.tensor(stage_times(grid, s.method), dtype=T.dtype, device=T.device)
            times = times * T if rescaled else times
            fold_time = getattr(self.net, "fold_time", None)
            folded = None if fold_time is None else fold_time(times)
            times = times.unbind(0)
            final = (compiled[1] if whole else integrate_fixed_grid)(
                lambda i, state: dynamics(times[i], state, None if folded is None else folded[i]),
                state,
                grid=grid,
                method=s.method,
            )
        else:
            adjoint_params = [p for p in self.parameters() if p.requires_grad]
            if context is not None and context.requires_grad:
                adjoint_params.append(context)
            func = (lambda u, state: dynamics(u * T, state)) if rescaled else dynamics
            options = self._options(T_value, rescaled, regularize, fail)
            try:
                final = integrate(func, state, s, options, end=end, reverse=reverse, adjoint_params=adjoint_params)
            except ODESolveError as error:
                raise fail(f"failed ({error})") from error
        evaluations.solved = True
        y, logdet = final[0], final[1] if density else None
        if map_jacobian:
            logdet = torch.linalg.slogdet(logdet).logabsdet
        if not (torch.isfinite(y).all() and (logdet is None or torch.isfinite(logdet).all())):
            raise fail("produced non-finite values")
        penalty = None
        if regularize:  # integrated backward in time, the penalty states accumulate with a negative sign
            weights = [self.regularization.get(name, 0.0) for name in REGULARIZERS]
            penalty = (-1.0 if reverse else 1.0) * sum(w * term for w, term in zip(weights, final[2:]))
        return Solution(y, logdet, penalty, evaluations)
