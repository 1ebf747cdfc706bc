"""Optuna tuning: search spaces, studies, storages, workers, pruning and the tune command."""

import json
import subprocess
import threading

import numpy as np
import optuna
import pandas as pd
import pytest
import tomllib
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mtl4c_prob._spaces import (
    as_distribution,
    contains,
    default_search_space,
    encode,
    model_defaults,
    search_space,
)
from mtl4c_prob._storage import open_storage, resolve_storage_url
from mtl4c_prob.cli import main
from mtl4c_prob.data import DrugResponseData, make_latent_factor_data
from mtl4c_prob.exceptions import DataError
from mtl4c_prob.models import MODELS, ProbabilisticModel
from mtl4c_prob.tuning import tune
from tests.postgres import postgres_url  # noqa: F401 (fixture)

# Small and quick: rank and steps fixed, only the priors and the learning rate searched.
FAST = {
    "params": {"rank": 3},
    "fit": {"steps": 60, "eval_every": 20},
    "num_samples": 30,
    "progress_bar": False,
}


@pytest.fixture(scope="module")
def data():
    data, _ = make_latent_factor_data(
        n_cells=30, n_drugs=10, n_tasks=2, rank=2, noise=0.3, missing=0.2, seed=0
    )
    return data


class Toy(ProbabilisticModel):
    name = "toy"

    def __init__(
        self,
        rank=8,
        *,
        multitask=True,
        weight_scale=0.5,
        noise_spread=0.2,
        lengthscale_prior_loc=2.0,
        jitter=1e-4,
        centred=True,
        label="x",
    ):
        super().__init__(multitask=multitask)
        self.rank, self.weight_scale, self.noise_spread = rank, weight_scale, noise_spread
        self.lengthscale_prior_loc, self.jitter, self.centred = (
            lengthscale_prior_loc,
            jitter,
            centred,
        )
        self.label = label


def test_generic_space_reads_prior_scales_and_ranks():
    space = default_search_space(Toy)
    assert sorted(space) == ["lengthscale_prior_loc", "noise_spread", "rank", "weight_scale"]
    assert space["rank"] == IntDistribution(2, 16, log=True)
    assert space["weight_scale"] == FloatDistribution(0.1, 2.5, log=True)
    # The search goes through the declared-or-generic entry point too.
    assert search_space(Toy) == space


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_a_space_holding_its_defaults(name):
    space = search_space(name)
    defaults = model_defaults(MODELS[name])
    assert space, f"{name} has nothing to tune"
    outside = [k for k, dist in space.items() if not contains(dist, encode(defaults[k]))]
    assert not outside
    if "kernel" in defaults:
        assert isinstance(space["kernel"], CategoricalDistribution)
        assert defaults["kernel"] in space["kernel"].choices


def test_declared_space_with_unknown_argument_is_an_error():
    class Bad(Toy):
        search_space = {"rank": ("int", 2, 8), "nonsense": ("float", 0.1, 1.0)}

    with pytest.raises(ValueError, match="nonsense"):
        search_space(Bad)


def test_dimensions_the_data_cannot_inform_are_not_searched(data):
    from mtl4c_prob.tuning import _relevant

    one = data.frame[data.frame["task"] == "task0"][["task", "cell", "drug", "y"]]
    bare = DrugResponseData(one)
    space = search_space("mf")
    assert {"task_scale", "feature_scale"} <= set(_relevant(space, data, set()))
    kept = _relevant(space, bare, set())
    assert "task_scale" not in kept and "feature_scale" not in kept and "rank" in kept
    assert "task_scale" in _relevant(space, bare, {"task_scale"})


def test_dimension_tuples():
    assert as_distribution("a", ("float", 0.1, 10, "log")) == FloatDistribution(0.1, 10, log=True)
    assert as_distribution("b", ("int", 50, 500, 50)) == IntDistribution(50, 500, step=50)
    assert as_distribution("c", ("categorical", ["x", "y"])).choices == ("x", "y")
    for bad in [("float", 1.0), ("uniform", 0, 1), ("float", 2.0, 1.0), 3]:
        with pytest.raises(ValueError, match="search dimension"):
            as_distribution("d", bad)


def test_storage_names():
    assert resolve_storage_url(None, "out/study.db").startswith("sqlite:////")
    assert resolve_storage_url("runs.log", None).startswith("journal:/")
    assert resolve_storage_url("postgresql://u:secret@h/db", None) == "postgresql://u:secret@h/db"
    with pytest.raises(ValueError, match="neither a database URL"):
        resolve_storage_url("study.txt", None)


def _claims_of_racing_workers(url, workers=4, queued=30):
    """Each worker, with its own connection, tries to move every queued trial to RUNNING."""
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for x in range(queued):
        study.enqueue_trial({"x": x})
    barrier, wins = threading.Barrier(workers), []

    def worker():
        storage = open_storage(url)
        sid = storage.get_study_id_from_name("race")
        ids = [t._trial_id for t in storage.get_all_trials(sid, states=(TrialState.WAITING,))]
        barrier.wait()
        wins.append(sum(bool(storage.set_trial_state_values(i, TrialState.RUNNING)) for i in ids))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wins


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_queued_trial_is_claimed_by_one_worker(kind, tmp_path):
    # Before SQLite transactions took the write lock on BEGIN, 4 threads claimed 36-49 of
    # 30 queued trials; two workers running one trial is what broke two-worker tuning.
    url = resolve_storage_url(tmp_path / ("q.db" if kind == "sqlite" else "q.log"), None)
    wins = _claims_of_racing_workers(url)
    assert len(wins) == 4 and sum(wins) == 30


def test_a_queued_trial_is_claimed_by_one_postgres_worker(postgres_url):  # noqa: F811
    assert sum(_claims_of_racing_workers(postgres_url)) == 30


def test_tune_beats_the_defaults_and_writes_its_outputs(data, tmp_path):
    # 40 steps at the default learning rate underfit: a search over the learning rate
    # alone finds a better held-out NLL within five trials (seeded).
    out = tmp_path / "tune"
    only_lr = {k: None for k in search_space("mf") if k != "rank"}
    fast = {**FAST, "fit": {"steps": 40, "eval_every": 20}}
    result = tune(data, "mf", n_trials=5, seed=0, out=out, space=only_lr, **fast)

    trials = result.study.get_trials()
    assert len(trials) == 5 and trials[0].user_attrs["defaults"]
    assert trials[0].params == {"lr": 0.05}
    assert result.best_value < result.default_value - 0.1
    assert result.best_params == {"rank": 3} and set(result.best_fit) == {
        "steps",
        "eval_every",
        "lr",
    }

    config = tomllib.loads((out / "best_config.toml").read_text())
    assert config["model"] == "mf" and config["params"]["rank"] == 3
    assert config["fit"]["lr"] == pytest.approx(result.best_fit["lr"])
    assert config["tuning"]["value"] == pytest.approx(result.best_value)
    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == 5 and {"val_nll", "val_rmse", "val_coverage_90", "lr", "pid"} <= set(frame)
    html = (out / "report.html").read_text()
    for anchor in ("tuning-history", "tuning-importances", "tuning-contour", "tuning-parallel"):
        assert f'id="{anchor}"' in html
    assert html.count("data:image/png;base64,") >= 4
    assert {p.name for p in (out / "figures").iterdir()} >= {
        "history.png",
        "importances.png",
        "contour.png",
        "parallel_coordinate.png",
    }


def test_same_seed_same_study_and_resume_adds_trials(data, tmp_path):
    a = tune(data, "mf", n_trials=2, seed=4, out=tmp_path / "a", **FAST)
    b = tune(data, "mf", n_trials=2, seed=4, out=tmp_path / "b", **FAST)
    values = [[t.value for t in r.study.get_trials()] for r in (a, b)]
    assert values[0] == values[1]

    again = tune(data, "mf", n_trials=1, seed=4, out=tmp_path / "a", **FAST)
    assert again.n_new == 1 and len(again.study.get_trials()) == 3
    with pytest.raises(ValueError, match="other settings.*objective"):
        tune(data, "mf", n_trials=1, seed=4, out=tmp_path / "a", objective="rmse",
             study_name=a.study.study_name, **FAST)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_crashed_trial_is_failed_on_resume(data, tmp_path):
    out = tmp_path / "t"
    first = tune(data, "mf", n_trials=1, out=out, **FAST)
    # A worker that died mid-trial leaves a RUNNING trial behind.
    process = subprocess.Popen(["true"])
    process.wait()
    study = optuna.load_study(study_name=first.study.study_name, storage=open_storage(
        resolve_storage_url(None, out / "study.db")))  # fmt: skip
    trial = study.ask()
    trial.set_user_attr(
        "worker", {**first.study.trials[0].user_attrs["worker"], "pid": process.pid}
    )

    result = tune(data, "mf", n_trials=1, out=out, **FAST)
    states = [t.state for t in result.study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_pruned_trials_report_intermediate_values(data, tmp_path):
    # Every held-out NLL is above 0, so a threshold pruner stops each trial at its first
    # report: the plumbing from the SVI callback to Optuna, not a statistical claim.
    with pytest.raises(RuntimeError, match="no completed trial"):
        tune(data, "mf", n_trials=2, pruner=optuna.pruners.ThresholdPruner(upper=0.0),
             storage=tmp_path / "s.db", **FAST)  # fmt: skip
    study = optuna.load_study(study_name="mf-lpo-nll", storage=f"sqlite:///{tmp_path / 's.db'}")
    for trial in study.trials:
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [33]  # step 20 of 60, in percent


def test_kfold_objective_is_the_fold_mean(data, tmp_path):
    result = tune(data, "mean", n_trials=2, folds=2, objective="crps", pruner="none",
                  storage=tmp_path / "k.log", **{**FAST, "params": {}})  # fmt: skip
    for trial in result.study.get_trials():
        assert trial.value == pytest.approx(trial.user_attrs["metrics"]["val_crps"])
        assert sorted(trial.intermediate_values) == [0, 1]


def _two_workers(data, storage, out):
    result = tune(data, "mf", n_trials=4, workers=2, storage=storage, out=out, **FAST)
    trials = result.study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    return result


def test_two_workers_share_one_sqlite_study(data, tmp_path):
    _two_workers(data, None, tmp_path / "w")


def test_two_workers_share_one_postgres_study(data, tmp_path, postgres_url):  # noqa: F811
    result = _two_workers(data, postgres_url, tmp_path / "p")
    assert "postgresql" in (tmp_path / "p" / "best_config.toml").read_text()
    # A second run on the same server adds to the same study.
    again = tune(data, "mf", n_trials=1, storage=postgres_url, out=tmp_path / "p", **FAST)
    assert again.study.study_name == result.study.study_name
    assert len(again.study.get_trials()) == 5


def test_bad_input_writes_nothing(data, tmp_path):
    bare = DrugResponseData(data.frame[["task", "cell", "drug", "y"]])
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="objective"):
        tune(data, "mf", objective="mae", out=out)
    with pytest.raises(ValueError, match="takes no argument"):
        tune(data, "mf", params={"ranks": 3}, out=out)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        tune(data, "mf", params={"rank": 0}, out=out)
    with pytest.raises(ValueError, match="needs cell features"):
        tune(bare, "ffnn", out=out)
    with pytest.raises(ValueError, match="unknown model"):
        tune(data, "svd", out=out)
    assert not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a tuning output folder"):
        tune(data, "mf", out=tmp_path / "busy", **FAST)
    # A failure inside the first trial removes the folder it created.
    with pytest.raises(ValueError, match="unknown guide"):
        tune(data, "mf", out=out, **{**FAST, "fit": {"steps": 20, "guide": "flow"}})
    assert not out.exists()


def test_cli_tune_then_fit_with_the_best_config(data, tmp_path, capsys):
    path = tmp_path / "responses.csv"
    data.frame[["task", "cell", "drug", "y"]].to_csv(path, index=False)
    common = ["--data", str(path), "--format", "long", "--task-col", "task", "--seed", "1"]
    out = tmp_path / "tuned"
    tune_args = ["tune", *common, "--rank", "3", "--steps", "60", "--num-samples", "30"]
    tune_args += ["--trials", "3", "--out", str(out), "--study", "cli", "-q"]
    assert main(tune_args) == 0
    assert "best nll" in capsys.readouterr().out
    assert main(tune_args) == 0  # the same storage and study: three more trials
    assert "3 new trial(s)" in capsys.readouterr().out
    assert len(pd.read_csv(out / "trials.csv")) == 6

    config = tomllib.loads((out / "best_config.toml").read_text())
    fitted = tmp_path / "fitted"
    fit_args = ["fit", *common, "--config", str(out / "best_config.toml"), "--out", str(fitted)]
    assert main([*fit_args, "--num-samples", "30", "--idata-draws", "10", "-q"]) == 0
    saved = json.loads((fitted / "model" / "model.json").read_text())
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert saved["params"]["rank"] == 3
    for key, value in config["params"].items():
        assert saved["params"][key] == pytest.approx(value)
    assert saved["fit_result"]["settings"]["lr"] == pytest.approx(config["fit"]["lr"])
    assert metrics["info"]["config"].endswith("best_config.toml")
    assert np.isfinite(metrics["overall"]["nll"])

    # --model naming another model than the file's is refused.
    bad = [*fit_args[:-1], str(tmp_path / "x"), "--model", "knn", "-q"]
    assert main(bad) == 2
    assert "contradicts" in capsys.readouterr().err
