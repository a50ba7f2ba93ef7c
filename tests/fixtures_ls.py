"""Session fixture: a real Label Studio (``.venv-ls/bin/label-studio``) on 127.0.0.1 with SQLite in a temp dir.

The first start migrates an empty database (~2 min); that migrated data dir is cached under
``~/.cache/freeal-ls-template/<version>`` and copied for later sessions, which then start in seconds.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("FREEAL_LS_BIN", ROOT / ".venv-ls" / "bin" / "label-studio"))
TEMPLATE_ROOT = Path(os.environ.get("FREEAL_LS_TEMPLATE", Path.home() / ".cache" / "freeal-ls-template"))
USERNAME = "admin@example.com"
PASSWORD = "freeal-test-pass"
TOKEN = "freeal0test0legacy0token0123456789"
START_TIMEOUT_S = 420


@dataclass(frozen=True)
class LabelStudioServer:
    """A running Label Studio: base URL, admin credentials and a legacy API token."""

    url: str
    token: str
    username: str
    password: str
    data_dir: Path
    log_path: Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ls_env(data_dir: Path) -> dict[str, str]:
    """Environment for a local test Label Studio that may call an ML backend on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
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
    return env


def _ls_version() -> str:
    """The installed label-studio version, read from its dist-info beside the binary (no start-up cost)."""
    found = sorted(LS_BIN.resolve().parent.parent.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info") if found else "unknown"


def start_label_studio(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``label-studio start`` on 127.0.0.1:port and wait until /health answers."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir)],
        env=ls_env(data_dir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"label-studio did not answer /health in {START_TIMEOUT_S}s; see {log_path}")


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


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio for this test session (skipped only when the binary is absent)."""
    if not LS_BIN.exists():
        pytest.skip(f"{LS_BIN} is absent: create it with `python -m venv .venv-ls && "
                    ".venv-ls/bin/pip install label-studio==1.23.2`")
    root = tmp_path_factory.mktemp("label-studio")
    data_dir = root / "data"
    shutil.copytree(migrated_template(root), data_dir)
    port = free_port()
    log_path = root / "label-studio.log"
    proc = start_label_studio(data_dir, port, log_path)
    try:
        yield LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, USERNAME, PASSWORD, data_dir, log_path)
    finally:
        stop(proc)
