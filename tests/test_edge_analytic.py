"""The closed-form denoisers reject parameters that have no distribution behind them."""

import math

import pytest
import torch

from edmfast.analytic import EDMNetworkOf, GaussianDenoiser, GaussianMixtureDenoiser


@pytest.mark.parametrize(
    "s, err", [(-0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("0.5", TypeError)]
)
def test_bad_standard_deviation(s, err):
    with pytest.raises(err, match="s "):
        GaussianDenoiser(0.0, s)
    with pytest.raises(err, match="s "):
        GaussianMixtureDenoiser(torch.zeros(2, 3), s=s)


@pytest.mark.parametrize(
    "means, weights",
    [
        (torch.zeros(0, 3), None),
        (torch.full((2, 3), math.nan), None),
        (torch.zeros(2, 3), torch.tensor([0.5, -0.5])),
        (torch.zeros(2, 3), torch.tensor([0.0, 0.0])),
        (torch.zeros(2, 3), torch.tensor([1.0, 1.0, 1.0])),
    ],
)
def test_bad_mixture(means, weights):
    with pytest.raises(ValueError, match="means|weights"):
        GaussianMixtureDenoiser(means, s=0.1, weights=weights)


def test_point_masses_and_zero_weights_are_fine():
    mix = GaussianMixtureDenoiser(torch.tensor([[1.0], [-1.0]]), s=0.0, weights=torch.tensor([1.0, 0.0]))
    x = torch.randn(4, 1, dtype=torch.float64)
    torch.testing.assert_close(mix(x, 0.5), torch.ones_like(x))  # all mass on the first mode
    with pytest.raises(ValueError, match="sigma_data"):
        EDMNetworkOf(GaussianDenoiser(), sigma_data=0.0)
