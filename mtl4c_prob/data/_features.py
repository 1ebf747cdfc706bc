"""Feature tables: standardisation and PCA fitted on training rows only."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mtl4c_prob.data._dataset import DrugResponseData
from mtl4c_prob.exceptions import DataError

logger = logging.getLogger(__name__)

__all__ = ["FeatureTransformer", "prepare_features"]


@dataclass
class FeatureTransformer:
    """Standardise the columns of a feature table, then optionally project on principal axes.

    Status: stable.

    Everything is estimated from the rows passed to :meth:`fit` (the training cells or
    drugs), so held-out entities never leak into the transform. Missing values are imputed
    with the training mean (0 after standardisation). Principal components are scaled to
    unit variance on the training rows, which keeps unit-scale priors on their weights
    sensible.

    Parameters
    ----------
    n_components : int, optional
        Number of principal components to keep; None keeps the standardised columns.
    """

    n_components: int | None = None
    columns_: list[str] = field(default_factory=list)
    mean_: np.ndarray | None = None
    std_: np.ndarray | None = None
    components_: np.ndarray | None = None
    pc_std_: np.ndarray | None = None

    def fit(self, table: pd.DataFrame) -> FeatureTransformer:
        """Estimate the transform from the rows of ``table`` (entities x features)."""
        if len(table) < 2:
            raise DataError(f"cannot fit a feature transform on {len(table)} row(s)")
        X = table.to_numpy(dtype=float)
        self.columns_ = [str(c) for c in table.columns]
        self.mean_ = np.nanmean(X, axis=0)
        self.mean_ = np.where(np.isfinite(self.mean_), self.mean_, 0.0)
        std = np.nanstd(X, axis=0)
        self.std_ = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
        if self.n_components is not None:
            k = int(self.n_components)
            if not 1 <= k <= min(X.shape):
                raise ValueError(
                    f"n_components must be between 1 and {min(X.shape)} (rows, columns of the "
                    f"training feature table), got {k}"
                )
            Z = self._standardise(X)
            _, s, Vt = np.linalg.svd(Z, full_matrices=False)
            self.components_ = Vt[:k].T
            self.pc_std_ = np.maximum(s[:k] / np.sqrt(max(1, len(Z) - 1)), 1e-8)
            explained = (s[:k] ** 2).sum() / max((s**2).sum(), 1e-12)
            logger.info("PCA: %d components explain %.1f%% of the variance", k, 100 * explained)
        return self

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.std_
        return np.where(np.isfinite(Z), Z, 0.0)

    def transform(self, table: pd.DataFrame) -> pd.DataFrame:
        """Apply the fitted transform to any rows with the training columns."""
        if self.mean_ is None:
            raise RuntimeError("FeatureTransformer.transform called before fit")
        missing = [c for c in self.columns_ if c not in table.columns.astype(str)]
        if missing:
            raise DataError(
                f"feature table lacks {len(missing)} fitted column(s), e.g. {missing[0]!r}"
            )
        table = table.copy()
        table.columns = table.columns.astype(str)
        Z = self._standardise(table[self.columns_].to_numpy(dtype=float))
        if self.components_ is None:
            return pd.DataFrame(Z, index=table.index, columns=self.columns_)
        P = Z @ self.components_ / self.pc_std_
        cols = [f"pc{i + 1}" for i in range(P.shape[1])]
        return pd.DataFrame(P, index=table.index, columns=cols)

    def fit_transform(self, table: pd.DataFrame) -> pd.DataFrame:
        """Fit on ``table`` and transform it."""
        return self.fit(table).transform(table)


def _fit_side(
    train: DrugResponseData, table: pd.DataFrame | None, col: str, n_components: int | None
) -> pd.DataFrame | None:
    if table is None:
        return None
    seen = pd.Index(train.frame[col].unique())
    rows = table.loc[table.index.intersection(seen)]
    if len(rows) == 0:
        raise DataError(f"no training {col} has a row in the {col} feature table")
    transformer = FeatureTransformer(n_components).fit(rows)
    logger.info("%s features fitted on %d training %ss", col, len(rows), col)
    return transformer.transform(table)


def prepare_features(
    train: DrugResponseData,
    test: DrugResponseData | None = None,
    cell_pca: int | None = None,
    drug_pca: int | None = None,
) -> tuple[DrugResponseData, DrugResponseData | None]:
    """Standardise (and PCA-project) the feature tables, fitted on the training rows only.

    Parameters
    ----------
    train : DrugResponseData
        Training split; its cells and drugs with feature rows fit the transforms.
    test : DrugResponseData, optional
        Held-out split; it gets the same transformed tables.
    cell_pca, drug_pca : int, optional
        Numbers of principal components; None keeps the standardised columns.

    Returns
    -------
    train, test : DrugResponseData
        Copies carrying the transformed tables (every row of the original tables is
        transformed, so cells without training rows keep their features for prediction).
    """
    cell = _fit_side(train, train.cell_features, "cell", cell_pca)
    drug = _fit_side(train, train.drug_features, "drug", drug_pca)
    new_train = train.with_features(cell, drug)
    new_test = None if test is None else test.with_features(cell, drug)
    return new_train, new_test
