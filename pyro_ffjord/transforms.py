r"""FFJORD as Pyro transforms: :class:`FFJORD`, :class:`ConditionalFFJORD`, :class:`ConditionedFFJORD`.

Pyro's :class:`~pyro.distributions.TransformedDistribution` maps base to data, whereas FFJORD
integrates data :math:`x = z(0)` to base :math:`z(T)`; hence ``_call`` (base → data) solves from
T to 0 and ``_inverse`` (data → base) solves from 0 to T, and

.. math:: \log p(x) = \log p_{\text{base}}(z(T)) + \int_0^T \operatorname{tr}\frac{\partial f}{\partial z}\,dt.

Every solve returns its log-determinant, which is cached with the input/output pair so that
``log_prob(x)`` and ``log_prob(rsample())`` each cost one solve. The cache is keyed by tensor
identity *and* by the state of every tensor the solve read (input, output, parameters, buffers,
context), so an in-place change of the input, an optimizer step, a ``load_state_dict`` or a
``deepcopy`` never gets a stale value back. (Writes that bypass autograd's version counter, through
``.data`` or a NumPy view, cannot be seen; pass a new tensor after those.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform

from ._checks import check_int, check_tensor
from .dynamics import NFE, ContinuousFlow, Solution
from .nets import AmortizedLowRankODENet, ODENet


def _flatten_batch(name: str, value: Tensor, context: Tensor | None) -> tuple[torch.Size, Tensor, Tensor | None]:
    """The joint batch shape of ``value`` ``(..., D)`` and ``context`` ``(..., C)``, and both flattened to it."""
    batch = value.shape[:-1]
    if context is not None:
        try:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"{name} batch shape {tuple(value.shape[:-1])} does not broadcast with the context "
                f"batch shape {tuple(context.shape[:-1])}"
            ) from None
        context = context.expand(batch + context.shape[-1:]).reshape(-1, context.shape[-1])
    return batch, value.expand(batch + value.shape[-1:]).reshape(-1, value.shape[-1]), context


class _SolveRecord(NamedTuple):
    """A solve's results, and the tensors it read with their state then: a version counter (bumped by every
    in-place change) or, for an inference tensor, which has none, a copy of its values."""

    log_abs_det: Tensor | None  # log|det d data / d base|; None after a solve of the states alone
    solutions: tuple[Solution, ...]  # what each CNF's solve returned
    settings: tuple  # grad mode and solver settings of the solve
    tensors: tuple[Tensor, ...]  # base, data, then the tensors of _CNFTransform._read
    marks: tuple


class _CNFTransform:
    """Pyro ``Transform`` behaviour shared by :class:`FFJORD`, :class:`ConditionedFFJORD` and the image flow."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1  # the flow map of an ODE preserves orientation

    flow: ContinuousFlow
    _context: Tensor | None
    _record: _SolveRecord | None = None
    _exact = False  # the exact divergence whatever the flow's setting

    @property
    def flows(self) -> list[ContinuousFlow]:
        """The CNFs a solve runs."""
        return [self.flow]

    def _read(self) -> list[Tensor]:
        """What a solve reads besides its input: parameters, buffers and the context."""
        f = self.flow
        return [*f.parameters(), *f.buffers(), *(() if self._context is None else (self._context,))]

    def _settings(self) -> tuple:
        return torch.is_grad_enabled(), self._exact, tuple(f.settings for f in self.flows)

    def _record_solve(self, base: Tensor, data: Tensor, log_abs_det: Tensor | None, solutions: tuple) -> _SolveRecord:
        tensors = (base, data, *self._read())
        marks = tuple(t.detach().clone() if t.is_inference() else t._version for t in tensors)
        self._record = _SolveRecord(log_abs_det, solutions, self._settings(), tensors, marks)
        return self._record

    def _lookup(self, base: Tensor | None = None, data: Tensor | None = None) -> _SolveRecord | None:
        record = self._record
        if record is None or record.settings != self._settings():
            return None
        if (base is not None and base is not record.tensors[0]) or (data is not None and data is not record.tensors[1]):
            return None  # another tensor, whatever its values
        now = (*record.tensors[:2], *self._read())
        unchanged = len(now) == len(record.tensors) and all(  # the same tensors, none of them changed since
            a is b and (torch.equal(a, mark) if isinstance(mark, Tensor) else a._version == mark)
            for a, b, mark in zip(now, record.tensors, record.marks)
        )
        return record if unchanged else None

    def _solve(
        self, value: Tensor, name: str, reverse: bool, density: bool = True
    ) -> tuple[Tensor, Tensor | None, tuple[Solution, ...]]:
        """The flowed ``value``, the log-determinant (None without ``density``) and the solutions of the CNFs."""
        flow = self.flow
        value = check_tensor(name, value, (flow.input_dim,), flow.log_T)
        batch, flat, context = _flatten_batch(name, value, self._context)
        if flat.shape[0] == 0:
            out, logdet, solutions = flat.clone(), flat.new_zeros(0), ()
        else:
            solution = flow(flat, context, reverse=reverse, exact=self._exact, density=density)
            out, logdet, solutions = solution.y, solution.logdet, (solution,)
        logdet = logdet.reshape(batch) if density else None
        return out.reshape(batch + value.shape[-1:]), logdet, solutions

    def _call(self, z: Tensor) -> Tensor:
        record = self._lookup(base=z)
        if record is None:
            # Without gradients, a sample is mostly drawn to be used, not scored (Predictive, plots): the states
            # alone cost the net's evaluations only, against D + 1 of them for the exact trace.
            x, logdet, solutions = self._solve(z, "z", reverse=True, density=torch.is_grad_enabled())
            record = self._record_solve(z, x, logdet, solutions)
        return record.tensors[1]

    def _inverse(self, x: Tensor) -> Tensor:
        record = self._lookup(data=x)
        if record is None:
            z, logdet, solutions = self._solve(x, "x", reverse=False)
            record = self._record_solve(z, x, -logdet, solutions)
        return record.tensors[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log|\det \partial x / \partial z|` (base ``z`` → data ``x``), cached from the solve."""
        record = self._lookup(data=x) or self._lookup(base=z)
        if record is None or record.log_abs_det is None:
            # not solved, or solved for the states alone: solved again with the log-determinant, the record keeping
            # the data tensor already handed out (a grid gives the same states; an adaptive solve, within tolerance)
            base, data = (z, None) if record is None else record.tensors[:2]
            x, logdet, solutions = self._solve(base, "z", reverse=True)
            record = self._record_solve(base, x if data is None else data, logdet, solutions)
        return record.log_abs_det

    @property
    def solutions(self) -> tuple[Solution, ...]:
        """What the CNF solves of this transform's last solve returned (empty before the first)."""
        return () if self._record is None else self._record.solutions

    @property
    def nfe(self) -> NFE:
        """Function evaluations ``(forward, backward)`` of the last solve, summed over its CNFs."""
        counts = [solution.nfe for solution in self.solutions]
        return NFE(sum(n.forward for n in counts), sum(n.backward for n in counts))

    @property
    def T(self) -> Tensor:
        """The integration time."""
        return self.flow.T

    def regularization_loss(self) -> Tensor:
        """Weighted RNODE penalty of the last solve, averaged over its batch and summed over its CNFs (0 if none)."""
        penalties = [solution.penalty.mean() for solution in self.solutions if solution.penalty is not None]
        return sum(penalties, self.flows[0].log_T.new_zeros(()))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_record", None)  # a copy must never answer from the original's solve
        return state


class FFJORD(_CNFTransform, TransformModule):
    r"""Free-form Jacobian of reversible dynamics (Grathwohl et al., 2019), a CNF on real vectors.

    .. math::

        x = z(0), \quad \frac{dz}{dt} = f(z, t), \quad
        \log p(x) = \log p(z(T)) + \int_0^T \operatorname{tr}\left(\frac{\partial f}{\partial z}\right) dt,

    with the trace computed exactly or by Hutchinson's estimator (noise drawn once per solve).

    Args:
        net: dynamics ``f(t, z)``, e.g. :class:`~pyro_ffjord.nets.ODENet`.
        input_dim: dimension of the event.
        **options: ``T``, ``train_T``, ``divergence``, ``noise``, ``method``, ``rtol``, ``atol``,
            ``options``, ``adjoint``, ``max_num_steps``, ``regularization``, ``compile``
            (see :class:`~pyro_ffjord.dynamics.ContinuousFlow`).

    Example:
        >>> import pyro.distributions as dist
        >>> t = ffjord(2, hidden_dims=(16, 16))
        >>> flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
        >>> flow.log_prob(flow.rsample((5,))).shape
        torch.Size([5])
    """

    def __init__(self, net: torch.nn.Module, input_dim: int, **options: Any) -> None:
        super().__init__(cache_size=0)
        self.flow = ContinuousFlow(net, input_dim, **options)

    def with_exact_trace(self) -> Transform:
        """This transform with the exact divergence in every solve, whatever its ``divergence``: a deterministic
        log-determinant, as an HMC potential (:class:`~pyro.infer.reparam.NeuTraReparam`) or an evaluation
        needs. It shares the flow, so it follows every later change of the parameters."""
        return ConditionedFFJORD(self.flow, self._context, exact=True)

    _context = None


class ConditionedFFJORD(_CNFTransform, Transform):
    """A :class:`ConditionalFFJORD` with its context fixed: ``dz/dt = f(z, t, context)``.

    The context's batch shape broadcasts against the batch shape of the transformed values; the
    context gets gradients through the adjoint.
    """

    def __init__(self, flow: ContinuousFlow, context: Tensor | None, exact: bool = False) -> None:
        super().__init__(cache_size=0)
        self.flow, self._exact = flow, exact  # exact: the exact divergence whatever the flow's setting
        self._context = None if context is None else check_tensor("context", context, (flow.context_dim,), flow.log_T)

    with_exact_trace = FFJORD.with_exact_trace


class ConditionalFFJORD(ConditionalTransformModule):
    r"""FFJORD whose dynamics also see a context: :math:`dz/dt = f(z, t, c)`.

    Used for conditional densities and amortized variational posteriors.

    Args:
        net: dynamics ``f(t, z, context)``.
        input_dim: dimension of the event.
        context_dim: dimension of the context.
        **options: as for :class:`FFJORD`.

    Example:
        >>> import pyro.distributions as dist
        >>> ct = conditional_ffjord(2, 3, hidden_dims=(16,))
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [ct]).condition(torch.randn(4, 3))
        >>> d.rsample().shape
        torch.Size([4, 2])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, net: torch.nn.Module, input_dim: int, context_dim: int, **options: Any) -> None:
        super().__init__()
        check_int("context_dim", context_dim)
        self.flow = ContinuousFlow(net, input_dim, context_dim, **options)
        self._latest: ConditionedFFJORD | None = None

    def condition(self, context: Tensor) -> ConditionedFFJORD:
        """Fixes the context, shape ``(..., context_dim)``."""
        self._latest = ConditionedFFJORD(self.flow, context)
        return self._latest

    @property
    def nfe(self) -> NFE:
        """Function evaluations ``(forward, backward)`` of the last solve of the last :meth:`condition`'s transform."""
        return NFE(0, 0) if self._latest is None else self._latest.nfe

    @property
    def T(self) -> Tensor:
        """The integration time."""
        return self.flow.T

    def regularization_loss(self) -> Tensor:
        """RNODE penalty of the last solve of the last :meth:`condition`'s transform."""
        return self.flow.log_T.new_zeros(()) if self._latest is None else self._latest.regularization_loss()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_latest": None}  # a copy holds no context of the original's


class AmortizedFFJORD(ConditionalFFJORD):
    r"""A conditional CNF whose dynamics weights are amortized from features (e.g. a VAE encoder's).

    ``condition(features)`` maps the features with a linear *amortizer* to the net's context, e.g. the per-layer
    low-rank updates of :class:`~pyro_ffjord.nets.AmortizedLowRankODENet`:
    :math:`dz/dt = f_{\theta + \Delta\theta(h)}(z, t)`.

    Args:
        net: dynamics ``f(t, z, context)`` declaring its ``context_dim`` (the amortized parameter count).
        input_dim: dimension of the event.
        feature_dim: dimension of the features passed to :meth:`condition`.
        **options: as for :class:`FFJORD`.

    Example:
        >>> import pyro.distributions as dist
        >>> at = amortized_ffjord(2, feature_dim=5, hidden_dims=(16,), rank=2)
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [at]).condition(torch.randn(4, 5))
        >>> d.rsample().shape
        torch.Size([4, 2])
    """

    def __init__(self, net: torch.nn.Module, input_dim: int, feature_dim: int, **options: Any) -> None:
        context_dim = check_int("net.context_dim (the amortized inputs it declares)", getattr(net, "context_dim", None))
        check_int("feature_dim", feature_dim)
        super().__init__(net, input_dim, context_dim, **options)
        self.feature_dim = feature_dim
        self.amortizer = torch.nn.Linear(feature_dim, context_dim)

    def condition(self, features: Tensor) -> ConditionedFFJORD:
        """Fixes the features, shape ``(..., feature_dim)``; the amortizer maps them to the dynamics' context."""
        features = check_tensor("features", features, (self.feature_dim,), self.flow.log_T)
        return super().condition(self.amortizer(features))


def ffjord(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64, 64),
    layer: str = "concatsquash",
    activation: str = "tanh",
    time_frequencies: int = 0,
    **options: Any,
) -> FFJORD:
    """Builds an :class:`FFJORD` transform with an :class:`~pyro_ffjord.nets.ODENet` dynamics.

    Args:
        input_dim: dimension of the event.
        hidden_dims: hidden widths of the dynamics network.
        layer: time-conditioning layer, see :data:`~pyro_ffjord.nets.LAYERS`.
        activation: see :data:`~pyro_ffjord.nets.ACTIVATIONS`.
        time_frequencies: sinusoidal time features of every layer (see :class:`~pyro_ffjord.nets.ODENet`);
            a few (e.g. 8) help flows trained by flow matching.
        **options: see :class:`FFJORD`.
    """
    return FFJORD(ODENet(input_dim, hidden_dims, 0, layer, activation, time_frequencies), input_dim, **options)


def conditional_ffjord(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    layer: str = "concatsquash",
    activation: str = "tanh",
    time_frequencies: int = 0,
    **options: Any,
) -> ConditionalFFJORD:
    """Builds a :class:`ConditionalFFJORD` whose every layer sees the time and the context."""
    check_int("context_dim", context_dim)  # before the net, which would also accept 0
    net = ODENet(input_dim, hidden_dims, context_dim, layer, activation, time_frequencies)
    return ConditionalFFJORD(net, input_dim, context_dim, **options)


def amortized_ffjord(
    input_dim: int,
    feature_dim: int,
    hidden_dims: Sequence[int] = (512, 512),
    rank: int = 1,
    layer: str = "concat",
    activation: str = "tanh",
    time_frequencies: int = 0,
    **options: Any,
) -> AmortizedFFJORD:
    """Builds an :class:`AmortizedFFJORD` with per-data-point low-rank weights (:class:`AmortizedLowRankODENet`).

    The FFJORD paper's VAE posteriors use ``rank=64, hidden_dims=(1024, 1024)`` on MNIST and ``rank=20``
    elsewhere, with ``T=0.5``.
    """
    net = AmortizedLowRankODENet(input_dim, hidden_dims, rank, layer, activation, time_frequencies)
    return AmortizedFFJORD(net, input_dim, feature_dim, **options)


@contextmanager
def solver_settings(module: torch.nn.Module, **settings: Any) -> Iterator[None]:
    """Temporarily changes the solver settings of every CNF inside ``module``.

    Args:
        module: an FFJORD transform, a stack of them, a guide, or any module containing them.
        **settings: ``divergence``, ``noise``, ``method``, ``rtol``, ``atol``, ``options``,
            ``adjoint``, ``max_num_steps``.

    Example:
        >>> t = ffjord(2, hidden_dims=(8,), method="rk4", options={"step_size": 0.25})
        >>> with solver_settings(t, method="dopri5", options=None, divergence="exact"):
        ...     t.flow.settings.method
        'dopri5'
        >>> t.flow.settings.method
        'rk4'
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module containing CNFs, got {type(module).__name__}")
    flows = [m for m in module.modules() if isinstance(m, ContinuousFlow)]
    if not flows:
        raise ValueError(
            f"module {type(module).__name__} contains no CNF (an autoguide creates its CNFs on its first call)"
        )
    previous = [flow.settings for flow in flows]
    changed = [old.replace(**settings) for old in previous]  # all checked before any is changed
    try:
        for flow, new in zip(flows, changed):
            flow.settings = new
        yield
    finally:
        for flow, old in zip(flows, previous):
            flow.settings = old
