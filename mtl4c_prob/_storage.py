"""Optuna storages shared by tuning and experiments: URLs, settings guard, stale trials.

A storage is named by a string:

* a database URL that SQLAlchemy understands (``sqlite:///study.db``,
  ``postgresql://user@host:5432/db``, ``mysql+pymysql://...``): an
  :class:`optuna.storages.RDBStorage` with heartbeats, so that trials of a crashed worker
  are marked failed after a grace period and other workers carry on;
* ``journal:PATH``, or a path ending in ``.log``, ``.jsonl`` or ``.journal``: an
  append-only :class:`optuna.storages.JournalStorage` file (one host, or a shared file
  system with working file locks);
* a path ending in ``.db``, ``.sqlite`` or ``.sqlite3``: that SQLite file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

logger = logging.getLogger(__name__)

__all__ = [
    "check_study_settings",
    "fail_dead_local_trials",
    "open_storage",
    "redact",
    "resolve_storage_url",
    "trial_id",
    "worker_tag",
]

_JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
#: Seconds between heartbeats of a running trial, and the silence after which it is failed.
HEARTBEAT_INTERVAL, GRACE_PERIOD = 60, 180
SETTINGS_ATTR = "mtl4c_settings"


def resolve_storage_url(storage: str | os.PathLike[str] | None, default: Path | None) -> str:
    """Normalise a storage name to a URL (``journal:PATH`` for journal files).

    ``storage=None`` means the SQLite file ``default``; relative paths become absolute,
    so that worker processes started elsewhere open the same file.
    """
    if storage is None:
        if default is None:
            raise ValueError("give a storage URL or an output folder for the default SQLite file")
        return f"sqlite:///{Path(default).resolve()}"
    text = os.fspath(storage)
    if text.startswith("journal:"):
        return f"journal:{Path(text[len('journal:') :]).resolve()}"
    if "://" in text:
        return text
    if text.endswith(_JOURNAL_SUFFIXES):
        return f"journal:{Path(text).resolve()}"
    if text.endswith(_SQLITE_SUFFIXES):
        return f"sqlite:///{Path(text).resolve()}"
    raise ValueError(
        f"storage {text!r} is neither a database URL (sqlite:///FILE, postgresql://...), "
        "a journal file (journal:PATH or *.log) nor an SQLite file (*.db)"
    )


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage a URL from :func:`resolve_storage_url` names.

    Raises
    ------
    ImportError
        For a PostgreSQL or MySQL URL whose database driver is not installed (the
        message names the package to install).
    ValueError
        When the database cannot be reached (the message gives the URL, password hidden).
    """
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        # Several processes write one file: wait for the lock rather than fail at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
            )
    except ModuleNotFoundError as exc:
        package = {"psycopg2": "psycopg2-binary", "pymysql": "PyMySQL"}.get(exc.name, exc.name)
        raise ImportError(
            f"storage {redact(url)} needs the database driver {exc.name!r}: pip install {package}"
        ) from exc
    except Exception as exc:  # SQLAlchemy's OperationalError and friends
        if isinstance(exc, (ImportError, ValueError)):
            raise
        raise ValueError(f"cannot open storage {redact(url)}: {exc}") from exc
    if storage.engine.name == "sqlite":
        _write_lock_on_begin(storage)
    return storage


def _write_lock_on_begin(storage: optuna.storages.RDBStorage) -> None:
    """Make every SQLite transaction take the database's write lock when it begins.

    Optuna claims a queued trial by reading its state ``SELECT ... FOR UPDATE`` and then
    writing ``RUNNING``. SQLite has no row locks and Python's driver begins a transaction
    only at the first write, so two workers can both read ``WAITING`` and both claim the
    trial; the slower one then fails with "Cannot tell a COMPLETE trial" (tuning) or runs
    an experiment cell twice. ``BEGIN IMMEDIATE`` makes the read and the write one
    critical section. The cost is that transactions, reads included, run one at a time,
    which Optuna's short transactions bear well on one host.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below opens them

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections opened while the storage was set up predate the listeners.
    storage.scoped_session.remove()
    storage.engine.dispose()


def redact(url: str) -> str:
    """Hide the password of a database URL (``user:***@host``)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def check_study_settings(study: optuna.Study, settings: dict[str, Any], what: str) -> None:
    """Record ``settings`` on a new study, or check that an existing study has the same.

    Adding trials to a study that scored another model, data set or objective would mix
    values that cannot be compared, so a mismatch is an error naming the settings.

    Raises
    ------
    ValueError
        When the study was created with other settings.
    """
    settings = json.loads(json.dumps(settings, default=str))
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return
    differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if differ:
        details = "; ".join(
            f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in differ[:4]
        )
        raise ValueError(
            f"{what} {study.study_name!r} in this storage was created with other settings "
            f"({details}); use another study name (--study) or storage, or the same settings"
        )


def worker_tag() -> dict[str, Any]:
    """Host name and process id, stored as user attribute ``worker`` of each trial."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """Storage id of trial ``number`` of ``study``."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def fail_dead_local_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Mark as failed the running trials whose worker, on this host, no longer exists.

    Heartbeats catch crashed workers on any host, but only after a grace period and only
    for database storages; a worker restarted on the same host can tell at once that the
    process of a "running" trial is gone. Returns the number of trials marked.
    """
    host, count = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        pid = worker.get("pid")
        if worker.get("host") == host and isinstance(pid, int) and not _alive(pid):
            storage.set_trial_state_values(trial_id(storage, study, trial.number), TrialState.FAIL)
            count += 1
    if count:
        logger.warning("%d trial(s) of a stopped worker on this host marked failed", count)
    return count
