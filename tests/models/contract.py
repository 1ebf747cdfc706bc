"""Checks every model must pass (the model contract), shared by the model test files.

Use from a model's test file::

    from tests.models.contract import check_contract, check_beats_mean

    def test_contract(contract_data):
        check_contract(lambda: MyModel(...), *contract_data, fit={"steps": 200})
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import rmse
from mtl4c_prob.models import MeanEffects, load_model

BASE_FIT = {"lr": 0.05, "progress_bar": False, "seed": 0}


def contract_split(n_tasks: int = 2, kind: str = "lpo", seed: int = 1):
    """Small latent-factor data with features, split 80/20."""
    data, _ = make_latent_factor_data(
        n_cells=80, n_drugs=20, n_tasks=n_tasks, rank=3, noise=0.3, missing=0.3, seed=seed
    )
    return split(data, kind, 0.2, seed=0)


def check_contract(factory, train, test, fit: dict, tmp_path, num_samples: int = 60):
    """Fit, predict shapes, positive sd, seeded reproducibility, save/load, bad input."""
    fit = {**BASE_FIT, **fit}
    model = factory().fit(train, **fit)
    pred = model.predict(test, num_samples=num_samples, seed=2)

    # Shapes, order and sanity of the predictive summary.
    assert list(pred.columns[:8]) == ["task", "cell", "drug", "y", "mean", "sd", "lower", "upper"]
    assert len(pred) == test.n_obs
    assert list(pred["cell"]) == list(test.frame["cell"])
    values = pred[["mean", "sd", "lower", "upper"]].to_numpy()
    assert np.isfinite(values).all()
    assert (pred["sd"] > 0).all()
    assert (pred["lower"] <= pred["mean"]).all() and (pred["mean"] <= pred["upper"]).all()

    # Same seed, same fit and predictions; another prediction seed, other draws.
    again = factory().fit(train, **fit)
    assert again.fit_result_.losses == model.fit_result_.losses
    pd.testing.assert_frame_equal(pred, again.predict(test, num_samples=num_samples, seed=2))

    # Save and load without refitting.
    model.save(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    pd.testing.assert_frame_equal(pred, loaded.predict(test, num_samples=num_samples, seed=2))

    # Bad input: wrong type, unknown task.
    with pytest.raises(TypeError, match="DrugResponseData"):
        factory().fit(train.frame)
    unknown = test.frame[["task", "cell", "drug"]].head(1).assign(task="no-such-task")
    with pytest.raises(KeyError, match="unknown task"):
        model.predict(unknown)
    return model, pred


def check_unknown_cell_error(model):
    """A model without cell features refuses a cell it never saw, naming it."""
    pairs = pd.DataFrame(
        {"task": [model.tasks_[0]], "cell": ["no-such-cell"], "drug": [model.drugs_[0]]}
    )
    with pytest.raises(KeyError, match="no-such-cell"):
        model.predict(pairs)


def check_beats_mean(factory, train, test, fit: dict, margin: float = 0.95):
    """Held-out RMSE below ``margin`` times that of the mean-effects baseline."""
    fit = {**BASE_FIT, **fit}
    mean = MeanEffects().fit(train, **fit).predict(test, num_samples=60)
    pred = factory().fit(train, **fit).predict(test, num_samples=60)
    ours, floor = rmse(pred["y"], pred["mean"]), rmse(mean["y"], mean["mean"])
    assert ours < margin * floor, f"RMSE {ours:.4f} vs mean-effects {floor:.4f}"
    return ours, floor
