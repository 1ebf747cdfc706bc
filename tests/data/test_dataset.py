"""Tests of DrugResponseData, TaskScaler and TensorData."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mtl4c_prob.data import DrugResponseData, TaskScaler, TensorData
from mtl4c_prob.exceptions import DataError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def tiny_frame(**extra) -> pd.DataFrame:
    # task a: c1-d1, c2-d1, c1-d2; task b: c2-d2, c3-d1
    return pd.DataFrame(
        {
            "task": ["a", "a", "a", "b", "b"],
            "cell": ["c1", "c2", "c1", "c2", "c3"],
            "drug": ["d1", "d1", "d2", "d2", "d1"],
            "y": [1.0, 2.0, 3.0, 4.0, 5.0],
            **extra,
        }
    )


def random_data(seed: int = 0, n_cells: int = 30, n_drugs: int = 8) -> DrugResponseData:
    rng = np.random.default_rng(seed)
    rows = []
    for task, (loc, scale) in {"gdsc1": (2.0, 3.0), "gdsc2": (-1.0, 0.5)}.items():
        for c in range(n_cells):
            for d in range(n_drugs):
                if rng.random() < 0.7:
                    rows.append((task, f"cell{c:02d}", f"drug{d}", rng.normal(loc, scale)))
    return DrugResponseData(pd.DataFrame(rows, columns=["task", "cell", "drug", "y"]))


# ---------------------------------------------------------------- code spaces


def test_codes_are_shared_across_tasks():
    data = DrugResponseData(tiny_frame())

    assert list(data.tasks) == ["a", "b"]
    assert list(data.cells) == ["c1", "c2", "c3"]
    assert list(data.drugs) == ["d1", "d2"]
    assert (data.n_obs, data.n_tasks, data.n_cells, data.n_drugs) == (5, 2, 3, 2)
    np.testing.assert_array_equal(data.codes("task"), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(data.codes("cell"), [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(data.codes("drug"), [0, 0, 1, 1, 0])
    # c2 measured in both tasks carries one code
    c2 = data.frame.loc[data.frame["cell"] == "c2", "cell_code"]
    assert set(c2) == {1} and set(data.frame.loc[c2.index, "task"]) == {"a", "b"}


def test_given_code_spaces_are_used_and_enforced():
    data = DrugResponseData(
        tiny_frame(), tasks=["b", "a"], cells=["c3", "c2", "c1", "c0"], drugs=["d2", "d1"]
    )
    np.testing.assert_array_equal(data.codes("task"), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(data.codes("cell"), [2, 1, 2, 1, 0])
    assert data.n_cells == 4

    with pytest.raises(DataError, match=r"cell 'c3' is not in the given cell code space"):
        DrugResponseData(tiny_frame(), cells=["c1", "c2"])


def test_subset_keeps_code_spaces_and_features():
    features = pd.DataFrame({"f": [1.0, 2.0, 3.0]}, index=["c1", "c2", "c3"])
    data = DrugResponseData(tiny_frame(), cell_features=features)
    mask = data.frame["task"].eq("b").to_numpy()

    by_mask = data.subset(mask)
    by_position = data.subset(np.array([3, 4]))

    for part in (by_mask, by_position):
        assert part.n_obs == 2
        assert list(part.tasks) == ["a", "b"] and list(part.cells) == ["c1", "c2", "c3"]
        np.testing.assert_array_equal(part.codes("cell"), data.codes("cell")[3:])
        np.testing.assert_array_equal(part.codes("task"), [1, 1])
        np.testing.assert_array_equal(part.y, [4.0, 5.0])
        pd.testing.assert_frame_equal(part.cell_features, data.cell_features)
    assert "task_code" in by_mask.frame.columns


def test_extra_columns_are_kept():
    data = DrugResponseData(tiny_frame(source=list("vwxyz")))
    assert list(data.subset(np.array([1, 2])).frame["source"]) == ["w", "x"]


# ---------------------------------------------------------------- matrix view


def test_matrix_has_nan_where_unmeasured():
    data = DrugResponseData(tiny_frame())

    mat = data.matrix("a")

    assert list(mat.index) == ["c1", "c2", "c3"] and list(mat.columns) == ["d1", "d2"]
    expected = np.array([[1.0, 3.0], [2.0, np.nan], [np.nan, np.nan]])
    np.testing.assert_array_equal(mat.to_numpy(), expected)
    pd.testing.assert_frame_equal(data.matrix(1), data.matrix("b"))
    assert data.matrix("b").loc["c3", "d1"] == 5.0
    assert int(data.matrix("b").notna().to_numpy().sum()) == 2


def test_matrix_averages_kept_duplicates():
    frame = pd.DataFrame(
        {"task": "t", "cell": ["c1", "c1", "c1", "c2"], "drug": "d", "y": [1.0, 4.0, 7.0, 2.0]}
    )
    data = DrugResponseData(frame)

    assert data.n_obs == 4
    np.testing.assert_allclose(data.matrix()["d"].to_numpy(), [4.0, 2.0])


def test_matrix_needs_a_task_when_several():
    with pytest.raises(ValueError, match="task must be given: the data has 2 tasks"):
        DrugResponseData(tiny_frame()).matrix()


# ---------------------------------------------------------------- scaling


def test_task_scaler_standardises_training_rows_and_round_trips():
    data = random_data(seed=1)
    train = data.subset(np.arange(data.n_obs) % 3 != 0)
    task = data.codes("task")

    scaler = train.task_scaler()
    z_train = scaler.transform(train.y, train.codes("task"))

    for t in range(data.n_tasks):
        rows = train.codes("task") == t
        assert abs(z_train[rows].mean()) < 1e-12
        assert z_train[rows].std(ddof=1) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(scaler.mean, [2.0, -1.0], atol=0.5)
    np.testing.assert_allclose(scaler.std, [3.0, 0.5], rtol=0.15)

    # All rows, held-out ones included, come back in input units.
    z = scaler.transform(data.y, task)
    np.testing.assert_allclose(scaler.inverse(z, task), data.y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scaler.inverse_scale(np.ones(data.n_obs), task), scaler.std[task])


def test_task_scaler_edge_cases_and_serialisation():
    # task 1 has one row, task 2 none: both keep std 1.
    scaler = TaskScaler.fit(np.array([0, 0, 0, 1]), np.array([1.0, 2.0, 3.0, 9.0]), n_tasks=3)
    np.testing.assert_allclose(scaler.mean, [2.0, 9.0, 0.0])
    np.testing.assert_allclose(scaler.std, [1.0, 1.0, 1.0])

    constant = TaskScaler.fit(np.zeros(3, dtype=int), np.full(3, 5.0), n_tasks=1)
    assert constant.std[0] == 1.0 and constant.mean[0] == 5.0

    restored = TaskScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    np.testing.assert_array_equal(restored.mean, scaler.mean)
    np.testing.assert_array_equal(restored.std, scaler.std)

    identity = TaskScaler.identity(2)
    np.testing.assert_array_equal(identity.transform([1.5, -2.0], np.array([0, 1])), [1.5, -2.0])


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("device", DEVICES)
def test_to_tensors_dtypes_devices_shapes(device):
    data = random_data(seed=2)
    scaler = data.task_scaler()
    cell_x = np.random.default_rng(0).standard_normal((data.n_cells, 5))

    td = data.to_tensors(device=device, scaler=scaler, cell_x=cell_x)

    assert isinstance(td, TensorData)
    assert td.device.type == device and td.y.device.type == device
    for codes in (td.task, td.cell, td.drug):
        assert codes.dtype == torch.int64 and codes.shape == (data.n_obs,)
    assert td.y.dtype == torch.float32 and td.y.shape == (data.n_obs,)
    assert td.cell_x.dtype == torch.float32 and td.cell_x.shape == (data.n_cells, 5)
    assert td.censor is None and td.drug_x is None
    assert (td.n_obs, td.n_tasks, td.n_cells, td.n_drugs) == (
        data.n_obs,
        data.n_tasks,
        data.n_cells,
        data.n_drugs,
    )
    expected = scaler.transform(data.y, data.codes("task"))
    np.testing.assert_allclose(td.y.cpu().numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(td.cell.cpu().numpy(), data.codes("cell"))

    part = td.take(torch.arange(4, device=device))
    assert part.n_obs == 4 and part.cell_x is td.cell_x and part.n_cells == data.n_cells


def test_to_tensors_without_y_and_with_censoring():
    data = DrugResponseData(tiny_frame(censor=[0, 1, -1, 0, 0]))

    td = data.to_tensors(with_y=False)
    raw = data.to_tensors()

    assert td.y is None
    assert td.censor.dtype == torch.float32
    np.testing.assert_array_equal(td.censor.numpy(), [0, 1, -1, 0, 0])
    np.testing.assert_array_equal(raw.y.numpy(), data.y.astype(np.float32))
    assert DrugResponseData(tiny_frame(censor=[0] * 5)).to_tensors().censor is None


@pytest.mark.filterwarnings("error::UserWarning")
def test_tensors_do_not_alias_the_frame():
    # pandas copy-on-write hands out read-only views; in-place ops on the tensors must not
    # reach back into the data's codes or responses.
    data = DrugResponseData(tiny_frame(censor=[0, 1, 0, 0, 0]))
    cell_x = np.ones((3, 2))

    td = data.to_tensors(cell_x=cell_x)
    td.cell.add_(7)
    td.task.zero_()
    td.y.mul_(0)
    td.censor.zero_()
    td.cell_x.zero_()

    np.testing.assert_array_equal(data.codes("cell"), [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(data.codes("task"), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(data.y, [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(data.censor, [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(cell_x, 1.0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"y": [1.0, "abc", 3.0, 4.0, 5.0]},
            r"column 'y' holds a non-numeric value 'abc' \(row 1\)",
        ),
        ({"y": [1.0, 2.0, np.inf, 4.0, 5.0]}, r"column 'y' .* non-finite value inf \(row 2\)"),
        ({"y": [1.0, 2.0, 3.0, np.nan, 5.0]}, r"column 'y' .* missing .* value nan \(row 3\)"),
        (
            {"censor": [0, 1, -1, 2, 0]},
            r"column 'censor' must hold 0, \+1 or -1, found 2 \(row 3\)",
        ),
        ({"censor": [0, 0.5, 0, 0, 0]}, r"found 0.5 \(row 1\)"),
    ],
    ids=["non-numeric-y", "inf-y", "nan-y", "censor-2", "censor-half"],
)
def test_bad_values_raise_naming_column_and_row(change, message):
    with pytest.raises(DataError, match=message):
        DrugResponseData(tiny_frame().assign(**change))


def test_missing_column_raises_naming_it():
    with pytest.raises(DataError, match=r"lacks column\(s\) \['y'\]"):
        DrugResponseData(tiny_frame().drop(columns="y"))


def test_numeric_strings_are_accepted():
    data = DrugResponseData(tiny_frame().assign(y=["1", "2.5", "-3", "4e-1", "5"]))
    np.testing.assert_allclose(data.y, [1.0, 2.5, -3.0, 0.4, 5.0])


@pytest.mark.parametrize(
    ("table", "error", "message"),
    [
        (
            pd.DataFrame({"f": [1.0, 2.0]}, index=["c1", "c1"]),
            DataError,
            "duplicated row name 'c1'",
        ),
        (pd.DataFrame({"f": ["x", "y"]}, index=["c1", "c2"]), DataError, "non-numeric"),
        (pd.DataFrame({"f": [1.0, np.inf]}, index=["c1", "c2"]), DataError, "infinite"),
        (np.ones((3, 2)), TypeError, "must be a pandas DataFrame"),
    ],
    ids=["duplicated", "non-numeric", "inf", "array"],
)
def test_bad_feature_tables_raise(table, error, message):
    with pytest.raises(error, match=message):
        DrugResponseData(tiny_frame(), cell_features=table)


def test_feature_matrix_is_aligned_to_codes():
    cell_features = pd.DataFrame({"f": [3.0, 1.0], "g": [30.0, 10.0]}, index=["c3", "c1"])
    data = DrugResponseData(tiny_frame(), cell_features=cell_features)

    mat = data.cell_feature_matrix

    np.testing.assert_array_equal(mat[0], [1.0, 10.0])
    assert np.isnan(mat[1]).all()
    np.testing.assert_array_equal(mat[2], [3.0, 30.0])
    assert data.drug_feature_matrix is None

    replaced = data.with_features(drug_features=pd.DataFrame({"h": [1.0, 2.0]}, index=["d2", "d1"]))
    np.testing.assert_array_equal(replaced.drug_feature_matrix[:, 0], [2.0, 1.0])
    pd.testing.assert_frame_equal(replaced.cell_features, data.cell_features)


# ---------------------------------------------------------------- summary


def test_summary_numbers():
    data = DrugResponseData(tiny_frame(censor=[0, 1, 0, 0, -1]), tasks=["a", "b", "c"])

    summary = data.summary()

    assert summary["tasks"] == 3
    assert summary["cells"] == 3 and summary["drugs"] == 2
    assert summary["observations"] == 5
    assert summary["censored_fraction"] == pytest.approx(0.4)
    assert summary["per_task"]["a"] == {"observations": 3, "cells": 2, "drugs": 2, "density": 0.75}
    assert summary["per_task"]["b"] == {"observations": 2, "cells": 2, "drugs": 2, "density": 0.5}
    assert "c" not in summary["per_task"]
    assert json.loads(json.dumps(summary)) == summary
    assert len(data) == 5 and data.has_censoring
    assert "n_obs=5" in repr(data) and "n_tasks=3" in repr(data)


def test_summary_without_censor_column():
    summary = DrugResponseData(tiny_frame()).summary()
    assert summary["censored_fraction"] == 0.0
