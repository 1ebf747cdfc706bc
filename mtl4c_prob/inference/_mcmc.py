"""NUTS reference fits of the Pyro programs that SVI fits, and what the approximation costs.

:func:`fit_nuts` runs the No-U-Turn sampler (``pyro.infer.MCMC``) on a model's own program
``model.model``, so its draws live on the same latent sites as the SVI guide's and can be
compared site by site (:func:`compare_svi_nuts`), predicted from
(:meth:`NutsFit.predict`) and exported for ArviZ (:meth:`NutsFit.to_inference_data`)
exactly like an SVI fit. It is a reference for small problems (a few thousand rows), not
a way to fit GDSC. :mod:`mtl4c_prob.inference._svi_nuts` compares the two.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_uniform

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.exceptions import DataError, DiagnosticWarning, warn_external
from mtl4c_prob.inference._svi import FitResult, local_params

if TYPE_CHECKING:
    from mtl4c_prob.models import ProbabilisticModel

logger = logging.getLogger(__name__)

__all__ = ["NutsFit", "fit_nuts"]

#: R-hat above which a NUTS fit is reported as not converged (Vehtari et al., 2021).
RHAT_BAD = 1.05


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# --------------------------------------------------------------------------- sampler parts
class _CountingNUTS(NUTS):
    """NUTS that counts its leapfrog steps, from which each draw's tree depth follows."""

    leapfrog_steps = 0

    def _build_basetree(self, *args, **kwargs):
        self.leapfrog_steps += 1
        return super()._build_basetree(*args, **kwargs)


class _StatsRecorder:
    """MCMC hook collecting per-draw sample statistics of the sampling phase."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []
        self._steps = 0
        self._divergences = 0
        self._mean_accept = 0.0

    def __call__(self, kernel: _CountingNUTS, params: dict, stage: str, i: int) -> None:
        n_steps = kernel.leapfrog_steps - self._steps
        self._steps = kernel.leapfrog_steps
        if not stage.startswith("Sample"):
            return

        # The kernel keeps a running mean of the acceptance statistic over the sampling
        # phase; draw i's own value is recovered from two consecutive means.
        n = i + 1
        mean = float(kernel._mean_accept_prob)
        accept = n * mean - (n - 1) * self._mean_accept
        self._mean_accept = mean
        diverging = len(kernel._divergences) > self._divergences
        self._divergences = len(kernel._divergences)
        lp = -float(kernel._potential_energy_last)
        self.rows.append(
            (diverging, n_steps, math.ceil(math.log2(n_steps + 1)), accept, kernel.step_size, lp)
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Statistics as arrays of shape (n_draws,), named as ArviZ names them."""
        cols = np.asarray(self.rows, dtype=float).T
        names = ("diverging", "n_steps", "tree_depth", "acceptance_rate", "step_size", "lp")
        out = dict(zip(names, cols, strict=True))
        out["diverging"] = out["diverging"].astype(bool)
        out["n_steps"] = out["n_steps"].astype(np.int64)
        out["tree_depth"] = out["tree_depth"].astype(np.int64)
        return out


class _DrawGuide:
    """A "guide" that replays stored posterior draws, one per call, in a chosen order.

    Callers that draw ``k`` times (predictive summaries, ArviZ export) see draws
    ``order[0..k-1]``; :meth:`select` sets the order and restarts the count.
    """

    def __init__(self, draws: dict[str, torch.Tensor]) -> None:
        self.draws = draws  # site -> (n_draws, *site shape), chain-major
        self.n_draws = next(iter(draws.values())).shape[0]
        self.order = np.arange(self.n_draws)
        self.calls = 0

    def select(self, order: np.ndarray) -> None:
        """Replay the draws ``order`` from the next call on."""
        self.order, self.calls = np.asarray(order), 0

    def __call__(self, data: TensorData, subsample_size: int | None = None) -> None:
        i = int(self.order[self.calls % len(self.order)])
        self.calls += 1
        for name, values in self.draws.items():
            value = values[i].to(data.device)
            pyro.sample(name, dist.Delta(value, event_dim=value.dim()))


# ------------------------------------------------------------------------------- result
@dataclass
class NutsFit:
    """Posterior draws of a model's latent variables by NUTS, with their diagnostics.

    Status: experimental.

    Attributes
    ----------
    model : ProbabilisticModel
        A copy of the model prepared on ``train`` (code spaces, scaling, features) whose
        guide replays the MCMC draws, so that everything built on guide draws works on it.
        It cannot be saved with :meth:`ProbabilisticModel.save`.
    train : DrugResponseData
        The rows the sampler conditioned on.
    samples : dict of str to ndarray
        Every named latent (the model's :meth:`unpack_sites` names), of shape
        (n_chains, n_draws, *shape), in the model's standardised units.
    sample_stats : dict of str to ndarray
        Per draw, shape (n_chains, n_draws): ``diverging``, ``n_steps`` (leapfrog steps),
        ``tree_depth``, ``acceptance_rate``, ``step_size`` and ``lp`` (log density in
        the unconstrained space, up to a constant).
    rhat, ess_bulk, ess_tail : dict of str to ndarray
        ArviZ's rank-normalised split R-hat and bulk and tail effective sample sizes,
        elementwise per named latent.
    settings : dict
        The sampler settings.
    elapsed : float
        Wall-clock seconds of sampling, all chains.
    """

    model: Any
    train: DrugResponseData
    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray]
    rhat: dict[str, np.ndarray]
    ess_bulk: dict[str, np.ndarray]
    ess_tail: dict[str, np.ndarray]
    settings: dict = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def num_chains(self) -> int:
        """Number of chains."""
        return int(self.sample_stats["diverging"].shape[0])

    @property
    def num_draws(self) -> int:
        """Draws per chain, after warm-up."""
        return int(self.sample_stats["diverging"].shape[1])

    @property
    def divergences(self) -> int:
        """Divergent transitions after warm-up, all chains together."""
        return int(self.sample_stats["diverging"].sum())

    def summary(self) -> pd.DataFrame:
        """One row per named latent: size, worst R-hat, smallest bulk and tail ESS."""
        rows = []
        for name, value in self.samples.items():
            rows.append(
                {
                    "variable": name,
                    "size": int(np.prod(value.shape[2:], dtype=int)),
                    "rhat_max": _nanreduce(np.nanmax, self.rhat[name]),
                    "ess_bulk_min": _nanreduce(np.nanmin, self.ess_bulk[name]),
                    "ess_tail_min": _nanreduce(np.nanmin, self.ess_tail[name]),
                }
            )
        return pd.DataFrame(rows).set_index("variable")

    def posterior_mean(self) -> dict[str, np.ndarray]:
        """Posterior mean of every named latent over all chains and draws."""
        return {k: v.mean(axis=(0, 1)) for k, v in self.samples.items()}

    def posterior_sd(self) -> dict[str, np.ndarray]:
        """Posterior sd of every named latent over all chains and draws."""
        return {k: v.std(axis=(0, 1)) for k, v in self.samples.items()}

    def predict(
        self,
        pairs: DrugResponseData | pd.DataFrame,
        *,
        level: float = 0.9,
        num_samples: int | None = None,
        seed: int = 0,
        quantiles: tuple[float, ...] = (),
    ) -> pd.DataFrame:
        """Predictive distribution of (task, cell, drug) pairs, mixed over the MCMC draws.

        The model is replayed with each draw exactly as it is with each guide draw after
        SVI, so the columns and their meaning are those of
        :meth:`ProbabilisticModel.predict`.

        Parameters
        ----------
        pairs : DrugResponseData or DataFrame
            Rows with columns task, cell, drug (and y, carried over when present).
        level : float, default=0.9
            Probability of the central interval ``lower``, ``upper``.
        num_samples : int, optional
            Use this many draws, evenly spaced over the chains (default: all).
        seed : int, default=0
            Seed of the draws of latents the program draws afresh (cells or drugs without
            training rows).
        quantiles : tuple of float, default=()
            Extra predictive quantiles, as columns ``q0.025`` and so on.

        Returns
        -------
        DataFrame
            Columns task, cell, drug, [y,] mean, sd, lower, upper and the extra quantiles,
            in the units of the training responses.
        """
        order = self._thinned(num_samples)
        guide = self.model.guide_
        guide.select(order)
        try:
            return self.model.predict(
                pairs, level=level, num_samples=len(order), seed=seed, quantiles=quantiles
            )
        finally:
            guide.select(np.arange(guide.n_draws))

    def _thinned(self, num_samples: int | None) -> np.ndarray:
        total = self.num_chains * self.num_draws
        if num_samples is None or num_samples >= total:
            return np.arange(total)
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2, got {num_samples}")
        return np.unique(np.linspace(0, total - 1, num_samples).round().astype(int))

    def to_inference_data(
        self, data: DrugResponseData | None = None, *, seed: int = 0, max_obs: int | None = 10_000
    ):
        """Export the draws as an :class:`arviz.InferenceData`, as SVI fits are exported.

        The groups, dimensions and coordinates are those of
        :func:`mtl4c_prob.evaluation.diagnostics.to_inference_data` (which builds them),
        with the real chains as ``chain`` and a ``sample_stats`` group holding
        ``diverging``, ``tree_depth``, ``n_steps``, ``acceptance_rate``, ``step_size`` and
        ``lp``.

        Parameters
        ----------
        data : DrugResponseData, optional
            Observations for the log-likelihood, posterior predictive and observed-data
            groups (default: the training rows).
        seed : int, default=0
            Seed of the posterior predictive noise.
        max_obs : int or None, default=10000
            At most this many observations, chosen by a hash of their keys.

        Returns
        -------
        arviz.InferenceData
        """
        from mtl4c_prob.evaluation.diagnostics import to_inference_data

        az = _az()
        total = self.num_chains * self.num_draws
        self.model.guide_.select(np.arange(total))
        idata = to_inference_data(
            self.model,
            self.train if data is None else data,
            num_samples=total,
            chains=self.num_chains,
            seed=seed,
            max_obs=max_obs,
        )
        stats = az.from_dict(sample_stats=self.sample_stats)
        idata.extend(stats)
        draws = (
            f"NUTS (pyro.infer.MCMC): {self.num_chains} chains x {self.num_draws} draws after "
            f"{self.settings['warmup']} warm-up steps, {self.divergences} divergences"
        )
        for group in idata.groups():
            idata[group].attrs.update(idata.posterior.attrs)
            idata[group].attrs["draws"] = draws
            idata[group].attrs["inference"] = "nuts"
        return idata


def _nanreduce(fn, values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).all():
        return math.nan
    return float(fn(values))


# --------------------------------------------------------------------------------- fit
def fit_nuts(
    model: ProbabilisticModel,
    train: DrugResponseData,
    *,
    num_samples: int = 500,
    warmup: int = 500,
    chains: int = 2,
    seed: int = 0,
    max_obs: int = 5000,
    target_accept: float = 0.8,
    max_tree_depth: int = 8,
    full_mass: bool = False,
    jit_compile: bool = True,
    progress_bar: bool = True,
) -> NutsFit:
    r"""Sample the posterior of ``model`` given ``train`` by NUTS, as a reference for SVI.

    The sampler runs on ``model.model``, the program SVI fits, after the model's code
    spaces, per-task scaling and features are prepared from ``train`` (on a copy; the
    model passed in is left as it is). Chains run one after the other in this process,
    chain ``c`` seeded from ``seed`` and ``c``, each started from a random point in
    (-2, 2) of the unconstrained space.

    Parameters
    ----------
    model : ProbabilisticModel
        A model whose every unknown is a latent sample site (no point-estimated weights);
        fitted or not (only its settings are used).
    train : DrugResponseData
        Rows to condition on, at most ``max_obs`` of them.
    num_samples : int, default=500
        Draws kept per chain.
    warmup : int, default=500
        Warm-up (adaptation) steps per chain, discarded.
    chains : int, default=2
        Number of chains; R-hat needs at least two.
    seed : int, default=0
        Seed of the chains.
    max_obs : int, default=5000
        Refuse larger data: NUTS costs a full pass over the rows per leapfrog step.
    target_accept : float, default=0.8
        Target acceptance statistic of step-size adaptation; raise it (0.9, 0.95) when
        there are divergences.
    max_tree_depth : int, default=8
        At most :math:`2^{\text{depth}} - 1` leapfrog steps per draw.
    full_mass : bool, default=False
        Adapt a dense mass matrix (better for strongly correlated posteriors, costs
        O(d^2) memory in the number of latent coordinates d).
    jit_compile : bool, default=True
        Compile the potential energy with the PyTorch JIT: two to three times faster per
        leapfrog step on the mean-effects model, for a second or two of compiling per
        chain. Pass False for a program the tracer cannot follow.
    progress_bar : bool, default=True
        Show Pyro's progress bar per chain.

    Returns
    -------
    NutsFit

    Raises
    ------
    TypeError
        If ``model`` or ``train`` has the wrong type.
    ValueError
        If ``train`` has more than ``max_obs`` rows, a setting is out of range, or the
        model has point-estimated parameters (``pyro.param`` or ``pyro.module``), which
        NUTS cannot sample.
    NotImplementedError
        For a model fitted per task (``multitask=False`` with several tasks).

    Warns
    -----
    DiagnosticWarning
        When some R-hat exceeds 1.05 or there are divergent transitions.

    Notes
    -----
    Cost: every leapfrog step evaluates the program and its gradient on all rows, and
    Pyro's NUTS adds about a millisecond of Python per step, so small models cost 1-3 ms
    per step on one CPU thread. The geometry sets the number of steps per draw. Measured
    (JIT, one thread, shared 2-core machine): a conjugate normal-means model takes about
    7 steps per draw; ``MeanEffects(noise="task")`` on 259 rows (44 latents) 27 steps at
    2.3 ms; ``MeanEffects()`` with its default per-cell and per-drug log-noise deviations,
    two tasks and 263 rows 185 steps (the deviations and their scales form funnels), and
    ``BayesianMF(rank=2)`` on the same rows hits the depth limit (255 steps) with R-hat
    up to 1.25 after 100 draws: factors are identified only up to rotation and sign, so
    chains of a factorisation need not agree even when each samples well.
    """
    from mtl4c_prob.models import ProbabilisticModel

    if not isinstance(model, ProbabilisticModel):
        raise TypeError(f"model must be a ProbabilisticModel, got {type(model).__name__}")
    _check_settings(train, num_samples, warmup, chains, max_obs, target_accept, max_tree_depth)
    if not model.multitask and train.n_tasks > 1:
        raise NotImplementedError(
            "fit_nuts samples one joint posterior; a model with multitask=False fits one copy "
            "per task: pass each task's rows separately, or use multitask=True"
        )

    with local_params():
        work = model._clone()
        work._prepare(train)
        work.device_ = torch.device("cpu")
        work._setup(train, work.device_)
        data = work._tensors(train, work.device_, with_y=True)
        _refuse_point_weights(work, data)

        settings = {
            "method": "nuts",
            "num_samples": num_samples,
            "warmup": warmup,
            "chains": chains,
            "seed": seed,
            "target_accept": target_accept,
            "max_tree_depth": max_tree_depth,
            "full_mass": full_mass,
            "jit_compile": jit_compile,
        }
        logger.info(
            "NUTS fit of %s: n_obs=%d n_tasks=%d n_cells=%d n_drugs=%d chains=%d "
            "warmup=%d draws=%d seed=%d",
            type(model).__name__,
            data.n_obs,
            data.n_tasks,
            data.n_cells,
            data.n_drugs,
            chains,
            warmup,
            num_samples,
            seed,
        )
        start = time.perf_counter()
        runs = [
            _run_chain(work, data, settings, chain_seed, progress_bar)
            for chain_seed in np.random.SeedSequence(seed).generate_state(chains)
        ]
        elapsed = time.perf_counter() - start

    return _assemble(work, train, runs, settings, elapsed)


def _check_settings(train, num_samples, warmup, chains, max_obs, target_accept, depth) -> None:
    """Validate the arguments of :func:`fit_nuts`."""
    if not isinstance(train, DrugResponseData):
        raise TypeError(f"train must be a DrugResponseData, got {type(train).__name__}")
    if train.n_obs == 0:
        raise DataError("the training data has no rows")
    if train.n_obs > max_obs:
        raise ValueError(
            f"train has {train.n_obs} rows, more than max_obs={max_obs}: NUTS evaluates the "
            "likelihood of every row in each leapfrog step; sample a subset of the rows "
            "(e.g. some cells or drugs), or raise max_obs if you can wait"
        )
    for name, value, least in (("num_samples", num_samples, 1), ("warmup", warmup, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if chains < 1:
        raise ValueError(f"chains must be at least 1, got {chains}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    if depth < 1:
        raise ValueError(f"max_tree_depth must be at least 1, got {depth}")


def _refuse_point_weights(model, data: TensorData) -> None:
    """Raise when the program has pyro.param / pyro.module sites, which NUTS cannot sample."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model.model, param_only=True).get_trace(data)
    names = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    if names:
        raise ValueError(
            f"model {model.name!r} has point-estimated parameters ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) that NUTS cannot sample; fit a model "
            "without point weights, e.g. mf or mean, or use bayesian='all'"
        )


def _run_chain(model, data: TensorData, settings: dict, chain_seed: int, progress_bar: bool):
    """One chain: the kept site draws (n_draws, *site shape) and per-draw statistics."""
    pyro.set_rng_seed(int(chain_seed))
    kernel = _CountingNUTS(
        model.model,
        target_accept_prob=settings["target_accept"],
        max_tree_depth=settings["max_tree_depth"],
        full_mass=settings["full_mass"],
        jit_compile=settings["jit_compile"],
        ignore_jit_warnings=True,
        init_strategy=init_to_uniform(radius=2.0),
    )
    recorder = _StatsRecorder()
    mcmc = MCMC(
        kernel,
        num_samples=settings["num_samples"],
        warmup_steps=settings["warmup"],
        num_chains=1,
        hook_fn=recorder,
        disable_progbar=not progress_bar,
    )
    mcmc.run(data)
    draws = {k: v[0].detach() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    return draws, recorder.arrays()


def _assemble(model, train, runs, settings: dict, elapsed: float) -> NutsFit:
    """Stack the chains, name the latents, compute diagnostics, wire the replay guide."""
    sites = {k: torch.stack([draws[k] for draws, _ in runs]) for k in runs[0][0]}
    stats = {k: np.stack([s[k] for _, s in runs]) for k in runs[0][1]}
    named = {k: v.cpu().numpy() for k, v in model.unpack_sites(sites).items() if v[0, 0].numel()}
    rhat, ess_bulk, ess_tail = _convergence(named)

    # The prepared copy replays the draws (chain-major) wherever a guide is expected.
    n_chains, n_draws = settings["chains"], settings["num_samples"]
    flat = {k: v.reshape(n_chains * n_draws, *v.shape[2:]) for k, v in sites.items()}
    model.guide_ = _DrawGuide(flat)
    model.guide_name_ = "nuts-draws"
    model.fit_result_ = FitResult(
        steps=settings["warmup"] + n_draws,
        elapsed=elapsed,
        device="cpu",
        settings=dict(settings),
    )
    fit = NutsFit(
        model=model,
        train=train,
        samples=named,
        sample_stats=stats,
        rhat=rhat,
        ess_bulk=ess_bulk,
        ess_tail=ess_tail,
        settings=settings,
        elapsed=elapsed,
    )
    _report(fit)
    return fit


def _convergence(named: dict[str, np.ndarray]):
    """Elementwise R-hat and bulk/tail ESS of every named latent (chain, draw, ...)."""
    az = _az()
    rhat, ess_bulk, ess_tail = {}, {}, {}
    with warnings.catch_warnings():
        # One chain, or constant elements, give NaN with ArviZ's own warnings.
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset(named)
        if ds.sizes["draw"] < 4:
            nan = {k: np.full(v.shape[2:], np.nan) for k, v in named.items()}
            return nan, dict(nan), dict(nan)
        results = (
            az.rhat(ds, method="rank"),
            az.ess(ds, method="bulk"),
            az.ess(ds, method="tail"),
        )
    for name in named:
        rhat[name], ess_bulk[name], ess_tail[name] = (np.asarray(r[name]) for r in results)
    return rhat, ess_bulk, ess_tail


def _report(fit: NutsFit) -> None:
    """Log the outcome; warn on divergences and R-hat above :data:`RHAT_BAD`."""
    table = fit.summary()
    worst = _nanreduce(np.nanmax, table["rhat_max"].to_numpy())
    logger.info(
        "NUTS done: %d chains x %d draws in %.1f s, %d divergences, max R-hat %.3f, "
        "min bulk ESS %.0f",
        fit.num_chains,
        fit.num_draws,
        fit.elapsed,
        fit.divergences,
        worst,
        _nanreduce(np.nanmin, table["ess_bulk_min"].to_numpy()),
    )
    if fit.num_chains < 2:
        warn_external(
            "NUTS with one chain: R-hat is undefined; run chains=2 or more to check mixing",
            DiagnosticWarning,
        )
    elif worst > RHAT_BAD:
        bad = table.index[table["rhat_max"] > RHAT_BAD].tolist()
        warn_external(
            f"NUTS has not converged: R-hat up to {worst:.3f} (> {RHAT_BAD}) for {bad[:5]}; "
            "run longer warm-up, more draws, or reparameterise",
            DiagnosticWarning,
        )
    if fit.divergences:
        warn_external(
            f"NUTS had {fit.divergences} divergent transitions after warm-up; the draws may "
            "be biased: raise target_accept (e.g. 0.95)",
            DiagnosticWarning,
        )
