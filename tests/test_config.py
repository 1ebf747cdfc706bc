"""TOML writing and reading, and how fit --config merges a configuration file."""

import argparse

import pytest
import tomllib

from mtl4c_prob._config import apply_fit_config, read_model_config, toml_dumps, write_toml
from mtl4c_prob.exceptions import DataError


def test_toml_round_trip(tmp_path):
    data = {
        "name": 'quote " and \\ backslash',
        "runs": 3,
        "rate": 0.1,
        "big": 1e-12,
        "flag": True,
        "layers": (64, 32),
        "skip": None,
        "params": {"rank": 8, "nested": {"deep": "x"}, "odd key": 1},
        "datasets": [{"name": "a", "files": ["x.csv"]}, {"name": "b", "synthetic": {"seed": 1}}],
    }
    text = toml_dumps(data, header="first line\nsecond line")
    assert text.startswith("# first line\n# second line\n")
    back = tomllib.loads(text)
    expected = {k: v for k, v in data.items() if k != "skip"}
    expected["layers"] = [64, 32]
    assert back == expected
    path = write_toml(tmp_path / "sub" / "c.toml", data)
    assert tomllib.loads(path.read_text()) == expected
    with pytest.raises(TypeError, match="cannot write set"):
        toml_dumps({"bad": {1, 2}})


def _args(**given):
    defaults = {"model": "mf", "rank": None, "steps": None, "lr": None, "batch_size": None,
                "guide": None, "single_task": False}  # fmt: skip
    return argparse.Namespace(**{**defaults, **given})


def test_fit_config_merges_under_the_command_line(tmp_path):
    path = write_toml(tmp_path / "best.toml", {
        "model": "knn",
        "params": {"k": 20, "shrinkage": 50.0},
        "fit": {"steps": 300, "lr": 0.02, "guide": "lowrank", "lr_decay": 0.5},
        "tuning": {"value": 1.0},
    })  # fmt: skip
    args = _args(config=path, steps=100)
    apply_fit_config(args)
    assert args.model == "knn" and args.steps == 100 and args.lr == 0.02
    assert args.guide == "lowrank"
    assert args.config_params == {"k": 20, "shrinkage": 50.0}
    assert args.config_fit == {"lr_decay": 0.5}
    with pytest.raises(DataError, match="contradicts"):
        apply_fit_config(_args(config=path, model="nmf"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("params = {rank = 3}", "needs a line model"),
        ('model = "mf"\nfit = {stepz = 3}', "not SVI settings"),
        ('model = "mf"\nextra = 1', "unknown top-level"),
        ('model = "mf"\nparams = 3', "must be a table"),
        ('model = "mf"\nparams = {', "not valid TOML"),
    ],
)
def test_bad_model_configs(tmp_path, content, match):
    path = tmp_path / "c.toml"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_model_config(path)
    with pytest.raises(FileNotFoundError):
        read_model_config(tmp_path / "missing.toml")
