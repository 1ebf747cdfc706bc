"""Cells of an experiment grid as Optuna trials: queueing, claiming, running, recording.

Each (dataset, model, run) cell is a trial of the experiment's study. Cells wait in the
queue (``WAITING``); a worker claims one by moving it to ``RUNNING`` through the
storage, which succeeds for exactly one worker (a row lock in PostgreSQL or MySQL, the
write lock each SQLite transaction takes as it begins, see
:func:`mtl4c_prob._storage.open_storage`, the log order in a journal file), fits and
scores the model, and records the metrics as the trial's user attribute ``result`` with
state ``COMPLETE``. A failed cell is recorded ``FAIL`` with its error and queued again by
the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from mtl4c_prob._storage import open_storage, trial_id, worker_tag
from mtl4c_prob.data import DrugResponseData, prepare_features, split

logger = logging.getLogger(__name__)

__all__ = ["CellSpec", "GridSpec", "cell_key", "claim", "queue_missing", "run_cells"]

#: Levels whose Gaussian-interval coverage makes up the calibration error.
CALIBRATION_LEVELS = np.round(np.arange(0.1, 0.951, 0.05), 2)


@dataclass(frozen=True)
class CellSpec:
    """One cell: a model fitted on one seeded split of one dataset."""

    dataset: str
    model: str
    run: int
    digest: str

    @property
    def key(self) -> str:
        """Identifier of the cell in the study."""
        return cell_key(self.dataset, self.model, self.run)


def cell_key(dataset: str, model: str, run: int) -> str:
    """Return the identifier of a (dataset, model, run) cell."""
    return f"{dataset}|{model}|{run}"


@dataclass
class GridSpec:
    """What a worker needs to run cells (picklable for spawned processes).

    ``datasets`` maps names to dataset settings (dicts with ``split``, ``test_fraction``,
    ``holdout_task``, ``cell_pca``, ``drug_pca`` and either in-memory ``data`` or the
    loader inputs); ``models`` maps labels to ``{"model", "params", "fit"}``.
    """

    name: str
    datasets: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    runs: int
    seed: int
    level: float
    num_samples: int
    device: str
    primary: str
    storage_url: str
    predictions: Path | None
    loader: Callable[[dict[str, Any]], DrugResponseData] | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)

    def cells(self) -> list[CellSpec]:
        """Every cell of the grid, dataset by dataset, run by run, model by model."""
        return [
            CellSpec(d, m, r, self.digest(d, m, r))
            for d in self.datasets
            for r in range(self.runs)
            for m in self.models
        ]

    def digest(self, dataset: str, model: str, run: int) -> str:
        """Hash of everything that determines a cell's result."""
        settings = {k: v for k, v in self.datasets[dataset].items() if k not in ("data",)}
        payload = {
            "dataset": settings,
            "data": self.fingerprints.get(dataset),
            "model": self.models[model],
            "run": run,
            "seed": self.seed,
            "level": self.level,
            "num_samples": self.num_samples,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def _trials(storage, study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_all_trials(study_id, deepcopy=False, states=states)


def queue_missing(study: optuna.Study, storage, spec: GridSpec) -> dict[str, int]:
    """Queue the cells that are neither finished nor queued nor running.

    Returns
    -------
    dict
        Counts of cells ``done``, ``pending`` (queued or running) and ``queued`` now.

    Raises
    ------
    ValueError
        When a finished cell was computed with other settings than the grid's now.
    """
    done, pending = {}, set()
    for t in _trials(storage, study):
        key = t.user_attrs.get("cell")
        if key is None:
            continue
        if t.state == TrialState.COMPLETE:
            done.setdefault(key, t.user_attrs.get("digest"))
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            pending.add(key)
    queued = 0
    for cell in spec.cells():
        if cell.key in done:
            if done[cell.key] != cell.digest:
                raise ValueError(
                    f"experiment {spec.name!r} already has results for model {cell.model!r} "
                    f"on dataset {cell.dataset!r} (run {cell.run}) computed with other "
                    "settings; give the changed model or dataset a new name, or use "
                    "another output folder or storage"
                )
            continue
        if cell.key in pending:
            continue
        attrs = {"cell": cell.key, "dataset": cell.dataset, "model": cell.model}
        study.enqueue_trial({}, user_attrs={**attrs, "run": cell.run, "digest": cell.digest})
        queued += 1
    return {"done": len(done), "pending": len(pending), "queued": queued}


def claim(study: optuna.Study, storage) -> tuple[int, dict] | None:
    """Move the first queued cell to RUNNING for this worker; None when none is left."""
    for _ in range(5):
        try:
            for t in _trials(storage, study, states=(TrialState.WAITING,)):
                if "cell" not in t.user_attrs:
                    continue
                tid = trial_id(storage, study, t.number)
                if storage.set_trial_state_values(tid, TrialState.RUNNING):
                    storage.set_trial_user_attr(tid, "worker", worker_tag())
                    return tid, dict(t.user_attrs)
            return None
        except Exception as exc:  # a locked SQLite file: wait and look again
            if "locked" not in str(exc):
                raise
            time.sleep(1.0)
    raise RuntimeError("the experiment database stayed locked; use fewer workers or PostgreSQL")


class _Heartbeat:
    """Record heartbeats of a running cell, so a crashed worker's cell is failed later."""

    def __init__(self, storage, tid: int) -> None:
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.storage, self.tid, self.interval = storage, tid, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.tid)
            except Exception as exc:  # never let the heartbeat kill the fit
                logger.debug("heartbeat failed: %s", exc)

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.tid)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


def run_cells(spec: GridSpec, worker: int = 0, limit: int | None = None) -> int:
    """Claim and run queued cells until none is left (or ``limit``); returns cells run."""
    storage = open_storage(spec.storage_url)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    cache: dict[str, DrugResponseData] = {}
    count = 0
    while limit is None or count < limit:
        claimed = claim(study, storage)
        if claimed is None:
            break
        tid, attrs = claimed
        count += 1
        logger.info("worker %d: cell %s", worker, attrs["cell"])
        try:
            with _Heartbeat(storage, tid):
                result = _run_cell(spec, attrs, cache)
        except Exception as exc:
            logger.warning("cell %s failed: %s: %s", attrs["cell"], type(exc).__name__, exc)
            storage.set_trial_user_attr(tid, "error", f"{type(exc).__name__}: {exc}")
            storage.set_trial_state_values(tid, TrialState.FAIL)
            continue
        except BaseException:
            storage.set_trial_user_attr(tid, "error", "interrupted")
            storage.set_trial_state_values(tid, TrialState.FAIL)
            raise
        storage.set_trial_user_attr(tid, "result", result)
        value = result["overall"].get(spec.primary, float("nan"))
        storage.set_trial_state_values(tid, TrialState.COMPLETE, values=[_finite(value)])
    return count


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else float("inf")


def spawned_worker(spec: GridSpec, worker: int) -> int:
    """Entry point of a spawned worker process: one torch thread, then run cells."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cells(spec, worker)


def _dataset(spec: GridSpec, name: str, cache: dict) -> DrugResponseData:
    if name not in cache:
        settings = spec.datasets[name]
        if settings.get("data") is not None:
            cache[name] = settings["data"]
        else:
            cache[name] = spec.loader(settings)
    return cache[name]


def _run_cell(spec: GridSpec, attrs: dict, cache: dict) -> dict[str, Any]:
    from mtl4c_prob.models import get_model

    settings = spec.datasets[attrs["dataset"]]
    model_spec = spec.models[attrs["model"]]
    seed = spec.seed + int(attrs["run"])
    data = _dataset(spec, attrs["dataset"], cache)
    train, test = split(
        data, settings["split"], settings["test_fraction"], seed, settings.get("holdout_task")
    )
    if train.cell_features is not None or train.drug_features is not None:
        train, test = prepare_features(
            train, test, cell_pca=settings.get("cell_pca"), drug_pca=settings.get("drug_pca")
        )

    model = get_model(model_spec["model"], **model_spec["params"])
    start = time.perf_counter()
    fit = {"seed": seed, "device": spec.device, "progress_bar": False, **model_spec["fit"]}
    model.fit(train, **fit)
    fit_seconds = time.perf_counter() - start
    pred = model.predict(test, level=spec.level, num_samples=spec.num_samples, seed=seed)
    result = score_predictions(pred, spec.level)
    result["info"] = {
        "fit_seconds": round(fit_seconds, 3),
        "n_train": int(train.n_obs),
        "n_test": int(test.n_obs),
        "steps": int(model.fit_result_.steps),
        "seed": seed,
    }
    if spec.predictions is not None:
        _save_predictions(pred, spec.predictions, attrs)
    return result


def _calibration_error(frame: pd.DataFrame) -> float:
    from mtl4c_prob.evaluation.metrics import coverage_curve

    curve = coverage_curve(frame["y"], frame["mean"], frame["sd"], CALIBRATION_LEVELS)
    return float(np.mean(np.abs(curve["coverage"] - curve["level"])))


def score_predictions(pred: pd.DataFrame, level: float) -> dict[str, Any]:
    """Metrics of one cell: overall and per task, plus per-drug and per-cell-line errors.

    Every scope gets the metrics of :func:`~mtl4c_prob.evaluation.evaluate_frame` and
    ``calibration_error``, the mean absolute gap between the nominal level and the
    coverage of central Gaussian intervals at levels 0.10, 0.15, ..., 0.95.
    """
    from mtl4c_prob.evaluation.metrics import evaluate_frame

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined per-drug correlations on small tasks
        metrics = evaluate_frame(pred, level=level)
    metrics["overall"]["calibration_error"] = _calibration_error(pred)
    for task, sub in pred.groupby("task", sort=True):
        metrics["per_task"][str(task)]["calibration_error"] = _calibration_error(sub)

    err = pred["y"] - pred["mean"]
    z = err / pred["sd"]
    rows = pd.DataFrame(
        {
            "drug": pred["drug"].astype(str),
            "cell": pred["cell"].astype(str),
            "se": err**2,
            "nll": 0.5 * np.log(2 * np.pi) + np.log(pred["sd"]) + 0.5 * z**2,
        }
    )
    for kind in ("drug", "cell"):
        groups = rows.groupby(kind, sort=True)
        table = pd.DataFrame(
            {"n": groups.size(), "rmse": np.sqrt(groups["se"].mean()), "nll": groups["nll"].mean()}
        )
        metrics[f"per_{kind}"] = {
            name: [int(r.n), float(r.rmse), float(r.nll)] for name, r in table.iterrows()
        }
    return json.loads(json.dumps(metrics, default=float))


def _save_predictions(pred: pd.DataFrame, folder: Path, attrs: dict) -> None:
    path = folder / _safe(attrs["dataset"]) / _safe(attrs["model"]) / f"run{attrs['run']}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pred.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
