import pytest

from mtl4c_prob.models import BayesianMF, MeanEffects, get_model

from .contract import check_beats_mean, check_contract, check_unknown_cell_error, contract_split


def test_contract(tmp_path):
    train, test = contract_split()
    model, _ = check_contract(
        lambda: MeanEffects(cell_features=False, drug_features=False),
        train,
        test,
        {"steps": 200},
        tmp_path,
    )
    check_unknown_cell_error(model)
    assert model.rank == 0


def test_mf_beats_mean_effects():
    train, test = contract_split()
    check_beats_mean(lambda: BayesianMF(rank=3), train, test, {"steps": 300}, margin=0.8)


def test_registry_and_arguments():
    assert isinstance(get_model("mean"), MeanEffects)
    with pytest.raises(TypeError):
        MeanEffects(rank=3)
