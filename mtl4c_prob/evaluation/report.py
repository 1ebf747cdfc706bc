"""Self-contained HTML report of one fitted model.

The report is a single HTML file that opens offline: the CSS is inline, every figure
is a base64-encoded PNG in a ``data:`` URI and no JavaScript is used. It is assembled
from a list of :class:`ReportSection` objects, so further sections (several models,
ArviZ diagnostics, Optuna plots) are added by building more sections and passing them
to :func:`render_report`.

Figures are drawn with :class:`matplotlib.figure.Figure` on a
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, never through
``matplotlib.pyplot``, so the user's backend and pyplot's figure registry are left
untouched.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import numbers
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

import mtl4c_prob
from mtl4c_prob.exceptions import DataWarning

__all__ = ["ReportSection", "build_report", "render_report", "write_report"]

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("task", "cell", "drug", "y", "mean", "sd", "lower", "upper")
_NUMERIC_COLUMNS = ("y", "mean", "sd", "lower", "upper")
_NOMINAL_LEVELS = np.round(np.arange(0.10, 0.951, 0.05), 2)
_MAX_BARS_PER_TASK = 300
_MAX_POINTS_PER_TASK = 20_000
_COVERED, _MISSED = "#0072B2", "#D55E00"
_PIT_STYLE = {"bins": 10, "range": (0, 1), "density": True, "histtype": "step", "lw": 1.5}
_ANCHOR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #0072B2; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f4f8; }
img { max-width: 100%; height: auto; }
.note { color: #666; font-size: .9em; }
footer { margin-top: 3em; color: #666; font-size: .8em; border-top: 1px solid #ccc; }
"""


@dataclass(frozen=True)
class ReportSection:
    """One section of an HTML report.

    Status: experimental

    Parameters
    ----------
    anchor : str
        ``id`` attribute of the section's ``<h2>`` heading; starts with a letter and
        holds only letters, digits, ``-`` and ``_``.
    title : str
        Heading text; it is HTML-escaped when rendered.
    body : str
        HTML of the section content. It is inserted verbatim, so every user string in
        it must already be escaped.
    """

    anchor: str
    title: str
    body: str

    def __post_init__(self) -> None:
        if not _ANCHOR_RE.match(self.anchor):
            raise ValueError(
                f"anchor={self.anchor!r} is not a valid section id; use a letter followed "
                "by letters, digits, '-' or '_'"
            )


def _format_value(value: object) -> str:
    """Format one table cell as plain (unescaped) text."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return f"{value:.0f}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(item) for item in value)
    return str(value)


def _html_table(columns: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """Render a table with a header row; every cell is formatted and escaped."""
    head = "".join(f"<th>{html.escape(_format_value(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format_value(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(text: str) -> str:
    """Render an escaped note paragraph."""
    return f'<p class="note">{html.escape(text)}</p>'


def _mpl_text(text: object) -> str:
    """Make a user string safe for matplotlib (no mathtext, not hidden from legends)."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _new_figure(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """Make a figure of ``n_rows x n_cols`` panels, each ``width x height`` inches.

    Margins are fixed in inches instead of using a layout engine, which would draw
    every figure twice.
    """
    left, right, bottom, top, gap_x, gap_y = 0.8, 0.2, 0.55, 0.4, 0.85, 0.9
    fig_width = left + right + n_cols * width + (n_cols - 1) * gap_x
    fig_height = bottom + top + n_rows * height + (n_rows - 1) * gap_y
    fig = Figure(figsize=(fig_width, fig_height))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(left=left / fig_width, right=1 - right / fig_width)
    fig.subplots_adjust(bottom=bottom / fig_height, top=1 - top / fig_height)
    fig.subplots_adjust(wspace=gap_x / width, hspace=gap_y / height)
    return fig, axes.ravel()


def _figure_to_img(fig: Figure, alt: str) -> str:
    """Render a figure to an ``<img>`` tag holding a base64 PNG, then free the figure."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    fig.clear()
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _empirical_coverage(
    y: np.ndarray, mean: np.ndarray, sd: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """Fraction of ``y`` inside the central Gaussian interval ``mean +/- z * sd`` per level."""
    z = norm.ppf(0.5 + levels / 2.0)  # (n_levels,)
    inside = np.abs(y - mean)[:, None] <= z[None, :] * sd[:, None]  # (n_obs, n_levels)
    return inside.mean(axis=0)


def _pit_values(y: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Probability integral transform ``Phi((y - mean) / sd)`` of each observation."""
    return norm.cdf((y - mean) / sd)


def _validate_predictions(predictions: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """Check the predictions frame and split its usable rows by task."""
    if not isinstance(predictions, pd.DataFrame):
        raise TypeError(
            f"predictions must be a pandas.DataFrame, got {type(predictions).__name__}; "
            "build one with the columns " + ", ".join(REQUIRED_COLUMNS)
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions lacks the columns {missing} (has {list(predictions.columns)}); "
            "it needs " + ", ".join(REQUIRED_COLUMNS)
        )
    values = {}
    for column in _NUMERIC_COLUMNS:
        try:
            values[column] = predictions[column].to_numpy(dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"predictions[{column!r}] must be numeric, got dtype "
                f"{predictions[column].dtype}; convert it with pandas.to_numeric"
            ) from err

    # rows with a non-finite value or a non-positive sd cannot be plotted or calibrated
    usable = np.logical_and.reduce([np.isfinite(v) for v in values.values()]) & (values["sd"] > 0)
    n_dropped = int((~usable).sum())
    if n_dropped == len(usable):
        raise ValueError(
            f"predictions has no usable rows ({len(usable)} rows, all with a non-finite "
            "value or sd <= 0); check y, mean, sd, lower and upper"
        )
    if n_dropped:
        warnings.warn(
            f"{n_dropped} of {len(usable)} prediction rows have a non-finite value or "
            "sd <= 0; they are left out of the figures",
            DataWarning,
            stacklevel=3,
        )

    tasks = predictions["task"].astype(str).to_numpy()
    return {
        task: {c: v[(tasks == task) & usable] for c, v in values.items()}
        for task in pd.unique(tasks[usable])
    }


def _summary_section(
    title: str,
    by_task: dict[str, dict[str, np.ndarray]],
    level: float,
    settings: Mapping[str, object] | None,
    data_summary: Mapping[str, object] | None,
) -> ReportSection:
    """Build the summary section: headline numbers, settings and data tables."""
    n_rows = sum(len(d["y"]) for d in by_task.values())
    parts = [
        f"<p><strong>{html.escape(title)}</strong>: {n_rows} usable predictions over "
        f"{len(by_task)} task(s), central intervals at level {html.escape(_format_value(level))}."
        "</p>",
        "<h3>Settings</h3>",
    ]
    if settings:
        parts.append(_html_table(["setting", "value"], list(settings.items())))
    else:
        parts.append(_note("No settings given."))
    if data_summary:
        parts.append("<h3>Data</h3>")
        parts.append(_html_table(["quantity", "value"], list(data_summary.items())))
    return ReportSection("summary", "Summary", "".join(parts))


def _elbo_section(
    loss_history: Sequence[float] | None,
    val_loss_history: Sequence[tuple[int, float]] | None,
) -> ReportSection:
    """Build the loss-trace section, or a "not available" note without a history."""
    if loss_history is None or len(loss_history) == 0:
        return ReportSection("elbo", "Training loss", _note("Loss history: not available."))
    loss = np.asarray(loss_history, dtype=float)
    steps = np.arange(1, len(loss) + 1)
    val = np.asarray(val_loss_history if val_loss_history else np.empty((0, 2)), dtype=float)
    if val.ndim != 2 or val.shape[1] != 2:
        raise ValueError(
            f"val_loss_history must be a sequence of (step, loss) pairs, got an array of "
            f"shape {val.shape}; pass e.g. [(100, 12.5), (200, 11.9)]"
        )

    finite_loss = loss[np.isfinite(loss)]
    finite_all = np.concatenate([finite_loss, val[np.isfinite(val[:, 1]), 1]])
    fig, (ax,) = _new_figure(1, 1, 8.0, 2.8)
    ax.plot(steps, loss, lw=1, color="0.3", label="training loss")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o", color=_MISSED, ms=4, label="held-out loss")
    scale = "log" if len(finite_all) and np.all(finite_all > 0) else "symlog"
    ax.set_yscale(scale)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (negative ELBO)")
    ax.legend()

    notes = f"Loss on a {scale} scale. Final training loss {_format_value(loss[-1])} "
    notes += f"at step {len(loss)}"
    if len(finite_loss):
        notes += f"; minimum {_format_value(finite_loss.min())}"
    if len(finite_loss) < len(loss):
        notes += f"; {len(loss) - len(finite_loss)} non-finite value(s) not drawn"
    body = _figure_to_img(fig, "training loss trace") + _note(notes + ".")
    return ReportSection("elbo", "Training loss", body)


def _scatter_section(
    by_task: dict[str, dict[str, np.ndarray]], level: float, rng: np.random.Generator
) -> ReportSection:
    """Build the predicted-vs-observed section, one subplot per task."""
    n_cols = min(3, len(by_task))
    n_rows = math.ceil(len(by_task) / n_cols)
    fig, axes = _new_figure(n_rows, n_cols, 3.6, 3.0)

    for ax, (task, d) in zip(axes, by_task.items(), strict=False):
        covered = (d["lower"] <= d["y"]) & (d["y"] <= d["upper"])
        n_obs = len(d["y"])
        shown = rng.permutation(n_obs)[:_MAX_POINTS_PER_TASK]
        bars = shown[:_MAX_BARS_PER_TASK]
        colors = np.where(covered[bars], _COVERED, _MISSED)
        ax.vlines(
            d["y"][bars], d["lower"][bars], d["upper"][bars], colors=colors, lw=0.6, alpha=0.5
        )
        for mask, color, label in [(covered, _COVERED, "covered"), (~covered, _MISSED, "missed")]:
            idx = shown[mask[shown]]
            ax.scatter(d["y"][idx], d["mean"][idx], s=6, color=color, alpha=0.6, label=label)
        ax.axline((float(d["y"].mean()),) * 2, slope=1, color="0.3", lw=1, ls="--")
        ax.set_title(_mpl_text(f"{task} (coverage {covered.mean():.3f}, n={n_obs})"), fontsize=9)
        ax.set_xlabel("observed y")
        ax.set_ylabel("predicted mean")
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[len(by_task) :]:
        ax.set_visible(False)

    note = (
        f"Vertical bars: central {_format_value(level)} intervals for a random subsample of "
        f"at most {_MAX_BARS_PER_TASK} points per task (at most {_MAX_POINTS_PER_TASK} "
        "points drawn per task). Dashed line: y = x."
    )
    body = _figure_to_img(fig, "predicted mean against observed response") + _note(note)
    return ReportSection("predicted-vs-observed", "Predicted vs observed", body)


def _calibration_section(by_task: dict[str, dict[str, np.ndarray]], level: float) -> ReportSection:
    """Build the calibration section: Gaussian coverage curves and PIT histograms."""
    fig, (ax_cov, ax_pit) = _new_figure(1, 2, 4.2, 3.2)
    ax_cov.plot([0, 1], [0, 1], color="0.3", lw=1, ls="--", label="ideal")
    ax_pit.axhline(1.0, color="0.3", lw=1, ls="--", label="uniform")

    for task, d in by_task.items():
        coverage = _empirical_coverage(d["y"], d["mean"], d["sd"], _NOMINAL_LEVELS)
        line = ax_cov.plot(_NOMINAL_LEVELS, coverage, marker="o", ms=3, label=_mpl_text(task))[0]
        reported = np.mean((d["lower"] <= d["y"]) & (d["y"] <= d["upper"]))
        ax_cov.plot([level], [reported], marker="*", ms=11, color=line.get_color())
        pit = _pit_values(d["y"], d["mean"], d["sd"])
        ax_pit.hist(pit, color=line.get_color(), label=_mpl_text(task), **_PIT_STYLE)

    ax_cov.set(xlim=(0, 1), ylim=(0, 1), title="Coverage of mean ± z·sd")
    ax_cov.set(xlabel="nominal level", ylabel="empirical coverage")
    ax_pit.set(xlim=(0, 1), xlabel="Φ((y − mean) / sd)", ylabel="density", title="PIT histogram")
    ax_cov.legend(fontsize=7)
    ax_pit.legend(fontsize=7)
    note = (
        "Left: empirical coverage of central Gaussian intervals; stars mark the coverage "
        f"of the reported [lower, upper] intervals at level {_format_value(level)}. "
        "Right: a calibrated model gives a flat PIT histogram; a U shape means intervals "
        "that are too narrow, a hump intervals that are too wide."
    )
    body = _figure_to_img(fig, "calibration curves and PIT histograms") + _note(note)
    return ReportSection("calibration", "Calibration", body)


def _check_metrics(metrics: Mapping[str, object]) -> None:
    """Check that metrics is a dict with optional dict entries overall and per_task."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict like {{'overall': {{...}}, 'per_task': {{...}}}}, "
            f"got {type(metrics).__name__}"
        )
    overall = metrics.get("overall") or {}
    per_task = metrics.get("per_task") or {}
    for key, value in [("overall", overall), ("per_task", per_task)]:
        if not isinstance(value, Mapping):
            raise TypeError(f"metrics[{key!r}] must be a dict, got {type(value).__name__}")
    for task, value in per_task.items():
        if not isinstance(value, Mapping):
            raise TypeError(
                f"metrics['per_task'][{task!r}] must be a dict of metric values, "
                f"got {type(value).__name__}"
            )


def _metrics_section(metrics: Mapping[str, object]) -> ReportSection:
    """Build the metrics table: one row for overall and one per task."""
    overall = metrics.get("overall") or {}
    per_task = metrics.get("per_task") or {}

    rows = [("overall", overall)] + [(str(t), m) for t, m in per_task.items()]
    names = list(dict.fromkeys(name for _, m in rows for name in m))
    if not names:
        return ReportSection("metrics", "Metrics", _note("No metrics given."))
    table = [[label] + [m.get(name) for name in names] for label, m in rows]
    body = _html_table(["scope", *names], table) + _note("n/a: not computed or undefined.")
    return ReportSection("metrics", "Metrics", body)


def render_report(sections: Sequence[ReportSection], *, title: str = "mtl4c-prob report") -> str:
    """Assemble sections into one self-contained HTML page.

    Status: experimental

    Parameters
    ----------
    sections : sequence of ReportSection
        Sections in display order; their anchors must be unique.
    title : str, default="mtl4c-prob report"
        Page title and ``<h1>`` heading; it is HTML-escaped.

    Returns
    -------
    str
        The HTML document, with a navigation bar linking to every section and a footer
        giving the mtl4c_prob version and the generation time (UTC).

    Raises
    ------
    ValueError
        If two sections share an anchor.
    """
    anchors = [s.anchor for s in sections]
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    if duplicates:
        raise ValueError(f"sections have duplicate anchors {duplicates}; give each a unique one")

    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section><h2 id="{s.anchor}">{html.escape(s.title)}</h2>\n{s.body}</section>'
        for s in sections
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    version = html.escape(str(mtl4c_prob.__version__))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header>\n{body}\n"
        f"<footer>Generated by mtl4c_prob {version} on {stamp}.</footer>\n</body>\n</html>\n"
    )


def build_report(
    predictions: pd.DataFrame,
    metrics: Mapping[str, object],
    *,
    loss_history: Sequence[float] | None = None,
    val_loss_history: Sequence[tuple[int, float]] | None = None,
    settings: Mapping[str, object] | None = None,
    title: str = "mtl4c-prob report",
    level: float = 0.9,
    data_summary: Mapping[str, object] | None = None,
    seed: int = 0,
) -> str:
    r"""Build a self-contained HTML report of one fitted model.

    Status: experimental

    Parameters
    ----------
    predictions : pandas.DataFrame
        One row per held-out measurement with the columns ``task``, ``cell``, ``drug``,
        ``y`` (observed), ``mean``, ``sd`` (predictive mean and standard deviation) and
        ``lower``, ``upper`` (central predictive interval at `level`).
    metrics : dict
        ``{"overall": {name: value}, "per_task": {task: {name: value}}}``; any metric
        names are accepted and shown as columns.
    loss_history : sequence of float, optional
        Training loss per step; step ``k`` (1-based) is ``loss_history[k - 1]``. Without
        it the "elbo" section says the trace is not available.
    val_loss_history : sequence of (int, float), optional
        Held-out loss as ``(step, loss)`` pairs, drawn as points on the trace.
    settings : dict, optional
        Fit settings (model name, steps, device, seed, fit seconds, ...) shown as a table.
    title : str, default="mtl4c-prob report"
        Report title.
    level : float, default=0.9
        Nominal level of the ``lower``/``upper`` intervals, in (0, 1).
    data_summary : dict, optional
        Data set summary (tasks, cells, drugs, observations, density, ...) shown as a
        table.
    seed : int, default=0
        Seed of the random subsample of points drawn with interval bars.

    Returns
    -------
    str
        The HTML document. Its sections have the ids ``summary``, ``elbo``,
        ``predicted-vs-observed``, ``calibration`` and ``metrics``.

    Raises
    ------
    TypeError
        If `predictions` is not a DataFrame or `metrics` is not a dict of dicts.
    ValueError
        If a column is missing or not numeric, no row is usable, `level` is outside
        (0, 1) or `val_loss_history` is not a sequence of pairs.

    Warns
    -----
    DataWarning
        If rows with a non-finite value or ``sd <= 0`` are left out of the figures.

    Notes
    -----
    The calibration curve gives, for nominal levels :math:`\alpha = 0.10, 0.15, \dots,
    0.95`, the fraction of observations with
    :math:`|y - \mu| \le \Phi^{-1}(1/2 + \alpha/2)\,\sigma`; the PIT histogram shows
    :math:`\Phi((y - \mu)/\sigma)`, uniform for a calibrated Gaussian predictive.
    Floats are shown with 4 significant digits (integer-valued ones as integers) and
    NaN as "n/a".
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}; pass e.g. level=0.9")
    _check_metrics(metrics)
    by_task = _validate_predictions(predictions)
    logger.debug("building report %r: %d tasks", title, len(by_task))

    rng = np.random.default_rng(seed)
    sections = [
        _summary_section(title, by_task, level, settings, data_summary),
        _elbo_section(loss_history, val_loss_history),
        _scatter_section(by_task, level, rng),
        _calibration_section(by_task, level),
        _metrics_section(metrics),
    ]
    return render_report(sections, title=title)


def write_report(
    path: str | os.PathLike[str],
    predictions: pd.DataFrame,
    metrics: Mapping[str, object],
    *,
    loss_history: Sequence[float] | None = None,
    val_loss_history: Sequence[tuple[int, float]] | None = None,
    settings: Mapping[str, object] | None = None,
    title: str = "mtl4c-prob report",
    level: float = 0.9,
    data_summary: Mapping[str, object] | None = None,
    seed: int = 0,
) -> Path:
    """Build the HTML report and write it atomically as UTF-8.

    Status: experimental

    Parameters
    ----------
    path : str or os.PathLike
        Output file; missing parent folders are created.
    predictions : pandas.DataFrame
        As in :func:`build_report`.
    metrics : dict
        As in :func:`build_report`.
    loss_history, val_loss_history, settings, title, level, data_summary, seed
        As in :func:`build_report`.

    Returns
    -------
    pathlib.Path
        The path written.

    Notes
    -----
    The text goes to a temporary file in the target folder, which then replaces `path`
    with :func:`os.replace`, so readers never see a half-written report.
    """
    text = build_report(
        predictions,
        metrics,
        loss_history=loss_history,
        val_loss_history=val_loss_history,
        settings=settings,
        title=title,
        level=level,
        data_summary=data_summary,
        seed=seed,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote report to %s (%d characters)", path, len(text))
    return path
