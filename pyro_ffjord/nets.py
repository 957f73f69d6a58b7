"""Time- (and context-) conditioned networks for the CNF dynamics ``f(z, t[, context])``.

Each layer maps ``(t, x, context)`` to a hidden representation; the conditioning scheme is
chosen by name (see :data:`LAYERS`). The layer types follow the FFJORD reference code
(Grathwohl et al., 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def _activation_derivative(activation: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """The derivative of one of :data:`ACTIVATIONS` at ``pre``, given also its value ``out`` there."""
    if isinstance(activation, nn.Tanh):
        return 1 - out.pow(2)
    if isinstance(activation, nn.Softplus):
        return torch.sigmoid(pre * activation.beta).where(pre * activation.beta <= activation.threshold, 1.0)
    if isinstance(activation, nn.ELU):
        return torch.where(pre > 0, 1.0, out + activation.alpha)
    if isinstance(activation, nn.SiLU):
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    raise TypeError(f"no derivative for activation {type(activation).__name__}")


def _conditioner(t: Tensor, x: Tensor, context: Tensor | None) -> Tensor:
    """The time and the context as one ``(N, 1 + C)`` input; without context, a single ``(1, 1)`` row.

    Without context the conditioning is the same for the whole batch, so it is computed once and
    broadcast rather than repeated N times.
    """
    tt = t.to(x).reshape(1, 1)
    return tt if context is None else torch.cat([tt.expand(x.shape[:-1] + (1,)), context], dim=-1)


def _apply_weight(weight: Tensor, tangent: Tensor | None) -> Tensor:
    """``weight @ tangent`` for tangents ``(N, in, D)``; ``None`` stands for the identity (the first layer)."""
    if tangent is None:
        return weight.unsqueeze(0)
    return torch.einsum("oi,nid->nod", weight, tangent)


class ConcatSquashLinear(nn.Module):
    r"""Linear layer gated and shifted by the time and context.

    .. math:: h = (W x + b) \odot \sigma(A [t, c] + a) + B [t, c]
    """

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1 + context_dim, out_features)
        self.shift = nn.Linear(1 + context_dim, out_features, bias=False)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        c = _conditioner(t, x, context)
        return self.linear(x) * torch.sigmoid(self.gate(c)) + self.shift(c)

    def jvp(self, t: Tensor, x: Tensor, tangent: Tensor | None, context: Tensor | None = None) -> Tensor:
        """The layer's Jacobian in ``x`` times ``tangent`` ``(N, in, D)`` (see :meth:`ODENet.forward_and_jacobian`)."""
        gate = torch.sigmoid(self.gate(_conditioner(t, x, context)))
        return _apply_weight(self.linear.weight, tangent) * gate.unsqueeze(-1)


class SquashLinear(nn.Module):
    r"""Linear layer gated by the time and context: :math:`h = (W x + b) \odot \sigma(A [t, c] + a)`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1 + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(_conditioner(t, x, context)))

    def jvp(self, t: Tensor, x: Tensor, tangent: Tensor | None, context: Tensor | None = None) -> Tensor:
        """The layer's Jacobian in ``x`` times ``tangent``, shape ``(N, in, D)``."""
        gate = torch.sigmoid(self.gate(_conditioner(t, x, context)))
        return _apply_weight(self.linear.weight, tangent) * gate.unsqueeze(-1)


class ConcatLinear(nn.Module):
    r"""Linear layer on the concatenation of input, time and context: :math:`h = W [x, t, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1 + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        c = _conditioner(t, x, context)
        return self.linear(torch.cat([x, c.expand(x.shape[:-1] + c.shape[-1:])], dim=-1))

    def jvp(self, t: Tensor, x: Tensor, tangent: Tensor | None, context: Tensor | None = None) -> Tensor:
        """The layer's Jacobian in ``x`` times ``tangent``, shape ``(N, in, D)``."""
        return _apply_weight(self.linear.weight[:, : x.shape[-1]], tangent)


class IgnoreLinear(nn.Module):
    r"""Autonomous linear layer (time is ignored): :math:`h = W [x, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.linear(x if context is None else torch.cat([x, context], dim=-1))

    def jvp(self, t: Tensor, x: Tensor, tangent: Tensor | None, context: Tensor | None = None) -> Tensor:
        """The layer's Jacobian in ``x`` times ``tangent``, shape ``(N, in, D)``."""
        return _apply_weight(self.linear.weight[:, : x.shape[-1]], tangent)


LAYERS: dict[str, type[nn.Module]] = {
    "concatsquash": ConcatSquashLinear,
    "squash": SquashLinear,
    "concat": ConcatLinear,
    "ignore": IgnoreLinear,
}


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


class ODENet(nn.Module):
    r"""Multilayer perceptron ``f(t, z[, context])`` whose every layer sees the time (and context).

    Args:
        input_dim: dimension D of the state ``z``.
        hidden_dims: widths of the hidden layers.
        context_dim: dimension of the context (0 for an unconditional flow).
        layer: time-conditioning scheme, one of :data:`LAYERS`.
        activation: nonlinearity between layers, one of :data:`ACTIVATIONS`.

    Example:
        >>> net = ODENet(2, (16, 16))
        >>> net(torch.tensor(0.5), torch.randn(10, 2)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64, 64),
        context_dim: int = 0,
        layer: str = "concatsquash",
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("context_dim", context_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "input_dim"):
                raise ValueError(f"{name} must be a non-negative integer (positive for input_dim), got {value!r}")
        if not isinstance(hidden_dims, Sequence) or isinstance(hidden_dims, str):
            raise TypeError(f"hidden_dims must be a sequence of positive integers, got {hidden_dims!r}")
        hidden_dims = tuple(hidden_dims)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be a sequence of positive integers, got {hidden_dims!r}")
        check_choice("layer", layer, LAYERS)
        check_choice("activation", activation, ACTIVATIONS)
        self.input_dim = input_dim
        self.context_dim = context_dim
        self._hidden_dims = hidden_dims
        widths = (input_dim, *hidden_dims, input_dim)
        self.layers = nn.ModuleList(
            LAYERS[layer](w_in, w_out, context_dim) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._evaluate(t, z, context, jacobian=False)[0]

    def forward_and_jacobian(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""``f(t, z)`` and its Jacobian :math:`\partial f / \partial z`, shape ``(N, D, D)``.

        Forward-mode propagation through the layers, :math:`J_{l+1} = \sigma'(a_l) \odot (W_l J_l)`: one
        batched matrix product per layer gives the exact trace, where autograd needs D vector-Jacobian
        products. It is an ordinary differentiable graph, so the exact-trace dynamics need no
        ``create_graph`` and, under ``torch.no_grad``, record nothing at all.

        Example:
            >>> net = ODENet(3, (8,))
            >>> f, jac = net.forward_and_jacobian(torch.tensor(0.1), torch.randn(5, 3))
            >>> jac.shape
            torch.Size([5, 3, 3])
        """
        return self._evaluate(t, z, context, jacobian=True)

    def _preactivation(self, i: int, t: Tensor, h: Tensor, context: Tensor | None) -> Tensor:
        return self.layers[i](t, h, context)

    def _preactivation_jvp(
        self, i: int, t: Tensor, h: Tensor, tangent: Tensor | None, context: Tensor | None
    ) -> Tensor:
        return self.layers[i].jvp(t, h, tangent, context)

    def _evaluate(self, t: Tensor, z: Tensor, context: Tensor | None, jacobian: bool) -> tuple[Tensor, Tensor | None]:
        h, jac = z, None
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            pre = self._preactivation(i, t, h, context)
            if jacobian:
                jac = self._preactivation_jvp(i, t, h, jac, context)
            h = pre if i == last else self.activation(pre)
            if jacobian and i < last:
                jac = jac * _activation_derivative(self.activation, pre, h).unsqueeze(-1)
        if jacobian:
            jac = jac.expand(z.shape[0], -1, -1)
        return h, jac


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
    ) -> None:
        super().__init__(input_dim, hidden_dims, 0, layer, activation)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank
        widths = (input_dim, *self._hidden_dims, input_dim)
        self._shapes = list(zip(widths[:-1], widths[1:]))
        self._split = [n for w_in, w_out in self._shapes for n in (w_in * rank, rank * w_out, w_out)]
        self.context_dim = sum(self._split)

    def _low_rank(self, i: int, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``i``'s amortized ``U / sqrt(d r)``, shape ``(N, d_in, r)``, ``V`` ``(N, r, d_out)`` and bias."""
        if context is None or context.shape[-1] != self.context_dim:
            raise ValueError(f"context (the amortized weights) must have shape (N, {self.context_dim})")
        u, v, b = context.split(self._split, dim=-1)[3 * i : 3 * i + 3]
        w_in, w_out = self._shapes[i]
        return u.view(-1, w_in, self.rank) / math.sqrt(w_in * self.rank), v.view(-1, self.rank, w_out), b

    def _preactivation(self, i: int, t: Tensor, h: Tensor, context: Tensor | None) -> Tensor:
        u, v, b = self._low_rank(i, context)
        return self.layers[i](t, h) + torch.bmm(torch.bmm(h.unsqueeze(1), u), v).squeeze(1) + b

    def _preactivation_jvp(
        self, i: int, t: Tensor, h: Tensor, tangent: Tensor | None, context: Tensor | None
    ) -> Tensor:
        u, v, _ = self._low_rank(i, context)
        low_rank = torch.bmm(
            v.transpose(1, 2), u.transpose(1, 2) if tangent is None else torch.bmm(u.transpose(1, 2), tangent)
        )
        return self.layers[i].jvp(t, h, tangent) + low_rank
