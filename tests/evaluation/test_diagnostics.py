"""ArviZ export, PSIS-LOO, WAIC and comparison."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from mtl4c_prob.evaluation.diagnostics import (
    compare,
    elpd_summary,
    load_inference_data,
    loo,
    select_rows,
    to_inference_data,
    waic,
    write_inference_data,
)
from mtl4c_prob.exceptions import DataError, DiagnosticWarning
from mtl4c_prob.models import BayesianMF, MeanEffects

FIT = {"steps": 200, "progress_bar": False, "seed": 0}


@pytest.fixture(scope="module")
def fitted(tiny_split):
    train, test = tiny_split
    return BayesianMF(rank=3).fit(train, **FIT), train, test


@pytest.fixture(scope="module")
def exported(fitted):
    model, train, _ = fitted
    return to_inference_data(model, train, num_samples=60, chains=2, seed=0)


def test_groups_dims_and_coordinates(fitted, exported):
    model, train, _ = fitted
    idata = exported
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert group in idata.groups()
    post = idata.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 30
    # Named latents with entity coordinates, no packed or auxiliary sites.
    assert post["noise_sd"].dims == ("chain", "draw", "task")
    assert list(post["task"].values) == list(model.tasks_)
    assert post["cell_z"].dims[:3] == ("chain", "draw", "cell")
    assert list(post["cell"].values) == list(model.cells_)
    assert not [v for v in post.data_vars if v.endswith("_unconstrained") or v in ("z", "scales")]
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "obs") and ll.sizes["obs"] == train.n_obs
    assert list(ll["obs_cell"].values) == list(train.frame["cell"].astype(str))
    np.testing.assert_allclose(idata.observed_data["y"].values, train.frame["y"].to_numpy())
    assert idata.posterior.attrs["model"] == "mf"
    assert '"rank": 3' in idata.posterior.attrs["params"]


def test_log_likelihood_is_in_response_units(fitted, exported):
    # The pointwise log-likelihood must be the Gaussian log density of y (input units)
    # under each draw's loc and scale: compare its mean over draws with the predictive
    # mixture's, which it bounds from below (Jensen), and its exp-mean with the mixture.
    model, train, _ = fitted
    pred = model.predict(train, num_samples=300)
    ll = exported.log_likelihood["y"].values.reshape(60, -1)
    lppd = np.log(np.exp(ll).mean(0))
    gauss = norm.logpdf(train.frame["y"], pred["mean"], pred["sd"])
    # Same predictive, different draws and a moment-matched Gaussian: close on average.
    assert abs(lppd.mean() - gauss.mean()) < 0.05
    assert ll.mean() <= lppd.mean()
    # A units mistake (standardised scale) would shift every value by log(sd_task).
    assert np.abs(np.log(model.scaler_.std)).max() > 0.1


def test_netcdf_round_trip(exported, tmp_path):
    path = write_inference_data(exported, tmp_path / "idata.nc")
    back = load_inference_data(tmp_path)
    assert path.is_file()
    assert set(back.groups()) == set(exported.groups())
    np.testing.assert_array_equal(
        back.log_likelihood["y"].values, exported.log_likelihood["y"].values
    )
    np.testing.assert_array_equal(
        back.posterior["cell_z"].values, exported.posterior["cell_z"].values
    )
    assert list(back.log_likelihood["obs_drug"].values) == list(
        exported.log_likelihood["obs_drug"].values
    )
    assert back.posterior.attrs["fit_settings"] == exported.posterior.attrs["fit_settings"]


def test_select_rows_depends_only_on_keys(tiny):
    data, _ = tiny
    rows = select_rows(data.frame, 100)
    keys = set(map(tuple, data.frame.iloc[rows][["task", "cell", "drug"]].astype(str).values))
    shuffled = data.frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    again = select_rows(shuffled, 100)
    keys_again = set(map(tuple, shuffled.iloc[again][["task", "cell", "drug"]].astype(str).values))
    assert len(rows) == 100 and keys == keys_again
    assert len(select_rows(data.frame, None)) == data.n_obs


def test_max_obs_and_per_task_export(tiny_split):
    train, _ = tiny_split
    model = BayesianMF(rank=2, multitask=False).fit(train, **{**FIT, "steps": 100})
    idata = to_inference_data(model, train, num_samples=20, max_obs=150)
    assert idata.log_likelihood.sizes["obs"] == 150
    assert idata.posterior.attrs["obs_selected"] == f"150 of {train.n_obs}"
    names = set(idata.posterior.data_vars)
    assert {f"noise_sd__{t}" for t in train.tasks} <= names
    assert np.isfinite(idata.log_likelihood["y"].values).all()


def test_loo_on_conjugate_normal_matches_exact_answer():
    # y_i ~ N(mu, 1), mu ~ N(0, 10^2): the leave-one-out predictive is Gaussian with the
    # posterior of the other n-1 points, so elpd_loo has a closed form. 4000 exact
    # posterior draws make PSIS accurate to well under 0.5 nats here (k < 0.5 for all).
    import arviz as az

    rng = np.random.default_rng(0)
    n, tau2 = 40, 100.0
    y = rng.normal(1.5, 1.0, n)
    post_var = 1 / (n + 1 / tau2)
    mu = rng.normal(post_var * y.sum(), np.sqrt(post_var), (4, 1000))
    ll = norm.logpdf(y[None, None, :], mu[..., None], 1.0)
    idata = az.from_dict(posterior={"mu": mu}, log_likelihood={"y": ll}, observed_data={"y": y})
    exact = 0.0
    for i in range(n):
        rest = np.delete(y, i)
        v = 1 / (n - 1 + 1 / tau2)
        exact += norm.logpdf(y[i], v * rest.sum(), np.sqrt(1 + v))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticWarning)
        result = loo(idata)
    assert abs(float(result["elpd_loo"]) - exact) < 0.5
    summary = elpd_summary(result)
    assert summary["pareto_k_over_0.7"] == 0 and summary["n_obs"] == n
    assert abs(float(waic(idata)["elpd_waic"]) - exact) < 0.5


def test_loo_warns_on_high_pareto_k(exported):
    # Rank-3 factors with ~15 rows per cell: many rows are influential, and the warning
    # must say how many.
    with pytest.warns(DiagnosticWarning, match="Pareto k"):
        result = loo(exported)
    assert (np.asarray(result.pareto_k) > 0.7).sum() > 0


def test_compare_ranks_and_checks_observations(fitted, exported, tiny_split):
    model, train, _ = fitted
    mean = MeanEffects().fit(train, **FIT)
    other = to_inference_data(mean, train, num_samples=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        table = compare({"mf": exported, "mean": other})
    assert isinstance(table, pd.DataFrame) and list(table.index) == ["mf", "mean"]
    assert table.loc["mf", "rank"] == 0
    fewer = to_inference_data(mean, train, num_samples=60, max_obs=100)
    with pytest.raises(DataError, match="different observations"):
        compare({"mf": exported, "mean": fewer})
    with pytest.raises(ValueError, match="at least two"):
        compare({"mf": exported})


def test_unfitted_and_bad_arguments(tiny_split):
    train, _ = tiny_split
    with pytest.raises(RuntimeError, match="fitted"):
        to_inference_data(BayesianMF(rank=2), train)
    model = MeanEffects().fit(train, **{**FIT, "steps": 20})
    with pytest.raises(ValueError, match="multiple of chains"):
        to_inference_data(model, train, num_samples=25, chains=2)
    with pytest.raises(TypeError, match="DrugResponseData"):
        to_inference_data(model, train.frame)
