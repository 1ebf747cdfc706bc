"""Exact Gaussian-process regression over cell and drug inputs, for small problems."""

from __future__ import annotations

import logging
import os
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.inference import SVIConfig, resolve_device
from mtl4c_prob.models._gp_base import CHUNK, _GPBase
from mtl4c_prob.models._gp_structured import RowCovariance, structured_log_marginal
from mtl4c_prob.models._kernels import reference_distances

logger = logging.getLogger(__name__)

__all__ = ["ExactGP"]

SOLVERS = ("auto", "cholesky", "cg")
#: Rows above which ``solver="auto"`` trains by conjugate gradients (separable kernels).
CG_MIN_OBS = 3000


class ExactGP(_GPBase):
    r"""Exact Gaussian-process regression over cell and drug inputs, for small problems.

    Status: experimental.

    The counterpart of the original toolkit's ``ExactGPRegression`` and
    ``ExactGPCompositeKernelRegression``. The generative story is that of
    :class:`SparseGP` without the inducing approximation, with the drug effects
    :math:`b_{td}` (a Gaussian random effect) and :math:`f` integrated out: the training
    responses of each fit are jointly

    .. math::

        y \sim N\big(m_t,\; K + B + \mathrm{diag}(\sigma_{td}^2)\big), \qquad
        B_{nn'} = [d_n = d_{n'}] \, (\sigma_b^2 + [t_n = t_{n'}] \, \tau_{t_n}^2)
            \; [+ \, [c_n = c_{n'}] \, \sigma_c^2],

    with :math:`K` the kernel of the rows' inputs. This marginal likelihood (the
    MultivariateNormal over the training rows) is written per row by the chain rule,
    :math:`y_n \mid y_{<n} \sim N(y_n - L_{nn} \zeta_n, L_{nn}^2)` with :math:`L` the
    Cholesky factor of the covariance and :math:`\zeta = L^{-1} (y - m)`, so its terms
    sum exactly to the MultivariateNormal log density while the likelihood site ``obs``
    stays in the ``observations`` plate. Evaluated without gradients (ArviZ export,
    posterior predictive checks), the training rows get their exact leave-one-out
    predictive instead, so pointwise log-likelihoods are LOO predictive densities.
    The hyperparameters (kernel lengthscales and variances, :math:`\sigma_b`,
    :math:`\tau`, offsets, noise) have the priors of :class:`SparseGP` and are fitted by
    SVI: by default as MAP point estimates (``guide="delta"`` in ``fit_defaults``;
    ``guide="normal"`` gives an AutoNormal posterior over them, at one Cholesky per
    predictive draw).

    Prediction conditions on the stored training rows: for new rows, the model records
    the GP posterior predictive :math:`\mu_* = m_t + K_{*f} \Sigma^{-1} (y - m)` and
    :math:`\sigma_*^2 = k_{**} + \sigma_b^2 (+\tau_t^2) - K_{*f} \Sigma^{-1} K_{f*} +
    \sigma_{td}^2` as ``loc`` and ``scale``, for any cells with features (unseen cells
    included) and, with drug features, unseen drugs (their drug effect then comes from
    its prior, adding :math:`\sigma_b^2`). The training rows (codes and standardised
    responses) are saved with the model.

    Parameters
    ----------
    kernel, composite, ard, drug_input, cell_effects, multitask
        As for :class:`SparseGP`.
    max_obs : int, default=30000
        Largest number of rows a fit may hold (prediction factors its n x n covariance
        once); a larger fit, or one whose covariance would not fit in the available
        memory, stops before allocating with a
        :class:`~mtl4c_prob.exceptions.DataError` that points at ``sgp``.
    solver : {"auto", "cholesky", "cg"}, default="auto"
        How training evaluates the marginal likelihood. ``"cholesky"``: the exact chain
        rule above, O(n^3) per step. ``"cg"``: preconditioned conjugate gradients and
        stochastic Lanczos quadrature on the structured covariance (see
        :mod:`~mtl4c_prob.models._gp_structured`): every product with the covariance is
        a scatter onto the cells x drugs grid, the two kernel blocks and a gather, so a
        step costs O(I^2 J + I J^2) per probe vector and O(n) memory; the likelihood and
        its gradient are unbiased stochastic estimates. Needs a separable kernel
        (``composite`` "product" or "sum"). ``"auto"``: ``"cg"`` for separable kernels
        on fits of more than 3,000 rows, else ``"cholesky"``. Prediction and the
        exports are exact (Cholesky) either way.
    lengthscale_prior_loc, lengthscale_prior_scale, variance_prior_loc, variance_prior_scale
        Kernel priors (defaults 1.0, 1.0, 0.5, 1.0).
    bias_scale, offset_scale, task_scale, noise, noise_scale, noise_spread
        As for :class:`SparseGP`.
    jitter : float, default=1e-4
        Diagonal jitter of the covariance, relative to its mean diagonal.

    Notes
    -----
    With ``solver="cholesky"`` a training step costs O(n^3) time and O(n^2) memory (n
    training rows of the fit): on one core of a shared 2-core machine (float32) about
    0.1 s per step for 450 rows and 1-3 s for 1,800 rows (the backward pass through the
    Cholesky factor dominates). With ``solver="cg"`` a step on 24,000 GDSC2 rows (120
    cells x 286 drugs) takes about 1 s on 2 cores. Prediction factors the training
    covariance once (O(n^3), about 50 s for 24,000 rows on 2 cores, 2.2 GiB per n x n
    float32 buffer, 5.5 GiB at peak) and costs O(n^2) per row after that; ``max_obs``
    bounds that memory. The whole ``fit`` command with 50 steps on those rows (6,000 test
    rows predicted, a 10,000-row ArviZ export, the report) took 3.2 minutes.
    During training with ``solver="cg"`` the model records each training row's prior
    marginal moments as ``loc``/``scale`` (the joint likelihood is a ``pyro.factor``
    site ``marginal_likelihood``; the per-row ``obs`` site is masked out). With a point-estimate
    guide every predictive draw has the same hyperparameters, so the factorisation and
    the moments of the last rows predicted are reused across draws (compared by value,
    so nothing stale is reused).
    Censored rows are not supported (the marginal likelihood would no longer be
    Gaussian); use :class:`SparseGP`. Fits run full batch only.
    """

    name = "gp"
    fit_defaults = {"steps": 300, "lr": 0.05, "guide": "delta"}
    _latent_drug_effects = False

    def __init__(
        self,
        *,
        kernel: str = "rbf",
        composite: str = "product",
        ard: bool = False,
        drug_input: str = "auto",
        cell_effects: bool = False,
        multitask: bool = True,
        max_obs: int = 30_000,
        solver: str = "auto",
        lengthscale_prior_loc: float = 1.0,
        lengthscale_prior_scale: float = 1.0,
        variance_prior_loc: float = 0.5,
        variance_prior_scale: float = 1.0,
        bias_scale: float = 1.0,
        offset_scale: float = 1.0,
        task_scale: float = 0.3,
        noise: str = "drug",
        noise_scale: float = 1.0,
        noise_spread: float = 0.5,
        jitter: float = 1e-4,
    ) -> None:
        super().__init__(multitask=multitask)
        if int(max_obs) < 2:
            raise ValueError(f"max_obs must be at least 2, got {max_obs}")
        self.max_obs = int(max_obs)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cg" and composite == "none":
            raise ValueError(
                "solver='cg' needs a separable kernel (composite 'product' or 'sum'): with "
                "composite='none' the covariance has no cell x drug structure"
            )
        self.solver = solver
        self._init_common(
            kernel=kernel,
            composite=composite,
            ard=ard,
            drug_input=drug_input,
            cell_effects=bool(cell_effects),
            lengthscale_prior_loc=lengthscale_prior_loc,
            lengthscale_prior_scale=lengthscale_prior_scale,
            variance_prior_loc=variance_prior_loc,
            variance_prior_scale=variance_prior_scale,
            bias_scale=bias_scale,
            offset_scale=offset_scale,
            task_scale=task_scale,
            noise=noise,
            noise_scale=noise_scale,
            noise_spread=noise_spread,
            jitter=jitter,
        )

    def fit(
        self,
        train: DrugResponseData,
        val: DrugResponseData | None = None,
        config: SVIConfig | None = None,
        **config_kwargs: Any,
    ) -> ExactGP:
        """Fit the hyperparameters by SVI on the exact marginal likelihood (full batch).

        As :meth:`ProbabilisticModel.fit`, after checking that the n x n covariance of
        each fit (all rows, or each task's with ``multitask=False``) fits.

        Returns
        -------
        self

        Raises
        ------
        DataError
            When a fit has more than ``max_obs`` rows or its covariance would exceed the
            available memory; raised before anything is allocated.
        ValueError
            For minibatches (``batch_size`` below the rows of a fit) or censored rows.
        """
        if isinstance(train, DrugResponseData):
            self._check_size(train, config, config_kwargs)
        self._fit_guard(config, config_kwargs)
        return super().fit(train, val, config, **config_kwargs)

    def _check_size(self, train, config, config_kwargs) -> None:
        counts = train.frame["task"].value_counts()
        n = int(train.n_obs if self.multitask or len(counts) == 1 else counts.max())
        # float32 n x n buffers: about eight to train by Cholesky (K, L, gathers,
        # gradients), three to factor the covariance once for prediction.
        need = (3 if self._uses_cg(n) else 8) * 4 * n * n
        device = config_kwargs.get("device", config.device if config else "auto")
        free = _free_memory(resolve_device(device))
        if n > self.max_obs or (free is not None and need > free):
            why = (
                f"more than max_obs={self.max_obs}"
                if n > self.max_obs
                else f"about {need / 2**30:.1f} GiB for its covariance, more than the "
                f"{free / 2**30:.1f} GiB available"
            )
            raise DataError(
                f"exact GP fit of {n} rows needs {why}; use the sparse GP (model 'sgp', "
                "--model sgp) for data of this size, or fit fewer rows"
            )
        batch = config_kwargs.get("batch_size", config.batch_size if config else None)
        if batch is not None and batch < n:
            raise ValueError(
                f"ExactGP fits full batch (its likelihood couples all rows); got batch_size="
                f"{batch} for {n} rows: drop batch_size or use 'sgp' for minibatches"
            )
        if "censor" in train.frame.columns and (train.frame["censor"] != 0).any():
            raise ValueError(
                "ExactGP does not support censored responses (the marginal likelihood is no "
                "longer Gaussian); use 'sgp', which handles them through the normal CDF"
            )

    def _uses_cg(self, n: int) -> bool:
        """Whether a fit of ``n`` rows trains by conjugate gradients."""
        if self.solver == "auto":
            return self.composite != "none" and n > CG_MIN_OBS
        return self.solver == "cg"

    # ------------------------------------------------------------ state
    def _setup(self, train: DrugResponseData, device: torch.device) -> None:
        """Kernel with data-scaled priors; the training rows the predictions condition on."""
        self.device_ = device
        rows = self._train_rows(train, device)
        self.train_rows_ = {k: rows[k] for k in ("task", "cell", "drug")}
        self.train_rows_["y"] = rows["data"].y
        inputs = self._inputs(rows["data"])
        self._build_kernel(
            reference_distances(self._rows_input(inputs, rows["cell"], rows["drug"]), *self._dims())
        )
        self._cache = None
        self._layout_cache = None

    def _get_fitted_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {f"train_{k}": v for k, v in self.train_rows_.items()}
        return {"reference": self.reference_}, tensors

    def _set_fitted_state(self, state, tensors, device) -> None:
        self.device_ = device
        self._layout_cache = None
        self._cache = None
        self.train_rows_ = {
            k: tensors[f"train_{k}"].to(device) for k in ("task", "cell", "drug", "y")
        }
        self._build_kernel(state["reference"])

    # ------------------------------------------------------------ model
    def model(self, data: TensorData, subsample_size: int | None = None) -> None:
        """Pyro program: marginal likelihood on the training rows, predictive on others."""
        self.kernel_.scope(self._program, data, subsample_size)

    def _is_training(self, data: TensorData) -> bool:
        tr = self.train_rows_
        return (
            data.y is not None
            and data.n_obs == len(tr["y"])
            and all(torch.equal(getattr(data, k), tr[k]) for k in ("task", "cell", "drug", "y"))
        )

    def _program(self, data: TensorData, subsample_size: int | None) -> None:
        if subsample_size is not None and subsample_size < data.n_obs:
            raise ValueError("ExactGP fits full batch; drop batch_size or use 'sgp'")
        z, sc, offset, log_noise = self._effects(data)
        inputs = self._inputs(data)
        grams = None
        if self.kernel_.separable:
            grams = self.kernel_.blocks(inputs[0], inputs[1])  # (I, I), (J, J)
        moments = (sc, offset, log_noise, inputs, grams)
        training = self._is_training(data)
        if training and torch.is_grad_enabled() and self._uses_cg(data.n_obs):
            loc, scale = self._structured(data, moments)
            with pyro.plate("observations", data.n_obs, device=data.device):
                pyro.deterministic("loc", loc)
                pyro.deterministic("scale", scale)
                # The joint likelihood is the factor above; the rows only carry the site.
                pyro.sample("obs", dist.Normal(loc, scale).mask(False), obs=data.y)
            return
        if training:
            loc, scale = self._marginal(data, moments)
        else:
            loc, scale = self._predictive(data, z, moments)
        with pyro.plate("observations", data.n_obs, device=data.device):
            pyro.deterministic("loc", loc)
            pyro.deterministic("scale", scale)
            pyro.sample("obs", dist.Normal(loc, scale), obs=data.y)

    def _gram(self, moments, a: tuple, b: tuple) -> torch.Tensor:
        """Covariance of f + drug effects between row sets ``a`` and ``b`` (task, cell, drug).

        Separable composites gather from the entity blocks (kernel evaluations on the
        cells and drugs only); "none" evaluates the kernel on the rows' inputs.
        """
        sc, inputs, grams = moments[0], moments[3], moments[4]
        (ta, ca, da), (tb, cb, db) = a, b
        if not torch.is_grad_enabled():
            return self._gram_lean(sc, inputs, grams, a, b)
        if grams is not None:
            K = self.kernel_.combine(grams[0][ca][:, cb], grams[1][da][:, db])
        else:
            K = self.kernel_(self._rows_input(inputs, ca, da), self._rows_input(inputs, cb, db))
        same_drug = (da[:, None] == db[None, :]).to(K.dtype)
        drug_var = sc["drug_bias_sd"] ** 2
        if "drug_bias_task_sd" in sc:
            task_var = sc["drug_bias_task_sd"][ta] ** 2
            drug_var = drug_var + (ta[:, None] == tb[None, :]).to(K.dtype) * task_var[:, None]
        K = K + drug_var * same_drug
        if "cell_bias_sd" in sc:
            K = K + sc["cell_bias_sd"] ** 2 * (ca[:, None] == cb[None, :]).to(K.dtype)
        return K

    def _structured(self, data: TensorData, moments) -> tuple:
        """Add the iterative log marginal likelihood as a factor; return prior moments."""
        sc, offset, log_noise, _, grams = moments
        t, c, d = data.task, data.cell, data.drug
        empty = offset.new_zeros(0)
        covariance = RowCovariance(
            grams[0],
            grams[1],
            sc["drug_bias_sd"] ** 2,
            sc["drug_bias_task_sd"] ** 2 if "drug_bias_task_sd" in sc else empty,
            sc["cell_bias_sd"] ** 2 if "cell_bias_sd" in sc else empty,
            task=t,
            cell=c,
            drug=d,
            n_tasks=self.n_tasks_,
            product=self.kernel_.composite == "product",
        )
        prior_var = covariance._diagonal()
        jitter = self.jitter * prior_var.detach().mean()
        noise_var = self._noise_var(log_noise, t, d) + jitter
        loc = offset[t]
        pyro.factor(
            "marginal_likelihood", structured_log_marginal(covariance, noise_var, data.y - loc)
        )
        return loc, (prior_var + noise_var).sqrt()

    def _gram_lean(self, sc, inputs, grams, a: tuple, b: tuple) -> torch.Tensor:
        """:meth:`_gram` without gradients, in place: two n x n buffers at most.

        The effect terms touch only the pairs of rows that share a drug (or a cell), so
        they are added at those pairs' indices rather than through dense masks.
        """
        (ta, ca, da), (tb, cb, db) = a, b
        if grams is not None:
            K = grams[0][ca][:, cb]
            side = grams[1][da][:, db]
            K.mul_(side) if self.kernel_.composite == "product" else K.add_(side)
            del side
        else:
            K = self.kernel_(self._rows_input(inputs, ca, da), self._rows_input(inputs, cb, db))
        i, j = (da[:, None] == db[None, :]).nonzero(as_tuple=True)
        values = (sc["drug_bias_sd"] ** 2).expand(i.shape[0])
        if "drug_bias_task_sd" in sc:
            task_var = sc["drug_bias_task_sd"][ta[i]] ** 2
            values = values + (ta[i] == tb[j]).to(K.dtype) * task_var
        K.index_put_((i, j), values.to(K.dtype), accumulate=True)
        if "cell_bias_sd" in sc:
            i, j = (ca[:, None] == cb[None, :]).nonzero(as_tuple=True)
            K.index_put_((i, j), (sc["cell_bias_sd"] ** 2).expand(i.shape[0]), accumulate=True)
        return K

    def _noise_var(self, log_noise, t, d) -> torch.Tensor:
        di = d if log_noise.shape[1] > 1 else torch.zeros_like(d)
        return torch.exp(2 * log_noise[t, di])

    def _marginal(self, data: TensorData, moments) -> tuple:
        """Moments of the training rows: chain rule when fitting, leave-one-out otherwise.

        With gradients (SVI), y_n | y_<n, whose densities sum to the marginal likelihood;
        without (ArviZ export, diagnostics), the exact leave-one-out predictive of each
        row, whose density is the row's LOO predictive density.
        """
        _, offset, log_noise, _, _ = moments
        t, c, d = data.task, data.cell, data.drug
        K = self._gram(moments, (t, c, d), (t, c, d))
        L = self._cholesky(K + torch.diag(self._noise_var(log_noise, t, d)))
        if torch.is_grad_enabled():
            return _chain_rule(L, data.y, offset[t])
        return _leave_one_out(L, data.y, offset[t])

    def _factor(self, z, moments) -> tuple:
        """Cholesky factor of the training covariance and its solve with the residuals."""
        sc, offset, log_noise, _, _ = moments
        key = [*z.values(), *sc.values(), *self.kernel_.hyperparameters().values()]
        if self._cache is not None and _same(self._cache["key"], key):
            return self._cache["L"], self._cache["alpha"]
        tr = self.train_rows_
        rows = (tr["task"], tr["cell"], tr["drug"])
        K = self._gram(moments, rows, rows)
        noise_var = self._noise_var(log_noise, tr["task"], tr["drug"])
        if torch.is_grad_enabled():
            L = self._cholesky(K + torch.diag(noise_var))
        else:  # in place: the training covariance can be the largest buffer of a fit
            K.diagonal().add_(noise_var)
            L = self._cholesky(K, inplace=True)
            del K
        resid = (tr["y"] - offset[tr["task"]])[:, None]
        alpha = torch.cholesky_solve(resid, L)[:, 0]
        if not torch.is_grad_enabled():
            self._cache = {"key": [k.detach() for k in key], "L": L, "alpha": alpha}
        return L, alpha

    def _predictive(self, data: TensorData, z, moments) -> tuple:
        """GP posterior predictive moments of the rows of ``data``, in chunks of rows."""
        log_noise = moments[2]
        L, alpha = self._factor(z, moments)
        rows = [data.task, data.cell, data.drug, *moments[3]]
        cached = self._cache.get("rows") if self._cache is not None else None
        if cached is not None and _same(cached[0], rows):
            f_loc, f_var = cached[1]
        else:
            f_loc, f_var = self._f_moments(data, moments, L, alpha)
            if self._cache is not None and not torch.is_grad_enabled():
                self._cache["rows"] = ([r.clone() for r in rows], (f_loc, f_var))
        return f_loc, (f_var + self._noise_var(log_noise, data.task, data.drug)).sqrt()

    def _f_moments(self, data: TensorData, moments, L, alpha) -> tuple:
        """Mean and variance of offset + drug effect + f at the rows of ``data``."""
        sc, offset, _, inputs, _ = moments
        tr = self.train_rows_
        train = (tr["task"], tr["cell"], tr["drug"])
        prior_var = self.kernel_(self._rows_input(inputs, data.cell[:1], data.drug[:1]), diag=True)
        floor = 1e-6 * float(prior_var.detach()[0])
        locs, variances = [], []
        for start in range(0, data.n_obs, CHUNK // 4):
            sl = slice(start, start + CHUNK // 4)
            t, c, d = data.task[sl], data.cell[sl], data.drug[sl]
            Ksf = self._gram(moments, (t, c, d), train)  # (B, n)
            V = torch.linalg.solve_triangular(L, Ksf.T, upper=False)  # (n, B)
            kss = prior_var + sc["drug_bias_sd"] ** 2
            if "cell_bias_sd" in sc:
                kss = kss + sc["cell_bias_sd"] ** 2
            if "drug_bias_task_sd" in sc:
                kss = kss + sc["drug_bias_task_sd"][t] ** 2
            locs.append(offset[t] + Ksf @ alpha)
            variances.append((kss - (V * V).sum(0)).clamp_min(floor))
        return torch.cat(locs), torch.cat(variances)


def _chain_rule(L: torch.Tensor, y: torch.Tensor, mean: torch.Tensor) -> tuple:
    r"""Moments of :math:`y_n \mid y_{<n}` under :math:`N(\text{mean}, L L^T)`.

    With :math:`\zeta = L^{-1} (y - \text{mean})`: loc :math:`y - \mathrm{diag}(L) \zeta`,
    scale :math:`\mathrm{diag}(L)`; their Normal log densities sum to the
    MultivariateNormal's.
    """
    zeta = torch.linalg.solve_triangular(L, (y - mean)[:, None], upper=False)[:, 0]
    scale = L.diagonal()
    return y - scale * zeta, scale


def _leave_one_out(L: torch.Tensor, y: torch.Tensor, mean: torch.Tensor) -> tuple:
    r"""Exact leave-one-out predictive moments under :math:`N(\text{mean}, L L^T)`.

    With :math:`\alpha = \Sigma^{-1} (y - \text{mean})`: loc :math:`y_n - \alpha_n /
    [\Sigma^{-1}]_{nn}`, scale :math:`[\Sigma^{-1}]_{nn}^{-1/2}` (Rasmussen & Williams,
    2006, eq. 5.12).
    """
    precision_diag = torch.cholesky_inverse(L).diagonal()
    alpha = torch.cholesky_solve((y - mean)[:, None], L)[:, 0]
    return y - alpha / precision_diag, precision_diag.rsqrt()


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y.detach()) for x, y in zip(a, b, strict=True)
    )


def _free_memory(device: torch.device) -> int | None:
    """Bytes available on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None
