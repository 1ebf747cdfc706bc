"""Pyro models under one protocol, and the registry of their command-line names."""

from __future__ import annotations

import importlib

from mtl4c_prob.models._base import MODEL_FILE, ProbabilisticModel
from mtl4c_prob.models._gp import SparseGP
from mtl4c_prob.models._gp_exact import ExactGP
from mtl4c_prob.models._gp_init import find_initial_conditions
from mtl4c_prob.models._likelihoods import CensoredNormal, gaussian_likelihood
from mtl4c_prob.models._mean import MeanEffects
from mtl4c_prob.models._mf import BayesianMF

# Command-line name -> (module, class, one-line description), in listing order.
_REGISTRY = {
    "mean": ("_mean", "MeanEffects", "mean effects: task offset + cell and drug effects"),
    "mf": ("_mf", "BayesianMF", "Bayesian matrix factorisation (ARD, side features, multitask)"),
    "nmf": ("_nmf", "BayesianNMF", "Bayesian non-negative matrix factorisation"),
    "knn": ("_knn", "NeighbourhoodModel", "neighbourhood model on the k most similar drugs"),
    "ffnn": ("_ffnn", "BayesianFFNN", "Bayesian feed-forward net on cell and drug features"),
    "ncf": ("_ncf", "BayesianNCF", "Bayesian neural collaborative filtering (GMF + MLP), ids"),
    "ncf-features": ("_ncf", "FeaturizedNCF", "Bayesian NCF with feature-driven embeddings"),
    "ncf-pooled-mlp": ("_ncf", "PooledMLPNCF", "multitask NCF: pooled MLP, one GMF per task"),
    "ncf-pooled-gmf": ("_ncf", "PooledGMFNCF", "multitask NCF: pooled GMF, one MLP per task"),
    "gp": ("_gp_exact", "ExactGP", "exact GP regression on cell and drug inputs (small data)"),
    "sgp": ("_gp", "SparseGP", "sparse variational GP on cell and drug inputs, minibatch"),
    "icm": ("_mtgp", "ICMGP", "multitask GP, intrinsic coregionalisation (Hadamard), GPyTorch"),
    "lmc": ("_mtgp", "LMCGP", "multitask GP, linear model of coregionalisation, GPyTorch"),
    "gp-full": ("_mtgp", "FullMultitaskGP", "full multitask GP: all tasks at every pair, GPyTorch"),
}


def _available() -> tuple[dict[str, type[ProbabilisticModel]], dict[str, str]]:
    models, descriptions = {}, {}
    for name, (module, cls, text) in _REGISTRY.items():
        try:
            mod = importlib.import_module(f"mtl4c_prob.models.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mtl4c_prob.models.{module}":
                raise
            continue
        models[name], descriptions[name] = getattr(mod, cls), text
    return models, descriptions


#: Command-line name -> model class, for the models this installation has.
#: ``DESCRIPTIONS`` holds one line per model, for ``mtl4c-prob models``.
MODELS, DESCRIPTIONS = _available()


def get_model(name: str, **params) -> ProbabilisticModel:
    """Instantiate the model registered under ``name`` with the given priors and settings."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return MODELS[name](**params)


def load_model(path, device: str | None = None) -> ProbabilisticModel:
    """Load any model saved with :meth:`ProbabilisticModel.save`."""
    return ProbabilisticModel.load(path, device)


__all__ = [
    "DESCRIPTIONS",
    "MODELS",
    "MODEL_FILE",
    "BayesianMF",
    "CensoredNormal",
    "ExactGP",
    "MeanEffects",
    "ProbabilisticModel",
    "SparseGP",
    "find_initial_conditions",
    "gaussian_likelihood",
    "get_model",
    "load_model",
]
