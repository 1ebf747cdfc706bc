"""Figures and report sections of an Optuna study (``mtl4c-prob tune``).

Optimisation history, learning curves (intermediate values), parameter importances,
contour and parallel-coordinate plots, drawn with matplotlib's object-oriented API (no
pyplot, no plotly) so they embed in the self-contained HTML report and save as PNG.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from mtl4c_prob.evaluation.report import (
    ReportSection,
    _html_table,
    _mpl_text,
    _new_figure,
    _note,
    render_report,
)

logger = logging.getLogger(__name__)

__all__ = ["param_importances", "study_figures", "study_sections", "write_study_report"]

_BEST, _OTHER, _PRUNED = "#D55E00", "#0072B2", "0.6"
_MAX_CONTOUR_PARAMS = 3


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    fig.clear()
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances (fANOVA with scikit-learn, PED-ANOVA without); {} if undefined.

    Needs at least three completed trials over parameters that vary.
    """
    trials = _complete(study)
    if len(trials) < 3:
        return {}
    try:
        import sklearn  # noqa: F401

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        logger.info("parameter importances not available: %s", exc)
        return {}


def _history(study: optuna.Study, objective: str) -> Figure | None:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    fig, (ax,) = _new_figure(1, 1, 7.5, 3.0)
    numbers = np.array([t.number for t in done])
    values = np.array([t.value for t in done])
    ax.scatter(numbers, values, s=18, color=_OTHER, label="completed trial", zorder=3)
    order = np.argsort(numbers)
    best = np.minimum.accumulate(values[order])
    ax.step(numbers[order], best, where="post", color=_BEST, lw=1.5, label="best so far")
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    if pruned:
        # Pruned trials have no final value (their intermediate values are on another
        # scale): ticks along the bottom edge.
        ax.scatter(
            pruned, np.zeros(len(pruned)), marker="|", s=120, color=_PRUNED, label="pruned",
            transform=ax.get_xaxis_transform(), clip_on=False,
        )  # fmt: skip
    default = [t.value for t in done if t.user_attrs.get("defaults")]
    if default:
        ax.axhline(default[0], color="0.3", ls="--", lw=1, label="model defaults")
    _clip_y(ax, values)
    ax.set(xlabel="trial", ylabel=objective, title="Optimisation history")
    ax.legend(fontsize=7)
    return fig


def _clip_y(ax, values: np.ndarray) -> None:
    """Keep the y range on the bulk of the values: a diverged trial would flatten the rest."""
    finite = values[np.isfinite(values)]
    if len(finite) < 4:
        return
    lo, q75 = np.min(finite), np.quantile(finite, 0.75)
    hi = min(np.max(finite), q75 + 3 * (q75 - lo) + 1e-9)
    pad = 0.05 * (hi - lo + 1e-12)
    ax.set_ylim(lo - pad, hi + pad)


def _intermediate(study: optuna.Study) -> Figure | None:
    trials = [t for t in study.get_trials(deepcopy=False) if len(t.intermediate_values) > 1]
    if not trials:
        return None
    fig, (ax,) = _new_figure(1, 1, 7.5, 3.0)
    values = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        curve = [t.intermediate_values[s] for s in steps]
        values.extend(curve)
        pruned = t.state == TrialState.PRUNED
        ax.plot(steps, curve, lw=0.8, color=_PRUNED if pruned else _OTHER, alpha=0.8)
    ax.plot([], [], color=_OTHER, label="completed")
    ax.plot([], [], color=_PRUNED, label="pruned")
    _clip_y(ax, np.asarray(values, float))
    ax.set(xlabel="% of the fit (fold number with k-fold)", ylabel="intermediate value")
    ax.set_title("Learning curves")
    ax.legend(fontsize=7)
    return fig


def _importance_figure(importances: Mapping[str, float]) -> Figure | None:
    if not importances:
        return None
    names = list(importances)[::-1]
    fig, (ax,) = _new_figure(1, 1, 6.0, 0.3 * len(names) + 0.8)
    ax.barh(range(len(names)), [importances[n] for n in names], color=_OTHER)
    ax.set_yticks(range(len(names)), [_mpl_text(n) for n in names], fontsize=8)
    ax.set(xlabel="importance (share of the objective's variance)", title="Parameter importances")
    fig.subplots_adjust(left=min(0.45, 0.1 + 0.012 * max(map(len, names))))
    return fig


def _axis_values(trials, name: str, study: optuna.Study) -> tuple[np.ndarray, dict]:
    """Plot coordinates of a parameter: log10 for log scales, positions for categories."""
    dist = _distribution(study, name)
    raw = [t.params[name] for t in trials]
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        return np.array([choices.index(v) for v in raw], float), {"ticks": choices}
    values = np.asarray(raw, float)
    if getattr(dist, "log", False):
        return np.log10(values), {"log": True}
    return values, {}


def _distribution(study: optuna.Study, name: str):
    for t in _complete(study):
        if name in t.distributions:
            return t.distributions[name]
    return None


def _label_axis(ax, which: str, name: str, info: dict) -> None:
    label = f"log10 {name}" if info.get("log") else name
    getattr(ax, f"set_{which}label")(_mpl_text(label))
    if "ticks" in info:
        getattr(ax, f"set_{which}ticks")(range(len(info["ticks"])), map(str, info["ticks"]))


def _contour(study: optuna.Study, names: list[str]) -> Figure | None:
    trials = [t for t in _complete(study) if all(n in t.params for n in names)]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    if len(trials) < 3 or not names:
        return None
    if not pairs:
        return _slice(study, trials, names[0])
    fig, axes = _new_figure(1, len(pairs), 3.6, 3.0)
    values = np.array([t.value for t in trials])
    vmin, vmax = np.min(values), np.quantile(values, 0.9)
    for ax, (a, b) in zip(axes, pairs, strict=True):
        x, xi = _axis_values(trials, a, study)
        y, yi = _axis_values(trials, b, study)
        if len(trials) >= 4 and np.ptp(x) > 0 and np.ptp(y) > 0:
            try:
                ax.tricontourf(x, y, np.clip(values, vmin, vmax), levels=12, cmap="viridis")
            except (ValueError, RuntimeError):  # collinear points: no triangulation
                pass
        points = ax.scatter(
            x, y, c=values, cmap="viridis", vmin=vmin, vmax=vmax, s=16, edgecolors="k", lw=0.4
        )
        best = int(np.argmin(values))
        ax.scatter(x[best], y[best], marker="*", s=140, color=_BEST, edgecolors="k", lw=0.5)
        _label_axis(ax, "x", a, xi)
        _label_axis(ax, "y", b, yi)
    fig.colorbar(points, ax=list(axes), shrink=0.85, label="objective")
    return fig


def _slice(study: optuna.Study, trials, name: str) -> Figure:
    """Objective against the one searched parameter (the contour plot of one dimension)."""
    fig, (ax,) = _new_figure(1, 1, 5.0, 3.0)
    x, info = _axis_values(trials, name, study)
    values = np.array([t.value for t in trials])
    ax.scatter(x, values, s=18, color=_OTHER)
    best = int(np.argmin(values))
    ax.scatter(x[best], values[best], marker="*", s=140, color=_BEST, edgecolors="k", lw=0.5)
    _label_axis(ax, "x", name, info)
    _clip_y(ax, values)
    ax.set_ylabel("objective")
    return fig


def _parallel(study: optuna.Study, names: list[str], objective: str) -> Figure | None:
    trials = [t for t in _complete(study) if all(n in t.params for n in names)]
    if len(trials) < 2 or not names:
        return None
    values = np.array([t.value for t in trials])
    columns = [values]
    labels = [objective]
    for name in names:
        coords, info = _axis_values(trials, name, study)
        columns.append(coords)
        labels.append(f"log10 {name}" if info.get("log") else name)
    table = np.column_stack(columns)
    lo, hi = table.min(0), table.max(0)
    scaled = (table - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig, (ax,) = _new_figure(1, 1, max(6.0, 1.3 * len(labels)), 3.2)
    cmap = fig.colorbar(
        ax.scatter([], [], c=[], cmap="viridis", vmin=values.min(), vmax=values.max()),
        ax=ax,
        label=objective,
    ).cmap
    norm_values = (values - values.min()) / max(np.ptp(values), 1e-12)
    for row, v in sorted(zip(scaled, norm_values, strict=True), key=lambda r: -r[1]):
        ax.plot(range(len(labels)), row, color=cmap(v), lw=1.2 if v == 0 else 0.8, alpha=0.8)
    for i in range(len(labels)):
        ax.axvline(i, color="0.3", lw=0.6)
        ax.text(i, -0.06, f"{lo[i]:.3g}", ha="center", va="top", fontsize=7)
        ax.text(i, 1.04, f"{hi[i]:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), [_mpl_text(s) for s in labels], fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.set_title("Parallel coordinates (darker: better)", fontsize=10)
    return fig


def study_figures(study: optuna.Study, objective: str = "objective") -> dict[str, bytes]:
    """Draw the study's figures as PNG images.

    Returns
    -------
    dict of str to bytes
        Keys ``history``, ``intermediate``, ``importances``, ``contour`` and
        ``parallel_coordinate``, each present only when the study has enough trials.
    """
    importances = param_importances(study)
    names = list(importances) or sorted({n for t in _complete(study) for n in t.params})
    builders = {
        "history": lambda: _history(study, objective),
        "intermediate": lambda: _intermediate(study),
        "importances": lambda: _importance_figure(importances),
        "contour": lambda: _contour(study, names[:_MAX_CONTOUR_PARAMS]),
        "parallel_coordinate": lambda: _parallel(study, names, objective),
    }
    images = {}
    for key, build in builders.items():
        fig = build()
        if fig is not None:
            images[key] = _png(fig)
    return images


_TITLES = {
    "history": ("tuning-history", "Optimisation history"),
    "intermediate": ("tuning-curves", "Learning curves of the trials"),
    "importances": ("tuning-importances", "Parameter importances"),
    "contour": ("tuning-contour", "Contour plots"),
    "parallel_coordinate": ("tuning-parallel", "Parallel coordinates"),
}
_NOTES = {
    "history": "Objective of each completed trial; the line is the best so far, the dashed "
    "line the model's defaults (the study's first trial).",
    "intermediate": "Values reported to the pruner during the fits, at the percentage of "
    "each fit done (held-out NLL of the standardised responses, the training loss for the "
    "ELBO objective, or the running fold mean with k-fold validation); grey curves were "
    "pruned.",
    "importances": "Share of the objective's variance each parameter explains across the "
    "completed trials (fANOVA; PED-ANOVA without scikit-learn).",
    "contour": "Objective over pairs of the most important parameters, interpolated "
    "between completed trials (dots); the star is the best trial.",
    "parallel_coordinate": "Each line is a completed trial, each axis a parameter scaled to "
    "its range (minimum below, maximum above the axis).",
}


def study_sections(
    study: optuna.Study,
    *,
    objective: str = "objective",
    settings: Mapping[str, object] | None = None,
    images: Mapping[str, bytes] | None = None,
) -> list[ReportSection]:
    """Report sections of a study: summary and best trials, then one per figure.

    Status: experimental.

    Parameters
    ----------
    study : optuna.Study
        The study.
    objective : str, default="objective"
        Name of the objective, for labels.
    settings : dict, optional
        Tuning settings shown in the summary.
    images : dict of str to bytes, optional
        PNG images from :func:`study_figures` (drawn when not given).

    Returns
    -------
    list of ReportSection
    """
    images = study_figures(study, objective) if images is None else images
    sections = [_summary(study, objective, settings)]
    for key, (anchor, title) in _TITLES.items():
        if key in images:
            body = _img(images[key], title) + _note(_NOTES[key])
        else:
            body = _note("Not available: too few completed trials (or no intermediate values).")
        sections.append(ReportSection(anchor, title, body))
    return sections


def _summary(study: optuna.Study, objective: str, settings) -> ReportSection:
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    parts = [
        f"<p>Study <strong>{html.escape(study.study_name)}</strong>: {len(trials)} trials "
        f"({html.escape(counts)}); objective <strong>{html.escape(objective)}</strong>, "
        "minimised.</p>"
    ]
    if settings:
        parts.append(_html_table(["setting", "value"], [(k, v) for k, v in settings.items()]))
    done = sorted(_complete(study), key=lambda t: t.value)
    if done:
        names = sorted({n for t in done for n in t.params})
        metrics = [t.user_attrs.get("metrics") or {} for t in done]
        extra = sorted({k for m in metrics for k in m if k.startswith("val_")})
        rows = [
            [
                t.number,
                t.value,
                *[t.params.get(n) for n in names],
                *[m.get(k) for k in extra],
            ]
            for t, m in zip(done[:10], metrics, strict=False)
        ]
        parts.append("<h3>Best trials</h3>")
        parts.append(_html_table(["trial", objective, *names, *extra], rows))
        default = [t for t in done if t.user_attrs.get("defaults")]
        if default:
            gain = default[0].value - done[0].value
            parts.append(
                _note(
                    f"Model defaults (trial {default[0].number}): {default[0].value:.4g}; "
                    f"best: {done[0].value:.4g} (lower by {gain:.4g})."
                )
            )
    return ReportSection("tuning-summary", "Tuning summary", "".join(parts))


def write_study_report(
    study: optuna.Study,
    path: str | os.PathLike[str],
    *,
    figures: str | os.PathLike[str] | None = None,
    objective: str = "objective",
    settings: Mapping[str, object] | None = None,
    title: str = "mtl4c-prob tuning report",
) -> Path:
    """Write the study's self-contained HTML report (and its figures as PNG files).

    Status: experimental.

    Parameters
    ----------
    study : optuna.Study
        The study.
    path : str or path
        The HTML file, written atomically.
    figures : str or path, optional
        Folder for ``history.png``, ``importances.png``, ``contour.png``,
        ``parallel_coordinate.png`` and ``intermediate.png``.
    objective, settings, title
        As in :func:`study_sections`; ``title`` heads the page.

    Returns
    -------
    Path
    """
    images = study_figures(study, objective)
    if figures is not None:
        folder = Path(figures)
        folder.mkdir(parents=True, exist_ok=True)
        for key, png in images.items():
            _atomic_bytes(folder / f"{key}.png", png)
    text = render_report(
        study_sections(study, objective=objective, settings=settings, images=images), title=title
    )
    path = Path(path)
    _atomic_bytes(path, text.encode("utf-8"))
    logger.info("wrote tuning report %s (%d figures)", path, len(images))
    return path


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
