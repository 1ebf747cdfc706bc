"""Neighbourhood model: baseline effects plus learned interpolation of neighbours' residuals."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.models._likelihoods import gaussian_likelihood
from mtl4c_prob.models._mean import MeanEffects
from mtl4c_prob.models._mf import _moments, _rows

logger = logging.getLogger(__name__)

__all__ = ["NeighbourhoodModel"]

SIMILARITIES = ("pearson_baseline", "cosine")
#: Most neighbour inputs, n_tasks * n_cells * n_drugs * k, the model keeps (float32).
MAX_INPUTS = 100_000_000
#: Ridge penalties and sweeps of the fixed ALS baselines (surprise's defaults).
_BASELINE_REG = {"cell": 15.0, "drug": 10.0}
_BASELINE_SWEEPS = 10


class NeighbourhoodModel(MeanEffects):
    r"""Neighbourhood (KNN) model: mean effects plus the residuals of the k most similar drugs.

    Status: experimental.

    The probabilistic counterpart of surprise's ``KNNBaseline`` (the original toolkit's
    KNN_Basic / KNN_Normalized), with the interpolation weights learned under priors (a
    Bayesian version of Koren's global neighbourhood model). With ``on="drug"``, for task
    :math:`t`, cell :math:`c` and drug :math:`d` (responses standardised per task):

    .. math::

        y_{tcd} &\sim N\big(m_t + b_{tc} + b_{td} + \delta_{tcd}, \ \sigma_{tcd}^2
            + (1 - a_{tcd})\, v_d\big) \\
        \delta_{tcd} &= \frac{\sum_{j \in N_k(d)} w_{dj}\, s^{(-tc)}_{dj}\, o_{tcj}\,
            (y_{tcj} - \hat m_t - \hat b_{tj} - \hat b^{(-d)}_{tc})}
            {\sum_{j \in N_k(d)} s^{(-tc)}_{dj}\, o_{tcj}}, \quad
        a_{tcd} = \frac{\sum_{j \in N_k(d)} s_{dj}\, o_{tcj}}{\sum_{j \in N_k(d)} s_{dj}}, \quad
        v_d = \overline{\delta^2_{t'c'd}} \\
        w_{dj} &= g + \tau_d z_d + \tau_w z_{dj}, \quad
            g = 1 + s_g z_g, \quad \tau_d, \tau_w \sim N^+(s_\tau^2)

    where :math:`o_{tcj}` is 1 when the training data hold (t, c, j) and 0 otherwise (the
    normaliser runs over measured neighbours only; a row with none gets no neighbour term),
    :math:`a_{tcd}` is the share of the drug's neighbour similarity measured on the cell,
    :math:`v_d` is the mean square of the neighbour term over the drug's training pairs
    (so a row without neighbour data, such as a cell without training rows, has the
    variance that the term would explain added back to its noise), the effects
    :math:`m_t, b_{tc}, b_{td}` and the noise :math:`\sigma_{tcd}` have the priors of
    :class:`~mtl4c_prob.models.MeanEffects`, and the :math:`z` are standard normal. The
    neighbour inputs are constants computed in fit from the training rows only: ridge (ALS)
    baselines :math:`\hat m_t, \hat b_{tc}, \hat b_{td}` as in surprise, shrunk similarities
    :math:`s_{dj} \ge 0` and the lists :math:`N_k(d)` of the k most similar drugs.
    ``on="cell"`` swaps the roles of cells and drugs.

    Parameters
    ----------
    k : int, default=40
        Neighbours per drug (or cell); capped at the number of other drugs (cells).
    on : {"drug", "cell"}, default="drug"
        Entity whose neighbours interpolate: similar drugs on the same cell, or similar
        cells on the same drug.
    similarity : {"pearson_baseline", "cosine"}, default="pearson_baseline"
        Pearson correlation of the ALS baseline residuals over common (task, cell) rows
        (surprise's ``pearson_baseline``), or cosine of the standardised responses minus the
        task mean.
    shrinkage : float, default=100.0
        Similarities (of either kind) are multiplied by :math:`(n - 1) / (n - 1 +
        \text{shrinkage})`, with :math:`n` the number of common rows; 0 turns it off.
    min_support : int, default=5
        Pairs with fewer common rows get similarity 0 (never neighbours).
    weight_scale : float, default=0.5
        Prior sd :math:`s_g` of the global interpolation weight around 1.
    weight_spread : float, default=0.3
        Scale :math:`s_\tau` of the half-normal priors on the per-drug and per-pair sds of
        the weights.
    weights : {"pair", "item"}, default="pair"
        Learn a weight per (drug, neighbour) pair as above, or one per drug
        (:math:`\tau_w = 0`). Measured on GDSC2 leave-pairs-out: RMSE 0.835 against 0.892.
        With few rows per drug (or per cell with ``on="cell"``) the per-pair weights
        overfit and the intervals get too narrow; "item" is then the safer choice.
    multitask, cell_features, drug_features, bias_scale, offset_scale, task_scale, \
feature_scale, noise, noise_scale, noise_spread
        As for :class:`~mtl4c_prob.models.MeanEffects`.

    Attributes
    ----------
    neighbours_ : LongTensor of shape (n_drugs, k)
        Codes of each drug's neighbours (cells with ``on="cell"``), most similar first.
    similarity_ : Tensor of shape (n_drugs, k)
        Their shrunk similarities; 0 marks a slot without a usable neighbour.

    Notes
    -----
    Similarities are pooled across tasks: the sums behind them run over every (task, cell)
    row that measured both drugs, so all tasks share one neighbour list and one set of
    weights. Unlike surprise, which takes the k most similar drugs among those the cell
    was measured on, the lists are fixed per drug, and unmeasured neighbours drop out of
    the sum.

    Leakage: a training row's inputs never contain its own response. The neighbours are
    other drugs; the cell baseline inside the residuals is refitted without the row
    (:math:`\hat b^{(-d)}_{tc}`), and the similarities are recomputed without the row's
    cell (:math:`s^{(-tc)}`, equal to :math:`s` for pairs the training data do not hold).
    The response still enters, at second order, the other baselines, the per-task
    standardisation and the choice of the neighbour lists. At prediction time only
    training responses are used.

    Cost: fit builds dense (n_tasks, n_cells, n_drugs) tables of the training responses
    (duplicated pairs averaged, censored responses taken at their bound) and k inputs per
    (task, cell, drug) pair, T I J k floats (44 MB for GDSC2 with k=40); above
    :data:`MAX_INPUTS` it raises NotImplementedError. A step costs O(T I J k) on top of
    the mean effects. Cells or drugs met only at prediction time (through features) get
    no neighbour term.
    """

    name = "knn"
    #: Ranges searched by ``mtl4c-prob tune`` (each holds the default).
    search_space = {
        "k": ("int", 10, 80, "log"),
        "shrinkage": ("float", 10.0, 1000.0, "log"),
        "weight_scale": ("float", 0.1, 2.0, "log"),
        "weight_spread": ("float", 0.05, 1.5, "log"),
        "bias_scale": ("float", 0.1, 5.0, "log"),
        "task_scale": ("float", 0.03, 1.5, "log"),
        "noise": ("categorical", ("task", "drug", "cell-drug")),
        "noise_spread": ("float", 0.1, 2.0, "log"),
    }

    def __init__(
        self,
        k: int = 40,
        *,
        on: str = "drug",
        similarity: str = "pearson_baseline",
        shrinkage: float = 100.0,
        min_support: int = 5,
        weight_scale: float = 0.5,
        weight_spread: float = 0.3,
        weights: str = "pair",
        multitask: bool = True,
        cell_features: bool | None = None,
        drug_features: bool | None = None,
        bias_scale: float = 1.0,
        offset_scale: float = 1.0,
        task_scale: float = 0.3,
        feature_scale: float = 1.0,
        noise: str = "cell-drug",
        noise_scale: float = 1.0,
        noise_spread: float = 0.5,
    ) -> None:
        super().__init__(
            multitask=multitask,
            cell_features=cell_features,
            drug_features=drug_features,
            bias_scale=bias_scale,
            offset_scale=offset_scale,
            task_scale=task_scale,
            feature_scale=feature_scale,
            noise=noise,
            noise_scale=noise_scale,
            noise_spread=noise_spread,
        )
        _check_args(k, on, similarity, shrinkage, min_support, weights)
        for name, value in (("weight_scale", weight_scale), ("weight_spread", weight_spread)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.k = int(k)
        self.on = on
        self.similarity = similarity
        self.shrinkage = shrinkage
        self.min_support = int(min_support)
        self.weight_scale = weight_scale
        self.weight_spread = weight_spread
        self.weights = weights

    # -------------------------------------------------------------- fit-time state
    def _setup(self, train: DrugResponseData, device: torch.device) -> None:
        """Residual tables, similarities and neighbour lists from the training rows."""
        n_items = self.n_drugs_ if self.on == "drug" else self.n_cells_
        k = min(self.k, n_items - 1)
        if k < 1:
            raise ValueError(f"on={self.on!r} needs at least two {self.on}s; the data have 1")
        size = self.n_tasks_ * self.n_cells_ * self.n_drugs_
        if size * k > MAX_INPUTS:
            raise NotImplementedError(
                "the neighbourhood model keeps k neighbour inputs per (task, cell, drug) "
                f"pair in memory; this data needs {size * k:,} (k={k}), above the limit of "
                f"{MAX_INPUTS:,}. Lower k, fit tasks separately (multitask=False) or use "
                "fewer cells or drugs"
            )

        # Dense (T, I, J) tables of the standardised training responses, then residuals.
        t = train.codes("task")
        y = self.scaler_.transform(train.y, t)
        Y, M = _dense(t, train.codes("cell"), train.codes("drug"), y, self._shape())
        resid, loo, E = _baseline_residuals(Y, M, self.on)
        X = E if self.similarity == "pearson_baseline" else _centre(Y, M, self.on)
        tables = {"similarity_input": X, "residuals": resid, "loo_baseline": loo}
        tables = {name: value.float() for name, value in tables.items()}
        self._set_tables({**tables, "mask": _orient(M, self.on)}, None, k, device)
        logger.info(
            "neighbourhood model: %d %ss, k=%d (median %d with positive similarity), %s",
            n_items,
            self.on,
            k,
            int((self.similarity_ > 0).sum(1).median()),
            self.similarity,
        )

    def _shape(self) -> tuple[int, int, int]:
        return self.n_tasks_, self.n_cells_, self.n_drugs_

    def _set_tables(
        self,
        tables: dict[str, torch.Tensor],
        neighbours: torch.Tensor | None,
        k: int,
        device: torch.device,
    ) -> None:
        """Similarities, neighbour lists (unless given) and the per-slot neighbour inputs."""
        self.tables_ = {name: value.cpu() for name, value in tables.items()}
        X, M = tables["similarity_input"].double(), tables["mask"].double()
        sums = _pair_sums(X, M)
        S = _shrunk(*sums, self.shrinkage, self.min_support)  # (N, N)

        if neighbours is None:
            neighbours = torch.topk(S.fill_diagonal_(-torch.inf), k, dim=1).indices
        self.neighbours_ = neighbours.long()
        self.similarity_ = S.gather(1, self.neighbours_).clamp(min=0.0).float()

        inputs = _neighbour_inputs(
            tables, self.neighbours_, sums, self.similarity_ > 0, self.shrinkage, self.min_support
        )
        missing = _missing_share(tables["mask"], self.neighbours_, self.similarity_)

        self.neighbours_ = self.neighbours_.to(device)
        self.similarity_ = self.similarity_.to(device)
        self._inputs = inputs.to(device)  # (N, T, U, k)
        self._missing = missing.to(device)  # (N, T, U)
        self._train_pairs = tables["mask"].float().reshape(-1, len(missing)).T.to(device)
        self._layout_cache = None

    def _get_fitted_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {}, {"neighbours": self.neighbours_, **self.tables_}

    def _set_fitted_state(
        self, state: dict, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        tensors = {name: value.cpu() for name, value in tensors.items()}
        neighbours = tensors.pop("neighbours")
        self._set_tables(tensors, neighbours, neighbours.shape[1], device)

    def neighbour_table(self) -> pd.DataFrame:
        """Neighbour lists by name.

        Returns
        -------
        DataFrame
            Columns ``on`` (the drug or cell), ``rank`` (1 = most similar), ``neighbour`` and
            ``similarity``, one row per neighbour with positive similarity.
        """
        if not hasattr(self, "neighbours_"):
            raise RuntimeError("neighbour_table needs a jointly fitted model; call fit() first")
        names = np.asarray(self.drugs_ if self.on == "drug" else self.cells_)
        nbr, sim = self.neighbours_.cpu().numpy(), self.similarity_.cpu().numpy()
        rows = np.nonzero(sim > 0)
        return pd.DataFrame(
            {
                self.on: names[rows[0]],
                "rank": rows[1] + 1,
                "neighbour": names[nbr[rows]],
                "similarity": sim[rows],
            }
        )

    # ------------------------------------------------------------------- latents
    def _layouts(self):
        """Return the mean-effects blocks plus those of the interpolation weights."""
        if getattr(self, "_layout_cache", None) is not None:
            return self._layout_cache
        layouts = super()._layouts()
        z, sc = layouts["z"], layouts["scales"]
        z.add("weight_z")
        z.add("item_weight_z", *self.neighbours_.shape[:1])
        sc.add("item_weight_sd", scale=self.weight_spread)
        if self.weights == "pair":
            z.add("pair_weight_z", *self.neighbours_.shape)
            sc.add("pair_weight_sd", scale=self.weight_spread)
        return layouts

    def _interpolation_weights(self, z: dict, sc: dict) -> torch.Tensor:
        """Weights :math:`w` of shape (n_items, k)."""
        item = 1.0 + self.weight_scale * z["weight_z"] + sc["item_weight_sd"] * z["item_weight_z"]
        if "pair_weight_z" not in z:
            return item[:, None].expand_as(self.similarity_)
        return item[:, None] + sc["pair_weight_sd"] * z["pair_weight_z"]

    def _neighbour_term(self, weights: torch.Tensor, t, c, d) -> tuple[torch.Tensor, ...]:
        """Neighbour term and its missing variance for rows (t, c, d), each (n_rows,).

        The term is formed for every pair of the table at once, (N, T * U), one batched
        matrix-vector product; the per-item variance of the term over the training pairs
        comes from the same table.
        """
        N, T, U, k = self._inputs.shape
        u, i = (c, d) if self.on == "drug" else (d, c)
        known_i = i < N
        known = (u < U) & known_i  # entities met only at predict time have no neighbours
        u, i = u.clamp(max=U - 1), i.clamp(max=N - 1)
        flat = (i * T + t) * U + u

        # Term of every pair, then its mean square over each item's training pairs.
        table = torch.bmm(self._inputs.reshape(N, T * U, k), weights[:, :, None])[..., 0]
        count = self._train_pairs.sum(1)
        var = (table.square() * self._train_pairs).sum(1) / count.clamp(min=1.0)  # (N,)
        var = torch.where(count > 0, var, var.sum() / (count > 0).sum().clamp(min=1))

        term = torch.where(known, table.reshape(-1)[flat], 0.0)
        missing = torch.where(known, self._missing.reshape(-1)[flat], 1.0)
        fallback = var.sum() / (count > 0).sum().clamp(min=1)  # items met at predict time
        return term, missing * torch.where(known_i, var[i], fallback)

    # --------------------------------------------------------------------- model
    def model(self, data: TensorData, subsample_size: int | None = None) -> None:
        """Pyro program of the generative story above.

        The latents are packed as in :class:`~mtl4c_prob.models.BayesianMF`: one standard
        normal site ``"z"`` and one half-normal site ``"scales"``.
        """
        layouts, dev = self._layouts(), data.device
        z_all = pyro.sample(
            "z", dist.Normal(torch.zeros(layouts["z"].size, device=dev), 1.0).to_event(1)
        )
        sc_all = pyro.sample(
            "scales", dist.HalfNormal(layouts["scales"].scale_tensor(dev)).to_event(1)
        )
        z, sc = layouts["z"].unpack(z_all), layouts["scales"].unpack(sc_all)

        # Mean effects and noise, as in MeanEffects; interpolation weights of the neighbours.
        task_offset = self.offset_scale * z["offset"].expand(self.n_tasks_)
        if "task_offset_z" in z:
            task_offset = task_offset + sc["task_offset_sd"] * z["task_offset_z"]
        U, cell_bias = self._entity("cell", data, z, sc)
        V, drug_bias = self._entity("drug", data, z, sc)
        log_noise = self._log_noise(data, z, sc)
        weights = self._interpolation_weights(z, sc)

        with pyro.plate(
            "observations", data.n_obs, subsample_size=subsample_size, device=dev
        ) as idx:
            t, c, d, y, censor = _rows(data, idx, subsample_size)
            loc, log_scale = _moments(task_offset, U, cell_bias, V, drug_bias, log_noise, t, c, d)
            term, missing_var = self._neighbour_term(weights, t, c, d)
            loc = loc + term
            scale = torch.sqrt(torch.exp(2.0 * log_scale) + missing_var)
            pyro.deterministic("loc", loc)
            pyro.deterministic("scale", scale)
            pyro.sample("obs", gaussian_likelihood(loc, scale, censor), obs=y)


def _check_args(k, on, similarity, shrinkage, min_support, weights) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if on not in ("drug", "cell"):
        raise ValueError(f"on must be 'drug' or 'cell', got {on!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not shrinkage >= 0:
        raise ValueError(f"shrinkage must be non-negative (0 turns it off), got {shrinkage}")
    if min_support < 1:
        raise ValueError(f"min_support must be at least 1, got {min_support}")
    if weights not in ("pair", "item"):
        raise ValueError(f"weights must be 'pair' or 'item', got {weights!r}")


def _dense(t, c, d, y, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense response table (duplicates averaged) and its mask, both (T, I, J)."""
    flat = (t * shape[1] + c) * shape[2] + d
    size = int(np.prod(shape))
    count = np.bincount(flat, minlength=size)
    total = np.bincount(flat, weights=y, minlength=size)
    Y = np.divide(total, count, out=np.zeros(size), where=count > 0)
    return torch.as_tensor(Y).reshape(shape), torch.as_tensor(count > 0).reshape(shape)


def _orient(A: torch.Tensor, on: str) -> torch.Tensor:
    """(T, I, J) table as (T, U, N), the neighbour entity last: (T, J, I) when on cells."""
    return A if on == "drug" else A.transpose(1, 2).contiguous()


def _centre(Y: torch.Tensor, M: torch.Tensor, on: str) -> torch.Tensor:
    """Standardised responses minus the task mean, zero where unmeasured, as (T, U, N)."""
    m = (Y * M).sum((1, 2)) / M.sum((1, 2)).clamp(min=1)
    return _orient((Y - m[:, None, None]) * M, on)


def _baseline_residuals(Y: torch.Tensor, M: torch.Tensor, on: str):
    """Ridge (ALS) baselines and the residual tables they give, oriented as (T, U, N).

    Returns ``resid`` (responses minus task mean and neighbour-entity baseline), ``loo`` (the
    row entity's baseline without the target column) and ``E`` (full baseline residuals),
    all zero where the table has no measurement except ``loo``.
    """
    Mf = M.double()
    n_cell, n_drug = Mf.sum(2), Mf.sum(1)  # (T, I), (T, J)
    m = (Y * Mf).sum((1, 2)) / Mf.sum((1, 2)).clamp(min=1)
    R = (Y - m[:, None, None]) * Mf
    b_cell = torch.zeros_like(n_cell)
    for _ in range(_BASELINE_SWEEPS):
        b_drug = (R - b_cell[:, :, None] * Mf).sum(1) / (n_drug + _BASELINE_REG["drug"])
        b_cell = (R - b_drug[:, None, :] * Mf).sum(2) / (n_cell + _BASELINE_REG["cell"])
    E = _orient(R - (b_cell[:, :, None] + b_drug[:, None, :]) * Mf, on)

    # Neighbour-entity baseline off the responses; the row entity's baseline is refitted
    # without the target column i: (sum of the row's residuals - resid_ui) / (n_u + reg - 1).
    if on == "drug":
        resid = _orient(R - b_drug[:, None, :] * Mf, on)
        n_row, reg = n_cell, _BASELINE_REG["cell"]
    else:
        resid = _orient(R - b_cell[:, :, None] * Mf, on)
        n_row, reg = n_drug, _BASELINE_REG["drug"]
    loo = (resid.sum(2, keepdim=True) - resid) / ((n_row + reg)[:, :, None] - _orient(Mf, on))
    return resid, loo, E


def _pair_sums(X: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return the sums behind the similarity of the N columns of (T, U, N) tables, each (N, N).

    ``num[i, j]`` sums x_i x_j, ``sq[i, j]`` sums x_i^2 over the rows that measured j, and
    ``common[i, j]`` counts the rows that measured both (``X`` is zero where unmeasured).
    """
    n_items = X.shape[-1]
    X, M = X.reshape(-1, n_items), M.reshape(-1, n_items)
    sq = (X * X).T @ M
    return X.T @ X, sq, sq.T, M.T @ M


def _shrunk(num, sq_i, sq_j, common, shrinkage: float, min_support: int) -> torch.Tensor:
    r"""Shrunk similarity from the pair sums, 0 below ``min_support`` common rows.

    :math:`\frac{n - 1}{n - 1 + \lambda} \sum x_i x_j / \sqrt{\sum x_i^2 \sum x_j^2}`, the
    sums running over the n rows where both columns are measured.
    """
    den = torch.sqrt((sq_i * sq_j).clamp(min=0.0))
    S = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)
    n = (common - 1).clamp(min=0.0)
    S = S * n / (n + shrinkage).clamp(min=1e-12)
    return torch.where(common >= min_support, S, 0.0)


def _missing_share(mask: torch.Tensor, neighbours: torch.Tensor, similarity: torch.Tensor):
    """Share of each pair's neighbour similarity that is unmeasured, (N, T, U), in [0, 1]."""
    T, U, N = mask.shape
    M = mask.float().reshape(T * U, N)
    measured = (M[:, neighbours] * similarity).sum(-1) / similarity.sum(-1).clamp(min=1e-12)
    return (1.0 - measured).clamp(0.0, 1.0).T.reshape(N, T, U)


def _neighbour_inputs(tables, neighbours, sums, valid, shrinkage, min_support, chunk=2**22):
    r"""Per-slot neighbour inputs, shape (N, T, U, k), float32 (the target entity first).

    Slot l of pair (u, i) holds :math:`s^{(-u)}_{ij} o_{uj} (r_{uj} - \hat b^{(-i)}_u) /
    \sum_l s^{(-u)}_{ij} o_{uj}` for the neighbour j = ``neighbours[i, l]``, where the
    similarity :math:`s^{(-u)}` leaves out row u's own contribution when (u, i) is a
    training pair, so no training row sees its own response through its inputs.
    """
    T, U, N = tables["mask"].shape
    k = neighbours.shape[1]
    X, M = (tables[n].reshape(-1, N).double() for n in ("similarity_input", "mask"))
    R, L = (tables[n].reshape(-1, N).double() for n in ("residuals", "loo_baseline"))
    num, sq_i, sq_j, common = (a.gather(1, neighbours) for a in sums)  # (N, k)
    out = torch.empty(T * U, N, k)
    step = max(1, chunk // (N * k))
    for start in range(0, T * U, step):
        rows = slice(start, start + step)
        x_i, m_i = X[rows, :, None], M[rows, :, None]  # (B, N, 1)
        x_j, m_j = X[rows][:, neighbours], M[rows][:, neighbours]  # (B, N, k)
        s = _shrunk(
            num - x_i * x_j,
            sq_i - x_i**2 * m_j,
            sq_j - x_j**2 * m_i,
            common - m_i * m_j,
            shrinkage,
            min_support,
        )
        w = s.clamp(min=0.0) * valid * m_j
        norm = w.sum(-1, keepdim=True)
        r = R[rows][:, neighbours] - L[rows, :, None]
        out[rows] = torch.where(norm > 0, w * r / norm.clamp(min=1e-300), 0.0).float()
    return out.reshape(T, U, N, k).permute(2, 0, 1, 3).contiguous()
