r"""Flow matching: trains a CNF's vector field by regression, without solving the ODE.

Conditional flow matching (Lipman et al., ICLR 2023; Liu et al., ICLR 2023; Albergo & Vanden-Eijnden,
ICLR 2023) regresses the field onto the velocity of a known path between a data point and a noise
sample. Here the path runs in FFJORD's direction, data :math:`x` at :math:`t = 0` and base noise
:math:`\epsilon \sim \mathcal{N}(0, I)` at :math:`t = T`, so that a trained transform's ``log_prob``
is the model's density with no conversion. With :math:`s = t / T \in [0, 1]`, the straight-line path
with a minimal width :math:`\sigma_{\min}` (Lipman et al.'s optimal-transport path, reversed) is

.. math::

    x_s = (1 - s)\, x + (\sigma_{\min} + (1 - \sigma_{\min}) s)\, \epsilon, \qquad
    u_s = \frac{d x_s}{ds} = (1 - \sigma_{\min})\, \epsilon - x,

and the loss, with a time :math:`s \sim p(s)` on :math:`(0, 1)` per sample, is

.. math:: \mathcal{L} = \mathbb{E}_{s, x, \epsilon}\, \tfrac{1}{D} \lVert T f(x_s, sT) - u_s \rVert^2,

minimized by :math:`f(z, t) = \mathbb{E}[u_s \mid x_s = z] / T`, the field whose flow carries the
data distribution (convolved with :math:`\mathcal{N}(0, \sigma_{\min}^2 I)`) to the base, whatever the time law
with a positive density on :math:`(0, 1)`: the law only weighs the errors across times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.distributions import Distribution

from ._checks import check_choice, check_number, check_tensor
from .transforms import FFJORD, ConditionalFFJORD, _flatten_batch

COUPLINGS = ("independent", "ot")
TIMES = ("uniform", "logit-normal")


def ot_coupling(x: Tensor, noise: Tensor) -> Tensor:
    r"""The permutation :math:`\pi` that pairs ``x[i]`` with ``noise[pi[i]]`` at least total squared distance.

    The exact minibatch optimal-transport plan between two equal-size empirical measures is a permutation
    (Tong et al., TMLR 2024, OT-CFM); it is found with SciPy's ``linear_sum_assignment``.

    .. math:: \pi = \arg\min_{\sigma \in S_N} \sum_i \lVert x_i - \epsilon_{\sigma(i)} \rVert^2

    Args:
        x: data, shape ``(N, D)``.
        noise: base samples, shape ``(N, D)``.

    Returns:
        The permutation, a long tensor of shape ``(N,)`` on ``noise``'s device.
    """
    cost = torch.cdist(x.detach().double(), noise.detach().double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[rows.argsort()], device=noise.device)


def flow_matching_loss(
    transform: FFJORD | ConditionalFFJORD,
    x: Tensor,
    context: Tensor | None = None,
    *,
    sigma_min: float = 0.0,
    coupling: str = "independent",
    time: str | Distribution = "uniform",
) -> Tensor:
    r"""Conditional flow-matching loss of a CNF transform on data ``x`` (see the module docstring).

    One network evaluation per sample: no solve and no trace. The trained transform is used as it is,
    e.g. ``TransformedDistribution(Normal(0, I), [transform]).log_prob(x)`` gives the exact (or Hutchinson)
    log-density of the learned flow.

    :math:`T` is read, not trained (any :math:`T` gives the same flow map once :math:`f` has learnt :math:`u / T`);
    RNODE regularizers do not enter this loss.

    Args:
        transform: an :class:`~pyro_ffjord.FFJORD`, or a :class:`~pyro_ffjord.ConditionalFFJORD`
            (including :class:`~pyro_ffjord.AmortizedFFJORD`) given ``context``.
        x: data in the transform's space, shape ``(..., D)``; scale it with an invertible transform in the
            pipeline (e.g. :func:`~pyro_ffjord.standardization`) so that its spread is comparable to the base's.
        context: the conditional transform's context (its features for an amortized one), broadcasting
            against ``x``'s batch shape.
        sigma_min: width :math:`\sigma_{\min} \ge 0` of the path at the data end.
        coupling: ``"independent"`` pairs each data point with a fresh noise sample; ``"ot"`` re-pairs the
            batch by the exact minibatch optimal-transport permutation (:func:`ot_coupling`), which straightens
            the learned paths (fewer solver steps). With a context, ``"ot"`` would pair noise with data
            across contexts and bias every conditional density, so it is refused.
        time: the law of :math:`s = t / T`: ``"uniform"`` (Lipman et al.), ``"logit-normal"``, the sigmoid of a
            standard normal (Esser et al., ICML 2024), or a scalar ``Distribution`` on :math:`[0, 1]`.

    Returns:
        The loss, a differentiable scalar.

    Example:
        >>> from pyro_ffjord import ffjord
        >>> t = ffjord(2, hidden_dims=(16,))
        >>> loss = flow_matching_loss(t, torch.randn(64, 2), coupling="ot")
        >>> loss.backward()
    """
    if isinstance(transform, ConditionalFFJORD):
        if context is None:
            raise ValueError(f"{type(transform).__name__} needs a context (its conditioning input)")
        if coupling == "ot":
            raise ValueError(
                "coupling='ot' pairs noise with data across contexts, which biases conditional densities; "
                "use coupling='independent' with a context"
            )
        conditioned = transform.condition(context)
        flow, context = conditioned.flow, conditioned._context
    elif isinstance(transform, FFJORD):
        if context is not None:
            raise ValueError("an FFJORD transform takes no context; use a ConditionalFFJORD")
        flow = transform.flow
    else:
        raise TypeError(
            f"transform must be an FFJORD or a ConditionalFFJORD (one CNF whose field is trained), "
            f"got {type(transform).__name__}; a multiscale or stacked flow has no single path to match"
        )
    check_choice("coupling", coupling, COUPLINGS)
    draw_times = _time_sampler(time)
    check_number("sigma_min", sigma_min, high=1.0, closed=True)
    _, x, context = _flatten_batch("x", check_tensor("x", x, (flow.input_dim,), flow.log_T), context)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    noise = torch.randn_like(x)
    if coupling == "ot":
        noise = noise[ot_coupling(x, noise)]
    s = draw_times(x)
    x_s = (1 - s).unsqueeze(-1) * x + (sigma_min + (1 - sigma_min) * s).unsqueeze(-1) * noise
    target = (1 - sigma_min) * noise - x
    T = flow.T.detach()
    velocity = flow.net(s * T, x_s) if context is None else flow.net(s * T, x_s, context)
    return (T * velocity - target).pow(2).mean()


def _time_sampler(time: str | Distribution) -> Callable[[Tensor], Tensor]:
    """Checks the law ``time`` and returns its draw of one time :math:`s \\in [0, 1]` per row of ``x`` ``(N, D)``."""
    if isinstance(time, Distribution):
        low, high = (getattr(time.support, bound, None) for bound in ("lower_bound", "upper_bound"))
        if time.event_shape or time.batch_shape or low is None or not 0 <= float(low) <= float(high) <= 1:
            raise ValueError(f"time must be a scalar distribution with support in [0, 1], got {time!r}")
        return lambda x: time.sample(x.shape[:1]).to(x)
    if time == "uniform":
        return lambda x: torch.rand(x.shape[:1], dtype=x.dtype, device=x.device)
    if time == "logit-normal":
        return lambda x: torch.sigmoid(torch.randn(x.shape[:1], dtype=x.dtype, device=x.device))
    raise ValueError(f"time must be one of {list(TIMES)} or a Distribution on [0, 1], got {time!r}")
