"""End-to-end tests of the mtl4c-prob command."""

import json

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.cli import main
from mtl4c_prob.data import make_latent_factor_data

COLUMNS = ["task", "cell", "drug", "y", "mean", "sd", "lower", "upper"]


@pytest.fixture(scope="module")
def gdsc_like(tmp_path_factory):
    """Two GDSC-layout files sharing cells, with one spelling variant and a duplicate."""
    folder = tmp_path_factory.mktemp("files")
    data, _ = make_latent_factor_data(n_cells=50, n_drugs=12, n_tasks=2, rank=2, seed=0)
    frame = data.frame
    paths = []
    for task in data.tasks:
        rows = frame[frame["task"] == task]
        table = pd.DataFrame(
            {
                "COSMIC_ID": np.arange(len(rows)),
                "CELL_LINE_NAME": rows["cell"].to_numpy(),
                "DRUG_NAME": rows["drug"].to_numpy(),
                "LN_IC50": rows["y"].to_numpy(),
            }
        )
        table = pd.concat([table, table.iloc[:1]])
        path = folder / f"{task}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    features = data.cell_features.copy()
    features.index = [n.upper() for n in features.index]
    features_path = folder / "cells.csv"
    features.rename_axis("cell_line").to_csv(features_path)
    return paths, features_path


def read_outputs(out):
    pred = pd.read_csv(out / "predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    return pred, metrics, html


def test_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--steps", "150", "--num-samples", "50", "-q"]) == 0
    pred, metrics, html = read_outputs(out)
    assert list(pred.columns) == COLUMNS
    assert set(pred["task"]) == {"task0", "task1", "task2"}
    assert set(metrics["per_task"]) == {"task0", "task1", "task2"}
    assert 0.5 < metrics["overall"]["coverage_90"] <= 1.0
    assert 'id="calibration"' in html and "data:image/png;base64," in html
    assert (out / "model" / "model.json").is_file()
    assert "rmse" in capsys.readouterr().out


def test_fit_then_predict(tmp_path, gdsc_like):
    (a, b), features = gdsc_like
    out = tmp_path / "fit"
    args = [
        "fit",
        "--data",
        str(a),
        "--task",
        "first",
        "--data",
        str(b),
        "--cell-features",
        str(features),
        "--cell-pca",
        "5",
        "--split",
        "lco",
        "--test-fraction",
        "0.25",
        "--steps",
        "100",
        "--num-samples",
        "40",
        "--level",
        "0.8",
        "--out",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    pred, metrics, _ = read_outputs(out)
    assert set(pred["task"]) <= {"first", "task1"}
    assert metrics["info"]["split"] == "lco" and metrics["info"]["level"] == 0.8
    assert "coverage_80" in metrics["overall"]
    harmonisation = json.loads((out / "harmonisation.json").read_text())
    assert harmonisation["unmatched_features"] == []
    # Held-out cells never appear in training, and get predictions through their features.
    pairs = tmp_path / "pairs.csv"
    pred[["task", "cell", "drug"]].head(10).to_csv(pairs, index=False)
    target = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--model-dir",
                str(out),
                "--pairs",
                str(pairs),
                "--out",
                str(target),
                "--num-samples",
                "40",
            ]
        )
        == 0
    )
    again = pd.read_csv(target)
    assert list(again.columns) == [c for c in COLUMNS if c != "y"]
    assert len(again) == 10 and (again["sd"] > 0).all()


def test_single_task_and_ldo(tmp_path, gdsc_like):
    (a, b), _ = gdsc_like
    out = tmp_path / "st"
    assert (
        main(
            [
                "fit",
                "--data",
                str(a),
                "--data",
                str(b),
                "--single-task",
                "--split",
                "ldo",
                "--steps",
                "60",
                "--num-samples",
                "30",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    pred, metrics, _ = read_outputs(out)
    assert len(pred) > 0 and metrics["info"]["split"] == "ldo"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("", "empty"),
        ("CELL_LINE_NAME,DRUG_NAME,LN_IC50\nA,x,1.0\nB,x,abc\n", "non-numeric"),
        ("CELL_LINE_NAME,DRUG_NAME,LN_IC50\nA,x,1.0\nB,x,inf\n", "non-finite"),
        ("CELL_LINE_NAME,DRUG_NAME\nA,x\n", "no response column"),
        ("a,b,c\n1,2,3\n", "cannot tell the layout"),
    ],
    ids=["missing", "empty", "non-numeric", "infinite", "no-response", "unknown-layout"],
)
def test_bad_input_leaves_nothing(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    assert main(["fit", "--data", str(path), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_predict_unknown_cell(tmp_path, gdsc_like, capsys):
    (a, _), _ = gdsc_like
    out = tmp_path / "fit"
    assert (
        main(
            [
                "fit",
                "--data",
                str(a),
                "--steps",
                "30",
                "--num-samples",
                "20",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"task,cell,drug\n{a.stem},NO_SUCH_CELL,drug00\n")
    code = main(
        [
            "predict",
            "--model-dir",
            str(out),
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    assert code == 2 and "NO_SUCH_CELL" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_refuses_foreign_output_folder(tmp_path, gdsc_like, capsys):
    (a, _), _ = gdsc_like
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["fit", "--data", str(a), "--steps", "5", "--out", str(out), "-q"]) == 2
    assert (out / "notes.txt").read_text() == "keep me"
    assert "not an mtl4c-prob output folder" in capsys.readouterr().err


def test_task_without_data_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--task", "x", "--data", "f.csv", "--out", "o"])
    assert "--task must follow" in capsys.readouterr().err


def test_models_lists_every_installed_model(capsys):
    from mtl4c_prob.models import MODELS

    assert main(["models"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(MODELS) and {"mean", "mf"} <= set(names)


def test_recalibrate_writes_a_separate_file(tmp_path):
    out = tmp_path / "recal"
    code = main(["run", "--steps", "100", "--idata-draws", "20", "--recalibrate", "0.15",
                 "--out", str(out), "-q"])  # fmt: skip
    assert code == 0
    raw = pd.read_csv(out / "predictions.csv")
    recal = pd.read_csv(out / "predictions_recalibrated.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    factors = metrics["recalibration"]["factors"]["factors"]
    assert set(factors) == set(raw["task"].astype(str))
    # Same means, sds scaled by each task's factor; the raw file is left as predicted.
    np.testing.assert_allclose(recal["mean"], raw["mean"])
    ratio = (recal["sd"] / raw["sd"]).groupby(raw["task"].astype(str)).mean()
    for task, factor in factors.items():
        assert abs(ratio[task] - factor) < 1e-6 * max(1.0, factor)
    assert (out / "recalibration.json").is_file()
    bad = tmp_path / "bad"
    assert main(["run", "--recalibrate", "1.5", "--out", str(bad), "-q"]) == 2
    assert not bad.exists()


def test_gp_options_reach_the_model(tmp_path):
    out = tmp_path / "sgp"
    code = main(["run", "--model", "sgp", "--kernel", "matern32", "--composite", "sum",
                 "--inducing", "16", "--steps", "30", "--idata-draws", "10", "--out",
                 str(out), "-q"])  # fmt: skip
    assert code == 0
    saved = json.loads((out / "model" / "model.json").read_text())
    params = saved["params"]
    assert params["kernel"] == "matern32" and params["composite"] == "sum"
    assert params["n_inducing"] == 16
    assert main(["run", "--model", "mf", "--kernel", "rbf", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
