"""Tests of the seeded train/test and k-fold splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import SPLITS, DrugResponseData, kfold, kfold_indices, split, split_indices

KINDS = ["lpo", "lco", "ldo", "task"]


@pytest.fixture(scope="module")
def data() -> DrugResponseData:
    """Three tasks over 40 cells x 12 drugs, ~60 % observed, some pairs measured twice."""
    rng = np.random.default_rng(0)
    rows = []
    for task in ("gdsc1", "gdsc2", "ccle"):
        for c in range(40):
            for d in range(12):
                if rng.random() < 0.6:
                    repeats = 2 if rng.random() < 0.1 else 1
                    for _ in range(repeats):
                        rows.append((task, f"cell{c:02d}", f"drug{d:02d}", rng.normal()))
    frame = pd.DataFrame(rows, columns=["task", "cell", "drug", "y"])
    # shuffle so repeated rows are not adjacent
    frame = frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    return DrugResponseData(frame, tasks=["gdsc1", "gdsc2", "ccle"])


def unit_codes(data: DrugResponseData, kind: str) -> np.ndarray:
    if kind == "lco":
        return data.codes("cell")
    if kind == "ldo":
        return data.codes("drug")
    pairs = data.frame[["task_code", "cell_code", "drug_code"]].to_numpy()
    return np.unique(pairs, axis=0, return_inverse=True)[1].ravel()


def test_split_kinds_are_documented():
    assert sorted(SPLITS) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_split_is_a_partition_reproducible_and_seed_dependent(data, kind):
    train, test = split_indices(data, kind, test_fraction=0.25, seed=3)
    again = split_indices(data, kind, test_fraction=0.25, seed=3)
    other = split_indices(data, kind, test_fraction=0.25, seed=4)

    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(data.n_obs))
    assert np.intersect1d(train, test).size == 0
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(test, other[1])


@pytest.mark.parametrize("kind", ["lpo", "lco", "ldo"])
def test_no_unit_straddles_the_split(data, kind):
    units = unit_codes(data, kind)

    train, test = split_indices(data, kind, test_fraction=0.3, seed=0)

    assert np.intersect1d(units[train], units[test]).size == 0


def test_lpo_keeps_repeated_rows_of_a_pair_together(data):
    keys = ["task", "cell", "drug"]
    repeated = data.frame.duplicated(keys, keep=False).to_numpy()
    assert repeated.sum() > 20  # the fixture has repeated pairs to check

    for seed in range(5):
        _, test = split_indices(data, "lpo", test_fraction=0.5, seed=seed)
        side = pd.Series(np.isin(np.arange(data.n_obs), test))
        per_pair = side.groupby([data.frame[k] for k in keys]).nunique()
        assert per_pair.max() == 1


def test_lco_holds_out_cells_in_every_task(data):
    train, test = split(data, "lco", test_fraction=0.25, seed=2)

    test_cells = set(test.frame["cell"])
    assert test_cells.isdisjoint(train.frame["cell"])
    assert len(test_cells) == 10  # round(0.25 * 40)
    # every row of a held-out cell, whatever its task, is in test
    for cell in test_cells:
        assert (data.frame["cell"] == cell).sum() == (test.frame["cell"] == cell).sum()
    assert test.frame["task"].nunique() == 3
    # subsets keep the parent's code spaces
    assert train.n_cells == test.n_cells == data.n_cells


def test_ldo_holds_out_drugs_in_every_task(data):
    train, test = split(data, "ldo", test_fraction=0.25, seed=5)

    assert set(test.frame["drug"]).isdisjoint(train.frame["drug"])
    assert test.frame["drug"].nunique() == 3  # round(0.25 * 12)
    assert test.frame["task"].nunique() == 3


@pytest.mark.parametrize(("kind", "fraction"), [("lpo", 0.2), ("lco", 0.3), ("ldo", 0.5)])
def test_test_share_matches_test_fraction_of_units(data, kind, fraction):
    units = unit_codes(data, kind)
    n_units = np.unique(units).size

    _, test = split_indices(data, kind, test_fraction=fraction, seed=1)

    assert np.unique(units[test]).size == round(fraction * n_units)


def test_task_split_only_holds_out_rows_of_that_task(data):
    task_rows = data.frame["task"].eq("gdsc2").to_numpy()
    pairs = data.frame.loc[task_rows, ["cell", "drug"]].drop_duplicates()

    train, test = split_indices(data, "task", test_fraction=0.4, seed=0, task="gdsc2")

    assert task_rows[test].all()
    assert (~task_rows).sum() == (~task_rows[train]).sum()  # other tasks all in train
    held = data.frame.iloc[test][["cell", "drug"]].drop_duplicates()
    assert len(held) == round(0.4 * len(pairs))


def test_task_split_defaults_to_last_task_and_can_hold_out_all_of_it(data):
    train, test = split(data, "task", test_fraction=1.0, seed=0)

    assert set(test.frame["task"]) == {"ccle"}
    assert test.n_obs == int((data.frame["task"] == "ccle").sum())
    assert set(train.frame["task"]) == {"gdsc1", "gdsc2"}

    _, first = split_indices(data, "task", test_fraction=1.0, task="gdsc1")
    np.testing.assert_array_equal(first, np.flatnonzero(data.frame["task"] == "gdsc1"))


@pytest.mark.parametrize("kind", KINDS)
def test_kfold_puts_every_unit_in_exactly_one_test_fold(data, kind):
    units = unit_codes(data, kind)
    eligible = (
        data.frame["task"].eq("ccle").to_numpy() if kind == "task" else np.ones(data.n_obs, bool)
    )

    folds = list(kfold_indices(data, kind, k=4, seed=7))

    assert len(folds) == 4
    counts = np.zeros(data.n_obs, dtype=int)
    for train, test in folds:
        counts[test] += 1
        assert np.intersect1d(train, test).size == 0
        assert train.size + test.size == data.n_obs
        if kind != "task":
            assert np.intersect1d(units[train], units[test]).size == 0
    np.testing.assert_array_equal(counts, eligible.astype(int))
    # folds hold (nearly) equal numbers of units
    sizes = [np.unique(units[test]).size for _, test in folds]
    assert max(sizes) - min(sizes) <= 1

    again = list(kfold_indices(data, kind, k=4, seed=7))
    other = list(kfold_indices(data, kind, k=4, seed=8))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))


def test_kfold_yields_datasets(data):
    pairs = list(kfold(data, "lco", k=3, seed=0))

    assert len(pairs) == 3
    assert sum(test.n_obs for _, test in pairs) == data.n_obs
    for train, test in pairs:
        assert train.n_obs + test.n_obs == data.n_obs
        assert set(train.frame["cell"]).isdisjoint(test.frame["cell"])
        assert train.n_cells == data.n_cells


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"kind": "tissue"},
            r"unknown split 'tissue'; choose one of \['lco', 'ldo', 'lpo', 'task'\]",
        ),
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
        ({"test_fraction": 1.5}, r"test_fraction must be in \(0, 1\)"),
        ({"test_fraction": 1.0}, r"or 1.0 for kind='task'\), got 1.0"),
        (
            {"kind": "lco", "test_fraction": 0.01},
            r"lco split with test_fraction=0.01 leaves an empty",
        ),
        ({"kind": "ldo", "test_fraction": 0.99}, r"ldo split .* leaves an empty side \(12 units"),
        ({"kind": "task", "task": "nci60"}, r"task 'nci60' is not among the tasks"),
    ],
    ids=["kind", "zero", "above-one", "one-not-task", "empty-test", "empty-train", "task"],
)
def test_split_bad_arguments(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_indices(data, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1}, "k must be at least 2, got 1"),
        ({"kind": "ldo", "k": 13}, "cannot make 13 folds from 12 ldo units"),
        ({"kind": "pairs"}, "unknown split 'pairs'"),
        ({"kind": "task", "task": "nci60"}, "task 'nci60' is not among the tasks"),
    ],
)
def test_kfold_bad_arguments(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        list(kfold_indices(data, **kwargs))
