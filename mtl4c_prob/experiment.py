"""Experiments: several datasets and models, each over n seeded runs, with a report.

The counterpart of the seed's ``ModelTraining``. An :class:`Experiment` is a grid of
(dataset, model, run) cells. Run ``r`` of a dataset splits it afresh with seed
``seed + r`` (leave pairs, cells or drugs out, or hold out a task), the same split for
every model, so that models can be compared run by run. Each cell fits, predicts the
held-out rows and scores them (accuracy, ranking and calibration metrics, overall and per
task, plus per-drug and per-cell-line errors).

Cells are trials of an Optuna study in a storage (SQLite file in the output folder by
default, or any database URL), which makes an experiment resumable (finished cells are
skipped) and shareable: several workers, on one host or many, claim cells from the same
queue. The results come out as a tidy table (``results.parquet``, ``results.csv``), a
JSON summary with rankings, and ``report.html``.

A configuration file (``mtl4c-prob experiment CONFIG.toml``) looks like::

    name = "gdsc2-three-models"
    runs = 3

    [[datasets]]
    name = "GDSC2"
    files = ["../shared/data/GDSC2_IC50.csv"]
    split = "lpo"

    [[models]]
    name = "mf"
    params = {rank = 50}

    [[models]]
    name = "mf-single"
    model = "mf"
    single_task = true

    [[models]]
    name = "mf-tuned"
    config = "tuned/best_config.toml"

Relative paths are read from the configuration file's folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from mtl4c_prob._cells import GridSpec, cell_key, queue_missing, run_cells, spawned_worker
from mtl4c_prob._experiment_config import (
    SPLIT_KEYS,
    dataset_settings,
    load_dataset,
    model_settings,
    read_experiment_config,
)
from mtl4c_prob._storage import fail_dead_local_trials, open_storage, redact, resolve_storage_url
from mtl4c_prob._trials import run_spawned
from mtl4c_prob.data import DrugResponseData

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "ModelTraining", "add_experiment_parser", "cmd_experiment", "load_dataset"]

STUDY_FILE = "experiment.db"


def _fingerprint(data: DrugResponseData) -> str:
    from mtl4c_prob.tuning import _data_fingerprint

    return _data_fingerprint(data)


class Experiment:
    """A grid of datasets x models x runs, fitted, scored and reported.

    Status: experimental.

    Parameters
    ----------
    name : str
        Experiment name (the study name in the storage).
    datasets : dict
        Name -> :class:`~mtl4c_prob.data.DrugResponseData`, or a dict of settings: the
        data (``data``, or ``files``/``synthetic`` as in :func:`load_dataset`) and
        optional ``split``, ``test_fraction``, ``holdout_task``, ``cell_pca``,
        ``drug_pca`` overriding the experiment's.
    models : dict or sequence
        Label -> registered model name, fitted model instance (its settings are used),
        or dict with ``model`` (default: the label), ``params``, ``fit`` and
        ``single_task``. A sequence of names or instances is labelled by their names.
    out : str or path
        Output folder (results, predictions, report, and the default SQLite storage).
    runs : int, default=3
        Seeded splits per dataset.
    split : {"lpo", "lco", "ldo", "task"}, default="lpo"
        Default split of the datasets.
    test_fraction : float, default=0.2
        Default held-out share.
    holdout_task : str, optional
        Task held out by ``split="task"``.
    seed : int, default=0
        Run ``r`` splits, fits and predicts with seed ``seed + r``.
    level : float, default=0.9
        Interval level of the coverage metrics.
    num_samples : int, default=200
        Posterior draws per prediction.
    primary : str, default="nll"
        Metric the report ranks models on (also each trial's value in the study).
    storage : str or path, optional
        Database URL, journal file or SQLite file; default ``experiment.db`` in ``out``.
    device : str, default="auto"
        Fit device.
    """

    def __init__(
        self,
        name: str,
        datasets: Mapping[str, Any],
        models: Mapping[str, Any] | Sequence[Any],
        out: str | os.PathLike[str],
        *,
        runs: int = 3,
        split: str = "lpo",
        test_fraction: float = 0.2,
        holdout_task: str | None = None,
        seed: int = 0,
        level: float = 0.9,
        num_samples: int = 200,
        primary: str = "nll",
        storage: str | os.PathLike[str] | None = None,
        device: str = "auto",
    ) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if int(runs) < 1:
            raise ValueError(f"runs must be at least 1, got {runs}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.name, self.out, self.runs, self.seed = name, Path(out), int(runs), int(seed)
        self.level, self.num_samples, self.primary, self.device = (
            level,
            int(num_samples),
            primary,
            device,
        )
        defaults = {"split": split, "test_fraction": test_fraction, "holdout_task": holdout_task}
        self.datasets = {str(k): dataset_settings(k, v, defaults) for k, v in datasets.items()}
        self.models = model_settings(models)
        if not self.datasets or not self.models:
            raise ValueError("an experiment needs at least one dataset and one model")
        self.storage_url = resolve_storage_url(storage, self.out / STUDY_FILE)
        self._check_models()

    # ---------------------------------------------------------------- config file
    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str],
        *,
        out: str | os.PathLike[str] | None = None,
        storage: str | None = None,
        device: str | None = None,
    ) -> Experiment:
        """Build an experiment from a TOML file (layout in the module docstring).

        ``out``, ``storage`` and ``device`` override the file's values.

        Raises
        ------
        DataError
            For unknown keys, missing names or a missing ``datasets``/``models`` list.
        """
        kwargs = read_experiment_config(path)
        if out is not None:
            kwargs["out"] = out
        if storage is not None:
            kwargs["storage"] = storage
        if device is not None:
            kwargs["device"] = device
        return cls(**kwargs)

    # ----------------------------------------------------------------------- run
    def _check_models(self) -> None:
        from mtl4c_prob._spaces import model_class

        for label, spec in self.models.items():
            cls = model_class(spec["model"])
            try:
                cls(**spec["params"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model {label!r}: {exc}") from exc

    def _grid(self) -> GridSpec:
        return GridSpec(
            name=self.name,
            datasets=self.datasets,
            models=self.models,
            runs=self.runs,
            seed=self.seed,
            level=self.level,
            num_samples=self.num_samples,
            device=self.device,
            primary=self.primary,
            storage_url=self.storage_url,
            predictions=self.out / "predictions",
            loader=load_dataset,
        )

    def _load_all(self, grid: GridSpec) -> None:
        """Load every dataset once: fingerprints for the cell hashes, feature checks."""
        from mtl4c_prob._spaces import model_class

        for name, settings in self.datasets.items():
            data = settings.get("data")
            if data is None:
                data = load_dataset({**settings, "name": name})
            grid.fingerprints[name] = _fingerprint(data)
            for label, spec in self.models.items():
                cls = model_class(spec["model"])
                for kind in ("cell", "drug"):
                    needs = getattr(cls, f"requires_{kind}_features")
                    if needs and getattr(data, f"{kind}_features") is None:
                        raise ValueError(
                            f"model {label!r} needs {kind} features; dataset {name!r} has none"
                            f" (add {kind}_features to its entry)"
                        )
            if settings["split"] == "task":
                task = settings.get("holdout_task")
                if task is not None and task not in data.tasks:
                    raise ValueError(
                        f"dataset {name!r}: holdout_task {task!r} is not among {list(data.tasks)}"
                    )

    def run(self, workers: int = 1) -> pd.DataFrame:
        """Run every unfinished cell, then write the results and the report.

        Parameters
        ----------
        workers : int, default=1
            Worker processes (spawned, one torch thread each); 1 runs the cells in this
            process. Workers started elsewhere (``mtl4c-prob experiment`` on another
            host with the same ``--storage``) share the queue.

        Returns
        -------
        DataFrame
            The tidy results table (every finished cell so far).

        Warns
        -----
        UserWarning
            Through the log, for each cell that failed (it is queued again next run).
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        grid = self._grid()
        self._load_all(grid)
        self.out.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.storage_url)
        study = optuna.create_study(
            storage=storage, study_name=self.name, direction="minimize", load_if_exists=True
        )
        fail_dead_local_trials(study, storage)
        if getattr(storage, "get_heartbeat_interval", lambda: None)():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        counts = queue_missing(study, storage, grid)
        logger.info(
            "experiment %r: %d cells done, %d queued now, %d pending elsewhere; %d worker(s)",
            self.name,
            counts["done"],
            counts["queued"],
            counts["pending"],
            workers,
        )
        start = time.perf_counter()
        if workers == 1:
            run_cells(grid)
        else:
            run_spawned(spawned_worker, [(grid, i) for i in range(workers)])
        self.elapsed_ = time.perf_counter() - start
        self.write_outputs()
        return self.results()

    # ------------------------------------------------------------------- results
    def _finished(self) -> list[optuna.trial.FrozenTrial]:
        """Return the first completed trial of every cell of this grid."""
        storage = open_storage(self.storage_url)
        try:
            study = optuna.load_study(study_name=self.name, storage=storage)
        except KeyError as exc:
            raise ValueError(
                f"experiment {self.name!r} has not run yet (no study in {redact(self.storage_url)})"
            ) from exc
        wanted = {
            cell_key(d, m, r) for d in self.datasets for m in self.models for r in range(self.runs)
        }
        seen, out = set(), []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = t.user_attrs.get("cell")
            if key in wanted and key not in seen and "result" in t.user_attrs:
                seen.add(key)
                out.append(t)
        return out

    def failed(self) -> pd.DataFrame:
        """Cells whose last attempt failed and that have no result: dataset, model, run, error."""
        storage = open_storage(self.storage_url)
        study = optuna.load_study(study_name=self.name, storage=storage)
        done = {t.user_attrs.get("cell") for t in self._finished()}
        rows = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            a = t.user_attrs
            if a.get("cell") and a["cell"] not in done:
                rows[a["cell"]] = (a["dataset"], a["model"], a["run"], a.get("error", ""))
        return pd.DataFrame(list(rows.values()), columns=["dataset", "model", "run", "error"])

    def results(self) -> pd.DataFrame:
        """Tidy results: one row per dataset, model, run, scope (overall or task) and metric.

        Columns ``experiment``, ``dataset``, ``model``, ``run``, ``seed``, ``scope``,
        ``metric`` and ``value``; scope ``overall`` also carries ``fit_seconds``,
        ``n_train`` and ``n_test``.
        """
        rows = []
        for t in self._finished():
            a, result = t.user_attrs, t.user_attrs["result"]
            base = (self.name, a["dataset"], a["model"], int(a["run"]), result["info"]["seed"])
            scopes = {"overall": result["overall"], **result["per_task"]}
            for scope, metrics in scopes.items():
                for metric, value in metrics.items():
                    rows.append((*base, scope, metric, value))
            for key in ("fit_seconds", "n_train", "n_test"):
                rows.append((*base, "overall", key, result["info"][key]))
        columns = ["experiment", "dataset", "model", "run", "seed", "scope", "metric", "value"]
        frame = pd.DataFrame(rows, columns=columns)
        frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
        return frame.sort_values(["dataset", "model", "run", "scope", "metric"], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Mean, sd and runs of every overall metric per dataset and model."""
        frame = self.results()
        frame = frame[frame["scope"] == "overall"]
        grouped = frame.groupby(["dataset", "model", "metric"], sort=False)["value"]
        return grouped.agg(["mean", "std", "count"]).rename(columns={"std": "sd", "count": "runs"})

    def ranking(self, dataset: str, metric: str | None = None) -> pd.DataFrame:
        """Models of one dataset ranked on ``metric`` (default: the primary) with paired tests."""
        from mtl4c_prob.evaluation.experiment_report import rank_models

        return rank_models(self.results(), dataset, metric or self.primary)

    def write_outputs(self) -> None:
        """Write ``results.parquet``, ``results.csv``, ``results.json`` and ``report.html``."""
        from mtl4c_prob.evaluation.experiment_report import rank_models

        results = self.results()
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic(self.out / "results.parquet", lambda p: results.to_parquet(p, index=False))
        _atomic(self.out / "results.csv", lambda p: results.to_csv(p, index=False))
        summary = self.summary().reset_index()
        ranking = {}
        for dataset in pd.unique(results["dataset"]):
            table = rank_models(results, dataset, self.primary)
            ranking[dataset] = table.reset_index().to_dict(orient="records")
        document = {
            "experiment": self.name,
            "settings": self._settings(),
            "cells": {
                "finished": int(results[["dataset", "model", "run"]].drop_duplicates().shape[0]),
                "failed": len(self.failed()),
            },  # fmt: skip
            "summary": summary.to_dict(orient="records"),
            "ranking": ranking,
        }
        _atomic(
            self.out / "results.json",
            lambda p: p.write_text(json.dumps(document, indent=1, default=_json)),
        )
        if not results.empty:
            self.generate_report()

    def generate_report(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the self-contained HTML report (default ``report.html`` in ``out``)."""
        from mtl4c_prob.evaluation.experiment_report import experiment_sections
        from mtl4c_prob.evaluation.report import render_report
        from mtl4c_prob.evaluation.study_report import _atomic_bytes

        results = self.results()
        per_drug, per_cell = {}, {}
        for t in self._finished():
            a = t.user_attrs
            key = (a["dataset"], a["model"], int(a["run"]))
            per_drug[key], per_cell[key] = a["result"]["per_drug"], a["result"]["per_cell"]
        summary = {
            **self._settings(),
            "finished cells": len(per_drug),
            "failed cells": len(self.failed()),
        }
        sections = experiment_sections(
            results, per_drug, per_cell, primary=self.primary, summary=summary
        )
        text = render_report(sections, title=f"mtl4c-prob experiment: {self.name}")
        path = Path(path) if path is not None else self.out / "report.html"
        _atomic_bytes(path, text.encode("utf-8"))
        logger.info("wrote experiment report %s", path)
        return path

    def _settings(self) -> dict[str, Any]:
        datasets = {
            name: ", ".join(f"{k}={s.get(k)}" for k in SPLIT_KEYS if s.get(k) is not None)
            for name, s in self.datasets.items()
        }
        models = {
            label: f"{m['model']} {m['params'] or ''} {m['fit'] or ''}".strip()
            for label, m in self.models.items()
        }
        return {
            "name": self.name,
            "runs": self.runs,
            "seed": self.seed,
            "level": self.level,
            "num_samples": self.num_samples,
            "primary": self.primary,
            "storage": redact(self.storage_url),
            **{f"dataset {k}": v for k, v in datasets.items()},
            **{f"model {k}": v for k, v in models.items()},
        }


def _json(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ModelTraining:
    """The seed's experiment runner: ``ModelTraining(folder).execute(...)``, then a report.

    Status: experimental.

    Parameters
    ----------
    exp_folder : str or path
        Output folder; its name names the experiment.
    """

    def __init__(self, exp_folder: str | os.PathLike[str]) -> None:
        self.folder = Path(exp_folder)
        self.experiment: Experiment | None = None

    def execute(
        self,
        dataset: DrugResponseData | Mapping[str, DrugResponseData],
        methods: Sequence[Any],
        metrics: Sequence[str] | None = None,
        nruns: int = 1,
        fit: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Fit every method ``nruns`` times on fresh seeded splits of the dataset(s).

        ``methods`` are model instances or registered names; ``fit`` holds SVI settings
        for all of them (``steps``, ``lr``, ...; default: each model's own) and
        ``options`` go to :class:`Experiment` (``split``, ``seed``, ``level``, ...).
        Returns the overall results, one row per method and run, with the ``metrics``
        asked for as columns (all of them by default).
        """
        datasets = dataset if isinstance(dataset, Mapping) else {"data": dataset}
        if fit:
            labelled = model_settings(methods)
            methods = {k: {**v, "fit": {**v["fit"], **fit}} for k, v in labelled.items()}
        name = self.folder.name or "experiment"
        self.experiment = Experiment(name, datasets, methods, self.folder, runs=nruns, **options)
        frame = self.experiment.run()
        frame = frame[frame["scope"] == "overall"]
        wide = frame.pivot_table(
            index=["dataset", "model", "run"], columns="metric", values="value"
        )
        aliases = {"explained_variance_score": "explained_variance", "mse": "rmse"}
        if metrics:
            wanted = [aliases.get(m, m) for m in metrics]
            missing = sorted(set(wanted) - set(wide.columns))
            if missing:
                raise KeyError(f"unknown metric(s) {missing}; available: {sorted(wide.columns)}")
            wide = wide[wanted]
        return wide.reset_index()

    def generate_report(self) -> Path:
        """Write the experiment's report; returns its path."""
        if self.experiment is None:
            raise RuntimeError("call execute() before generate_report()")
        return self.experiment.generate_report()


# ------------------------------------------------------------------------ the CLI
def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``experiment`` command to the ``mtl4c-prob`` subcommands."""
    p = subparsers.add_parser(
        "experiment",
        help="datasets x models x seeded runs from a TOML file, results table and report",
        description="Run (or resume) the experiment a TOML file describes; finished cells "
        "are skipped, and workers sharing --storage split the rest.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG.toml")
    p.add_argument("--out", type=Path, default=None, help="output folder (default from the file)")
    p.add_argument("--storage", default=None, help="database URL or journal file")
    p.add_argument("--workers", type=int, default=1, help="worker processes, 1 torch thread each")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--report-only", action="store_true", help="rewrite results and report only")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def cmd_experiment(args) -> int:
    """Run ``mtl4c-prob experiment``."""
    quiet = optuna.logging.WARNING if args.quiet else optuna.logging.INFO
    optuna.logging.set_verbosity(quiet)
    exp = Experiment.from_config(
        args.config, out=args.out, storage=args.storage, device=args.device
    )
    start = time.perf_counter()
    if args.report_only:
        exp.write_outputs()
    else:
        exp.run(workers=args.workers)
    failed = exp.failed()
    summary = exp.summary()
    lines = [f"experiment {exp.name!r}: {time.perf_counter() - start:.1f} s"]
    keys = [exp.primary, "rmse", "coverage_90", "calibration_error"]
    for (dataset, model), group in summary.groupby(level=[0, 1], sort=False):
        values = group.droplevel([0, 1])["mean"]
        text = ", ".join(f"{k} {values[k]:.4f}" for k in dict.fromkeys(keys) if k in values)
        lines.append(f"  {dataset} / {model}: {text} ({int(group['runs'].max())} runs)")
    if len(failed):
        lines.append(
            f"{len(failed)} cell(s) failed (queued again next run), e.g. {failed.iloc[0].to_dict()}"
        )
    lines.append(f"outputs in {exp.out}")
    print("\n".join(lines))  # noqa: T201 (command output)
    return 1 if len(failed) else 0
