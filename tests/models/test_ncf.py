"""Contract and model-specific tests of the Bayesian NCF family."""

import logging

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine

from mtl4c_prob.data import DrugResponseData, make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import coverage, rmse
from mtl4c_prob.inference import local_params
from mtl4c_prob.models import MeanEffects, get_model
from mtl4c_prob.models import _ncf as ncf_module
from mtl4c_prob.models._ncf import BayesianNCF, FeaturizedNCF, PooledGMFNCF, PooledMLPNCF

from .contract import BASE_FIT, check_contract, check_unknown_cell_error, contract_split

CLASSES = [BayesianNCF, FeaturizedNCF, PooledMLPNCF, PooledGMFNCF]
IDS = ["ncf", "ncf-features", "ncf-pooled-mlp", "ncf-pooled-gmf"]
SMALL = {"factors": 4, "layers": (16, 8)}


FIT = {"steps": 80, "lr": 0.1}


@pytest.fixture(scope="module")
def two_tasks():
    return contract_split(n_tasks=2)


@pytest.fixture(scope="module")
def mean_rmse(two_tasks):
    train, test = two_tasks
    pred = MeanEffects().fit(train, **{**BASE_FIT, **FIT}).predict(test, num_samples=40)
    return rmse(pred["y"], pred["mean"])


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_contract_and_beats_mean_effects(cls, two_tasks, mean_rmse, tmp_path):
    """The model contract, then: on latent-factor data with two correlated tasks the
    interaction is worth a lot over the mean-effects baseline, at honest coverage."""
    model, pred = check_contract(lambda: cls(**SMALL), *two_tasks, FIT, tmp_path, num_samples=40)
    assert get_model(cls.name).__class__ is cls
    if cls is BayesianNCF:
        check_unknown_cell_error(model)
    assert rmse(pred["y"], pred["mean"]) < 0.8 * mean_rmse
    assert 0.75 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.98


def test_features_predict_unseen_cells():
    data, _ = make_latent_factor_data(
        n_cells=120, n_drugs=20, n_tasks=1, rank=3, noise=0.3, feature_strength=0.9, seed=2
    )
    train, test = split(data, "lco", 0.25, seed=0)
    fit = {**BASE_FIT, "steps": 120, "lr": 0.1}
    ids = BayesianNCF(**SMALL).fit(train, **fit)
    feats = FeaturizedNCF(**SMALL, drug_features=False).fit(train, **fit)
    p_ids, p_feat = ids.predict(test, num_samples=40), feats.predict(test, num_samples=40)
    # Without features an unseen cell gets only the drug effects; with them, far better,
    # and still honest about the extra uncertainty of a cell never seen.
    assert rmse(p_feat["y"], p_feat["mean"]) < 0.8 * rmse(p_ids["y"], p_ids["mean"])
    assert 0.8 <= coverage(p_feat["y"], p_feat["lower"], p_feat["upper"]) <= 0.98
    assert feats.drug_table_ is None


def test_features_predict_a_cell_unknown_to_the_fit(two_tasks):
    train, _ = two_tasks
    table = train.cell_features
    frame = train.frame[train.frame["cell"] != "cell000"]
    reduced = DrugResponseData(
        frame.drop(columns=["task_code", "cell_code", "drug_code"]),
        table.drop(index="cell000"),
        train.drug_features,
    )
    model = FeaturizedNCF(**SMALL).fit(reduced, **BASE_FIT, steps=30)
    assert "cell000" not in model.cells_
    pairs = pd.DataFrame({"task": ["task0"], "cell": ["cell000"], "drug": [model.drugs_[0]]})
    swapped = table.copy()
    swapped.loc["cell000"] = table.loc["cell001"].to_numpy()
    preds = []
    for features in (table, swapped):  # the new cell's own features, then another cell's
        model.cell_table_ = features
        preds.append(model.predict(pairs, num_samples=40))
    assert np.isfinite(preds[0][["mean", "sd"]].to_numpy()).all()
    assert abs(preds[0].loc[0, "mean"] - preds[1].loc[0, "mean"]) > 1e-3


def test_features_required(two_tasks):
    train, _ = two_tasks
    bare = DrugResponseData(train.frame.drop(columns=["task_code", "cell_code", "drug_code"]))
    with pytest.raises(ValueError, match="needs cell features.*--cell-features"):
        FeaturizedNCF(**SMALL).fit(bare, **BASE_FIT, steps=5)


@pytest.mark.parametrize(
    ("cls", "pooled_mlp"), [(PooledMLPNCF, True), (PooledGMFNCF, False)], ids=IDS[2:]
)
def test_pooled_parameter_sharing(cls, pooled_mlp, two_tasks):
    """The pooled branch has no task axis; the per-task branch has one."""
    train, _ = two_tasks
    model = cls(**SMALL, drug_features=False)
    post = model.fit(train, **BASE_FIT, steps=5).posterior_median()
    T, n_cells, K, E = 2, train.n_cells, 4, 8
    assert post["head"].shape == (T, K + 8)  # the output layer is per task in every variant
    if pooled_mlp:
        assert post["mlp_weight_0"].shape == (2 * E, 8)
        assert post["cell_z"].shape == (n_cells, E + 1)  # MLP embedding + bias, shared
        assert post["cell_task_z"].shape == (T, n_cells, K)  # one GMF per task
    else:
        assert post["mlp_weight_0"].shape == (T, 2 * E, 8)  # one MLP per task
        assert post["cell_z"].shape == (n_cells, K + 1)  # GMF embedding + bias, shared
        assert post["cell_task_z"].shape == (T, n_cells, E)
    shared = BayesianNCF(**SMALL).fit(train, **BASE_FIT, steps=5).posterior_median()
    assert "cell_task_z" not in shared and shared["mlp_weight_0"].shape == (2 * E, 8)


def test_single_task_pooled_reduces_to_ncf(caplog):
    train, _ = contract_split(n_tasks=1)
    with caplog.at_level(logging.INFO, logger="mtl4c_prob.models._ncf"):
        PooledGMFNCF(**SMALL).fit(train, **BASE_FIT, steps=5)
    assert "reduces to a single-task NCF" in caplog.text


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_dense_and_row_paths_agree(cls, two_tasks, monkeypatch):
    """The network on the dense (task, cell, drug) grid equals the row-by-row network."""
    train, _ = two_tasks
    model = cls(**SMALL).fit(train, **BASE_FIT, steps=5)
    with local_params(), torch.no_grad():
        data = model._tensors(train, model.device_, with_y=True)
        values = model.guide_.median()
        conditioned = poutine.condition(model.model, values)
        pyro.set_rng_seed(0)
        dense = poutine.trace(conditioned).get_trace(data).nodes
        monkeypatch.setattr(ncf_module, "DENSE_LIMIT", 0)
        pyro.set_rng_seed(0)
        rows = poutine.trace(conditioned).get_trace(data).nodes
    for site in ("loc", "scale"):
        torch.testing.assert_close(dense[site]["value"], rows[site]["value"])


def test_point_weights_are_fitted_and_bayesian_all_has_none(two_tasks):
    train, _ = two_tasks
    fit = {**BASE_FIT, "steps": 1}
    slow = BayesianNCF(**SMALL).fit(train, **{**fit, "lr": 0.01})
    fast = BayesianNCF(**SMALL).fit(train, **{**fit, "lr": 0.5})
    # Same seed, same start: only the optimiser's step on the model parameters differs.
    moved = (fast.net_.mlp_weights - slow.net_.mlp_weights).abs()
    assert moved.max() > 0.1
    full = BayesianNCF(**SMALL, bayesian="all").fit(train, **fit)
    assert full.net_ is None and "mlp_weight_0" in full._layouts()["z"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="layers"):
        BayesianNCF(layers=(64,))
    with pytest.raises(ValueError, match="even first width"):
        BayesianNCF(layers=(63, 8))
    with pytest.raises(ValueError, match="bayesian"):
        BayesianNCF(bayesian="some")
    with pytest.raises(ValueError, match="layer_scales"):
        BayesianNCF(layers=(16, 8), layer_scales=(1.0,))
    with pytest.raises(ValueError, match="activation"):
        BayesianNCF(activation="swish")
    with pytest.raises(ValueError, match="residual_scale"):
        FeaturizedNCF(residual_scale=0.0)
    with pytest.raises(TypeError):
        BayesianNCF(cell_features=True)
    with pytest.raises(TypeError):
        FeaturizedNCF(cell_features=False)
