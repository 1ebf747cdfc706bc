"""Point, ranking and predictive-distribution metrics for drug-response predictions.

Every metric takes 1-D array-likes of equal length (one entry per test measurement,
``n_obs``) and returns a Python ``float``. Inputs are validated: they must be 1-D,
non-empty, finite and of equal length, and predictive standard deviations must be
positive. A metric that is undefined for the data at hand (a correlation with a
constant input, say) returns NaN and emits a :class:`~mtl4c_prob.exceptions.DataWarning`
rather than raising, so that a long evaluation run is not stopped by one degenerate
task.

:func:`evaluate` gathers all metrics for one set of predictions into a JSON-serialisable
dict, and :func:`evaluate_frame` does so overall and per task for a long predictions
table.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import warnings
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import special, stats

from mtl4c_prob.exceptions import DataWarning

__all__ = [
    "central_interval",
    "coverage",
    "coverage_curve",
    "crps_gaussian",
    "evaluate",
    "evaluate_frame",
    "explained_variance",
    "gaussian_nll",
    "interval_width",
    "mae",
    "ndcg",
    "pearson",
    "per_drug_pearson",
    "r2",
    "rmse",
    "spearman",
]

logger = logging.getLogger(__name__)

_DEFAULT_LEVELS = np.round(np.arange(0.1, 1.0, 0.05), 10)
_LOG_2PI = float(np.log(2.0 * np.pi))


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------


def _warn_data(msg: str) -> None:
    """Emit a DataWarning attributed to the first caller outside this module."""
    frame = inspect.currentframe()
    level = 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
        level += 1
    warnings.warn(msg, DataWarning, stacklevel=level)


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a finite, non-empty 1-D float array or raise."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a numeric 1-D array-like; got {type(values).__name__}"
        ) from err
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D; got shape {arr.shape}; flatten it (e.g. with .ravel())"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one observation")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (first at index "
            f"{int(np.argmax(bad))}); drop or impute them before evaluating"
        )
    return arr


def _as_arrays(**named: ArrayLike) -> list[np.ndarray]:
    """Validate several 1-D arrays and check that their lengths agree."""
    arrays = [_as_1d(values, name) for name, values in named.items()]
    lengths = {name: arr.size for name, arr in zip(named, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have equal lengths; got {lengths}")
    return arrays


def _check_sd(sd: np.ndarray) -> None:
    """Raise if any predictive standard deviation is not strictly positive."""
    if (sd <= 0).any():
        raise ValueError(
            f"sd must be > 0 everywhere; got min {sd.min():.3g} at index {int(np.argmin(sd))}; "
            "clip it to a small positive floor"
        )


def _check_interval(lower: np.ndarray, upper: np.ndarray) -> None:
    """Raise if any lower bound exceeds its upper bound."""
    bad = lower > upper
    if bad.any():
        idx = int(np.argmax(bad))
        raise ValueError(
            f"lower exceeds upper at {int(bad.sum())} positions (first at index {idx}: "
            f"{lower[idx]:.3g} > {upper[idx]:.3g}); check the order of the bounds"
        )


def _check_level(level: float) -> float:
    """Return ``level`` as a float in (0, 1) or raise."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(f"level must be a float in (0, 1); got {type(level).__name__}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level}")
    return float(level)


def _check_int(value: int, name: str, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum`` or raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _group_indices(labels: ArrayLike, name: str, n_obs: int) -> list[np.ndarray]:
    """Split ``range(n_obs)`` into index arrays, one per distinct label."""
    labels = np.asarray(labels, dtype=object)
    if labels.ndim != 1 or labels.size != n_obs:
        raise ValueError(
            f"{name} must be 1-D with {n_obs} entries (one per observation); "
            f"got shape {labels.shape}"
        )
    codes, uniques = pd.factorize(labels)
    if (codes < 0).any():
        raise ValueError(
            f"{name} has {int((codes < 0).sum())} missing labels (first at index "
            f"{int(np.argmax(codes < 0))}); drop those rows or fill in the labels"
        )
    order = np.argsort(codes, kind="stable")
    splits = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    return np.split(order, splits)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two validated arrays; NaN when either is constant."""
    a_c = a - a.mean()
    b_c = b - b.mean()
    denom = np.sqrt(np.dot(a_c, a_c) * np.dot(b_c, b_c))
    if np.ptp(a) == 0 or np.ptp(b) == 0 or denom == 0:
        return float("nan")
    return float(np.clip(np.dot(a_c, b_c) / denom, -1.0, 1.0))


# ----------------------------------------------------------------------------------------
# Point metrics
# ----------------------------------------------------------------------------------------


def rmse(y: ArrayLike, mean: ArrayLike) -> float:
    r"""Root mean squared error.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        :math:`\sqrt{N^{-1} \sum_n (y_n - \hat y_n)^2}`.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    return float(np.sqrt(np.mean((y - mean) ** 2)))


def mae(y: ArrayLike, mean: ArrayLike) -> float:
    r"""Mean absolute error.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        :math:`N^{-1} \sum_n |y_n - \hat y_n|`.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    return float(np.mean(np.abs(y - mean)))


def r2(y: ArrayLike, mean: ArrayLike) -> float:
    """Coefficient of determination, :math:`1 - SS_{res} / SS_{tot}`.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        R², at most 1 and negative for predictions worse than the mean of ``y``;
        NaN when ``y`` is constant.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.

    Warns
    -----
    DataWarning
        If ``y`` is constant, so that R² is undefined.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    ss_tot = np.sum((y - y.mean()) ** 2)
    if ss_tot == 0:
        _warn_data("r2 is undefined because y is constant; returning NaN")
        return float("nan")
    return float(1.0 - np.sum((y - mean) ** 2) / ss_tot)


def explained_variance(y: ArrayLike, mean: ArrayLike) -> float:
    r"""Explained variance, :math:`1 - \mathrm{Var}(y - \hat y) / \mathrm{Var}(y)`.

    Unlike :func:`r2` this ignores a constant bias of the predictions.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        Explained variance score; NaN when ``y`` is constant.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.

    Warns
    -----
    DataWarning
        If ``y`` is constant, so that the score is undefined.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    var_y = np.var(y)
    if var_y == 0:
        _warn_data("explained_variance is undefined because y is constant; returning NaN")
        return float("nan")
    return float(1.0 - np.var(y - mean) / var_y)


def pearson(y: ArrayLike, mean: ArrayLike) -> float:
    """Pearson correlation between observations and predictions.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        Correlation in [-1, 1]; NaN when either input is constant.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.

    Warns
    -----
    DataWarning
        If either input is constant (this includes a single observation).
    """
    y, mean = _as_arrays(y=y, mean=mean)
    value = _corr(y, mean)
    if np.isnan(value):
        _warn_data("pearson is undefined because y or mean is constant; returning NaN")
    return value


def spearman(y: ArrayLike, mean: ArrayLike) -> float:
    """Spearman rank correlation between observations and predictions.

    Ties get their average rank, as in :func:`scipy.stats.spearmanr`.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.

    Returns
    -------
    float
        Rank correlation in [-1, 1]; NaN when either input is constant.

    Raises
    ------
    ValueError
        If the inputs are empty, not 1-D, non-finite or of unequal length.

    Warns
    -----
    DataWarning
        If either input is constant (this includes a single observation).
    """
    y, mean = _as_arrays(y=y, mean=mean)
    value = _corr(stats.rankdata(y), stats.rankdata(mean))
    if np.isnan(value):
        _warn_data("spearman is undefined because y or mean is constant; returning NaN")
    return value


def per_drug_pearson(y: ArrayLike, mean: ArrayLike, drug: ArrayLike, min_pairs: int = 10) -> float:
    """Mean over drugs of the Pearson correlation within each drug.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Point predictions.
    drug : array-like of shape (n_obs,)
        Drug label of each observation (any hashable values).
    min_pairs : int, default=10
        Drugs with fewer test pairs are left out of the mean.

    Returns
    -------
    float
        Unweighted mean of the per-drug correlations; NaN when no drug qualifies.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``drug`` has missing labels or ``min_pairs < 2``.
    TypeError
        If ``min_pairs`` is not an int.

    Warns
    -----
    DataWarning
        If some qualifying drugs have a constant ``y`` or ``mean`` (they are left out),
        or if no drug qualifies.

    Notes
    -----
    Correlation within a drug measures how well a model ranks cell lines for that
    drug, which a pooled correlation hides: differences in mean potency between drugs
    inflate the pooled value.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    min_pairs = _check_int(min_pairs, "min_pairs", 2)
    groups = [idx for idx in _group_indices(drug, "drug", y.size) if idx.size >= min_pairs]
    corrs = np.array([_corr(y[idx], mean[idx]) for idx in groups])
    n_constant = int(np.isnan(corrs).sum())
    if n_constant:
        _warn_data(
            f"per_drug_pearson: {n_constant} of {len(groups)} drugs with >= {min_pairs} pairs "
            "have constant y or mean and are left out"
        )
    corrs = corrs[~np.isnan(corrs)]
    if corrs.size == 0:
        _warn_data(
            f"per_drug_pearson: no drug has >= {min_pairs} pairs with a defined correlation; "
            "returning NaN (lower min_pairs or evaluate on more data)"
        )
        return float("nan")
    logger.debug("per_drug_pearson over %d drugs", corrs.size)
    return float(corrs.mean())


def ndcg(
    y: ArrayLike,
    mean: ArrayLike,
    group: ArrayLike,
    k: int = 10,
    higher_is_better: bool = False,
) -> float:
    r"""Normalised discounted cumulative gain of the item ranking within each group.

    Used as in the original MTL4C toolkit: groups are cell lines and items are drugs,
    so the score says how well the predicted drug ranking of a cell line recovers the
    drugs it is most sensitive to.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Predicted responses, used to rank the items of each group.
    group : array-like of shape (n_obs,)
        Group label (cell line) of each observation.
    k : int, default=10
        Number of top-ranked items that count.
    higher_is_better : bool, default=False
        Whether a high response marks a relevant item. The default suits ln IC50,
        where a low value means a sensitive cell line and a drug worth recommending.

    Returns
    -------
    float
        Mean NDCG@k over the groups whose ideal DCG is positive, in [0, 1]; NaN when
        no group has one.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``group`` has missing labels or ``k < 1``.
    TypeError
        If ``k`` is not an int.

    Warns
    -----
    DataWarning
        If every group has an ideal DCG of 0 (for instance one item per group).

    Notes
    -----
    Within a group the relevance of item :math:`i` is shifted so that the least
    relevant item gets 0:

    .. math::

        r_i = \max_j y_j - y_i \quad \text{(lower is better)}, \qquad
        r_i = y_i - \min_j y_j \quad \text{(higher is better)}.

    The items are sorted by prediction (ascending when lower is better, descending
    otherwise; ties keep their input order), and

    .. math::

        \mathrm{DCG@}k = \sum_{i=1}^{\min(k, n)} \frac{r_{(i)}}{\log_2(i + 1)},
        \qquad \mathrm{NDCG@}k = \mathrm{DCG@}k / \mathrm{IDCG@}k,

    where :math:`r_{(i)}` is the relevance of the item ranked :math:`i`-th and
    IDCG@k is the DCG@k of the ranking by true relevance. Groups whose IDCG@k is 0
    (all items equally relevant) are skipped, and the result is the unweighted mean
    over the remaining groups.

    References
    ----------
    .. [1] Järvelin, K. and Kekäläinen, J. (2002). Cumulated gain-based evaluation of
       IR techniques. ACM Transactions on Information Systems, 20(4), 422-446.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    k = _check_int(k, "k", 1)
    sign = 1.0 if higher_is_better else -1.0

    scores = []
    for idx in _group_indices(group, "group", y.size):
        y_g = y[idx]
        relevance = sign * (y_g - (y_g.min() if higher_is_better else y_g.max()))
        discount = 1.0 / np.log2(np.arange(2, min(k, idx.size) + 2))
        predicted = relevance[np.argsort(-sign * mean[idx], kind="stable")][:k]
        ideal = np.sort(relevance)[::-1][:k]
        idcg = float(np.dot(ideal, discount))
        if idcg > 0:
            scores.append(float(np.dot(predicted, discount)) / idcg)

    if not scores:
        _warn_data("ndcg: every group has an ideal DCG of 0; returning NaN")
        return float("nan")
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------
# Distribution metrics
# ----------------------------------------------------------------------------------------


def coverage(y: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> float:
    """Fraction of observations inside their predictive interval (bounds included).

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    lower, upper : array-like of shape (n_obs,)
        Interval bounds, with ``lower <= upper``.

    Returns
    -------
    float
        Empirical coverage in [0, 1].

    Raises
    ------
    ValueError
        If the inputs are invalid or some ``lower`` exceeds its ``upper``.
    """
    y, lower, upper = _as_arrays(y=y, lower=lower, upper=upper)
    _check_interval(lower, upper)
    return float(np.mean((lower <= y) & (y <= upper)))


def interval_width(lower: ArrayLike, upper: ArrayLike) -> float:
    r"""Mean width of predictive intervals.

    Parameters
    ----------
    lower, upper : array-like of shape (n_obs,)
        Interval bounds, with ``lower <= upper``.

    Returns
    -------
    float
        :math:`N^{-1} \sum_n (u_n - l_n)`.

    Raises
    ------
    ValueError
        If the inputs are invalid or some ``lower`` exceeds its ``upper``.
    """
    lower, upper = _as_arrays(lower=lower, upper=upper)
    _check_interval(lower, upper)
    return float(np.mean(upper - lower))


def central_interval(mean: ArrayLike, sd: ArrayLike, level: float) -> tuple[np.ndarray, np.ndarray]:
    r"""Central interval of a Gaussian predictive distribution.

    Parameters
    ----------
    mean : array-like of shape (n_obs,)
        Predictive means.
    sd : array-like of shape (n_obs,)
        Predictive standard deviations, > 0.
    level : float
        Probability mass of the interval, in (0, 1).

    Returns
    -------
    lower, upper : ndarray of shape (n_obs,)
        :math:`\mu \mp z \sigma` with :math:`z = \Phi^{-1}((1 + \text{level}) / 2)`.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``sd <= 0`` somewhere or ``level`` is outside (0, 1).
    TypeError
        If ``level`` is not a real number.
    """
    mean, sd = _as_arrays(mean=mean, sd=sd)
    _check_sd(sd)
    z = stats.norm.ppf(0.5 + 0.5 * _check_level(level))
    return mean - z * sd, mean + z * sd


def gaussian_nll(y: ArrayLike, mean: ArrayLike, sd: ArrayLike) -> float:
    r"""Mean negative log density of the observations under Gaussian predictives.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Predictive means.
    sd : array-like of shape (n_obs,)
        Predictive standard deviations, > 0.

    Returns
    -------
    float
        :math:`N^{-1} \sum_n [\tfrac12 \log 2\pi + \log \sigma_n
        + \tfrac12 ((y_n - \mu_n) / \sigma_n)^2]`.

    Raises
    ------
    ValueError
        If the inputs are invalid or ``sd <= 0`` somewhere.
    """
    y, mean, sd = _as_arrays(y=y, mean=mean, sd=sd)
    _check_sd(sd)
    z = (y - mean) / sd
    return float(np.mean(0.5 * _LOG_2PI + np.log(sd) + 0.5 * z**2))


def crps_gaussian(y: ArrayLike, mean: ArrayLike, sd: ArrayLike) -> float:
    r"""Mean continuous ranked probability score of Gaussian predictives.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Predictive means.
    sd : array-like of shape (n_obs,)
        Predictive standard deviations, > 0.

    Returns
    -------
    float
        Mean CRPS, in the units of ``y``; lower is better.

    Raises
    ------
    ValueError
        If the inputs are invalid or ``sd <= 0`` somewhere.

    Notes
    -----
    :math:`\mathrm{CRPS}(F, y) = \int (F(x) - 1\{x \ge y\})^2 dx`, which for
    :math:`F = \mathcal N(\mu, \sigma^2)` and :math:`z = (y - \mu) / \sigma` is

    .. math::

        \sigma \left[ z (2 \Phi(z) - 1) + 2 \varphi(z) - 1 / \sqrt{\pi} \right].

    References
    ----------
    .. [1] Gneiting, T. and Raftery, A. E. (2007). Strictly proper scoring rules,
       prediction, and estimation. JASA, 102(477), 359-378.
    """
    y, mean, sd = _as_arrays(y=y, mean=mean, sd=sd)
    _check_sd(sd)
    z = (y - mean) / sd
    crps = sd * (z * special.erf(z / np.sqrt(2.0)) + 2.0 * stats.norm.pdf(z) - 1.0 / np.sqrt(np.pi))
    return float(np.mean(crps))


def coverage_curve(
    y: ArrayLike, mean: ArrayLike, sd: ArrayLike, levels: ArrayLike | None = None
) -> pd.DataFrame:
    """Empirical coverage and mean width of Gaussian central intervals at many levels.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Predictive means.
    sd : array-like of shape (n_obs,)
        Predictive standard deviations, > 0.
    levels : array-like of shape (n_levels,), optional
        Nominal levels in (0, 1). Default is 0.10, 0.15, ..., 0.95.

    Returns
    -------
    DataFrame
        One row per level, in the given order, with float columns ``level``,
        ``coverage`` and ``width``. A calibrated model has coverage close to level.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``sd <= 0`` somewhere or a level is outside (0, 1).
    """
    y, mean, sd = _as_arrays(y=y, mean=mean, sd=sd)
    levels = _DEFAULT_LEVELS if levels is None else _as_1d(levels, "levels")
    rows = []
    for level in levels:
        lower, upper = central_interval(mean, sd, float(level))
        rows.append((float(level), coverage(y, lower, upper), interval_width(lower, upper)))
    return pd.DataFrame(rows, columns=["level", "coverage", "width"])


# ----------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------


def _level_tag(level: float) -> str:
    """Format a level as a percentage for metric keys: 0.9 -> '90', 0.975 -> '97.5'."""
    return f"{round(100.0 * level, 6):g}"


def evaluate(
    y: ArrayLike,
    mean: ArrayLike,
    sd: ArrayLike | None,
    *,
    lower: ArrayLike | None = None,
    upper: ArrayLike | None = None,
    level: float = 0.9,
    drug: ArrayLike | None = None,
    cell: ArrayLike | None = None,
) -> dict[str, float]:
    """Compute every applicable metric for one set of predictions.

    Parameters
    ----------
    y : array-like of shape (n_obs,)
        Observed responses.
    mean : array-like of shape (n_obs,)
        Predictive means (point predictions).
    sd : array-like of shape (n_obs,) or None
        Predictive standard deviations, > 0. ``None`` for a point predictor: ``nll``
        and ``crps`` are then left out, and so are coverage and width unless
        ``lower`` and ``upper`` are given.
    lower, upper : array-like of shape (n_obs,), optional
        Explicit interval bounds (for instance posterior-predictive quantiles). Give
        both or neither; when given they replace the Gaussian interval.
    level : float, default=0.9
        Nominal level of the interval; names the keys ``coverage_<pct>`` and
        ``width_<pct>`` and sets the Gaussian interval when no bounds are given.
    drug : array-like of shape (n_obs,), optional
        Drug labels; adds ``per_drug_pearson`` (``min_pairs=10``).
    cell : array-like of shape (n_obs,), optional
        Cell-line labels; adds ``ndcg`` (NDCG@10 of the drug ranking per cell line,
        lower response is better).

    Returns
    -------
    dict of str to float
        Keys ``n``, ``rmse``, ``mae``, ``r2``, ``explained_variance``, ``pearson``,
        ``spearman``, then ``per_drug_pearson`` and ``ndcg`` when labels are given,
        ``coverage_<pct>`` and ``width_<pct>`` (e.g. ``coverage_90``), ``nll`` and
        ``crps``. All values are Python floats; undefined metrics are NaN.

    Raises
    ------
    ValueError
        If any input is invalid, or only one of ``lower`` and ``upper`` is given.

    Warns
    -----
    DataWarning
        From the individual metrics when one is undefined for the data.
    """
    y, mean = _as_arrays(y=y, mean=mean)
    if (lower is None) != (upper is None):
        raise ValueError(
            "lower and upper must be given together; got only "
            f"{'lower' if upper is None else 'upper'}"
        )
    level = _check_level(level)

    result: dict[str, float] = {
        "n": float(y.size),
        "rmse": rmse(y, mean),
        "mae": mae(y, mean),
        "r2": r2(y, mean),
        "explained_variance": explained_variance(y, mean),
        "pearson": pearson(y, mean),
        "spearman": spearman(y, mean),
    }
    if drug is not None:
        result["per_drug_pearson"] = per_drug_pearson(y, mean, drug)
    if cell is not None:
        result["ndcg"] = ndcg(y, mean, cell, k=10)

    # Interval metrics: explicit bounds win over the Gaussian interval.
    bounds = None
    if lower is not None and upper is not None:
        bounds = (lower, upper)
    elif sd is not None:
        bounds = central_interval(mean, sd, level)
    if bounds is not None:
        tag = _level_tag(level)
        result[f"coverage_{tag}"] = coverage(y, *bounds)
        result[f"width_{tag}"] = interval_width(*bounds)
    if sd is not None:
        result["nll"] = gaussian_nll(y, mean, sd)
        result["crps"] = crps_gaussian(y, mean, sd)
    return result


def _frame_inputs(frame: pd.DataFrame) -> dict[str, Any]:
    """Pull the arguments of :func:`evaluate` out of a predictions frame."""
    inputs: dict[str, Any] = {"y": frame["y"].to_numpy(dtype=float)}
    inputs["mean"] = frame["mean"].to_numpy(dtype=float)
    inputs["sd"] = frame["sd"].to_numpy(dtype=float) if "sd" in frame else None
    for col in ("lower", "upper"):
        inputs[col] = frame[col].to_numpy(dtype=float) if col in frame else None
    for col in ("drug", "cell"):
        inputs[col] = frame[col].to_numpy() if col in frame else None
    return inputs


def evaluate_frame(
    frame: pd.DataFrame, level: float = 0.9, task_col: str = "task"
) -> dict[str, Any]:
    """Evaluate a long predictions table overall and per task.

    Parameters
    ----------
    frame : DataFrame
        One row per test measurement with columns ``task_col``, ``y`` and ``mean``,
        and optionally ``sd``, ``lower``, ``upper``, ``cell`` and ``drug`` (used as
        in :func:`evaluate`).
    level : float, default=0.9
        Nominal interval level, passed to :func:`evaluate`.
    task_col : str, default="task"
        Column naming the task (screen) of each row.

    Returns
    -------
    dict
        ``{"overall": evaluate(...), "per_task": {task: evaluate(...)}}`` with the
        task names as ``str``, in sorted order.

    Raises
    ------
    TypeError
        If ``frame`` is not a DataFrame.
    KeyError
        If a required column is missing.
    ValueError
        If ``task_col`` has missing values, or any input is invalid for :func:`evaluate`.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame; got {type(frame).__name__}")
    missing = [col for col in (task_col, "y", "mean") if col not in frame.columns]
    if missing:
        raise KeyError(f"frame lacks required columns {missing}; it has {list(frame.columns)}")
    if frame[task_col].isna().any():
        raise ValueError(
            f"column {task_col!r} has {int(frame[task_col].isna().sum())} missing values; "
            "drop those rows or fill in the task"
        )

    overall = evaluate(**_frame_inputs(frame), level=level)
    per_task = {}
    for task, sub in frame.groupby(task_col, sort=True, observed=True):
        per_task[str(task)] = evaluate(**_frame_inputs(sub), level=level)
    logger.debug("evaluated %d rows over %d tasks", len(frame), len(per_task))
    return {"overall": overall, "per_task": per_task}
