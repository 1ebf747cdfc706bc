"""The model protocol: fit by SVI, predict distributions, save and load."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyro
import pyro.infer.autoguide as autoguide
import torch
from pyro import poutine
from scipy.stats import norm

from mtl4c_prob import __version__
from mtl4c_prob.data import DrugResponseData, TaskScaler, TensorData, harmonise_key
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.inference import (
    FitResult,
    SVIConfig,
    fit_svi,
    local_params,
    make_guide,
    predictive_summary,
    resolve_device,
)

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FILE", "ProbabilisticModel"]

MODEL_FILE = "model.json"


class ProbabilisticModel:
    """Base class of every mtl4c_prob model.

    Status: stable.

    A subclass declares its priors as ``__init__`` arguments (stored under the same names),
    and implements :meth:`model`, a Pyro program over a :class:`~mtl4c_prob.data.TensorData`
    batch whose likelihood site is ``"obs"`` and which records the Gaussian predictive
    moments of each row as deterministic sites ``"loc"`` and ``"scale"`` when it has them.
    The base class supplies everything else: per-task standardisation, feature alignment,
    SVI through :func:`~mtl4c_prob.inference.fit_svi`, predictive summaries in input units,
    prediction for unseen cells and drugs through their features, one copy per task when
    ``multitask=False``, and save/load.

    Parameters
    ----------
    multitask : bool, default=True
        Fit all tasks jointly; False fits one copy of the model per task.
    """

    name: ClassVar[str] = "base"
    #: SVI settings this model fits well with, used where the caller gives none.
    fit_defaults: ClassVar[dict[str, Any]] = {}
    #: Whether the model cannot run without cell (or drug) features.
    requires_cell_features: ClassVar[bool] = False
    requires_drug_features: ClassVar[bool] = False
    #: Search space of ``mtl4c-prob tune`` over constructor arguments: name -> dimension,
    #: ``("float", low, high[, "log"])``, ``("int", low, high[, "log"])`` or
    #: ``("categorical", choices)``. None: read from the signature (prior scales, ranks).
    search_space: ClassVar[dict[str, tuple] | None] = None
    #: Search space over SVI settings (None: ``lr`` and ``steps`` around ``fit_defaults``).
    fit_search_space: ClassVar[dict[str, tuple] | None] = None

    def __init__(self, *, multitask: bool = True) -> None:
        self.multitask = multitask

    # ----------------------------------------------------------- subclass hooks
    def model(self, data: TensorData, subsample_size: int | None = None) -> None:
        """Run the Pyro program over ``data``; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement model(data, subsample)")

    def pointwise_model(self, data: TensorData) -> None:
        """Run the Pyro program with one ``obs`` value per row of ``data``.

        The exports' pointwise log-likelihoods (LOO, WAIC) replay this program. It is
        :meth:`model` unless the model's likelihood couples rows (gp-full's per-pair
        multivariate normal), where it records each row's marginal instead.
        """
        self.model(data)

    def init_loc_fn(self, site: dict) -> torch.Tensor:
        """Return the initial value of a latent site for the autoguides (default: prior median)."""
        return autoguide.init_to_median(site)

    def _setup(self, train: DrugResponseData, device: torch.device) -> None:
        """Fit-time state beyond the base class (networks, neighbour lists); optional hook.

        Runs after code spaces, scaling and features are fixed (:meth:`_prepare`), before
        the guide is built. Whatever it creates must be returned by
        :meth:`_get_fitted_state` so that :meth:`load` can restore it.
        """

    def _get_fitted_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON-ready state and named tensors that :meth:`save` must keep; optional hook."""
        return {}, {}

    def _set_fitted_state(
        self, state: dict, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        """Inverse of :meth:`_get_fitted_state`, called by :meth:`load`; optional hook."""

    def _use_cell_features(self) -> bool:
        return self.requires_cell_features

    def _use_drug_features(self) -> bool:
        return self.requires_drug_features

    # ------------------------------------------------------------------ params
    def get_params(self) -> dict[str, Any]:
        """Return the constructor arguments (priors and settings) of this model."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def _clone(self, **overrides: Any) -> ProbabilisticModel:
        return type(self)(**{**self.get_params(), **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return hasattr(self, "fit_result_")

    # --------------------------------------------------------------------- fit
    def fit(
        self,
        train: DrugResponseData,
        val: DrugResponseData | None = None,
        config: SVIConfig | None = None,
        **config_kwargs: Any,
    ) -> ProbabilisticModel:
        """Fit the model to ``train`` by SVI.

        Parameters
        ----------
        train : DrugResponseData
            Training rows (with feature tables when the model uses them).
        val : DrugResponseData, optional
            Held-out rows for ``early_stopping="heldout"``.
        config : SVIConfig, optional
            Optimisation settings; keyword arguments override its fields.

        Returns
        -------
        self
        """
        if not isinstance(train, DrugResponseData):
            raise TypeError(f"train must be a DrugResponseData, got {type(train).__name__}")
        if train.n_obs == 0:
            raise DataError("the training data has no rows")
        if config is not None:
            config = dataclasses.replace(config, **config_kwargs)
        else:
            config = SVIConfig(**{**self.fit_defaults, **config_kwargs})
        empty = [t for t in train.tasks if not (train.frame["task"] == t).any()]
        if empty:
            raise DataError(f"task(s) {empty} have no training rows")
        if not self.multitask and train.n_tasks > 1:
            return self._fit_per_task(train, val, config)
        with local_params():
            self._fit_joint(train, val, config)
        return self

    def _fit_per_task(self, train, val, config) -> ProbabilisticModel:
        self.task_models_ = {}
        results = []
        for name in train.tasks:
            sub = _single_task(train, name)
            sub_val = _single_task(val, name) if val is not None else None
            if sub_val is not None and sub_val.n_obs == 0:
                sub_val = None
            cfg = (
                config
                if sub_val is not None or config.early_stopping != "heldout"
                else dataclasses.replace(config, early_stopping="none")
            )
            logger.info("single-task fit of task %r (%d rows)", name, sub.n_obs)
            self.task_models_[name] = self._clone(multitask=True).fit(sub, sub_val, cfg)
            results.append(self.task_models_[name].fit_result_)
        self.tasks_ = train.tasks
        self.fit_result_ = _merge_results(results)
        return self

    def _fit_joint(self, train, val, config) -> None:
        self._prepare(train)
        device = resolve_device(config.device)
        self.device_ = device
        self._setup(train, device)
        data = self._tensors(train, device, with_y=True)
        val_data = self._tensors(val, device, with_y=True) if val is not None else None
        self.guide_ = self._make_guide(config)
        self.fit_result_ = fit_svi(self.model, self.guide_, data, config, val_data)

    def _make_guide(self, config: SVIConfig):
        self.guide_name_ = config.guide if isinstance(config.guide, str) else "custom"
        return make_guide(
            config.guide, self.model, self.init_loc_fn, config.guide_rank, config.init_scale
        )

    def _rebuild_guide(self, name: str):
        """Guide of a loaded model, before its saved parameters are put back.

        ``name`` is the guide name recorded at fit time. Models with their own guide
        (overriding :meth:`_make_guide`) override this too.
        """
        self.guide_name_ = name
        settings = self.fit_result_.settings
        return make_guide(
            name,
            self.model,
            self.init_loc_fn,
            rank=settings.get("guide_rank", 10),
            init_scale=settings.get("init_scale", 0.005),
        )

    def _prepare(self, train: DrugResponseData) -> None:
        """Fix code spaces, standardisation, features and seen masks from the training rows."""
        self.tasks_, self.cells_, self.drugs_ = train.tasks, train.cells, train.drugs
        self.n_tasks_, self.n_cells_, self.n_drugs_ = train.n_tasks, train.n_cells, train.n_drugs
        self.scaler_ = train.task_scaler()
        self._seen_cache = {}
        self.seen_cells_ = np.bincount(train.codes("cell"), minlength=self.n_cells_) > 0
        self.seen_drugs_ = np.bincount(train.codes("drug"), minlength=self.n_drugs_) > 0
        self.cell_table_ = self._feature_table(train.cell_features, "cell")
        self.drug_table_ = self._feature_table(train.drug_features, "drug")

    def _feature_table(self, table: pd.DataFrame | None, kind: str) -> pd.DataFrame | None:
        wanted = self._use_cell_features() if kind == "cell" else self._use_drug_features()
        if not wanted:
            return None
        if table is None:
            option = "--cell-features" if kind == "cell" else "--drug-features"
            raise ValueError(
                f"model {self.name!r} needs {kind} features; pass {kind}_features to the data "
                f"loader (command line: {option} FILE)"
            )
        names = self.cells_ if kind == "cell" else self.drugs_
        missing = int((~names.isin(table.index)).sum())
        if missing:
            logger.warning(
                "%d of %d %ss have no feature row; their features are set to the training mean",
                missing,
                len(names),
                kind,
            )
        return table

    # ----------------------------------------------------------------- tensors
    def _codes(self, frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
        """Task, cell and drug codes of a pairs table; unseen entities get extended codes."""
        for col in ("task", "cell", "drug"):
            if col not in frame.columns:
                raise DataError(f"pairs table lacks column {col!r}; it has {list(frame.columns)}")
        task = self.tasks_.get_indexer(frame["task"].astype(str))
        if (task < 0).any():
            bad = frame["task"].astype(str)[task < 0].iloc[0]
            raise KeyError(f"unknown task {bad!r}; the model knows {list(self.tasks_)}")
        cell, extra_cells = _extend(
            self.cells_, frame["cell"].astype(str), self.cell_table_, "cell"
        )
        drug, extra_drugs = _extend(
            self.drugs_, frame["drug"].astype(str), self.drug_table_, "drug"
        )
        return task, cell, drug, extra_cells, extra_drugs

    def _tensors(
        self,
        data: DrugResponseData | pd.DataFrame,
        device: torch.device,
        with_y: bool,
    ) -> TensorData:
        frame = data.frame if isinstance(data, DrugResponseData) else data
        task, cell, drug, extra_cells, extra_drugs = self._codes(frame)
        y = censor = None
        if with_y:
            y_np = self.scaler_.transform(frame["y"].to_numpy(float), task)
            y = torch.as_tensor(y_np, dtype=torch.float32, device=device)
            if "censor" in frame.columns and (frame["censor"] != 0).any():
                censor = torch.as_tensor(
                    frame["censor"].to_numpy(float), dtype=torch.float32, device=device
                )
        cell_x = _matrix(self.cell_table_, list(self.cells_) + extra_cells, device)
        drug_x = _matrix(self.drug_table_, list(self.drugs_) + extra_drugs, device)
        return TensorData(
            task=torch.as_tensor(task, device=device),
            cell=torch.as_tensor(cell, device=device),
            drug=torch.as_tensor(drug, device=device),
            y=y,
            censor=censor,
            cell_x=cell_x,
            drug_x=drug_x,
            n_tasks=self.n_tasks_,
            n_cells=self.n_cells_ + len(extra_cells),
            n_drugs=self.n_drugs_ + len(extra_drugs),
        )

    def seen_mask(self, kind: str, n_total: int, device: torch.device) -> torch.Tensor:
        """Bool tensor of shape (n_total,): which cells (or drugs) had training rows."""
        # Cached per (kind, size, device): models call this in every step.
        cache = self.__dict__.setdefault("_seen_cache", {})
        key = (kind, n_total, str(device))
        if key not in cache:
            seen = self.seen_cells_ if kind == "cell" else self.seen_drugs_
            mask = torch.zeros(n_total, dtype=torch.bool)
            mask[: len(seen)] = torch.as_tensor(seen)
            cache[key] = mask.to(device)
        return cache[key]

    # --------------------------------------------------------------- posterior
    def unpack_sites(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named latent variables from site values (models with packed sites override)."""
        return dict(values)

    def posterior_median(self) -> dict[str, np.ndarray]:
        """Posterior median of every named latent variable under the fitted guide."""
        if not self.is_fitted or hasattr(self, "task_models_"):
            raise RuntimeError("posterior_median needs a jointly fitted model")
        with local_params(), torch.no_grad():
            values = self.guide_.median()
        return {k: v.detach().cpu().numpy() for k, v in self.unpack_sites(values).items()}

    # ----------------------------------------------------------------- predict
    def predict(
        self,
        pairs: DrugResponseData | pd.DataFrame,
        *,
        level: float = 0.9,
        num_samples: int = 300,
        seed: int = 0,
        quantiles: tuple[float, ...] = (),
        device: str | None = None,
    ) -> pd.DataFrame:
        """Predictive distribution of the responses of (task, cell, drug) pairs.

        Parameters
        ----------
        pairs : DrugResponseData or DataFrame
            Rows with columns task, cell, drug (and y, which is carried over when present).
        level : float, default=0.9
            Probability of the central interval reported as ``lower`` and ``upper``.
        num_samples : int, default=300
            Posterior draws.
        seed : int, default=0
            Seed of the draws; the same seed gives the same predictions.
        quantiles : tuple of float, default=()
            Extra predictive quantiles, returned as columns ``q0.025`` and so on.
        device : str, optional
            Device for prediction (default: the fit device).

        Returns
        -------
        DataFrame
            Columns task, cell, drug, [y,] mean, sd, lower, upper and the extra quantiles, in
            the units of the training responses, one row per input row.

        Raises
        ------
        KeyError
            For a task, or a cell or drug without features, that the model has not seen.
        """
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        frame = pairs.frame if isinstance(pairs, DrugResponseData) else pairs.reset_index(drop=True)
        if hasattr(self, "task_models_"):
            return self._predict_per_task(frame, level, num_samples, seed, quantiles, device)
        alpha = (1 - level) / 2
        probs = (alpha, 1 - alpha, *quantiles)
        dev = resolve_device(device) if device else self.device_
        with local_params():
            data = self._tensors(frame, dev, with_y=False)
            summary = predictive_summary(
                self.model, self.guide_, data, num_samples=num_samples, quantiles=probs, seed=seed
            )
        task = data.task.cpu().numpy()
        out = frame[["task", "cell", "drug"]].astype(str).copy()
        if "y" in frame.columns:
            out["y"] = frame["y"].to_numpy(float)
        out["mean"] = self.scaler_.inverse(summary["mean"], task)
        out["sd"] = self.scaler_.inverse_scale(summary["sd"], task)
        q = self.scaler_.inverse(summary["quantiles"], task[None, :])
        out["lower"] = np.minimum(q[0], out["mean"])
        out["upper"] = np.maximum(q[1], out["mean"])
        for p, values in zip(quantiles, q[2:], strict=True):
            out[f"q{p:g}"] = values
        return out

    def _predict_per_task(self, frame, level, num_samples, seed, quantiles, device):
        names = frame["task"].astype(str)
        unknown = sorted(set(names) - set(self.task_models_))
        if unknown:
            raise KeyError(
                f"unknown task {unknown[0]!r}; the model knows {list(self.task_models_)}"
            )
        parts = []
        for name, sub in self.task_models_.items():
            rows = np.flatnonzero(names.to_numpy() == name)
            if len(rows):
                pred = sub.predict(
                    frame.iloc[rows],
                    level=level,
                    num_samples=num_samples,
                    seed=seed,
                    quantiles=quantiles,
                    device=device,
                )
                parts.append(pred.set_index(pd.Index(rows)))
        return pd.concat(parts).sort_index().reset_index(drop=True)

    def predict_interval_gaussian(self, mean: np.ndarray, sd: np.ndarray, level: float):
        """Central Gaussian interval of the given moments (helper for point-mass guides)."""
        z = norm.ppf(0.5 + level / 2)
        return mean - z * sd, mean + z * sd

    # ---------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Save configuration, fitted state and guide parameters into folder ``path``."""
        if not self.is_fitted:
            raise RuntimeError("only a fitted model can be saved")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "class": type(self).__name__,
            "name": self.name,
            "version": __version__,
            "params": self.get_params(),
            "fit_result": self.fit_result_.to_dict(),
        }
        if hasattr(self, "task_models_"):
            meta["task_models"] = list(self.task_models_)
            for i, sub in enumerate(self.task_models_.values()):
                sub.save(path / f"task_{i}")
        else:
            meta["state"] = self._state_dict_json()
            extra, tensors = self._get_fitted_state()
            meta["state"]["extra"] = extra
            torch.save(self.guide_.state_dict(), path / "guide.pt")
            if tensors:
                torch.save({k: v.detach().cpu() for k, v in tensors.items()}, path / "extra.pt")
            for kind, table in (("cell", self.cell_table_), ("drug", self.drug_table_)):
                if table is not None:
                    table.to_parquet(path / f"{kind}_features.parquet")
        (path / MODEL_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        return path

    def _state_dict_json(self) -> dict:
        return {
            "tasks": list(self.tasks_),
            "cells": list(self.cells_),
            "drugs": list(self.drugs_),
            "scaler": self.scaler_.to_dict(),
            "seen_cells": self.seen_cells_.tolist(),
            "seen_drugs": self.seen_drugs_.tolist(),
            "guide": self.guide_name_,
            "device": str(self.device_),
        }

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> ProbabilisticModel:
        """Load a model saved by :meth:`save` (the class is read from the folder)."""
        from mtl4c_prob.models import MODELS

        path = Path(path)
        file = path / MODEL_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no saved model in {path} ({MODEL_FILE} missing)")
        meta = json.loads(file.read_text())
        model_cls = {c.__name__: c for c in MODELS.values()}.get(meta["class"])
        if model_cls is None:
            raise ValueError(f"{path}: unknown model class {meta['class']!r}")
        self = model_cls(**meta["params"])
        self.fit_result_ = FitResult.from_dict(meta["fit_result"])
        if "task_models" in meta:
            self.task_models_ = {
                name: ProbabilisticModel.load(path / f"task_{i}", device)
                for i, name in enumerate(meta["task_models"])
            }
            self.tasks_ = pd.Index(meta["task_models"])
            return self
        with local_params():
            self._restore(meta["state"], path, device)
        return self

    def _restore(self, state: dict, path: Path, device: str | None) -> None:
        self.tasks_ = pd.Index(state["tasks"], dtype=str)
        self.cells_ = pd.Index(state["cells"], dtype=str)
        self.drugs_ = pd.Index(state["drugs"], dtype=str)
        self.n_tasks_, self.n_cells_, self.n_drugs_ = (
            len(self.tasks_),
            len(self.cells_),
            len(self.drugs_),
        )
        self.scaler_ = TaskScaler.from_dict(state["scaler"])
        self._seen_cache = {}
        self.seen_cells_ = np.asarray(state["seen_cells"], bool)
        self.seen_drugs_ = np.asarray(state["seen_drugs"], bool)
        tables = {}
        for kind in ("cell", "drug"):
            file = path / f"{kind}_features.parquet"
            tables[kind] = pd.read_parquet(file) if file.is_file() else None
        self.cell_table_, self.drug_table_ = tables["cell"], tables["drug"]
        self.device_ = resolve_device(
            device
            or (
                "cpu"
                if "cuda" in state["device"] and not torch.cuda.is_available()
                else state["device"]
            )
        )
        extra = path / "extra.pt"
        tensors = (
            torch.load(extra, map_location=self.device_, weights_only=True)
            if (extra.is_file())
            else {}
        )
        self._set_fitted_state(state.get("extra", {}), tensors, self.device_)
        self.guide_ = self._rebuild_guide(state["guide"])
        # The guide builds its parameters on a first call, which needs observed rows.
        probe = pd.DataFrame(
            {
                "task": [self.tasks_[0]],
                "cell": [self.cells_[0]],
                "drug": [self.drugs_[0]],
                "y": [float(self.scaler_.mean[0])],
            }
        )
        with torch.no_grad(), poutine.block():
            self.guide_(self._tensors(probe, self.device_, with_y=True))
        weights = torch.load(path / "guide.pt", map_location=self.device_, weights_only=True)
        self.guide_.load_state_dict(weights)


def _single_task(data: DrugResponseData | None, name: str) -> DrugResponseData | None:
    if data is None:
        return None
    rows = data.frame[data.frame["task"] == name].drop(
        columns=["task_code", "cell_code", "drug_code"]
    )
    return DrugResponseData(
        rows,
        data.cell_features,
        data.drug_features,
        tasks=[name],
        cells=list(data.cells),
        drugs=list(data.drugs),
    )


def _merge_results(results: list[FitResult]) -> FitResult:
    """One FitResult for per-task fits: losses are summed step by step over tasks."""
    n = max(len(r.losses) for r in results)
    losses = [sum(r.losses[i] for r in results if i < len(r.losses)) for i in range(n)]
    return FitResult(
        losses=losses,
        steps=n,
        elapsed=sum(r.elapsed for r in results),
        stopped_early=any(r.stopped_early for r in results),
        device=results[0].device,
        settings=results[0].settings,
    )


def _extend(known: pd.Index, names: pd.Series, table: pd.DataFrame | None, kind: str):
    codes = known.get_indexer(names)
    if (codes < 0).any():
        # Other spellings of known names (NCIH1650 for NCI-H1650), when the key is unique.
        keys = pd.Series([harmonise_key(n) for n in known])
        unique = keys[~keys.duplicated(keep=False)]
        by_key = dict(zip(unique, unique.index, strict=True))
        respelled = names[codes < 0].map(lambda n: by_key.get(harmonise_key(n), -1))
        codes[codes < 0] = respelled.to_numpy(int)
    unknown = names[codes < 0]
    if len(unknown) == 0:
        return codes, []
    extra = list(pd.unique(unknown))
    if table is None:
        raise KeyError(
            f"{len(extra)} {kind}(s) unknown to the model, e.g. {extra[0]!r}; a model without "
            f"{kind} features can only predict the {kind}s it was fitted on"
        )
    keys = {harmonise_key(n): n for n in table.index}
    resolved = [n if n in table.index else keys.get(harmonise_key(n)) for n in extra]
    lacking = [n for n, r in zip(extra, resolved, strict=True) if r is None]
    if lacking:
        raise KeyError(
            f"{len(lacking)} {kind}(s) are unknown to the model and have no feature row, "
            f"e.g. {lacking[0]!r}"
        )
    lookup = {n: len(known) + i for i, n in enumerate(extra)}
    codes = np.where(codes < 0, names.map(lookup).fillna(-1).to_numpy(int), codes)
    return codes, resolved


def _matrix(table: pd.DataFrame | None, names: list[str], device) -> torch.Tensor | None:
    if table is None:
        return None
    X = table.reindex(names).to_numpy(dtype=float)
    X = np.where(np.isfinite(X), X, 0.0)
    return torch.as_tensor(X, dtype=torch.float32, device=device)


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, pyro.distributions.Distribution):
        return repr(obj)
    raise TypeError(f"cannot save {type(obj).__name__} in model.json")
