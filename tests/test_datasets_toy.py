import math

import pytest
import torch

from pyro_ffjord.datasets.toy import TOY_DATASETS, sample_toy, toy_log_density


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_samples_are_seeded_and_finite(name):
    x = sample_toy(name, 1001, seed=3)
    assert x.shape == (1001, 2) and x.dtype == torch.float64 and torch.isfinite(x).all()
    assert torch.equal(x, sample_toy(name, 1001, seed=3))
    assert not torch.equal(x, sample_toy(name, 1001, seed=4))
    assert 0.3 < x.std() < 4  # on the scale of a standard normal base


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard"])
def test_known_densities_normalize_and_match_samples(name):
    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = toy_log_density(name, points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=0.01)
    log_p = toy_log_density(name, sample_toy(name, 20000, seed=0))
    assert torch.isfinite(log_p).all()  # every sample lies where the density is positive


def test_true_nll_values():
    assert -toy_log_density("checkerboard", sample_toy("checkerboard", 1000, 0)).mean() == pytest.approx(math.log(32))
    nll = -toy_log_density("8gaussians", sample_toy("8gaussians", 200000, 0)).mean()
    # entropy of 8 nearly separated isotropic Gaussians with std 0.5/1.414: about log 8 + log(2 pi e s^2)
    assert nll.item() == pytest.approx(math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2), abs=0.02)


def test_unknown_densities_and_bad_arguments():
    assert toy_log_density("moons", torch.zeros(3, 2)) is None
    with pytest.raises(ValueError, match="toy dataset must be one of"):
        sample_toy("spiral", 10, 0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_toy("moons", 0, 0)
