import numpy as np
import pytest
import torch
from scipy.stats import norm

from mtl4c_prob.inference import (
    SVIConfig,
    fit_svi,
    local_params,
    make_guide,
    mixture_quantiles,
    predictive_summary,
)

from .test_svi import conjugate_model, tensors


def test_mixture_quantiles_of_one_gaussian():
    loc = torch.tensor([[0.0, 2.0, -1.0]])
    scale = torch.tensor([[1.0, 0.5, 3.0]])
    q = mixture_quantiles(loc, scale, [0.05, 0.5, 0.95])
    expected = norm.ppf([0.05, 0.5, 0.95])[:, None] * scale.numpy() + loc.numpy()
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-4)


def test_mixture_quantiles_of_two_components():
    loc = torch.tensor([[-2.0], [2.0]])
    scale = torch.ones(2, 1)
    q = mixture_quantiles(loc, scale, [0.5, 0.9])
    # Symmetric mixture: median 0; the 0.9 quantile solves the mixture CDF numerically.
    assert abs(q[0, 0].item()) < 1e-4
    x = q[1, 0].item()
    assert abs(0.5 * (norm.cdf(x + 2) + norm.cdf(x - 2)) - 0.9) < 1e-5


def test_mixture_quantiles_match_root_finding_on_hard_mixtures():
    # Separated modes (the CDF is flat between them, where Newton steps explode), one
    # far outlier among 300 draws (a heavy-tailed posterior), and very unequal scales.
    from scipy.optimize import brentq

    rng = np.random.default_rng(0)
    loc = np.stack(
        [
            np.r_[np.full(150, -10.0), np.full(150, 10.0)],
            np.r_[rng.normal(0, 0.1, 299), 500.0],
            rng.normal(0, 1, 300),
        ],
        axis=1,
    )
    scale = np.stack([np.ones(300), np.full(300, 0.5), np.exp(rng.normal(0, 2, 300))], axis=1)
    probs = [0.05, 0.5, 0.95, 0.999]
    q = mixture_quantiles(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), probs
    ).numpy()
    for j in range(loc.shape[1]):
        for i, p in enumerate(probs):

            def f(x, j=j, p=p):
                return norm.cdf((x - loc[:, j]) / scale[:, j]).mean() - p

            exact = brentq(f, -1e4, 1e4, xtol=1e-10)
            # Flat CDF between the modes: compare in probability where the quantile
            # is ill-conditioned, in x elsewhere.
            assert abs(f(q[i, j])) < 1e-6 or abs(q[i, j] - exact) < 1e-4, (j, p, q[i, j], exact)


@pytest.fixture(scope="module")
def fitted():
    y = np.random.default_rng(0).normal(1.0, 1.0, size=100)
    with local_params():
        guide = make_guide("normal", conjugate_model)
        fit_svi(conjugate_model, guide, tensors(y), SVIConfig(steps=500, progress_bar=False))
    return guide


def test_summary_moments_and_chunking(fitted):
    data = tensors(np.zeros(7))
    with local_params():
        whole = predictive_summary(conjugate_model, fitted, data, num_samples=200, seed=4)
        chunked = predictive_summary(
            conjugate_model, fitted, data, num_samples=200, seed=4, max_elements=600
        )
        again = predictive_summary(
            conjugate_model, fitted, data.take(torch.arange(3)), num_samples=200, seed=4
        )
    for key in ("mean", "sd", "quantiles"):
        np.testing.assert_allclose(whole[key], chunked[key], rtol=1e-6)
    # Draws depend on the seed only, not on the number of rows predicted.
    np.testing.assert_allclose(whole["mean"][:3], again["mean"], rtol=1e-6)
    # Predictive sd: noise 1 plus posterior sd 0.1 in quadrature.
    assert np.allclose(whole["sd"], np.sqrt(1 + 0.01), atol=0.03)
    assert whole["quantiles"].shape == (2, 7)


def test_summary_draws_and_errors(fitted):
    data = tensors(np.zeros(4))
    with local_params():
        out = predictive_summary(conjugate_model, fitted, data, num_samples=50, return_draws=True)
        assert out["draws"].shape == (50, 4)
        with pytest.raises(ValueError, match="num_samples"):
            predictive_summary(conjugate_model, fitted, data, num_samples=1)
