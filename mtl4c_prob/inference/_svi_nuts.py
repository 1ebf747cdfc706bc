"""What the variational approximation costs: an SVI fit against its NUTS reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from mtl4c_prob.data import DrugResponseData
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.inference._mcmc import NutsFit
from mtl4c_prob.inference._svi import local_params

if TYPE_CHECKING:
    from mtl4c_prob.models import ProbabilisticModel

__all__ = ["SviNutsComparison", "compare_svi_nuts"]


@dataclass
class SviNutsComparison:
    """What a variational fit costs next to a NUTS reference of the same program.

    Status: experimental.

    Attributes
    ----------
    latents : DataFrame
        One row per named latent present in both fits: ``size``, ``mean_abs_z`` and
        ``max_abs_z`` (|SVI posterior mean - NUTS posterior mean| / NUTS posterior sd,
        averaged and worst over the elements), ``sd_ratio`` (geometric mean over the
        elements of SVI sd / NUTS sd), ``sd_ratio_min``, ``sd_ratio_max``.
    heldout : DataFrame or None
        With test rows: one row per method (``svi``, ``nuts``) with ``n``, ``rmse``,
        ``nll``, ``crps``, ``coverage`` (of the central interval at ``level``) and
        ``width``.
    level : float
        Interval level of the held-out coverage.
    """

    latents: pd.DataFrame
    heldout: pd.DataFrame | None
    level: float

    def to_dict(self) -> dict:
        """JSON-ready representation."""
        return {
            "level": self.level,
            "latents": self.latents.reset_index().to_dict(orient="records"),
            "heldout": None
            if self.heldout is None
            else self.heldout.reset_index().to_dict(orient="records"),
        }


def compare_svi_nuts(
    svi_model: ProbabilisticModel,
    nuts_fit: NutsFit,
    test: DrugResponseData | pd.DataFrame | None = None,
    level: float = 0.9,
    *,
    num_samples: int = 500,
    seed: int = 0,
) -> SviNutsComparison:
    r"""Compare an SVI posterior with the NUTS reference of the same model and data.

    Parameters
    ----------
    svi_model : ProbabilisticModel
        The model fitted jointly by SVI on the rows ``nuts_fit`` sampled on (its code
        spaces must be those of ``nuts_fit.model``).
    nuts_fit : NutsFit
        The reference, from :func:`fit_nuts`.
    test : DrugResponseData or DataFrame, optional
        Held-out rows with responses; adds the ``heldout`` table.
    level : float, default=0.9
        Level of the central intervals whose held-out coverage is reported.
    num_samples : int, default=500
        Guide draws for the SVI posterior moments and predictions.
    seed : int, default=0
        Seed of the guide draws.

    Returns
    -------
    SviNutsComparison

    Raises
    ------
    ValueError
        If ``svi_model`` is not fitted jointly, or its tasks, cells or drugs differ from
        those of the NUTS fit.

    Notes
    -----
    For latent :math:`\theta_i` with NUTS posterior mean :math:`m_i` and sd :math:`s_i`
    and SVI mean :math:`\hat m_i` and sd :math:`\hat s_i`, ``mean_abs_z`` is the mean of
    :math:`|\hat m_i - m_i| / s_i` and ``sd_ratio`` the geometric mean of
    :math:`\hat s_i / s_i`. NUTS draws carry Monte Carlo error: a ``mean_abs_z`` of about
    :math:`1/\sqrt{\mathrm{ESS}}` is what two exact posteriors would give.

    Expected pattern: a mean-field guide (``guide="normal"``) on a Gaussian posterior
    recovers the means but gives each latent the sd of its *conditional* posterior,
    :math:`1/\sqrt{\Lambda_{ii}}` for precision matrix :math:`\Lambda`, which is below
    the marginal sd :math:`\sqrt{\Sigma_{ii}}` whenever the latent is correlated with
    others, so ``sd_ratio < 1`` for latents that trade off against each other (a task
    offset against the drug effects, a factor scale against its factors). Held out,
    this shows as intervals that are too narrow (coverage below ``level``), though the
    observation noise, which SVI usually estimates well, often dominates the predictive
    spread.

    Elementwise comparisons are meaningful only for identified latents (offsets,
    effects, scales, noise): the factors of a matrix factorisation are identified only
    up to rotation and sign, and chains (and SVI) settle in different modes; compare
    such models by the held-out table.
    """
    if not svi_model.is_fitted or hasattr(svi_model, "task_models_"):
        raise ValueError("compare_svi_nuts needs an SVI model fitted jointly (multitask=True)")
    ref = nuts_fit.model
    for kind in ("tasks_", "cells_", "drugs_"):
        if not getattr(svi_model, kind).equals(getattr(ref, kind)):
            raise ValueError(
                f"the SVI model and the NUTS fit have different {kind.rstrip('_')}; fit both "
                "on the same training rows"
            )

    svi = _guide_draws(svi_model, nuts_fit.train, num_samples, seed)
    latents = _latent_table(svi, nuts_fit.samples)
    heldout = None
    if test is not None:
        rows = {
            "svi": svi_model.predict(test, level=level, num_samples=num_samples, seed=seed),
            "nuts": nuts_fit.predict(test, level=level, seed=seed),
        }
        heldout = pd.DataFrame({k: _heldout_scores(v) for k, v in rows.items()}).T
        heldout.index.name = "method"
    return SviNutsComparison(latents=latents, heldout=heldout, level=level)


def _guide_draws(model, data: DrugResponseData, num_samples: int, seed: int):
    """Named latent draws of a fitted model's guide, shape (num_samples, *shape)."""
    tensors = model._tensors(data, model.device_, with_y=True)
    draws: dict[str, list[np.ndarray]] = {}
    with local_params(), torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        for i in range(num_samples):
            pyro.set_rng_seed(seed * 1_000_003 + i)
            trace = poutine.trace(model.guide_).get_trace(tensors)
            values = {
                name: node["value"]
                for name, node in trace.nodes.items()
                if node["type"] == "sample"
                and not node["is_observed"]
                and not node["infer"].get("is_auxiliary")
            }
            for name, value in model.unpack_sites(values).items():
                draws.setdefault(name, []).append(value.cpu().numpy())
    return {k: np.stack(v) for k, v in draws.items()}


def _latent_table(svi: dict[str, np.ndarray], nuts: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per-latent agreement of SVI draws (s, ...) with NUTS draws (chain, draw, ...)."""
    rows = []
    for name in (k for k in nuts if k in svi):
        ref = nuts[name].reshape(nuts[name].shape[0] * nuts[name].shape[1], -1)
        approx = svi[name].reshape(svi[name].shape[0], -1)
        if ref.shape[1] != approx.shape[1]:
            continue
        sd_ref, sd_approx = ref.std(0), approx.std(0)
        keep = sd_ref > 1e-12  # constant elements (fixed by construction) say nothing
        if not keep.any():
            continue
        z = np.abs(approx.mean(0) - ref.mean(0))[keep] / sd_ref[keep]
        ratio = sd_approx[keep] / sd_ref[keep]
        rows.append(
            {
                "variable": name,
                "size": int(keep.sum()),
                "mean_abs_z": float(z.mean()),
                "max_abs_z": float(z.max()),
                "sd_ratio": float(np.exp(np.mean(np.log(np.maximum(ratio, 1e-300))))),
                "sd_ratio_min": float(ratio.min()),
                "sd_ratio_max": float(ratio.max()),
            }
        )
    return pd.DataFrame(rows).set_index("variable")


def _heldout_scores(pred: pd.DataFrame) -> dict[str, float]:
    """RMSE, NLL, CRPS, interval coverage and width of a prediction frame with ``y``."""
    from mtl4c_prob.evaluation.metrics import (
        coverage,
        crps_gaussian,
        gaussian_nll,
        interval_width,
        rmse,
    )

    if "y" not in pred.columns:
        raise DataError("the test rows need responses (column 'y') to be scored")
    y, mean, sd = (pred[c].to_numpy(float) for c in ("y", "mean", "sd"))
    lower, upper = pred["lower"].to_numpy(float), pred["upper"].to_numpy(float)
    return {
        "n": float(len(pred)),
        "rmse": rmse(y, mean),
        "nll": gaussian_nll(y, mean, sd),
        "crps": crps_gaussian(y, mean, sd),
        "coverage": coverage(y, lower, upper),
        "width": interval_width(lower, upper),
    }
