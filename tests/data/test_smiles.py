import builtins

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import is_smiles_table, load_features, load_responses, morgan_fingerprints
from mtl4c_prob.exceptions import DataWarning

pytest.importorskip("rdkit")

TABLE = pd.DataFrame(
    {
        "drug_name": ["ethanol", "benzene", "broken", "empty"],
        "SMILES": ["CCO", "c1ccccc1", "C1CC(", None],
    }
)


def test_fingerprints_and_fallback():
    with pytest.warns(DataWarning, match="2 drug"):
        fp, report = morgan_fingerprints(TABLE, radius=2, n_bits=256)
    assert fp.shape == (4, 257) and list(fp.index) == list(TABLE["drug_name"])
    assert report.n_parsed == 2 and report.unparsable == ["broken"] and report.missing == ["empty"]
    bits = fp.drop(columns="no_structure")
    assert set(np.unique(bits.to_numpy())) <= {0.0, 1.0}
    assert bits.loc["ethanol"].sum() > 0 and bits.loc["benzene"].sum() > 0
    assert not bits.loc["ethanol"].equals(bits.loc["benzene"])
    assert bits.loc[["broken", "empty"]].to_numpy().sum() == 0
    assert list(fp["no_structure"]) == [0, 0, 1, 1]
    # A larger radius sees more substructures of benzene's neighbourhood.
    fp1, _ = morgan_fingerprints(TABLE.iloc[:2], radius=1, n_bits=256)
    assert fp1.loc["ethanol"].sum() <= fp.loc["ethanol"].drop("no_structure").sum()


def test_smiles_detection_any_case():
    assert is_smiles_table(TABLE) and is_smiles_table(TABLE.rename(columns={"SMILES": "smiles"}))
    assert not is_smiles_table(pd.DataFrame({"a": [1.0]}))


def test_load_responses_with_smiles(tmp_path):
    responses = tmp_path / "r.csv"
    pd.DataFrame(
        {
            "CELL_LINE_NAME": ["A", "A", "B", "B"],
            "DRUG_NAME": ["Ethanol", "benzene", "Ethanol", "unlisted"],
            "LN_IC50": [1.0, 2.0, 3.0, 4.0],
        }
    ).to_csv(responses, index=False)
    smiles = tmp_path / "smiles.csv"
    TABLE.iloc[:2].to_csv(smiles, index=False)
    with pytest.warns(DataWarning, match="no SMILES row"):
        data, _ = load_responses([responses], drug_features=smiles, fingerprint_bits=64)
    table = data.drug_features
    # "Ethanol" matches "ethanol" by spelling key; "unlisted" gets the fallback row.
    assert {"Ethanol", "benzene", "unlisted"} <= set(table.index)
    assert table.loc["unlisted", "no_structure"] == 1 and table.loc["Ethanol", "no_structure"] == 0
    assert not np.isnan(data.drug_feature_matrix).any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_bits"):
        morgan_fingerprints(TABLE, n_bits=4)


def test_missing_rdkit_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("rdkit"):
            raise ImportError("no rdkit")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"mtl4c-prob\[chem\]"):
        load_features(TABLE, "drug")
