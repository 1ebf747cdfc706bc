import numpy as np
import pandas as pd
import pytest
import torch

from mtl4c_prob.models import _knn as knn_module
from mtl4c_prob.models import get_model, load_model
from mtl4c_prob.models._knn import NeighbourhoodModel

from .contract import (
    BASE_FIT,
    check_beats_mean,
    check_contract,
    check_unknown_cell_error,
    contract_split,
)

NO_FEATURES = {"cell_features": False, "drug_features": False}


@pytest.fixture(scope="module")
def data():
    return contract_split()


def _term(model, frame, weights=None):
    """Neighbour term of the rows of ``frame`` under the given (default: unit) weights."""
    weights = torch.ones(model.neighbours_.shape) if weights is None else weights
    codes = model._codes(frame)[:3]
    t, c, d = (torch.as_tensor(x) for x in codes)
    return model._neighbour_term(weights, t, c, d)[0].numpy()


def test_contract(data, tmp_path):
    train, test = data
    model, _ = check_contract(
        lambda: NeighbourhoodModel(k=10, **NO_FEATURES), train, test, {"steps": 100}, tmp_path
    )
    check_unknown_cell_error(model)
    loaded = load_model(tmp_path / "saved")
    assert torch.equal(loaded.neighbours_, model.neighbours_)
    assert torch.allclose(loaded.similarity_, model.similarity_)
    assert isinstance(get_model("knn"), NeighbourhoodModel)


def test_knn_beats_mean_effects(data):
    train, test = data
    check_beats_mean(lambda: NeighbourhoodModel(), train, test, {"steps": 200}, margin=0.8)


def test_similarity_from_training_rows_only(data):
    train, test = data
    model = NeighbourhoodModel(k=5, similarity="cosine", **NO_FEATURES)
    model.fit(train, **{**BASE_FIT, "steps": 50})

    # The residual tables hold exactly the training pairs, none of the test pairs.
    mask = model.tables_["mask"]
    for part, expected in ((train, True), (test, False)):
        t, c, d = (torch.as_tensor(part.codes(col).copy()) for col in ("task", "cell", "drug"))
        assert (mask[t, c, d].numpy() == expected).all()

    # Shrunk cosine of two drugs over the (task, cell) rows where the training data hold both.
    frame = train.frame.assign(z=model.scaler_.transform(train.y, train.codes("task")))
    wide = frame.pivot_table(index=["task", "cell"], columns="drug_code", values="z")
    i, slot = 3, 0
    j = int(model.neighbours_[i, slot])
    both = wide[[i, j]].dropna()
    n = len(both)
    cosine = (both[i] * both[j]).sum() / np.sqrt((both[i] ** 2).sum() * (both[j] ** 2).sum())
    expected = cosine * (n - 1) / (n - 1 + model.shrinkage)
    assert float(model.similarity_[i, slot]) == pytest.approx(expected, rel=1e-4)

    # Test responses are never read: changing them changes no prediction.
    changed = test.frame.assign(y=test.frame["y"].to_numpy()[::-1] + 5.0)
    a, b = model.predict(test, num_samples=20), model.predict(changed, num_samples=20)
    pd.testing.assert_frame_equal(a.drop(columns="y"), b.drop(columns="y"))


def test_training_row_inputs_leave_its_response_out(data):
    # With k = all other drugs, a training row's neighbour term must match the term of the
    # same pair once the row is removed from the training data (up to second-order effects
    # of the row on the scaler and the other baselines).
    train, _ = data
    fit = {**BASE_FIT, "steps": 1}
    full = NeighbourhoodModel(k=100, **NO_FEATURES).fit(train, **fit)
    rows = np.arange(0, train.n_obs, 97)[:8]
    terms = []
    for r in rows:
        without = NeighbourhoodModel(k=100, **NO_FEATURES).fit(
            train.subset(np.delete(np.arange(train.n_obs), r)), **fit
        )
        terms.append(_term(without, train.frame.iloc[[r]])[0])
    inside = _term(full, train.frame.iloc[rows])
    assert np.abs(inside).max() > 0.1
    np.testing.assert_allclose(inside, terms, atol=0.02)


def test_rows_without_neighbours_get_the_term_variance():
    # Cells without training rows (leave-cells-out) have no neighbour inputs: their term is
    # 0 and their predictive variance gains the variance the term explains in training.
    train, test = contract_split(kind="lco")
    model = NeighbourhoodModel(**NO_FEATURES).fit(train, **{**BASE_FIT, "steps": 100})
    weights = torch.ones(model.neighbours_.shape)
    codes = [torch.as_tensor(x) for x in model._codes(test.frame)[:3]]
    term, missing_var = model._neighbour_term(weights, *codes)
    assert (term == 0).all() and (missing_var > 0).all()
    codes = [torch.as_tensor(x) for x in model._codes(train.frame)[:3]]
    train_var = model._neighbour_term(weights, *codes)[1]
    assert float(train_var.mean()) < 0.5 * float(missing_var.mean())


def test_k_and_on_options(data):
    train, test = data
    fit = {**BASE_FIT, "steps": 100}
    by_drug = NeighbourhoodModel(k=3, weights="item", **NO_FEATURES).fit(train, **fit)
    assert by_drug.neighbours_.shape == (train.n_drugs, 3)
    assert not (by_drug.neighbours_ == torch.arange(train.n_drugs)[:, None]).any()
    assert (by_drug.similarity_[:, :-1] >= by_drug.similarity_[:, 1:]).all()  # best first
    table = by_drug.neighbour_table()
    assert set(table.columns) == {"drug", "rank", "neighbour", "similarity"}
    assert set(table["neighbour"]) <= set(train.drugs)
    assert "pair_weight_z" not in by_drug.posterior_median()

    by_cell = NeighbourhoodModel(k=500, on="cell", **NO_FEATURES).fit(train, **fit)
    assert by_cell.neighbours_.shape == (train.n_cells, train.n_cells - 1)  # k is capped
    assert by_cell.neighbour_table()["cell"].isin(train.cells).all()
    pred = by_cell.predict(test, num_samples=20)
    assert np.isfinite(pred["mean"]).all() and (pred["sd"] > 0).all()
    assert np.abs(_term(by_cell, test.frame)).max() > 0.1


def test_argument_errors(data, monkeypatch):
    for kwargs, message in (
        ({"k": 0}, "k must be a positive integer"),
        ({"on": "tissue"}, "on must be 'drug' or 'cell'"),
        ({"similarity": "jaccard"}, "similarity must be one of"),
        ({"shrinkage": -1.0}, "shrinkage must be non-negative"),
        ({"weights": "cell"}, "weights must be"),
        ({"weight_spread": 0.0}, "weight_spread must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            NeighbourhoodModel(**kwargs)
    with pytest.raises(TypeError):
        NeighbourhoodModel(rank=3)
    monkeypatch.setattr(knn_module, "MAX_INPUTS", 1000)
    with pytest.raises(NotImplementedError, match="multitask=False"):
        NeighbourhoodModel().fit(data[0], **{**BASE_FIT, "steps": 1})
