"""Optuna search over a model's priors and fit settings.

:func:`tune` runs (or adds trials to) an Optuna study whose trials each fit a model on a
validation split, or on k folds, of the training part of a seeded split and score the
held-out rows. The search space is what the model declares (:func:`search_space`):
prior scales, ranks, kernel choices, plus the SVI learning rate and step count. A study
lives in a storage (SQLite file in the output folder by default, any database URL or a
journal file otherwise), so several worker processes, on one host or many, can share it,
and a later run with the same storage and study name adds trials to it.

The best configuration is written as ``best_config.toml``, which ``mtl4c-prob fit
--config FILE`` reads; the study's figures go into ``report.html`` and ``figures/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.distributions import (
    BaseDistribution,
)
from optuna.trial import TrialState

from mtl4c_prob._config import write_toml
from mtl4c_prob._spaces import (
    as_distribution,
    contains,
    decode,
    default_search_space,
    encode,
    fit_search_space,
    model_class,
    model_defaults,
    search_space,
)
from mtl4c_prob._storage import (
    check_study_settings,
    fail_dead_local_trials,
    open_storage,
    redact,
    resolve_storage_url,
)
from mtl4c_prob._trials import TrialSpec, load_study, run_trials, run_workers
from mtl4c_prob.data import SPLITS, DrugResponseData, split
from mtl4c_prob.exceptions import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "TuningResult",
    "add_tune_parser",
    "cmd_tune",
    "default_search_space",
    "fit_search_space",
    "search_space",
    "tune",
]

#: Objectives a study can minimise.
OBJECTIVES = {
    "nll": "held-out negative log predictive density (Gaussian, response units)",
    "rmse": "held-out root mean squared error",
    "crps": "held-out continuous ranked probability score",
    "elbo": "negative ELBO per training observation, mean of the last tenth of the steps",
}
STUDY_FILE = "study.db"
OUTPUT_MARKERS = (STUDY_FILE, "best_config.toml", "tuning.json")


# ------------------------------------------------------------------------ results
@dataclass
class TuningResult:
    """What :func:`tune` returns.

    Status: experimental.

    Attributes
    ----------
    study : optuna.Study
        The study (every trial so far, from every worker and run).
    model : str
        Registered model name.
    objective : str
        The objective minimised (one of :data:`OBJECTIVES`).
    best_params : dict
        Constructor arguments of the best trial, fixed arguments included.
    best_fit : dict
        SVI settings of the best trial, fixed settings included.
    best_value : float
        Objective value of the best trial.
    best_trial : int
        Its trial number.
    default_value : float or None
        Objective value of the model's defaults (the first trial of a new study).
    out : Path or None
        Output folder, when one was written.
    elapsed : float
        Wall-clock seconds of this run.
    n_new : int
        Trials this run added.
    """

    study: optuna.Study
    model: str
    objective: str
    best_params: dict[str, Any]
    best_fit: dict[str, Any]
    best_value: float
    best_trial: int
    default_value: float | None
    out: Path | None
    elapsed: float
    n_new: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        """Return the best configuration in the ``best_config.toml`` layout."""
        counts = _state_counts(self.study)
        return {
            "model": self.model,
            "params": dict(self.best_params),
            "fit": dict(self.best_fit),
            "tuning": {
                "study": self.study.study_name,
                "trial": self.best_trial,
                "objective": self.objective,
                "value": self.best_value,
                "default_value": self.default_value,
                **{f"n_{k}": v for k, v in counts.items()},
                "written": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **{k: v for k, v in self.settings.items() if k in _PROVENANCE},
            },
        }

    def trials_frame(self) -> pd.DataFrame:
        """One row per trial: number, state, value, duration, parameters and metrics."""
        return trials_frame(self.study)


_PROVENANCE = ("split", "test_fraction", "validation", "seed", "data", "storage")


def _state_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {s.name.lower(): states.count(s) for s in TrialState if states.count(s)}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial of ``study``: number, state, value, duration, params, metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row = {"number": t.number, "state": t.state.name, "value": t.value, "seconds": duration}
        row.update(t.params)
        row.update(t.user_attrs.get("metrics") or {})
        row.update(t.user_attrs.get("worker") or {})
        rows.append(row)
    return pd.DataFrame(rows)


def _result(study: optuna.Study, spec: TrialSpec, out, elapsed: float, n_new: int) -> TuningResult:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(
            f"study {study.study_name!r} has no completed trial "
            f"({_state_counts(study)}); see the log for the failures"
        )
    best = min(complete, key=lambda t: t.value)
    defaults = model_defaults(model_class(spec.model))
    params, fit = dict(spec.params), dict(spec.fit)
    for name, value in best.params.items():
        if name in spec.fit_space:
            fit[name] = value
        else:
            params[name] = decode(defaults, name, value)
    default_value = next((t.value for t in complete if t.user_attrs.get("defaults")), None)
    return TuningResult(
        study=study,
        model=spec.model,
        objective=spec.objective,
        best_params=params,
        best_fit=fit,
        best_value=float(best.value),
        best_trial=best.number,
        default_value=default_value,
        out=out,
        elapsed=elapsed,
        n_new=n_new,
        settings=spec.settings,
    )


def write_tuning_outputs(result: TuningResult, out: Path) -> None:
    """Write ``best_config.toml``, ``trials.csv``, ``tuning.json``, figures and the report."""
    import json

    from mtl4c_prob.evaluation.study_report import write_study_report

    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"mtl4c-prob tune: best of study {result.study.study_name!r} "
        f"({result.objective} {result.best_value:.5g}, trial {result.best_trial}).\n"
        "Use with: mtl4c-prob fit --config best_config.toml ..."
    )
    write_toml(out / "best_config.toml", result.to_config(), header=header)
    _atomic_text(out / "trials.csv", result.trials_frame().to_csv(index=False))
    summary = {
        "model": result.model,
        "objective": result.objective,
        "best_value": result.best_value,
        "best_trial": result.best_trial,
        "default_value": result.default_value,
        "best_params": result.best_params,
        "best_fit": result.best_fit,
        "trials": _state_counts(result.study),
        "elapsed_seconds": round(result.elapsed, 2),
        "settings": result.settings,
    }
    _atomic_text(out / "tuning.json", json.dumps(summary, indent=1, default=str))
    write_study_report(
        result.study,
        out / "report.html",
        figures=out / "figures",
        objective=result.objective,
        settings={**result.settings, "model": result.model},
        title=f"mtl4c-prob tune: {result.model} ({result.study.study_name})",
    )


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tune
def _check_args(objective, n_trials, timeout, workers, folds, val_fraction, split_kind) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if n_trials is None and timeout is None:
        raise ValueError("give n_trials, timeout or both, or the study never ends")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > 1 and n_trials is None:
        raise ValueError("several workers need n_trials, to share them out")
    if folds is not None and folds < 2:
        raise ValueError(
            f"folds must be at least 2 (or None for one validation split), got {folds}"
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split_kind not in SPLITS:
        raise ValueError(f"unknown split {split_kind!r}; choose one of {sorted(SPLITS)}")


def _spaces(cls, params, fit, space, tune_fit):
    from mtl4c_prob.inference import SVIConfig

    changes = {k: None if v is None else as_distribution(k, v) for k, v in (space or {}).items()}
    model_space = search_space(cls)
    for name, dist in changes.items():
        if dist is None:
            model_space.pop(name, None)
        elif name not in SVIConfig.__dataclass_fields__:
            model_space[name] = dist
    fit_space = fit_search_space(cls) if tune_fit else {}
    fit_space.update({k: v for k, v in changes.items() if k in SVIConfig.__dataclass_fields__})
    fit_space = {k: v for k, v in fit_space.items() if v is not None and k not in fit}
    model_space = {k: v for k, v in model_space.items() if k not in params}
    clash = sorted(set(model_space) & set(SVIConfig.__dataclass_fields__))
    if clash:
        raise ValueError(f"{cls.__name__} arguments {clash} clash with SVI setting names")
    return model_space, fit_space


def _default_point(cls, model_space, fit_space) -> dict[str, Any]:
    from mtl4c_prob.inference import SVIConfig

    defaults = model_defaults(cls)
    fit_defaults = {**SVIConfig().to_dict(), **cls.fit_defaults}
    point = {}
    for name, dist in {**model_space, **fit_space}.items():
        value = encode(fit_defaults.get(name) if name in fit_space else defaults.get(name))
        if value is not None and contains(dist, value):
            point[name] = value
    return point


def _data_fingerprint(data: DrugResponseData) -> str:
    frame = data.frame[["task", "cell", "drug", "y"]].astype(
        {"task": str, "cell": str, "drug": str}
    )
    digest = int(pd.util.hash_pandas_object(frame, index=False).sum()) & (2**64 - 1)
    return f"{data.n_obs} rows, {data.n_tasks} task(s), hash {digest:016x}"


def tune(
    data: DrugResponseData,
    model: str = "mf",
    *,
    n_trials: int | None = 20,
    timeout: float | None = None,
    objective: str = "nll",
    split_kind: str = "lpo",
    test_fraction: float = 0.2,
    holdout_task: str | None = None,
    val_fraction: float = 0.2,
    folds: int | None = None,
    params: Mapping[str, Any] | None = None,
    fit: Mapping[str, Any] | None = None,
    space: Mapping[str, BaseDistribution | None] | None = None,
    tune_fit: bool = True,
    cell_pca: int | None = None,
    drug_pca: int | None = None,
    storage: str | os.PathLike[str] | None = None,
    study_name: str | None = None,
    out: str | os.PathLike[str] | None = None,
    workers: int = 1,
    seed: int = 0,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    pruner: str | optuna.pruners.BasePruner = "median",
    level: float = 0.9,
    num_samples: int = 100,
    device: str = "auto",
    progress_bar: bool = True,
) -> TuningResult:
    """Tune a model's priors and fit settings with Optuna.

    Status: experimental.

    The data are split as ``mtl4c-prob fit`` splits them (``split_kind``,
    ``test_fraction``, ``seed``); the test part is set aside untouched, so that fitting
    the best configuration with ``fit --config`` and the same split options gives an
    honest test score. Each trial fits on the rest: on one validation split of the same
    kind (``val_fraction``, seed ``seed + 1``) or on ``folds`` folds, and scores the
    held-out rows.

    Parameters
    ----------
    data : DrugResponseData
        All rows (with feature tables when the model uses them).
    model : str, default="mf"
        Registered model name (``mtl4c-prob models``).
    n_trials : int, optional, default=20
        Trials this call adds to the study (shared out among the workers).
    timeout : float, optional
        Stop starting trials after that many seconds (per worker).
    objective : {"nll", "rmse", "crps", "elbo"}, default="nll"
        What to minimise (see :data:`OBJECTIVES`); the mean over folds with ``folds``.
    split_kind : {"lpo", "lco", "ldo", "task"}, default="lpo"
        Kind of the outer split and of the validation splits.
    test_fraction : float, default=0.2
        Share of the outer test part, set aside.
    holdout_task : str, optional
        Task held out by ``split_kind="task"``.
    val_fraction : float, default=0.2
        Share of the validation split of the training part (without ``folds``).
    folds : int, optional
        k-fold cross-validation over the training part instead of one validation split.
    params : dict, optional
        Fixed constructor arguments; they are not searched.
    fit : dict, optional
        Fixed SVI settings (``steps``, ``lr``, ``batch_size``, ``guide``, ...).
    space : dict, optional
        Changes to the search space: name -> dimension (an Optuna distribution or a
        tuple such as ``("float", 0.1, 10, "log")``, see
        :func:`~mtl4c_prob._spaces.as_distribution`) adds or replaces one (SVI setting
        names go to the fit space), name -> None removes one.
    tune_fit : bool, default=True
        Also search ``lr`` and ``steps`` (:func:`fit_search_space`).
    cell_pca, drug_pca : int, optional
        Principal components of the feature tables, fitted per training fold.
    storage : str or path, optional
        Database URL, journal file or SQLite file (see :mod:`mtl4c_prob._storage`);
        default: ``study.db`` in ``out``.
    study_name : str, optional
        Default ``"{model}-{split_kind}-{objective}"``. A study that exists in the
        storage gets the new trials, provided it was made with the same model, data,
        split and objective.
    out : str or path, optional
        Output folder for ``best_config.toml``, ``trials.csv``, ``tuning.json``,
        ``report.html`` and ``figures/`` (and the default SQLite file).
    workers : int, default=1
        Worker processes (spawned, one torch thread each) sharing the trials; 1 runs
        them in this process.
    seed : int, default=0
        Seed of the splits, the fits and the sampler (workers derive their own).
    sampler : {"tpe", "random"} or optuna sampler, default="tpe"
        Sampler; TPE starts with 8 random trials after the model's defaults.
    pruner : {"median", "none"} or optuna pruner, default="median"
        Pruner of unpromising trials, on the held-out NLL reported ten times during
        each fit at 10%, 20%, ... of its steps (the training loss for
        ``objective="elbo"``; the running mean over folds with ``folds``). The median
        pruner starts after five trials and at 30% of a fit.
    level : float, default=0.9
        Interval level of the coverage recorded per trial.
    num_samples : int, default=100
        Posterior draws per prediction.
    device : str, default="auto"
        Fit device.
    progress_bar : bool, default=True
        Optuna's progress bar over trials (one worker only).

    Returns
    -------
    TuningResult

    Raises
    ------
    ValueError
        For an unknown model, objective, split or argument value, a fixed argument the
        model does not take, or a study in the storage made with other settings.

    Notes
    -----
    A new study's first trial is the model's default configuration, so the best trial
    is never worse than the defaults on the validation objective. The NLL pruned on
    during SVI is the held-out NLL of the standardised responses from 8 guide draws;
    for ``rmse`` and ``crps`` it stands in for the final objective. Single-task fits
    (``multitask=False`` over several tasks) report nothing during SVI, so only fold
    pruning applies to them. Trials that fail numerically (a non-finite ELBO, a failed
    Cholesky) are recorded as failed and the study goes on. ``task_scale`` is not
    searched on single-task data, nor ``feature_scale`` without feature tables (they
    cannot change the fit), unless ``space`` names them.
    """
    _check_args(objective, n_trials, timeout, workers, folds, val_fraction, split_kind)
    if not isinstance(data, DrugResponseData):
        raise TypeError(f"data must be a DrugResponseData, got {type(data).__name__}")
    cls = model_class(model)
    name = cls.name if isinstance(model, type) else model
    params, fit = dict(params or {}), dict(fit or {})
    _check_fixed(cls, params, fit)
    model_space, fit_space = _spaces(cls, params, fit, space, tune_fit)
    model_space = _relevant(model_space, data, explicit=set(space or {}))
    if not model_space and not fit_space:
        raise ValueError(f"nothing to tune: every searched setting of {name!r} is fixed")
    train, _ = split(data, split_kind, test_fraction, seed, holdout_task)
    _check_features(cls, train)

    out = Path(out) if out is not None else None
    if out is not None:
        _check_out(out)
    url = resolve_storage_url(storage, out / STUDY_FILE if out is not None else None)
    study_name = study_name or f"{name}-{split_kind}-{objective}"
    settings = {
        "model": name,
        "objective": objective,
        "split": split_kind,
        "test_fraction": test_fraction,
        "holdout_task": holdout_task,
        "validation": f"{folds}-fold" if folds else f"split {val_fraction}",
        "seed": seed,
        "data": _data_fingerprint(data),
        "params": params,
        "fit": fit,
        "space": sorted([*model_space, *fit_space]),
        "cell_pca": cell_pca,
        "drug_pca": drug_pca,
    }
    spec = TrialSpec(
        train=train,
        model=name,
        params=params,
        fit=fit,
        space=model_space,
        fit_space=fit_space,
        objective=objective,
        split=split_kind,
        holdout_task=holdout_task,
        val_fraction=val_fraction,
        folds=folds,
        cell_pca=cell_pca,
        drug_pca=drug_pca,
        level=level,
        num_samples=num_samples,
        seed=seed,
        device=device,
        storage_url=url,
        study_name=study_name,
        sampler=sampler,
        pruner=pruner,
        settings={**settings, "storage": redact(url), "study": study_name},
    )
    created = out is not None and not out.exists()
    try:
        result = _tune(spec, cls, n_trials, timeout, workers, progress_bar, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return result


def _tune(spec, cls, n_trials, timeout, workers, progress_bar, out) -> TuningResult:
    storage = open_storage(spec.storage_url)
    study = optuna.create_study(
        storage=storage, study_name=spec.study_name, direction="minimize", load_if_exists=True
    )
    check_study_settings(
        study, {k: v for k, v in spec.settings.items() if k not in ("storage", "study")}, "study"
    )
    fail_dead_local_trials(study, storage)
    if not study.get_trials(deepcopy=False):
        point = _default_point(cls, spec.space, spec.fit_space)
        study.enqueue_trial(point, user_attrs={"defaults": True})
    before = len(study.get_trials(deepcopy=False))
    logger.info(
        "tuning %s on %d training rows: %s trials, %d worker(s), study %r in %s",
        spec.model,
        spec.train.n_obs,
        n_trials,
        workers,
        spec.study_name,
        redact(spec.storage_url),
    )
    start = time.perf_counter()
    if workers == 1:
        run_trials(spec, 0, n_trials, timeout, progress_bar)
    else:
        run_workers(spec, workers, n_trials, timeout)
    elapsed = time.perf_counter() - start
    study = load_study(spec, open_storage(spec.storage_url))
    n_new = len(study.get_trials(deepcopy=False)) - before
    result = _result(study, spec, out, elapsed, n_new)
    logger.info(
        "tuning done: %d new trial(s) in %.1f s; best %s %.5g (trial %d), defaults %s",
        n_new,
        elapsed,
        spec.objective,
        result.best_value,
        result.best_trial,
        "n/a" if result.default_value is None else f"{result.default_value:.5g}",
    )
    if out is not None:
        write_tuning_outputs(result, out)
    return result


def _relevant(space: dict, data: DrugResponseData, explicit: set[str]) -> dict:
    """Drop dimensions the data cannot inform (unless asked for explicitly).

    ``task_scale`` (spread of the task deviations) does nothing on one task, and
    ``feature_scale`` (feature loadings) nothing without feature tables.
    """
    idle = set()
    if data.n_tasks == 1:
        idle.add("task_scale")
    if data.cell_features is None and data.drug_features is None:
        idle.add("feature_scale")
    dropped = sorted((idle & set(space)) - explicit)
    if dropped:
        logger.info("not searching %s: the data cannot inform them", dropped)
    return {k: v for k, v in space.items() if k not in dropped}


def _check_fixed(cls, params: dict, fit: dict) -> None:
    from mtl4c_prob.inference import SVIConfig

    accepted = model_defaults(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {cls.name!r} takes no argument(s) {unknown}; it takes {sorted(accepted)}"
        )
    cls(**params)  # the constructor checks the values
    bad = sorted(set(fit) - (set(SVIConfig.__dataclass_fields__) - {"callback"}))
    if bad:
        raise ValueError(f"fit setting(s) {bad} are not SVIConfig fields")
    SVIConfig(**{k: v for k, v in fit.items()})


def _check_features(cls, data: DrugResponseData) -> None:
    for kind in ("cell", "drug"):
        if getattr(cls, f"requires_{kind}_features") and getattr(data, f"{kind}_features") is None:
            raise ValueError(f"model {cls.name!r} needs {kind} features; the data have none")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and not names & set(OUTPUT_MARKERS):
            raise DataError(
                f"output folder {out} exists and is not a tuning output folder; "
                "choose another --out"
            )


# ------------------------------------------------------------------------ the CLI
def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` command to the ``mtl4c-prob`` subcommands."""
    from mtl4c_prob import cli

    p = subparsers.add_parser(
        "tune",
        help="Optuna search over a model's priors and fit settings",
        description="Tune a model's priors, rank and fit settings on a validation split "
        "of the training part; writes best_config.toml for `fit --config`.",
    )
    cli._add_data_options(p)
    cli._add_common(p)
    p.add_argument("--trials", type=int, default=20, help="trials to add to the study")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after S s")
    p.add_argument("--storage", default=None, help="database URL or journal file")
    p.add_argument("--study", default=None, help="study name (default MODEL-SPLIT-OBJECTIVE)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, 1 torch thread each")
    p.add_argument("--objective", default="nll", choices=list(OBJECTIVES))
    p.add_argument("--folds", type=int, default=None, help="k-fold validation instead of a split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the validation split")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--pruner", default="median", choices=["median", "none"])
    p.set_defaults(num_samples=100)
    return p


def cmd_tune(args) -> int:
    """Run ``mtl4c-prob tune``."""
    from mtl4c_prob import cli

    if not args.quiet:
        optuna.logging.set_verbosity(optuna.logging.INFO)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    data, _, _ = cli._load_data(args)
    params = cli._model_params(args)
    fit = {"guide": args.guide} if args.guide else {}
    for key in ("steps", "lr", "batch_size"):
        if getattr(args, key):
            fit[key] = getattr(args, key)
    result = tune(
        data,
        args.model,
        n_trials=args.trials,
        timeout=args.timeout,
        objective=args.objective,
        split_kind=args.split,
        test_fraction=args.test_fraction,
        holdout_task=args.holdout_task,
        val_fraction=args.val_fraction,
        folds=args.folds,
        params=params,
        fit=fit,
        cell_pca=args.cell_pca,
        drug_pca=args.drug_pca,
        storage=args.storage,
        study_name=args.study,
        out=args.out,
        workers=args.workers,
        seed=args.seed,
        sampler=args.sampler,
        pruner=args.pruner,
        level=args.level,
        num_samples=args.num_samples,
        device=args.device,
        progress_bar=not args.quiet and sys.stderr.isatty(),
    )
    counts = ", ".join(f"{v} {k}" for k, v in _state_counts(result.study).items())
    default = "" if result.default_value is None else f" (defaults {result.default_value:.4f})"
    best = {**result.best_params, **result.best_fit}
    lines = [
        f"study {result.study.study_name!r}: {result.n_new} new trial(s); {counts}",
        f"best {result.objective} {result.best_value:.4f}{default}, trial {result.best_trial}",
        "best: " + ", ".join(f"{k}={v}" for k, v in best.items()),
        f"outputs in {args.out}",
    ]
    print("\n".join(lines))  # noqa: T201 (command output)
    return 0
