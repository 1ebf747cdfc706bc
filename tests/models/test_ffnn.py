"""Contract and model-specific tests of the Bayesian feed-forward net."""

import pytest
import torch

from mtl4c_prob.data import DrugResponseData, make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import coverage, rmse
from mtl4c_prob.models import MeanEffects, get_model, load_model
from mtl4c_prob.models._ffnn import BayesianFFNN

from .contract import check_beats_mean, check_contract, contract_split

SMALL = {"hidden": (32, 16)}
FIT = {"steps": 250, "lr": 0.02, "progress_bar": False, "seed": 0}


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


@pytest.fixture(scope="module")
def lpo():
    return contract_split()


@pytest.fixture(scope="module")
def floor(lpo):
    """Held-out RMSE of the mean-effects baseline, which the default net must beat."""
    train, test = lpo
    _, floor = check_beats_mean(lambda: BayesianFFNN(**SMALL), train, test, FIT, margin=0.8)
    return floor


def test_contract(lpo, tmp_path):
    train, test = lpo
    model, _ = check_contract(
        lambda: BayesianFFNN(**SMALL), train, test, {"steps": 100, "lr": 0.02}, tmp_path
    )
    # The data carry drug features: by default the net takes them and the drug embedding.
    assert [name for name, _ in model._blocks()] == ["cell", "drug", "drug_embedding"]
    assert isinstance(get_model("ffnn"), BayesianFFNN)


def test_beats_mean_effects(floor):
    assert floor > 0  # the fixture runs check_beats_mean once for the whole module


def test_minibatch_fit(lpo):
    train, test = lpo
    model = BayesianFFNN(**SMALL).fit(train, **{**FIT, "steps": 150, "batch_size": 256})
    assert model.fit_result_.settings["batch_size"] == 256
    losses = model.fit_result_.losses
    assert sum(losses[-20:]) < sum(losses[:20])
    pred = model.predict(test, num_samples=20)
    assert rmse(pred["y"], pred["mean"]) < test.y.std()


def test_last_layer_mode_optimises_and_saves_point_weights(lpo, floor, tmp_path):
    """Hidden weights are model-side parameters: SVI moves them, save/load keeps them."""
    train, test = lpo
    start = BayesianFFNN(**SMALL).fit(train, **{**FIT, "steps": 1, "lr": 1e-9})
    model = BayesianFFNN(**SMALL).fit(train, **FIT)
    before, after = start.point_weights_.flat.detach(), model.point_weights_.flat.detach()
    # Same seed, same initial draw; the fit moves the weights by a good share of it.
    assert (after - before).norm() > 0.1 * before.norm()
    assert "weights" not in model.guide_.median()

    model.save(tmp_path / "last")
    loaded = load_model(tmp_path / "last")
    torch.testing.assert_close(loaded.point_weights_.flat, after)
    pred = model.predict(test, num_samples=30)
    assert pred.equals(loaded.predict(test, num_samples=30))
    assert rmse(pred["y"], pred["mean"]) < 0.8 * floor


def test_all_weights_bayesian(lpo, floor):
    """With priors on every weight there are no point weights, and the weights have a guide."""
    train, test = lpo
    model = BayesianFFNN(**SMALL, bayesian="all").fit(train, **FIT)
    assert model.point_weights_ is None
    posterior = model.posterior_median()
    assert posterior["w1"].shape == (32, 16) and posterior["w0_drug"].shape[0] == 10
    pred = model.predict(test, num_samples=30)
    assert rmse(pred["y"], pred["mean"]) < 0.8 * floor


def test_predicts_unseen_cells_from_features():
    """Leave cells out, drug embedding fallback: better than mean effects, wider intervals."""
    data, _ = make_latent_factor_data(
        n_cells=150, n_drugs=25, n_tasks=1, rank=3, noise=0.3, feature_strength=1.0, seed=2
    )
    train, test = split(_strip(data, cell=False), "lco", 0.2, seed=0)
    model = BayesianFFNN(**SMALL).fit(train, **FIT)
    assert model.drug_table_ is None and "drug_embedding" in model._layouts()["z"]
    assert not model.seen_cells_[model.cells_.get_indexer(test.frame["cell"].unique())].any()

    pred = model.predict(test, num_samples=100)
    floor = MeanEffects().fit(train, **FIT).predict(test, num_samples=100)
    assert rmse(pred["y"], pred["mean"]) < 0.85 * rmse(floor["y"], floor["mean"])
    # Unseen cells draw their random bias from the prior: wider than seen cells' intervals.
    seen = model.predict(train.frame.sample(500, random_state=0), num_samples=30)
    assert pred["sd"].mean() > 1.5 * seen["sd"].mean()
    # Measured 0.82: the point-estimated trunk's uncertainty is not in the intervals.
    assert 0.75 <= coverage(pred["y"], pred["lower"], pred["upper"]) <= 0.97


def test_feature_errors(lpo):
    train, _ = lpo
    with pytest.raises(ValueError, match="--cell-features"):
        BayesianFFNN(**SMALL).fit(_strip(train, cell=True, drug=False), **FIT)
    with pytest.raises(ValueError, match="--drug-features"):
        BayesianFFNN(**SMALL, drug_input="features").fit(_strip(train, cell=False), **FIT)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": ()}, "hidden"),
        ({"hidden": (8, 0)}, "hidden"),
        ({"activation": "sigmoid"}, "activation"),
        ({"bayesian": "none"}, "bayesian"),
        ({"drug_input": "smiles"}, "drug_input"),
        ({"noise": "student"}, "noise"),
        ({"weight_scale": 0.0}, "weight_scale"),
        ({"drug_embedding": 0}, "drug_embedding"),
    ],
    ids=[
        "no-layers",
        "zero-width",
        "activation",
        "bayesian",
        "drug-input",
        "noise",
        "scale",
        "emb",
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesianFFNN(**kwargs)
