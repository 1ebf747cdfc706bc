"""NUTS reference fits: exact posteriors of conjugate models, SVI against NUTS, exports.

The conjugate test models have Gaussian posteriors in closed form, so NUTS must recover
the posterior means within Monte Carlo error, about sd / sqrt(ESS), and the sds within
about sd / sqrt(2 ESS'), where ESS' is the effective sample size of the squared
deviations (NUTS draws are antithetic for the mean, far less so for the variance, so
ESS' is well below the bulk ESS); the checks allow four of those. A mean-field Gaussian guide is
exact for independent Gaussian latents, and on correlated ones gives each latent the sd
of its conditional posterior, 1 / sqrt(Lambda_ii) for precision matrix Lambda.
"""

import warnings

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm

from mtl4c_prob.data import DrugResponseData, make_latent_factor_data
from mtl4c_prob.evaluation.diagnostics import loo, to_inference_data
from mtl4c_prob.exceptions import DiagnosticWarning
from mtl4c_prob.inference import NutsFit, compare_svi_nuts, fit_nuts
from mtl4c_prob.models import MeanEffects, ProbabilisticModel
from mtl4c_prob.models._ffnn import BayesianFFNN

FAST = {"progress_bar": False}
# A fast decay leaves little optimisation noise: means within ~0.1 posterior sd.
SVI = {"steps": 600, "lr": 0.1, "lr_decay": 0.01, "seed": 0, "progress_bar": False}


class DrugMeans(ProbabilisticModel):
    """y ~ N(b_d, s^2) with b_d ~ N(0, p^2) independent: a conjugate normal-mean model."""

    name = "drug-means-test"

    def __init__(self, *, prior_sd=1.0, noise_sd=0.5, offset=False, multitask=True):
        super().__init__(multitask=multitask)
        self.prior_sd, self.noise_sd, self.offset = prior_sd, noise_sd, offset

    def model(self, data, subsample_size=None):
        zeros = torch.zeros(self.n_drugs_)
        effect = pyro.sample("drug_effect", dist.Normal(zeros, self.prior_sd).to_event(1))
        loc_all = effect[data.drug]
        if self.offset:  # a shared offset, correlated with every drug effect a posteriori
            loc_all = loc_all + pyro.sample("offset", dist.Normal(0.0, self.prior_sd))
        with pyro.plate("observations", data.n_obs, subsample_size=subsample_size) as idx:
            loc = loc_all[idx]
            scale = torch.full_like(loc, self.noise_sd)
            pyro.deterministic("loc", loc)
            pyro.deterministic("scale", scale)
            y = None if data.y is None else data.y[idx]
            pyro.sample("obs", dist.Normal(loc, scale), obs=y)


class WithPointWeight(DrugMeans):
    """A model with a model-side pyro.param, which NUTS cannot sample."""

    name = "point-weight-test"

    def model(self, data, subsample_size=None):
        pyro.param("shift", torch.zeros(()))
        super().model(data, subsample_size)


def grid(n_cells, n_drugs, *, keep=1.0, seed=0, tasks=("T",)):
    rng = np.random.default_rng(seed)
    rows = [
        (t, f"c{i}", f"d{j}", 0.4 * j - 1.0 + rng.normal())
        for t in tasks
        for i in range(n_cells)
        for j in range(n_drugs)
        if rng.random() < keep
    ]
    return DrugResponseData(pd.DataFrame(rows, columns=["task", "cell", "drug", "y"]))


def variance_ess(draws):
    """ESS of the squared deviations of draws of shape (chain, draw, ...)."""
    dev = (draws - draws.mean(axis=(0, 1))) ** 2
    return az.ess(az.convert_to_dataset({"v": dev}))["v"].values


def gaussian_posterior(fit: NutsFit, model):
    """Exact posterior mean and covariance of [offset,] drug effects, standardised units."""
    data = fit.model._tensors(fit.train, fit.model.device_, with_y=True)
    y, drug = data.y.double().numpy(), data.drug.numpy()
    X = np.eye(fit.model.n_drugs_)[drug]
    if model.offset:
        X = np.column_stack([np.ones(len(y)), X])
    precision = np.eye(X.shape[1]) / model.prior_sd**2 + X.T @ X / model.noise_sd**2
    cov = np.linalg.inv(precision)
    return cov @ X.T @ y / model.noise_sd**2, cov, precision


@pytest.fixture(scope="module")
def conjugate():
    data = grid(20, 8, keep=0.7)
    model = DrugMeans()
    return model, data, fit_nuts(model, data, num_samples=400, warmup=200, seed=0, **FAST)


@pytest.fixture(scope="module")
def conjugate_svi(conjugate):
    model, data, _ = conjugate
    return DrugMeans().fit(data, **SVI)


def test_nuts_recovers_the_conjugate_posterior(conjugate):
    model, _, fit = conjugate
    mean, cov, _ = gaussian_posterior(fit, model)
    sd = np.sqrt(np.diag(cov))
    ess = fit.ess_bulk["drug_effect"]
    assert fit.num_chains == 2 and fit.num_draws == 400
    assert fit.samples["drug_effect"].shape == (2, 400, 8)
    assert fit.rhat["drug_effect"].max() < 1.05
    assert fit.divergences == 0
    assert (ess > 200).all()
    np.testing.assert_array_less(
        np.abs(fit.posterior_mean()["drug_effect"] - mean), 4 * sd / np.sqrt(ess)
    )
    rel = fit.posterior_sd()["drug_effect"] / sd - 1
    np.testing.assert_array_less(
        np.abs(rel), 4 / np.sqrt(2 * variance_ess(fit.samples["drug_effect"]))
    )

    table = fit.summary()
    assert list(table.columns) == ["size", "rhat_max", "ess_bulk_min", "ess_tail_min"]
    assert table.loc["drug_effect", "size"] == 8
    stats = fit.sample_stats
    assert stats["tree_depth"].shape == (2, 400)
    # Tree depth follows from the leapfrog steps: 2^(depth - 1) <= steps < 2^depth.
    assert (2 ** (stats["tree_depth"] - 1) <= stats["n_steps"]).all()
    assert (stats["n_steps"] < 2 ** stats["tree_depth"]).all()
    assert 0.6 < stats["acceptance_rate"].mean() <= 1.0


def test_chains_have_their_own_seeds_and_fits_repeat(conjugate):
    _, data, _ = conjugate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # short chains
        a = fit_nuts(DrugMeans(), data, num_samples=20, warmup=20, seed=3, **FAST)
        b = fit_nuts(DrugMeans(), data, num_samples=20, warmup=20, seed=3, **FAST)
    np.testing.assert_array_equal(a.samples["drug_effect"], b.samples["drug_effect"])
    assert not np.allclose(a.samples["drug_effect"][0], a.samples["drug_effect"][1])


def test_predict_mixes_the_draws_like_svi_predict(conjugate, conjugate_svi):
    model, data, fit = conjugate
    pairs = data.frame.groupby("drug").head(1)
    pred = fit.predict(pairs, level=0.8)
    svi_columns = conjugate_svi.predict(pairs, level=0.8, num_samples=20).columns
    assert list(pred.columns) == list(svi_columns)

    # Exact predictive in the units of y: N(mean_d, var_d + noise^2) rescaled.
    mean, cov, _ = gaussian_posterior(fit, model)
    scaler, drug = fit.model.scaler_, fit.model.drugs_.get_indexer(pairs["drug"])
    task = np.zeros(len(pairs), int)
    exact_mean = scaler.inverse(mean[drug], task)
    exact_sd = scaler.inverse_scale(np.sqrt(np.diag(cov)[drug] + model.noise_sd**2), task)
    mc = scaler.inverse_scale(np.sqrt(np.diag(cov)[drug]), task) / np.sqrt(200)
    np.testing.assert_array_less(np.abs(pred["mean"] - exact_mean), 4 * mc)
    np.testing.assert_allclose(pred["sd"], exact_sd, rtol=0.02)
    z = norm.ppf(0.9)
    np.testing.assert_allclose(pred["upper"] - pred["lower"], 2 * z * exact_sd, rtol=0.03)

    # Thinned draws: deterministic, and close to the full mixture.
    thin = fit.predict(pairs, level=0.8, num_samples=100)
    pd.testing.assert_frame_equal(thin, fit.predict(pairs, level=0.8, num_samples=100))
    np.testing.assert_allclose(thin["sd"], pred["sd"], rtol=0.03)


def test_svi_agrees_with_nuts_on_a_conjugate_model(conjugate, conjugate_svi):
    _, data, fit = conjugate
    test = grid(20, 8, keep=0.3, seed=1)
    test = DrugResponseData(test.frame, drugs=list(data.drugs), cells=list(data.cells))
    result = compare_svi_nuts(conjugate_svi, fit, test, level=0.9, num_samples=500)
    row = result.latents.loc["drug_effect"]
    # Mean-field is exact here; differences are Monte Carlo error (1 / sqrt(ESS) ~ 0.03
    # in units of the posterior sd) and SVI's optimisation noise (~0.1 sd in the means,
    # ~5% in the sds; the sd estimates from 500 and 800 draws add ~4% each).
    assert row["size"] == 8
    assert row["mean_abs_z"] < 0.15 and row["max_abs_z"] < 0.35
    assert 0.8 < row["sd_ratio_min"] and row["sd_ratio_max"] < 1.2
    held = result.heldout
    assert list(held.index) == ["svi", "nuts"]
    # Mean differences of 0.1 posterior sd (0.015) against a predictive sd of 0.52
    # (standardised) change RMSE and NLL by well under 2%.
    assert held.loc["svi", "rmse"] == pytest.approx(held.loc["nuts", "rmse"], rel=0.02)
    assert held.loc["svi", "nll"] == pytest.approx(held.loc["nuts", "nll"], rel=0.02)
    assert set(result.to_dict()) == {"level", "latents", "heldout"}


def test_mean_field_svi_underdisperses_correlated_latents():
    # A shared offset trades off against every drug effect: NUTS finds the marginal sd,
    # a mean-field guide the conditional sd 1 / sqrt(Lambda_ii), analytically 0.43 of it.
    data = grid(5, 8)
    model = DrugMeans(noise_sd=1.0, offset=True)
    fit = fit_nuts(model, data, num_samples=300, warmup=150, seed=0, **FAST)
    mean, cov, precision = gaussian_posterior(fit, model)
    ess = variance_ess(fit.samples["offset"])
    assert fit.rhat["offset"] < 1.05
    assert abs(fit.posterior_sd()["offset"] / np.sqrt(cov[0, 0]) - 1) < 4 / np.sqrt(2 * ess)

    svi = DrugMeans(noise_sd=1.0, offset=True).fit(data, **SVI)
    table = compare_svi_nuts(svi, fit, num_samples=500).latents
    expected = 1 / np.sqrt(precision[0, 0] * cov[0, 0])
    assert expected < 0.5
    # NUTS and SVI sds each carry about 3% Monte Carlo error here.
    assert table.loc["offset", "sd_ratio"] == pytest.approx(expected, rel=0.15)
    expected_effects = np.exp(np.mean(np.log(1 / np.sqrt(np.diag(precision) * np.diag(cov))[1:])))
    assert table.loc["drug_effect", "sd_ratio"] == pytest.approx(expected_effects, rel=0.15)
    assert table.loc["drug_effect", "mean_abs_z"] < 0.3


def test_to_inference_data_matches_the_svi_export(conjugate, conjugate_svi):
    model, data, fit = conjugate
    idata = fit.to_inference_data()
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
        "constant_data",
    }
    post = idata.posterior["drug_effect"]
    assert post.dims == ("chain", "draw", "drug")
    assert list(post["drug"].values) == list(data.drugs)
    # The real chains, in order.
    np.testing.assert_allclose(post.values, fit.samples["drug_effect"])
    stats = idata.sample_stats
    for name in ("diverging", "tree_depth", "n_steps", "acceptance_rate", "step_size", "lp"):
        assert stats[name].dims == ("chain", "draw")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert idata.log_likelihood["y"].shape == (2, 400, data.n_obs)
    assert idata.posterior.attrs["inference"] == "nuts"

    svi = to_inference_data(conjugate_svi, data, num_samples=100, chains=2)
    assert set(svi.groups()) == set(idata.groups()) - {"sample_stats"}
    for group in ("posterior", "log_likelihood", "observed_data"):
        for name, var in svi[group].data_vars.items():
            assert idata[group][name].dims == var.dims
    for coord in ("obs_task", "obs_cell", "obs_drug"):
        assert (idata.log_likelihood[coord].values == svi.log_likelihood[coord].values).all()

    # Per-observation log-likelihood in response units: its posterior mean is known,
    # log N(y; m, s^2) - v / (2 s^2) - log(std) with posterior mean m and variance v.
    mean, cov, _ = gaussian_posterior(fit, model)
    tensors = fit.model._tensors(data, fit.model.device_, with_y=True)
    y, drug = tensors.y.double().numpy(), tensors.drug.numpy()
    s2 = model.noise_sd**2
    exact = (
        norm.logpdf(y, mean[drug], model.noise_sd)
        - np.diag(cov)[drug] / (2 * s2)
        - np.log(fit.model.scaler_.std[0])
    )
    ll = idata.log_likelihood["y"].values.reshape(-1, data.n_obs)
    np.testing.assert_array_less(np.abs(ll.mean(0) - exact), 4 * ll.std(0) / np.sqrt(400) + 1e-4)

    # PSIS-LOO runs on the export (ESS-based relative efficiency for MCMC draws).
    result = loo(idata)
    assert np.isfinite(result["elpd_loo"]) and result["n_data_points"] == data.n_obs


def test_packed_sites_of_a_registry_model():
    data = grid(10, 5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # short chains
        fit = fit_nuts(
            MeanEffects(noise="task"), data, num_samples=40, warmup=40, max_tree_depth=4, **FAST
        )
    for name in ("offset", "cell_z", "drug_z", "noise_sd", "cell_bias_sd"):
        assert fit.samples[name].shape[:2] == (2, 40)
    assert "cell_ard" not in fit.samples  # empty block of the rank-0 layout
    assert fit.samples["cell_z"].shape == (2, 40, 10, 1)
    assert (fit.samples["noise_sd"] > 0).all()
    pred = fit.predict(data.frame.head(4))
    assert (pred["sd"] > 0).all() and pred["mean"].between(pred["lower"], pred["upper"]).all()
    idata = fit.to_inference_data()
    assert idata.posterior["cell_z"].dims[:3] == ("chain", "draw", "cell")


def test_refusals():
    data = grid(6, 4)
    with pytest.raises(ValueError, match="more than max_obs=10"):
        fit_nuts(DrugMeans(), data, max_obs=10, **FAST)
    with pytest.raises(ValueError, match="point-estimated parameters.*shift.*bayesian='all'"):
        fit_nuts(WithPointWeight(), data, **FAST)
    with pytest.raises(TypeError, match="DrugResponseData"):
        fit_nuts(DrugMeans(), data.frame, **FAST)
    with pytest.raises(TypeError, match="ProbabilisticModel"):
        fit_nuts(object(), data, **FAST)
    with pytest.raises(ValueError, match="target_accept"):
        fit_nuts(DrugMeans(), data, target_accept=1.2, **FAST)
    two = grid(4, 3, tasks=("A", "B"))
    with pytest.raises(NotImplementedError, match="multitask=False"):
        fit_nuts(DrugMeans(multitask=False), two, **FAST)


def test_refuses_a_network_with_point_weights():
    features, _ = make_latent_factor_data(
        n_cells=8, n_drugs=4, n_tasks=1, rank=2, noise=0.3, missing=0.2, seed=0
    )
    with pytest.raises(ValueError, match="mf or mean, or use bayesian='all'"):
        fit_nuts(BayesianFFNN(hidden=(4,)), features, **FAST)


def test_one_chain_warns_that_rhat_is_undefined():
    with pytest.warns(DiagnosticWarning, match="one chain"):
        fit = fit_nuts(
            DrugMeans(), grid(6, 4), num_samples=30, warmup=60, chains=1, jit_compile=False, **FAST
        )
    assert np.isnan(fit.rhat["drug_effect"]).all()
