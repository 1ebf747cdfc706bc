"""Tests of the latent-factor generator make_latent_factor_data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import DrugResponseData, LatentFactorTruth, make_latent_factor_data

CORRELATION = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, -0.3], [0.2, -0.3, 1.0]])


def interaction(truth: LatentFactorTruth) -> np.ndarray:
    """Interaction signal U_t V^T / sqrt(rank), shape (n_tasks, n_cells, n_drugs)."""
    rank = truth.drug_factors.shape[1]
    return np.einsum("tcr,dr->tcd", truth.cell_factors, truth.drug_factors) / np.sqrt(rank)


def residuals(data: DrugResponseData, truth: LatentFactorTruth) -> np.ndarray:
    t, c, d = data.codes("task"), data.codes("cell"), data.codes("drug")
    return data.y - truth.signal[t, c, d]


def test_shapes_names_and_tables():
    data, truth = make_latent_factor_data(
        n_cells=50, n_drugs=10, n_tasks=3, rank=2, n_cell_features=7, n_drug_features=4, seed=1
    )

    assert truth.cell_factors.shape == (3, 50, 2)
    assert truth.drug_factors.shape == (10, 2)
    assert truth.signal.shape == (3, 50, 10)
    assert truth.task_correlation.shape == (3, 3)
    assert truth.noise.shape == (3,) and truth.task_offset.shape == (3,)
    assert list(data.tasks) == ["task0", "task1", "task2"]
    assert data.cells[0] == "cell000" and data.cells[-1] == "cell049"
    assert data.drugs[0] == "drug00" and data.drugs[-1] == "drug09"
    assert (data.n_tasks, data.n_cells, data.n_drugs) == (3, 50, 10)
    assert data.cell_feature_matrix.shape == (50, 7)
    assert data.drug_feature_matrix.shape == (10, 4)
    assert np.isfinite(data.cell_feature_matrix).all()
    assert not data.frame.duplicated(["task", "cell", "drug"]).any()
    np.testing.assert_array_equal(truth.noise, 0.3)


def test_signal_is_offset_plus_biases_plus_interaction():
    _, truth = make_latent_factor_data(n_cells=40, n_drugs=12, n_tasks=2, seed=3)

    additive = truth.signal - interaction(truth)  # m_t + b_c + b_d

    centred = (
        additive
        - additive.mean(axis=2, keepdims=True)
        - additive.mean(axis=1, keepdims=True)
        + additive.mean(axis=(1, 2), keepdims=True)
    )
    np.testing.assert_allclose(centred, 0.0, atol=1e-10)
    # the cell and drug biases are shared by the tasks; only the offset differs
    np.testing.assert_allclose(
        additive[1] - additive[0], truth.task_offset[1] - truth.task_offset[0]
    )


def test_noise_sd_matches_truth():
    noise = [0.1, 0.5, 1.0]
    data, truth = make_latent_factor_data(
        n_cells=300, n_drugs=40, n_tasks=3, noise=noise, missing=0.3, seed=4
    )
    resid = residuals(data, truth)

    np.testing.assert_array_equal(truth.noise, noise)
    for t in range(3):
        r = resid[data.codes("task") == t]
        # ~8,400 rows per task: the sd estimate has relative sd 1/sqrt(2n) ~ 0.008, so a 4 %
        # tolerance is ~5 standard errors; the mean has standard error sd/sqrt(n) ~ 0.011 sd.
        assert r.std(ddof=1) == pytest.approx(noise[t], rel=0.04)
        assert abs(r.mean()) < 5 * noise[t] / np.sqrt(len(r))


def test_zero_noise_gives_the_signal():
    data, truth = make_latent_factor_data(n_cells=20, n_drugs=5, noise=0.0, seed=0)
    np.testing.assert_allclose(residuals(data, truth), 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"feature_strength": 0.0, "seed": 0}, id="residual-factors-seed0"),
        pytest.param({"feature_strength": 0.0, "seed": 1}, id="residual-factors-seed1"),
        pytest.param({"n_cell_features": 1000, "seed": 2}, id="feature-driven"),
    ],
)
def test_interaction_correlation_between_tasks_matches_truth(kwargs):
    # 2,000 cells x 30 drugs x rank 4. With residual factors only, the error of the realised
    # correlation has sd <= 0.01 over seeds (checked on 20 seeds: max error 0.026), so 0.06 is
    # ~6 sd. When features drive the factors the cross-task error of the feature part has sd
    # ~ s / sqrt(n_cell_features) whatever the number of cells (so the default of 20 features
    # is far too few for this check); with 1,000 features the sd is <= 0.018, and 0.08 ~ 4.5 sd.
    tolerance = 0.06 if kwargs.get("feature_strength") == 0.0 else 0.08
    data, truth = make_latent_factor_data(
        n_cells=2000, n_drugs=30, n_tasks=3, rank=4, task_correlation=CORRELATION, **kwargs
    )

    realised = np.corrcoef(interaction(truth).reshape(3, -1))

    np.testing.assert_array_equal(truth.task_correlation, CORRELATION)
    np.testing.assert_allclose(realised, CORRELATION, atol=tolerance)
    # the realised pairs keep the planted ordering
    assert realised[0, 1] > realised[0, 2] > realised[1, 2]


def test_scalar_task_correlation_fills_the_off_diagonal():
    _, truth = make_latent_factor_data(n_cells=10, n_drugs=4, n_tasks=4, task_correlation=0.5)
    expected = np.full((4, 4), 0.5)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_array_equal(truth.task_correlation, expected)


def test_features_drive_the_factors():
    def r_squared(X: np.ndarray, Y: np.ndarray) -> float:
        fitted = X @ np.linalg.lstsq(X, Y, rcond=None)[0]
        return 1.0 - ((Y - fitted) ** 2).sum() / (Y**2).sum()

    strong, strong_truth = make_latent_factor_data(n_cells=300, feature_strength=1.0, seed=5)
    weak, weak_truth = make_latent_factor_data(n_cells=300, feature_strength=0.0, seed=5)

    assert r_squared(strong.cell_feature_matrix, strong_truth.cell_factors[0]) > 0.999
    assert r_squared(strong.drug_feature_matrix, strong_truth.drug_factors) > 0.999
    # 20 random regressors on 300 cells explain ~20/300 of unrelated factors
    assert r_squared(weak.cell_feature_matrix, weak_truth.cell_factors[0]) < 0.2


def test_missing_share_is_respected():
    data, _ = make_latent_factor_data(n_cells=200, n_drugs=40, missing=[0.0, 0.3, 0.8], seed=6)

    counts = np.bincount(data.codes("task"), minlength=3)

    assert counts[0] == 200 * 40
    # 8,000 pairs per task: the observed share has sd <= 0.005, tolerance 0.03 is ~6 sd
    np.testing.assert_allclose(counts[1:] / 8000, [0.7, 0.2], atol=0.03)


def test_reproducible_by_seed():
    first, truth = make_latent_factor_data(n_cells=30, n_drugs=8, seed=11)
    again, truth_again = make_latent_factor_data(n_cells=30, n_drugs=8, seed=11)
    other, truth_other = make_latent_factor_data(n_cells=30, n_drugs=8, seed=12)

    pd.testing.assert_frame_equal(first.frame, again.frame)
    pd.testing.assert_frame_equal(first.cell_features, again.cell_features)
    np.testing.assert_array_equal(truth.signal, truth_again.signal)
    np.testing.assert_array_equal(truth.cell_factors, truth_again.cell_factors)
    assert not np.allclose(truth.signal, truth_other.signal)
    assert first.n_obs != other.n_obs or not np.allclose(first.y, other.y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cells": 0}, "must all be at least 1"),
        ({"rank": 0}, "must all be at least 1"),
        ({"feature_strength": 1.5}, r"feature_strength must be in \[0, 1\], got 1.5"),
        ({"noise": -0.1}, "noise must be non-negative"),
        ({"noise": [0.1, -0.2, 0.3]}, "noise must be non-negative"),
        ({"missing": 1.0}, "missing must be below 1"),
        ({"missing": -0.1}, "missing must be non-negative"),
        ({"task_correlation": np.eye(2)}, r"got shape \(2, 2\)"),
        ({"task_correlation": np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]])}, "symmetric"),
        ({"task_correlation": 2 * np.eye(3)}, "unit diagonal"),
        ({"task_correlation": -0.9}, "not positive semi-definite"),
    ],
    ids=[
        "no-cells",
        "no-rank",
        "strength",
        "noise",
        "noise-per-task",
        "missing-one",
        "missing-negative",
        "corr-shape",
        "corr-asymmetric",
        "corr-diagonal",
        "corr-not-psd",
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_latent_factor_data(**{"n_cells": 10, "n_drugs": 4, "n_tasks": 3, **kwargs})
