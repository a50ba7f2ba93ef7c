"""Session fixtures: a real Label Studio (``.venv-ls/bin/label-studio``) on 127.0.0.1 with SQLite in a temp dir.

``label_studio`` runs as ``docker-compose.yml`` ships it, with Label Studio's batched prediction import
on; ``label_studio_default_import`` (started only by the tests that ask for it) has Label Studio's default.

The first start migrates an empty database (~2 min); that migrated data dir is cached under
``~/.cache/freeal-ls-template/<version>`` and copied for later sessions, which then start in seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("FREEAL_LS_BIN", ROOT / ".venv-ls" / "bin" / "label-studio"))
TEMPLATE_ROOT = Path(os.environ.get("FREEAL_LS_TEMPLATE", Path.home() / ".cache" / "freeal-ls-template"))
USERNAME = "admin@example.com"
PASSWORD = "freeal-test-pass"
TOKEN = "freeal0test0legacy0token0123456789"
START_TIMEOUT_S = 420
# Label Studio 1.23's batched prediction import (off by default; docker-compose.yml turns it on)
BATCHED_IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"


@dataclass(frozen=True)
class LabelStudioServer:
    """A running Label Studio: base URL, admin credentials and a legacy API token."""

    url: str
    token: str
    username: str
    password: str
    data_dir: Path
    log_path: Path
    batched_import: bool = True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ls_env(data_dir: Path, batched_import: bool = True, extra_env: Mapping[str, str] | None = None
           ) -> dict[str, str]:
    """Environment for a local test Label Studio that may call an ML backend on loopback.

    ``extra_env`` is set last, e.g. ``DJANGO_DB``/``POSTGRE_*`` for a Label Studio on PostgreSQL (the
    inherited ``LABEL_STUDIO_*``/``DJANGO_*`` variables are dropped, these are not)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "DJANGO_")) and k != BATCHED_IMPORT_FLAG}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=USERNAME,
        LABEL_STUDIO_PASSWORD=PASSWORD,
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # org accepts "Authorization: Token <legacy>"
        SSRF_PROTECTION_ENABLED="false",  # else the ML backend's /webhook on 127.0.0.1 is refused
        ML_BLOCK_LOCAL_IP="false",  # else connecting an ML backend on 127.0.0.1 is refused
        LATEST_VERSION_CHECK="false",  # no call to PyPI at start
        LOG_LEVEL="WARNING",
    )
    if batched_import:
        env[BATCHED_IMPORT_FLAG] = "true"
    env.update(extra_env or {})
    return env


def _ls_version() -> str:
    """The installed label-studio version, read from its dist-info beside the binary (no start-up cost)."""
    found = sorted(LS_BIN.resolve().parent.parent.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info") if found else "unknown"


def start_label_studio(data_dir: Path, port: int, log_path: Path, *, batched_import: bool = True,
                       extra_env: Mapping[str, str] | None = None, timeout_s: float = START_TIMEOUT_S
                       ) -> subprocess.Popen[bytes]:
    """Start ``label-studio start`` on 127.0.0.1:port and wait until /health answers.

    ``extra_env`` goes to ``ls_env`` (e.g. a PostgreSQL database); ``timeout_s`` bounds the wait, which
    includes migrating an empty database at a first start."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir)],
        env=ls_env(data_dir, batched_import, extra_env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}; the end of {log_path}:\n"
                               + log_tail(log_path))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"label-studio did not answer /health in {timeout_s}s; the end of {log_path}:\n"
                       + log_tail(log_path))


def log_tail(log_path: Path, lines: int = 15) -> str:
    """The last lines of a log, so that a failure in CI says why without the file."""
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group we started, politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def migrated_template(tmp_root: Path) -> Path:
    """A migrated data dir with the admin user and token, built once and cached."""
    template = TEMPLATE_ROOT / _ls_version()
    if (template / "label_studio.sqlite3").exists():
        return template
    build = tmp_root / "ls-template-build"
    build.mkdir(parents=True)
    proc = start_label_studio(build, free_port(), tmp_root / "ls-template.log")
    stop(proc)
    template.parent.mkdir(parents=True, exist_ok=True)
    staging = template.with_name(template.name + f".tmp{os.getpid()}")
    shutil.copytree(build, staging)
    try:
        staging.rename(template)
    except OSError:  # another session won the race; its copy is as good
        shutil.rmtree(staging, ignore_errors=True)
    return template


def _serve(tmp_path_factory: pytest.TempPathFactory, batched_import: bool) -> Iterator[LabelStudioServer]:
    if not LS_BIN.exists():
        pytest.skip(f"{LS_BIN} is absent: create it with `python -m venv .venv-ls && "
                    ".venv-ls/bin/pip install -r requirements-label-studio.txt` (scripts/setup.sh does)")
    root = tmp_path_factory.mktemp("label-studio")
    data_dir = root / "data"
    shutil.copytree(migrated_template(root), data_dir)
    port = free_port()
    log_path = root / "label-studio.log"
    proc = start_label_studio(data_dir, port, log_path, batched_import=batched_import)
    try:
        yield LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, USERNAME, PASSWORD, data_dir, log_path,
                                batched_import)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio as shipped, batched prediction import on (skipped only when the binary is absent)."""
    yield from _serve(tmp_path_factory, batched_import=True)


@pytest.fixture(scope="session")
def label_studio_default_import(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A second real Label Studio with its default prediction import (each request one transaction)."""
    yield from _serve(tmp_path_factory, batched_import=False)


def feature_flags(ls: LabelStudioServer) -> dict[str, object]:
    """The feature flags the running Label Studio reports at ``/feature-flags/`` (after a session login)."""
    with httpx.Client(base_url=ls.url, follow_redirects=True, timeout=30) as http:
        http.get("/user/login/")
        resp = http.post("/user/login/", data={"email": ls.username, "password": ls.password,
                                               "csrfmiddlewaretoken": http.cookies.get("csrftoken", "")},
                         headers={"Referer": f"{ls.url}/user/login/"})
        resp.raise_for_status()
        page = http.get("/feature-flags/")
        page.raise_for_status()
    return json.loads(page.text.removeprefix("<pre>").removesuffix("</pre>"))
