"""Calibration diagnostics and recalibration on synthetic draws of known calibration.

Tolerances: with n draws, an empirical coverage has binomial sd sqrt(p (1 - p) / n); the
checks allow about four of those (plus, after recalibration, the error of the fitted
factor, whose sd is derived next to each test).
"""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from mtl4c_prob.evaluation import (
    Recalibrator,
    calibration_table,
    coverage_table,
    interval_score,
    pit_histogram,
    pit_values,
    recalibration_report,
)
from mtl4c_prob.exceptions import DataWarning

Z90 = norm.ppf(0.95)


def frame(n, sd, *, seed, tasks=("A",), level=0.9, quantiles=(0.025, 0.975)):
    """Rows y ~ N(0, 1) predicted with mean 0 and the given sd, per task, with intervals."""
    rng = np.random.default_rng(seed)
    sds = np.atleast_1d(sd)
    parts = []
    for t, s in zip(tasks, np.broadcast_to(sds, (len(tasks),)), strict=True):
        z = norm.ppf(0.5 + level / 2)
        part = pd.DataFrame(
            {
                "task": t,
                "cell": [f"c{i % 50}" for i in range(n)],
                "drug": [f"d{i % 7}" for i in range(n)],
                "y": rng.standard_normal(n),
                "mean": 0.0,
                "sd": s,
                "lower": -z * s,
                "upper": z * s,
            }
        )
        for q in quantiles:
            part[f"q{q:g}"] = norm.ppf(q) * s
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------ scores
def test_interval_score_by_hand():
    # alpha = 0.2, so a miss costs 10 per unit of distance; width 2 everywhere.
    score = interval_score([0.0, 2.0, -3.0], [-1.0] * 3, [1.0] * 3, 0.8)
    assert score == pytest.approx((2 + 12 + 22) / 3)


def test_interval_score_is_lowest_at_the_true_quantiles():
    y = np.random.default_rng(0).standard_normal(50_000)
    scores = {
        f: interval_score(y, np.full(y.size, -f * Z90), np.full(y.size, f * Z90), 0.9)
        for f in (0.6, 0.8, 1.0, 1.25, 1.6)
    }
    assert min(scores, key=scores.get) == 1.0


def test_interval_score_rejects_bad_input():
    with pytest.raises(ValueError, match="lower exceeds upper"):
        interval_score([0.0], [1.0], [-1.0], 0.9)
    with pytest.raises(ValueError, match="level"):
        interval_score([0.0], [-1.0], [1.0], 1.5)


@pytest.mark.parametrize(
    ("sd", "shape"),
    [(1.0, "uniform"), (0.5, "U"), (2.0, "hump")],
    ids=["calibrated", "narrow", "wide"],
)
def test_pit_histogram_shape(sd, shape):
    n = 20_000
    y = np.random.default_rng(1).standard_normal(n)
    hist = pit_histogram(pit_values(y, np.zeros(n), np.full(n, sd)))
    assert hist.counts.sum() == n and len(hist.edges) == 11
    edge, middle = hist.density[[0, -1]].mean(), hist.density[4:6].mean()
    if shape == "uniform":
        # 12 Var(PIT) has sd about 0.0063 at n = 20000; bin densities about 0.02.
        assert hist.dispersion == pytest.approx(1.0, abs=0.03)
        assert hist.ks_pvalue > 0.001 and hist.chi2_pvalue > 0.001
        assert np.abs(hist.density - 1).max() < 0.1
    elif shape == "U":
        assert hist.dispersion > 1.5 and edge > 2 * middle and hist.ks_pvalue < 1e-10
    else:
        assert hist.dispersion < 0.5 and middle > 2 * edge and hist.ks_pvalue < 1e-10
    assert json.loads(json.dumps(hist.to_dict()))["n"] == n


def test_pit_histogram_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pit_histogram([0.2, 1.3])
    with pytest.raises(ValueError, match="bins"):
        pit_histogram([0.2, 0.3], bins=1)


# ------------------------------------------------------------------------ tables
def test_coverage_table_of_calibrated_predictions():
    n = 4000
    table = coverage_table(frame(n, 1.0, seed=2, tasks=("A", "B")))
    assert set(table["group"]) == {"A", "B"} and (table["n"] == n).all()
    np.testing.assert_allclose(table["se"], np.sqrt(table["level"] * (1 - table["level"]) / n))
    # Binomial sd at most 0.0079: four of them.
    assert (table["z"].abs() < 4).all()
    assert (table["coverage"] - table["level"]).abs().max() < 0.032

    by_drug = coverage_table(frame(n, 1.0, seed=2), levels=[0.5, 0.9], by="drug")
    assert by_drug["group"].nunique() == 7 and len(by_drug) == 14
    with pytest.raises(ValueError, match="by must be"):
        coverage_table(frame(10, 1.0, seed=2), by="screen")


def test_calibration_table_matches_known_coverage():
    # Predicted sd 0.5 for N(0, 1) data: the nominal 90% interval is +-0.8224, which
    # covers 2 Phi(0.8224) - 1 = 0.589 of the rows.
    n = 6000
    pred = pd.concat(
        [frame(n, 1.0, seed=3, tasks=("good",)), frame(n, 0.5, seed=4, tasks=("bad",))]
    )
    table = calibration_table(pred)
    assert table.iloc[0][["by", "group"]].tolist() == ["all", "all"]
    assert set(table["by"]) == {"all", "task", "drug"}
    rows = table[table["by"] == "task"].set_index("group")
    expected = 2 * norm.cdf(0.5 * Z90) - 1
    assert rows.loc["bad", "coverage_90"] == pytest.approx(expected, abs=4 * 0.0064)
    assert rows.loc["good", "coverage_90"] == pytest.approx(0.9, abs=4 * 0.0039)
    assert rows.loc["good", "coverage_50"] == pytest.approx(0.5, abs=4 * 0.0065)
    assert rows.loc["bad", "interval_score"] > rows.loc["good", "interval_score"]
    assert rows.loc["bad", "pit_dispersion"] > 1.5 > 1.05 > rows.loc["good", "pit_dispersion"]
    assert rows.loc["good", "pit_mean"] == pytest.approx(0.5, abs=0.015)
    for col in ("coverage_50", "coverage_80", "coverage_95", "crps", "nll", "pit_ks"):
        assert col in table.columns


# ------------------------------------------------------------------- recalibration
@pytest.mark.parametrize("method", ["quantile", "nll"])
def test_recalibration_restores_coverage_on_fresh_draws(method):
    # Task A predicts sd 0.5 (true 1): factor 2; task B predicts sd 2: factor 0.5.
    # sd of the fitted factor: quantile method 2 sqrt(0.09 / n) / (2 phi(z) z) = 0.025 at
    # n = 5000 for task A; nll method 2 sqrt(1 / (2 n)) = 0.02.
    val = frame(5000, [0.5, 2.0], seed=5, tasks=("A", "B"))
    rec = Recalibrator(0.9, method=method).fit(val)
    assert rec.factors_["A"] == pytest.approx(2.0, abs=0.1)
    assert rec.factors_["B"] == pytest.approx(0.5, abs=0.025)

    test = frame(5000, [0.5, 2.0], seed=6, tasks=("A", "B"))
    after = rec.transform(test)
    for task in ("A", "B"):
        sub = after[after["task"] == task]
        covered = ((sub["lower"] <= sub["y"]) & (sub["y"] <= sub["upper"])).mean()
        # Binomial sd 0.0042 plus the factor's error (about 0.004 in coverage).
        assert covered == pytest.approx(0.9, abs=0.025)


def test_transform_returns_a_new_frame_and_records_factors():
    val = frame(2000, 0.5, seed=7)
    test = frame(100, 0.5, seed=8)
    before = test.copy()
    rec = Recalibrator(0.9).fit(val)
    after = rec.transform(test)
    pd.testing.assert_frame_equal(test, before)
    s = rec.factors_["A"]
    np.testing.assert_allclose(after["sd"], s * test["sd"])
    np.testing.assert_allclose(after["lower"], test["mean"] - s * (test["mean"] - test["lower"]))
    np.testing.assert_allclose(after["q0.975"], s * test["q0.975"])
    np.testing.assert_allclose(after["recalibration_factor"], s)
    assert after.attrs["recalibration"]["factors"] == {"A": s}
    np.testing.assert_array_equal(after["y"], test["y"])
    np.testing.assert_array_equal(after["mean"], test["mean"])


def test_recalibrator_round_trips_through_json():
    val = frame(1000, [0.5, 1.5], seed=9, tasks=("A", "B"), level=0.8)
    rec = Recalibrator(0.8, method="nll").fit(val)
    loaded = Recalibrator.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert loaded.to_dict() == rec.to_dict()
    pd.testing.assert_frame_equal(loaded.transform(val), rec.transform(val), check_like=True)


def test_asymmetric_intervals_are_scaled_side_by_side():
    # Skewed errors e = Exp(1) - 1 with intervals at half their true 5% / 95% quantiles:
    # side-specific half-widths give a factor of 2 and the nominal coverage back.
    rng = np.random.default_rng(10)
    lo, hi = -np.log(0.95) - 1, -np.log(0.05) - 1

    def skewed(n):
        y = rng.exponential(size=n) - 1
        return pd.DataFrame(
            {"task": "A", "y": y, "mean": 0.0, "sd": 0.5, "lower": 0.5 * lo, "upper": 0.5 * hi}
        )

    rec = Recalibrator(0.9).fit(skewed(20_000).assign(sd=0.5 * (hi - lo) / (2 * Z90)))
    assert rec.factors_["A"] == pytest.approx(2.0, abs=0.1)
    test = rec.transform(skewed(20_000).assign(sd=0.5 * (hi - lo) / (2 * Z90)))
    below, above = (test["y"] < test["lower"]).mean(), (test["y"] > test["upper"]).mean()
    assert below + above == pytest.approx(0.1, abs=0.01)
    assert below == pytest.approx(0.05, abs=0.01) and above == pytest.approx(0.05, abs=0.01)


def test_recalibrator_refuses_mismatched_levels_and_warns_on_unseen_groups():
    val = frame(500, 1.0, seed=11, level=0.5)  # 50% intervals
    with pytest.raises(ValueError, match="look like 50% intervals"):
        Recalibrator(0.9).fit(val)
    with pytest.raises(RuntimeError, match="not fitted"):
        Recalibrator(0.9).transform(frame(10, 1.0, seed=1))
    with pytest.raises(ValueError, match="method"):
        Recalibrator(0.9, method="isotonic")

    rec = Recalibrator(0.9, min_rows=100).fit(
        pd.concat([frame(500, 0.5, seed=12, tasks=("A",)), frame(50, 2.0, seed=13, tasks=("B",))])
    )
    assert set(rec.factors_) == {"A"} and rec.n_rows_ == {"A": 500, "B": 50}
    with pytest.warns(DataWarning, match="global factor"):
        out = rec.transform(frame(20, 1.0, seed=14, tasks=("B", "C")))
    np.testing.assert_allclose(out["recalibration_factor"], rec.global_factor_)


def test_recalibration_report_before_and_after():
    val = frame(4000, [0.5, 1.0], seed=15, tasks=("A", "B"))
    test = frame(4000, [0.5, 1.0], seed=16, tasks=("A", "B"))
    report = recalibration_report(val, test, 0.9)
    assert list(report.index) == ["all", "A", "B"]
    a = report.loc["A"]
    assert a["coverage_before"] == pytest.approx(2 * norm.cdf(0.5 * Z90) - 1, abs=0.03)
    assert a["coverage_after"] == pytest.approx(0.9, abs=0.025)
    assert (
        a["nll_after"] < a["nll_before"] and a["interval_score_after"] < a["interval_score_before"]
    )
    assert a["factor"] == pytest.approx(2.0, abs=0.12)
    # A calibrated task keeps a factor near 1 and its scores.
    b = report.loc["B"]
    assert b["factor"] == pytest.approx(1.0, abs=0.06)
    assert b["nll_after"] == pytest.approx(b["nll_before"], abs=0.02)
    assert report.attrs["recalibrator"]["by"] == "task"
