"""The `DrugResponseData` container: one long table of measurements plus feature tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from mtl4c_prob.exceptions import DataError

logger = logging.getLogger(__name__)

__all__ = ["DrugResponseData", "TaskScaler", "TensorData"]

_COLUMNS = ("task", "cell", "drug", "y")


@dataclass(frozen=True)
class TaskScaler:
    """Per-task standardisation ``z = (y - mean[t]) / std[t]`` and its inverse.

    Status: stable.

    Parameters
    ----------
    mean : ndarray of shape (n_tasks,)
        Per-task mean of the responses it was fitted on.
    std : ndarray of shape (n_tasks,)
        Per-task standard deviation (1.0 for a task with fewer than two rows).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, task: np.ndarray, y: np.ndarray, n_tasks: int) -> TaskScaler:
        """Fit the per-task mean and standard deviation of ``y`` grouped by ``task`` codes."""
        count = np.bincount(task, minlength=n_tasks).astype(float)
        total = np.bincount(task, weights=y, minlength=n_tasks)
        mean = np.divide(total, count, out=np.zeros(n_tasks), where=count > 0)
        sq = np.bincount(task, weights=(y - mean[task]) ** 2, minlength=n_tasks)
        var = np.divide(sq, count - 1, out=np.ones(n_tasks), where=count > 1)
        std = np.sqrt(np.where(var > 1e-12, var, 1.0))
        return cls(mean=mean, std=std)

    @classmethod
    def identity(cls, n_tasks: int) -> TaskScaler:
        """Scaler that leaves responses unchanged."""
        return cls(mean=np.zeros(n_tasks), std=np.ones(n_tasks))

    def transform(self, y: np.ndarray, task: np.ndarray) -> np.ndarray:
        """Standardise responses ``y`` of the rows with task codes ``task``."""
        return (np.asarray(y, float) - self.mean[task]) / self.std[task]

    def inverse(self, z: np.ndarray, task: np.ndarray) -> np.ndarray:
        """Map standardised values back to the units of the input."""
        return np.asarray(z, float) * self.std[task] + self.mean[task]

    def inverse_scale(self, sd: np.ndarray, task: np.ndarray) -> np.ndarray:
        """Map standardised spreads (sd, interval widths) back to input units."""
        return np.asarray(sd, float) * self.std[task]

    def to_dict(self) -> dict:
        """JSON-ready representation."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TaskScaler:
        """Inverse of :meth:`to_dict`."""
        return cls(mean=np.asarray(d["mean"], float), std=np.asarray(d["std"], float))


@dataclass
class TensorData:
    """Tensors a model consumes, all on one device.

    Status: stable.

    Attributes
    ----------
    task, cell, drug : LongTensor of shape (n_obs,)
        Integer codes.
    y : Tensor of shape (n_obs,) or None
        Standardised responses; None at prediction time.
    censor : Tensor of shape (n_obs,) or None
        0 measured, +1 "at least y", -1 "at most y"; None when nothing is censored.
    cell_x : Tensor of shape (n_cells, n_cell_features) or None
        Cell features by cell code.
    drug_x : Tensor of shape (n_drugs, n_drug_features) or None
        Drug features by drug code.
    n_tasks, n_cells, n_drugs : int
        Sizes of the code spaces.
    """

    task: torch.Tensor
    cell: torch.Tensor
    drug: torch.Tensor
    y: torch.Tensor | None
    censor: torch.Tensor | None
    cell_x: torch.Tensor | None
    drug_x: torch.Tensor | None
    n_tasks: int
    n_cells: int
    n_drugs: int
    extra: dict = field(default_factory=dict)

    @property
    def n_obs(self) -> int:
        """Number of rows."""
        return int(self.task.shape[0])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.task.device

    def take(self, index: torch.Tensor) -> TensorData:
        """Rows ``index`` of the per-observation tensors; entity tables are shared."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return TensorData(
            task=self.task[index],
            cell=self.cell[index],
            drug=self.drug[index],
            y=pick(self.y),
            censor=pick(self.censor),
            cell_x=self.cell_x,
            drug_x=self.drug_x,
            n_tasks=self.n_tasks,
            n_cells=self.n_cells,
            n_drugs=self.n_drugs,
            extra=self.extra,
        )


class DrugResponseData:
    """Drug-response measurements of one or several tasks, with shared cell and drug codes.

    Status: stable.

    Parameters
    ----------
    frame : DataFrame
        Long table with columns ``task``, ``cell``, ``drug``, ``y`` and optionally ``censor``
        (0 measured, +1 "at least y", -1 "at most y"). Extra columns are kept.
    cell_features : DataFrame, optional
        Cell x feature table indexed by cell name (the names used in ``frame``).
    drug_features : DataFrame, optional
        Drug x feature table indexed by drug name.
    tasks, cells, drugs : sequence of str, optional
        Code spaces to use. By default they are the sorted distinct names of ``frame`` (tasks
        in order of first appearance). Subsets made with :meth:`subset` keep the parent's code
        spaces, so codes stay comparable between a training and a test split.

    Raises
    ------
    DataError
        When a column is missing, a response is not numeric or not finite, a censor value is
        not in {-1, 0, 1}, or a name in ``frame`` is outside the given code spaces.

    Notes
    -----
    Every cell and every drug gets one integer code across all tasks: that shared identity is
    what lets multitask models pool information. Feature rows are aligned to the codes by
    name; cells or drugs without a feature row get NaN rows in :attr:`cell_feature_matrix`,
    which :func:`mtl4c_prob.data.FeatureTransformer` imputes.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        cell_features: pd.DataFrame | None = None,
        drug_features: pd.DataFrame | None = None,
        *,
        tasks: list[str] | None = None,
        cells: list[str] | None = None,
        drugs: list[str] | None = None,
    ) -> None:
        missing = [c for c in _COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(
                f"response table lacks column(s) {missing}; it has {list(frame.columns)}"
            )
        frame = frame.reset_index(drop=True).copy()
        for col in ("task", "cell", "drug"):
            frame[col] = frame[col].astype(str)
        frame["y"] = _numeric(frame["y"], "y")
        if "censor" in frame.columns:
            frame["censor"] = _censor(frame["censor"])
        self.tasks = pd.Index(tasks if tasks is not None else pd.unique(frame["task"]), dtype=str)
        self.cells = pd.Index(cells if cells is not None else sorted(frame["cell"].unique()))
        self.drugs = pd.Index(drugs if drugs is not None else sorted(frame["drug"].unique()))
        self.cells = self.cells.astype(str)
        self.drugs = self.drugs.astype(str)
        for col, index in (("task", self.tasks), ("cell", self.cells), ("drug", self.drugs)):
            codes = index.get_indexer(frame[col])
            if (codes < 0).any():
                bad = frame.loc[codes < 0, col].iloc[0]
                raise DataError(f"{col} {bad!r} is not in the given {col} code space")
            frame[f"{col}_code"] = codes.astype(np.int64)
        self.frame = frame
        self.cell_features = _check_features(cell_features, "cell_features")
        self.drug_features = _check_features(drug_features, "drug_features")

    # ------------------------------------------------------------------ sizes
    @property
    def n_obs(self) -> int:
        """Number of measurements (rows)."""
        return len(self.frame)

    @property
    def n_tasks(self) -> int:
        """Number of tasks in the code space."""
        return len(self.tasks)

    @property
    def n_cells(self) -> int:
        """Number of cells in the code space."""
        return len(self.cells)

    @property
    def n_drugs(self) -> int:
        """Number of drugs in the code space."""
        return len(self.drugs)

    @property
    def has_censoring(self) -> bool:
        """Whether any row is censored."""
        return "censor" in self.frame.columns and bool((self.frame["censor"] != 0).any())

    def __len__(self) -> int:
        return self.n_obs

    def __repr__(self) -> str:
        return (
            f"DrugResponseData(n_obs={self.n_obs}, n_tasks={self.n_tasks}, "
            f"n_cells={self.n_cells}, n_drugs={self.n_drugs}, "
            f"cell_features={_shape(self.cell_features)}, "
            f"drug_features={_shape(self.drug_features)})"
        )

    def summary(self) -> dict:
        """Sizes, density and censored fraction, overall and per task, as plain numbers."""
        per_task = {}
        for name, rows in self.frame.groupby("task", sort=False):
            n_c, n_d = rows["cell"].nunique(), rows["drug"].nunique()
            per_task[str(name)] = {
                "observations": len(rows),
                "cells": n_c,
                "drugs": n_d,
                "density": len(rows) / max(1, n_c * n_d),
            }
        censored = float((self.frame["censor"] != 0).mean()) if self.has_censoring else 0.0
        return {
            "tasks": self.n_tasks,
            "cells": int(self.frame["cell"].nunique()),
            "drugs": int(self.frame["drug"].nunique()),
            "observations": self.n_obs,
            "censored_fraction": censored,
            "per_task": per_task,
        }

    # ------------------------------------------------------------- columns
    def codes(self, col: str) -> np.ndarray:
        """Integer codes of column ``col`` ("task", "cell" or "drug")."""
        return self.frame[f"{col}_code"].to_numpy()

    @property
    def y(self) -> np.ndarray:
        """Responses in the units of the input."""
        return self.frame["y"].to_numpy(dtype=float)

    @property
    def censor(self) -> np.ndarray:
        """Censoring indicator per row (zeros when nothing is censored)."""
        if "censor" not in self.frame.columns:
            return np.zeros(self.n_obs, dtype=np.int64)
        return self.frame["censor"].to_numpy(dtype=np.int64)

    @property
    def cell_feature_matrix(self) -> np.ndarray | None:
        """Cell features aligned to cell codes, shape (n_cells, n_features).

        Cells without a feature row get a NaN row.
        """
        return _align(self.cell_features, self.cells)

    @property
    def drug_feature_matrix(self) -> np.ndarray | None:
        """Drug features aligned to drug codes, shape (n_drugs, n_features)."""
        return _align(self.drug_features, self.drugs)

    # ------------------------------------------------------------- derived
    def subset(self, rows: np.ndarray) -> DrugResponseData:
        """Rows ``rows`` (boolean mask or integer positions), keeping code spaces and features."""
        rows = np.asarray(rows)
        part = self.frame.iloc[np.flatnonzero(rows) if rows.dtype == bool else rows]
        return self._like(part.drop(columns=["task_code", "cell_code", "drug_code"]))

    def _like(self, frame: pd.DataFrame) -> DrugResponseData:
        return DrugResponseData(
            frame,
            self.cell_features,
            self.drug_features,
            tasks=list(self.tasks),
            cells=list(self.cells),
            drugs=list(self.drugs),
        )

    def with_features(
        self,
        cell_features: pd.DataFrame | None = None,
        drug_features: pd.DataFrame | None = None,
    ) -> DrugResponseData:
        """Return a copy whose feature tables are replaced (None keeps the current table)."""
        out = self._like(self.frame.drop(columns=["task_code", "cell_code", "drug_code"]))
        if cell_features is not None:
            out.cell_features = _check_features(cell_features, "cell_features")
        if drug_features is not None:
            out.drug_features = _check_features(drug_features, "drug_features")
        return out

    def task_scaler(self) -> TaskScaler:
        """Per-task standardisation fitted on these rows (use the training split)."""
        return TaskScaler.fit(self.codes("task"), self.y, self.n_tasks)

    def matrix(self, task: str | int | None = None) -> pd.DataFrame:
        """Cell x drug matrix of responses for one task (NaN where not measured).

        Parameters
        ----------
        task : str or int, optional
            Task name or code; may be omitted when there is a single task.
        """
        if task is None:
            if self.n_tasks != 1:
                raise ValueError(f"task must be given: the data has {self.n_tasks} tasks")
            task = 0
        code = task if isinstance(task, (int, np.integer)) else self.tasks.get_loc(str(task))
        rows = self.frame[self.frame["task_code"] == code]
        mat = np.full((self.n_cells, self.n_drugs), np.nan)
        # Duplicated pairs (kept with duplicates="keep") are averaged in the matrix view.
        sums = np.zeros_like(mat)
        counts = np.zeros_like(mat)
        np.add.at(sums, (rows["cell_code"], rows["drug_code"]), rows["y"].to_numpy(float))
        np.add.at(counts, (rows["cell_code"], rows["drug_code"]), 1.0)
        np.divide(sums, counts, out=mat, where=counts > 0)
        return pd.DataFrame(mat, index=self.cells, columns=self.drugs)

    def to_tensors(
        self,
        device: str | torch.device = "cpu",
        scaler: TaskScaler | None = None,
        cell_x: np.ndarray | None = None,
        drug_x: np.ndarray | None = None,
        with_y: bool = True,
    ) -> TensorData:
        """Tensors for a model on ``device``, responses standardised by ``scaler``."""
        task = self.codes("task")
        y = None
        if with_y:
            y_np = self.y if scaler is None else scaler.transform(self.y, task)
            y = torch.tensor(y_np, dtype=torch.float32, device=device)
        censor = None
        if self.has_censoring:
            censor = torch.tensor(self.censor, dtype=torch.float32, device=device)
        # torch.tensor copies: the code arrays are read-only views of the frame (pandas
        # copy-on-write), and an in-place op on a shared tensor would rewrite the codes.
        return TensorData(
            task=torch.tensor(task, device=device),
            cell=torch.tensor(self.codes("cell"), device=device),
            drug=torch.tensor(self.codes("drug"), device=device),
            y=y,
            censor=censor,
            cell_x=_tensor(cell_x, device),
            drug_x=_tensor(drug_x, device),
            n_tasks=self.n_tasks,
            n_cells=self.n_cells,
            n_drugs=self.n_drugs,
        )


def _numeric(col: pd.Series, name: str) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna() & col.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"column {name!r} holds a non-numeric value {_item(col, row)!r} (row {row})"
        )
    arr = values.to_numpy(dtype=float)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DataError(
            f"column {name!r} holds a missing or non-finite value {_item(col, row)!r} (row {row}); "
            "drop those rows or impute them before loading"
        )
    return pd.Series(arr, index=col.index)


def _item(col: pd.Series, row: int) -> object:
    """Value at position ``row`` as a plain scalar, so messages read ``inf``, not ``np.float64``."""
    value = col.iloc[row]
    return value.item() if isinstance(value, np.generic) else value


def _censor(col: pd.Series) -> pd.Series:
    values = _numeric(col, "censor")
    bad = ~values.isin([-1.0, 0.0, 1.0])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"column 'censor' must hold 0, +1 or -1, found {_item(col, row)!r} (row {row})"
        )
    return values.astype(np.int64)


def _check_features(table: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    if table is None:
        return None
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame indexed by name, got {type(table)}")
    table = table.copy()
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()][0]
        raise DataError(f"{name} has duplicated row name {dup!r}")
    try:
        values = table.to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} holds non-numeric columns: {exc}") from None
    if np.isinf(values).any():
        raise DataError(f"{name} holds infinite values")
    return table.astype(float)


def _align(table: pd.DataFrame | None, names: pd.Index) -> np.ndarray | None:
    if table is None:
        return None
    return table.reindex(names).to_numpy(dtype=float)


def _tensor(x: np.ndarray | None, device: str | torch.device) -> torch.Tensor | None:
    return None if x is None else torch.tensor(x, dtype=torch.float32, device=device)


def _shape(table: pd.DataFrame | None) -> tuple[int, int] | None:
    return None if table is None else table.shape
