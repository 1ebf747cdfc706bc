"""Contract and statistical tests of the Bayesian MF."""

import numpy as np
import pandas as pd
import pytest
import torch

from mtl4c_prob.data import DrugResponseData, make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import coverage, rmse
from mtl4c_prob.models import BayesianMF, get_model, load_model

FIT = {"steps": 300, "lr": 0.05, "progress_bar": False, "seed": 0}


@pytest.fixture(scope="module")
def fitted(tiny_split):
    train, _ = tiny_split
    return BayesianMF(rank=3, cell_features=False, drug_features=False).fit(train, **FIT)


def test_predict_contract(fitted, tiny_split):
    _, test = tiny_split
    pred = fitted.predict(test, num_samples=100, quantiles=(0.25,))
    assert list(pred.columns[:8]) == ["task", "cell", "drug", "y", "mean", "sd", "lower", "upper"]
    assert len(pred) == test.n_obs and "q0.25" in pred.columns
    assert (pred["sd"] > 0).all()
    assert (pred["lower"] <= pred["mean"]).all() and (pred["mean"] <= pred["upper"]).all()
    assert np.isfinite(pred[["mean", "sd", "lower", "upper"]].to_numpy()).all()
    # Predictions come back in the units of the input: the test mean is close to the data.
    assert abs(pred["mean"].mean() - test.y.mean()) < 0.3 * test.y.std()


def test_seeded_reproducibility(tiny_split, fitted):
    train, test = tiny_split
    again = BayesianMF(rank=3, cell_features=False, drug_features=False).fit(train, **FIT)
    assert again.fit_result_.losses == fitted.fit_result_.losses
    a = fitted.predict(test, num_samples=50, seed=3)
    b = again.predict(test, num_samples=50, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = fitted.predict(test, num_samples=50, seed=4)
    assert not np.allclose(a["mean"], c["mean"])


def test_save_load_round_trip(fitted, tiny_split, tmp_path):
    _, test = tiny_split
    fitted.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, BayesianMF) and loaded.get_params() == fitted.get_params()
    pd.testing.assert_frame_equal(
        fitted.predict(test, num_samples=40), loaded.predict(test, num_samples=40)
    )
    assert loaded.fit_result_.losses == fitted.fit_result_.losses


def test_bad_input(fitted, tiny_split):
    train, _ = tiny_split
    with pytest.raises(ValueError, match="rank"):
        BayesianMF(rank=0)
    with pytest.raises(ValueError, match="noise"):
        BayesianMF(noise="student")
    with pytest.raises(ValueError, match="factor_scale"):
        BayesianMF(factor_scale=-1.0)
    with pytest.raises(TypeError, match="DrugResponseData"):
        BayesianMF().fit(train.frame)
    unknown = pd.DataFrame({"task": ["task0"], "cell": ["no-such-cell"], "drug": ["drug00"]})
    with pytest.raises(KeyError, match="no-such-cell"):
        fitted.predict(unknown)
    with pytest.raises(KeyError, match="unknown task"):
        fitted.predict(unknown.assign(task="other", cell="cell000"))
    with pytest.raises(RuntimeError, match="not fitted"):
        BayesianMF().predict(unknown)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("svd")


def test_registry_builds_mf():
    assert isinstance(get_model("mf", rank=4), BayesianMF)


def test_recovers_noise_and_calibrates():
    """Posterior noise near the planted 0.4, and 90% intervals cover 85-95% of held-out y."""
    data, truth = make_latent_factor_data(
        n_cells=150, n_drugs=40, n_tasks=2, rank=3, noise=0.4, missing=0.2, seed=3
    )
    train, test = split(data, "lpo", 0.2, seed=1)
    model = BayesianMF(rank=3, noise="task", cell_features=False, drug_features=False)
    model.fit(train, steps=800, lr=0.05, progress_bar=False)
    noise = model.posterior_median()["noise_sd"] * model.scaler_.std
    # ~7,700 rows per task: sampling error of the noise sd is ~1%, the factorisation's
    # shrinkage adds a few percent; 10% is a real recovery test.
    np.testing.assert_allclose(noise, truth.noise, rtol=0.1)
    pred = model.predict(test, num_samples=200)
    cov = coverage(pred["y"], pred["lower"], pred["upper"])
    assert 0.85 <= cov <= 0.95
    # Close to the noise floor: RMSE within 20% of the planted noise.
    assert rmse(pred["y"], pred["mean"]) < 1.2 * 0.4


def test_side_features_predict_unseen_cells():
    data, _ = make_latent_factor_data(
        n_cells=200, n_drugs=30, n_tasks=1, rank=3, noise=0.3, feature_strength=0.9, seed=2
    )
    train, test = split(data, "lco", 0.2, seed=0)
    plain = BayesianMF(rank=3, cell_features=False, drug_features=False).fit(train, **FIT)
    featured = BayesianMF(rank=3, cell_features=True, drug_features=False).fit(train, **FIT)
    p_plain, p_feat = plain.predict(test, num_samples=100), featured.predict(test, num_samples=100)
    # Without features an unseen cell gets only drug means; with them, far better.
    assert rmse(p_feat["y"], p_feat["mean"]) < 0.8 * rmse(p_plain["y"], p_plain["mean"])
    # Both are honest about it: coverage near nominal even for unseen cells.
    assert 0.8 <= coverage(p_feat["y"], p_feat["lower"], p_feat["upper"]) <= 0.97
    assert 0.8 <= coverage(p_plain["y"], p_plain["lower"], p_plain["upper"]) <= 0.97


def test_unknown_cell_predicted_from_its_features(tiny):
    data, _ = tiny
    table = data.cell_features
    seen = data.subset(data.frame["cell"] != "cell000")
    seen = DrugResponseData(
        seen.frame.drop(columns=["task_code", "cell_code", "drug_code"]),
        table.drop(index="cell000"),
        data.drug_features,
    )
    model = BayesianMF(rank=3, cell_features=True, drug_features=False).fit(seen, **FIT)
    # The new cell is unknown to the fitted code space, so give the model its features.
    model.cell_table_ = table
    pairs = pd.DataFrame(
        {"task": ["task0"] * 2, "cell": ["cell000", "cell001"], "drug": ["drug00", "drug00"]}
    )
    pred = model.predict(pairs, num_samples=100)
    assert pred.loc[0, "sd"] > pred.loc[1, "sd"]


def test_censored_rows_use_the_cdf():
    """Right-censoring at a cap: treating capped values as exact biases predictions down."""
    data, truth = make_latent_factor_data(
        n_cells=120, n_drugs=30, n_tasks=1, rank=2, noise=0.3, missing=0.0, seed=4
    )
    frame = data.frame.drop(columns=["task_code", "cell_code", "drug_code"])
    cap = np.quantile(frame["y"], 0.7)
    frame["censor"] = (frame["y"] > cap).astype(int)
    frame["y"] = np.minimum(frame["y"], cap)
    censored = DrugResponseData(frame)
    exact = DrugResponseData(frame.drop(columns="censor"))
    fits = [BayesianMF(rank=2).fit(d, **FIT) for d in (censored, exact)]
    above = frame[frame["censor"] == 1]
    signal = truth.signal[0, above["cell"].str[4:].astype(int), above["drug"].str[4:].astype(int)]
    errors = [np.mean(f.predict(above, num_samples=50)["mean"] - signal) for f in fits]
    # Exact treatment pulls capped pairs to the cap; the CDF keeps them above it.
    assert errors[1] < -0.2
    assert abs(errors[0]) < 0.5 * abs(errors[1])


def test_single_task_wrapper(tiny_split, tmp_path):
    train, test = tiny_split
    model = BayesianMF(rank=3, multitask=False).fit(train, **{**FIT, "steps": 150})
    assert set(model.task_models_) == set(train.tasks)
    pred = model.predict(test, num_samples=40)
    assert list(pred["task"]) == list(test.frame["task"])
    model.save(tmp_path / "st")
    loaded = load_model(tmp_path / "st")
    pd.testing.assert_frame_equal(pred, loaded.predict(test, num_samples=40))


def test_multitask_borrows_strength():
    """A sparse task correlated with dense ones is predicted better jointly."""
    data, _ = make_latent_factor_data(
        n_cells=150,
        n_drugs=30,
        n_tasks=2,
        rank=3,
        noise=0.3,
        task_correlation=0.95,
        missing=[0.2, 0.9],
        feature_strength=0.0,
        seed=5,
    )
    train, test = split(data, "task", 0.5, seed=0, task="task1")
    kw = {"rank": 3, "cell_features": False, "drug_features": False}
    joint = BayesianMF(**kw).fit(train, **FIT).predict(test, num_samples=60)
    alone = BayesianMF(**kw, multitask=False).fit(train, **FIT).predict(test, num_samples=60)
    assert rmse(joint["y"], joint["mean"]) < 0.9 * rmse(alone["y"], alone["mean"])


def test_minibatch_fit(tiny_split):
    train, test = tiny_split
    model = BayesianMF(rank=3).fit(train, **{**FIT, "batch_size": 256, "steps": 400})
    pred = model.predict(test, num_samples=50)
    assert rmse(pred["y"], pred["mean"]) < test.y.std()


@pytest.mark.slow
def test_real_gdsc_slice(gdsc_dir):
    """On 150 GDSC2 cells: far better than drug means, and calibrated."""
    raw = pd.read_csv(gdsc_dir / "GDSC2_IC50.csv")
    keep = sorted(raw["CELL_LINE_NAME"].unique())[:150]
    frame = pd.DataFrame(
        {
            "task": "GDSC2",
            "cell": raw["CELL_LINE_NAME"],
            "drug": raw["DRUG_NAME"],
            "y": raw["LN_IC50"],
        }
    )[raw["CELL_LINE_NAME"].isin(keep)]
    data = DrugResponseData(frame.groupby(["task", "cell", "drug"], as_index=False)["y"].mean())
    train, test = split(data, "lpo", 0.2, seed=0)
    pred = BayesianMF(rank=20).fit(train, steps=600, progress_bar=False).predict(test)
    drug_mean = train.frame.groupby("drug")["y"].mean()
    baseline = rmse(pred["y"], pred["drug"].map(drug_mean).fillna(train.y.mean()))
    # Measured: MF about 0.95, drug means about 1.45 on this slice.
    assert rmse(pred["y"], pred["mean"]) < 0.8 * baseline
    assert 0.85 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_predict_on_cuda(tiny_split):
    train, test = tiny_split
    model = BayesianMF(rank=3).fit(train, **{**FIT, "device": "cuda"})
    assert model.device_.type == "cuda"
    pred = model.predict(test, num_samples=50)
    assert (pred["sd"] > 0).all() and rmse(pred["y"], pred["mean"]) < test.y.std()
