"""Seeded train/test splits: leave pairs, cells, drugs or (part of) a task out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from mtl4c_prob.data._dataset import DrugResponseData

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "kfold", "kfold_indices", "split", "split_indices"]

SPLITS = {
    "lpo": "leave pairs out: (task, cell, drug) pairs go to test",
    "lco": "leave cells out: every row of a held-out cell, in every task, goes to test",
    "ldo": "leave drugs out: every row of a held-out drug, in every task, goes to test",
    "task": "hold out part (test_fraction < 1) or all of the pairs of one task",
}


def _units(data: DrugResponseData, kind: str, task: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Group id per row, and the mask of rows eligible for the test side."""
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; choose one of {sorted(SPLITS)}")
    eligible = np.ones(data.n_obs, dtype=bool)
    if kind == "lco":
        return data.codes("cell"), eligible
    if kind == "ldo":
        return data.codes("drug"), eligible
    t, c, d = data.codes("task"), data.codes("cell"), data.codes("drug")
    units = (t * data.n_cells + c) * data.n_drugs + d
    if kind == "task":
        name = task if task is not None else data.tasks[-1]
        if name not in data.tasks:
            raise ValueError(f"task {name!r} is not among the tasks {list(data.tasks)}")
        eligible = t == data.tasks.get_loc(name)
    return units, eligible


def _permuted_groups(units: np.ndarray, eligible: np.ndarray, seed: int) -> np.ndarray:
    groups = np.unique(units[eligible])
    return np.random.default_rng(seed).permutation(groups)


def split_indices(
    data: DrugResponseData,
    kind: str = "lpo",
    test_fraction: float = 0.2,
    seed: int = 0,
    task: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of a seeded train/test split.

    Parameters
    ----------
    data : DrugResponseData
        The rows to split.
    kind : {"lpo", "lco", "ldo", "task"}, default="lpo"
        What is held out (see :data:`SPLITS`). Rows that repeat a (task, cell, drug) pair
        always land on the same side.
    test_fraction : float, default=0.2
        Share of the units (pairs, cells or drugs) held out. For ``kind="task"``, the share of
        that task's pairs; 1.0 holds out the whole task.
    seed : int, default=0
        Seed of the permutation; the same seed gives the same split.
    task : str, optional
        The task held out by ``kind="task"`` (default: the last task).

    Returns
    -------
    train, test : ndarray of int
        Sorted row positions.
    """
    if not 0.0 < test_fraction <= 1.0 or (test_fraction == 1.0 and kind != "task"):
        raise ValueError(
            f"test_fraction must be in (0, 1) (or 1.0 for kind='task'), got {test_fraction}"
        )
    units, eligible = _units(data, kind, task)
    groups = _permuted_groups(units, eligible, seed)
    n_test = int(round(test_fraction * len(groups)))
    if n_test == 0 or (n_test == len(groups) and kind != "task"):
        raise ValueError(
            f"a {kind} split with test_fraction={test_fraction} leaves an empty side "
            f"({len(groups)} units to split)"
        )
    test = np.isin(units, groups[:n_test]) & eligible
    logger.info(
        "%s split (seed %d): %d train rows, %d test rows", kind, seed, (~test).sum(), test.sum()
    )
    return np.flatnonzero(~test), np.flatnonzero(test)


def split(
    data: DrugResponseData,
    kind: str = "lpo",
    test_fraction: float = 0.2,
    seed: int = 0,
    task: str | None = None,
) -> tuple[DrugResponseData, DrugResponseData]:
    """Seeded train/test split of ``data``; see :func:`split_indices` for the arguments."""
    train, test = split_indices(data, kind, test_fraction, seed, task)
    return data.subset(train), data.subset(test)


def kfold_indices(
    data: DrugResponseData,
    kind: str = "lpo",
    k: int = 5,
    seed: int = 0,
    task: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row positions of the ``k`` folds of a seeded k-fold split of the given kind.

    Every eligible unit is in exactly one test fold; for ``kind="task"`` only the pairs of the
    chosen task rotate through the test folds.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    units, eligible = _units(data, kind, task)
    groups = _permuted_groups(units, eligible, seed)
    if len(groups) < k:
        raise ValueError(f"cannot make {k} folds from {len(groups)} {kind} units")
    for fold in np.array_split(groups, k):
        test = np.isin(units, fold) & eligible
        yield np.flatnonzero(~test), np.flatnonzero(test)


def kfold(
    data: DrugResponseData,
    kind: str = "lpo",
    k: int = 5,
    seed: int = 0,
    task: str | None = None,
) -> Iterator[tuple[DrugResponseData, DrugResponseData]]:
    """Yield the ``k`` (train, test) pairs of a seeded k-fold split; see :func:`kfold_indices`."""
    for train, test in kfold_indices(data, kind, k, seed, task):
        yield data.subset(train), data.subset(test)
