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


def _conditioner(t: Tensor, x: Tensor, context: Tensor | None) -> Tensor:
    """The time and the context as one ``(N, 1 + C)`` input; without context, a single ``(1, 1)`` row.

    Without context the conditioning is the same for the whole batch, so it is computed once and
    broadcast rather than repeated N times.
    """
    tt = t.to(x).reshape(1, 1)
    return tt if context is None else torch.cat([tt.expand(x.shape[:-1] + (1,)), context], dim=-1)


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


class SquashLinear(nn.Module):
    r"""Linear layer gated by the time and context: :math:`h = (W x + b) \odot \sigma(A [t, c] + a)`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1 + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(_conditioner(t, x, context)))


class ConcatLinear(nn.Module):
    r"""Linear layer on the concatenation of input, time and context: :math:`h = W [x, t, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1 + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        c = _conditioner(t, x, context)
        return self.linear(torch.cat([x, c.expand(x.shape[:-1] + c.shape[-1:])], dim=-1))


class IgnoreLinear(nn.Module):
    r"""Autonomous linear layer (time is ignored): :math:`h = W [x, c] + b`."""

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + context_dim, out_features)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.linear(x if context is None else torch.cat([x, context], dim=-1))


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
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h, context)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


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
        self._shapes = [(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])]
        self._split = [n for w_in, w_out in self._shapes for n in (w_in * rank, rank * w_out, w_out)]
        self.context_dim = sum(self._split)

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None or context.shape[-1] != self.context_dim:
            raise ValueError(f"context (the amortized weights) must have shape (N, {self.context_dim})")
        params = context.split(self._split, dim=-1)
        h = z
        for i, (layer, (w_in, w_out)) in enumerate(zip(self.layers, self._shapes)):
            u, v, b = params[3 * i : 3 * i + 3]
            hu = torch.einsum("ni,nir->nr", h, u.view(-1, w_in, self.rank))
            low_rank = torch.einsum("nr,nro->no", hu, v.view(-1, self.rank, w_out)) / math.sqrt(w_in * self.rank)
            h = layer(t, h) + low_rank + b
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
