"""Contract and model-specific tests of the Bayesian NMF."""

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import DrugResponseData, split
from mtl4c_prob.evaluation.metrics import coverage, rmse
from mtl4c_prob.models import MeanEffects, get_model
from mtl4c_prob.models._nmf import BayesianNMF

from .contract import check_beats_mean, check_contract, check_unknown_cell_error, contract_split

FIT = {"steps": 300, "lr": 0.05, "progress_bar": False, "seed": 0}


@pytest.fixture(scope="module")
def two_task_fit():
    train, test = contract_split(n_tasks=2)
    return BayesianNMF(rank=3).fit(train, **FIT), train, test


def test_contract(tmp_path):
    train, test = contract_split()
    model, _ = check_contract(lambda: BayesianNMF(rank=3), train, test, {"steps": 100}, tmp_path)
    check_unknown_cell_error(model)


@pytest.mark.parametrize(
    ("init", "margin"), [("nmf", 0.8), ("random", 0.9)], ids=["nmf-start", "random-start"]
)
def test_beats_mean_effects(init, margin):
    # Measured: 0.73 (NMF start) and 0.89 (random start) against 1.07 for mean effects.
    train, test = contract_split()
    check_beats_mean(lambda: BayesianNMF(rank=3, init=init), train, test, FIT, margin=margin)


def test_posterior_factors_are_non_negative(two_task_fit):
    model, train, _ = two_task_fit
    draws = model.sample_factors(num_samples=30, seed=1)
    assert draws["cell_factors"].shape == (30, train.n_cells, 3)
    assert draws["drug_factors"].shape == (30, train.n_drugs, 3)
    assert draws["cell_task_factors"].shape == (30, 2, train.n_cells, 3)
    for name in ("cell_factors", "drug_factors", "cell_task_factors", "factor_weights"):
        assert np.isfinite(draws[name]).all() and (draws[name] >= 0).all(), name
    # Draws differ (a posterior, not a point), and the median summary agrees in sign.
    assert draws["cell_factors"].std(0).max() > 0
    median = model.posterior_median()
    assert (median["cell_factors"] >= 0).all() and (median["drug_factors"] >= 0).all()
    # The interaction is -U.V: each factor lowers the responses that load on it.
    assert model.sign == -1


def test_multitask_path_with_two_tasks(two_task_fit, tmp_path):
    model, train, test = two_task_fit
    assert model.n_tasks_ == 2 and not hasattr(model, "task_models_")
    median = model.posterior_median()
    assert median["cell_task_sd"].shape == (2,) and (median["cell_task_sd"] > 0).all()
    pred = model.predict(test, num_samples=60)
    assert set(pred["task"]) == {"task0", "task1"}
    assert rmse(pred["y"], pred["mean"]) < 0.6 * test.y.std()
    # The single-task wrapper fits one NMF per task.
    alone = BayesianNMF(rank=3, multitask=False).fit(train, **{**FIT, "steps": 100})
    assert set(alone.task_models_) == {"task0", "task1"}
    assert alone.predict(test, num_samples=30)["sd"].gt(0).all()


def _planted(n_cells=80, n_drugs=25, rank=3, noise=0.3, link=None, seed=0):
    """Responses from offset + biases - U.V with sparse Gamma factors, 30% missing."""
    rng = np.random.default_rng(seed)
    U = rng.gamma(0.5, 1.0, (n_cells, rank))
    V = rng.gamma(0.5, 0.5, (n_drugs, rank))
    bias = rng.normal(0, 0.3, n_cells)[:, None] + rng.normal(0, 0.3, n_drugs)[None]
    y = 2.5 + bias - U @ V.T + rng.normal(0, noise, (n_cells, n_drugs))
    y = link(y) if link else y
    cells, drugs = np.meshgrid(np.arange(n_cells), np.arange(n_drugs), indexing="ij")
    keep = rng.random(y.shape) > 0.3
    frame = pd.DataFrame(
        {
            "task": "screen",
            "cell": [f"c{i:02d}" for i in cells[keep]],
            "drug": [f"d{j:02d}" for j in drugs[keep]],
            "y": y[keep],
        }
    )
    return split(DrugResponseData(frame), "lpo", 0.2, seed=0)


def test_auc_like_responses_in_unit_interval():
    """AUC-like responses in (0, 1), mean about 0.88 with a sensitive tail as in GDSC2."""
    train, test = _planted(link=lambda x: 1 / (1 + np.exp(-x)))
    assert 0 < train.y.min() and train.y.max() < 1
    pred = BayesianNMF(rank=3).fit(train, **FIT).predict(test, num_samples=100)
    mean = MeanEffects().fit(train, **FIT).predict(test, num_samples=100)
    assert rmse(pred["y"], pred["mean"]) < 0.75 * rmse(mean["y"], mean["mean"])
    # Input units: means stay inside the unit interval, intervals are calibrated.
    assert pred["mean"].between(0, 1).all()
    assert abs(pred["mean"].mean() - test.y.mean()) < 0.02
    assert 0.8 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.97


def test_planted_non_negative_factors_near_noise_floor():
    """Planted non-negative factors: noise sd recovered, RMSE near the floor, calibrated."""
    train, test = _planted(n_cells=100, n_drugs=30, noise=0.3, seed=1)
    model = BayesianNMF(rank=3, noise="task").fit(train, **FIT)
    pred = model.predict(test, num_samples=100)
    # Measured 0.41 (the Bayesian MF: 0.39): held-out pairs of two heavy-tailed factors
    # cannot be predicted to the noise floor from ~1,700 rows.
    assert rmse(pred["y"], pred["mean"]) < 1.45 * 0.3
    assert 0.82 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.96
    noise = model.posterior_median()["noise_sd"] * model.scaler_.std
    np.testing.assert_allclose(noise, 0.3, rtol=0.2)


def test_cells_without_training_rows_come_from_the_prior():
    """Leave-cells-out: new cells get prior factors, near mean effects and wider intervals."""
    train, test = contract_split(n_tasks=1, kind="lco")
    model = BayesianNMF(rank=3).fit(train, **FIT)
    assert not model.seen_cells_[model.cells_.get_indexer(test.frame["cell"])].any()
    pred = model.predict(test, num_samples=100)
    mean = MeanEffects().fit(train, **FIT).predict(test, num_samples=100)
    # Measured 1.59 against 1.45: no features, so at best the population's response.
    assert rmse(pred["y"], pred["mean"]) < 1.2 * rmse(mean["y"], mean["mean"])
    assert coverage(pred["y"], pred["lower"], pred["upper"]) >= 0.85
    seen = model.predict(train.frame.head(200), num_samples=100)
    assert pred["sd"].median() > 2 * seen["sd"].median()


def test_arguments_and_registry():
    assert isinstance(get_model("nmf", rank=4), BayesianNMF)
    assert BayesianNMF(rank=4).get_params()["rank"] == 4
    with pytest.raises(ValueError, match="rank"):
        BayesianNMF(rank=0)
    with pytest.raises(ValueError, match="sign"):
        BayesianNMF(sign=0)
    with pytest.raises(ValueError, match="init"):
        BayesianNMF(init="nndsvd")
    with pytest.raises(ValueError, match="noise"):
        BayesianNMF(noise="student")
    with pytest.raises(ValueError, match="weight_scale"):
        BayesianNMF(weight_scale=0.0)
    with pytest.raises(RuntimeError, match="jointly fitted"):
        BayesianNMF().sample_factors()


def test_rank_is_capped_by_the_number_of_drugs():
    # Ten drugs identify at most ten factors; the other forty of the default rank would
    # stay at their heavy-tailed log-normal prior. Before the cap, one pair of this split
    # had predictive mean -200 and sd 2000 (responses have sd 1.6).
    from mtl4c_prob.data import SyntheticDataCreator

    creator = SyntheticDataCreator(
        num_tasks=3, cellsPerTask=200, drugsPerTask=10, function="cosine",
        normalize=False, noise=1, graph=False, test_split=0.3,
    )  # fmt: skip
    creator.prepare_data()
    train, test = creator.to_data()
    model = BayesianNMF().fit(train, progress_bar=False, seed=0)
    assert model.rank == 50 and model.n_factors_ == 10
    assert model.posterior_median()["factor_weights"].shape == (10,)
    pred = model.predict(test, num_samples=100)
    sd_y = test.frame["y"].std()
    assert pred["sd"].max() < 3 * sd_y
    assert rmse(pred["y"], pred["mean"]) < sd_y
