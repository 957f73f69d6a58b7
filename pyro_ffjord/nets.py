"""Time- (and context-) conditioned networks for the CNF dynamics ``f(z, t[, context])``.

Each layer maps ``(t, x, context)`` to a hidden representation; the conditioning scheme is
chosen by name (see :data:`LAYERS`). The layer types follow the FFJORD reference code
(Grathwohl et al., 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import check_choice, check_int, positive_ints

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "elu": F.elu,
    "silu": F.silu,
    "swish": F.silu,
}


# sigma'(pre) * v from pre and out = sigma(pre), for forward-mode Jacobians: aten's activation-backward kernels,
# one differentiable op each (its silu_backward has no derivative). Nets look them up by name: lambdas do not pickle.
_ACTIVATION_JVPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "tanh": lambda v, pre, out: torch.ops.aten.tanh_backward(v, out),
    "softplus": lambda v, pre, out: torch.ops.aten.softplus_backward(v, pre, 1.0, 20.0),  # nn.Softplus's defaults
    "elu": lambda v, pre, out: torch.ops.aten.elu_backward(v, 1.0, 1, 1, True, out),  # nn.ELU's alpha, from out
    "silu": lambda v, pre, out: v * (torch.sigmoid(pre) * (1 + pre - out)),
}
_ACTIVATION_JVPS["swish"] = _ACTIVATION_JVPS["silu"]


def time_features(t: Tensor, frequencies: Tensor | None) -> Tensor:
    r"""The time as the layers see it: :math:`t`, or :math:`[t, \cos(\omega_k t), \sin(\omega_k t)]_k`.

    ``t`` is one time (result ``(1 + 2K,)``) or one per sample ``(N,)`` (result ``(N, 1 + 2K)``). Sinusoidal
    features of the time, as in zuko's CNF and in diffusion models, let the field change quickly in time,
    which a flow trained by flow matching needs near the data.
    """
    t = t.unsqueeze(-1) if t.numel() != 1 else t.reshape(1)
    if frequencies is None:
        return t
    angles = t * frequencies.to(t)
    return torch.cat([t, torch.cos(angles), torch.sin(angles)], dim=-1)


def _check_time(t: object, batch_shape: torch.Size) -> None:
    """``t`` must be one time for the whole batch (one element) or one per sample (``batch_shape``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != 1 and t.shape != batch_shape:
        raise ValueError(f"t must have one element or the batch shape {tuple(batch_shape)}, got {tuple(t.shape)}")


def _fold_gate_and_shift(
    weight: Tensor, bias: Tensor | None, gate: Tensor | None, shift: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    r"""The weight and bias of :math:`(W x + b) \odot g + s` for a gate and shift shared by the batch.

    The gate scales each output unit (a row of a linear weight, a kernel of a convolution's); ``gate`` and ``shift``
    are ``(out,)`` for one time or ``(K, out)`` for K times, giving one weight and bias or K of them.
    """
    if gate is not None:
        weight = weight * gate[(..., *(None,) * (weight.dim() - 1))]
        bias = None if bias is None else bias * gate
    if shift is not None:
        bias = shift if bias is None else bias + shift
    return weight, bias


class _ConditionedLinear(nn.Module):
    r"""A linear layer :math:`h = (W x + b) \odot g(c) + s(c)` whose gate and shift depend on :math:`c`, the time
    features (and the context, per sample).

    Without context and with one time for the batch, the gate and shift are folded into one weight and bias per
    evaluation: one ``addmm`` per layer, for the output and the tangents alike.
    """

    linear: nn.Linear
    spatial: tuple[None, ...] = ()  # what the terms broadcast over after the channels: a convolution's (H, W)

    def map(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's linear map with ``weight`` and ``bias``, of inputs or tangents ``(N, k, in)``."""
        return F.linear(x, weight, bias)

    def push(self, weight: Tensor, tangents: Tensor | None) -> Tensor:
        """The tangents ``(N, k, in)`` through the linear map; ``None`` stands for the identity."""
        # made contiguous so that the (N, D, out) tangents it spawns are, and fold into one matrix product
        return weight.t().contiguous().unsqueeze(0) if tangents is None else self.map(tangents, weight)

    def terms(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """:math:`W` ``(out, in)``, :math:`b`, :math:`g` and :math:`s` (None: absent) at time features ``t``
        ``(..., time_dim)`` and ``context`` ``(..., C)`` (or None)."""
        raise NotImplementedError

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.forward_and_jvp(t, x, None, context, jvp=False)[0]

    def forward_and_jvp(
        self,
        t: Tensor,
        x: Tensor,
        tangents: Tensor | None,
        context: Tensor | None = None,
        jvp: bool = True,
        affine: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The output and, if ``jvp``, the tangents ``(N, k, in)`` pushed forward (see :class:`ODENet`).

        ``t`` holds time features (see :func:`time_features`): ``(time_dim,)`` for the whole batch or
        ``(N, time_dim)`` per sample. ``affine``: this layer's folded weight and bias at ``t``, computed beforehand.
        """
        if affine is None and (context is not None or t.dim() > 1):
            return self.conditioned(t, x, tangents, context, jvp)
        weight, bias = _fold_gate_and_shift(*self.terms(t.to(x), None)) if affine is None else affine
        return self.map(x, weight, bias), self.push(weight, tangents) if jvp else None

    def conditioned(
        self, t: Tensor, x: Tensor, tangents: Tensor | None, context: Tensor | None, jvp: bool
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward_and_jvp` with per-sample time features ``(N, time_dim)`` or a context ``(N, C)``."""
        weight, bias, gate, shift = self.terms(t.to(x), context)
        out, pushed = self.map(x, weight, bias), self.push(weight, tangents) if jvp else None
        if gate is not None:
            gate = gate[(..., *self.spatial)]
            out, pushed = out * gate, None if pushed is None else pushed * gate.unsqueeze(1)
        return (out if shift is None else out + shift[(..., *self.spatial)]), pushed


def _cat(t: Tensor, context: Tensor | None) -> Tensor:
    return t if context is None else torch.cat([t.expand(*context.shape[:-1], t.shape[-1]), context], dim=-1)


class SquashLinear(_ConditionedLinear):
    r"""Linear layer gated by the time and context: :math:`h = (W x + b) \odot \sigma(A [t, c] + a)`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(time_dim + context_dim, out_features)
        self.shift: nn.Linear | None = None

    def terms(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        c = _cat(t, context)
        shift = None if self.shift is None else self.shift(c)
        return self.linear.weight, self.linear.bias, torch.sigmoid(self.gate(c)), shift


class ConcatSquashLinear(SquashLinear):
    r"""Linear layer gated and shifted by the time and context.

    .. math:: h = (W x + b) \odot \sigma(A [t, c] + a) + B [t, c]
    """

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__(in_features, out_features, context_dim, time_dim)
        self.shift = nn.Linear(time_dim + context_dim, out_features, bias=False)


class ConcatLinear(_ConditionedLinear):
    r"""Linear layer on the concatenation of input, time and context: :math:`h = W [x, t, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.linear = nn.Linear(in_features + time_dim + context_dim, out_features)

    def terms(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, None, None, Tensor]:
        weight, n = self.linear.weight, self.in_features
        return weight[:, :n], None, None, F.linear(_cat(t, context), weight[:, n:], self.linear.bias)


class IgnoreLinear(_ConditionedLinear):
    r"""Autonomous linear layer (time is ignored): :math:`h = W [x, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.linear = nn.Linear(in_features + context_dim, out_features)

    def terms(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None, None, Tensor | None]:
        weight, bias, n = self.linear.weight, self.linear.bias, self.in_features
        if context is None:
            return weight, bias, None, None
        return weight[:, :n], None, None, F.linear(context, weight[:, n:], bias)


LAYERS: dict[str, type[nn.Module]] = {
    "concatsquash": ConcatSquashLinear,
    "squash": SquashLinear,
    "concat": ConcatLinear,
    "ignore": IgnoreLinear,
}


class ODENet(nn.Module):
    r"""Multilayer perceptron ``f(t, z[, context])`` whose every layer sees the time (and context).

    The time ``t`` is one element for the whole batch (an ODE solve) or one per sample, shaped like ``z``'s batch
    (flow matching); each layer sees :func:`time_features` of it.

    Args:
        input_dim: dimension D of the state ``z``.
        hidden_dims: widths of the hidden layers.
        context_dim: dimension of the context (0 for an unconditional flow).
        layer: time-conditioning scheme, one of :data:`LAYERS`.
        activation: nonlinearity between layers, one of :data:`ACTIVATIONS`.
        time_frequencies: number K of sinusoidal time features (0: the time alone).

    Example:
        >>> net = ODENet(2, (16, 16))
        >>> net(torch.tensor(0.5), torch.randn(10, 2)).shape
        torch.Size([10, 2])
    """

    _layer_types: dict[str, type[nn.Module]] = LAYERS

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64, 64),
        context_dim: int = 0,
        layer: str = "concatsquash",
        activation: str = "tanh",
        time_frequencies: int = 0,
    ) -> None:
        super().__init__()
        check_int("input_dim", input_dim)
        check_int("time_frequencies", time_frequencies, least=0)
        check_int("context_dim", context_dim, least=0)
        hidden_dims = positive_ints("hidden_dims", hidden_dims, empty=True)
        check_choice("layer", layer, self._layer_types)
        check_choice("activation", activation, ACTIVATIONS)
        self.input_dim = input_dim
        self.context_dim = context_dim
        self._layer_context_dim = context_dim  # what the layers see; an amortized net's context bypasses them
        self._hidden_dims = hidden_dims
        self._layer_shape = (input_dim,)  # what the layers see of one sample
        widths = (input_dim, *hidden_dims, input_dim)
        time_dim = 1 + 2 * time_frequencies
        self.layers = nn.ModuleList(
            self._layer_types[layer](w_in, w_out, context_dim, time_dim) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        frequencies = math.pi * torch.arange(1, time_frequencies + 1) if time_frequencies else None
        self.register_buffer("frequencies", frequencies)
        self.activation = activation

    def _check_inputs(self, t: Tensor, z: Tensor, context: Tensor | None) -> None:
        """Clear errors for calls that would fail deep inside the layers (cheap: shapes only)."""
        if not isinstance(z, Tensor) or z.dim() == 0 or z.shape[-1] != self.input_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (..., {self.input_dim}), got {got}")
        _check_time(t, z.shape[:-1])
        if not self.context_dim:
            if context is not None:
                raise ValueError(f"{type(self).__name__} has context_dim=0 and takes no context")
        elif not isinstance(context, Tensor) or context.shape != (*z.shape[:-1], self.context_dim):
            got = tuple(context.shape) if isinstance(context, Tensor) else context
            raise ValueError(f"context must have shape {(*z.shape[:-1], self.context_dim)} (z's batch), got {got}")

    def forward(
        self, t: Tensor, z: Tensor, context: Tensor | None = None, affines: list[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        """``f(t, z)``; ``affines``: one time's entry of :meth:`fold_time`, which then stands for ``t``."""
        self._check_inputs(t, z, context)
        return self._propagate(t, z, None, context, False, affines)[0]

    def fold_time(self, t: Tensor) -> list[list[tuple[Tensor, Tensor]]] | None:
        """The time terms of every layer at each of the times ``t`` ``(K,)``, for :meth:`forward_and_jacobian`'s
        ``affines``: computed for all K at once, as a solve on a known grid allows. None when the layers also
        see a context, which makes their terms per sample."""
        if self._layer_context_dim:
            return None
        k, times = t.shape[0], time_features(t, self.frequencies).reshape(t.shape[0], -1)
        per_layer = []
        for layer in self.layers:
            weight, bias = _fold_gate_and_shift(*layer.terms(times, None))  # K of each, or one shared by all
            per_layer.append(zip(weight.unbind(0) if weight.dim() == 3 else [weight] * k, bias.expand(k, -1).unbind(0)))
        return [list(per_time) for per_time in zip(*per_layer)]

    def forward_and_jacobian(
        self,
        t: Tensor,
        z: Tensor,
        context: Tensor | None = None,
        tangents: Tensor | None = None,
        affines: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``f(t, z)`` and Jacobian-vector products :math:`J v_j`, :math:`J = \partial f / \partial z`.

        Forward-mode propagation through the layers, :math:`J_{l+1} = \sigma'(a_l) \odot (W_l J_l)`: one
        batched matrix product per layer. ``tangents`` ``(N, k, D)`` holds k vectors :math:`v_j` per sample
        and the result ``(N, k, D)`` their images :math:`J v_j`, e.g. for Hutchinson's estimator
        :math:`\epsilon^\top J \epsilon`; ``None`` stands for the D basis vectors, so the result is
        :math:`J^\top` (the exact trace). Either way an ordinary differentiable graph: no double backward in
        training. ``affines``: one time's entry of :meth:`fold_time`, which then stands for ``t``.

        Example:
            >>> net = ODENet(3, (8,))
            >>> f, jac_t = net.forward_and_jacobian(torch.tensor(0.1), torch.randn(5, 3))
            >>> jac_t.shape
            torch.Size([5, 3, 3])
        """
        self._check_inputs(t, z, context)
        if z.dim() != 2:
            raise ValueError(f"z must have shape (N, {self.input_dim}), got {tuple(z.shape)}")
        if tangents is not None and (tangents.dim() != 3 or tangents.shape[::2] != (z.shape[0], self.input_dim)):
            raise ValueError(
                f"tangents must have shape ({z.shape[0]}, k, {self.input_dim}), got {tuple(tangents.shape)}"
            )
        return self._propagate(t, z, tangents, context, True, affines)

    def _propagate(self, t: Tensor, z: Tensor, tangents, context, jvp: bool, affines) -> tuple[Tensor, Tensor | None]:
        """The output and, if ``jvp``, the tangents ``(N, k, D)`` pushed through every layer."""
        if affines is None:  # else the folded terms stand for the time features
            t = time_features(t.to(z), self.frequencies)
        images, last = len(self._layer_shape) > 1, len(self.layers) - 1  # a conv net's layers see (C, H, W)
        h = z.reshape(*z.shape[:-1], *self._layer_shape) if images else z
        pushed = (
            tangents.reshape(*tangents.shape[:2], *self._layer_shape) if images and tangents is not None else tangents
        )
        for i, layer in enumerate(self.layers):
            pre, pushed = self._layer(i, layer, t, h, pushed, context, jvp, None if affines is None else affines[i])
            h = pre if i == last else ACTIVATIONS[self.activation](pre)
            if jvp and i < last:
                pushed = _ACTIVATION_JVPS[self.activation](pushed, pre.unsqueeze(1), h.unsqueeze(1))
        if jvp and (images or pushed.shape[0] != z.shape[0]):  # (1 or N, k, ...) -> (N, k, D)
            pushed = pushed.expand(z.shape[0], *pushed.shape[1:]).reshape(z.shape[0], pushed.shape[1], -1)
        return (h.reshape(z.shape) if images else h), pushed

    def _layer(self, i: int, layer: nn.Module, t: Tensor, h: Tensor, tangents, context, jvp: bool, affine) -> tuple:
        """Pre-activation of ``layer`` (the ``i``-th) and, if ``jvp``, the tangents pushed through it."""
        return layer.forward_and_jvp(t, h, tangents, context, jvp, affine)


class AmortizedLowRankODENet(ODENet):
    r"""An :class:`ODENet` whose weights are shifted per data point by amortized low-rank terms.

    Each layer :math:`l` adds a data-point-specific rank-:math:`r` linear map and bias to the shared
    time-conditioned layer,

    .. math:: h_{l+1} = \sigma\Big(\mathrm{layer}_l(t, h_l) + \frac{h_l U_l V_l}{\sqrt{d_l r}} + b_l\Big),

    with :math:`U_l \in \mathbb{R}^{d_l \times r}`, :math:`V_l \in \mathbb{R}^{r \times d_{l+1}}` and
    :math:`b_l` read from the context: the context *is* the vector of all :math:`(U_l, V_l, b_l)`, produced
    from encoder features by an amortizing network (FFJORD, Grathwohl et al., 2019, Sec. 4.2:
    "amortized low-rank" CNF posteriors for VAEs). :attr:`context_dim` is its size. The factor
    :math:`1/\sqrt{d_l r}` keeps the low-rank term on the scale of a default-initialized layer when the
    entries of :math:`U_l, V_l` are of order one.

    Args:
        input_dim: dimension D of the state ``z``.
        hidden_dims: widths of the hidden layers.
        rank: rank :math:`r` of the per-data-point weight updates.
        layer: time-conditioning scheme of the shared layers, one of :data:`LAYERS`.
        activation: nonlinearity between layers, one of :data:`ACTIVATIONS`.
        time_frequencies: sinusoidal time features of the shared layers (see :class:`ODENet`).

    Example:
        >>> net = AmortizedLowRankODENet(2, (16,), rank=3)
        >>> net.context_dim  # (2 + 16) * 3 + 16  +  (16 + 2) * 3 + 2
        126
        >>> net(torch.tensor(0.5), torch.randn(10, 2), torch.randn(10, net.context_dim)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (512, 512),
        rank: int = 1,
        layer: str = "concat",
        activation: str = "tanh",
        time_frequencies: int = 0,
    ) -> None:
        super().__init__(input_dim, hidden_dims, 0, layer, activation, time_frequencies)
        self.rank = check_int("rank", rank)
        widths = (input_dim, *self._hidden_dims, input_dim)
        self._shapes = list(zip(widths[:-1], widths[1:]))
        self._split = [n for w_in, w_out in self._shapes for n in (w_in * rank, rank * w_out, w_out)]
        self.context_dim = sum(self._split)

    def _layer(self, i: int, layer: nn.Module, t: Tensor, h: Tensor, tangents, context, jvp: bool, affine) -> tuple:
        u, v, b = context.split(self._split, dim=-1)[3 * i : 3 * i + 3]  # layer i's U (N, d_in r), V, bias
        (w_in, w_out), r = self._shapes[i], self.rank
        u, v = u.view(-1, w_in, r) / math.sqrt(w_in * r), v.view(-1, r, w_out)
        pre, jvp_out = super()._layer(i, layer, t, h, tangents, None, jvp, affine)
        pre = pre + torch.bmm(torch.bmm(h.unsqueeze(1), u), v).squeeze(1) + b
        if jvp:  # tangents (N, k, in) -> (N, k, out); the identity gives (U V) itself
            jvp_out = jvp_out + torch.bmm(u if tangents is None else torch.bmm(tangents, u), v)
        return pre, jvp_out
