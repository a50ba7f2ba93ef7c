"""A throwaway PostgreSQL server (the machine's ``initdb``/``postgres`` binaries) on 127.0.0.1, for Label Studio.

Only the PostgreSQL benchmark (``benchmarks/ls_push.py --postgres``) and one slow test use it; the test
suite's Label Studio runs on SQLite. There is no migrated template for PostgreSQL: Label Studio migrates the
empty database at its first start (minutes, see ``PG_LS_START_TIMEOUT_S``).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures_ls import free_port, stop

PG_BIN = Path(os.environ.get("FREEAL_PG_BIN", "/usr/local/bin"))
START_TIMEOUT_S = 60
# Label Studio's first start migrates an empty PostgreSQL database (no cached template on this path)
PG_LS_START_TIMEOUT_S = 1200
# initdb and postgres refuse to run as root; as root they run as this account
RUN_AS_WHEN_ROOT = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway PostgreSQL: trust authentication, superuser ``postgres``, database ``postgres``."""

    host: str
    port: int
    user: str
    dbname: str
    version: str
    data_dir: Path
    log_path: Path

    def label_studio_env(self) -> dict[str, str]:
        """The variables that put a Label Studio on this database (``DJANGO_DB=default`` is PostgreSQL)."""
        return {"DJANGO_DB": "default", "POSTGRE_NAME": self.dbname, "POSTGRE_USER": self.user,
                "POSTGRE_PASSWORD": "", "POSTGRE_HOST": self.host, "POSTGRE_PORT": str(self.port)}

    def describe(self) -> str:
        """E.g. ``PostgreSQL 15.18, 127.0.0.1``."""
        return f"PostgreSQL {self.version}, {self.host}"


def postgres_available() -> bool:
    """Whether the ``initdb`` and ``postgres`` binaries are there."""
    return (PG_BIN / "initdb").exists() and (PG_BIN / "postgres").exists()


def _version() -> str:
    out = subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split(")", 1)[-1].split()[0]  # "postgres (PostgreSQL) 15.18 (Debian ...)" -> "15.18"


def _ready(data_dir: Path, port: int) -> bool:
    """The postmaster says "ready" in postmaster.pid (PostgreSQL 10+) and its TCP port answers."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    if len(lines) < 8 or lines[7].strip() != "ready":
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def throwaway_postgres() -> Iterator[PostgresServer]:
    """Start ``initdb`` + ``postgres -h 127.0.0.1 -p <free port>`` in a temp dir; stop it and delete it on exit.

    As root both run as the ``postgres`` account (they refuse root), so the temp dir is created under
    /tmp and handed to that account rather than under a pytest temp dir only root can enter.
    """
    root = Path(tempfile.mkdtemp(prefix="freeal-pg-"))
    uid: int | None = None
    gid: int | None = None
    if os.geteuid() == 0:
        account = pwd.getpwnam(RUN_AS_WHEN_ROOT)
        uid, gid = account.pw_uid, account.pw_gid
        os.chown(root, uid, gid)
    data_dir, sock_dir, log_path = root / "data", root / "sock", root / "postgres.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, cwd=root, user=uid, group=gid)
        subprocess.run(["mkdir", "-m", "700", str(sock_dir)], check=True, user=uid, group=gid)
        port = free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [str(PG_BIN / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(sock_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=root,
                user=uid, group=gid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(data_dir, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield PostgresServer("127.0.0.1", port, "postgres", "postgres", _version(), data_dir, log_path)
    finally:
        if proc is not None:
            stop(proc)  # SIGTERM, then SIGKILL after 20 s
        shutil.rmtree(root, ignore_errors=True)
