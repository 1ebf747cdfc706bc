"""Trials of a tuning study: the objective, pruning reports and worker processes."""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution

from mtl4c_prob._spaces import decode, model_class, model_defaults, suggest
from mtl4c_prob._storage import open_storage, worker_tag
from mtl4c_prob.data import DrugResponseData, kfold, prepare_features, split

logger = logging.getLogger(__name__)

__all__ = [
    "TRIAL_ERRORS",
    "Objective",
    "TrialSpec",
    "load_study",
    "run_spawned",
    "run_trials",
    "run_workers",
]

#: Numeric failures that fail one trial instead of the study.
TRIAL_ERRORS = (FloatingPointError, torch.linalg.LinAlgError)


@dataclass
class TrialSpec:
    """Everything a worker needs to run trials (picklable for spawned processes)."""

    train: DrugResponseData
    model: str
    params: dict[str, Any]
    fit: dict[str, Any]
    space: dict[str, BaseDistribution]
    fit_space: dict[str, BaseDistribution]
    objective: str
    split: str
    holdout_task: str | None
    val_fraction: float
    folds: int | None
    cell_pca: int | None
    drug_pca: int | None
    level: float
    num_samples: int
    seed: int
    device: str
    storage_url: str
    study_name: str
    sampler: Any
    pruner: Any
    settings: dict[str, Any] = field(default_factory=dict)


def _validation_sets(spec: TrialSpec) -> list[tuple[DrugResponseData, DrugResponseData]]:
    if spec.folds:
        sets = list(kfold(spec.train, spec.split, spec.folds, spec.seed + 1, spec.holdout_task))
    else:
        sets = [split(spec.train, spec.split, spec.val_fraction, spec.seed + 1, spec.holdout_task)]
    out = []
    for tr, va in sets:
        if tr.cell_features is not None or tr.drug_features is not None:
            tr, va = prepare_features(tr, va, cell_pca=spec.cell_pca, drug_pca=spec.drug_pca)
        out.append((tr, va))
    return out


class _Reporter:
    """SVI callback: reports the intermediate objective to Optuna and prunes.

    Values are reported at the percentage of the fit done (10, 20, ..., 100 with the
    default evaluation grid), so that trials with different step counts, whose learning
    rates decay over their own length, are compared at the same stage.
    """

    def __init__(self, trial: optuna.Trial, objective: str, eval_every: int, steps: int) -> None:
        self.trial, self.objective = trial, objective
        self.eval_every, self.steps = eval_every, steps
        self.window: list[float] = []

    def __call__(self, step: int, loss: float, val_loss: float | None) -> None:
        if self.objective == "elbo":
            self.window.append(loss)
            if step % self.eval_every:
                return
            value = sum(self.window) / len(self.window)
            self.window.clear()
        elif val_loss is None:
            return
        else:
            value = val_loss
        percent = round(100 * step / self.steps)
        self.trial.report(value, percent)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {percent}% of the fit (value {value:.4f})")


class Objective:
    """Fit on each validation set, score the held-out rows, return the mean score."""

    def __init__(self, spec: TrialSpec) -> None:
        from mtl4c_prob.inference import SVIConfig

        self.spec = spec
        self.sets = _validation_sets(spec)
        self.cls = model_class(spec.model)
        self.defaults = model_defaults(self.cls)
        self.default_steps = int(self.cls.fit_defaults.get("steps", SVIConfig.steps))
        n_tasks = spec.train.n_tasks
        self.per_task = spec.params.get("multitask") is False and n_tasks > 1

    def __call__(self, trial: optuna.Trial) -> float:
        from mtl4c_prob.models import get_model

        spec = self.spec
        trial.set_user_attr("worker", worker_tag())
        values = suggest(trial, spec.space)
        params = {**{k: decode(self.defaults, k, v) for k, v in values.items()}, **spec.params}
        fit = {**suggest(trial, spec.fit_space), **spec.fit}
        steps = int(fit.get("steps", self.default_steps))
        # Ten held-out evaluations per fit unless the caller fixed the grid.
        fit.setdefault("eval_every", max(1, steps // 10))

        scores, rows = [], []
        start = time.perf_counter()
        for fold, (train, val) in enumerate(self.sets):
            model = get_model(spec.model, **params)
            reporter = None
            if len(self.sets) == 1 and not self.per_task:
                reporter = _Reporter(trial, spec.objective, fit["eval_every"], steps)
            model.fit(
                train,
                val,
                **{"seed": spec.seed, "device": spec.device, "progress_bar": False, **fit},
                callback=reporter,
            )
            score, metrics = self._score(model, val)
            scores.append(score)
            rows.append(metrics)
            if len(self.sets) > 1:
                trial.report(float(np.mean(scores)), fold)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {fold + 1}")

        metrics = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        metrics["fit_seconds"] = round(time.perf_counter() - start, 3)
        trial.set_user_attr("metrics", metrics)
        return float(np.mean(scores))

    def _score(self, model, val: DrugResponseData) -> tuple[float, dict[str, float]]:
        from mtl4c_prob.evaluation.metrics import evaluate

        losses = model.fit_result_.losses
        elbo = float(np.mean(losses[-max(1, len(losses) // 10) :]))
        pred = model.predict(
            val, level=self.spec.level, num_samples=self.spec.num_samples, seed=self.spec.seed
        )
        columns = {c: pred[c].to_numpy(float) for c in ("y", "mean", "sd", "lower", "upper")}
        overall = evaluate(**columns, level=self.spec.level)
        cov = next(k for k in overall if k.startswith("coverage_"))
        metrics = {
            "val_nll": overall["nll"],
            "val_rmse": overall["rmse"],
            "val_crps": overall["crps"],
            f"val_{cov}": overall[cov],
            "train_elbo": elbo,
        }
        score = elbo if self.spec.objective == "elbo" else metrics[f"val_{self.spec.objective}"]
        return float(score), metrics


def _make_sampler(sampler: Any, seed: int) -> optuna.samplers.BaseSampler:
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {sampler!r}; use 'tpe', 'random' or an optuna sampler")


def _make_pruner(pruner: Any, spec: TrialSpec) -> optuna.pruners.BasePruner:
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner in ("none", None):
        return optuna.pruners.NopPruner()
    if pruner == "median":
        # Not before 30% of a fit (reports are percentages of the fit done): early
        # losses say little about the end. Folds are pruned from the first one on.
        warmup = 0 if spec.folds else 30
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    raise ValueError(f"unknown pruner {pruner!r}; use 'median', 'none' or an optuna pruner")


def load_study(spec: TrialSpec, storage, sampler=None, pruner=None) -> optuna.Study:
    return optuna.load_study(
        study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner
    )


def run_trials(
    spec: TrialSpec, worker: int, n_trials: int, timeout: float | None, bar: bool
) -> int:
    """Run ``n_trials`` trials of the study in this process; returns the trials run."""
    storage = open_storage(spec.storage_url)
    existing = len(load_study(spec, storage).trials)
    seed = int(np.random.SeedSequence([spec.seed, worker, existing]).generate_state(1)[0])
    study = load_study(
        spec, storage, _make_sampler(spec.sampler, seed), _make_pruner(spec.pruner, spec)
    )
    before = len(study.trials)
    study.optimize(
        Objective(spec),
        n_trials=n_trials,
        timeout=timeout,
        catch=TRIAL_ERRORS,
        show_progress_bar=bar,
    )
    return len(study.trials) - before


def _worker_main(spec: TrialSpec, worker: int, n_trials: int, timeout: float | None) -> int:
    """Entry point of a spawned worker: one torch thread, then its share of the trials."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return run_trials(spec, worker, n_trials, timeout, bar=False)


def run_workers(spec: TrialSpec, workers: int, n_trials: int, timeout: float | None) -> None:
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    run_spawned(
        _worker_main, [(spec, i, share, timeout) for i, share in enumerate(shares) if share]
    )


def run_spawned(target, arguments: list[tuple]) -> list:
    """Run ``target(*args)`` for each tuple in its own spawned process; return the results.

    The first worker's exception is raised here (after the others are stopped).
    """
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(len(arguments))
    try:
        jobs = [pool.apply_async(target, args) for args in arguments]
        results = [job.get() for job in jobs]
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return results
