r"""Multiscale FFJORD for images: conv dynamics, squeeze, factor-out, logit pre-processing, bits/dim.

The architecture of the FFJORD image experiments (Grathwohl et al., 2019, Sec. 5.2), itself RealNVP's (Dinh et
al., 2017): from data to base, images in :math:`[0, 1]` go through a logit, then each scale applies CNF blocks, a
squeeze :math:`(C, H, W) \to (4C, H/2, W/2)`, more CNF blocks, and sends half of the channels directly to the base.
Every block is a :class:`~pyro_ffjord.dynamics.ContinuousFlow` whose dynamics are a time-conditioned conv net, so
the trace estimators, RNODE regularizers and :func:`~pyro_ffjord.solver_settings` apply unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform
from torch.distributions.transforms import AffineTransform, ComposeTransform, IndependentTransform, SigmoidTransform
from torch.nn import functional as F

from ._checks import check_int, check_number, check_tensor, positive_ints
from .dynamics import ContinuousFlow, Solution
from .nets import ODENet, _cat, _ConditionedLinear
from .transforms import _CNFTransform


class ConcatConv2d(nn.Module):
    r"""3x3 convolution of the image with the time (and context) as constant channels: :math:`h = W * [x, t, c]`."""

    def __init__(self, in_channels: int, out_channels: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + time_dim + context_dim, out_channels, kernel_size=3, padding=1)

    def forward_and_jvp(
        self,
        t: Tensor,
        x: Tensor,
        tangents: Tensor | None,
        context: Tensor | None = None,
        jvp: bool = True,
        affine: None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The output and, if ``jvp``, the tangents ``(N, k, C, H, W)`` pushed through the convolution (the time
        channels are no per-channel term: there is no ``affine`` to fold)."""
        c = _cat(t.to(x), context)
        out = self.conv(torch.cat([x, c.reshape(-1, c.shape[-1], 1, 1).expand(x.shape[0], -1, *x.shape[2:])], dim=1))
        return out, _conv(tangents, self.conv.weight[:, : x.shape[1]]) if jvp else None


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """3x3 convolution with same padding of images ``(..., C, H, W)``."""
    return F.conv2d(x.flatten(0, -4), weight, bias, padding=1).unflatten(0, x.shape[:-3])


class ConcatSquashConv2d(_ConditionedLinear):
    r"""3x3 convolution, gated and shifted per channel by the time (and context), as :class:`ConcatSquashLinear`.

    .. math:: h = (W * x + b) \odot \sigma(A [t, c] + a) + B [t, c]
    """

    spatial = (None, None)

    def __init__(self, in_channels: int, out_channels: int, context_dim: int = 0, time_dim: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.gate = nn.Linear(time_dim + context_dim, out_channels)
        self.shift = nn.Linear(time_dim + context_dim, out_channels, bias=False)

    def map(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return _conv(x, weight, bias)

    def terms(self, t: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = _cat(torch.atleast_1d(t), context)
        return self.conv.weight, self.conv.bias, torch.sigmoid(self.gate(c)), self.shift(c)


CONV_LAYERS: dict[str, type[nn.Module]] = {"concat": ConcatConv2d, "concatsquash": ConcatSquashConv2d}


class ConvODENet(ODENet):
    r"""Time-conditioned conv net ``f(t, z)`` on flattened images, for :class:`ContinuousFlow`.

    The flat state ``(N, C*H*W)`` is viewed as ``(N, C, H, W)``, passed through 3x3 convolutions
    (stride 1, same padding) whose every layer sees the time, and flattened back: an
    :class:`~pyro_ffjord.ODENet` whose layers are convolutions.

    Args:
        input_shape: ``(C, H, W)``.
        hidden_channels: channels of the hidden layers.
        layer: time conditioning, one of :data:`CONV_LAYERS`.
        activation: nonlinearity, one of :data:`~pyro_ffjord.nets.ACTIVATIONS`.

    The time ``t`` is one element for the whole batch or one per image, shape ``(N,)``.

    Example:
        >>> net = ConvODENet((1, 4, 4), (8, 8))
        >>> net(torch.tensor(0.5), torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    _layer_types = CONV_LAYERS
    fold_time = None  # the time terms are folded one evaluation at a time

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: Sequence[int] = (64, 64, 64),
        layer: str = "concat",
        activation: str = "softplus",
    ) -> None:
        shape = positive_ints("input_shape", input_shape, 3)
        super().__init__(shape[0], positive_ints("hidden_channels", hidden_channels), 0, layer, activation)
        self.input_shape = self._layer_shape = shape
        self.input_dim = math.prod(shape)

    def forward_and_jacobian(self, t: Tensor, z: Tensor, tangents: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""As :meth:`~pyro_ffjord.nets.ODENet.forward_and_jacobian`: k extra images per image through the same
        convolutions (``tangents=None``: the D basis vectors, for small images only)."""
        if tangents is None:
            tangents = torch.eye(self.input_dim, dtype=z.dtype, device=z.device).expand(z.shape[0], -1, -1)
        return super().forward_and_jacobian(t, z, None, tangents)


class Squeeze(Transform):
    r"""Space-to-depth: each 2x2 patch becomes 4 channels, :math:`(C, H, W) \to (4C, H/2, W/2)`.

    A permutation of the pixels, so :math:`\log|\det J| = 0`. Channel ``4c + 2i + j`` of the output
    holds pixel ``(2h + i, 2w + j)`` of channel ``c``, as in the FFJORD code's ``SqueezeLayer``.
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    bijective = True

    def _call(self, x: Tensor) -> Tensor:
        c, h, w = x.shape[-3:]
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got an image of shape {(c, h, w)}")
        return F.pixel_unshuffle(x, 2)

    def _inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-3])


class LogitTransform(ComposeTransform):
    r"""Maps images in :math:`[0, 1]` to the real line: :math:`y = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right|
        = \sum_i \log(1 - 2\alpha) - \log s_i - \log(1 - s_i), \quad s = \alpha + (1 - 2\alpha) x.

    Its domain is :math:`[0, 1]` widened by :math:`\alpha / (1 - 2\alpha)` on each side, the image of
    its inverse. The :math:`\alpha` keeps the logit finite at 0 and 1 (RealNVP, Dinh et al., 2017; FFJORD uses
    :math:`\alpha = 10^{-6}`). The composition of torch's affine and inverse sigmoid transforms, whose log-det
    (:math:`-\operatorname{softplus}(-y) - \operatorname{softplus}(y)` for the sigmoid) is stable for any :math:`y`.

    Args:
        alpha: in :math:`(0, 1/2)`.
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        check_number("alpha", alpha, high=0.5)
        self.alpha = float(alpha)
        affine = AffineTransform(self.alpha, 1 - 2 * self.alpha, event_dim=3)
        super().__init__([affine, IndependentTransform(SigmoidTransform().inv, 3)])

    @property
    def domain(self) -> constraints.Constraint:
        margin = self.alpha / (1 - 2 * self.alpha)  # what the logit accepts and its inverse returns
        return constraints.independent(constraints.interval(-margin, 1 + margin), 3)


class MultiscaleFFJORD(_CNFTransform, TransformModule):
    r"""Multiscale FFJORD on images (Grathwohl et al., 2019, Sec. 5.2), a Pyro transform with ``event_dim=3``.

    From data :math:`x \in [0, 1]^{C \times H \times W}` (dequantized pixels) to base :math:`z`:
    :math:`y = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`; then for each scale, ``n_blocks`` CNF
    blocks, a :class:`Squeeze` and ``n_blocks`` more CNF blocks, after which half of the channels go
    to the base (the last scale has no squeeze and sends everything). The base is the concatenation
    of the factored-out parts, flattened in order and shaped like the input, so that

    .. math:: \log p(x) = \log \mathcal{N}(z; 0, I) + \log\left|\det \frac{\partial z}{\partial x}\right|,

    with the blocks' log-determinants as in :class:`~pyro_ffjord.FFJORD` (cached the same way: one solve per block
    for ``log_prob(x)`` or ``log_prob(rsample())``) and the logit's exact. ``t.inv(images)`` maps data to base.

    Args:
        input_shape: ``(C, H, W)``; H and W must be divisible by :math:`2^{n\_scales - 1}`.
        n_scales: number of scales (squeezes + 1).
        n_blocks: CNF blocks before and after each squeeze.
        hidden_channels: hidden conv channels of each block's dynamics; an int ``h`` means ``(h, h, h)``.
        layer: time conditioning of the conv layers, ``"concat"`` or ``"concatsquash"``.
        activation: nonlinearity of the conv nets, see :data:`~pyro_ffjord.nets.ACTIVATIONS`.
        alpha: the :class:`LogitTransform`'s :math:`\alpha`.
        **options: CNF options of every block, as for :class:`~pyro_ffjord.FFJORD`.

    Example:
        >>> import pyro.distributions as dist
        >>> t = MultiscaleFFJORD((1, 4, 4), n_scales=2, n_blocks=1, hidden_channels=(8,))
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [t])
        >>> images = d.rsample((5,))
        >>> images.shape, d.log_prob(images).shape
        (torch.Size([5, 1, 4, 4]), torch.Size([5]))
    """

    domain = constraints.independent(constraints.real, 3)

    def __init__(
        self,
        input_shape: Sequence[int],
        n_scales: int = 2,
        n_blocks: int = 2,
        hidden_channels: int | Sequence[int] = 64,
        layer: str = "concat",
        activation: str = "softplus",
        alpha: float = 1e-6,
        **options: Any,
    ) -> None:
        super().__init__(cache_size=0)
        c, h, w = positive_ints("input_shape", input_shape, 3)
        check_int("n_scales", n_scales)
        check_int("n_blocks", n_blocks)
        factor = 2 ** (n_scales - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"input_shape {(c, h, w)}: height and width must be divisible by 2**(n_scales - 1) = {factor} "
                f"for n_scales={n_scales}"
            )
        if isinstance(hidden_channels, int) and not isinstance(hidden_channels, bool):
            hidden_channels = (hidden_channels,) * 3
        hidden_channels = positive_ints("hidden_channels", hidden_channels)
        self.input_shape = (c, h, w)
        self.logit = LogitTransform(alpha)
        self.codomain = self.logit.domain  # the support of the images: [0, 1], up to the logit's margin
        self.squeeze = Squeeze()

        def blocks(shape: tuple[int, int, int], count: int) -> nn.ModuleList:
            net = (ConvODENet(shape, hidden_channels, layer, activation) for _ in range(count))
            return nn.ModuleList(ContinuousFlow(n, math.prod(shape), **options) for n in net)

        pre, post, out_shapes = [], [], []
        for scale in range(n_scales):
            pre.append(blocks((c, h, w), n_blocks))
            if scale < n_scales - 1:
                c, h, w = 4 * c, h // 2, w // 2
                post.append(blocks((c, h, w), n_blocks))
                c //= 2
            out_shapes.append((c, h, w))
        self.pre = nn.ModuleList(pre)  # blocks of each scale before its squeeze
        self.post = nn.ModuleList(post)  # blocks after the squeeze, before the factor-out
        self.out_shapes = out_shapes  # shape of what each scale sends to the base

    @property
    def flows(self) -> list[ContinuousFlow]:
        """Every CNF block, in order from data to base."""
        stages = chain.from_iterable(zip(self.pre, [*self.post, []]))
        return [flow for stage in stages for flow in stage]

    def _read(self) -> list[Tensor]:
        return [*self.parameters(), *self.buffers()]

    @staticmethod
    def _integrate(
        flows: Sequence[ContinuousFlow], h: Tensor, logdet: Tensor | None, reverse: bool, solutions: list[Solution]
    ) -> tuple[Tensor, Tensor | None]:
        """``h`` through ``flows``, adding their log-determinants to ``logdet`` (None: the states alone)."""
        for flow in reversed(flows) if reverse else flows:
            solution = flow(h.flatten(1), reverse=reverse, density=logdet is not None)
            solutions.append(solution)
            h, logdet = solution.y.reshape(h.shape), None if logdet is None else logdet + solution.logdet
        return h, logdet

    def _to_base(self, x: Tensor, solutions: list[Solution]) -> tuple[Tensor, Tensor]:
        h = self.logit(x)
        logdet = self.logit.log_abs_det_jacobian(x, h)
        parts = []
        for scale, blocks in enumerate(self.pre):
            h, logdet = self._integrate(blocks, h, logdet, False, solutions)
            if scale < len(self.post):
                h, logdet = self._integrate(self.post[scale], self.squeeze(h), logdet, False, solutions)
                h, out = h.chunk(2, dim=1)
                parts.append(out.flatten(1))
        return torch.cat([*parts, h.flatten(1)], dim=1), logdet

    def _to_data(self, z: Tensor, solutions: list[Solution], density: bool) -> tuple[Tensor, Tensor | None]:
        parts = z.split([math.prod(shape) for shape in self.out_shapes], dim=1)
        h = parts[-1].reshape(-1, *self.out_shapes[-1])
        logdet = z.new_zeros(z.shape[0]) if density else None
        for scale in reversed(range(len(self.pre))):
            if scale < len(self.post):
                h = torch.cat([h, parts[scale].reshape(-1, *self.out_shapes[scale])], dim=1)
                h, logdet = self._integrate(self.post[scale], h, logdet, True, solutions)
                h = self.squeeze.inv(h)
            h, logdet = self._integrate(self.pre[scale], h, logdet, True, solutions)
        x = self.logit.inv(h)
        return x, None if logdet is None else logdet - self.logit.log_abs_det_jacobian(x, h)

    def _solve(
        self, value: Tensor, name: str, reverse: bool, density: bool = True
    ) -> tuple[Tensor, Tensor | None, tuple[Solution, ...]]:
        check_tensor(name, value, self.input_shape, self.flows[0].log_T)
        if not reverse and not self.codomain.base_constraint.check(value).all():
            raise ValueError(f"{name} must hold pixels in [0, 1], e.g. from pyro_ffjord.dequantize")
        batch = value.shape[:-3]
        flat = value.reshape(-1, *self.input_shape)
        if flat.shape[0] == 0:
            return value.clone(), value.new_zeros(batch) if density else None, ()
        solutions: list[Solution] = []
        out, logdet = self._to_data(flat.flatten(1), solutions, density) if reverse else self._to_base(flat, solutions)
        return out.reshape(value.shape), None if logdet is None else logdet.reshape(batch), tuple(solutions)

    @property
    def T(self) -> Tensor:
        """The integration time of each block, data to base."""
        return torch.stack([f.T for f in self.flows])


def dequantize(images: Tensor, num_bins: int = 256, generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform dequantization of integer pixels: :math:`x = (k + u) / B`, :math:`u \sim U[0, 1)`.

    A density :math:`p` of :math:`x` on :math:`[0, 1)^D` gives the discrete model
    :math:`P(k) = \int_{[k, k+1)/B} p(x)\,dx` with :math:`\log P(k) \ge \mathbb{E}_u \log p(x) - D \log B`
    (Theis et al., 2016), the bound behind :func:`bits_per_dim`.

    Args:
        images: integer-valued pixels :math:`k \in \{0, \dots, B - 1\}` (any dtype), e.g. ``uint8``.
        num_bins: :math:`B`, 256 for 8-bit images.
        generator: random generator of the noise.

    Returns:
        Float pixels in :math:`[0, 1)`, the default float dtype unless ``images`` is floating point.
    """
    check_tensor("images", images)
    check_int("num_bins", num_bins, least=2)
    x = images if images.is_floating_point() else images.to(torch.get_default_dtype())
    if not ((x >= 0) & (x <= num_bins - 1) & (x == x.round())).all():
        raise ValueError(f"images must hold integers in [0, {num_bins - 1}] (num_bins={num_bins})")
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + noise) / num_bins


def bits_per_dim(log_prob: Tensor, num_dims: int, num_bins: int = 256) -> Tensor:
    r"""Bits per dimension of discrete data from the log-density of its dequantized version on :math:`[0, 1)^D`.

    .. math:: \text{bits/dim} = \frac{-\log p(x) + D \log B}{D \log 2},

    where :math:`x = (k + u) / B` (see :func:`dequantize`); the :math:`D \log B` is the Jacobian of the
    scaling by :math:`1 / B` (as in the FFJORD and RealNVP code). A model uniform on :math:`[0, 1)^D`
    scores :math:`\log_2 B` (8 for 8-bit data).

    Args:
        log_prob: :math:`\log p(x)` per image, in nats, any shape.
        num_dims: :math:`D`, the number of pixels times channels of one image.
        num_bins: :math:`B`, 256 for 8-bit images.

    Returns:
        Bits/dim with the shape of ``log_prob``.
    """
    check_int("num_dims", num_dims)
    check_int("num_bins", num_bins, least=2)
    check_tensor("log_prob", log_prob)
    return (-log_prob + num_dims * math.log(num_bins)) / (num_dims * math.log(2))
