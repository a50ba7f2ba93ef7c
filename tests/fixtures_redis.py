"""Session fixture: a real ``redis-server`` (Debian's package, installed by scripts/setup.sh) on 127.0.0.1."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures_ls import free_port, stop

START_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/0`` of a redis-server for this session (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is absent: scripts/setup.sh installs Debian's package as root "
                    "(apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the redis client is absent: pip install -r requirements.txt")
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(root), "--logfile", str(root / "redis.log")],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {root / 'redis.log'}") from None
                time.sleep(0.1)
        yield url
    finally:
        client.close()
        stop(proc)


@pytest.fixture
def queue_url(redis_url: str) -> str:
    """The session's Redis, emptied for this test (queues, locks and counters of earlier tests are gone)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url
