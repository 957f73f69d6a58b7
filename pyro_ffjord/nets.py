"""Time- (and context-) conditioned networks for the CNF dynamics ``f(z, t[, context])``.

Each layer maps ``(t, x, context)`` to a hidden representation; the conditioning scheme is
chosen by name (see :data:`LAYERS`). The layer types follow the FFJORD reference code
(Grathwohl et al., 2019).
"""

from __future__ import annotations

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
