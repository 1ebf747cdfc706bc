"""ArviZ export of fitted models, PSIS-LOO, WAIC and model comparison."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from mtl4c_prob import __version__
from mtl4c_prob.data import DrugResponseData
from mtl4c_prob.exceptions import DataError, DiagnosticWarning, warn_external
from mtl4c_prob.inference import local_params

logger = logging.getLogger(__name__)

__all__ = [
    "IDATA_FILE",
    "compare",
    "load_inference_data",
    "loo",
    "loo_pit",
    "select_rows",
    "to_inference_data",
    "waic",
]

#: Name of the InferenceData file ``fit`` writes into its output folder.
IDATA_FILE = "idata.nc"
#: Pareto k above which PSIS-LOO is unreliable for an observation (Vehtari et al., 2017).
PARETO_K_BAD = 0.7


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def select_rows(frame: pd.DataFrame, max_obs: int | None) -> np.ndarray:
    """Return the indices of at most ``max_obs`` rows, chosen by a hash of the keys.

    The choice depends only on the keys, not on the order of the rows or on the model, so
    the exports of several models fitted on the same data hold the same observations and
    can be compared by LOO.
    """
    n = len(frame)
    if max_obs is None or n <= max_obs:
        return np.arange(n)
    keys = frame[["task", "cell", "drug"]].astype(str)
    h = pd.util.hash_pandas_object(keys, index=False).to_numpy()
    return np.sort(np.argsort(h, kind="stable")[:max_obs])


def _draws(model, data: DrugResponseData, num_samples: int, seed: int):
    """Latent draws (named), and per-row loc, scale and log-likelihood in input units."""
    tensors = model._tensors(data, model.device_, with_y=True)
    task = model._codes(data.frame)[0]
    log_std = torch.as_tensor(np.log(model.scaler_.std[task]), dtype=torch.float32)
    latents: dict[str, list[np.ndarray]] = {}
    locs, scales, logliks = [], [], []
    with local_params(), torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        for i in range(num_samples):
            pyro.set_rng_seed(seed * 1_000_003 + i)
            guide_trace = poutine.trace(model.guide_).get_trace(tensors)
            trace = poutine.trace(poutine.replay(model.pointwise_model, guide_trace)).get_trace(
                tensors
            )
            site = trace.nodes["obs"]
            logliks.append(site["fn"].log_prob(site["value"]).cpu() - log_std)
            if "loc" in trace.nodes:
                locs.append(trace.nodes["loc"]["value"].cpu())
                scales.append(trace.nodes["scale"]["value"].cpu())
            values = {
                name: node["value"]
                for name, node in guide_trace.nodes.items()
                if node["type"] == "sample"
                and not node["is_observed"]
                and not node["infer"].get("is_auxiliary")
            }
            for name, value in model.unpack_sites(values).items():
                latents.setdefault(name, []).append(value.detach().cpu().numpy())
    post = {k: np.stack(v) for k, v in latents.items()}
    loglik = torch.stack(logliks).numpy()
    if locs:
        loc = model.scaler_.inverse(torch.stack(locs).numpy(), task[None, :])
        scale = model.scaler_.inverse_scale(torch.stack(scales).numpy(), task[None, :])
    else:
        loc = scale = None
    return post, loc, scale, loglik


def _dims(name: str, shape: tuple[int, ...], sizes: dict[str, int]) -> list[str]:
    """Dimension names of a latent: task/cell/drug where the size says so, else generic."""
    named = [k for k in sizes if k in name]
    # A variable named after cells or drugs (cell_w: feature loadings) only gets those
    # dimensions (and tasks); others get any size match.
    eligible = set(named) | {"task"} if named else set(sizes)
    dims = []
    for j, n in enumerate(shape):
        matches = [k for k in eligible if sizes[k] == n and k not in dims]
        if len(matches) > 1:  # equal sizes: let the variable's name decide
            matches = [k for k in matches if k in name][:1]
        dims.append(matches[0] if len(matches) == 1 else f"{name}_dim_{j}")
    return dims


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def to_inference_data(
    model,
    data: DrugResponseData,
    *,
    num_samples: int = 200,
    chains: int = 2,
    seed: int = 0,
    max_obs: int | None = 10_000,
):
    """Export a fitted model and data as an :class:`arviz.InferenceData`.

    Parameters
    ----------
    model : ProbabilisticModel
        A fitted model (jointly or per task).
    data : DrugResponseData
        Rows with responses, usually the training rows (for LOO and posterior predictive
        checks) or held-out rows (for predictive checks of new pairs).
    num_samples : int, default=200
        Guide draws in all; they are independent, and split evenly into ``chains`` chains
        so that ArviZ's R-hat and ESS are defined (they should be near 1 and near
        ``num_samples`` for any guide; R-hat of MCMC fits is the informative one).
    chains : int, default=2
        Number of chains the draws are split into.
    seed : int, default=0
        Seed of the draws.
    max_obs : int or None, default=10000
        At most this many rows enter the observation groups, chosen by
        :func:`select_rows` (a hash of the keys, the same for every model); None keeps
        all. Stored as the attribute ``obs_selected``.

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior`` (every named latent, dims ``chain``, ``draw`` and ``task``,
        ``cell``, ``drug`` with their names as coordinates where a dimension matches),
        ``posterior_predictive`` (``y``), ``log_likelihood`` (``y``, per observation, in
        the units of the responses, censored rows through the CDF), ``observed_data``
        (``y``) and ``constant_data`` (task, cell and drug of each observation), all on
        the ``obs`` dimension with coordinates ``task``, ``cell``, ``drug``; the fit
        settings and priors are attributes.
    """
    az = _az()
    if not model.is_fitted:
        raise RuntimeError("to_inference_data needs a fitted model")
    if not isinstance(data, DrugResponseData):
        raise TypeError(f"data must be a DrugResponseData, got {type(data).__name__}")
    if num_samples < chains or num_samples % chains:
        raise ValueError(f"num_samples ({num_samples}) must be a multiple of chains ({chains})")
    rows = select_rows(data.frame, max_obs)
    sub = data.subset(np.isin(np.arange(data.n_obs), rows)) if len(rows) < data.n_obs else data
    frame = sub.frame.reset_index(drop=True)
    n = len(frame)
    if n == 0:
        raise DataError("no rows to export")

    parts = model.task_models_.items() if hasattr(model, "task_models_") else [(None, model)]
    # float32 throughout: 10,000 rows x 200 draws is 8 MB per group instead of 16.
    posterior, loc = {}, np.zeros((num_samples, n), dtype=np.float32)
    scale, loglik = np.zeros_like(loc), np.zeros_like(loc)
    have_loc = True
    for name, part in parts:
        if name is None:
            mask = np.ones(n, bool)
            piece = sub
        else:
            mask = (frame["task"].astype(str) == str(name)).to_numpy()
            if not mask.any():
                continue
            piece = sub.subset(mask)
        post, l_, s_, ll = _draws(part, piece, num_samples, seed)
        suffix = "" if name is None else f"__{name}"
        sizes = {"task": part.n_tasks_, "cell": part.n_cells_, "drug": part.n_drugs_}
        for var, value in post.items():
            posterior[var + suffix] = (value, _dims(var, value.shape[1:], sizes))
        loglik[:, mask] = ll
        if l_ is None:
            have_loc = False
        else:
            loc[:, mask], scale[:, mask] = l_, s_

    def chained(a: np.ndarray) -> np.ndarray:
        return a.reshape(chains, num_samples // chains, *a.shape[1:])

    rng = np.random.default_rng(seed)
    y = frame["y"].to_numpy(float)
    groups: dict[str, Any] = {
        "posterior": {k: chained(v) for k, (v, _) in posterior.items()},
        "log_likelihood": {"y": chained(loglik)},
        "observed_data": {"y": y},
        "constant_data": {
            "task_code": model.tasks_.get_indexer(frame["task"].astype(str)),
        },
    }
    if have_loc:
        groups["posterior_predictive"] = {
            "y": chained(
                (loc + scale * rng.standard_normal(loc.shape, dtype=np.float32)).astype(np.float32)
            ),
        }
    dims = {k: d for k, (_, d) in posterior.items()}
    dims.update({"y": ["obs"], "task_code": ["obs"]})
    coords: dict[str, Any] = {"obs": np.arange(n)}
    for kind in ("task", "cell", "drug"):
        names = _names(model, kind)
        if names is not None and any(kind in d for d in dims.values()):
            coords[kind] = np.asarray(names, dtype=str)
    idata = az.from_dict(**groups, coords=coords, dims=dims)
    for group in ("log_likelihood", "observed_data", "constant_data", "posterior_predictive"):
        if group in idata.groups():
            ds = idata[group].assign_coords(
                obs_task=("obs", frame["task"].astype(str).to_numpy()),
                obs_cell=("obs", frame["cell"].astype(str).to_numpy()),
                obs_drug=("obs", frame["drug"].astype(str).to_numpy()),
            )
            setattr(idata, group, ds)
    attrs = {
        "mtl4c_prob_version": __version__,
        "model": getattr(model, "name", type(model).__name__),
        "model_class": type(model).__name__,
        "params": json.dumps({k: _jsonable(v) for k, v in model.get_params().items()}),
        "fit_settings": json.dumps(
            {k: _jsonable(v) for k, v in model.fit_result_.settings.items()}
        ),
        "fit_steps": int(model.fit_result_.steps),
        "obs_selected": f"{n} of {data.n_obs}",
        "draws": "independent guide draws (SVI), split into chains",
        "units": "log_likelihood and posterior_predictive in the units of the responses",
    }
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata


def _names(model, kind: str):
    if hasattr(model, "task_models_"):
        return None  # per-task models have their own code spaces; dims stay generic
    return {"task": model.tasks_, "cell": model.cells_, "drug": model.drugs_}[kind]


def load_inference_data(path: str | Path):
    """Read an :class:`arviz.InferenceData` written by ``fit`` (a file or its folder)."""
    az = _az()
    path = Path(path)
    if path.is_dir():
        path = path / IDATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no InferenceData file at {path}")
    return az.from_netcdf(path)


def _as_idata(obj):
    if isinstance(obj, (str, Path)):
        return load_inference_data(obj)
    if not hasattr(obj, "log_likelihood"):
        raise TypeError(
            f"expected an InferenceData with a log_likelihood group, got {type(obj).__name__}"
        )
    return obj


def _reff(idata, reff: float | None) -> float | None:
    """Relative efficiency of the draws: 1 for independent guide draws (SVI exports).

    ArviZ otherwise estimates it from the ESS of every posterior element, which for a
    factorisation (250,000 latents) took a minute per call.
    """
    if reff is not None:
        return reff
    attrs = idata.posterior.attrs if "posterior" in idata else {}
    return 1.0 if str(attrs.get("draws", "")).startswith("independent") else None


def loo(idata, *, pointwise: bool = True, reff: float | None = None):
    """PSIS-LOO of an export, warning when Pareto k values flag unreliable observations.

    Returns ArviZ's ``ELPDData``; with ``pointwise`` it holds ``pareto_k`` per observation.
    A :class:`~mtl4c_prob.exceptions.DiagnosticWarning` names how many observations have
    k above 0.7 (LOO is then unreliable for them: refit without them, or use K-fold).
    ``reff`` (relative efficiency of the draws) defaults to 1 for SVI exports, whose
    draws are independent, and to ArviZ's ESS-based estimate otherwise (MCMC).
    """
    az = _az()
    idata = _as_idata(idata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = az.loo(idata, pointwise=pointwise, reff=_reff(idata, reff))
    if pointwise:
        k = np.asarray(result.pareto_k)
        bad = int((k > PARETO_K_BAD).sum())
        if bad:
            warn_external(
                f"PSIS-LOO: {bad} of {k.size} observations have Pareto k > {PARETO_K_BAD}; "
                "their LOO estimates are unreliable (consider K-fold cross-validation)",
                DiagnosticWarning,
            )
    return result


def loo_pit(idata, *, reff: float | None = None) -> np.ndarray:
    """LOO-PIT value of each observation: its leave-one-out predictive probability.

    Uniform on (0, 1) for a calibrated model. Uses PSIS weights with the same ``reff``
    rule as :func:`loo`; needs the ``posterior_predictive`` group.
    """
    az = _az()
    idata = _as_idata(idata)
    if "posterior_predictive" not in idata:
        raise ValueError("LOO-PIT needs a posterior_predictive group")
    ll = idata.log_likelihood["y"].stack(__sample__=("chain", "draw"))
    r = _reff(idata, reff)
    if r is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(az.loo_pit(idata, y="y")).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_weights, _ = az.psislw(-ll, reff=r)
        return np.asarray(az.loo_pit(idata, y="y", log_weights=log_weights)).ravel()


def waic(idata, *, pointwise: bool = True):
    """WAIC of an export (ArviZ's ``ELPDData``), warning when its variance check fails."""
    az = _az()
    idata = _as_idata(idata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = az.waic(idata, pointwise=pointwise)
    if any("posterior variance of the log predictive" in str(w.message) for w in caught):
        warn_external(
            "WAIC: the posterior variance of the log predictive densities exceeds 0.4 for "
            "some observations; prefer PSIS-LOO",
            DiagnosticWarning,
        )
    return result


def compare(
    models: Mapping[str, Any], *, ic: str = "loo", precomputed: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """ArviZ's ranking table of several exports (or fit folders) on the same observations.

    Parameters
    ----------
    models : mapping of name to InferenceData or path
        The exports to rank; they must hold the same observations (``fit`` selects them
        by a hash of the keys, so fits on the same data and split do).
    ic : {"loo", "waic"}, default="loo"
    precomputed : mapping of name to ELPDData, optional
        Pointwise :func:`loo` (or :func:`waic`) results already computed for some of the
        models, reused instead of recomputed.

    Returns
    -------
    DataFrame
        One row per model, best first: rank, elpd, p, elpd difference, weight, se, dse,
        warning.
    """
    az = _az()
    if ic not in ("loo", "waic"):
        raise ValueError(f"ic must be 'loo' or 'waic', got {ic!r}")
    if len(models) < 2:
        raise ValueError("compare needs at least two models")
    idatas = {name: _as_idata(obj) for name, obj in models.items()}
    keys = {}
    for name, idata in idatas.items():
        ll = idata.log_likelihood
        keys[name] = tuple(
            map(tuple, (ll["obs_task"].values, ll["obs_cell"].values, ll["obs_drug"].values))
        )
    first = next(iter(keys))
    for name, key in keys.items():
        if key != keys[first]:
            raise DataError(
                f"models {first!r} and {name!r} were exported on different observations; "
                "LOO comparison needs the same rows (same data, split and max_obs)"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DiagnosticWarning)
        fn = loo if ic == "loo" else waic
        done = precomputed or {}
        elpds = {name: done[name] if name in done else fn(idata) for name, idata in idatas.items()}
        table = az.compare(elpds, ic=ic)
    return table


def write_inference_data(idata, path: str | Path) -> Path:
    """Write an export as netCDF (h5netcdf engine) and return the path."""
    path = Path(path)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return path


def elpd_summary(result) -> dict[str, float]:
    """JSON-ready summary of an ``ELPDData``: elpd, se, p and the Pareto-k counts."""
    kind = "loo" if "elpd_loo" in result else "waic"
    out = {
        "ic": kind,
        "elpd": float(result[f"elpd_{kind}"]),
        "se": float(result["se"]),
        "p": float(result[f"p_{kind}"]),
        "n_obs": int(result["n_data_points"]),
    }
    if kind == "loo" and "pareto_k" in result:
        k = np.asarray(result["pareto_k"])
        out["pareto_k_over_0.7"] = int((k > PARETO_K_BAD).sum())
        out["pareto_k_max"] = float(np.nanmax(k)) if k.size else math.nan
    return out
