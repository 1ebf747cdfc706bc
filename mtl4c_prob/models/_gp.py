"""Sparse variational Gaussian process over cell and drug inputs, over drug effects."""

from __future__ import annotations

import logging
import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.inference import SVIConfig
from mtl4c_prob.models._gp_base import CHUNK, _GPBase, _Inducing
from mtl4c_prob.models._kernels import reference_distances
from mtl4c_prob.models._likelihoods import gaussian_likelihood
from mtl4c_prob.models._mf import _fresh, _rows

logger = logging.getLogger(__name__)

__all__ = ["SparseGP"]


class SparseGP(_GPBase):
    r"""Sparse variational Gaussian process over cell and drug inputs, over drug effects.

    Status: experimental.

    The counterpart of the original toolkit's ``SparseGPRegression`` and
    ``SparseGPCompositeKernelRegression``. Generative story for task :math:`t`, cell
    :math:`c` and drug :math:`d` (responses standardised per task; :math:`x_c` the cell
    features, :math:`v_d` the drug input, see ``drug_input``):

    .. math::

        m_t &= s_m z_m + \tau_m z^m_t, \qquad
        b_{td} = \sigma_b z_d + \tau^b_t z_{td} \quad \text{(drug effects)} \\
        \theta &\sim p(\theta) \quad \text{(kernel lengthscales and variances, see
            :class:`~mtl4c_prob.models._kernels.CellDrugKernel`)} \\
        v &\sim N(0, I), \qquad u = L_{uu} v, \quad L_{uu} L_{uu}^T = K_{uu} \\
        f(x) \mid u &\sim N(K_{xu} K_{uu}^{-1} u, \;
            k(x, x) - K_{xu} K_{uu}^{-1} K_{ux}) \\
        \log \sigma_{td} &= \log \sigma_t + \rho \, \eta_{td} \\
        y_{tcd} &\sim N(m_t + b_{td} \,[+\, b_c] + f(x_c, v_d), \sigma_{td}^2)

    with every :math:`z`, :math:`\eta` standard normal and half-normal priors on
    :math:`\sigma_b, \tau, \sigma_t, \rho` (scales ``bias_scale``, ``task_scale``,
    ``noise_scale``, ``noise_spread``); with ``cell_effects=True`` also a cell effect
    :math:`b_c = \sigma_c z_c`, drawn from its prior for cells without training rows. The
    drug effects carry the large part of the
    variance that drug identity explains (on GDSC, drug means alone explain most of it);
    the GP models what they do not.

    Inducing values :math:`u`, sampled whitened as site ``u`` (:math:`v`), so that the
    guide's Gaussian over ``u`` is :math:`q(u)`:

    * ``composite="product"``: a grid of inducing inputs, :math:`M_c` cell-side inputs
      :math:`Z_c` times :math:`M_d` drug-side inputs :math:`Z_d`, with
      :math:`K_{uu} = K_c(Z_c) \otimes K_d(Z_d)`. The drug side is exact (every training
      drug's input) when there are at most ``n_inducing_drugs`` training drugs, so each
      drug's own response function is represented. With :math:`a_c = L_c^{-1} k_c(Z_c,
      x_c)` and :math:`b_d = L_d^{-1} k_d(Z_d, v_d)`, :math:`E[f \mid u] = a_c^T V b_d`
      and :math:`\mathrm{Var}[f \mid u] = k_c k_d - |a_c|^2 |b_d|^2`.
    * ``composite="sum"``: :math:`f = g(x_c) + h(v_d)`, inducing values for each side.
    * ``composite="none"``: ``n_inducing`` inducing inputs in the joint input space.

    Latent with priors (site names): ``z`` and ``scales`` (packed offsets, drug effects
    and noise; :meth:`unpack_sites` names the blocks), ``u``, and the kernel
    hyperparameters (``cell.lengthscale``, ``cell.variance``, ...). Point estimates:
    the inducing inputs (parameters ``inducing.cell``, ``inducing.drug`` or
    ``inducing.joint``), initialised at the inputs of a seeded random subset of the
    training cells, drugs or (cell, drug) pairs and optimised by SVI with the guide; an
    exact drug side is kept fixed at the training drugs' inputs.

    Objective: the ELBO of the sparse variational GP (Hensman et al., 2013), whose data
    term per measured row is :math:`E_{q(u)} E_{p(f \mid u)} \log N(y \mid m_t + b_{td} +
    f, \sigma_{td}^2)` (the inner expectation in closed form). It is written as the
    predictive-form likelihood site ``obs``, :math:`N(\mu, \mathrm{Var}[f|u] +
    \sigma^2)`, plus a correction factor ``expected_loglik``, so that ``obs`` is the
    predictive density of a row given :math:`u` (used for held-out NLL) while the noise
    stays identified. Censored rows enter through the normal CDF of that predictive (the
    form of Jankowiak et al., 2020), without the correction. The model records the
    predictive moments as ``loc`` and ``scale``, so prediction for any rows, unseen cells
    included, is the conditional of :math:`f` at their inputs given :math:`u`, mixed over
    the guide's draws.

    Drug input ``v_d`` (``drug_input``): drug features (numeric descriptors or Morgan
    fingerprints), a one-hot drug identity, or both. The identity block
    (:func:`~mtl4c_prob.models._kernels.identity_inputs`) has one column per training drug
    and one shared by all others; its kernel is a constant correlation between distinct
    drugs plus a drug-specific part. "auto" (default) takes both when the data carry drug
    features and the identity alone otherwise, so the model runs on cell features only
    (it then predicts only the drugs it was fitted on). A drug without training rows (but
    with features) gets a drug effect drawn from its prior (zero mean, the average drug;
    spread :math:`\sigma_b` added to its intervals), its noise deviation from its prior,
    and the GP's prediction from its features.

    Multitask: ``multitask=False`` fits one copy per task. With ``multitask=True`` and
    several tasks, each task has its own offset, noise and drug-effect deviations, and
    one GP (one kernel, one ``u``) is shared by all tasks: this single-task GP does not
    model task correlation (the ICM and LMC multitask GPs do).

    Parameters
    ----------
    kernel : {"rbf", "matern12", "matern32", "matern52"}, default="rbf"
        Kernel family.
    composite : {"none", "product", "sum"}, default="product"
        One kernel on the concatenated row, or cell kernel times / plus drug kernel.
    ard : bool, default=False
        One lengthscale per cell and drug-feature column.
    n_inducing : int, default=128
        Cell-side inducing inputs :math:`M_c` (product, sum; at most the training
        cells), or joint inducing inputs (none; at most the distinct training pairs).
    n_inducing_drugs : int, default=1024
        Largest drug side kept exact (GDSC1 + GDSC2 have 542 drugs, CTRP about 550);
        with more training drugs, this many drug-side inducing inputs are drawn from them
        and learned (product, sum).
    drug_input : {"auto", "features", "identity", "both"}, default="auto"
        Drug side of the input (see above).
    cell_effects : bool, default=False
        Add a cell effect :math:`b_c` (half-normal sd, scale ``bias_scale``): what a cell
        line does to every drug beyond what its features say. It helps when the cells
        predicted were seen in training, and hurts for unseen cells, which get it from
        its prior: on GDSC2 (defaults otherwise) leave-pairs-out RMSE 1.087 instead of
        1.154 (NLL 1.392 instead of 1.464), leave-cells-out 1.298 instead of 1.241.
    multitask : bool, default=True
        One model over all tasks (shared GP, own offsets); False fits one per task.
    lengthscale_prior_loc, lengthscale_prior_scale, variance_prior_loc, variance_prior_scale
        Kernel priors, see :class:`~mtl4c_prob.models._kernels.CellDrugKernel`
        (defaults 1.0, 1.0, 0.5, 1.0).
    bias_scale : float, default=1.0
        Scale of the half-normal prior on the drug-effect sd :math:`\sigma_b`.
    offset_scale : float, default=1.0
        Prior scale :math:`s_m` of the offset and of the spread of task offsets.
    task_scale : float, default=0.3
        Scale of the half-normal priors on the task deviations' sds :math:`\tau^b_t`.
    noise : {"task", "drug"}, default="drug"
        One noise sd per task, or per task and drug (log-normal around the task's).
    noise_scale : float, default=1.0
        Scale of the half-normal prior on the task noise sds.
    noise_spread : float, default=0.5
        Scale of the half-normal prior on :math:`\rho`.
    jitter : float, default=1e-4
        Diagonal jitter of the inducing covariances, relative to their mean diagonal.

    Notes
    -----
    Cost per step: with a separable composite the kernel is evaluated on entity tables
    only, O(M_c^3 + M_d^3 + M_c^2 I + M_d^2 J + M_c M_d J) for I cells and J drugs,
    plus O(M_c B) for a minibatch of B rows (or one (I, J) product and a gather when the
    rows fill the cell x drug grid); "none" costs O(M^3 + M^2 B + M B D). Default fit:
    2000 steps in minibatches of 4096 rows, guide scales starting at 0.05
    (``fit_defaults``; 0.005 left the intervals of small data sets too narrow, coverage
    0.85 instead of 0.94 at a nominal 0.9 on 1,800 synthetic rows).

    Measured with the defaults, one torch thread on a shared 2-core machine. GDSC2 ln
    IC50 leave-cells-out (80/20, seed 0, 50 expression PCs, Morgan fingerprints plus
    drug identity): RMSE 1.241, NLL 1.559, 90% coverage 0.890, per-drug Pearson 0.489,
    fit 245 s (drug means 1.420, :class:`~mtl4c_prob.models.BayesianMF` 1.254);
    ``ard=True`` 1.225, NLL 1.549, coverage 0.893. GDSC1 + GDSC2, 100,000 training rows
    (benchmarks/gdsc_sgp_scaling.py): fit 154 s of CPU time (273 s wall on the loaded
    machine); the time per step does not grow with the rows.

    References
    ----------
    Hensman, Fusi & Lawrence (2013), Gaussian processes for big data. Jankowiak, Pleiss
    & Gardner (2020), Parametric Gaussian process regressors.
    """

    name = "sgp"
    fit_defaults = {"steps": 2000, "lr": 0.02, "batch_size": 4096, "init_scale": 0.05}

    def __init__(
        self,
        *,
        kernel: str = "rbf",
        composite: str = "product",
        ard: bool = False,
        n_inducing: int = 128,
        n_inducing_drugs: int = 1024,
        drug_input: str = "auto",
        cell_effects: bool = False,
        multitask: bool = True,
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
        for arg, value in (("n_inducing", n_inducing), ("n_inducing_drugs", n_inducing_drugs)):
            if int(value) < 1:
                raise ValueError(f"{arg} must be at least 1, got {value}")
        self.n_inducing = int(n_inducing)
        self.n_inducing_drugs = int(n_inducing_drugs)
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
    ) -> SparseGP:
        """Fit by SVI, in minibatches of ``fit_defaults["batch_size"]`` rows by default.

        As :meth:`ProbabilisticModel.fit`, except that ``batch_size=None`` without a
        ``config`` keeps the model's default minibatch (the command line passes None when
        ``--batch-size`` is not given). Data sets under 4096 rows are fitted full batch.

        Returns
        -------
        self
        """
        self._fit_guard(config, config_kwargs)
        return super().fit(train, val, config, **config_kwargs)

    # ------------------------------------------------------------ state
    def _setup(self, train: DrugResponseData, device: torch.device) -> None:
        """Kernel with data-scaled priors; inducing inputs from seeded subsets."""
        self.device_ = device
        rows = self._train_rows(train, device)
        cell_in, drug_in = self._inputs(rows["data"])
        gen = torch.Generator().manual_seed(getattr(self, "_fit_seed", 0))

        def subset(codes: torch.Tensor, n: int) -> torch.Tensor:
            return codes[torch.randperm(len(codes), generator=gen)[:n].to(device)]

        sample = subset(torch.arange(train.n_obs, device=device), 2000)
        rows_in = self._rows_input((cell_in, drug_in), rows["cell"][sample], rows["drug"][sample])
        self._build_kernel(reference_distances(rows_in, *self._dims()))
        if self.composite == "none":
            pairs = subset(
                torch.unique(rows["cell"] * self.n_drugs_ + rows["drug"]), self.n_inducing
            )
            Z = self._rows_input((cell_in, drug_in), pairs // self.n_drugs_, pairs % self.n_drugs_)
            self.inducing_ = _Inducing({"joint": Z}, {"joint": True})
        else:
            cells = torch.unique(rows["cell"])
            drugs = torch.unique(rows["drug"])
            exact = len(drugs) <= self.n_inducing_drugs
            Zc = cell_in[subset(cells, self.n_inducing)]
            Zd = drug_in[drugs if exact else subset(drugs, self.n_inducing_drugs)]
            self.inducing_ = _Inducing({"cell": Zc, "drug": Zd}, {"cell": True, "drug": not exact})
        self._layout_cache = None
        logger.info(
            "SGP: inducing inputs %s, kernel %s, composite %s (input widths: cell %d, drug "
            "features %d, identity %d)",
            {k: tuple(v.shape) for k, v in self.inducing_().items()},
            self.kernel,
            self.composite,
            *self._dims(),
        )

    def _get_fitted_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {f"inducing_{k}": v.detach() for k, v in self.inducing_().items()}
        return {"reference": self.reference_, "learned": self.inducing_.learned()}, tensors

    def _set_fitted_state(self, state, tensors, device) -> None:
        self.device_ = device
        self._layout_cache = None
        self._build_kernel(state["reference"])
        blocks = {k: tensors[f"inducing_{k}"].to(device) for k in state["learned"]}
        self.inducing_ = _Inducing(blocks, state["learned"])

    # ------------------------------------------------------------ model
    def model(self, data: TensorData, subsample_size: int | None = None) -> None:
        """Pyro program of the generative story above (kernel sites sampled once, first)."""
        self.kernel_.scope(self._program, data, subsample_size)

    def _program(self, data: TensorData, subsample_size: int | None) -> None:
        dev = data.device
        z, sc, offset, log_noise = self._effects(data)
        seen_d = self.seen_mask("drug", data.n_drugs, dev)
        drug_bias = (sc["drug_bias_sd"] * _fresh(z["drug_z"], seen_d))[None]  # (1, J)
        if "drug_task_z" in z:
            tau = sc["drug_bias_task_sd"][:, None]
            drug_bias = drug_bias + tau * _fresh(z["drug_task_z"], seen_d, 1)  # (T, J)
        cell_bias = None
        if "cell_z" in z:
            seen_c = self.seen_mask("cell", data.n_cells, dev)
            cell_bias = sc["cell_bias_sd"] * _fresh(z["cell_z"], seen_c)  # (I,)

        # Whitened inducing values; entity-level terms of f | u.
        Z = self.inducing_()
        shape = _u_shape(self.composite, Z)
        v = pyro.sample("u", dist.Normal(torch.zeros(shape, device=dev), 1.0).to_event(len(shape)))
        inputs = self._inputs(data)
        terms = self._entity_terms(Z, v, inputs) if self.composite != "none" else None

        with pyro.plate(
            "observations", data.n_obs, subsample_size=subsample_size, device=dev
        ) as idx:
            t, c, d, y, censor = _rows(data, idx, subsample_size)
            if terms is None:
                f_loc, f_var = self._joint_conditional(Z["joint"], v, inputs, c, d)
            else:
                f_loc, f_var = self._separable_conditional(terms, c, d)
            tb = t if drug_bias.shape[0] > 1 else torch.zeros_like(t)
            loc = offset[t] + drug_bias[tb, d] + f_loc
            if cell_bias is not None:
                loc = loc + cell_bias[c]
            di = d if log_noise.shape[1] > 1 else torch.zeros_like(d)
            noise_var = torch.exp(2 * log_noise[t, di])
            scale = (f_var + noise_var).sqrt()
            pyro.deterministic("loc", loc)
            pyro.deterministic("scale", scale)
            pyro.sample("obs", gaussian_likelihood(loc, scale, censor), obs=y)
            if y is not None:
                # obs + this term = E_{p(f|u)} log N(y | f, noise_var) on measured rows.
                correction = _expected_loglik(y, loc, f_var, noise_var)
                correction = correction - dist.Normal(loc, scale).log_prob(y)
                if censor is not None:
                    correction = correction * (censor == 0)
                pyro.factor("expected_loglik", correction)

    def _whiten(self, kernel, Zb: torch.Tensor, X: torch.Tensor) -> tuple:
        """Return :math:`A = L^{-1} k(Z, X)` (M, n) and the prior variance k(x, x)."""
        L = self._cholesky(kernel(Zb))
        A = torch.linalg.solve_triangular(L, kernel(Zb, X), upper=False)
        return A, kernel(X[:1], diag=True)

    def _entity_terms(self, Z: dict, v: torch.Tensor, inputs: tuple) -> dict:
        r"""Per-cell and per-drug pieces of :math:`f \mid u` (separable composites).

        ``a`` (M_c, n_cells), ``b`` (M_d, n_drugs), their squared column norms ``qa``,
        ``qb``, prior variances ``ka``, ``kb``; for a product ``W = V b`` (M_c, n_drugs),
        for a sum the per-entity means ``ga`` (n_cells,), ``gb`` (n_drugs,).
        """
        a, ka = self._whiten(self.kernel_.cell, Z["cell"], inputs[0])
        b, kb = self._whiten(self.kernel_.drug, Z["drug"], inputs[1])
        terms = {"a": a, "qa": (a * a).sum(0), "ka": ka, "qb": (b * b).sum(0), "kb": kb}
        if self.composite == "product":
            terms["W"] = v @ b
        else:
            terms["ga"], terms["gb"] = v[: a.shape[0]] @ a, v[a.shape[0] :] @ b
        return terms

    def _separable_conditional(self, terms: dict, c: torch.Tensor, d: torch.Tensor) -> tuple:
        """Mean and variance of f | u at rows (c, d) from the entity-level terms."""
        if self.composite == "sum":
            loc = terms["ga"][c] + terms["gb"][d]
            var = terms["ka"] - terms["qa"][c] + terms["kb"] - terms["qb"][d]
            return loc, var.clamp_min(1e-6 * float((terms["ka"] + terms["kb"]).detach()))
        a, W = terms["a"], terms["W"]
        if a.shape[1] * W.shape[1] <= 3 * len(c):
            # Rows fill the cell x drug grid: one (I, J) product and a gather.
            loc = (a.T @ W).reshape(-1)[c * W.shape[1] + d]
        else:
            loc = (a[:, c] * W[:, d]).sum(0)
        prior = terms["ka"] * terms["kb"]
        var = prior - terms["qa"][c] * terms["qb"][d]
        return loc, var.clamp_min(1e-6 * float(prior.detach()))

    def _joint_conditional(self, Z, v, inputs, c, d) -> tuple:
        r"""Mean and variance of :math:`f \mid u` for joint inducing inputs, in row chunks.

        With :math:`A = L_{uu}^{-1} K_{uf}` (M, B): mean :math:`A^T v`, variance
        :math:`k(x, x) - \mathrm{colsum}(A^2)`. :math:`L_{uu}^{-1}` is formed once, so
        the rows need a matrix product rather than a triangular solve.
        """
        Luu = self._cholesky(self.kernel_(Z))
        eye = torch.eye(Z.shape[0], device=Z.device, dtype=Luu.dtype)
        Luu_inv = torch.linalg.solve_triangular(Luu, eye, upper=False)
        kff = self.kernel_(Z[:1], diag=True)
        floor = 1e-6 * float(kff.detach())
        locs, variances = [], []
        for start in range(0, len(c), CHUNK):
            rows = self._rows_input(inputs, c[start : start + CHUNK], d[start : start + CHUNK])
            A = Luu_inv @ self.kernel_(Z, rows)  # (M, B)
            locs.append(v @ A)
            variances.append((kff - (A * A).sum(0)).clamp_min(floor))
        return torch.cat(locs), torch.cat(variances)


def _u_shape(composite: str, Z: dict) -> tuple[int, ...]:
    """Shape of the whitened inducing values: (M,), (M_c, M_d) or (M_c + M_d,)."""
    if composite == "none":
        return (Z["joint"].shape[0],)
    if composite == "product":
        return (Z["cell"].shape[0], Z["drug"].shape[0])
    return (Z["cell"].shape[0] + Z["drug"].shape[0],)


def _expected_loglik(y, loc, f_var, noise_var) -> torch.Tensor:
    r"""Return :math:`E_{f \sim N(loc, f_{var})} \log N(y \mid f, \sigma^2)` in closed form."""
    return -0.5 * (
        math.log(2 * math.pi) + torch.log(noise_var) + ((y - loc) ** 2 + f_var) / noise_var
    )
