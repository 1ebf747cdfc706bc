"""Model rankings with paired tests over runs, and the report sections of an experiment.

The input is the tidy results table of :class:`~mtl4c_prob.experiment.Experiment`
(one row per dataset, model, run, scope and metric) plus the per-drug and per-cell-line
errors of each cell. Per dataset, the report shows a ranking of the models, box plots of
each metric over runs, per-drug bar charts and a per-cell-line scatter against the best
model; figures are PNG images inside the self-contained HTML page.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mtl4c_prob.evaluation.report import (
    ReportSection,
    _figure_to_img,
    _html_table,
    _mpl_text,
    _new_figure,
    _note,
)

logger = logging.getLogger(__name__)

__all__ = ["HIGHER_IS_BETTER", "experiment_sections", "paired_test", "rank_models"]

#: Metrics where a larger value is better; every other metric is better lower, except
#: ``coverage_*``, which is best at its nominal level.
HIGHER_IS_BETTER = ("pearson", "spearman", "r2", "explained_variance", "per_drug_pearson", "ndcg")
#: Metrics drawn as box plots, in this order, when present.
BOX_METRICS = (
    "rmse",
    "pearson",
    "per_drug_pearson",
    "nll",
    "crps",
    "coverage_90",
    "calibration_error",
)
_MAX_DRUGS = 30
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def _loss(metric: str, values: pd.Series | np.ndarray) -> np.ndarray:
    """Values turned into losses (lower is better) for ranking."""
    values = np.asarray(values, float)
    if metric in HIGHER_IS_BETTER:
        return -values
    match = re.fullmatch(r"coverage_(\d+(?:\.\d+)?)", metric)
    if match:
        return np.abs(values - float(match.group(1)) / 100)
    return values


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired two-sided t-test of two models' metric over the same runs.

    Returns
    -------
    dict
        ``n`` (runs with both values), ``mean_diff`` (a - b), ``t`` and ``p``; NaN for
        ``t`` and ``p`` below two runs or when every difference is the same.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    out = {"n": int(keep.sum()), "mean_diff": float(diff.mean()) if len(diff) else np.nan}
    if len(diff) < 2 or np.ptp(diff) == 0:
        return {**out, "t": np.nan, "p": np.nan}
    result = stats.ttest_rel(a[keep], b[keep])
    return {**out, "t": float(result.statistic), "p": float(result.pvalue)}


def rank_models(results: pd.DataFrame, dataset: str, metric: str) -> pd.DataFrame:
    """Rank the models of one dataset on one overall metric, with paired tests.

    Parameters
    ----------
    results : DataFrame
        Tidy results (columns dataset, model, run, scope, metric, value).
    dataset : str
        Dataset to rank on.
    metric : str
        Metric name (``rmse``, ``nll``, ``pearson``, ``coverage_90``, ...).

    Returns
    -------
    DataFrame
        Indexed by model, best first: ``mean``, ``sd`` and ``runs`` of the metric,
        ``mean_rank`` (rank within each run, averaged; 1 is best), and the paired
        t-test against the best model over the runs both finished (``p_vs_best``,
        ``diff_vs_best``; NaN for the best itself).
    """
    rows = results[
        (results["dataset"] == dataset)
        & (results["scope"] == "overall")
        & (results["metric"] == metric)
    ]
    if rows.empty:
        raise KeyError(f"no {metric!r} results for dataset {dataset!r}")
    wide = rows.pivot_table(index="run", columns="model", values="value", aggfunc="first")
    losses = pd.DataFrame(_loss(metric, wide.to_numpy()), index=wide.index, columns=wide.columns)
    ranks = losses.rank(axis=1, method="average")
    table = pd.DataFrame(
        {
            "mean": wide.mean(),
            "sd": wide.std(ddof=1),
            "runs": wide.count(),
            "mean_rank": ranks.mean(),
            "mean_loss": losses.mean(),
        }
    )
    table = table.sort_values(["mean_loss", "mean_rank"])
    best = table.index[0]
    tests = {m: paired_test(losses[m].to_numpy(), losses[best].to_numpy()) for m in table.index}
    table["diff_vs_best"] = [np.nan if m == best else tests[m]["mean_diff"] for m in table.index]
    table["p_vs_best"] = [np.nan if m == best else tests[m]["p"] for m in table.index]
    return table.drop(columns="mean_loss")


def _anchor(prefix: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-") or "x"
    return f"{prefix}-{slug}"


def _colors(models: Sequence[str]) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}


def _ranking_body(results: pd.DataFrame, dataset: str, primary: str) -> tuple[str, list[str]]:
    overall = results[(results["dataset"] == dataset) & (results["scope"] == "overall")]
    metrics = [m for m in BOX_METRICS if m in set(overall["metric"])]
    if primary not in metrics and primary in set(overall["metric"]):
        metrics.insert(0, primary)
    main = rank_models(results, dataset, primary)
    order = list(main.index)
    columns = ["rank", "model", "mean rank", f"{primary} mean", "sd", "runs", "p vs best"]
    rows = [
        [i + 1, m, main.loc[m, "mean_rank"], main.loc[m, "mean"], main.loc[m, "sd"],
         main.loc[m, "runs"], main.loc[m, "p_vs_best"]]
        for i, m in enumerate(order)
    ]  # fmt: skip
    parts = [
        f"<p>Models ranked on mean held-out <strong>{html.escape(primary)}</strong> over "
        "runs (each run is a fresh seeded split, the same for every model).</p>",
        _html_table(columns, rows),
    ]
    means = []
    for m in order:
        row = [m]
        for metric in metrics:
            sub = overall[(overall["model"] == m) & (overall["metric"] == metric)]["value"]
            row.append(f"{sub.mean():.4g} ± {sub.std(ddof=1):.2g}" if len(sub) > 1 else sub.mean())
        means.append(row)
    parts.append("<h3>All metrics (mean ± sd over runs)</h3>")
    parts.append(_html_table(["model", *metrics], means))
    parts.append(
        _note(
            "p vs best: two-sided paired t-test over runs against the top model (on the "
            "loss scale: negated correlations, |coverage - level|). With few runs the test "
            "has little power; n/a where it is undefined."
        )
    )
    return "".join(parts), order


def _box_figure(results: pd.DataFrame, dataset: str, order: list[str]) -> str | None:
    overall = results[(results["dataset"] == dataset) & (results["scope"] == "overall")]
    metrics = [m for m in BOX_METRICS if m in set(overall["metric"])]
    if not metrics:
        return None
    n_cols = min(4, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    fig, axes = _new_figure(n_rows, n_cols, max(2.6, 0.55 * len(order) + 1.0), 2.6)
    colors = _colors(order)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics, strict=False):
        data = [
            overall[(overall["model"] == m) & (overall["metric"] == metric)]["value"].to_numpy(
                float
            )
            for m in order
        ]
        ax.boxplot(data, widths=0.5, showfliers=False)
        for i, (m, values) in enumerate(zip(order, data, strict=True)):
            jitter = rng.uniform(-0.12, 0.12, len(values))
            ax.scatter(i + 1 + jitter, values, s=14, color=colors[m], zorder=3)
        ax.set_xticks(
            range(1, len(order) + 1), [_mpl_text(m) for m in order], rotation=30, fontsize=7
        )
        ax.set_title(_mpl_text(metric), fontsize=9)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return _figure_to_img(fig, f"box plots of the metrics over runs, {dataset}")


def _per_entity(
    per: Mapping[tuple[str, str], Mapping[str, list]], models, kind: str
) -> pd.DataFrame:
    """Mean RMSE (over runs) per entity and model, and the test rows per entity."""
    frames = []
    for (model, run), table in per.items():
        if model not in models or not table:
            continue
        frame = pd.DataFrame.from_dict(table, orient="index", columns=["n", "rmse", "nll"])
        frame["model"], frame["run"] = model, run
        frames.append(frame.rename_axis(kind).reset_index())
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _drug_figure(per_drug: pd.DataFrame, order: list[str], dataset: str) -> str | None:
    if per_drug.empty:
        return None
    counts = per_drug.groupby("drug")["n"].mean().sort_values(ascending=False)
    drugs = list(counts.index[:_MAX_DRUGS])
    means = per_drug[per_drug["drug"].isin(drugs)].pivot_table(
        index="drug", columns="model", values="rmse", aggfunc="mean"
    )
    best = order[0]
    drugs = list(means[best].sort_values().index) if best in means else drugs
    fig, (ax,) = _new_figure(1, 1, 7.5, max(2.5, 0.12 * len(drugs) * len(order) + 0.5))
    height = 0.8 / len(order)
    colors = _colors(order)
    for i, model in enumerate(order):
        if model not in means:
            continue
        y = np.arange(len(drugs)) + (i - (len(order) - 1) / 2) * height
        ax.barh(
            y, means.loc[drugs, model], height=height, color=colors[model], label=_mpl_text(model)
        )
    ax.set_yticks(range(len(drugs)), [_mpl_text(d) for d in drugs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out RMSE (mean over runs)")
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.22)
    return _figure_to_img(fig, f"per-drug RMSE, {dataset}")


def _cell_figure(per_cell: pd.DataFrame, order: list[str], dataset: str) -> str | None:
    if per_cell.empty or len(order) < 2:
        return None
    means = per_cell.pivot_table(index="cell", columns="model", values="rmse", aggfunc="mean")
    best, others = order[0], [m for m in order[1:] if m in means]
    if best not in means or not others:
        return None
    fig, axes = _new_figure(1, len(others), 3.2, 3.0)
    for ax, model in zip(axes, others, strict=True):
        pair = means[[best, model]].dropna()
        worse = float((pair[model] > pair[best]).mean())
        ax.scatter(pair[best], pair[model], s=6, alpha=0.6, color=_PALETTE[1])
        top = float(np.nanmax(pair.to_numpy())) if len(pair) else 1.0
        ax.plot([0, top], [0, top], color="0.3", ls="--", lw=1)
        ax.set(xlabel=_mpl_text(f"{best} RMSE"), ylabel=_mpl_text(f"{model} RMSE"))
        ax.set_title(_mpl_text(f"{model}: worse on {worse:.0%} of cell lines"), fontsize=9)
    return _figure_to_img(fig, f"per-cell-line RMSE against {best}, {dataset}")


def experiment_sections(
    results: pd.DataFrame,
    per_drug: Mapping[tuple[str, str, int], Mapping[str, list]],
    per_cell: Mapping[tuple[str, str, int], Mapping[str, list]],
    *,
    primary: str = "nll",
    summary: Mapping[str, object] | None = None,
) -> list[ReportSection]:
    """Report sections of an experiment: a summary, then per dataset its ranking and figures.

    Status: experimental.

    Parameters
    ----------
    results : DataFrame
        Tidy results table (dataset, model, run, scope, metric, value).
    per_drug, per_cell : dict
        (dataset, model, run) -> {name: [n_test, rmse, nll]} for each finished cell.
    primary : str, default="nll"
        Metric the models are ranked on.
    summary : dict, optional
        Experiment settings and counts, shown first.

    Returns
    -------
    list of ReportSection
    """
    sections = []
    if summary:
        body = _html_table(["setting", "value"], list(summary.items()))
        sections.append(ReportSection("experiment-summary", "Experiment", body))
    for dataset in pd.unique(results["dataset"]):
        body, order = _ranking_body(results, dataset, primary)
        sections.append(ReportSection(_anchor("ranking", dataset), f"{dataset}: ranking", body))
        figures = [
            ("boxes", "metrics over runs", _box_figure(results, dataset, order),
             "Each point is one run (a fresh seeded split); boxes span the quartiles."),
            ("drugs", "per-drug error",
             _drug_figure(_per_entity(_of(per_drug, dataset), order, "drug"), order, dataset),
             f"RMSE per drug, mean over runs, for the {_MAX_DRUGS} drugs with the most test "
             "rows, sorted by the top model's error."),
            ("cells", "per-cell-line error",
             _cell_figure(_per_entity(_of(per_cell, dataset), order, "cell"), order, dataset),
             "RMSE per cell line (mean over runs) of each model against the top-ranked "
             "model; points above the dashed line are cell lines the top model predicts "
             "better."),
        ]  # fmt: skip
        for tag, title, img, note in figures:
            body = img + _note(note) if img else _note("Not available for this dataset.")
            sections.append(ReportSection(_anchor(tag, dataset), f"{dataset}: {title}", body))
    return sections


def _of(per: Mapping[tuple[str, str, int], Mapping], dataset: str) -> dict:
    return {(m, r): table for (d, m, r), table in per.items() if d == dataset}
