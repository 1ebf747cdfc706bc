"""Latent-factor synthetic drug-response data with known ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtl4c_prob.data._dataset import DrugResponseData

__all__ = ["LatentFactorTruth", "make_latent_factor_data"]


@dataclass
class LatentFactorTruth:
    """What :func:`make_latent_factor_data` planted.

    Attributes
    ----------
    cell_factors : ndarray of shape (n_tasks, n_cells, rank)
        Task-specific cell factors; their correlation across tasks is ``task_correlation``.
    drug_factors : ndarray of shape (n_drugs, rank)
        Drug factors shared by all tasks.
    signal : ndarray of shape (n_tasks, n_cells, n_drugs)
        Noise-free response of every (task, cell, drug) triple, in the units of ``y``.
    task_correlation : ndarray of shape (n_tasks, n_tasks)
        Correlation of the interaction signal between tasks.
    noise : ndarray of shape (n_tasks,)
        Standard deviation of the Gaussian measurement noise per task.
    task_offset : ndarray of shape (n_tasks,)
        Mean response per task.
    """

    cell_factors: np.ndarray
    drug_factors: np.ndarray
    signal: np.ndarray
    task_correlation: np.ndarray
    noise: np.ndarray
    task_offset: np.ndarray


def _correlation(value: float | np.ndarray, n_tasks: int) -> np.ndarray:
    C = np.asarray(value, float)
    if C.ndim == 0:
        C = np.full((n_tasks, n_tasks), float(C))
        np.fill_diagonal(C, 1.0)
    if C.shape != (n_tasks, n_tasks) or not np.allclose(C, C.T) or not np.allclose(np.diag(C), 1):
        raise ValueError(
            f"task_correlation must be a scalar or a symmetric (n_tasks, n_tasks) correlation "
            f"matrix with unit diagonal; got shape {C.shape}"
        )
    if np.linalg.eigvalsh(C).min() < -1e-10:
        raise ValueError("task_correlation is not positive semi-definite")
    return C


def _per_task(value: float | Sequence[float], n_tasks: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, float), (n_tasks,)).copy()
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative, got {value}")
    return arr


def make_latent_factor_data(
    n_cells: int = 200,
    n_drugs: int = 40,
    n_tasks: int = 3,
    rank: int = 4,
    *,
    n_cell_features: int = 20,
    n_drug_features: int = 10,
    feature_strength: float = 0.7,
    task_correlation: float | np.ndarray = 0.8,
    noise: float | Sequence[float] = 0.3,
    missing: float | Sequence[float] = 0.3,
    bias_scale: float = 0.5,
    seed: int = 0,
) -> tuple[DrugResponseData, LatentFactorTruth]:
    r"""Draw drug-response data from a multitask latent-factor model with known truth.

    Generative process, with :math:`C = L L^T` the task correlation and :math:`s` the
    feature strength:

    .. math::

        G_k = \sqrt{s}\, X A_k / \sqrt{D} + \sqrt{1 - s}\, E_k, \quad k = 1..T \\
        U_t = \textstyle\sum_k L_{tk} G_k, \qquad V = \sqrt{s}\, Z B / \sqrt{D'} +
        \sqrt{1 - s}\, F \\
        y_{tcd} = m_t + b_c + b_d + U_{tc} \cdot V_d / \sqrt{R} + \sigma_t \varepsilon

    with standard normal feature tables ``X`` (cells) and ``Z`` (drugs), standard normal
    loadings and residuals, and biases :math:`b \sim N(0, \text{bias\_scale}^2)`. The
    interaction signals of tasks ``t`` and ``u`` then have correlation :math:`C_{tu}`.

    Parameters
    ----------
    n_cells, n_drugs, n_tasks, rank : int
        Sizes; every task shares the same cells and drugs.
    n_cell_features, n_drug_features : int
        Columns of the feature tables that drive the factors.
    feature_strength : float, default=0.7
        Share of the factor variance explained by the features (0 to 1).
    task_correlation : float or ndarray of shape (n_tasks, n_tasks), default=0.8
        Correlation of the interaction signal between tasks (a scalar means all pairs).
    noise : float or sequence of float, default=0.3
        Measurement noise sd, one value or one per task.
    missing : float or sequence of float, default=0.3
        Share of the (cell, drug) pairs of each task left unobserved.
    bias_scale : float, default=0.5
        Standard deviation of the cell and drug biases.
    seed : int, default=0
        Seed of the random generator.

    Returns
    -------
    data : DrugResponseData
        Observed rows (tasks named "task0", ...; cells "cell000", ...; drugs "drug00", ...)
        with both feature tables attached.
    truth : LatentFactorTruth
    """
    if min(n_cells, n_drugs, n_tasks, rank) < 1:
        raise ValueError("n_cells, n_drugs, n_tasks and rank must all be at least 1")
    if not 0.0 <= feature_strength <= 1.0:
        raise ValueError(f"feature_strength must be in [0, 1], got {feature_strength}")
    C = _correlation(task_correlation, n_tasks)
    sigma = _per_task(noise, n_tasks, "noise")
    miss = _per_task(missing, n_tasks, "missing")
    if (miss >= 1).any():
        raise ValueError(f"missing must be below 1 for every task, got {missing}")
    rng = np.random.default_rng(seed)
    s = feature_strength

    # Features and factors: (n_cells, D), (n_drugs, D'), (n_tasks, n_cells, rank).
    X = rng.standard_normal((n_cells, n_cell_features))
    Z = rng.standard_normal((n_drugs, n_drug_features))
    G = np.stack(
        [
            np.sqrt(s) * X @ rng.standard_normal((n_cell_features, rank)) / np.sqrt(n_cell_features)
            + np.sqrt(1 - s) * rng.standard_normal((n_cells, rank))
            for _ in range(n_tasks)
        ]
    )
    L = np.linalg.cholesky(C + 1e-12 * np.eye(n_tasks))
    U = np.einsum("tk,kcr->tcr", L, G)
    V = np.sqrt(s) * Z @ rng.standard_normal((n_drug_features, rank)) / np.sqrt(
        n_drug_features
    ) + np.sqrt(1 - s) * rng.standard_normal((n_drugs, rank))

    # Noise-free signal (n_tasks, n_cells, n_drugs).
    offset = rng.normal(0.0, 1.0, n_tasks)
    cell_bias = rng.normal(0.0, bias_scale, n_cells)
    drug_bias = rng.normal(0.0, bias_scale, n_drugs)
    signal = (
        offset[:, None, None]
        + cell_bias[None, :, None]
        + drug_bias[None, None, :]
        + np.einsum("tcr,dr->tcd", U, V) / np.sqrt(rank)
    )

    # Observed triples with measurement noise.
    observed = rng.random(signal.shape) >= miss[:, None, None]
    t, c, d = np.nonzero(observed)
    y = signal[t, c, d] + sigma[t] * rng.standard_normal(len(t))
    tasks = [f"task{i}" for i in range(n_tasks)]
    cells = [f"cell{i:03d}" for i in range(n_cells)]
    drugs = [f"drug{i:02d}" for i in range(n_drugs)]
    frame = pd.DataFrame(
        {
            "task": np.asarray(tasks)[t],
            "cell": np.asarray(cells)[c],
            "drug": np.asarray(drugs)[d],
            "y": y,
        }
    )
    cell_table = pd.DataFrame(X, index=cells, columns=[f"cf{i}" for i in range(n_cell_features)])
    drug_table = pd.DataFrame(Z, index=drugs, columns=[f"df{i}" for i in range(n_drug_features)])
    data = DrugResponseData(frame, cell_table, drug_table, tasks=tasks, cells=cells, drugs=drugs)
    truth = LatentFactorTruth(U, V, signal, C, sigma, offset)
    return data, truth
