"""Posterior predictive draws in bounded memory, and their summaries."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine

from mtl4c_prob.data import TensorData

logger = logging.getLogger(__name__)

__all__ = ["draw_loc_scale", "mixture_quantiles", "predictive_summary"]


def _draw_once(model: Callable, guide: Callable, data: TensorData) -> tuple[torch.Tensor, ...]:
    guide_trace = poutine.trace(guide).get_trace(data)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(data)
    nodes = model_trace.nodes
    if "loc" in nodes and "scale" in nodes:
        return nodes["loc"]["value"], nodes["scale"]["value"]
    return (nodes["obs"]["value"],)


def draw_loc_scale(
    model: Callable,
    guide: Callable,
    data: TensorData,
    num_samples: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictive draws for the rows of ``data``.

    Returns ``(loc, scale)`` of shape (num_samples, n_obs) when the model records Gaussian
    predictive sites ``"loc"`` and ``"scale"``; otherwise ``(obs draws, None)``. The draws
    depend only on ``seed``, not on how the rows are chunked.
    """
    draws = []
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        for i in range(num_samples):
            # One seed per draw: draw i is the same whatever the number of rows.
            pyro.set_rng_seed(seed * 1_000_003 + i)
            draws.append(_draw_once(model, guide, data))
    if len(draws[0]) == 2:
        return torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    return torch.stack([d[0] for d in draws]), None


def mixture_quantiles(
    loc: torch.Tensor,
    scale: torch.Tensor,
    probs: Sequence[float],
    iters: int = 60,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Quantiles of the equal-weight Gaussian mixture over draws, per column.

    Safeguarded Newton iterations on the mixture CDF, started at the moment-matched
    Gaussian quantile: a step that would leave the current bracket is replaced by
    bisection, so every column converges; near the answer Newton doubles the correct
    digits per step. Iterations stop once every column's mixture CDF is within ``tol`` of
    its probability: typically after 3-5 passes over the draws, where plain bisection
    needed 40 (which made quantiles the slowest part of predicting GDSC2).

    Parameters
    ----------
    loc, scale : Tensor of shape (n_draws, n_obs)
        Component means and sds.
    probs : sequence of float
        Probabilities in (0, 1).
    iters : int, default=60
        Most Newton (or bisection) steps.
    tol : float, default=1e-6
        Stop when ``|CDF(q) - p| < tol`` in every column.

    Returns
    -------
    Tensor of shape (len(probs), n_obs)
    """
    mean = loc.mean(0)
    sd = ((scale**2).mean(0) + loc.var(0, unbiased=False)).sqrt()
    spread = (scale.max(0).values + (loc - mean).abs().max(0).values) * 8.0
    inv_sqrt_2pi = 0.3989422804014327
    out = []
    for p in probs:
        lo, hi = mean - spread, mean + spread
        x = mean + sd * float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
        for _ in range(iters):
            z = (x - loc) / scale
            cdf = torch.special.ndtr(z).mean(0)
            pdf = (torch.exp(-0.5 * z * z) / scale).mean(0) * inv_sqrt_2pi
            done = ((cdf - p).abs() < tol) | (hi - lo <= 1e-6 * (1 + x.abs()))
            if bool(done.all()):
                break
            below = cdf < p
            lo = torch.where(below, x, lo)
            hi = torch.where(below, hi, x)
            step = x - (cdf - p) / pdf.clamp_min(1e-30)
            inside = (step >= lo) & (step <= hi) & torch.isfinite(step)
            x = torch.where(inside, step, 0.5 * (lo + hi))
        out.append(x)
    return torch.stack(out)


def predictive_summary(
    model: Callable,
    guide: Callable,
    data: TensorData,
    *,
    num_samples: int = 300,
    quantiles: Sequence[float] = (0.05, 0.95),
    seed: int = 0,
    max_elements: int = 20_000_000,
    return_draws: bool = False,
) -> dict[str, np.ndarray]:
    """Predictive mean, sd and quantiles per row of ``data`` (model units, standardised).

    Rows are processed in chunks so that at most ``max_elements`` draws are held at once.
    For Gaussian predictives (models with ``"loc"`` and ``"scale"`` sites) the moments are
    exact mixture moments, ``E[loc]`` and ``E[scale^2] + Var[loc]``, and the quantiles are
    those of the mixture of the draws' Gaussians; otherwise they are empirical.

    Returns
    -------
    dict
        ``mean`` and ``sd`` of shape (n_obs,), ``quantiles`` of shape (len(quantiles), n_obs),
        and ``draws`` of shape (num_samples, n_obs) when ``return_draws``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    chunk = max(1, max_elements // num_samples)
    means, sds, qs, all_draws = [], [], [], []
    for start in range(0, data.n_obs, chunk):
        part = data.take(torch.arange(start, min(start + chunk, data.n_obs), device=data.device))
        loc, scale = draw_loc_scale(model, guide, part, num_samples, seed)
        if scale is not None:
            mean = loc.mean(0)
            var = (scale**2).mean(0) + loc.var(0, unbiased=False)
            q = mixture_quantiles(loc, scale, quantiles)
            if return_draws:
                all_draws.append((loc + scale * torch.randn_like(loc)).cpu().numpy())
        else:
            mean, var = loc.mean(0), loc.var(0)
            q = torch.quantile(loc, torch.tensor(list(quantiles), device=loc.device), dim=0)
            if return_draws:
                all_draws.append(loc.cpu().numpy())
        means.append(mean.cpu().numpy())
        sds.append(var.clamp_min(1e-12).sqrt().cpu().numpy())
        qs.append(q.cpu().numpy())
    out = {
        "mean": np.concatenate(means),
        "sd": np.concatenate(sds),
        "quantiles": np.concatenate(qs, axis=1),
    }
    if return_draws:
        out["draws"] = np.concatenate(all_draws, axis=1)
    return out
