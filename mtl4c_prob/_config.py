"""TOML configuration files: reading, a small writer, and ``fit --config``.

A model configuration (what ``mtl4c-prob tune`` saves as ``best_config.toml`` and
``mtl4c-prob fit --config FILE`` reads) has this layout::

    model = "mf"

    [params]        # constructor arguments of the model (priors, rank, ...)
    rank = 24
    factor_scale = 0.42

    [fit]           # SVIConfig fields
    steps = 900
    lr = 0.061

    [tuning]        # provenance, ignored by fit
    study = "mf-lpo-nll"

Only ``model`` is required. Reading goes through :mod:`tomllib`; writing is done here,
for the subset of TOML these files need (tables, strings, numbers, booleans, arrays of
scalars and arrays of tables).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtl4c_prob.exceptions import DataError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

__all__ = ["apply_fit_config", "read_model_config", "read_toml", "toml_dumps", "write_toml"]

#: Sections of a model configuration file.
MODEL_CONFIG_KEYS = ("model", "params", "fit", "tuning", "description")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
#: ``fit`` options with a command-line flag: file value -> argparse attribute.
_FIT_FLAGS = {"steps": "steps", "lr": "lr", "batch_size": "batch_size", "guide": "guide"}


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file into a dict.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    DataError
        When it is not valid TOML (the message gives the parser's line and column).
    """
    if tomllib is None:
        raise ImportError("reading TOML needs Python 3.11 or later (tomllib)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path} is not valid TOML: {exc}") from exc


def _key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"TOML keys must be non-empty strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f'"{escaped}"'


def _value(value: Any, where: str) -> str:
    """One TOML value (scalar or array of scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, os.PathLike):
        return _string(os.fspath(value))
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        return _value(value.item(), where)  # numpy scalars
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, where) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} value at {where!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _emit(table: Mapping[str, Any], prefix: list[str], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if v is not None]
    plain = [(k, v) for k, v in scalars if not isinstance(v, Mapping) and not _is_table_array(v)]
    for key, value in plain:
        lines.append(f"{_key(key)} = {_value(value, '.'.join([*prefix, key]))}")
    for key, value in scalars:
        path = [*prefix, key]
        header = ".".join(_key(k) for k in path)
        if isinstance(value, Mapping):
            lines.extend(["", f"[{header}]"])
            _emit(value, path, lines)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{header}]]"])
                _emit(item, path, lines)


def toml_dumps(data: Mapping[str, Any], header: str | None = None) -> str:
    """Format a dict as TOML.

    Parameters
    ----------
    data : mapping
        Nested dicts become tables, lists of dicts arrays of tables; other values must
        be strings, numbers, booleans, paths or lists of those. None values are left out
        (TOML has no null).
    header : str, optional
        Comment lines written at the top (each prefixed with ``#``).

    Returns
    -------
    str
        TOML text that :mod:`tomllib` reads back into ``data`` (tuples as lists).
    """
    lines = [f"# {line}".rstrip() for line in (header or "").splitlines()]
    _emit(data, [], lines)
    text = "\n".join(lines).strip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def write_toml(
    path: str | os.PathLike[str], data: Mapping[str, Any], header: str | None = None
) -> Path:
    """Write ``data`` as TOML to ``path`` atomically (temporary file, then rename)."""
    text = toml_dumps(data, header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a model configuration file (``best_config.toml`` layout).

    Returns
    -------
    dict
        Keys ``model`` (str), ``params`` and ``fit`` (dicts, possibly empty) and
        ``tuning`` (dict of provenance, possibly empty).

    Raises
    ------
    DataError
        When ``model`` is missing, a section is not a table, a key is unknown, or a
        ``fit`` key is not an SVI setting.
    """
    from mtl4c_prob.inference import SVIConfig

    config = read_toml(path)
    unknown = sorted(set(config) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise DataError(
            f"{path}: unknown top-level key(s) {unknown}; a model configuration has "
            f"{list(MODEL_CONFIG_KEYS)}"
        )
    if not isinstance(config.get("model"), str):
        raise DataError(f'{path}: needs a line model = "NAME" naming a registered model')
    for section in ("params", "fit", "tuning"):
        config.setdefault(section, {})
        if not isinstance(config[section], dict):
            raise DataError(f"{path}: [{section}] must be a table")
    known = set(SVIConfig.__dataclass_fields__) - {"callback"}
    bad = sorted(set(config["fit"]) - known)
    if bad:
        raise DataError(f"{path}: [fit] key(s) {bad} are not SVI settings; known: {sorted(known)}")
    return config


def apply_fit_config(args: Any) -> None:
    """Merge ``args.config`` (a model configuration file) into parsed ``fit`` options.

    The file names the model, its constructor arguments and its SVI settings.
    Command-line options still win where they were given: ``--rank``, ``--steps``,
    ``--lr``, ``--batch-size`` and ``--guide`` when set, and
    ``--single-task``. ``--model`` may repeat the file's model; naming another one (other
    than the default ``mf``) is an error. Constructor arguments go to
    ``args.config_params`` and the remaining SVI settings to ``args.config_fit``, which
    the fit command merges under the command-line values.
    """
    config = read_model_config(args.config)
    model = config["model"]
    if args.model not in (model, "mf"):
        raise DataError(
            f"--model {args.model} contradicts model = {model!r} in {args.config}; "
            "drop --model or use another configuration"
        )
    args.model = model
    params = dict(config["params"])
    if args.rank is None and "rank" in params:
        args.rank = int(params.pop("rank"))
    params.pop("rank", None)
    if args.single_task:
        params.pop("multitask", None)
    fit = dict(config["fit"])
    for key, attr in _FIT_FLAGS.items():
        if key not in fit:
            continue
        value = fit.pop(key)
        if key == "guide":
            if args.guide is None:
                args.guide = value
        elif getattr(args, attr) is None:
            setattr(args, attr, value)
    args.config_params = params
    args.config_fit = fit
