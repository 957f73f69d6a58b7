"""The 2-D toy densities of the FFJORD paper (Grathwohl et al., 2019, Fig. 2), sampled with a seed.

They are defined by their samplers, as in the paper's code; ``8gaussians`` and ``checkerboard``
also have a closed-form density, used to report the true negative log-likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int

TOY_DATASETS = ("8gaussians", "2spirals", "checkerboard", "moons", "pinwheel", "circles", "rings", "swissroll")

_SQRT2 = math.sqrt(2.0)


def _eight_centers() -> Tensor:
    s = 1.0 / _SQRT2
    unit = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)], dtype=torch.float64)
    return 4.0 * unit / 1.414


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    centers = _eight_centers()
    index = torch.randint(0, 8, (n,), generator=g)
    return centers[index] + torch.randn(n, 2, generator=g, dtype=torch.float64) * (0.5 / 1.414)


def _two_spirals(n: int, g: torch.Generator) -> Tensor:
    angle = torch.sqrt(torch.rand(n, 1, generator=g, dtype=torch.float64)) * 540 * (2 * math.pi) / 360
    x = -torch.cos(angle) * angle + torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.5
    y = torch.sin(angle) * angle + torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.5
    arm = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0).to(torch.float64)
    return arm * torch.cat([x, y], 1) / 3 + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _moons(n: int, g: torch.Generator) -> Tensor:
    angle = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], 1) + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1
    return points * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def _pinwheel(n: int, g: torch.Generator) -> Tensor:
    num_classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    angles = torch.arange(num_classes, dtype=torch.float64) * 2 * math.pi / num_classes
    label = torch.randint(0, num_classes, (n,), generator=g)
    features = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([radial_std, tangential_std])
    features[:, 0] += 1.0
    rotation = angles[label] + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    rotated = torch.stack([cos * features[:, 0] - sin * features[:, 1], sin * features[:, 0] + cos * features[:, 1]], 1)
    return 2 * rotated


def _circles(n: int, g: torch.Generator) -> Tensor:
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    radius = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.5).to(torch.float64)
    points = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * radius[:, None]
    return 3 * (points + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.08)


def _rings(n: int, g: torch.Generator) -> Tensor:
    radius = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)[torch.randint(0, 4, (n,), generator=g)]
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    points = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * radius[:, None] * 3
    return points + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.08


def _swissroll(n: int, g: torch.Generator) -> Tensor:
    angle = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    points = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], 1)
    return (points + torch.randn(n, 2, generator=g, dtype=torch.float64)) / 5


_SAMPLERS = {
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "rings": _rings,
    "swissroll": _swissroll,
}


def sample_toy(name: str, n: int, seed: int) -> Tensor:
    """Draws ``n`` points of the toy density ``name`` (float64, shape ``(n, 2)``) with a seed."""
    if name not in _SAMPLERS:
        raise ValueError(f"toy dataset must be one of {list(TOY_DATASETS)}, got {name!r}")
    check_int("n", n)
    return _SAMPLERS[name](n, torch.Generator().manual_seed(seed))


def toy_log_density(name: str, x: Tensor) -> Tensor | None:
    """The exact log-density of ``8gaussians`` and ``checkerboard`` at ``x``; None for the others."""
    x = x.to(torch.float64)
    if name == "8gaussians":
        std = 0.5 / 1.414
        sq = (x[:, None, :] - _eight_centers().to(x.device)).pow(2).sum(-1)
        log_component = -sq / (2 * std**2) - 2 * math.log(std) - math.log(2 * math.pi)
        return torch.logsumexp(log_component, 1) - math.log(8)
    if name == "checkerboard":
        u = x / 2
        column = torch.floor(u[:, 0])
        row_parity = torch.floor(u[:, 1] - column % 2) % 2
        inside = (u[:, 0] >= -2) & (u[:, 0] < 2) & (u[:, 1] >= -2) & (u[:, 1] < 2) & (row_parity == 0)
        return torch.where(inside, -math.log(32.0), -math.inf)
    return None
