"""The flow-matching U-Net: per-sample time, the identity at initialization, shapes and errors."""

import pyro.distributions as dist
import pytest
import torch

import pyro_ffjord as pf


def test_per_sample_time_matches_per_sample_loop(float64):
    net = pf.UNet((2, 4, 4), channels=(4, 8)).double()
    torch.nn.init.normal_(net.out.weight)  # non-trivial output
    t, z = torch.rand(3), torch.randn(3, 32)
    f = net(t, z)
    for i in range(3):
        torch.testing.assert_close(f[i], net(t[i], z[i : i + 1])[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(net(t[:1], z[:1]), net(t[1:2], z[:1]))  # the time matters


def test_untrained_flow_is_the_identity_and_trains_by_flow_matching():
    net = pf.UNet((1, 4, 4), channels=(4, 8), time_frequencies=2)
    cnf = pf.FFJORD(net, 16, divergence="exact")
    x = torch.randn(5, 16)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(16), 1.0).to_event(1), [cnf])
    with torch.no_grad():
        torch.testing.assert_close(d.log_prob(x), dist.Normal(0.0, 1.0).log_prob(x).sum(-1))
    pf.flow_matching_loss(cnf, x).backward()
    assert net.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(1, 6, 6), channels=(4, 8, 8)), "divisible by 4"),
        (dict(input_shape=(1, 4)), "input_shape must be 3 positive integers"),
        (dict(input_shape=(1, 4, 4), channels=(4, 0)), "channels must be positive integers"),
        (dict(input_shape=(1, 4, 4), time_frequencies=-1), "time_frequencies"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pf.UNet(**kwargs)


def test_bad_inputs_are_named():
    net = pf.UNet((1, 4, 4), channels=(4,))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 16\)"):
        net(torch.tensor(0.0), torch.randn(2, 15))
    with pytest.raises(ValueError, match="t must have one element or the batch shape"):
        net(torch.rand(3), torch.randn(2, 16))
