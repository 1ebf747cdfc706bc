"""GPyTorch modules of the multitask GPs: the input kernel, the ICM and the LMC approximate GPs.

An input row is ``[cell features | drug features | drug identity]`` (blocks of ``dims``
columns, any drug block may be absent). The modules hold every GP parameter (kernel
hyperparameters, task covariance or mixing, inducing inputs, the variational
distribution of the whitened inducing values); the Pyro programs of ``_mtgp.py`` use
them as model-side parameters.
"""

from __future__ import annotations

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import IndexKernel, Kernel, MaternKernel, RBFKernel, ScaleKernel
from gpytorch.likelihoods import MultitaskGaussianLikelihood
from gpytorch.models import ApproximateGP
from gpytorch.variational import (
    CholeskyVariationalDistribution,
    LMCVariationalStrategy,
    VariationalStrategy,
)
from linear_operator import to_dense

__all__ = ["COMPOSITES", "KERNELS", "ICMModule", "InputKernel", "LMCModule"]

#: Stationary kernel families by command-line name (Matérn smoothness nu, or RBF).
KERNELS = {"rbf": None, "matern12": 0.5, "matern32": 1.5, "matern52": 2.5}
#: How the cell side and the drug side combine.
COMPOSITES = ("none", "product", "sum")
BLOCKS = ("cell", "drug", "identity")


def _family(kernel: str, dim: int, ard: bool, batch_shape: torch.Size) -> Kernel:
    ard_dims = dim if ard and dim > 1 else None
    nu = KERNELS[kernel]
    if nu is None:
        return RBFKernel(ard_num_dims=ard_dims, batch_shape=batch_shape)
    return MaternKernel(nu=nu, ard_num_dims=ard_dims, batch_shape=batch_shape)


class _StoredBatchShape:
    """A kernel's batch shape as a stored attribute.

    Every part of these kernels has the same batch shape; GPyTorch's default property
    walks the sub-kernels on each access.
    """

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the kernel."""
        return self._batch_shape

    @batch_shape.setter
    def batch_shape(self, value: torch.Size) -> None:
        self._batch_shape = torch.Size(value)


class InputKernel(_StoredBatchShape, Kernel):
    r"""Covariance of ``[cell | drug | identity]`` input rows, dense in every evaluation.

    Status: experimental.

    ``composite="none"``: one kernel :math:`k(x, x')` on the whole row. ``"product"``:
    :math:`k_c(x_c, x_c')\, k_d(\cdot, \cdot)`; ``"sum"``: :math:`s_c k_c + k_d`. The drug
    side :math:`k_d` is :math:`s_v k_v(v_d, v_{d'}) + s_e k_e(e_d, e_{d'})` when both drug
    blocks are present (structure similarity plus a drug-identity term whose constant
    off-diagonal part carries what all drugs share), else the one block's kernel (scaled
    by :math:`s` in a sum). The product has no overall scale: the task covariance of the
    multitask GP carries it.

    Parameters
    ----------
    dims : dict
        Columns per block, keys "cell", "drug", "identity" (in that column order).
    kernel : {"rbf", "matern12", "matern32", "matern52"}
        Family of every part.
    composite : {"none", "product", "sum"}
        How the sides combine.
    ard : bool
        One lengthscale per cell and drug-feature column (the identity block keeps one).
    batch_shape : torch.Size, optional
        Batch of independent kernels (one per latent GP of an LMC).

    Notes
    -----
    GPyTorch's ``ProductKernel`` multiplies lazy tensors of equal inputs through root
    decompositions; this kernel multiplies dense blocks instead, which the variational
    strategy needs only as (M, M), (M, N) and diagonal (N,) blocks.
    """

    def __init__(
        self,
        dims: dict[str, int],
        kernel: str,
        composite: str,
        ard: bool,
        batch_shape: torch.Size | None = None,
    ) -> None:
        batch_shape = torch.Size() if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape=batch_shape)
        self.composite = composite
        self.dims = {b: int(dims.get(b, 0)) for b in BLOCKS}
        start, self._slices = 0, {}
        for block in BLOCKS:
            self._slices[block] = slice(start, start + self.dims[block])
            start += self.dims[block]
        self._slices["joint"] = slice(0, start)
        self.parts = torch.nn.ModuleDict()
        #: Prior median of each part's output scale (relative weights; see class docstring).
        self.scale_medians: dict[str, float] = {}
        if composite == "none":
            self.parts["joint"] = _family(kernel, start, ard, batch_shape)
            return
        drug_blocks = [b for b in ("drug", "identity") if self.dims[b]]
        scaled = composite == "sum" or len(drug_blocks) > 1
        share = 0.5 if composite == "sum" else 1.0
        for block in ["cell", *drug_blocks]:
            part = _family(kernel, self.dims[block], ard and block != "identity", batch_shape)
            if block == "cell" and composite == "sum":
                part, self.scale_medians[block] = ScaleKernel(part, batch_shape=batch_shape), share
            elif block != "cell" and scaled:
                part = ScaleKernel(part, batch_shape=batch_shape)
                self.scale_medians[block] = share / len(drug_blocks)
            self.parts[block] = part

    def base_kernels(self) -> dict[str, Kernel]:
        """Return the stationary kernel of each part (inside its scale), by block name."""
        return {
            n: p.base_kernel if isinstance(p, ScaleKernel) else p for n, p in self.parts.items()
        }

    def scale_kernels(self) -> dict[str, ScaleKernel]:
        """Return the scaled parts, by block name."""
        return {n: p for n, p in self.parts.items() if isinstance(p, ScaleKernel)}

    def variance(self) -> torch.Tensor:
        """:math:`k(x, x)`, a Tensor of shape ``batch_shape`` (every part is stationary)."""
        one = torch.ones(self.batch_shape, device=self._device())
        scales = self.scale_kernels()
        if self.composite == "none":
            return one
        drug = [scales[b].outputscale if b in scales else one for b in self.parts if b != "cell"]
        drug_side = torch.stack(drug).sum(0)
        if self.composite == "product":
            return drug_side
        return scales["cell"].outputscale + drug_side

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x1, x2, diag: bool = False, **params) -> torch.Tensor:
        """Dense covariance (…, n, m), or its diagonal (…, n) with ``diag=True``."""
        out = {
            name: to_dense(
                part.forward(x1[..., self._slices[name]], x2[..., self._slices[name]], diag=diag)
            )
            for name, part in self.parts.items()
        }
        if self.composite == "none":
            return out["joint"]
        cell = out.pop("cell")
        drug = sum(out.values())
        return cell * drug if self.composite == "product" else cell + drug


class _HadamardKernel(_StoredBatchShape, Kernel):
    """Input kernel times an index kernel over the task code in the last input column."""

    def __init__(self, input_kernel: InputKernel, n_tasks: int, rank: int) -> None:
        super().__init__()
        self.input_kernel = input_kernel
        self.task_kernel = IndexKernel(num_tasks=n_tasks, rank=rank)

    def forward(self, x1, x2, diag: bool = False, **params) -> torch.Tensor:
        K = self.input_kernel.forward(x1[..., :-1], x2[..., :-1], diag=diag)
        B = self.task_kernel._eval_covar_matrix()  # (n_tasks, n_tasks)
        i, j = x1[..., -1].long(), x2[..., -1].long()
        return K * (B[i, i] if diag else B[i][:, j])


class _TiedStrategy(VariationalStrategy):
    r"""Variational strategy whose inducing inputs are one learned set Z for every task.

    The inducing points are the rows of Z x {0, ..., T-1} (task code last), so
    :math:`K_{uu} = B \otimes K_{ZZ}` and every task's function is pinned at the same
    inputs. GPyTorch's own parameter would let the copies of Z drift apart.
    """

    def __init__(self, model, Z: torch.Tensor, n_tasks: int, q_u, jitter: float) -> None:
        codes = torch.arange(n_tasks, dtype=Z.dtype).repeat_interleave(Z.shape[0])[:, None]
        full = torch.cat([Z.repeat(n_tasks, 1), codes], dim=-1)
        super().__init__(model, full, q_u, learn_inducing_locations=False, jitter_val=jitter)
        del self._buffers["inducing_points"]
        self.shared_inducing = torch.nn.Parameter(Z.clone())
        self.register_buffer("task_codes", codes)

    @property
    def inducing_points(self) -> torch.Tensor:
        """Rows of Z x tasks, Tensor of shape (n_tasks * M, n_features + 1)."""
        n_tasks = self.task_codes.shape[0] // self.shared_inducing.shape[0]
        return torch.cat([self.shared_inducing.repeat(n_tasks, 1), self.task_codes], dim=-1)


class ICMModule(ApproximateGP):
    r"""Sparse variational ICM (Hadamard) GP: :math:`k([x, t], [x', u]) = k(x, x') B_{tu}`.

    Status: experimental.

    Inputs are rows ``[x, t]`` with the task code in the last column. The inducing
    inputs are one learned set Z shared by all tasks (rows Z x tasks, :math:`K_{uu} = B
    \otimes K_{ZZ}`); measured on synthetic data with realised correlations (0.86,
    -0.51, -0.60) (predictive objective, no linear term), separate inducing inputs per
    task estimated them as (0.99, -0.78, -0.79), shared ones as (0.74, -0.47, -0.58).
    :math:`B = W W^T + \mathrm{diag}(v)` is GPyTorch's ``IndexKernel`` of rank ``rank``.
    The whitened variational distribution over the T M inducing values is a
    full-covariance Gaussian.

    Parameters
    ----------
    inducing : Tensor of shape (n_inducing, n_features)
        Initial inducing inputs Z.
    input_kernel : InputKernel
        Kernel over the feature columns.
    n_tasks, rank : int
        Size and rank of the task covariance.
    jitter : float
        Diagonal jitter of :math:`K_{uu}`.
    """

    def __init__(
        self,
        inducing: torch.Tensor,
        input_kernel: InputKernel,
        n_tasks: int,
        rank: int,
        jitter: float,
    ) -> None:
        q_u = CholeskyVariationalDistribution(inducing.shape[0] * n_tasks)
        super().__init__(_TiedStrategy(self, inducing, n_tasks, q_u, jitter))
        self.covar_module = _HadamardKernel(input_kernel, n_tasks, rank)

    @property
    def input_kernel(self) -> InputKernel:
        """The kernel over the feature columns."""
        return self.covar_module.input_kernel

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        """GP prior at inputs ``x`` (n, n_features + 1): zero mean, Hadamard kernel."""
        return MultivariateNormal(x.new_zeros(x.shape[:-1]), self.covar_module(x))

    def strategies(self) -> list:
        """Variational strategies whose caches must be cleared before each model call."""
        return [self.variational_strategy]

    def moments(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of :math:`q(f_t(x))` per row, each a Tensor of shape (n,)."""
        f = self.variational_strategy(_with_task(x, task))
        return f.mean, f.variance

    def covariance(self, x: torch.Tensor, task: torch.Tensor, posterior: bool) -> torch.Tensor:
        """Prior or variational-posterior covariance of :math:`f` at the rows, (n, n)."""
        xt = _with_task(x, task)
        if not posterior:
            return self.covar_module.forward(xt, xt)
        return self.variational_strategy(xt, diag=False).covariance_matrix

    def start_variational(
        self, x: torch.Tensor, task: torch.Tensor, r: torch.Tensor, noise_var: float, weight: float
    ) -> None:
        """Set :math:`q(u)` to its optimum for the current hyperparameters (see below)."""
        xt = _with_task(x, task)
        A = _whitened_design(self.covar_module, self.variational_strategy, xt)
        _set_optimal_q(self.variational_strategy, [A], r, noise_var, weight)

    def task_covariance(self) -> torch.Tensor:
        """:math:`k(x, x) B`, Tensor of shape (n_tasks, n_tasks)."""
        B = self.covar_module.task_kernel._eval_covar_matrix()
        return B * self.input_kernel.variance()

    def kl_divergence(self) -> torch.Tensor:
        """KL divergence of the variational distribution from the (whitened) prior."""
        return self.variational_strategy.kl_divergence()


class LMCModule(ApproximateGP):
    r"""Sparse variational linear model of coregionalisation: :math:`f_t = \sum_q a_{qt} g_q`.

    Status: experimental.

    GPyTorch's ``LMCVariationalStrategy`` (``latent_dim=-1``) over a batch of
    :math:`Q` latent GPs :math:`g_q` that share the inducing inputs. The input kernel has
    batch shape (Q,) (own hyperparameters per latent) or none (one kernel shared by the
    latents: the ICM kernel :math:`k \otimes A^T A` of the full multitask GP).

    Per-observation moments (:meth:`moments`) are formed from the latent marginals,
    :math:`E f_t = \sum_q a_{qt} m_q(x)` and :math:`\mathrm{Var} f_t = \sum_q a_{qt}^2
    v_q(x)`, which is what ``LMCVariationalStrategy(x, task_indices=t)`` returns (the
    latents are independent under the variational distribution) without forming its
    (n, n) lazy covariance: measured 0.04 s instead of 1.7 s for 2048 rows.

    Parameters
    ----------
    inducing : Tensor of shape (n_inducing, n_features)
        Initial inducing inputs, shared by the latents.
    input_kernel : InputKernel
        Kernel of the latents (batch shape (n_latents,) or ()).
    n_tasks, n_latents : int
        Tasks T and latent GPs Q.
    jitter : float
        Diagonal jitter of :math:`K_{uu}`.
    noise_rank : int, optional
        When given, a GPyTorch ``MultitaskGaussianLikelihood`` of that rank is attached as
        ``likelihood`` (the full multitask GP's correlated task noise).
    """

    def __init__(
        self,
        inducing: torch.Tensor,
        input_kernel: InputKernel,
        n_tasks: int,
        n_latents: int,
        jitter: float,
        noise_rank: int | None = None,
    ) -> None:
        q_u = CholeskyVariationalDistribution(
            inducing.shape[0], batch_shape=torch.Size([n_latents])
        )
        base = VariationalStrategy(self, inducing, q_u, True, jitter_val=jitter)
        strategy = LMCVariationalStrategy(
            base, num_tasks=n_tasks, num_latents=n_latents, latent_dim=-1, jitter_val=jitter
        )
        super().__init__(strategy)
        self.covar_module = input_kernel
        self.n_latents = n_latents
        if noise_rank is not None:
            self.likelihood = MultitaskGaussianLikelihood(num_tasks=n_tasks, rank=noise_rank)

    @property
    def input_kernel(self) -> InputKernel:
        """The latents' kernel."""
        return self.covar_module

    @property
    def mixing(self) -> torch.Tensor:
        """LMC coefficients :math:`A`, Tensor of shape (n_latents, n_tasks)."""
        return self.variational_strategy.lmc_coefficients

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        """Prior of the latents at inputs ``x`` (n, n_features): batch (n_latents,)."""
        mean = x.new_zeros((self.n_latents, x.shape[-2]))
        K = self.covar_module(x)
        if not self.covar_module.batch_shape:
            K = K.expand(self.n_latents, *K.shape)
        return MultivariateNormal(mean, K)

    def strategies(self) -> list:
        """Variational strategies whose caches must be cleared before each model call."""
        return [self.variational_strategy, self.variational_strategy.base_variational_strategy]

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances of the latents under q, Tensors of shape (n_latents, n)."""
        g = self.variational_strategy.base_variational_strategy(x)
        return g.mean, g.variance

    def moments(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of :math:`q(f_t(x))` per row, each a Tensor of shape (n,)."""
        mean, var = self.latent(x)
        a = self.mixing[:, task]  # (n_latents, n)
        return (mean * a).sum(0), (var * a**2).sum(0)

    def joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (n, n_tasks) and task covariance (n, n_tasks, n_tasks) of q(f(x)) per input."""
        mean, var = self.latent(x)
        A = self.mixing
        return mean.T @ A, torch.einsum("qn,qt,qu->ntu", var, A, A)

    def covariance(self, x: torch.Tensor, task: torch.Tensor, posterior: bool) -> torch.Tensor:
        """Prior or variational-posterior covariance of :math:`f` at the rows, (n, n)."""
        if posterior:
            K = self.variational_strategy.base_variational_strategy(x, diag=False)
            K = K.covariance_matrix
        else:
            K = self.covar_module.forward(x, x)
        a = self.mixing[:, task]  # (n_latents, n)
        return torch.einsum("qi,qj,qij->ij", a, a, K.expand(self.n_latents, *K.shape[-2:]))

    def start_variational(
        self, x: torch.Tensor, task: torch.Tensor, r: torch.Tensor, noise_var: float, weight: float
    ) -> None:
        """Set the latents' :math:`q(u_q)` from the joint optimum (see :func:`_set_optimal_q`)."""
        base = self.variational_strategy.base_variational_strategy
        A = _whitened_design(self.covar_module, base, x)  # (Q or 1, M, n)
        A = A.expand(self.n_latents, *A.shape[-2:])
        a = self.mixing[:, task].detach().double()  # (Q, n)
        _set_optimal_q(base, [A[q] * a[q] for q in range(self.n_latents)], r, noise_var, weight)

    def task_covariance(self) -> torch.Tensor:
        r""":math:`A^T \mathrm{diag}(k_q(x, x)) A`, Tensor of shape (n_tasks, n_tasks)."""
        s = self.covar_module.variance().expand(self.n_latents)
        return self.mixing.T @ (s[:, None] * self.mixing)

    def noise_covariance(self) -> torch.Tensor:
        """Task noise covariance of the attached likelihood, (n_tasks, n_tasks)."""
        lik = self.likelihood
        if lik.rank == 0:
            return torch.diag(lik.task_noises + lik.noise)
        return lik._eval_covar_matrix()

    def kl_divergence(self) -> torch.Tensor:
        """KL divergence of the latents' variational distributions from their priors."""
        return self.variational_strategy.kl_divergence()


def _with_task(x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, task[:, None].to(x.dtype)], dim=-1)


def _whitened_design(
    kernel: Kernel, strategy: VariationalStrategy, x: torch.Tensor
) -> torch.Tensor:
    r"""Whitened cross-covariance :math:`L_{uu}^{-1} K_{uf}` (float64), shape (…, M, n)."""
    with torch.no_grad():
        Z = strategy.inducing_points
        Kuu = kernel.forward(Z, Z).double()
        Kuu = Kuu + strategy.jitter_val * torch.eye(
            Kuu.shape[-1], dtype=Kuu.dtype, device=Kuu.device
        )
        Luu = torch.linalg.cholesky(Kuu)
        return torch.linalg.solve_triangular(Luu, kernel.forward(Z, x).double(), upper=False)


def _set_optimal_q(
    strategy: VariationalStrategy,
    designs: list[torch.Tensor],
    r: torch.Tensor,
    noise_var: float,
    weight: float,
) -> None:
    r"""Start :math:`q(v)` (whitened) at the optimum of a Gaussian fit to residuals ``r``.

    With :math:`f = \Phi^T v` (``designs`` stacked, blocks of shape (M, n), one per
    latent), prior :math:`v \sim N(0, I)` and :math:`r \sim N(f, \sigma^2)` with each of
    the n rows standing for ``weight`` training rows, :math:`q(v) = N(P^{-1} w \Phi r /
    \sigma^2, P^{-1})`, :math:`P = I + w \Phi \Phi^T / \sigma^2` (the optimum of the
    ELBO for fixed hyperparameters). Several latents get their blocks of the mean and
    covariance. GPyTorch's default start is the prior, where :math:`q(f)` has the full
    prior variance and the ELBO's :math:`-v / (2 \sigma^2)` term drives the signal
    variance to zero before the mean has moved.
    """
    with torch.no_grad():
        Phi = torch.cat(designs)  # (Q M, n)
        c = weight / noise_var
        P = torch.eye(Phi.shape[0], dtype=Phi.dtype, device=Phi.device) + c * Phi @ Phi.T
        LP = torch.linalg.cholesky(P)
        mean = torch.cholesky_solve(c * (Phi @ r.double())[:, None], LP)[:, 0]
        cov = torch.cholesky_inverse(LP)
        q = strategy._variational_distribution
        M = q.variational_mean.shape[-1]
        blocks = [slice(i * M, (i + 1) * M) for i in range(len(designs))]
        means = torch.stack([mean[b] for b in blocks]).reshape(q.variational_mean.shape)
        chols = torch.stack([torch.linalg.cholesky(cov[b, b]) for b in blocks])
        q.variational_mean.copy_(means.to(q.variational_mean.dtype))
        q.chol_variational_covar.copy_(chols.reshape(q.chol_variational_covar.shape))
        strategy.variational_params_initialized.fill_(1)
