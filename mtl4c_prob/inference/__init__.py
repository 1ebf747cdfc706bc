"""SVI fitting, NUTS reference fits, posterior predictive draws and their summaries."""

from __future__ import annotations

from mtl4c_prob.inference._mcmc import NutsFit, fit_nuts
from mtl4c_prob.inference._predictive import (
    draw_loc_scale,
    mixture_quantiles,
    predictive_summary,
)
from mtl4c_prob.inference._svi import (
    GUIDES,
    FitResult,
    SVIConfig,
    fit_svi,
    heldout_nll,
    local_params,
    make_guide,
    resolve_device,
)
from mtl4c_prob.inference._svi_nuts import SviNutsComparison, compare_svi_nuts

__all__ = [
    "GUIDES",
    "FitResult",
    "NutsFit",
    "SVIConfig",
    "SviNutsComparison",
    "compare_svi_nuts",
    "draw_loc_scale",
    "fit_nuts",
    "fit_svi",
    "heldout_nll",
    "local_params",
    "make_guide",
    "mixture_quantiles",
    "predictive_summary",
    "resolve_device",
]
