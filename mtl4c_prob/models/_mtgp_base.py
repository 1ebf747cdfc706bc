"""Shared machinery of the multitask GPs: inputs, mean effects, GP lifecycle, readouts."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import effectful

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.inference import SVIConfig, local_params
from mtl4c_prob.models._base import ProbabilisticModel
from mtl4c_prob.models._kernels import DrugInputChoice
from mtl4c_prob.models._likelihoods import gaussian_likelihood
from mtl4c_prob.models._mf import _fresh, _rows
from mtl4c_prob.models._mtgp_modules import COMPOSITES, KERNELS
from mtl4c_prob.models._packing import Layout

logger = logging.getLogger(__name__)

__all__ = ["DRUG_INPUTS", "GP_NOISE", "OBJECTIVES"]

DRUG_INPUTS = ("auto", "features", "identity", "both")
GP_NOISE = ("task", "drug")
OBJECTIVES = ("elbo", "predictive")
#: Most rows :meth:`MultitaskGPBase.covariance` forms an (n, n) matrix for.
MAX_COVARIANCE_ROWS = 5000

#: Records a model-side torch parameter as a Pyro ``param`` site without Pyro's global
#: parameter store (as PyroModule does under ``module_local_params``), so that
#: :func:`~mtl4c_prob.inference.fit_svi` finds and optimises it.
_param_site = effectful(lambda name, value: value, type="param")


class MultitaskGPBase(DrugInputChoice, ProbabilisticModel):
    """What the three multitask GPs share: inputs, mean effects, GP lifecycle, readouts.

    Status: experimental. Subclasses implement ``_new_module`` (the GPyTorch module) and
    ``_initialise_tasks`` (the starting task covariance); see
    :class:`~mtl4c_prob.models._mtgp.ICMGP`.
    """

    requires_cell_features = True
    fit_defaults = {"steps": 1000, "lr": 0.02, "batch_size": 2048, "init_scale": 0.05}
    #: Whether the task noise sds are Pyro latents (False: the GPyTorch likelihood's).
    _latent_noise: ClassVar[bool] = True

    def _init_common(self, **options: Any) -> None:
        checks = {
            "kernel": tuple(KERNELS),
            "composite": COMPOSITES,
            "drug_input": DRUG_INPUTS,
            "noise": GP_NOISE,
        }
        for arg, choices in checks.items():
            if options[arg] not in choices:
                raise ValueError(f"{arg} must be one of {choices}, got {options[arg]!r}")
        if int(options["n_inducing"]) < 1:
            raise ValueError(f"n_inducing must be at least 1, got {options['n_inducing']}")
        for arg, value in options.items():
            if arg == "interaction_scale":
                if not value >= 0:
                    raise ValueError(f"{arg} must be 0 (off) or positive, got {value}")
                value = float(value)
            elif arg.endswith(("_loc", "_scale", "_spread")) or arg == "jitter":
                if not value > 0:
                    raise ValueError(f"{arg} must be positive, got {value}")
                value = float(value)
            setattr(self, arg, value)
        self.n_inducing, self.ard, self.bias = int(self.n_inducing), bool(self.ard), bool(self.bias)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        #: Initial hyperparameters (``lengthscale``, ``variance``, ``noise``) of the next
        #: fit; None starts at the prior medians (see :func:`find_initial_conditions`).
        self.initial_values: dict[str, float] | None = None

    def _clone(self, **overrides: Any) -> MultitaskGPBase:
        new = super()._clone(**overrides)
        new.initial_values = self.initial_values
        return new

    def fit(
        self,
        train: DrugResponseData,
        val: DrugResponseData | None = None,
        config: SVIConfig | None = None,
        **config_kwargs: Any,
    ) -> MultitaskGPBase:
        """Fit by SVI, in minibatches of ``fit_defaults["batch_size"]`` rows per task.

        As :meth:`ProbabilisticModel.fit`, except for the default minibatch (no
        ``config`` and ``batch_size`` absent or None, as the command line passes it when
        ``--batch-size`` is not given): a joint fit of T tasks takes T times
        ``fit_defaults["batch_size"]`` rows per step, so that each task gets as many rows
        per step as in a per-task fit (``multitask=False``). With half as many, the joint
        fits were behind the per-task fits on GDSC1 + GDSC2 with every row (RMSE 1.1875
        against 1.1857 on GDSC1). With as many, ICM is ahead on both screens on two of
        three splits, and behind on GDSC2 on the third by 0.004 RMSE
        (benchmarks/README.md).

        Returns
        -------
        self
        """
        if config is None and config_kwargs.get("batch_size") is None:
            config_kwargs.pop("batch_size", None)
            if self.multitask and isinstance(train, DrugResponseData):
                n_tasks = max(1, int(train.frame["task"].nunique()))
                config_kwargs["batch_size"] = self.fit_defaults["batch_size"] * n_tasks
        return super().fit(train, val, config, **config_kwargs)

    # ------------------------------------------------------------ inputs
    def _prepare(self, train: DrugResponseData) -> None:
        self._auto_drug = train.drug_features is not None
        self._layout_cache = None
        super()._prepare(train)

    def _setup(self, train: DrugResponseData, device: torch.device) -> None:
        """Input scales from the training entities; the GP module is built at the first call."""
        seen_c, seen_d = torch.as_tensor(self.seen_cells_), torch.as_tensor(self.seen_drugs_)
        cell_x = _table(self.cell_table_, self.cells_)
        self.input_scale_ = {"cell": 1.0 / _median_distance(cell_x[seen_c])}
        rms = float(cell_x[seen_c].pow(2).mean().sqrt()) if bool(seen_c.any()) else 1.0
        self.interaction_input_scale_ = 1.0 / rms if rms > 1e-12 else 1.0
        dims = {"cell": cell_x.shape[1]}
        if self.drug_table_ is not None:
            drug_x = _table(self.drug_table_, self.drugs_)
            self.input_scale_["drug"] = 1.0 / _median_distance(drug_x[seen_d])
            dims["drug"] = drug_x.shape[1]
        if self._uses_identity():
            self.input_scale_["identity"] = 1.0 / math.sqrt(2.0)
            dims["identity"] = int(seen_d.sum()) + 1
        self.dims_ = dims
        self.gp_ = None
        self._effect_start_ = self._effect_start(train)
        self._task_start_ = self._residual_correlation(train)
        logger.info(
            "%s: kernel=%s composite=%s ard=%s inputs %s, %d inducing inputs%s",
            self.name,
            self.kernel,
            self.composite,
            self.ard,
            dims,
            self.n_inducing,
            " shared by the tasks" if self.name == "icm" else "",
        )

    def _inputs(self, data: TensorData, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Scaled input rows ``[x_c, v_d, e_d]`` of cells ``c`` and drugs ``d``, (n, D)."""
        parts = [data.cell_x[c] * self.input_scale_["cell"]]
        if "drug" in self.input_scale_:
            parts.append(data.drug_x[d] * self.input_scale_["drug"])
        if "identity" in self.input_scale_:
            seen = self.seen_mask("drug", data.n_drugs, data.device)
            column = torch.where(seen, torch.cumsum(seen.long(), 0) - 1, int(seen.sum()))
            width = self.dims_["identity"]
            onehot = torch.nn.functional.one_hot(column[d], width).to(data.cell_x.dtype)
            parts.append(onehot * self.input_scale_["identity"])
        return torch.cat(parts, dim=-1)

    def _joint_reference(self, data: TensorData) -> float:
        """Median distance between (a seeded sample of) training input rows."""
        gen = torch.Generator().manual_seed(0)
        rows = torch.randperm(data.n_obs, generator=gen)[:1000].to(data.device)
        return _median_distance(self._inputs(data, data.cell[rows], data.drug[rows]).cpu())

    # --------------------------------------------------------- GP module
    def _new_module(self, inducing: torch.Tensor) -> torch.nn.Module:
        """GPyTorch module around inducing inputs ``inducing``; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _new_module")

    def _initial_inducing(self, data: TensorData) -> torch.Tensor:
        """Inducing inputs at a random subset of training rows (subclasses may override)."""
        rows = torch.randperm(data.n_obs, device=data.device)[: self.n_inducing]
        return self._jittered(self._inputs(data, data.cell[rows], data.drug[rows]))

    @staticmethod
    def _jittered(X: torch.Tensor) -> torch.Tensor:
        # Rows with equal inputs (two drugs without structure) would make K_uu singular.
        return X + 1e-3 * torch.randn_like(X)

    def _module(self, data: TensorData) -> torch.nn.Module:
        """Return the GP module, built at the first call inside ``fit_svi`` (after its seed)."""
        if self.gp_ is None:
            if data.y is None:
                raise RuntimeError("the GP module is built from the training rows; fit first")
            self.joint_reference_ = self._joint_reference(data)
            inducing = self._initial_inducing(data)
            self.inducing_shape_ = tuple(inducing.shape)
            self.gp_ = self._new_module(inducing).to(data.device)
            self._initialise(self.gp_, self.initial_values or {})
            self._initialise_variational(self.gp_, data)
        gp = self.gp_
        # GPyTorch memoises the prior and the Cholesky factor across calls: clear them so
        # that each SVI step builds its own graph (else "backward through the graph a
        # second time").
        for strategy in gp.strategies():
            strategy._clear_cache()
        for name, value in gp.named_parameters():
            _param_site(f"gp.{name}", value, name=f"gp.{name}")
        return gp

    def _lengthscale_medians(self, gp) -> dict[str, float]:
        ref = {"joint": self.joint_reference_}
        return {n: self.lengthscale_prior_loc * ref.get(n, 1.0) for n in gp.input_kernel.parts}

    def _initialise(self, gp, init: dict[str, float]) -> None:
        """Set the starting hyperparameters: prior medians, or ``init`` where given."""
        factor = init.get("lengthscale", self.lengthscale_prior_loc) / self.lengthscale_prior_loc
        with torch.no_grad():
            kernels = gp.input_kernel.base_kernels()
            for name, median in self._lengthscale_medians(gp).items():
                kernels[name].lengthscale = median * factor
            for name, scaled in gp.input_kernel.scale_kernels().items():
                scaled.outputscale = gp.input_kernel.scale_medians[name]
            self._initialise_tasks(gp, init.get("variance", self.variance_prior_loc))
            if not self._latent_noise:
                self._initialise_noise(gp, init.get("noise", 0.5))

    def _initialise_variational(self, gp, data: TensorData) -> None:
        """Start :math:`q(u)` at its optimum for the starting hyperparameters and effects.

        Fitted to the residuals of up to 4096 random training rows after the starting
        mean effects (:meth:`_effect_start`), with the starting noise variance.
        """
        rows = torch.randperm(data.n_obs, device=data.device)[:4096]
        t, c, d = data.task[rows], data.cell[rows], data.drug[rows]
        offset, drug = (torch.as_tensor(v, device=data.device) for v in self._effect_start_)
        r = data.y[rows] - offset[t] - drug[t, d]
        noise = (self.initial_values or {}).get("noise", 0.5)
        gp.start_variational(self._inputs(data, c, d), t, r, noise**2, data.n_obs / len(rows))

    def _initialise_tasks(self, gp, variance: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _initialise_tasks")

    def _log_prior(self, gp) -> torch.Tensor:
        """Log prior density of the kernel hyperparameters and task variances."""
        kernels = gp.input_kernel.base_kernels()
        lp = 0.0
        for name, median in self._lengthscale_medians(gp).items():
            prior = dist.LogNormal(math.log(median), self.lengthscale_prior_scale)
            lp = lp + prior.log_prob(kernels[name].lengthscale).sum()
        for name, scaled in gp.input_kernel.scale_kernels().items():
            median = gp.input_kernel.scale_medians[name]
            prior = dist.LogNormal(math.log(median), self.variance_prior_scale)
            lp = lp + prior.log_prob(scaled.outputscale).sum()
        prior = dist.LogNormal(math.log(self.variance_prior_loc), self.variance_prior_scale)
        return lp + prior.log_prob(torch.diagonal(gp.task_covariance())).sum()

    # ------------------------------------------------------- mean effects
    def _layouts(self) -> dict[str, Layout]:
        """Blocks of the packed sites ``z`` (standard normals) and ``scales`` (half-normals)."""
        if getattr(self, "_layout_cache", None) is not None:
            return self._layout_cache
        T, J = self.n_tasks_, self.n_drugs_
        z, sc = Layout(), Layout()
        if self.bias:
            z.add("offset")
            if T > 1:
                z.add("task_offset_z", T)
                sc.add("task_offset_sd", scale=self.offset_scale)
        z.add("drug_z", J)
        sc.add("drug_sd", scale=self.bias_scale)
        if T > 1:
            z.add("drug_task_z", T, J)
            sc.add("drug_task_sd", T, scale=self.task_scale)
        if self.interaction_scale > 0:
            z.add("interaction_z", T, J, self.dims_["cell"])
            sc.add("interaction_sd", T, scale=self.interaction_scale)
        if self._latent_noise:
            sc.add("noise_sd", T, scale=self.noise_scale)
        if self.noise == "drug":
            z.add("drug_noise_z", T, J)
            sc.add("noise_spread", scale=self.noise_spread)
        self._layout_cache = {"z": z, "scales": sc}
        return self._layout_cache

    def _effect_start(self, train: DrugResponseData) -> tuple[np.ndarray, np.ndarray]:
        """Empirical task offsets (T,) and drug effects (T, J) of the standardised responses.

        Drugs without rows in a task take their mean over the other tasks (0 if none).
        """
        task, drug = train.codes("task"), train.codes("drug")
        y = self.scaler_.transform(train.frame["y"].to_numpy(float), task)
        T, J = self.n_tasks_, self.n_drugs_
        offset = np.bincount(task, y, T) / np.maximum(np.bincount(task, minlength=T), 1)
        sums = np.zeros((T, J))
        counts = np.zeros((T, J))
        np.add.at(sums, (task, drug), y - offset[task])
        np.add.at(counts, (task, drug), 1.0)
        shared = sums.sum(0) / np.maximum(counts.sum(0), 1)
        effect = np.where(counts > 0, sums / np.maximum(counts, 1), shared[None])
        if not self.bias:
            effect, offset = effect + offset[:, None], np.zeros(T)
        return offset.astype(np.float32), effect.astype(np.float32)

    def _residual_correlation(self, train: DrugResponseData) -> np.ndarray:
        """Correlation (T, T) between tasks of the residuals after the starting effects.

        Pairwise over the (cell, drug) pairs both tasks observe (0 with fewer than 10),
        projected to a positive-definite correlation matrix: the start of the task
        covariance, a method-of-moments estimate (noise pulls it towards zero).
        """
        task, drug = train.codes("task"), train.codes("drug")
        offset, effect = self._effect_start_
        y = self.scaler_.transform(train.frame["y"].to_numpy(float), task)
        frame = pd.DataFrame(
            {
                "pair": train.codes("cell") * self.n_drugs_ + drug,
                "task": task,
                "r": y - offset[task] - effect[task, drug],
            }
        )
        wide = frame.pivot_table(index="pair", columns="task", values="r", aggfunc="mean")
        wide = wide.reindex(columns=range(self.n_tasks_))
        R = np.nan_to_num(wide.corr(min_periods=10).to_numpy(), nan=0.0)
        np.fill_diagonal(R, 1.0)
        values, vectors = np.linalg.eigh(R)
        R = (vectors * np.maximum(values, 1e-2)) @ vectors.T
        sd = np.sqrt(np.diag(R))
        return R / np.outer(sd, sd)

    def init_loc_fn(self, site: dict) -> torch.Tensor:
        """Start the mean effects at the empirical ones, the noise sd at 0.5 (or as set)."""
        layout = self._layouts()[site["name"]]
        # A loaded model (whose guide parameters are put back next) has no fit-time start.
        zero = (np.zeros(self.n_tasks_), np.zeros((self.n_tasks_, self.n_drugs_)))
        offset, effect = getattr(self, "_effect_start_", zero)
        shared = effect.mean(0)
        deviation = effect - shared
        drug_sd = max(float(shared.std()), 0.1)
        task_sd = np.maximum(deviation.std(1), 0.05)
        if site["name"] == "z":
            init = torch.zeros(layout.size)
            values = {"drug_z": shared / drug_sd, "drug_task_z": deviation / task_sd[:, None]}
            if "task_offset_z" in layout:
                values["offset"] = np.zeros(1)
                values["task_offset_z"] = offset / max(float(np.abs(offset).max()), 0.1)
            elif "offset" in layout:
                values["offset"] = offset[:1] / self.offset_scale
            for name, value in values.items():
                if name in layout:
                    init[layout.blocks[name][0]] = torch.as_tensor(
                        value, dtype=torch.float32
                    ).reshape(-1)
            return init
        init = torch.full((layout.size,), 0.1)
        values = {
            "drug_sd": drug_sd,
            "drug_task_sd": task_sd,
            "task_offset_sd": max(float(np.abs(offset).max()), 0.1),
            "noise_sd": (self.initial_values or {}).get("noise", 0.5),
            "interaction_sd": 0.1,
        }
        for name, value in values.items():
            if name in layout:
                init[layout.blocks[name][0]] = torch.as_tensor(value, dtype=torch.float32).reshape(
                    -1
                )
        return init

    def unpack_sites(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named blocks of the packed sites ``z`` and ``scales``."""
        layouts, out = self._layouts(), {}
        for site, value in values.items():
            out.update(layouts[site].unpack(value))
        return out

    def _latents(self, dev: torch.device) -> tuple[dict, dict]:
        layouts = self._layouts()
        z_all = pyro.sample(
            "z", dist.Normal(torch.zeros(layouts["z"].size, device=dev), 1.0).to_event(1)
        )
        sc_all = pyro.sample(
            "scales", dist.HalfNormal(layouts["scales"].scale_tensor(dev)).to_event(1)
        )
        return layouts["z"].unpack(z_all), layouts["scales"].unpack(sc_all)

    def _effects(self, data: TensorData, z: dict, sc: dict) -> tuple[torch.Tensor, ...]:
        """Task offsets (T,), drug effects (T or 1, n_drugs), log noise (T, n_drugs or 1)."""
        T, dev = self.n_tasks_, data.device
        offset = torch.zeros(T, device=dev)
        if "offset" in z:
            offset = offset + self.offset_scale * z["offset"]
            if "task_offset_z" in z:
                offset = offset + sc["task_offset_sd"] * z["task_offset_z"]
        seen = self.seen_mask("drug", data.n_drugs, dev)
        drug = (sc["drug_sd"] * _fresh(z["drug_z"], seen))[None]
        if "drug_task_z" in z:
            drug = drug + sc["drug_task_sd"][:, None] * _fresh(z["drug_task_z"], seen, 1)
        log_noise = torch.zeros(T, 1, device=dev)
        if "noise_sd" in sc:
            log_noise = log_noise + torch.log(sc["noise_sd"])[:, None]
        if "drug_noise_z" in z:
            log_noise = log_noise + sc["noise_spread"] * _fresh(z["drug_noise_z"], seen, 1)
        return offset, drug, log_noise

    def _interaction_weights(self, gp, data: TensorData, z: dict, sc: dict):
        r"""Per-task, per-drug weights on the cell features, (T, n_drugs, D), or None.

        :math:`w_{td} = \sigma_{wt} \sum_r L_{tr} z_{rd}`, :math:`L L^T` the task
        correlation of the GP, so screens share a drug's weights as they share functions.
        """
        if "interaction_z" not in z:
            return None
        seen = self.seen_mask("drug", data.n_drugs, data.device)
        zd = _fresh(z["interaction_z"], seen, 1)  # (T, n_drugs, D)
        B = gp.task_covariance()
        sd = torch.diagonal(B).sqrt()
        C = B / (sd[:, None] * sd[None, :])
        eye = torch.eye(len(C), device=C.device, dtype=C.dtype)
        L = torch.linalg.cholesky(C + 1e-5 * eye)
        return sc["interaction_sd"][:, None, None] * torch.einsum("tr,rjd->tjd", L, zd)

    def _interaction(self, data: TensorData, W, t, c, d) -> torch.Tensor:
        r"""Row term :math:`\tilde x_c \cdot w_{td} / \sqrt{D}` (0 without weights)."""
        if W is None:
            return torch.zeros(len(t), device=data.device)
        x = data.cell_x[c] * self.interaction_input_scale_
        return (x * W[t, d]).sum(-1) / math.sqrt(x.shape[-1])

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``table[t, d]`` for a (T or 1, n_drugs or 1) table."""
        ti = t if table.shape[0] > 1 else torch.zeros_like(t)
        di = d if table.shape[1] > 1 else torch.zeros_like(d)
        return table[ti, di]

    # ------------------------------------------------------------- model
    def model(self, data: TensorData, subsample_size: int | None = None) -> None:
        """Pyro program of the generative story (class docstring).

        Sites: ``z`` and ``scales`` (latent), ``gp`` (factor: log hyperprior minus the KL
        of :math:`q(u)`, only with responses), ``obs`` in plate ``observations``, and the
        deterministic ``loc`` and ``scale`` of each row's Gaussian predictive.
        """
        dev = data.device
        gp = self._module(data)
        z, sc = self._latents(dev)
        if data.y is not None:
            pyro.factor("gp", self._log_prior(gp) - gp.kl_divergence())
        offset, drug, log_noise = self._effects(data, z, sc)
        W = self._interaction_weights(gp, data, z, sc)
        with pyro.plate(
            "observations", data.n_obs, subsample_size=subsample_size, device=dev
        ) as idx:
            t, c, d, y, censor = _rows(data, idx, subsample_size)
            f_mean, f_var = self._moments(gp, data, t, c, d)
            loc = offset[t] + self._gather(drug, t, d) + self._interaction(data, W, t, c, d)
            loc = loc + f_mean
            noise_var = self._noise_variance(gp, log_noise, t, d)
            scale = (f_var + noise_var).sqrt()
            pyro.deterministic("loc", loc)
            pyro.deterministic("scale", scale)
            pyro.sample("obs", gaussian_likelihood(loc, scale, censor), obs=y)
            if y is not None and self._elbo_weight() > 0:
                gap = _elbo_gap(y, loc, f_var, noise_var, censor)
                pyro.factor("elbo_gap", self._elbo_weight() * gap)

    def _moments(self, gp, data: TensorData, t, c, d) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(f) per row; computed once per batch of new rows.

        Without responses and gradients (prediction) they do not depend on the guide's
        draws, so they are kept in ``data.extra`` for the next draw of the same rows.
        """
        if data.y is not None or torch.is_grad_enabled():
            return gp.moments(self._inputs(data, c, d), t)
        # Keyed by the identity of the rows' task tensor, which the entry keeps alive (the
        # dict is shared by the chunks of one prediction, so an id cannot be reused).
        cached = data.extra.get(("mtgp moments", id(data.task)))
        if cached is None or cached[0] is not data.task:
            cached = (data.task, gp.moments(self._inputs(data, c, d), t))
            data.extra[("mtgp moments", id(data.task))] = cached
        return cached[1]

    def _elbo_weight(self) -> float:
        return 1.0 if self.objective == "elbo" else 0.0

    def _noise_variance(self, gp, log_noise, t, d) -> torch.Tensor:
        return torch.exp(2 * self._gather(log_noise, t, d))

    # --------------------------------------------------------- save/load
    def _get_fitted_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        state = {
            "input_scale": self.input_scale_,
            "dims": self.dims_,
            "joint_reference": self.joint_reference_,
            "inducing_shape": list(self.inducing_shape_),
            "interaction_input_scale": self.interaction_input_scale_,
        }
        tensors = {f"gp.{k}": v.detach() for k, v in self.gp_.state_dict().items()}
        return state, tensors

    def _set_fitted_state(
        self, state: dict, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        self.input_scale_ = dict(state["input_scale"])
        self.dims_ = dict(state["dims"])
        self.joint_reference_ = float(state["joint_reference"])
        self.inducing_shape_ = tuple(state["inducing_shape"])
        self.interaction_input_scale_ = float(state["interaction_input_scale"])
        weights = {k[3:]: v for k, v in tensors.items() if k.startswith("gp.")}
        self.gp_ = self._new_module(torch.zeros(state["inducing_shape"])).to(device)
        self.gp_.load_state_dict(weights)

    def _restore(self, state, path, device) -> None:
        self._auto_drug = (path / "drug_features.parquet").is_file()
        self._layout_cache = None
        self._probing = True  # the guide's probe call has one row of one task
        try:
            super()._restore(state, path, device)
        finally:
            self._probing = False

    # ---------------------------------------------------------- readouts
    def _fitted_gp(self, what: str):
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")
        if hasattr(self, "task_models_"):
            raise RuntimeError(
                f"{what} needs a jointly fitted multitask model; this {self.name!r} model was "
                "fitted with multitask=False (one GP per task), which learns no task "
                "correlation; refit with multitask=True"
            )
        return self.gp_

    def task_covariance(self) -> pd.DataFrame:
        """Covariance of the latent functions between tasks (the original ``getTaskCovar``).

        Returns
        -------
        DataFrame of shape (n_tasks, n_tasks)
            :math:`k(x, x) B` in standardised response units, labelled by task names.

        Raises
        ------
        RuntimeError
            When the model is not fitted, or was fitted with ``multitask=False``.
        """
        gp = self._fitted_gp("task_covariance")
        with torch.no_grad(), local_params():
            B = gp.task_covariance().cpu().numpy().astype(float)
        return pd.DataFrame(B, index=list(self.tasks_), columns=list(self.tasks_))

    def task_correlation(self) -> pd.DataFrame:
        """Correlation of the latent functions between tasks, labelled by task names.

        Raises
        ------
        RuntimeError
            When the model is not fitted, or was fitted with ``multitask=False``.
        """
        cov = self.task_covariance()
        sd = np.sqrt(np.diag(cov.to_numpy()))
        return cov / np.outer(sd, sd)

    def covariance(
        self, pairs: DrugResponseData | pd.DataFrame, posterior: bool = False
    ) -> pd.DataFrame:
        """Covariance of the latent function :math:`f` over rows (the original ``getCovar``).

        Parameters
        ----------
        pairs : DrugResponseData or DataFrame
            Rows with columns task, cell, drug (at most 5000).
        posterior : bool, default=False
            The kernel (prior) covariance, or that of the variational posterior
            :math:`q(f)`. Neither includes the mean effects or the noise.

        Returns
        -------
        DataFrame of shape (n, n)
            In standardised response units, indexed by (task, cell, drug) on both axes.
        """
        gp = self._fitted_gp("covariance")
        frame = pairs.frame if isinstance(pairs, DrugResponseData) else pairs.reset_index(drop=True)
        if len(frame) > MAX_COVARIANCE_ROWS:
            raise ValueError(
                f"covariance forms an (n, n) matrix; got {len(frame)} rows, at most "
                f"{MAX_COVARIANCE_ROWS}: pass a subset"
            )
        with torch.no_grad(), local_params():
            data = self._tensors(frame, self.device_, with_y=False)
            for strategy in gp.strategies():
                strategy._clear_cache()
            x = self._inputs(data, data.cell, data.drug)
            K = gp.covariance(x, data.task, posterior).cpu().numpy().astype(float)
        index = pd.MultiIndex.from_frame(frame[["task", "cell", "drug"]].astype(str))
        return pd.DataFrame(K, index=index, columns=index)

    def plot_task_correlation(self, ax=None, cmap: str = "RdBu_r"):
        """Heatmap of :meth:`task_correlation`, annotated with the values.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw (default: a new figure).
        cmap : str, default="RdBu_r"
            Diverging colour map, centred at zero (range -1 to 1).

        Returns
        -------
        matplotlib Axes
        """
        import matplotlib.pyplot as plt

        corr = self.task_correlation()
        T = len(corr)
        if ax is None:
            _, ax = plt.subplots(figsize=(1.5 + 0.9 * T, 1.2 + 0.9 * T))
        image = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap=cmap)
        ax.set_xticks(range(T), list(corr.columns), rotation=45, ha="right")
        ax.set_yticks(range(T), list(corr.index))
        for i in range(T):
            for j in range(T):
                value = corr.iat[i, j]
                colour = "white" if abs(value) > 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour)
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="correlation")
        ax.set_title(f"{self.name}: task correlation")
        return ax

    def sample_initial_values(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw starting hyperparameters from their priors (for :func:`find_initial_conditions`).

        The lengthscale factor and the task signal variance are drawn from their
        log-normal priors and clipped to a tenth to ten times the prior median; the noise
        sd from its half-normal prior, clipped to [0.05, 1] (standardised units).

        Returns
        -------
        dict
            ``lengthscale``, ``variance`` and ``noise``.
        """
        ls = self.lengthscale_prior_loc * math.exp(self.lengthscale_prior_scale * rng.normal())
        var = self.variance_prior_loc * math.exp(self.variance_prior_scale * rng.normal())
        noise = abs(self.noise_scale * rng.normal())
        return {
            "lengthscale": float(
                np.clip(ls, self.lengthscale_prior_loc / 10, self.lengthscale_prior_loc * 10)
            ),
            "variance": float(
                np.clip(var, self.variance_prior_loc / 10, self.variance_prior_loc * 10)
            ),
            "noise": float(np.clip(noise, 0.05, 1.0)),
        }


def _elbo_gap(y, loc, f_var, noise_var, censor) -> torch.Tensor:
    r"""Return the expected log likelihood minus the predictive log density, per row.

    :math:`E_{q(f)} \log N(y \mid f, \sigma^2) - \log N(y \mid \mu, v + \sigma^2)`;
    zero for censored rows, which keep the predictive form.
    """
    r2 = (y - loc) ** 2
    total = f_var + noise_var
    gap = 0.5 * (torch.log(total / noise_var) + r2 / total - (r2 + f_var) / noise_var)
    return gap if censor is None else torch.where(censor == 0, gap, torch.zeros_like(gap))


def _table(table: pd.DataFrame, names: pd.Index) -> torch.Tensor:
    X = table.reindex(names).to_numpy(dtype=float)
    return torch.as_tensor(np.where(np.isfinite(X), X, 0.0), dtype=torch.float32)


def _median_distance(X: torch.Tensor, max_rows: int = 1000) -> float:
    """Median distance between distinct rows of ``X`` (a seeded subset); 1.0 if none."""
    if X.shape[0] > max_rows:
        gen = torch.Generator().manual_seed(0)
        X = X[torch.randperm(X.shape[0], generator=gen)[:max_rows]]
    dist_ = torch.cdist(X.double(), X.double())
    positive = dist_[dist_ > 1e-9]
    return float(positive.median()) if positive.numel() else 1.0
