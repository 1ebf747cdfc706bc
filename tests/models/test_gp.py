"""Contract, kernel and statistical tests of the single-task Gaussian processes."""

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch

from mtl4c_prob.data import DrugResponseData, make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import coverage, rmse
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.models import get_model, load_model
from mtl4c_prob.models._gp import SparseGP
from mtl4c_prob.models._gp_exact import ExactGP, _chain_rule, _leave_one_out
from mtl4c_prob.models._kernels import CellDrugKernel, identity_inputs, reference_distances

from .contract import check_beats_mean, check_contract, contract_split

SGP_FIT = {"steps": 300, "lr": 0.03, "progress_bar": False, "seed": 0}
GP_FIT = {"steps": 150, "lr": 0.05, "progress_bar": False, "seed": 0}


def _strip(data, cell=True, drug=True):
    """The same rows and code spaces without the named feature tables."""
    return DrugResponseData(
        data.frame.drop(columns=["task_code", "cell_code", "drug_code"]),
        None if cell else data.cell_features,
        None if drug else data.drug_features,
        tasks=list(data.tasks),
        cells=list(data.cells),
        drugs=list(data.drugs),
    )


def _drug_mean_rmse(train, test):
    """RMSE of predicting each held-out row by its drug's training mean (per task)."""
    means = train.frame.groupby(["task", "drug"])["y"].mean()
    pred = means.reindex(pd.MultiIndex.from_frame(test.frame[["task", "drug"]])).to_numpy()
    return rmse(test.y, pred)


def _smooth_data(n_cells=150, noise=0.2, seed=0):
    """One task, 2-D cell features, 4 drugs without features: y = b_d + a_d sin(x1) cos(x2)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n_cells, 2))
    drug_effect, amplitude = np.array([-1.0, 0.0, 0.5, 1.5]), np.array([1.0, 0.6, -0.8, 1.2])
    c, d = np.meshgrid(np.arange(n_cells), np.arange(4), indexing="ij")
    c, d = c.ravel(), d.ravel()
    signal = drug_effect[d] + amplitude[d] * np.sin(1.5 * X[c, 0]) * np.cos(X[c, 1])
    cells = [f"c{i:03d}" for i in range(n_cells)]
    frame = pd.DataFrame(
        {
            "task": "t",
            "cell": np.asarray(cells)[c],
            "drug": [f"d{j}" for j in d],
            "y": signal + noise * rng.standard_normal(len(c)),
            "signal": signal,
        }
    )
    table = pd.DataFrame(X, index=cells, columns=["x1", "x2"])
    return DrugResponseData(frame, table, None)


def _gp_data(n_cells=120, n_drugs=5, noise=0.3, seed=0):
    """One task drawn from the product-kernel GP prior (RBF cells x correlated drugs)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_cells, 3))
    sq = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    Kc = np.exp(-0.5 * sq / 1.5**2)
    Kd = 0.5 + 0.5 * np.eye(n_drugs)  # shared part plus a drug-specific part
    K = np.kron(Kc, Kd) + 1e-6 * np.eye(n_cells * n_drugs)
    f = np.linalg.cholesky(K) @ rng.standard_normal(n_cells * n_drugs)
    c, d = np.divmod(np.arange(n_cells * n_drugs), n_drugs)
    y = f + rng.normal(0, 0.5, n_drugs)[d] + noise * rng.standard_normal(len(f))
    cells = [f"c{i:03d}" for i in range(n_cells)]
    frame = pd.DataFrame(
        {"task": "t", "cell": np.asarray(cells)[c], "drug": [f"d{j}" for j in d], "y": y}
    )
    return DrugResponseData(frame, pd.DataFrame(X, index=cells), None)


@pytest.fixture(scope="module")
def lpo():
    return contract_split()


@pytest.fixture(scope="module")
def small_lpo():
    """About 450 training rows: small enough for the exact GP's n x n covariance."""
    data, _ = make_latent_factor_data(
        n_cells=40, n_drugs=10, n_tasks=2, rank=3, noise=0.3, missing=0.3, seed=1
    )
    return split(data, "lpo", 0.2, seed=0)


# ----------------------------------------------------------------------- kernels
def _set(kernel, **values):
    """Fix the kernel's hyperparameters (replace the priors by values)."""
    for module in kernel.modules():
        for name in ("lengthscale", "variance"):
            if name in getattr(module, "_pyro_samples", {}):
                delattr(module, name)
                setattr(module, name, torch.tensor(values.get(name, 1.0)))


def test_kernel_composites_match_their_parts():
    """Product and sum combine a cell RBF and a drug (features + identity) RBF sum."""
    torch.manual_seed(0)
    cell, drug, ident = torch.randn(7, 3), torch.randn(7, 2), identity_inputs(torch.ones(7).bool())
    rows = torch.cat([cell, drug, ident], 1)

    def rbf(a, ls=1.0):
        return torch.exp(-0.5 * torch.cdist(a, a) ** 2 / ls**2)

    for composite, expected in (
        ("product", rbf(cell) * (rbf(drug) + rbf(ident))),
        ("sum", rbf(cell) + rbf(drug) + rbf(ident)),
        ("none", rbf(rows)),
    ):
        kernel = CellDrugKernel(3, 2, 8, composite=composite)
        _set(kernel)
        torch.testing.assert_close(kernel(rows), expected)
        torch.testing.assert_close(kernel(rows, diag=True), expected.diagonal())
        if composite != "none":
            Kc, Kd = kernel.blocks(cell, torch.cat([drug, ident], 1))
            torch.testing.assert_close(kernel.combine(Kc, Kd), expected)


@pytest.mark.parametrize("family", ["matern12", "matern32", "matern52"])
def test_matern_families_are_valid_covariances(family):
    torch.manual_seed(1)
    X = torch.randn(30, 4)
    kernel = CellDrugKernel(2, 2, composite="product", kernel=family)
    _set(kernel)
    K = kernel(X).double()
    assert torch.linalg.eigvalsh(K).min() > -1e-5
    # float32 distances cancel to ~1e-7 |x|^2; the square root of matern12 amplifies it.
    torch.testing.assert_close(K.diagonal(), kernel(X, diag=True).double(), atol=2e-3, rtol=0)


def test_kernel_priors_are_latent_sites_scaled_by_the_data():
    """ARD gives one lengthscale per column; the prior median is the reference distance."""
    rows = torch.cat([3 * torch.randn(50, 4), torch.randn(50, 6)], 1)
    ref = reference_distances(rows, 4, 6)
    kernel = CellDrugKernel(4, 6, ard=True, reference=ref, lengthscale_prior_loc=2.0)
    sites = dict(kernel.scope(kernel.hyperparameters))
    assert set(sites) == {
        "cell.lengthscale",
        "cell.variance",
        "drug.lengthscale",
        "drug.variance",
    }
    assert sites["cell.lengthscale"].shape == (4,) and sites["drug.variance"].shape == ()
    cell = kernel.cell
    assert cell.input_dim == 4 and cell.active_dims == slice(0, 4)
    torch.testing.assert_close(
        cell.log_lengthscale_median.exp(), torch.full((4,), 2.0 * ref["cell"])
    )
    # Standard normal columns: the median distance is near sqrt(2 * dim).
    assert ref["drug"] == pytest.approx(np.sqrt(12), rel=0.2)
    assert ref["cell"] == pytest.approx(3 * np.sqrt(8), rel=0.2)


def test_identity_inputs_put_unseen_drugs_in_one_column():
    seen = torch.tensor([True, False, True, True, False])
    onehot = identity_inputs(seen)
    assert onehot.shape == (5, 4)
    assert onehot.sum(1).eq(1).all()
    assert onehot[[0, 2, 3]].argmax(1).tolist() == [0, 1, 2]
    assert onehot[[1, 4], 3].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel": "cosine"}, "kernel"),
        ({"composite": "kron"}, "composite"),
        ({"lengthscale_prior_scale": 0.0}, "lengthscale_prior_scale"),
    ],
    ids=["kernel", "composite", "prior"],
)
def test_kernel_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CellDrugKernel(2, 2, **kwargs)
    with pytest.raises(ValueError, match=match):
        SparseGP(**kwargs)


def test_chain_rule_sums_to_the_multivariate_normal():
    torch.manual_seed(0)
    A = torch.randn(12, 12, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.T + torch.eye(12, dtype=torch.float64))
    y, mean = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    loc, scale = _chain_rule(L, y, mean)
    total = dist.Normal(loc, scale).log_prob(y).sum()
    torch.testing.assert_close(total, dist.MultivariateNormal(mean, scale_tril=L).log_prob(y))


def test_leave_one_out_matches_refitting_without_each_row():
    torch.manual_seed(1)
    A = torch.randn(9, 9, dtype=torch.float64)
    S = A @ A.T + torch.eye(9, dtype=torch.float64)
    y, mean = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    loc, scale = _leave_one_out(torch.linalg.cholesky(S), y, mean)
    for i in range(9):
        rest = [j for j in range(9) if j != i]
        w = torch.linalg.solve(S[rest][:, rest], S[rest, i])
        torch.testing.assert_close(loc[i], mean[i] + w @ (y[rest] - mean[rest]))
        torch.testing.assert_close(scale[i] ** 2, S[i, i] - w @ S[rest, i])


# ---------------------------------------------------------------------- contract
def test_sgp_contract(lpo, tmp_path):
    train, test = lpo
    model, _ = check_contract(
        lambda: SparseGP(n_inducing=32), train, test, {"steps": 100, "lr": 0.03}, tmp_path
    )
    # 32 of the 80 cells (learned); all 20 drugs: features and identity (fixed, exact).
    Z = model.inducing_()
    assert Z["cell"].shape == (32, 20) and Z["drug"].shape == (20, 10 + 21)
    assert model.inducing_.learned() == {"cell": True, "drug": False}
    assert model.posterior_median()["u"].shape == (32, 20)
    assert isinstance(get_model("sgp"), SparseGP)


def test_exact_gp_contract(small_lpo, tmp_path):
    train, test = small_lpo
    model, _ = check_contract(ExactGP, train, test, {"steps": 60, "guide": "delta"}, tmp_path)
    assert model.train_rows_["y"].shape == (train.n_obs,)
    assert isinstance(get_model("gp"), ExactGP)


def test_sgp_beats_mean_effects(lpo):
    train, test = lpo
    check_beats_mean(lambda: SparseGP(n_inducing=64), train, test, SGP_FIT, margin=0.85)


def test_exact_gp_beats_mean_effects(small_lpo):
    train, test = small_lpo
    check_beats_mean(ExactGP, train, test, {**GP_FIT, "guide": "delta"}, margin=0.85)


@pytest.mark.parametrize(
    ("composite", "n_inducing", "margin"),
    [("product", 48, 0.85), ("none", 128, 0.85), ("sum", 48, 0.95)],
    ids=["product", "none", "sum"],
)
def test_composites_fit(lpo, composite, n_inducing, margin):
    """Each composite beats the drug-mean predictor on latent-factor data.

    Product and joint kernels learn the cell-drug interaction (the data's main signal
    beyond drug means); a sum kernel is additive, g(cell) + h(drug), so it can only add
    the cells' main effects, hence the weaker margin. The joint kernel's inducing inputs
    live in the joint space and must cover (cell, drug) pairs, hence more of them (the
    separable composites count cell-side inputs only; every drug is a drug-side input).
    """
    train, test = lpo
    model = SparseGP(n_inducing=n_inducing, composite=composite).fit(train, **SGP_FIT)
    sites = model.posterior_median()
    assert ("joint.lengthscale" in sites) == (composite == "none")
    assert ("cell.lengthscale" in sites) == (composite != "none")
    pred = model.predict(test, num_samples=30)
    assert rmse(pred["y"], pred["mean"]) < margin * _drug_mean_rmse(train, test)


# ------------------------------------------------------------------- statistics
MODELS = {
    "exact": (lambda: ExactGP(noise="task"), {**GP_FIT, "steps": 200}),
    "sparse": (lambda: SparseGP(n_inducing=64, noise="task"), {**SGP_FIT, "steps": 600}),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_recovers_smooth_function_and_noise(kind):
    """Noise sd within 15% of the truth, posterior mean within 0.5 noise sd of the signal.

    With 480 training rows the noise sd is estimated to about 1 / sqrt(2 n) = 3%
    (sampling error); 15% leaves room for SVI and the finite-data posterior of the
    kernel. The signal (1.5 units of variation over 2-D inputs) is smooth, so a GP's
    posterior mean error at held-out rows is a fraction of the noise.
    """
    train, test = split(_smooth_data(), "lpo", 0.2, seed=0)
    factory, fit = MODELS[kind]
    model = factory().fit(train, **fit)
    noise = float(model.posterior_median()["noise_sd"][0] * model.scaler_.std[0])
    assert noise == pytest.approx(0.2, rel=0.15)
    pred = model.predict(test, num_samples=30)
    assert rmse(test.frame["signal"], pred["mean"]) < 0.5 * 0.2


@pytest.mark.parametrize("kind", list(MODELS))
def test_coverage_on_gp_data(kind):
    """Held-out 90% intervals cover 85-95% of rows on data drawn from the model's prior.

    120 test rows: the binomial sd of the coverage is sqrt(0.9 * 0.1 / 120) = 0.027, so
    the band is about two sd either side.
    """
    train, test = split(_gp_data(), "lpo", 0.2, seed=0)
    factory, fit = MODELS[kind]
    pred = factory().fit(train, **fit).predict(test, num_samples=60)
    cov = coverage(pred["y"], pred["lower"], pred["upper"])
    assert 0.85 <= cov <= 0.95, f"coverage {cov:.3f}"


# --------------------------------------------------------------- sgp specifics
def test_sgp_minibatch(lpo):
    train, test = lpo
    model = SparseGP(n_inducing=48).fit(train, **{**SGP_FIT, "batch_size": 256})
    assert model.fit_result_.settings["batch_size"] == 256
    losses = model.fit_result_.losses
    assert np.mean(losses[-30:]) < np.mean(losses[:30])
    pred = model.predict(test, num_samples=30)
    assert rmse(pred["y"], pred["mean"]) < 0.85 * _drug_mean_rmse(train, test)


def test_sgp_drug_side_subset_when_many_drugs(lpo):
    """More training drugs than n_inducing_drugs: a learned subset of drug-side inputs."""
    train, test = lpo
    model = SparseGP(n_inducing=16, n_inducing_drugs=8).fit(train, **{**SGP_FIT, "steps": 100})
    Z = model.inducing_()
    assert Z["cell"].shape == (16, 20) and Z["drug"].shape == (8, 10 + 21)
    assert model.inducing_.learned() == {"cell": True, "drug": True}
    pred = model.predict(test, num_samples=20)
    assert rmse(pred["y"], pred["mean"]) < _drug_mean_rmse(train, test)


def test_sgp_censored_rows():
    """Right-censored rows ("at least y") lift the fitted mean above a fit that reads them
    as measured values, and towards the values that were hidden."""
    data, _ = make_latent_factor_data(n_cells=40, n_drugs=10, n_tasks=1, noise=0.3, seed=4)
    frame = data.frame.drop(columns=["task_code", "cell_code", "drug_code"])
    cap = frame["y"].quantile(0.8)
    hidden = frame["y"].to_numpy().copy()
    frame["censor"] = (frame["y"] > cap).astype(int)
    frame["y"] = frame["y"].clip(upper=cap)
    at_cap = frame["censor"].to_numpy() == 1
    means = {}
    for name, rows in (("censored", frame), ("as_measured", frame.drop(columns="censor"))):
        fitted = DrugResponseData(rows, data.cell_features, data.drug_features)
        model = SparseGP(n_inducing=32).fit(fitted, **{**SGP_FIT, "steps": 200})
        pred = model.predict(fitted, num_samples=20)
        assert np.isfinite(pred[["mean", "sd"]].to_numpy()).all()
        means[name] = pred["mean"].to_numpy()[at_cap]
    assert means["censored"].mean() > means["as_measured"].mean() + 0.1
    gap = {k: np.abs(v - hidden[at_cap]).mean() for k, v in means.items()}
    assert gap["censored"] < gap["as_measured"]


def test_sgp_one_copy_per_task(lpo, tmp_path):
    """multitask=False: one GP per task, each with its own inducing inputs and kernel."""
    train, test = lpo
    model = SparseGP(n_inducing=16, multitask=False).fit(train, **{**SGP_FIT, "steps": 50})
    assert set(model.task_models_) == {"task0", "task1"}
    first, second = model.task_models_.values()
    assert first.n_tasks_ == 1 and first.inducing_ is not second.inducing_
    pred = model.predict(test, num_samples=20)
    assert len(pred) == test.n_obs and np.isfinite(pred["mean"]).all()
    model.save(tmp_path / "per_task")
    pd.testing.assert_frame_equal(
        pred, load_model(tmp_path / "per_task").predict(test, num_samples=20)
    )


def test_sgp_cell_effects_help_seen_cells(lpo):
    """Leave pairs out: a cell effect carries what the features miss (6% lower RMSE here).

    The data plant cell biases (sd 0.5) that the cell features do not determine.
    """
    train, test = lpo
    errors, sds = {}, {}
    for effects in (False, True):
        model = SparseGP(n_inducing=48, cell_effects=effects).fit(train, **SGP_FIT)
        pred = model.predict(test, num_samples=30)
        errors[effects] = rmse(pred["y"], pred["mean"])
        sds[effects] = model.posterior_median().get("cell_bias_sd")
    assert errors[True] < 0.97 * errors[False]
    assert sds[False] is None and sds[True] > 0.1


def test_sgp_default_batch_survives_none(lpo):
    """The command line passes batch_size=None when --batch-size is not given."""
    train, _ = lpo
    model = SparseGP(n_inducing=8).fit(train, steps=2, batch_size=None, progress_bar=False)
    assert model.fit_result_.settings["batch_size"] == 4096


def test_sgp_unseen_cells_and_drugs_from_features(tmp_path):
    """Leave cells out with the identity fallback; an unseen drug with features too."""
    data, _ = make_latent_factor_data(
        n_cells=120, n_drugs=15, n_tasks=1, rank=3, noise=0.3, feature_strength=1.0, seed=2
    )
    train, test = split(_strip(data, cell=False), "lco", 0.2, seed=0)
    model = SparseGP(n_inducing=64).fit(train, **SGP_FIT)
    assert model.drug_table_ is None and model.kernel_.identity_dim == 16
    pred = model.predict(test, num_samples=40)
    assert rmse(pred["y"], pred["mean"]) < 0.9 * _drug_mean_rmse(train, test)
    assert 0.8 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.97

    # A drug held out of training but with features: predicted, with wider intervals.
    ldo_train, ldo_test = split(data, "ldo", 0.15, seed=0)
    model = SparseGP(n_inducing=64).fit(ldo_train, **SGP_FIT)
    new = model.predict(ldo_test, num_samples=40)
    seen = model.predict(ldo_train.frame.head(200), num_samples=40)
    assert np.isfinite(new["mean"]).all() and new["sd"].mean() > 1.2 * seen["sd"].mean()
    model.save(tmp_path / "ldo")
    pd.testing.assert_frame_equal(
        new, load_model(tmp_path / "ldo").predict(ldo_test, num_samples=40)
    )


# ------------------------------------------------------------- exact specifics
def test_exact_gp_too_large_stops_before_fitting(small_lpo, tmp_path):
    train, _ = small_lpo
    model = ExactGP(max_obs=100)
    before = dict(vars(model))
    with pytest.raises(DataError, match=r"sgp.*") as info:
        model.fit(train, **GP_FIT)
    assert f"{train.n_obs} rows" in str(info.value) and "max_obs=100" in str(info.value)
    assert vars(model) == before and not model.is_fitted
    with pytest.raises(RuntimeError, match="only a fitted model"):
        model.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # With multitask=False the limit applies to each task's rows.
    largest = int(train.frame["task"].value_counts().max())
    with pytest.raises(DataError, match=f"fit of {largest} rows"):
        ExactGP(max_obs=largest - 1, multitask=False).fit(train, **GP_FIT)
    with pytest.raises(DataError, match=f"fit of {train.n_obs} rows"):
        ExactGP(max_obs=largest).fit(train, **GP_FIT)


def test_exact_gp_refuses_minibatches_and_censoring(small_lpo):
    train, _ = small_lpo
    with pytest.raises(ValueError, match="full batch"):
        ExactGP().fit(train, **{**GP_FIT, "batch_size": 64})
    frame = train.frame.drop(columns=["task_code", "cell_code", "drug_code"])
    frame["censor"] = np.where(np.arange(len(frame)) % 10 == 0, 1, 0)
    censored = DrugResponseData(frame, train.cell_features, train.drug_features)
    with pytest.raises(ValueError, match="censored"):
        ExactGP().fit(censored, **GP_FIT)


def test_exact_gp_save_load_and_unseen_cells(tmp_path):
    """Leave cells out: conditioned on the saved training rows, a loaded model agrees."""
    data, _ = make_latent_factor_data(
        n_cells=60, n_drugs=8, n_tasks=1, rank=2, noise=0.3, feature_strength=1.0, seed=3
    )
    train, test = split(data, "lco", 0.2, seed=0)
    model = ExactGP(noise="task").fit(train, **GP_FIT)
    pred = model.predict(test, num_samples=20)
    assert rmse(pred["y"], pred["mean"]) < 0.9 * _drug_mean_rmse(train, test)
    model.save(tmp_path / "gp")
    pd.testing.assert_frame_equal(pred, load_model(tmp_path / "gp").predict(test, num_samples=20))


def test_arviz_export(small_lpo):
    """Pointwise log-likelihoods for LOO: the exact GP's are its LOO predictive densities."""
    from mtl4c_prob.evaluation.diagnostics import to_inference_data

    train, _ = small_lpo
    exact = ExactGP(noise="task").fit(train, **{**GP_FIT, "steps": 40})
    idata = to_inference_data(exact, train, num_samples=4, chains=2)
    ll = idata.log_likelihood["y"].values.reshape(4, -1)
    assert ll.shape == (4, train.n_obs) and np.isfinite(ll).all()
    np.testing.assert_allclose(ll[0], ll[1], rtol=1e-5)  # point-estimate guide
    # LOO densities are lower than in-sample ones: the row is not conditioned on.
    fitted = exact.predict(train, num_samples=2)
    in_sample = (
        -0.5 * np.log(2 * np.pi * fitted["sd"] ** 2)
        - 0.5 * ((fitted["y"] - fitted["mean"]) / fitted["sd"]) ** 2
    )
    assert ll[0].mean() < in_sample.mean()
    sparse = SparseGP(n_inducing=16).fit(train, **{**SGP_FIT, "steps": 30})
    idata = to_inference_data(sparse, train, num_samples=4, chains=2)
    assert np.isfinite(idata.log_likelihood["y"].values).all()
    assert idata.posterior["u"].shape[:2] == (2, 2)


def test_cell_features_are_required(lpo):
    train, _ = lpo
    for cls in (SparseGP, ExactGP):
        with pytest.raises(ValueError, match="--cell-features"):
            cls().fit(_strip(train), **{**GP_FIT, "steps": 1})
