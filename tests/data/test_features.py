"""Tests of FeatureTransformer and prepare_features (fitted on training rows only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import DrugResponseData, FeatureTransformer, prepare_features, split
from mtl4c_prob.exceptions import DataError


def feature_table(n_rows: int = 30, n_cols: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # correlated columns with different scales and offsets
    X = rng.standard_normal((n_rows, n_cols)) @ rng.standard_normal((n_cols, n_cols))
    X = X * np.arange(1, n_cols + 1) + 10.0
    return pd.DataFrame(
        X, index=[f"cell{i:02d}" for i in range(n_rows)], columns=[f"g{j}" for j in range(n_cols)]
    )


def response_data(cell_features: pd.DataFrame, n_drugs: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [
        (task, cell, f"drug{d}", rng.normal())
        for task in ("a", "b")
        for cell in cell_features.index[:24]  # the last rows are feature-only cells
        for d in range(n_drugs)
        if rng.random() < 0.8
    ]
    drug_features = pd.DataFrame(
        rng.normal(5.0, 2.0, (n_drugs, 3)), index=[f"drug{d}" for d in range(n_drugs)]
    )
    frame = pd.DataFrame(rows, columns=["task", "cell", "drug", "y"])
    return DrugResponseData(frame, cell_features, drug_features)


# ---------------------------------------------------------------- FeatureTransformer


def test_standardise_uses_training_rows_only():
    table = feature_table()
    train = table.iloc[:20]

    transformer = FeatureTransformer().fit(train)
    out = transformer.transform(table)

    np.testing.assert_allclose(transformer.mean_, train.mean().to_numpy())
    np.testing.assert_allclose(transformer.std_, train.std(ddof=0).to_numpy())
    np.testing.assert_allclose(out.iloc[:20].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.iloc[:20].std(ddof=0), 1.0)
    expected = (table - train.mean()) / train.std(ddof=0)
    pd.testing.assert_frame_equal(out, expected)
    assert list(out.columns) == list(table.columns) and list(out.index) == list(table.index)


@pytest.mark.parametrize("n_components", [None, 3], ids=["standardise", "pca"])
def test_held_out_rows_do_not_leak_into_the_transform(n_components):
    table = feature_table()
    changed = table.copy()
    changed.iloc[20:] = changed.iloc[20:] * 100.0 + 50.0  # only held-out rows change

    before = FeatureTransformer(n_components).fit(table.iloc[:20]).transform(table)
    after = FeatureTransformer(n_components).fit(changed.iloc[:20]).transform(changed)

    pd.testing.assert_frame_equal(before.iloc[:20], after.iloc[:20])
    assert not np.allclose(before.iloc[20:], after.iloc[20:])

    # whereas fitting on all rows would have moved the training rows
    leaky = FeatureTransformer(n_components).fit(changed).transform(changed)
    assert not np.allclose(leaky.iloc[:20], before.iloc[:20])


def test_pca_has_unit_variance_on_training_rows():
    table = feature_table(n_rows=40, n_cols=8)
    train = table.iloc[:30]

    transformer = FeatureTransformer(n_components=4).fit(train)
    out = transformer.transform(table)

    assert out.shape == (40, 4)
    assert list(out.columns) == ["pc1", "pc2", "pc3", "pc4"]
    P = out.iloc[:30].to_numpy()
    np.testing.assert_allclose(P.mean(axis=0), 0.0, atol=1e-10)
    # unit variance and uncorrelated components on the training rows
    np.testing.assert_allclose(np.cov(P, rowvar=False), np.eye(4), atol=1e-10)
    # components are ordered by explained variance and orthonormal
    np.testing.assert_allclose(
        transformer.components_.T @ transformer.components_, np.eye(4), atol=1e-12
    )
    assert np.all(np.diff(transformer.pc_std_) <= 0)


def test_nan_is_imputed_with_the_training_mean():
    table = feature_table(n_rows=10, n_cols=3)
    table.iloc[2, 1] = np.nan
    table.loc["no_features"] = np.nan  # a cell without a feature row

    out = FeatureTransformer().fit(table.iloc[:10]).transform(table)
    pca = FeatureTransformer(n_components=2).fit(table.iloc[:10]).transform(table)

    assert np.isfinite(out.to_numpy()).all() and np.isfinite(pca.to_numpy()).all()
    assert out.iloc[2, 1] == 0.0
    np.testing.assert_array_equal(out.loc["no_features"], 0.0)
    np.testing.assert_array_equal(pca.loc["no_features"], 0.0)
    observed = table.iloc[:10, 1].dropna()
    assert out.iloc[0, 1] == pytest.approx(
        (table.iloc[0, 1] - observed.mean()) / observed.std(ddof=0)
    )


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:Degrees of freedom")
def test_constant_and_all_nan_columns_do_not_blow_up():
    table = pd.DataFrame({"const": [3.0] * 5, "empty": [np.nan] * 5, "x": [1.0, 2, 3, 4, 5]})

    out = FeatureTransformer().fit_transform(table)

    np.testing.assert_array_equal(out["const"], 0.0)
    np.testing.assert_array_equal(out["empty"], 0.0)
    np.testing.assert_allclose(out["x"].std(ddof=0), 1.0)


def test_transform_selects_fitted_columns_by_name():
    table = feature_table(n_rows=10, n_cols=3)
    transformer = FeatureTransformer().fit(table)

    shuffled = table[["g2", "g0", "g1"]].assign(extra=1.0)

    pd.testing.assert_frame_equal(transformer.transform(shuffled), transformer.transform(table))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: FeatureTransformer().fit(t.iloc[:1]), DataError, r"on 1 row\(s\)"),
        (lambda t: FeatureTransformer(0).fit(t), ValueError, "n_components must be between 1"),
        (lambda t: FeatureTransformer(7).fit(t), ValueError, "between 1 and 6 .* got 7"),
        (lambda t: FeatureTransformer().transform(t), RuntimeError, "before fit"),
        (
            lambda t: FeatureTransformer().fit(t).transform(t.drop(columns="g3")),
            DataError,
            r"lacks 1 fitted column\(s\), e.g. 'g3'",
        ),
    ],
    ids=["one-row", "zero-components", "too-many-components", "not-fitted", "missing-column"],
)
def test_transformer_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(feature_table(n_rows=10))


# ---------------------------------------------------------------- prepare_features


def lco_split_with_shifted_test_cells(seed: int = 0):
    """An LCO split whose held-out cells (and feature-only cells) have shifted raw features."""
    raw = feature_table()
    train, test = split(response_data(raw), "lco", test_fraction=0.25, seed=seed)
    shifted = raw.copy()
    held = ~raw.index.isin(train.frame["cell"].unique())
    shifted.loc[held] += 5.0 * raw.std(ddof=0)
    return train.with_features(shifted), test.with_features(shifted), shifted


def test_prepare_features_fits_on_training_cells_only():
    train, test, raw = lco_split_with_shifted_test_cells()
    train_cells = train.frame["cell"].unique()
    test_cells = test.frame["cell"].unique()

    new_train, new_test = prepare_features(train, test)

    cells = new_train.cell_features
    assert cells.shape == raw.shape  # every feature row is transformed, feature-only ones too
    np.testing.assert_allclose(cells.loc[train_cells].mean(), 0.0, atol=1e-10)
    np.testing.assert_allclose(cells.loc[train_cells].std(ddof=0), 1.0)
    # the held-out cells are not forced to mean 0: their shift of 5 raw sd survives
    assert (cells.loc[test_cells].mean() > 2.0).all()
    expected = FeatureTransformer().fit(raw.loc[train_cells]).transform(raw)
    pd.testing.assert_frame_equal(cells, expected)
    pd.testing.assert_frame_equal(new_test.cell_features, cells)

    # drugs are all seen in training under LCO: standardised on them
    drugs = new_train.drug_features
    np.testing.assert_allclose(drugs.mean(), 0.0, atol=1e-10)
    pd.testing.assert_frame_equal(new_test.drug_features, drugs)

    # rows and code spaces are untouched
    assert new_train.n_obs == train.n_obs and new_test.n_obs == test.n_obs
    np.testing.assert_array_equal(new_test.codes("cell"), test.codes("cell"))


def test_prepare_features_ignores_changes_to_held_out_cells():
    train, test, raw = lco_split_with_shifted_test_cells(seed=1)
    held = ~raw.index.isin(train.frame["cell"].unique())
    changed = raw.copy()
    changed.loc[held] = changed.loc[held] * -3.0 + 100.0

    before, _ = prepare_features(train, test, cell_pca=3)
    after, _ = prepare_features(
        train.with_features(changed), test.with_features(changed), cell_pca=3
    )

    pd.testing.assert_frame_equal(before.cell_features.loc[~held], after.cell_features.loc[~held])
    assert list(before.cell_features.columns) == ["pc1", "pc2", "pc3"]
    P = before.cell_features.loc[~held].to_numpy()
    np.testing.assert_allclose(P.var(axis=0, ddof=1), 1.0)


def test_prepare_features_without_test_and_with_drug_pca():
    train, _, _ = lco_split_with_shifted_test_cells()

    new_train, new_test = prepare_features(train, drug_pca=2)

    assert new_test is None
    assert list(new_train.drug_features.columns) == ["pc1", "pc2"]
    assert new_train.cell_features.shape[1] == 6


def test_prepare_features_without_tables_is_a_no_op():
    frame = pd.DataFrame({"task": "t", "cell": ["a", "b"], "drug": "d", "y": [1.0, 2.0]})
    new_train, _ = prepare_features(DrugResponseData(frame))
    assert new_train.cell_features is None and new_train.drug_features is None


def test_prepare_features_needs_a_training_cell_with_features():
    frame = pd.DataFrame({"task": "t", "cell": ["a", "b"], "drug": "d", "y": [1.0, 2.0]})
    data = DrugResponseData(frame, cell_features=pd.DataFrame({"g": [1.0, 2.0]}, index=["x", "y"]))

    with pytest.raises(DataError, match="no training cell has a row in the cell feature table"):
        prepare_features(data)
