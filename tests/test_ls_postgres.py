"""Pushing predictions into a real Label Studio 1.23 on PostgreSQL (a throwaway server, ``tests/fixtures_postgres.py``).

Slow: Label Studio migrates the empty PostgreSQL database at its first start (minutes on 2 shared cores).
Run it with ``.venv/bin/python -m pytest -m slow tests/test_ls_postgres.py``.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio

from freeal_backend.labelstudio.client import Connection, ProjectClient
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.push import PushJournal, push_results
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.records import ItemResult
from tests.fixtures_ls import LS_BIN, TOKEN, free_port, start_label_studio, stop
from tests.fixtures_postgres import PG_LS_START_TIMEOUT_S, postgres_available, throwaway_postgres

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = (ROOT / "label_config" / "sentiment.xml").read_text()


def _need_postgres_stack() -> None:
    if not LS_BIN.exists():
        pytest.skip(f"{LS_BIN} is absent (scripts/setup.sh installs Label Studio into .venv-ls)")
    if not postgres_available():
        pytest.skip("PostgreSQL's initdb/postgres are absent (set FREEAL_PG_BIN to their folder)")
    driver = subprocess.run([str(LS_BIN.parent / "python"), "-c", "import psycopg"], capture_output=True)
    if driver.returncode != 0:
        pytest.skip(f"no PostgreSQL driver in {LS_BIN.parent.parent}: pip install 'psycopg[binary]==3.3.9' there")


@pytest.mark.slow
@pytest.mark.ls
def test_push_results_into_label_studio_on_postgres(tmp_path: Path) -> None:
    """Two pushes as the job does them: the second version replaces the first, counts read back from Label Studio."""
    _need_postgres_stack()
    n = 9
    with throwaway_postgres() as pg:
        data_dir = tmp_path / "ls"
        data_dir.mkdir()
        port = free_port()
        log_path = tmp_path / "label-studio.log"
        proc = start_label_studio(data_dir, port, log_path, extra_env=pg.label_studio_env(),
                                  timeout_s=PG_LS_START_TIMEOUT_S)
        try:
            url = f"http://127.0.0.1:{port}"
            sdk = LabelStudio(base_url=url, api_key=TOKEN)
            project = sdk.projects.create(title="postgres push", label_config=SENTIMENT)
            sdk.projects.import_tasks(id=project.id, request=[{"text": f"review {i}"} for i in range(n)])
            client = ProjectClient(Connection(url, TOKEN), project.id)
            cfg = parse_label_config(client.label_config())
            task_ids = [t.task_id for t in client.iter_tasks(cfg, page_size=4)]
            assert len(task_ids) == n
            results = [ItemResult(str(t), "positive" if t % 2 else "negative", 0.8,
                                  {"positive": 0.8, "negative": 0.2}, suspicious=t % 3 == 0) for t in task_ids]
            journal = PushJournal(JobStore(tmp_path / "backend.sqlite"), project.id)
            push_results(client, cfg, results, "freeal-r0-pg", journal, batch=4)
            assert client.model_versions() == {"freeal-r0-pg": n}
            flagged = push_results(client, cfg, results, "freeal-r1-pg", journal, batch=4)
            assert client.model_versions() == {"freeal-r1-pg": n}
            assert flagged == sum(t % 3 == 0 for t in task_ids)
            assert sdk.projects.get(id=project.id).model_version == "freeal-r1-pg"
        finally:
            stop(proc)
        # and they are in PostgreSQL (asked with Label Studio's own driver), not in a SQLite file
        query = ("import psycopg, sys; c = psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), user='postgres', "
                 "dbname='postgres'); print(c.execute(\"SELECT model_version, count(*) FROM prediction "
                 "GROUP BY model_version\").fetchall())")
        rows = subprocess.run([str(LS_BIN.parent / "python"), "-c", query, pg.host, str(pg.port)],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert rows == f"[('freeal-r1-pg', {n})]"
        assert not list(data_dir.rglob("*.sqlite3"))
