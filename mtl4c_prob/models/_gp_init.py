"""Random restarts of a model's starting hyperparameters: keep the fit with the best ELBO."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mtl4c_prob.data import DrugResponseData
from mtl4c_prob.models._base import ProbabilisticModel

logger = logging.getLogger(__name__)

__all__ = ["find_initial_conditions"]


def find_initial_conditions(
    model: ProbabilisticModel,
    train: DrugResponseData,
    n_restarts: int = 5,
    steps: int = 100,
    seed: int = 0,
    *,
    val: DrugResponseData | None = None,
    tail: float = 0.1,
    progress_bar: bool = True,
    **fit_kwargs: Any,
) -> tuple[ProbabilisticModel, pd.DataFrame]:
    """Short fits from random starting points; return the best one and a table of all.

    The counterpart of the original toolkit's ``_find_initial_conditions``. Restart ``r``
    copies ``model`` (same priors and settings), draws starting hyperparameters with a
    generator seeded ``seed + r`` from the model's ``sample_initial_values`` (the
    Gaussian-process models draw the lengthscale, task signal variance and noise sd from
    their priors, clipped to a documented range), and fits ``steps`` SVI steps with seed
    ``seed + r``. A model without ``sample_initial_values`` is restarted by seed alone
    (other initial latent values, inducing inputs, minibatches). The restart whose final
    loss (negative ELBO per observation, averaged over the last ``tail`` share of steps to
    smooth minibatch noise) is lowest wins.

    Parameters
    ----------
    model : ProbabilisticModel
        Template; it is not fitted itself.
    train : DrugResponseData
        Training rows.
    n_restarts : int, default=5
        Number of starting points.
    steps : int, default=100
        SVI steps per restart.
    seed : int, default=0
        Restart ``r`` uses seed ``seed + r`` for its draw and its fit.
    val : DrugResponseData, optional
        Held-out rows, passed to each fit (for ``early_stopping="heldout"``).
    tail : float, default=0.1
        Share of the last steps whose mean loss scores a restart.
    progress_bar : bool, default=True
        Show a bar over restarts (the fits themselves run without one).
    **fit_kwargs
        Other :class:`~mtl4c_prob.inference.SVIConfig` settings for every fit (lr,
        batch_size, ...).

    Returns
    -------
    best : ProbabilisticModel
        The fitted copy with the lowest final loss. For a Gaussian-process model its
        ``initial_values`` hold the winning start, so ``best.fit(train, steps=2000)``
        refits longer from the same start.
    restarts : DataFrame
        One row per restart: ``restart``, ``seed``, ``init_<name>`` for each drawn value,
        ``final_loss``, ``elbo`` (its negative) and ``best``.

    Raises
    ------
    ValueError
        For ``n_restarts`` or ``steps`` below 1, or ``tail`` outside (0, 1].
    FloatingPointError
        When every restart diverges (a diverging restart alone is logged and scored
        ``inf``).
    """
    if n_restarts < 1 or steps < 1:
        raise ValueError(f"n_restarts and steps must be at least 1, got {n_restarts}, {steps}")
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    rows, best, best_loss = [], None, math.inf
    for r in tqdm(range(n_restarts), disable=not progress_bar, desc="restarts", leave=False):
        candidate = type(model)(**model.get_params())
        init = {}
        if hasattr(candidate, "sample_initial_values"):
            init = candidate.sample_initial_values(np.random.default_rng(seed + r))
            candidate.initial_values = init
        settings = {"progress_bar": False, **fit_kwargs, "steps": steps, "seed": seed + r}
        try:
            candidate.fit(train, val, **settings)
        except FloatingPointError as exc:
            # A start that diverges loses; the others still count.
            logger.warning("restart %d (seed %d) %s diverged: %s", r, seed + r, init, exc)
            final = math.inf
        else:
            losses = candidate.fit_result_.losses
            final = float(np.mean(losses[-max(1, math.ceil(tail * len(losses))) :]))
            logger.info("restart %d (seed %d) %s: final loss %.5f", r, seed + r, init, final)
        rows.append(
            {
                "restart": r,
                "seed": seed + r,
                **{f"init_{k}": v for k, v in init.items()},
                "final_loss": final,
                "elbo": -final,
            }
        )
        if final < best_loss:
            best, best_loss = candidate, final
    if best is None:
        raise FloatingPointError(
            f"all {n_restarts} restarts diverged; lower the learning rate or standardise "
            "the features"
        )
    table = pd.DataFrame(rows)
    table["best"] = table["final_loss"] == best_loss
    return best, table
