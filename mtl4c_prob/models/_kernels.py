"""Kernels over (cell, drug) inputs, built from pyro.contrib.gp kernels with priors.

Both Gaussian-process families of the package (the single-task GPs of ``_gp.py`` and the
multitask GPs) describe a measurement by the concatenated input row

    [cell features (cell_dim) | drug features (drug_dim) | drug identity (identity_dim)]

and share the constructor-style options of :class:`CellDrugKernel` (``kernel``,
``composite``, ``ard`` and the prior settings), so that a command line or an Optuna
study sets them the same way for every GP.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro.nn import PyroSample, pyro_method

__all__ = [
    "COMPOSITES",
    "KERNELS",
    "CellDrugKernel",
    "DrugInputChoice",
    "identity_inputs",
    "median_distance",
    "reference_distances",
]

#: Stationary kernel families, by the name used on the command line.
KERNELS = {
    "rbf": gp.kernels.RBF,
    "matern12": gp.kernels.Exponential,
    "matern32": gp.kernels.Matern32,
    "matern52": gp.kernels.Matern52,
}


class _FixedInputDistances:
    """Mixin for isotropic pyro.contrib.gp kernels: cached distances of fixed inputs.

    Inputs that need no gradient (feature tables, fixed inducing inputs) keep their
    squared distances between steps; only the division by the lengthscale is redone. The
    distances are formed in float64 (no cancellation for wide inputs such as 1024-bit
    fingerprints) and reused while both input tensors are alive and unmodified. Columns
    are sliced as views (``active_dims`` becomes a slice once the kernel is built).
    """

    _cache_size = 8

    def _square_scaled_dist(self, X, Z=None):
        Z = X if Z is None else Z
        ls = self.lengthscale
        if X.requires_grad or Z.requires_grad or ls.dim() > 0:
            return super()._square_scaled_dist(X, Z)
        return self._fixed_sq_dist(X, Z).to(ls.dtype) / ls**2

    def _fixed_sq_dist(self, X: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_sq_dist_cache", [])
        for wx, wz, vx, vz, D2 in cache:
            if wx() is X and wz() is Z and vx == X._version and vz == Z._version:
                return D2
        Xs, Zs = self._slice_input(X).double(), self._slice_input(Z).double()
        D2 = torch.cdist(Xs, Zs).pow(2).to(X.dtype)
        cache.insert(0, (weakref.ref(X), weakref.ref(Z), X._version, Z._version, D2))
        del cache[self._cache_size :]
        return D2


def _fast(cls: type) -> type:
    return type(f"_Fast{cls.__name__}", (_FixedInputDistances, cls), {"__doc__": cls.__doc__})


_FAST = {name: _fast(cls) for name, cls in KERNELS.items()}
#: How the cell side and the drug side are combined.
COMPOSITES = ("none", "product", "sum")


def median_distance(X: torch.Tensor, max_rows: int = 1000, seed: int = 0) -> float:
    """Median Euclidean distance between distinct rows of ``X`` (a seeded subset of rows).

    Parameters
    ----------
    X : Tensor of shape (n, dim)
        Input rows (e.g. the training cells' features).
    max_rows : int, default=1000
        Rows drawn (without replacement) when ``X`` has more.
    seed : int, default=0
        Seed of that draw.

    Returns
    -------
    float
        The median over pairs at a positive distance; 1.0 when all rows coincide.
    """
    if X.shape[0] > max_rows:
        gen = torch.Generator().manual_seed(seed)
        X = X[torch.randperm(X.shape[0], generator=gen)[:max_rows].to(X.device)]
    dist_ = torch.cdist(X.double(), X.double())
    positive = dist_[dist_ > 1e-9]
    return float(positive.median()) if positive.numel() else 1.0


def reference_distances(
    rows: torch.Tensor, cell_dim: int, drug_dim: int = 0, identity_dim: int = 0, seed: int = 0
) -> dict[str, float]:
    r"""Typical distances of each input block, the unit of the lengthscale priors.

    Parameters
    ----------
    rows : Tensor of shape (n, cell_dim + drug_dim + identity_dim)
        Training input rows (a sample of them is enough).
    cell_dim, drug_dim, identity_dim : int
        Widths of the blocks.
    seed : int, default=0
        Seed of the row subset of :func:`median_distance`.

    Returns
    -------
    dict
        ``cell``, ``drug`` (when ``drug_dim``), ``identity`` (:math:`\sqrt 2`, the distance
        between two one-hot rows, when ``identity_dim``) and ``joint`` (all columns).
    """
    if rows.shape[1] != cell_dim + drug_dim + identity_dim:
        raise ValueError(
            f"rows have {rows.shape[1]} columns, expected cell_dim + drug_dim + identity_dim = "
            f"{cell_dim + drug_dim + identity_dim}"
        )
    out = {"cell": median_distance(rows[:, :cell_dim], seed=seed)}
    if drug_dim:
        out["drug"] = median_distance(rows[:, cell_dim : cell_dim + drug_dim], seed=seed)
    if identity_dim:
        out["identity"] = math.sqrt(2.0)
    out["joint"] = median_distance(rows, seed=seed)
    return out


class DrugInputChoice:
    """What a GP's ``drug_input`` option (auto, features, identity, both) switches on.

    Mixed into both GP families before :class:`ProbabilisticModel`; ``"auto"`` uses the
    drug features when the training data had them (``_auto_drug``, set at fit time).
    """

    drug_input: str

    def _use_drug_features(self) -> bool:
        if self.drug_input == "auto":
            return getattr(self, "_auto_drug", False)
        return self.drug_input in ("features", "both")

    def _uses_identity(self) -> bool:
        return self.drug_input in ("auto", "identity", "both")


def identity_inputs(seen: torch.Tensor) -> torch.Tensor:
    r"""One-hot drug identity inputs: one column per seen drug plus one for all others.

    Parameters
    ----------
    seen : BoolTensor of shape (n_drugs,)
        Which drugs had training rows.

    Returns
    -------
    Tensor of shape (n_drugs, n_seen + 1)
        Row ``d`` is the unit vector of drug ``d``'s column; drugs without training rows
        share the last column, so each is at the same distance (:math:`\sqrt 2`) from
        every training drug as two training drugs are from each other.
    """
    n_seen = int(seen.sum())
    column = torch.where(seen, torch.cumsum(seen.long(), 0) - 1, n_seen)
    return torch.nn.functional.one_hot(column, n_seen + 1).to(torch.float32)


class CellDrugKernel(gp.kernels.Kernel):
    r"""Covariance of (cell, drug) inputs from pyro.contrib.gp kernels with priors.

    Status: experimental.

    An input row is :math:`x = [x_c, v_d, e_d]`: cell features :math:`x_c`
    (``cell_dim`` columns), drug features :math:`v_d` (``drug_dim``, may be 0) and a
    one-hot drug identity :math:`e_d` (``identity_dim``, may be 0; see
    :func:`identity_inputs`). With ``composite``:

    * ``"none"``: one kernel on the whole row, :math:`k(x, x')`;
    * ``"product"``: :math:`k_c(x_c, x_c') \, k_d([v_d, e_d], [v_{d'}, e_{d'}])`;
    * ``"sum"``: :math:`k_c(x_c, x_c') + k_d(\cdot, \cdot)`;

    where the drug kernel is :math:`k_v(v_d, v_{d'}) + k_e(e_d, e_{d'})` when both drug
    blocks are present (structure similarity plus a drug-identity term, whose constant
    off-diagonal part carries what all drugs share), else the one present. Every part is
    a kernel of family ``kernel`` with its own output variance and lengthscales.

    Priors (all set through ``PyroSample``, so the hyperparameters are latent sites named
    after the module path, e.g. ``kernel.cell.lengthscale``):

    .. math::

        \ell \sim \mathrm{LogNormal}(\log(\ell_0 \, r_b), s_\ell^2), \qquad
        \sigma^2 \sim \mathrm{LogNormal}(\log v_b, s_v^2)

    with :math:`r_b` the block's reference distance (the median distance between
    training rows, :func:`reference_distances`), :math:`\ell_0` =
    ``lengthscale_prior_loc`` and :math:`s_\ell` = ``lengthscale_prior_scale``. The
    variance medians :math:`v_b` split ``variance_prior_loc`` (the prior median of
    :math:`k(x, x)`, in units of the standardised response) evenly over summed parts; in
    a product the drug side has median 1. ``ard=True`` gives every cell and drug-feature
    column its own lengthscale (the identity block keeps one: it only sets the
    correlation between distinct drugs).

    Parameters
    ----------
    cell_dim : int
        Number of cell-feature columns (at least 1).
    drug_dim, identity_dim : int, default=0
        Numbers of drug-feature and drug-identity columns (at least one of them > 0,
        except with ``composite="none"``).
    kernel : {"rbf", "matern12", "matern32", "matern52"}, default="rbf"
        Kernel family of every part.
    composite : {"none", "product", "sum"}, default="product"
        How the cell and drug sides combine (see above).
    ard : bool, default=False
        One lengthscale per cell and drug-feature column.
    reference : dict, optional
        Reference distances per block (``cell``, ``drug``, ``identity``, ``joint``), from
        :func:`reference_distances`; missing blocks use :math:`\sqrt{\text{dim}}`, the
        typical distance of standardised columns.
    lengthscale_prior_loc : float, default=1.0
        :math:`\ell_0`, prior median of the lengthscales in units of the reference.
    lengthscale_prior_scale : float, default=1.0
        :math:`s_\ell`, sd of the log lengthscales.
    variance_prior_loc : float, default=0.5
        Prior median of the total output variance :math:`k(x, x)`.
    variance_prior_scale : float, default=1.0
        :math:`s_v`, sd of the log variances.

    Notes
    -----
    Like every pyro.contrib.gp kernel with ``PyroSample`` priors, each evaluation
    outside a PyroModule context samples the hyperparameters afresh. A program that
    evaluates the kernel several times, or inside a plate, runs in :meth:`scope`, which
    samples them once, outside any plate. With a separable composite, :meth:`blocks`
    evaluates the two sides on entity tables (cells, drugs) so that a row's covariance is
    a gather, O(I + J) kernel evaluations per inducing point instead of O(N).
    """

    def __init__(
        self,
        cell_dim: int,
        drug_dim: int = 0,
        identity_dim: int = 0,
        *,
        kernel: str = "rbf",
        composite: str = "product",
        ard: bool = False,
        reference: dict[str, float] | None = None,
        lengthscale_prior_loc: float = 1.0,
        lengthscale_prior_scale: float = 1.0,
        variance_prior_loc: float = 0.5,
        variance_prior_scale: float = 1.0,
    ) -> None:
        check_kernel_options(kernel, composite)
        if cell_dim < 1 or drug_dim < 0 or identity_dim < 0:
            raise ValueError(
                f"cell_dim must be positive and drug_dim, identity_dim non-negative; got "
                f"{cell_dim}, {drug_dim}, {identity_dim}"
            )
        if composite != "none" and drug_dim + identity_dim == 0:
            raise ValueError(f"composite={composite!r} needs drug_dim or identity_dim > 0")
        for arg, value in (
            ("lengthscale_prior_loc", lengthscale_prior_loc),
            ("lengthscale_prior_scale", lengthscale_prior_scale),
            ("variance_prior_loc", variance_prior_loc),
            ("variance_prior_scale", variance_prior_scale),
        ):
            if not value > 0:
                raise ValueError(f"{arg} must be positive, got {value}")
        total = cell_dim + drug_dim + identity_dim
        super().__init__(total)
        self.cell_dim, self.drug_dim, self.identity_dim = cell_dim, drug_dim, identity_dim
        self.composite = composite
        self._family = _FAST[kernel]
        self._ard, self._ref = ard, dict(reference or {})
        self._ls_loc, self._ls_scale = float(lengthscale_prior_loc), float(lengthscale_prior_scale)
        self._var_scale = float(variance_prior_scale)

        v = float(variance_prior_loc)
        if composite == "none":
            self.joint = self._part("joint", total, ard, v)
            self._slice_views()
            return
        n_drug_parts = (drug_dim > 0) + (identity_dim > 0)
        cell_var, drug_var = (v, 1.0) if composite == "product" else (v / 2, v / 2)
        self.cell = self._part("cell", cell_dim, ard, cell_var)
        parts = []
        if drug_dim:
            parts.append(self._part("drug", drug_dim, ard, drug_var / n_drug_parts))
        if identity_dim:
            dims = list(range(drug_dim, drug_dim + identity_dim))
            parts.append(self._part("identity", identity_dim, False, drug_var / n_drug_parts, dims))
        self.drug = parts[0] if len(parts) == 1 else gp.kernels.Sum(*parts)
        self._slice_views()

    def _slice_views(self) -> None:
        """Contiguous columns as slices, so that X[:, active_dims] is a view, not a copy.

        Done after the kernels are combined (``Sum`` needs the column lists).
        """
        for part in self.modules():
            if isinstance(part, gp.kernels.Isotropy):
                part.active_dims = slice(part.active_dims[0], part.active_dims[-1] + 1)

    def _part(self, block: str, dim: int, ard: bool, variance: float, active_dims=None):
        """One pyro.contrib.gp kernel of the family with LogNormal priors."""
        part = self._family(dim, active_dims=active_dims)
        ref = self._ref.get(block, math.sqrt(dim))
        # Prior locations are buffers, so that the priors follow the module to a device.
        part.register_buffer(
            "log_lengthscale_median",
            torch.full((dim,) if ard else (), math.log(self._ls_loc * ref)),
        )
        part.register_buffer("log_variance_median", torch.tensor(math.log(variance)))
        ls_scale, var_scale = self._ls_scale, self._var_scale
        part.lengthscale = PyroSample(
            lambda m: dist.LogNormal(m.log_lengthscale_median, ls_scale).to_event(
                m.log_lengthscale_median.dim()
            )
        )
        part.variance = PyroSample(lambda m: dist.LogNormal(m.log_variance_median, var_scale))
        return part

    @property
    def separable(self) -> bool:
        """Whether the cell and drug sides are separate kernels (``composite != "none"``)."""
        return self.composite != "none"

    def combine(self, Kc: torch.Tensor, Kd: torch.Tensor) -> torch.Tensor:
        """Combine cell-side and drug-side covariances (product or sum)."""
        return Kc * Kd if self.composite == "product" else Kc + Kd

    def forward(
        self, X: torch.Tensor, Z: torch.Tensor | None = None, diag: bool = False
    ) -> torch.Tensor:
        """Covariance of input rows ``X`` (n, input_dim) and ``Z`` (m, input_dim).

        Returns a Tensor of shape (n, m), or (n,) with ``diag=True``.
        """
        if not self.separable:
            return self.joint(X, Z, diag=diag)
        p = self.cell_dim
        Zc, Zd = (None, None) if Z is None else (Z[:, :p], Z[:, p:])
        return self.combine(self.cell(X[:, :p], Zc, diag=diag), self.drug(X[:, p:], Zd, diag=diag))

    def blocks(
        self, cell_a: torch.Tensor, drug_a: torch.Tensor, cell_b=None, drug_b=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell-side and drug-side covariances of entity tables (separable composites).

        Parameters
        ----------
        cell_a, cell_b : Tensor of shape (n_a, cell_dim), (n_b, cell_dim)
            Cell inputs (``cell_b`` defaults to ``cell_a``).
        drug_a, drug_b : Tensor of shape (m_a, drug_dim + identity_dim), (m_b, ...)
            Drug inputs (``drug_b`` defaults to ``drug_a``).

        Returns
        -------
        Kc : Tensor of shape (n_a, n_b)
        Kd : Tensor of shape (m_a, m_b)
            A row pair's covariance is ``combine(Kc[c, c'], Kd[d, d'])``.
        """
        if not self.separable:
            raise ValueError("composite='none' has no separate cell and drug kernels")
        return self.cell(cell_a, cell_b), self.drug(drug_a, drug_b)

    def hyperparameters(self) -> dict[str, torch.Tensor]:
        """Return the lengthscales and variances by site name (sampled once in :meth:`scope`)."""
        out = {}
        for module in self.modules():
            if isinstance(module, gp.kernels.Isotropy):
                for attr in ("lengthscale", "variance"):
                    out[module._pyro_get_fullname(attr)] = getattr(module, attr)
        return out

    @pyro_method
    def scope(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` with the hyperparameters sampled once, first."""
        self._load_pyro_samples()
        return fn(*args, **kwargs)


def check_kernel_options(kernel: str, composite: str) -> None:
    """Raise a ValueError naming the bad ``kernel`` or ``composite`` value."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
    if composite not in COMPOSITES:
        raise ValueError(f"composite must be one of {COMPOSITES}, got {composite!r}")
