from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from mtl4c_prob.evaluation import metrics
from mtl4c_prob.evaluation.metrics import (
    central_interval,
    coverage,
    coverage_curve,
    crps_gaussian,
    evaluate,
    evaluate_frame,
    explained_variance,
    gaussian_nll,
    interval_width,
    mae,
    ndcg,
    pearson,
    per_drug_pearson,
    r2,
    rmse,
    spearman,
)
from mtl4c_prob.exceptions import DataWarning

# Hand-computed values are exact up to float round-off, so 1e-12 is ample.
EXACT = 1e-12

Y = np.array([1.0, 2.0, 3.0, 4.0])
PRED = np.array([1.0, 3.0, 2.0, 6.0])  # residuals y - pred = [0, -1, 1, -2]


# ---------------------------------------------------------------------------- point metrics


def test_rmse_and_mae_hand_values():
    assert rmse(Y, PRED) == pytest.approx(math.sqrt(6.0 / 4.0), abs=EXACT)
    assert mae(Y, PRED) == pytest.approx(4.0 / 4.0, abs=EXACT)
    assert rmse(Y, Y) == 0.0


def test_r2_and_explained_variance_hand_values():
    # SS_tot = 5, SS_res = 6 -> r2 = -0.2; Var(resid) = Var(y) = 1.25 -> ev = 0.
    assert r2(Y, PRED) == pytest.approx(-0.2, abs=EXACT)
    assert explained_variance(Y, PRED) == pytest.approx(0.0, abs=EXACT)
    # A constant bias costs r2 (SS_res = 4) but not explained variance.
    assert r2(Y, Y + 1.0) == pytest.approx(0.2, abs=EXACT)
    assert explained_variance(Y, Y + 1.0) == pytest.approx(1.0, abs=EXACT)


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    pred = y + rng.normal(size=50)
    pred_tied = np.round(pred)  # ties exercise average ranks
    assert pearson(y, pred) == pytest.approx(stats.pearsonr(y, pred)[0], abs=1e-10)
    assert spearman(y, pred_tied) == pytest.approx(stats.spearmanr(y, pred_tied)[0], abs=1e-10)
    assert pearson(Y, -Y) == pytest.approx(-1.0, abs=EXACT)
    assert spearman(Y, np.exp(Y)) == pytest.approx(1.0, abs=EXACT)


@pytest.mark.parametrize("func", [pearson, spearman], ids=["pearson", "spearman"])
def test_correlation_constant_input_is_nan_with_warning(func):
    with pytest.warns(DataWarning, match="constant"):
        value = func(Y, np.ones(4))
    assert math.isnan(value)


@pytest.mark.parametrize("func", [r2, explained_variance], ids=["r2", "ev"])
def test_r2_constant_y_is_nan_with_warning(func):
    with pytest.warns(DataWarning, match="y is constant"):
        assert math.isnan(func(np.ones(3), Y[:3]))


def test_warning_points_at_caller():
    with pytest.warns(DataWarning) as record:
        evaluate(np.ones(4), Y, np.ones(4))
    assert all(w.filename == __file__ for w in record)


def test_per_drug_pearson_ignores_small_drugs():
    rng = np.random.default_rng(1)
    y_a, y_b = rng.normal(size=10), rng.normal(size=12)
    pred_a, pred_b = y_a + rng.normal(size=10), y_b + rng.normal(size=12)
    y_c = np.array([0.0, 1.0, 2.0])  # only 3 pairs, perfectly anti-correlated
    y = np.concatenate([y_a, y_b, y_c])
    pred = np.concatenate([pred_a, pred_b, -y_c])
    drug = ["a"] * 10 + ["b"] * 12 + ["c"] * 3
    expected = 0.5 * (stats.pearsonr(y_a, pred_a)[0] + stats.pearsonr(y_b, pred_b)[0])
    assert per_drug_pearson(y, pred, drug) == pytest.approx(expected, abs=1e-10)

    with_c = (2.0 * expected - 1.0) / 3.0
    assert per_drug_pearson(y, pred, drug, min_pairs=3) == pytest.approx(with_c, abs=1e-10)


def test_per_drug_pearson_no_qualifying_drug():
    with pytest.warns(DataWarning, match="no drug has >= 10 pairs"):
        assert math.isnan(per_drug_pearson(Y, PRED, ["a", "a", "b", "b"]))


def test_per_drug_pearson_skips_constant_drug():
    y = np.concatenate([np.arange(5.0), np.ones(5)])
    pred = np.concatenate([np.arange(5.0), np.arange(5.0)])
    with pytest.warns(DataWarning, match="1 of 2 drugs"):
        value = per_drug_pearson(y, pred, ["a"] * 5 + ["b"] * 5, min_pairs=5)
    assert value == pytest.approx(1.0, abs=EXACT)


def test_ndcg_perfect_and_reversed():
    y = np.array([1.0, 2.0, 3.0, 0.5, 4.0, 2.5])
    cell = ["c1", "c1", "c1", "c2", "c2", "c2"]
    assert ndcg(y, y, cell) == pytest.approx(1.0, abs=EXACT)
    assert ndcg(y, 2.0 * y + 3.0, cell) == pytest.approx(1.0, abs=EXACT)  # monotone map
    assert ndcg(y, -y, cell) < 1.0
    assert ndcg(y, y, cell, higher_is_better=True) == pytest.approx(1.0, abs=EXACT)
    assert ndcg(y, -y, cell, higher_is_better=True) < 1.0


def test_ndcg_hand_computed():
    # One cell, y = [1, 2, 3]: relevances (max - y) = [2, 1, 0]. Reversed predictions rank
    # the items as relevance [0, 1, 2]: DCG = 1/log2(3) + 2/log2(4), IDCG = 2 + 1/log2(3).
    y = np.array([1.0, 2.0, 3.0])
    pred = np.array([3.0, 2.0, 1.0])
    cell = ["c"] * 3
    expected = (1 / math.log2(3) + 1.0) / (2.0 + 1 / math.log2(3))
    assert ndcg(y, pred, cell) == pytest.approx(expected, abs=EXACT)
    # k=1: the top item has relevance 0 -> NDCG@1 = 0.
    assert ndcg(y, pred, cell, k=1) == pytest.approx(0.0, abs=EXACT)
    # higher_is_better: relevances (y - min) = [0, 1, 2], top item by prediction desc is y=1.
    assert ndcg(y, pred, cell, k=1, higher_is_better=True) == pytest.approx(0.0, abs=EXACT)


def test_ndcg_skips_flat_groups():
    y = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    pred = np.array([3.0, 2.0, 1.0, 0.0, 1.0, 2.0])
    cell = ["a"] * 3 + ["flat"] * 2 + ["single"]
    assert ndcg(y, pred, cell) == pytest.approx(ndcg(y[:3], pred[:3], cell[:3]), abs=EXACT)
    with pytest.warns(DataWarning, match="ideal DCG of 0"):
        assert math.isnan(ndcg(y[3:], pred[3:], cell[3:]))


# --------------------------------------------------------------------- distribution metrics


def test_coverage_and_width_hand_values():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    lower = np.array([0.0, 1.5, 1.0, -1.0])
    upper = np.array([1.0, 2.0, 2.0, 2.0])
    assert coverage(y, lower, upper) == pytest.approx(0.5, abs=EXACT)  # bounds inclusive
    assert interval_width(lower, upper) == pytest.approx((1 + 0.5 + 1 + 3) / 4, abs=EXACT)


def test_central_interval_matches_scipy():
    mean, sd = np.array([0.0, 2.0]), np.array([1.0, 0.5])
    lower, upper = central_interval(mean, sd, 0.8)
    ref_lower, ref_upper = stats.norm.interval(0.8, loc=mean, scale=sd)
    np.testing.assert_allclose(lower, ref_lower, atol=1e-12)
    np.testing.assert_allclose(upper, ref_upper, atol=1e-12)


def test_gaussian_nll_matches_scipy():
    rng = np.random.default_rng(2)
    y, mean, sd = rng.normal(size=20), rng.normal(size=20), rng.uniform(0.2, 2.0, size=20)
    expected = -np.mean(stats.norm.logpdf(y, loc=mean, scale=sd))
    assert gaussian_nll(y, mean, sd) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("y", "mu", "sigma"), [(0.0, 0.0, 1.0), (1.3, -0.4, 0.7), (-2.0, 1.0, 2.5)]
)
def test_crps_matches_numerical_integration(y, mu, sigma):
    def integrand(x):
        return (stats.norm.cdf(x, mu, sigma) - float(x >= y)) ** 2

    below = integrate.quad(integrand, -np.inf, y)[0]
    above = integrate.quad(integrand, y, np.inf)[0]
    # quad is accurate to ~1e-8 on these smooth integrands.
    assert crps_gaussian([y], [mu], [sigma]) == pytest.approx(below + above, abs=1e-7)


def test_crps_centred_closed_form():
    # At z = 0 the CRPS is sigma * (2 phi(0) - 1/sqrt(pi)) = sigma * (sqrt(2) - 1)/sqrt(pi).
    value = crps_gaussian([0.0, 5.0], [0.0, 5.0], [1.0, 3.0])
    assert value == pytest.approx(2.0 * (math.sqrt(2) - 1) / math.sqrt(math.pi), abs=EXACT)


def test_gaussian_coverage_is_nominal_on_calibrated_sample():
    rng = np.random.default_rng(3)
    n = 20_000
    mean = rng.normal(size=n)
    sd = rng.uniform(0.5, 2.0, size=n)
    y = rng.normal(mean, sd)
    for level in (0.5, 0.9, 0.95):
        lower, upper = central_interval(mean, sd, level)
        # 4 binomial standard errors: a false failure has probability < 1e-4.
        tol = 4.0 * math.sqrt(level * (1 - level) / n)
        assert abs(coverage(y, lower, upper) - level) < tol


def test_coverage_curve_monotone_and_default_levels():
    rng = np.random.default_rng(4)
    mean = rng.normal(size=2000)
    sd = np.full(2000, 0.8)
    y = rng.normal(mean, sd)
    curve = coverage_curve(y, mean, sd)
    assert list(curve.columns) == ["level", "coverage", "width"]
    assert curve["level"].iloc[0] == pytest.approx(0.1)
    assert np.isclose(curve["level"], 0.95).any()
    assert curve["level"].max() < 1.0
    assert (np.diff(curve["coverage"]) >= 0).all()
    assert (np.diff(curve["width"]) > 0).all()
    # Width of a Gaussian interval is 2 z sigma exactly.
    np.testing.assert_allclose(
        curve["width"], 2 * stats.norm.ppf(0.5 + curve["level"] / 2) * 0.8, atol=1e-12
    )

    custom = coverage_curve(y, mean, sd, levels=[0.5, 0.9])
    assert custom["level"].tolist() == [0.5, 0.9]


# ------------------------------------------------------------------------------ aggregation


def _predictions(seed=5, n_cells=40, n_drugs=11):
    rng = np.random.default_rng(seed)
    cell = np.repeat([f"cell{i}" for i in range(n_cells)], n_drugs)
    drug = np.tile([f"drug{j}" for j in range(n_drugs)], n_cells)
    mean = rng.normal(size=cell.size)
    sd = rng.uniform(0.5, 1.5, size=cell.size)
    y = rng.normal(mean, sd)
    return y, mean, sd, cell, drug


def test_evaluate_keys_and_values():
    y, mean, sd, cell, drug = _predictions()
    result = evaluate(y, mean, sd, drug=drug, cell=cell)
    assert list(result) == [
        "n", "rmse", "mae", "r2", "explained_variance", "pearson", "spearman",
        "per_drug_pearson", "ndcg", "coverage_90", "width_90", "nll", "crps",
    ]  # fmt: skip
    assert all(type(v) is float for v in result.values())
    json.dumps(result)
    assert result["n"] == y.size
    assert result["rmse"] == rmse(y, mean)
    assert result["ndcg"] == ndcg(y, mean, cell, k=10)
    lower, upper = central_interval(mean, sd, 0.9)
    assert result["coverage_90"] == coverage(y, lower, upper)
    assert result["crps"] == crps_gaussian(y, mean, sd)


def test_evaluate_with_explicit_bounds_and_level():
    y, mean, sd, _, _ = _predictions()
    lower, upper = mean - 0.1, mean + 0.1
    result = evaluate(y, mean, sd, lower=lower, upper=upper, level=0.975)
    assert "per_drug_pearson" not in result and "ndcg" not in result
    assert result["coverage_97.5"] == coverage(y, lower, upper)
    assert result["width_97.5"] == pytest.approx(0.2, abs=EXACT)


def test_evaluate_point_predictor_without_sd():
    result = evaluate(Y, PRED, None)
    assert "nll" not in result and not any(key.startswith("coverage") for key in result)
    assert result["mae"] == 1.0


def test_evaluate_frame_overall_and_per_task():
    y, mean, sd, cell, drug = _predictions()
    task = np.where(np.arange(y.size) % 3 == 0, 2, 1)
    frame = pd.DataFrame({"task": task, "cell": cell, "drug": drug, "y": y, "mean": mean})
    frame["sd"] = sd
    out = evaluate_frame(frame)
    assert set(out) == {"overall", "per_task"}
    assert list(out["per_task"]) == ["1", "2"]
    assert out["overall"] == evaluate(y, mean, sd, drug=drug, cell=cell)
    sub = frame[frame["task"] == 2]
    expected = evaluate(sub["y"], sub["mean"], sub["sd"], drug=sub["drug"], cell=sub["cell"])
    assert out["per_task"]["2"] == expected
    assert not any(math.isnan(v) for v in expected.values())
    json.dumps(out)


def test_evaluate_frame_custom_task_column():
    frame = pd.DataFrame({"screen": ["GDSC1", "GDSC2"] * 4, "y": np.arange(8.0)})
    frame["mean"] = frame["y"] + 0.5
    out = evaluate_frame(frame, task_col="screen")
    assert sorted(out["per_task"]) == ["GDSC1", "GDSC2"]
    assert out["per_task"]["GDSC1"]["mae"] == pytest.approx(0.5, abs=EXACT)


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1.0, 2.0], [1.0]), "equal lengths"),
        (([], []), "y is empty"),
        (([1.0, np.nan], [1.0, 2.0]), "y has 1 non-finite values"),
        (([[1.0, 2.0]], [[1.0, 2.0]]), r"y must be 1-D; got shape \(1, 2\)"),
    ],
    ids=["length", "empty", "nan", "2d"],
)
def test_point_metric_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        rmse(*args)


def test_non_numeric_input():
    with pytest.raises(TypeError, match="mean must be a numeric"):
        mae([1.0, 2.0], ["a", "b"])


def test_bad_sd_level_and_interval():
    with pytest.raises(ValueError, match="sd must be > 0"):
        gaussian_nll(Y, Y, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sd must be > 0"):
        crps_gaussian(Y, Y, -np.ones(4))
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1; got 1.0"):
        central_interval(Y, np.ones(4), 1.0)
    with pytest.raises(TypeError, match="level must be a float"):
        central_interval(Y, np.ones(4), "0.9")
    with pytest.raises(ValueError, match="level must lie strictly"):
        coverage_curve(Y, Y, np.ones(4), levels=[0.5, 0.0])
    with pytest.raises(ValueError, match="lower exceeds upper at 1 positions"):
        coverage(Y, Y, Y - [0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="lower exceeds upper"):
        interval_width([1.0], [0.0])


def test_bad_ranking_arguments():
    with pytest.raises(ValueError, match="k must be >= 1; got 0"):
        ndcg(Y, Y, ["a"] * 4, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        ndcg(Y, Y, ["a"] * 4, k=2.0)
    with pytest.raises(ValueError, match="group must be 1-D with 4 entries"):
        ndcg(Y, Y, ["a"] * 3)
    with pytest.raises(ValueError, match="drug has 1 missing labels"):
        per_drug_pearson(Y, Y, ["a", None, "b", "b"], min_pairs=2)
    with pytest.raises(ValueError, match="min_pairs must be >= 2; got 1"):
        per_drug_pearson(Y, Y, ["a"] * 4, min_pairs=1)


def test_evaluate_bad_arguments():
    with pytest.raises(ValueError, match="lower and upper must be given together; got only lower"):
        evaluate(Y, Y, None, lower=Y)
    with pytest.raises(KeyError, match=r"frame lacks required columns \['task', 'mean'\]"):
        evaluate_frame(pd.DataFrame({"y": Y}))
    with pytest.raises(ValueError, match="column 'task' has 1 missing values"):
        evaluate_frame(pd.DataFrame({"task": ["a", None, "a", "a"], "y": Y, "mean": Y}))
    with pytest.raises(TypeError, match="frame must be a pandas DataFrame"):
        evaluate_frame({"y": Y})


def test_module_exports():
    assert sorted(metrics.__all__) == metrics.__all__
    for name in metrics.__all__:
        assert callable(getattr(metrics, name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(*_predictions()[:3])
