"""Experiments: grid, resume, shared workers, failures, rankings, config files and the CLI."""

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from scipy import stats

from mtl4c_prob._config import write_toml
from mtl4c_prob.cli import main
from mtl4c_prob.data import make_latent_factor_data
from mtl4c_prob.evaluation.experiment_report import paired_test, rank_models
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.experiment import Experiment, ModelTraining
from mtl4c_prob.models import BayesianMF, MeanEffects
from tests.postgres import postgres_url  # noqa: F401 (fixture)

MODELS = {
    "mean": {"fit": {"steps": 50}},
    "mf": {"params": {"rank": 3}, "fit": {"steps": 50}},
}
QUICK = {"num_samples": 30}


@pytest.fixture(scope="module")
def data():
    data, _ = make_latent_factor_data(
        n_cells=30, n_drugs=10, n_tasks=2, rank=2, noise=0.3, missing=0.2, seed=0
    )
    return data


def _trials(exp):
    return optuna.load_study(study_name=exp.name, storage=exp.storage_url).get_trials()


def test_experiment_runs_ranks_reports_and_resumes(data, tmp_path):
    out = tmp_path / "exp"
    exp = Experiment("grid", {"syn": data}, MODELS, out, runs=2, **QUICK)
    results = exp.run()

    assert list(results.columns) == [
        "experiment", "dataset", "model", "run", "seed", "scope", "metric", "value"
    ]  # fmt: skip
    cells = results[["dataset", "model", "run"]].drop_duplicates()
    assert len(cells) == 4 and set(results["scope"]) == {"overall", "task0", "task1"}
    assert {"rmse", "nll", "crps", "coverage_90", "calibration_error", "fit_seconds"} <= set(
        results["metric"]
    )
    # The same split per run for every model: equal test sizes.
    n_test = results[results["metric"] == "n_test"].pivot(
        index="run", columns="model", values="value"
    )
    assert (n_test["mean"] == n_test["mf"]).all()
    # Latent-factor data: the factorisation beats the additive baseline in every run.
    ranking = exp.ranking("syn", "rmse")
    assert list(ranking.index) == ["mf", "mean"] and ranking.loc["mf", "mean_rank"] == 1.0

    assert pd.read_parquet(out / "results.parquet").equals(results)
    assert len(pd.read_csv(out / "results.csv")) == len(results)
    document = json.loads((out / "results.json").read_text())
    assert document["ranking"]["syn"][0]["model"] == "mf" and document["cells"]["finished"] == 4
    html = (out / "report.html").read_text()
    for anchor in ("ranking-syn", "boxes-syn", "drugs-syn", "cells-syn"):
        assert f'id="{anchor}"' in html
    assert html.count("data:image/png;base64,") == 3
    assert (out / "predictions" / "syn" / "mf" / "run1.parquet").is_file()

    # Run again: nothing to do. One more run per dataset: only its two cells are fitted.
    assert exp.run().equals(results)
    assert len(_trials(exp)) == 4
    bigger = Experiment("grid", {"syn": data}, MODELS, out, runs=3, **QUICK)
    more = bigger.run()
    assert len(_trials(bigger)) == 6
    assert more[more["run"] < 2].reset_index(drop=True).equals(results)


def test_changed_model_settings_are_refused(data, tmp_path):
    Experiment("g", {"syn": data}, {"mean": MODELS["mean"]}, tmp_path, runs=1, **QUICK).run()
    changed = {"mean": {"params": {"bias_scale": 0.5}, "fit": {"steps": 50}}}
    with pytest.raises(ValueError, match="other settings"):
        Experiment("g", {"syn": data}, changed, tmp_path, runs=1, **QUICK).run()


def test_failed_cell_is_recorded_and_queued_again(data, tmp_path):
    models = {**MODELS, "broken": {"model": "mean", "fit": {"steps": 20, "guide": "flow"}}}
    exp = Experiment("f", {"syn": data}, models, tmp_path, runs=1, **QUICK)
    results = exp.run()
    assert set(results["model"]) == {"mean", "mf"}
    failed = exp.failed()
    assert list(failed["model"]) == ["broken"] and "unknown guide" in failed["error"][0]
    exp.run()
    states = [t.state for t in _trials(exp) if t.user_attrs["model"] == "broken"]
    assert states == [TrialState.FAIL, TrialState.FAIL]


def test_two_workers_share_one_experiment_on_postgres(data, tmp_path, postgres_url):  # noqa: F811
    exp = Experiment("shared", {"syn": data}, MODELS, tmp_path / "pg", runs=2,
                     storage=postgres_url, **QUICK)  # fmt: skip
    results = exp.run(workers=2)
    trials = _trials(exp)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert len(results[["model", "run"]].drop_duplicates()) == 4
    # Another host (here: another folder) with the same storage finds nothing left to do.
    elsewhere = Experiment("shared", {"syn": data}, MODELS, tmp_path / "other", runs=2,
                           storage=postgres_url, **QUICK)  # fmt: skip
    assert elsewhere.run().equals(results) and len(_trials(elsewhere)) == 4


def test_paired_test_and_ranking_directions():
    a, b = np.array([1.0, 2.0, 3.5, 4.0]), np.array([1.5, 2.1, 3.9, 4.8])
    expected = stats.ttest_rel(a, b)
    assert paired_test(a, b)["p"] == pytest.approx(expected.pvalue)
    assert np.isnan(paired_test(a[:1], b[:1])["p"])

    rows = []
    for run in range(3):
        for model, rmse, pearson, cov in [("x", 1.0, 0.9, 0.70), ("y", 1.2, 0.8, 0.89)]:
            for metric, value in [("rmse", rmse + run / 10), ("pearson", pearson),
                                  ("coverage_90", cov)]:  # fmt: skip
                rows.append(("e", "d", model, run, run, "overall", metric, value))
    columns = ["experiment", "dataset", "model", "run", "seed", "scope", "metric", "value"]
    frame = pd.DataFrame(rows, columns=columns)
    assert list(rank_models(frame, "d", "rmse").index) == ["x", "y"]
    assert list(rank_models(frame, "d", "pearson").index) == ["x", "y"]
    # Coverage is best at its nominal level: 0.89 beats 0.70.
    assert list(rank_models(frame, "d", "coverage_90").index) == ["y", "x"]
    with pytest.raises(KeyError, match="no 'crps' results"):
        rank_models(frame, "d", "crps")


def test_seed_model_training(data, tmp_path):
    training = ModelTraining(tmp_path / "exp_004")
    table = training.execute(data, [MeanEffects(), BayesianMF(rank=3)],
                             metrics=["rmse", "explained_variance_score"], nruns=1,
                             fit={"steps": 50}, **QUICK)  # fmt: skip
    assert list(table["model"]) == ["mean", "mf"]
    assert list(table.columns) == ["dataset", "model", "run", "rmse", "explained_variance"]
    assert training.generate_report().name == "report.html"


def test_config_file_and_command(tmp_path, capsys):
    write_toml(
        tmp_path / "tuned.toml", {"model": "mf", "params": {"rank": 3}, "fit": {"steps": 40}}
    )
    config = {
        "name": "from-file",
        "runs": 2,
        "num_samples": 30,
        "datasets": [
            {"name": "syn", "synthetic": {"n_cells": 30, "n_drugs": 10, "n_tasks": 2, "seed": 2},
             "split": "ldo", "test_fraction": 0.3},
        ],
        "models": [
            {"name": "mean", "fit": {"steps": 40}},
            {"name": "mf-tuned", "config": "tuned.toml"},
            {"name": "mf-single", "model": "mf", "single_task": True,
             "params": {"rank": 2}, "fit": {"steps": 40}},
        ],
    }  # fmt: skip
    path = write_toml(tmp_path / "exp.toml", config)
    assert main(["experiment", str(path), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "syn / mf-single: nll" in printed and "(2 runs)" in printed
    out = tmp_path / "from-file"
    results = pd.read_csv(out / "results.csv")
    assert set(results["model"]) == {"mean", "mf-tuned", "mf-single"}
    exp = Experiment.from_config(path)
    assert exp.models["mf-tuned"] == {"model": "mf", "params": {"rank": 3}, "fit": {"steps": 40}}
    assert exp.models["mf-single"]["params"]["multitask"] is False

    # Report only: rebuilds the outputs without fitting.
    (out / "report.html").unlink()
    assert main(["experiment", str(path), "--report-only", "-q"]) == 0
    assert (out / "report.html").is_file()

    bad = write_toml(tmp_path / "bad.toml", {**config, "modles": []})
    assert main(["experiment", str(bad), "-q"]) == 2
    assert "unknown key(s) ['modles']" in capsys.readouterr().err


def test_bad_experiments(data, tmp_path):
    with pytest.raises(ValueError, match="needs cell features"):
        bare = {"syn": {"data": data.subset(np.arange(data.n_obs))}}
        bare["syn"]["data"].cell_features = None
        Experiment("b", bare, {"ffnn": {}}, tmp_path / "x").run()
    with pytest.raises(ValueError, match="rank must be at least 1"):
        Experiment("b", {"syn": data}, {"mf": {"params": {"rank": 0}}}, tmp_path / "x")
    with pytest.raises(ValueError, match="without '\\|'"):
        Experiment("b", {"syn": data}, {"m|f": "mf"}, tmp_path / "x")
    with pytest.raises(DataError, match="unknown key"):
        Experiment("b", {"syn": data}, {"mf": {"rank": 3}}, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown split"):
        Experiment("b", {"syn": data}, MODELS, tmp_path / "x", split="random")
    assert not (tmp_path / "x").exists()
