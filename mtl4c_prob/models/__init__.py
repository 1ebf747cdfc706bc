"""Pyro models under one protocol, and the registry of their command-line names."""

from __future__ import annotations

from mtl4c_prob.models._base import MODEL_FILE, ProbabilisticModel
from mtl4c_prob.models._likelihoods import CensoredNormal, gaussian_likelihood
from mtl4c_prob.models._mf import BayesianMF

#: Command-line name -> model class.
MODELS: dict[str, type[ProbabilisticModel]] = {"mf": BayesianMF}

#: One line per model, for ``mtl4c-prob models``.
DESCRIPTIONS = {"mf": "Bayesian matrix factorisation (ARD priors, side features, multitask)"}


def get_model(name: str, **params) -> ProbabilisticModel:
    """Instantiate the model registered under ``name`` with the given priors and settings."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
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
    "ProbabilisticModel",
    "gaussian_likelihood",
    "get_model",
    "load_model",
]
