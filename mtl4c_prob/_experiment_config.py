"""Experiment configuration: TOML files and the dataset and model entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl4c_prob._config import read_model_config, read_toml
from mtl4c_prob.data import SPLITS, DrugResponseData
from mtl4c_prob.exceptions import DataError

__all__ = [
    "SPLIT_KEYS",
    "dataset_settings",
    "load_dataset",
    "model_settings",
    "read_experiment_config",
]

#: Per-dataset split settings (each defaults to the experiment's).
SPLIT_KEYS = ("split", "test_fraction", "holdout_task", "cell_pca", "drug_pca")
_TOP_KEYS = {"name", "runs", "seed", "level", "num_samples", "primary", "device", "out",
             "storage", "datasets", "models"}  # fmt: skip
_DATASET_KEYS = {"name", "files", "tasks", "synthetic", "split", "test_fraction",
                 "holdout_task", "cell_features", "drug_features", "cell_pca", "drug_pca",
                 "format", "response", "duplicates", "long_columns"}  # fmt: skip
_MODEL_KEYS = {"name", "model", "params", "fit", "single_task", "config"}


def load_dataset(settings: Mapping[str, Any]) -> DrugResponseData:
    """Build the data of a dataset entry: synthetic, or read from response files.

    Parameters
    ----------
    settings : dict
        ``synthetic`` (arguments of :func:`~mtl4c_prob.data.make_latent_factor_data`)
        or ``files`` (paths, or ``{path, task}`` tables) with the optional ``tasks``,
        ``cell_features``, ``drug_features``, ``format``, ``response``, ``duplicates``
        and ``long_columns`` of :func:`~mtl4c_prob.data.load_responses`.
    """
    from mtl4c_prob.data import load_responses, make_latent_factor_data

    if settings.get("synthetic") is not None:
        data, _ = make_latent_factor_data(**settings["synthetic"])
        return data
    files = []
    tasks = settings.get("tasks") or [None] * len(settings["files"])
    if len(tasks) != len(settings["files"]):
        raise DataError(
            f"dataset {settings['name']!r}: {len(tasks)} tasks for {len(settings['files'])} files"
        )
    for entry, task in zip(settings["files"], tasks, strict=True):
        if isinstance(entry, Mapping):
            files.append((Path(entry["path"]), entry.get("task", task)))
        else:
            files.append((Path(entry), task))
    options = {
        k: settings[k]
        for k in ("format", "response", "duplicates", "long_columns")
        if k in settings
    }
    for kind in ("cell_features", "drug_features"):
        if settings.get(kind):
            options[kind] = Path(settings[kind])
    data, _ = load_responses(files, **options)
    return data


def read_experiment_config(path: str | Path) -> dict[str, Any]:
    """Read an experiment file into the keyword arguments of :class:`Experiment`.

    Raises
    ------
    DataError
        For unknown keys, missing names or a missing ``datasets``/``models`` list.
    """
    path = Path(path)
    config = read_toml(path)
    base = path.resolve().parent
    _unknown(config, _TOP_KEYS, f"{path}")
    for section in ("datasets", "models"):
        if not isinstance(config.get(section), list) or not config[section]:
            raise DataError(f"{path}: needs at least one [[{section}]] table")
    datasets = {}
    for entry in config["datasets"]:
        _unknown(entry, _DATASET_KEYS, f"{path} [[datasets]]")
        entry = dict(entry)
        name = _entry_name(entry, path, "datasets")
        if "files" in entry:
            entry["files"] = [_resolve_file(f, base) for f in entry["files"]]
        for kind in ("cell_features", "drug_features"):
            if entry.get(kind):
                entry[kind] = str((base / entry[kind]).resolve())
        datasets[name] = entry
    models = {}
    for entry in config["models"]:
        _unknown(entry, _MODEL_KEYS, f"{path} [[models]]")
        entry = dict(entry)
        name = _entry_name(entry, path, "models")
        if entry.get("config"):
            tuned = read_model_config(base / entry.pop("config"))
            entry = {"model": tuned["model"], "params": tuned["params"], "fit": tuned["fit"],
                     **{k: v for k, v in entry.items() if k != "name"}}  # fmt: skip
            entry["params"] = {**tuned["params"], **entry.get("params", {})}
            entry["fit"] = {**tuned["fit"], **entry.get("fit", {})}
        entry.pop("name", None)
        models[name] = entry
    name = config.get("name") or path.stem
    options = {
        k: config[k]
        for k in ("runs", "seed", "level", "num_samples", "primary", "storage", "device")
        if k in config
    }
    out = base / config.get("out", name)
    return {"name": name, "datasets": datasets, "models": models, "out": out, **options}


def _unknown(entry: Mapping, known: set[str], where: str) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _entry_name(entry: Mapping, path: Path, section: str) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: every [[{section}]] table needs a name")
    return name


def _resolve_file(entry: Any, base: Path) -> Any:
    if isinstance(entry, Mapping):
        return {**entry, "path": str((base / entry["path"]).resolve())}
    return str((base / entry).resolve())


def _check_name(name: Any, kind: str) -> None:
    if not isinstance(name, str) or not name or "|" in name:
        raise ValueError(f"{kind} name {name!r} must be a non-empty string without '|'")


def dataset_settings(name: str, value: Any, defaults: dict) -> dict[str, Any]:
    """Check one dataset entry; the experiment's split settings fill in its defaults."""
    _check_name(name, "dataset")
    settings = {"data": value} if isinstance(value, DrugResponseData) else dict(value)
    settings = {**defaults, **settings, "name": str(name)}
    if (
        settings.get("data") is None
        and not settings.get("files")
        and settings.get("synthetic") is None
    ):
        raise DataError(f"dataset {name!r}: give data, files or synthetic")
    if settings["split"] not in SPLITS:
        raise ValueError(
            f"dataset {name!r}: unknown split {settings['split']!r}; choose one of {sorted(SPLITS)}"
        )
    if not 0 < settings["test_fraction"] <= 1:
        raise ValueError(
            f"dataset {name!r}: test_fraction must be in (0, 1], got {settings['test_fraction']}"
        )
    return settings


def model_settings(models: Mapping[str, Any] | Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Label -> ``{"model", "params", "fit"}`` from names, instances or dict entries."""
    from mtl4c_prob.models import ProbabilisticModel

    if not isinstance(models, Mapping):
        labelled = {}
        for m in models:
            label = m if isinstance(m, str) else m.name
            while label in labelled:
                label += "'"
            labelled[label] = m
        models = labelled
    out = {}
    for label, value in models.items():
        if isinstance(value, str):
            spec = {"model": value}
        elif isinstance(value, ProbabilisticModel):
            spec = {"model": value.name, "params": value.get_params()}
        else:
            spec = dict(value)
            _unknown(spec, {"model", "params", "fit", "single_task"}, f"model {label!r}")
        _check_name(label, "model")
        spec.setdefault("model", label)
        params = dict(spec.get("params") or {})
        if spec.pop("single_task", False):
            params["multitask"] = False
        out[str(label)] = {
            "model": spec["model"],
            "params": params,
            "fit": dict(spec.get("fit") or {}),
        }
    return out
