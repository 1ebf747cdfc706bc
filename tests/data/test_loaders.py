"""Tests of the GDSC, long-table and feature-table loaders and of cell-name harmonisation."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.data import (
    HarmonisationReport,
    harmonise_cells,
    harmonise_key,
    load_features,
    load_responses,
    read_gdsc,
    read_long,
    read_table,
)
from mtl4c_prob.exceptions import DataError, DataWarning

SHARED = Path("/work/shared/data")


def write(path: Path, frame: pd.DataFrame, index: bool = False) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=index)
    else:
        frame.to_csv(path, index=index, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def gdsc_frame(cells, drugs, ln_ic50, auc=None) -> pd.DataFrame:
    """A subset of the public GDSC fitted-dose-response release layout."""
    n = len(cells)
    frame = pd.DataFrame(
        {
            "DATASET": "GDSC2",
            "COSMIC_ID": np.arange(n) + 900000,
            "CELL_LINE_NAME": cells,
            "DRUG_ID": np.arange(n) + 1000,
            "DRUG_NAME": drugs,
            "MAX_CONC": 10.0,
            "LN_IC50": ln_ic50,
            "Z_SCORE": 0.1,
        }
    )
    if auc is not None:
        frame["AUC"] = auc
    return frame


# ---------------------------------------------------------------- GDSC layout


def test_read_gdsc_prefers_ln_ic50_and_ignores_release_columns(tmp_path):
    path = write(
        tmp_path / "GDSC2_fitted.csv",
        gdsc_frame([" A549 ", "MCF7"], ["Cisplatin", "Erlotinib"], [1.5, -2.0], [0.9, 0.4]),
    )

    out = read_gdsc(path)

    assert list(out.columns) == ["task", "cell", "drug", "y"]
    assert list(out["task"]) == ["GDSC2_fitted"] * 2
    assert list(out["cell"]) == ["A549", "MCF7"]  # surrounding blanks stripped
    assert list(out["drug"]) == ["Cisplatin", "Erlotinib"]
    np.testing.assert_array_equal(out["y"], [1.5, -2.0])

    auc = read_gdsc(path, response="AUC", task="screen")
    np.testing.assert_array_equal(auc["y"], [0.9, 0.4])
    assert set(auc["task"]) == {"screen"}


def test_read_gdsc_auto_falls_back_to_auc(tmp_path):
    frame = gdsc_frame(["A549"], ["Cisplatin"], [1.0], [0.7]).drop(columns="LN_IC50")
    out = read_gdsc(write(tmp_path / "auc.csv", frame))
    np.testing.assert_array_equal(out["y"], [0.7])


@pytest.mark.parametrize(
    ("drop", "response", "message"),
    [
        (["LN_IC50"], "auto", r"no response column; expected one of \['LN_IC50', 'AUC'\]"),
        ([], "AUC", r"response column 'AUC' not found"),
        (["DRUG_NAME"], "auto", r"GDSC layout needs column\(s\) \['DRUG_NAME'\]"),
    ],
    ids=["no-response", "asked-response-absent", "no-drug-column"],
)
def test_read_gdsc_column_errors(tmp_path, drop, response, message):
    frame = gdsc_frame(["A549"], ["Cisplatin"], [1.0]).drop(columns=drop)
    with pytest.raises(DataError, match=message):
        read_gdsc(write(tmp_path / "g.csv", frame), response=response)


# ---------------------------------------------------------------- long layout


def test_read_long_with_user_columns_task_column_and_censor(tmp_path):
    frame = pd.DataFrame(
        {
            "Primary Cell Line Name": ["A549", "MCF7", "A549"],
            "Compound": ["Erlotinib", "Erlotinib", "Nilotinib"],
            "IC50 (uM)": [2.0, 8.0, 0.5],
            "screen": ["ccle", "ccle", "ctrp"],
            "capped": [0, 1, 0],
        }
    )
    path = write(tmp_path / "ccle.parquet", frame)

    out = read_long(
        path,
        cell="Primary Cell Line Name",
        drug="Compound",
        y="IC50 (uM)",
        task_column="screen",
        censor="capped",
    )

    assert list(out.columns) == ["task", "cell", "drug", "y", "censor"]
    assert list(out["task"]) == ["ccle", "ccle", "ctrp"]
    np.testing.assert_array_equal(out["y"], [2.0, 8.0, 0.5])
    np.testing.assert_array_equal(out["censor"], [0, 1, 0])

    data, _ = load_responses(
        [path],
        format="long",
        long_columns={
            "cell": "Primary Cell Line Name",
            "drug": "Compound",
            "y": "IC50 (uM)",
            "task_column": "screen",
            "censor": "capped",
        },
    )
    assert list(data.tasks) == ["ccle", "ctrp"]
    assert data.has_censoring
    np.testing.assert_array_equal(data.censor, [0, 1, 0])


def test_read_long_missing_column_is_named(tmp_path):
    path = write(tmp_path / "t.csv", pd.DataFrame({"cell": ["A"], "drug": ["d"], "y": [1.0]}))
    with pytest.raises(DataError, match=r"column\(s\) \['IC50'\] not found"):
        read_long(path, y="IC50")


def test_read_table_reads_tsv(tmp_path):
    path = write(tmp_path / "t.tsv", pd.DataFrame({"cell": ["A"], "drug": ["d"], "y": [1.0]}))
    assert list(read_table(path).columns) == ["cell", "drug", "y"]


# ---------------------------------------------------------------- several files


def test_several_files_become_tasks_named_after_stem_or_given(tmp_path):
    g1 = write(tmp_path / "GDSC1_IC50.csv", gdsc_frame(["A549", "MCF7"], ["d1", "d2"], [1.0, 2.0]))
    g2 = write(tmp_path / "GDSC2_IC50.csv", gdsc_frame(["MCF7", "HeLa"], ["d2", "d3"], [3.0, 4.0]))
    long = write(
        tmp_path / "other.parquet",
        pd.DataFrame({"cell": ["HeLa"], "drug": ["d1"], "y": [5.0]}),
    )

    data, _ = load_responses([g1, g2, long])
    named, _ = load_responses([(g1, "first"), (g2, None), (long, "third")])

    assert list(data.tasks) == ["GDSC1_IC50", "GDSC2_IC50", "other"]
    assert list(named.tasks) == ["first", "GDSC2_IC50", "third"]
    assert list(data.cells) == ["A549", "HeLa", "MCF7"]
    # MCF7 has one code across the two GDSC tasks
    mcf7 = data.frame[data.frame["cell"] == "MCF7"]
    assert mcf7["task"].nunique() == 2 and mcf7["cell_code"].nunique() == 1
    np.testing.assert_array_equal(data.y, [1.0, 2.0, 3.0, 4.0, 5.0])


def test_responses_auto_detect_rejects_unknown_layout(tmp_path):
    path = write(tmp_path / "odd.csv", pd.DataFrame({"name": ["A"], "compound": ["d"], "v": [1]}))
    with pytest.raises(DataError, match="cannot tell the layout from the columns"):
        load_responses([path])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "csv"}, "format must be 'auto', 'gdsc' or 'long'"),
        ({"duplicates": "median"}, "duplicates must be one of"),
    ],
)
def test_load_responses_bad_arguments(tmp_path, kwargs, message):
    path = write(tmp_path / "t.csv", pd.DataFrame({"cell": ["A"], "drug": ["d"], "y": [1.0]}))
    with pytest.raises(ValueError, match=message):
        load_responses([path], **kwargs)
    with pytest.raises(ValueError, match="at least one response file"):
        load_responses([])


# ---------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        load_responses([tmp_path / "nope.csv"])


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_table(path)


def test_blank_lines_only_file(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="cannot read .*blank.csv"):
        read_table(path)


def test_header_only_file(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("CELL_LINE_NAME,DRUG_NAME,LN_IC50\n")
    with pytest.raises(DataError, match="file has no data rows"):
        load_responses([path])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("high", r"non-numeric or non-finite value 'high' at data row 3 \(1 such rows\)"),
        ("inf", r"non-numeric or non-finite value inf at data row 3"),
        ("", r"missing value nan at data row 3"),
    ],
    ids=["text", "inf", "blank"],
)
def test_bad_response_value_names_the_row(tmp_path, value, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"CELL_LINE_NAME,DRUG_NAME,LN_IC50\nA,d,1.0\nB,d,2.0\nC,d,{value}\n")
    with pytest.raises(DataError, match=r"bad.csv: response column 'LN_IC50' has a .*" + message):
        load_responses([path])


def test_bad_censor_value_in_file(tmp_path):
    frame = pd.DataFrame({"cell": ["A", "B"], "drug": "d", "y": [1.0, 2.0], "c": [0, 2]})
    path = write(tmp_path / "c.csv", frame)
    with pytest.raises(DataError, match=r"'censor' must hold 0, \+1 or -1, found 2 \(row 1\)"):
        load_responses([path], long_columns={"censor": "c"})


# ---------------------------------------------------------------- harmonisation


def test_harmonise_key():
    assert harmonise_key("NCI-H1650") == harmonise_key("NCIH1650") == "NCIH1650"
    assert harmonise_key("Hep 3B2.1-7") == "HEP3B217"
    assert harmonise_key("km-h2") == "KMH2"


def test_spellings_are_merged_across_files_and_features(tmp_path):
    g1 = write(tmp_path / "GDSC1.csv", gdsc_frame(["NCI-H1650", "A549"], ["d1", "d1"], [1.0, 2.0]))
    g2 = write(tmp_path / "GDSC2.csv", gdsc_frame(["NCIH1650", "MCF7"], ["d1", "d2"], [3.0, 4.0]))
    features = pd.DataFrame(
        {"cell_line": ["NCIH1650", "A549", "HELA"], "g1": [0.1, 0.2, 0.3], "g2": [1.0, 2.0, 3.0]}
    )
    feature_path = write(tmp_path / "expr.csv", features)

    data, report = load_responses([g1, g2], cell_features=feature_path)

    assert list(data.cells) == ["A549", "MCF7", "NCI-H1650"]
    assert report.renamed == {"NCIH1650": "NCI-H1650"}
    assert report.collisions == {}
    h1650 = data.frame[data.frame["cell"] == "NCI-H1650"]
    assert list(h1650["task"]) == ["GDSC1", "GDSC2"] and h1650["cell_code"].nunique() == 1
    # the feature row indexed "NCIH1650" now sits under the canonical name
    np.testing.assert_array_equal(data.cell_feature_matrix[2], [0.1, 1.0])
    np.testing.assert_array_equal(data.cell_feature_matrix[0], [0.2, 2.0])
    assert report.unmatched_features == ["MCF7"]
    assert report.unused_feature_rows == 1  # HELA: kept, but matches no response cell
    assert "HELA" in data.cell_features.index


def test_collision_in_one_file_is_kept_apart_and_warned(tmp_path):
    path = write(
        tmp_path / "GDSC2.csv",
        gdsc_frame(["KM-H2", "KMH-2", "A549"], ["d1", "d1", "d1"], [1.0, 2.0, 3.0]),
    )
    features = pd.DataFrame({"g": [1.0, 2.0]}, index=pd.Index(["KMH2", "A549"], name="cell"))

    with pytest.warns(DataWarning, match="kept apart: KM-H2 vs KMH-2"):
        data, report = load_responses([path], cell_features=features)

    assert report.collisions == {"KMH2": ["KM-H2", "KMH-2"]}
    assert report.renamed == {}
    assert data.n_cells == 3 and data.n_obs == 3
    assert set(data.cells) == {"KM-H2", "KMH-2", "A549"}
    # a collided key gets no feature row by key: neither line is given "KMH2"'s features
    assert report.unmatched_features == ["KM-H2", "KMH-2"]
    assert report.unused_feature_rows == 1
    assert json.loads(json.dumps(report.to_dict()))["collisions"] == {"KMH2": ["KM-H2", "KMH-2"]}


def test_collision_still_matches_exact_feature_name():
    frames = [pd.DataFrame({"task": "t", "cell": ["T-T", "TT"], "drug": "d", "y": [1.0, 2.0]})]
    features = pd.DataFrame({"g": [5.0]}, index=["TT"])

    with pytest.warns(DataWarning, match="T-T vs TT"):
        _, table, report = harmonise_cells(frames, features)

    assert list(table.index) == ["TT"]
    assert report.unmatched_features == ["T-T"]


def test_unmatched_feature_names_are_reported_and_logged(tmp_path, caplog):
    path = write(
        tmp_path / "r.csv", pd.DataFrame({"cell": ["A", "B", "C"], "drug": "d", "y": [1.0] * 3})
    )
    features = pd.DataFrame({"g": [1.0]}, index=["B"])

    with caplog.at_level(logging.WARNING, logger="mtl4c_prob.data._loaders"):
        data, report = load_responses([path], cell_features=features)

    assert report.unmatched_features == ["A", "C"]
    assert "2 cell(s) have no feature row (first: A, C)" in caplog.text
    assert np.isnan(data.cell_feature_matrix[[0, 2]]).all()


def test_two_feature_rows_for_one_cell_warn_and_keep_the_first():
    frames = [pd.DataFrame({"task": "t", "cell": ["NCI-H1650"], "drug": "d", "y": [1.0]})]
    features = pd.DataFrame({"g": [1.0, 2.0]}, index=["NCI-H1650", "NCIH1650"])

    with pytest.warns(DataWarning, match="1 feature row"):
        _, table, report = harmonise_cells(frames, features)

    assert list(table.index) == ["NCI-H1650"] and table["g"].tolist() == [1.0]
    assert report.unmatched_features == []


def test_harmonise_cells_without_features_does_not_warn():
    frames = [
        pd.DataFrame({"task": "a", "cell": ["nci-h1650"], "drug": "d", "y": [1.0]}),
        pd.DataFrame({"task": "b", "cell": ["NCI-H1650"], "drug": "d", "y": [1.0]}),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, table, report = harmonise_cells(frames)

    assert table is None and isinstance(report, HarmonisationReport)
    assert [f["cell"].tolist() for f in out] == [["nci-h1650"], ["nci-h1650"]]


# ---------------------------------------------------------------- duplicates


@pytest.fixture
def duplicated_file(tmp_path) -> Path:
    frame = pd.DataFrame(
        {
            "task": ["t", "t", "t", "t", "u"],
            "cell": ["A", "A", "B", "A", "A"],
            "drug": ["d", "d", "d", "e", "d"],
            "y": [1.0, 3.0, 5.0, 7.0, 9.0],
        }
    )
    return write(tmp_path / "dup.csv", frame)


def test_duplicates_mean_averages_and_logs(duplicated_file, caplog):
    with caplog.at_level(logging.INFO, logger="mtl4c_prob.data._loaders"):
        data, _ = load_responses([duplicated_file], long_columns={"task_column": "task"})

    assert "duplicates='mean': 2 rows repeat 1 pairs" in caplog.text
    assert data.n_obs == 4  # the same pair in another task is not a duplicate
    assert data.matrix("t").loc["A", "d"] == 2.0
    assert data.matrix("u").loc["A", "d"] == 9.0
    assert sorted(data.y) == [2.0, 5.0, 7.0, 9.0]


def test_duplicates_first_keep_and_error(duplicated_file):
    columns = {"task_column": "task"}

    first, _ = load_responses([duplicated_file], duplicates="first", long_columns=columns)
    kept, _ = load_responses([duplicated_file], duplicates="keep", long_columns=columns)

    assert first.n_obs == 4 and first.matrix("t").loc["A", "d"] == 1.0
    assert kept.n_obs == 5 and kept.matrix("t").loc["A", "d"] == 2.0
    with pytest.raises(DataError, match=r"2 rows repeat 1 \(task, cell, drug\) pairs .*'A', 'd'"):
        load_responses([duplicated_file], duplicates="error", long_columns=columns)


def test_duplicates_mean_keeps_censoring(tmp_path):
    frame = pd.DataFrame({"cell": ["A", "A"], "drug": "d", "y": [7.0, 9.0], "capped": [0, 1]})
    data, _ = load_responses([write(tmp_path / "c.csv", frame)], long_columns={"censor": "capped"})
    assert data.n_obs == 1 and data.y[0] == 8.0 and data.censor[0] == 1


# ---------------------------------------------------------------- feature tables


def test_load_features_from_csv_parquet_and_frame(tmp_path):
    frame = pd.DataFrame({"name": [" A ", "B"], "g1": [1, 2], "g2": [0.5, 0.25]})
    csv = write(tmp_path / "f.csv", frame)
    parquet = write(tmp_path / "f.parquet", frame.set_index("name"), index=True)

    for table in (
        load_features(csv),
        load_features(parquet),
        load_features(frame.set_index("name")),
    ):
        assert list(table.index) == ["A", "B"]
        assert list(table.columns) == ["g1", "g2"]
        assert (table.dtypes == "float64").all()
        np.testing.assert_array_equal(table.to_numpy(), [[1.0, 0.5], [2.0, 0.25]])


def test_load_features_errors(tmp_path):
    text = write(tmp_path / "t.csv", pd.DataFrame({"name": ["A"], "g": [1.0], "tissue": ["lung"]}))
    dup = write(tmp_path / "d.csv", pd.DataFrame({"name": ["A", "A"], "g": [1.0, 2.0]}))

    with pytest.raises(
        DataError, match=r"cell feature table has non-numeric column\(s\) \['tissue'\]"
    ):
        load_features(text)
    with pytest.raises(DataError, match="drug feature table repeats the name 'A'"):
        load_features(dup, kind="drug")


def test_drug_features_without_row_are_logged(tmp_path, caplog):
    path = write(
        tmp_path / "r.csv", pd.DataFrame({"cell": "A", "drug": ["x", "y"], "y": [1.0, 2.0]})
    )
    drugs = pd.DataFrame({"fp": [1.0]}, index=["x"])

    with caplog.at_level(logging.WARNING, logger="mtl4c_prob.data._loaders"):
        data, _ = load_responses([path], drug_features=drugs)

    assert "1 drug(s) have no feature row (first: y)" in caplog.text
    np.testing.assert_array_equal(data.drug_feature_matrix[0], [1.0])
    assert np.isnan(data.drug_feature_matrix[1]).all()


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_gdsc2_with_expression(caplog):
    responses = SHARED / "GDSC2_IC50.csv"
    expression = SHARED / "gdsc_expression.parquet"
    if not (responses.is_file() and expression.is_file()):
        pytest.skip(f"real GDSC data not available under {SHARED}")
    raw = pd.read_csv(responses)
    n_pairs = len(raw.drop_duplicates(["CELL_LINE_NAME", "DRUG_NAME"]))

    with (
        caplog.at_level(logging.INFO, logger="mtl4c_prob.data._loaders"),
        pytest.warns(DataWarning, match="KM-H2 vs KMH-2; T-T vs TT"),
    ):
        data, report = load_responses([responses], cell_features=expression)

    assert report.collisions == {"KMH2": ["KM-H2", "KMH-2"], "TT": ["T-T", "TT"]}
    assert len(raw) - n_pairs == 6288
    assert "duplicates='mean': 12576 rows repeat 6288 pairs" in caplog.text
    assert data.n_obs == n_pairs == 235748
    assert list(data.tasks) == ["GDSC2_IC50"]
    assert data.n_cells == raw["CELL_LINE_NAME"].nunique()
    assert data.n_drugs == raw["DRUG_NAME"].nunique()
    assert not data.frame.duplicated(["task", "cell", "drug"]).any()
    # "about 45 cells per screen" lack expression; most are matched
    matched = data.n_cells - len(report.unmatched_features)
    assert len(report.unmatched_features) < 60 and matched / data.n_cells > 0.9
    features = data.cell_feature_matrix
    assert features.shape == (data.n_cells, 6163)
    assert int(np.isfinite(features).all(axis=1).sum()) == matched
