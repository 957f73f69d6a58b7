r"""A time-conditioned U-Net (Ronneberger et al., 2015), as in diffusion models and flow matching: the field of one
CNF over a whole image, which flow matching trains (no single path describes :class:`~pyro_ffjord.MultiscaleFFJORD`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import check_int, positive_ints
from .nets import _check_time, time_features


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _ResidualBlock(nn.Module):
    """Two 3x3 convolutions with group norms and SiLU, and a skip; the time embedding scales and shifts the
    second norm's output per channel (after the norm, which would otherwise remove a per-channel shift)."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        scale, shift = self.time(embedding)[..., None, None].chunk(2, dim=1)
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        return self.skip(x) + self.conv2(F.silu(torch.addcmul(shift, h, 1 + scale)))


class UNet(nn.Module):
    r"""Time-conditioned U-Net ``f(t, z)`` on flattened images ``(N, C*H*W)``, for :class:`~pyro_ffjord.FFJORD`.

    One residual block per resolution on the way down (halving the resolution between them) and on the way
    up (with the skip connection of its resolution), one in the middle; every block is modulated by a learned embedding
    of the time features :math:`[t, \cos(\pi k t), \sin(\pi k t)]_{k=1}^K`. The output convolution starts at
    zero, so the untrained flow is the identity. ``t`` is one time or one per image ``(N,)``.

    Args:
        input_shape: ``(C, H, W)``; H and W divisible by :math:`2^{\text{len(channels)} - 1}`.
        channels: channels of each resolution, from the finest.
        time_frequencies: K, the number of sinusoidal time features.

    Example:
        >>> net = UNet((1, 8, 8), channels=(8, 16))
        >>> net(torch.rand(3), torch.randn(3, 64)).shape
        torch.Size([3, 64])
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64, 64), time_frequencies: int = 8):
        super().__init__()
        self.input_shape = positive_ints("input_shape", input_shape, 3)
        channels = positive_ints("channels", channels)
        check_int("time_frequencies", time_frequencies, least=0)
        c, h, w = self.input_shape
        factor = 2 ** (len(channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"input_shape {self.input_shape}: H and W must be divisible by {factor} for {channels=}")
        self.input_dim = c * h * w
        frequencies = math.pi * torch.arange(1, time_frequencies + 1) if time_frequencies else None
        self.register_buffer("frequencies", frequencies)
        embedding_dim = 4 * channels[0]
        self.embed = nn.Sequential(
            nn.Linear(1 + 2 * time_frequencies, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.stem = nn.Conv2d(c, channels[0], 3, padding=1)
        widths = [channels[0], *channels]
        self.down = nn.ModuleList(_ResidualBlock(a, b, embedding_dim) for a, b in zip(widths[:-1], widths[1:]))
        self.downsample = nn.ModuleList(nn.Conv2d(ch, ch, 3, stride=2, padding=1) for ch in channels[:-1])
        self.middle = _ResidualBlock(channels[-1], channels[-1], embedding_dim)
        self.up = nn.ModuleList(_ResidualBlock(2 * ch, ch, embedding_dim) for ch in channels)
        self.upsample = nn.ModuleList(nn.Conv2d(b, a, 3, padding=1) for a, b in zip(channels[:-1], channels[1:]))
        self.out_norm, self.out = _norm(channels[0]), nn.Conv2d(channels[0], c, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[-1] != self.input_dim:
            raise ValueError(f"z must have shape (N, {self.input_dim}), got {tuple(z.shape)}")
        _check_time(t, z.shape[:-1])
        embedding = self.embed(time_features(t.to(z), self.frequencies)).expand(z.shape[0], -1)
        h = self.stem(z.reshape(-1, *self.input_shape))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, embedding)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, embedding)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), embedding)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h))).reshape(z.shape)
