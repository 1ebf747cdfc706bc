"""Calibration diagnostics of predictive distributions.

The functions take prediction frames as :meth:`ProbabilisticModel.predict` returns them
(columns ``y``, ``mean``, ``sd``, ``lower``, ``upper`` plus ``task``, ``cell``, ``drug``)
or plain arrays, and build on the metrics of :mod:`mtl4c_prob.evaluation.metrics`.
Post-hoc recalibration, which changes predictions, is in
:mod:`mtl4c_prob.evaluation.recalibration` and happens only on request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from mtl4c_prob.evaluation.metrics import (
    _as_1d,
    _as_arrays,
    _check_interval,
    _check_level,
    _check_sd,
    central_interval,
    coverage,
    coverage_curve,
    crps_gaussian,
    gaussian_nll,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_LEVELS",
    "PITHistogram",
    "calibration_table",
    "coverage_table",
    "interval_score",
    "pit_histogram",
    "pit_values",
]

#: Levels whose coverage :func:`calibration_table` reports.
CALIBRATION_LEVELS = (0.5, 0.8, 0.9, 0.95)
GROUPINGS = ("task", "drug", "cell")


# ------------------------------------------------------------------------- scores
def interval_score(y: ArrayLike, lower: ArrayLike, upper: ArrayLike, level: float) -> float:
    r"""Mean interval score of central prediction intervals (lower is better).

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    lower, upper : array-like of shape (n_obs,)
        Bounds of the central intervals, ``lower <= upper``.
    level : float
        Nominal probability of the intervals, in (0, 1).

    Returns
    -------
    float
        Mean score, in the units of ``y``.

    Raises
    ------
    ValueError
        If the inputs are invalid, some ``lower`` exceeds its ``upper``, or ``level`` is
        outside (0, 1).

    Notes
    -----
    With :math:`\alpha = 1 - \text{level}`,

    .. math::

        S_\alpha(l, u; y) = (u - l) + \frac{2}{\alpha} (l - y) 1\{y < l\}
            + \frac{2}{\alpha} (y - u) 1\{y > u\},

    a proper score for the :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles: it
    rewards narrow intervals and charges misses in proportion to their distance.

    References
    ----------
    .. [1] Gneiting, T. and Raftery, A. E. (2007). Strictly proper scoring rules,
       prediction, and estimation. JASA, 102(477), 359-378, section 6.2.
    """
    y, lower, upper = _as_arrays(y=y, lower=lower, upper=upper)
    _check_interval(lower, upper)
    alpha = 1.0 - _check_level(level)
    below = np.maximum(lower - y, 0.0)
    above = np.maximum(y - upper, 0.0)
    return float(np.mean((upper - lower) + 2.0 / alpha * (below + above)))


def pit_values(y: ArrayLike, mean: ArrayLike, sd: ArrayLike) -> np.ndarray:
    r"""Probability integral transform :math:`\Phi((y - \mu) / \sigma)` of each observation.

    Uniform on (0, 1) for calibrated Gaussian predictives; a U shape means the
    predictive distributions are too narrow, a hump that they are too wide.

    Parameters
    ----------
    y, mean, sd : array-like of shape (n_obs,)
        Observations, predictive means and sds (``sd > 0``).

    Returns
    -------
    ndarray of shape (n_obs,)
    """
    y, mean, sd = _as_arrays(y=y, mean=mean, sd=sd)
    _check_sd(sd)
    return stats.norm.cdf((y - mean) / sd)


@dataclass(frozen=True)
class PITHistogram:
    r"""Histogram of PIT values with tests of uniformity.

    Status: stable.

    Attributes
    ----------
    counts : ndarray of shape (bins,)
        Observations per bin.
    edges : ndarray of shape (bins + 1,)
        Bin edges on [0, 1].
    n : int
        Number of PIT values.
    chi2, chi2_pvalue : float
        Pearson's chi-square statistic of the counts against equal counts, with
        ``bins - 1`` degrees of freedom, and its p-value.
    ks, ks_pvalue : float
        Kolmogorov-Smirnov distance of the PIT values from U(0, 1), and its p-value.
    dispersion : float
        :math:`12 \operatorname{Var}(\mathrm{PIT})`: 1 for uniform values, above 1 for a
        U shape (over-confident predictions), below 1 for a hump (under-confident).
    """

    counts: np.ndarray
    edges: np.ndarray
    n: int
    chi2: float
    chi2_pvalue: float
    ks: float
    ks_pvalue: float
    dispersion: float

    @property
    def density(self) -> np.ndarray:
        """Counts as a density on [0, 1] (1 everywhere when uniform)."""
        return self.counts / (self.n * np.diff(self.edges))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation."""
        return {
            "counts": self.counts.tolist(),
            "edges": self.edges.tolist(),
            **{k: getattr(self, k) for k in ("n", "chi2", "chi2_pvalue", "ks", "ks_pvalue")},
            "dispersion": self.dispersion,
        }


def pit_histogram(pit: ArrayLike, bins: int = 10) -> PITHistogram:
    """Bin PIT values on [0, 1] and test them for uniformity.

    Parameters
    ----------
    pit : array-like of shape (n_obs,)
        PIT values in [0, 1], e.g. from :func:`pit_values`.
    bins : int, default=10
        Number of equal-width bins.

    Returns
    -------
    PITHistogram

    Raises
    ------
    ValueError
        If a value lies outside [0, 1] or ``bins < 2``.

    Notes
    -----
    With tens of thousands of observations the tests reject for any visible departure;
    read the statistics (KS distance, dispersion) as effect sizes, not only the p-values.
    """
    pit = _as_1d(pit, "pit")
    if (pit < 0).any() or (pit > 1).any():
        raise ValueError(
            f"pit values must lie in [0, 1]; got range [{pit.min():.3g}, {pit.max():.3g}]"
        )
    if int(bins) < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    counts = np.histogram(pit, bins=edges)[0]
    chi2 = stats.chisquare(counts)
    ks = stats.kstest(pit, "uniform")
    return PITHistogram(
        counts=counts,
        edges=edges,
        n=int(pit.size),
        chi2=float(chi2.statistic),
        chi2_pvalue=float(chi2.pvalue),
        ks=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        dispersion=float(12.0 * pit.var()),
    )


# --------------------------------------------------------------------------- tables
def _check_frame(frame: pd.DataFrame, columns: tuple[str, ...], name: str = "pred") -> None:
    """Raise if ``frame`` is not a DataFrame with ``columns``."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame; got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")


def _groups(frame: pd.DataFrame, by: str | None):
    """(label, sub-frame) pairs: one per value of column ``by``, or ("all", frame)."""
    if by is None:
        return [("all", frame)]
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS} or None; got {by!r}")
    _check_frame(frame, (by,))
    return [(str(k), sub) for k, sub in frame.groupby(by, sort=True, observed=True)]


def coverage_table(
    frame: pd.DataFrame,
    levels: ArrayLike | None = None,
    by: str | None = "task",
) -> pd.DataFrame:
    r"""Empirical coverage of Gaussian central intervals per group and level.

    Parameters
    ----------
    frame : DataFrame
        Predictions with columns ``y``, ``mean``, ``sd`` (and ``by``).
    levels : array-like, optional
        Nominal levels in (0, 1); default 0.10, 0.15, ..., 0.95.
    by : {"task", "drug", "cell"} or None, default="task"
        Grouping column; None gives one group, ``"all"``.

    Returns
    -------
    DataFrame
        One row per group and level: ``group``, ``level``, ``n``, ``coverage``,
        ``width``, ``se`` (binomial standard error of the coverage of a calibrated
        model, :math:`\sqrt{\text{level}(1 - \text{level}) / n}`) and
        ``z = (coverage - level) / se``. Rows are not independent, so read ``|z|``
        above 3 or so as a sign of miscalibration rather than as an exact test.
    """
    _check_frame(frame, ("y", "mean", "sd"), "frame")
    parts = []
    for label, sub in _groups(frame, by):
        curve = coverage_curve(sub["y"], sub["mean"], sub["sd"], levels)
        n = len(sub)
        curve.insert(0, "group", label)
        curve.insert(2, "n", n)
        curve["se"] = np.sqrt(curve["level"] * (1 - curve["level"]) / n)
        curve["z"] = (curve["coverage"] - curve["level"]) / curve["se"]
        parts.append(curve)
    return pd.concat(parts, ignore_index=True)


def _interval(frame: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the frame's own interval bounds, or the Gaussian central interval at ``level``."""
    if "lower" in frame.columns and "upper" in frame.columns:
        return frame["lower"].to_numpy(float), frame["upper"].to_numpy(float)
    return central_interval(frame["mean"], frame["sd"], level)


def _scores(frame: pd.DataFrame, level: float, levels: tuple[float, ...]) -> dict[str, float]:
    """Calibration scores of one group of predictions."""
    y, mean, sd = (frame[c].to_numpy(float) for c in ("y", "mean", "sd"))
    out: dict[str, float] = {"n": float(len(frame))}
    for lv in levels:
        lower, upper = central_interval(mean, sd, lv)
        out[f"coverage_{round(100 * lv, 6):g}"] = coverage(y, lower, upper)
    lower, upper = _interval(frame, level)
    out["interval_coverage"] = coverage(y, lower, upper)
    out["interval_score"] = interval_score(y, lower, upper, level)
    out["crps"] = crps_gaussian(y, mean, sd)
    out["nll"] = gaussian_nll(y, mean, sd)
    pit = pit_values(y, mean, sd)
    hist = pit_histogram(pit)
    out.update(pit_mean=float(pit.mean()), pit_dispersion=hist.dispersion, pit_ks=hist.ks)
    out["pit_ks_pvalue"] = hist.ks_pvalue
    return out


def calibration_table(
    pred: pd.DataFrame,
    by: str | tuple[str, ...] | None = ("task", "drug"),
    *,
    level: float = 0.9,
    levels: tuple[float, ...] = CALIBRATION_LEVELS,
) -> pd.DataFrame:
    """Calibration scores overall and per task, per drug (or per cell).

    Parameters
    ----------
    pred : DataFrame
        Predictions with columns ``y``, ``mean``, ``sd``, optionally ``lower`` and
        ``upper`` (central intervals at ``level``), and the grouping columns.
    by : str or tuple of str or None, default=("task", "drug")
        Groupings reported after the overall row.
    level : float, default=0.9
        Level of the frame's ``lower``/``upper`` interval (Gaussian from ``sd`` when the
        frame has none), scored by ``interval_coverage`` and ``interval_score``.
    levels : tuple of float, default=(0.5, 0.8, 0.9, 0.95)
        Levels of the Gaussian central intervals whose coverage is reported.

    Returns
    -------
    DataFrame
        One row per group, the overall row first (``by="all"``), with columns ``by``,
        ``group``, ``n``, ``coverage_50`` ... (one per level), ``interval_coverage``,
        ``interval_score``, ``crps``, ``nll``, ``pit_mean`` (0.5 when unbiased),
        ``pit_dispersion`` (see :class:`PITHistogram`), ``pit_ks`` and ``pit_ks_pvalue``.
    """
    _check_frame(pred, ("y", "mean", "sd"))
    level = _check_level(level)
    groupings = [by] if isinstance(by, str) else list(by or ())
    rows = [{"by": "all", "group": "all", **_scores(pred, level, levels)}]
    for grouping in groupings:
        for label, sub in _groups(pred, grouping):
            rows.append({"by": grouping, "group": label, **_scores(sub, level, levels)})
    table = pd.DataFrame(rows)
    table["n"] = table["n"].astype(int)
    return table
