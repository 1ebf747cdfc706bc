"""A throwaway PostgreSQL server for storage tests (initdb into a temporary folder)."""

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name):
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command, as_postgres):
    if as_postgres:
        command = ["su", "postgres", "-s", "/bin/bash", "-c", shlex.join(command)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a PostgreSQL server on 127.0.0.1 that lives for the test session.

    The server refuses to run as root, so under root the data folder belongs to the
    ``postgres`` user and the server runs as that user. Skips only when the PostgreSQL
    binaries are not installed; a server that fails to start fails the tests.
    """
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="mtl4c-pg-"))
    if as_postgres:
        shutil.chown(root, user="postgres")
    data, port = root / "data", _free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    _run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], as_postgres)
    _run(
        [pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        as_postgres,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        _run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], as_postgres)
        shutil.rmtree(root, ignore_errors=True)
