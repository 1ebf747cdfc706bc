"""Posterior diagnostics report of one or several fit folders.

A fit folder is what ``mtl4c-prob fit`` writes: ``predictions.csv`` (held-out pairs with
their predictive intervals), ``metrics.json``, ``model/`` (the saved model with its loss
trace), ``idata.nc`` (the ArviZ export on the training rows), ``data_summary.json`` and,
for models with a task covariance, ``task_correlation.csv``. :func:`build_folder_report`
turns any number of them into one self-contained HTML page; every section says what is
not available instead of failing when a folder lacks a part.
"""

from __future__ import annotations

import html
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from mtl4c_prob.evaluation.diagnostics import (
    IDATA_FILE,
    compare,
    elpd_summary,
    loo,
    loo_pit,
)
from mtl4c_prob.evaluation.metrics import coverage, crps_gaussian, gaussian_nll, rmse
from mtl4c_prob.evaluation.report import (
    _NOMINAL_LEVELS,
    _PIT_STYLE,
    ReportSection,
    _empirical_coverage,
    _figure_to_img,
    _html_table,
    _mpl_text,
    _new_figure,
    _note,
    _pit_values,
    _scatter_section,
    _validate_predictions,
    render_report,
)
from mtl4c_prob.exceptions import DataError, DiagnosticWarning

logger = logging.getLogger(__name__)

__all__ = ["FitFolder", "build_folder_report", "write_folder_report"]

#: Posterior variables shown in the forest plot: prior scales, noise and kernel settings.
_FOREST_WORDS = ("_sd", "spread", "noise", "scale", "lengthscale", "variance", "ard")
_FOREST_MAX_ELEMENTS = 40
_TABLE_LEVELS = (0.5, 0.8, 0.9, 0.95)
_DRUG_ROWS = 15


def _q05(a: np.ndarray, axis: int | None) -> np.ndarray:
    return np.quantile(a, 0.05, axis=axis)


def _q95(a: np.ndarray, axis: int | None) -> np.ndarray:
    return np.quantile(a, 0.95, axis=axis)


#: Summary statistics of the posterior predictive checks: name -> f(array, axis).
_PPC_STATISTICS = {"mean": np.mean, "sd": np.std, "q05": _q05, "q95": _q95}


@dataclass
class FitFolder:
    """The parts of one fit folder a report reads; missing parts are None.

    Status: experimental.
    """

    path: Path
    name: str
    predictions: pd.DataFrame | None = None
    metrics: dict = field(default_factory=dict)
    losses: list[float] | None = None
    val_losses: list | None = None
    idata: object | None = None
    data_summary: dict | None = None
    task_correlation: pd.DataFrame | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> FitFolder:
        """Read a fit folder; raise only when it holds none of the expected files."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"fit folder {path} does not exist")
        out = cls(path=path, name=name or path.name)
        found = False
        pred = path / "predictions.csv"
        if pred.is_file():
            out.predictions = pd.read_csv(pred, dtype={"task": str, "cell": str, "drug": str})
            found = True
        else:
            out.problems.append("predictions.csv")
        metrics = path / "metrics.json"
        if metrics.is_file():
            out.metrics = json.loads(metrics.read_text())
            found = True
            model_name = out.metrics.get("info", {}).get("model")
            if name is None and model_name:
                out.name = f"{model_name} ({path.name})"
        else:
            out.problems.append("metrics.json")
        model_json = path / "model" / "model.json"
        if model_json.is_file():
            fit = json.loads(model_json.read_text()).get("fit_result", {})
            out.losses = fit.get("losses") or None
            out.val_losses = fit.get("val_losses") or None
            found = True
        if (path / IDATA_FILE).is_file():
            from mtl4c_prob.evaluation.diagnostics import load_inference_data

            out.idata = load_inference_data(path / IDATA_FILE)
            found = True
        else:
            out.problems.append(IDATA_FILE)
        summary = path / "data_summary.json"
        if summary.is_file():
            out.data_summary = json.loads(summary.read_text())
        corr = path / "task_correlation.csv"
        if corr.is_file():
            out.task_correlation = pd.read_csv(corr, index_col=0)
        if not found:
            raise DataError(
                f"{path} holds none of predictions.csv, metrics.json, model/ or {IDATA_FILE}; "
                "is it an mtl4c-prob fit folder?"
            )
        return out


def _unavailable(what: str, folders: Sequence[FitFolder]) -> str:
    names = ", ".join(html.escape(f.name) for f in folders)
    return _note(f"{what}: not available for {names}.")


# ------------------------------------------------------------------ sections
def _summary_section(folders: Sequence[FitFolder]) -> ReportSection:
    rows = []
    for f in folders:
        info = f.metrics.get("info", {})
        rows.append(
            [
                f.name,
                info.get("model"),
                info.get("split"),
                info.get("n_train"),
                info.get("n_test"),
                info.get("steps"),
                info.get("fit_seconds"),
                info.get("device"),
            ]
        )
    header = ["fit", "model", "split", "train rows", "test rows", "steps", "fit s", "device"]
    parts = [_html_table(header, rows)]
    summaries = [(f, f.data_summary) for f in folders if f.data_summary]
    if summaries:
        f, summary = summaries[0]
        shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        parts.append(f"<h3>Data ({html.escape(f.name)})</h3>")
        parts.append(_html_table(["quantity", "value"], list(shown.items())))
        per_task = summary.get("per_task")
        if isinstance(per_task, dict) and per_task:
            keys = list(dict.fromkeys(k for v in per_task.values() for k in v))
            parts.append(
                _html_table(
                    ["task", *keys], [[t, *[v.get(k) for k in keys]] for t, v in per_task.items()]
                )
            )
    else:
        parts.append(_unavailable("Data summary (data_summary.json)", folders))
    return ReportSection("summary", "Summary", "".join(parts))


def _elbo_section(folders: Sequence[FitFolder]) -> ReportSection:
    have = [f for f in folders if f.losses]
    if not have:
        return ReportSection("elbo", "ELBO traces", _unavailable("Loss history", folders))
    fig, axes = _new_figure(1, len(have), 4.0 if len(have) > 1 else 8.0, 2.8)
    for ax, f in zip(axes, have, strict=False):
        loss = np.asarray(f.losses, float)
        ax.plot(np.arange(1, len(loss) + 1), loss, lw=1, color="0.3", label="training")
        if f.val_losses:
            val = np.asarray(f.val_losses, float)
            ax.plot(val[:, 0], val[:, 1], "o", ms=3, color="#D55E00", label="held-out")
        finite = loss[np.isfinite(loss)]
        ax.set_yscale("log" if len(finite) and (finite > 0).all() else "symlog")
        ax.set(title=_mpl_text(f.name), xlabel="step", ylabel="negative ELBO / obs")
        ax.legend(fontsize=7)
    body = _figure_to_img(fig, "ELBO traces")
    missing = [f for f in folders if not f.losses]
    if missing:
        body += _unavailable("Loss history", missing)
    return ReportSection("elbo", "ELBO traces", body)


def _ppc_section(folders: Sequence[FitFolder], rng: np.random.Generator) -> ReportSection:
    have = [f for f in folders if f.idata is not None and "posterior_predictive" in f.idata]
    if not have:
        return ReportSection(
            "ppc", "Posterior predictive checks", _unavailable("Posterior predictive", folders)
        )
    fig, axes = _new_figure(1, len(have), 4.0 if len(have) > 1 else 6.0, 3.0)
    rows = []
    for ax, f in zip(axes, have, strict=False):
        y = f.idata.observed_data["y"].values
        rep = f.idata.posterior_predictive["y"].values.reshape(-1, len(y))
        lo, hi = np.quantile(np.concatenate([y, rep[:20].ravel()]), [0.002, 0.998])
        bins = np.linspace(lo, hi, 40)
        for i in rng.choice(len(rep), size=min(20, len(rep)), replace=False):
            ax.hist(rep[i], bins=bins, density=True, histtype="step", color="#56B4E9", lw=0.5)
        ax.hist(y, bins=bins, density=True, histtype="step", color="k", lw=1.5, label="observed")
        ax.set(title=_mpl_text(f.name), xlabel="response", ylabel="density")
        ax.legend(fontsize=7)
        for stat, fn in _PPC_STATISTICS.items():
            observed = float(fn(y, axis=None))
            replicated = fn(rep, axis=1)
            rows.append([f.name, stat, observed, float(np.mean(replicated >= observed))])
    body = _figure_to_img(fig, "posterior predictive checks")
    body += _html_table(["fit", "statistic", "observed", "P(replicated ≥ observed)"], rows)
    body += _note(
        "Training rows (the export's observations): observed response histogram (black) "
        "over 20 replicated data sets drawn from the posterior predictive (blue), and "
        "posterior predictive p-values of summary statistics; values near 0 or 1 flag a "
        "misfit."
    )
    return ReportSection("ppc", "Posterior predictive checks", body)


def _loo_pit_section(folders: Sequence[FitFolder]) -> tuple[ReportSection, dict]:
    have = [f for f in folders if f.idata is not None and "log_likelihood" in f.idata]
    results = {}
    if not have:
        return ReportSection("loo-pit", "LOO-PIT", _unavailable("log-likelihood", folders)), results
    fig, axes = _new_figure(1, len(have), 4.0 if len(have) > 1 else 6.0, 3.0)
    rows = []
    for ax, f in zip(axes, have, strict=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DiagnosticWarning)
            result = loo(f.idata)
        results[f.name] = result
        summary = elpd_summary(result)
        rows.append(
            [
                f.name,
                summary["elpd"],
                summary["se"],
                summary["p"],
                summary["n_obs"],
                summary.get("pareto_k_over_0.7"),
                "; ".join(str(w.message) for w in caught) or "",
            ]
        )
        if "posterior_predictive" in f.idata:
            pit = loo_pit(f.idata)
            ax.hist(pit[np.isfinite(pit)], color="#0072B2", **_PIT_STYLE)
            ax.axhline(1.0, color="0.3", lw=1, ls="--")
        ax.set(title=_mpl_text(f.name), xlabel="LOO-PIT", ylabel="density", xlim=(0, 1))
    body = _figure_to_img(fig, "LOO-PIT histograms")
    body += _html_table(
        ["fit", "elpd_loo", "se", "p_loo", "observations", "Pareto k > 0.7", "warnings"], rows
    )
    body += _note(
        "PSIS-LOO on the training rows of each export. LOO-PIT: the leave-one-out "
        "predictive probability of each observed response; flat when calibrated, U-shaped "
        "when too confident. Many Pareto k above 0.7 make LOO unreliable for those rows."
    )
    return ReportSection("loo-pit", "LOO-PIT and PSIS-LOO", body), results


def _predicted_section(
    folders: Sequence[FitFolder], level: float, rng: np.random.Generator
) -> ReportSection:
    parts = []
    for f in folders:
        if f.predictions is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_task = _validate_predictions(f.predictions)
        parts.append(f"<h3>{html.escape(f.name)}</h3>" + _scatter_section(by_task, level, rng).body)
    missing = [f for f in folders if f.predictions is None]
    if missing:
        parts.append(_unavailable("Predictions (predictions.csv)", missing))
    return ReportSection("predicted-vs-observed", "Predicted vs observed", "".join(parts))


def _calibration_section(folders: Sequence[FitFolder], level: float) -> ReportSection:
    have = [f for f in folders if f.predictions is not None]
    if not have:
        return ReportSection("calibration", "Calibration", _unavailable("Predictions", folders))
    fig, (ax_cov, ax_pit) = _new_figure(1, 2, 4.2, 3.2)
    ax_cov.plot([0, 1], [0, 1], color="0.3", lw=1, ls="--", label="ideal")
    ax_pit.axhline(1.0, color="0.3", lw=1, ls="--")
    for f in have:
        for task, d in f.predictions.groupby("task"):
            label = _mpl_text(f"{f.name}: {task}" if len(folders) > 1 else str(task))
            cov = _empirical_coverage(
                d["y"].to_numpy(), d["mean"].to_numpy(), d["sd"].to_numpy(), _NOMINAL_LEVELS
            )
            line = ax_cov.plot(_NOMINAL_LEVELS, cov, marker="o", ms=3, label=label)[0]
            pit = _pit_values(d["y"].to_numpy(), d["mean"].to_numpy(), d["sd"].to_numpy())
            ax_pit.hist(pit, color=line.get_color(), label=label, **_PIT_STYLE)
    ax_cov.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal level", ylabel="empirical coverage")
    ax_cov.set_title("Coverage curve (held-out)")
    ax_pit.set(xlim=(0, 1), xlabel="PIT", ylabel="density", title="PIT histogram (held-out)")
    ax_cov.legend(fontsize=6)
    body = _figure_to_img(fig, "held-out calibration curves")

    rows = []
    for f in have:
        p = f.predictions
        for task, d in [("all", p), *p.groupby("task")]:
            z = np.abs(d["y"] - d["mean"]) / d["sd"]
            covs = [float(np.mean(z <= norm.ppf(0.5 + a / 2))) for a in _TABLE_LEVELS]
            reported = coverage(d["y"], d["lower"], d["upper"])
            rows.append([f.name, task, len(d), *covs, reported])
    header = ["fit", "task", "n", *[f"{a:.0%}" for a in _TABLE_LEVELS], f"reported {level:.0%}"]
    body += "<h3>Coverage table</h3>" + _html_table(header, rows)
    body += _note(
        "Coverage of central Gaussian intervals mean ± z·sd at each nominal level, and of "
        "the reported [lower, upper] (mixture quantiles) at the fit's level."
    )
    return ReportSection("calibration", "Calibration", body)


def _metrics_section(folders: Sequence[FitFolder]) -> ReportSection:
    rows, names = [], []
    for f in folders:
        scopes = [("overall", f.metrics.get("overall") or {})]
        scopes += list((f.metrics.get("per_task") or {}).items())
        for scope, values in scopes:
            names.extend(k for k in values if k not in names)
            rows.append((f.name, scope, values))
    if not rows or not names:
        return ReportSection("metrics", "Metrics", _unavailable("metrics.json", folders))
    keep = [n for n in names if not n.startswith("n_")][:14]
    body = _html_table(
        ["fit", "scope", *keep], [[a, b, *[v.get(k) for k in keep]] for a, b, v in rows]
    )

    drug_parts = []
    for f in folders:
        if f.predictions is None:
            continue
        per_drug = []
        for drug, d in f.predictions.groupby("drug"):
            per_drug.append(
                [
                    drug,
                    len(d),
                    rmse(d["y"], d["mean"]),
                    coverage(d["y"], d["lower"], d["upper"]),
                    gaussian_nll(d["y"], d["mean"], d["sd"]),
                    crps_gaussian(d["y"], d["mean"], d["sd"]),
                ]
            )
        table = pd.DataFrame(per_drug, columns=["drug", "n", "rmse", "coverage", "nll", "crps"])
        table = table.sort_values("rmse", ascending=False)
        drug_parts.append(
            f"<h3>Per drug: {html.escape(f.name)}</h3>"
            + _note(f"{len(table)} drugs; the {_DRUG_ROWS} with the largest RMSE, then all.")
            + _html_table(list(table.columns), table.head(_DRUG_ROWS).values.tolist())
            + "<details><summary>all drugs</summary>"
            + _html_table(list(table.columns), table.values.tolist())
            + "</details>"
        )
    body += "".join(drug_parts) or _unavailable("Per-drug metrics (predictions.csv)", folders)
    return ReportSection("metrics", "Metrics per task and per drug", body)


def _forest_section(folders: Sequence[FitFolder]) -> ReportSection:
    panels = []
    for f in folders:
        if f.idata is None or "posterior" not in f.idata:
            continue
        post = f.idata.posterior
        entries = []
        for var in post.data_vars:
            if not any(w in var for w in _FOREST_WORDS):
                continue
            values = post[var].values
            flat = values.reshape(values.shape[0] * values.shape[1], -1)
            if flat.shape[1] > _FOREST_MAX_ELEMENTS:
                continue
            extra = post[var].dims[2:]
            labels = (
                [var]
                if not extra
                else [f"{var}[{', '.join(map(str, idx))}]" for idx in np.ndindex(*values.shape[2:])]
            )
            if extra and len(extra) == 1 and extra[0] in post.coords:
                labels = [f"{var}[{c}]" for c in post.coords[extra[0]].values]
            for j, label in enumerate(labels):
                entries.append((label, flat[:, j]))
        if entries:
            panels.append((f, entries))
    if not panels:
        return ReportSection(
            "forest", "Prior scales and noise", _unavailable("Posterior scales", folders)
        )
    body = ""
    for f, entries in panels:
        n = len(entries)
        fig, (ax,) = _new_figure(1, 1, 8.0, max(2.0, 0.22 * n + 0.8))
        for i, (_, draws) in enumerate(entries):
            lo, mid, hi = np.quantile(draws, [0.03, 0.5, 0.97])
            ax.plot([lo, hi], [i, i], color="#0072B2", lw=1.5)
            ax.plot([mid], [i], "o", color="#0072B2", ms=3)
        ax.set_yticks(range(n))
        ax.set_yticklabels([_mpl_text(e[0]) for e in entries], fontsize=7)
        ax.invert_yaxis()
        positive = all(np.all(e[1] > 0) for e in entries)
        if positive:
            ax.set_xscale("log")
        ax.set(title=_mpl_text(f.name), xlabel="posterior (median, 94% interval)")
        longest = max(len(e[0]) for e in entries)
        fig.subplots_adjust(left=min(0.6, 0.06 + 0.0105 * longest), right=0.97)
        body += _figure_to_img(fig, f"forest plot of {f.name}")
    body += _note("Posterior medians and 94% intervals of the scale, spread and noise parameters.")
    return ReportSection("forest", "Prior scales and noise", body)


def _task_correlation_section(folders: Sequence[FitFolder]) -> ReportSection:
    have = [f for f in folders if f.task_correlation is not None]
    if not have:
        return ReportSection(
            "task-correlation",
            "Task correlation",
            _note("Task correlation: not available (the models have no task covariance)."),
        )
    fig, axes = _new_figure(1, len(have), 4.0, 3.4)
    for ax, f in zip(axes, have, strict=False):
        c = f.task_correlation
        im = ax.imshow(c.to_numpy(float), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(c.columns)))
        ax.set_xticklabels([_mpl_text(x) for x in c.columns], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(c.index)))
        ax.set_yticklabels([_mpl_text(x) for x in c.index], fontsize=7)
        for (i, j), v in np.ndenumerate(c.to_numpy(float)):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(_mpl_text(f.name))
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
    body = _figure_to_img(fig, "task correlation heatmaps")
    missing = [f for f in folders if f.task_correlation is None]
    if missing:
        body += _unavailable("Task correlation", missing)
    return ReportSection("task-correlation", "Task correlation", body)


def _compare_section(folders: Sequence[FitFolder], results: dict) -> ReportSection:
    have = [f for f in folders if f.idata is not None and "log_likelihood" in f.idata]
    if len(have) < 2:
        return ReportSection(
            "loo-compare",
            "LOO comparison",
            _note("LOO comparison: needs two or more fits with an export (idata.nc)."),
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DiagnosticWarning)
            table = compare({f.name: f.idata for f in have}, precomputed=results)
    except DataError as exc:
        return ReportSection("loo-compare", "LOO comparison", _note(f"LOO comparison: {exc}."))
    cols = [
        c
        for c in ("rank", "elpd_loo", "p_loo", "elpd_diff", "weight", "se", "dse", "warning")
        if c in table.columns
    ]
    body = _html_table(
        ["fit", *cols], [[i, *[row[c] for c in cols]] for i, row in table.iterrows()]
    )
    body += _note("ArviZ's ranking by expected log pointwise predictive density (PSIS-LOO).")
    return ReportSection("loo-compare", "LOO comparison", body)


# ---------------------------------------------------------------------- API
def build_folder_report(
    folders: Sequence[str | Path | FitFolder],
    *,
    title: str | None = None,
    level: float | None = None,
    seed: int = 0,
) -> str:
    """Build the diagnostics report of one or several fit folders as HTML.

    Status: experimental.

    Parameters
    ----------
    folders : sequence of path or FitFolder
        Fit folders written by ``mtl4c-prob fit`` (or :class:`FitFolder` objects).
    title : str, optional
        Page title (default: names the fits).
    level : float, optional
        Level of the reported intervals (default: the first fit's, else 0.9).
    seed : int, default=0
        Seed of the replicated data sets drawn in the predictive checks.

    Returns
    -------
    str
        The HTML page, with sections ``summary``, ``elbo``, ``predicted-vs-observed``,
        ``ppc``, ``loo-pit``,
        ``calibration``, ``metrics``, ``forest``, ``task-correlation`` and
        ``loo-compare``.
    """
    if not folders:
        raise ValueError("build_folder_report needs at least one fit folder")
    start = time.perf_counter()
    read = [f if isinstance(f, FitFolder) else FitFolder.read(f) for f in folders]
    names = [f.name for f in read]
    for i, f in enumerate(read):
        if names.count(f.name) > 1:
            f.name = f"{f.name} #{i + 1}"
    if level is None:
        level = float(read[0].metrics.get("info", {}).get("level", 0.9))
    rng = np.random.default_rng(seed)
    loo_section, loo_results = _loo_pit_section(read)
    sections = [
        _summary_section(read),
        _elbo_section(read),
        _predicted_section(read, level, rng),
        _ppc_section(read, rng),
        loo_section,
        _calibration_section(read, level),
        _metrics_section(read),
        _forest_section(read),
        _task_correlation_section(read),
        _compare_section(read, loo_results),
    ]
    title = title or "mtl4c-prob diagnostics: " + ", ".join(f.name for f in read)
    text = render_report(sections, title=title)
    logger.info("report of %d fit(s) built in %.1f s", len(read), time.perf_counter() - start)
    return text


def write_folder_report(
    folders: Sequence[str | Path | FitFolder],
    out: str | Path,
    **kwargs,
) -> Path:
    """Build :func:`build_folder_report` and write it atomically to ``out``."""
    text = build_folder_report(folders, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
