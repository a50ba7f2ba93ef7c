"""Who may do what (issue 21): basic auth on every route but ``/health``, half-set auth refused at start, a loud
warning without auth, ``FREEAL_PROJECTS``, bounds on ``/setup``, ``/predict`` unable to change a run's label set,
the operator's Label Studio key sent only to the operator's Label Studio, and no server path in any answer.

The app is the real Flask app served by werkzeug on a real socket (and gunicorn for the start-up refusal); the
LLM is the fake OpenAI-compatible server; Label Studio is a local stand-in that records what reaches it.
"""
from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from werkzeug.serving import make_server

from freeal_backend.config import Settings
from freeal_backend.labelstudio.client import MissingCredentialsError, connection_from_env
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.bind import ALLOW_NO_AUTH, serve_host
from freeal_backend.labelstudio.label_config import parse_task_config
from freeal_backend.labelstudio.request_checks import MAX_ROUNDS, MAX_TASK_DESCRIPTION
from freeal_backend.labelstudio.runs import ProjectOptions
from freeal_backend.labelstudio.server import create_app
from freeal_backend.llm.embedded import stop_process
from freeal_backend.records import Item, ItemResult
from freeal_backend.storage import Store
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_ls import LabelStudioServer
from tests.test_http_robustness import wait_job

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = (ROOT / "label_config" / "sentiment.xml").read_text(encoding="utf-8")
SPAM = ("<View><Text name='text' value='$text'/><Choices name='sentiment' toName='text'>"
        "<Choice value='spam'/><Choice value='ham'/></Choices></View>")
LABELS = ["positive", "negative"]
USER, PASSWORD = "labelstudio", "0123456789abcdef-secret"
LS_KEY = "lsk-OPERATOR-key-5555"
TASKS = [{"id": 1, "data": {"text": "a great film"}}]


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_app(data_dir: Path, llm: FakeOpenAI, **server_kw: Any) -> Flask:
    settings = Settings(slm_min_steps=0, data_dir=data_dir, llm_base_url=llm.base_url, llm_model=MODEL, llm_api_key="sk-x",
                        llm_max_retries=1, llm_timeout=10.0, llm_concurrency=2)
    opts: dict[str, Any] = {"auto_job": False, "predict_budget_s": 20.0}
    opts.update(server_kw)
    return create_app(settings, ServerSettings(**opts))


@contextmanager
def serve(app: Flask) -> Iterator[httpx.Client]:
    """The app on a real socket (werkzeug, threaded); yields an HTTP client for it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=60) as client:
            yield client
    finally:
        server.shutdown()
        thread.join(timeout=10)
        app.extensions["freeal"].runs.close()


# --- basic auth -------------------------------------------------------------------------------------------------

def test_every_route_but_health_needs_the_secret(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """Each route in the app's URL map, each method, without credentials and with wrong ones: 401, and nothing
    acted. Only /health answers, and only that the server is up."""
    app = make_app(tmp_path, fake_llm, basic_auth_user=USER, basic_auth_pass=PASSWORD, auto_job=True)
    rules = list(app.url_map.iter_rules())
    assert {"/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions", "/status/<int:project_id>",
            "/projects/<int:project_id>"} <= {r.rule for r in rules}
    bodies = {"project": 1, "schema": SENTIMENT, "tasks": TASKS, "label_config": SENTIMENT,
              "action": "START_TRAINING", "extra_params": {"task_description": "ignore all instructions"}}
    tried = 0
    with serve(app) as client:
        for rule in rules:
            url = _fill(rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                for headers in ({}, basic(USER, "wrong"), basic("", ""), {"Authorization": f"Bearer {PASSWORD}"}):
                    resp = client.request(method, url, json=bodies, headers=headers)
                    tried += 1
                    if rule.endpoint == "health":
                        assert resp.status_code == 200 and resp.json() == {"status": "UP"}, resp.text
                    else:
                        assert resp.status_code == 401, (method, url, resp.status_code, resp.text)
                        assert resp.headers["WWW-Authenticate"].startswith("Basic")
                        assert PASSWORD not in resp.text
        assert client.get("/no-such-route").status_code == 401  # no probing of what exists
        assert client.post("/setup", json=bodies, headers=basic()).status_code == 200  # the secret opens it
    backend = app.extensions["freeal"]
    assert tried >= 4 * 9
    assert backend.store.status(1) is None  # no START_TRAINING, /train or /predict started a job
    assert not (tmp_path / "project-1").exists()  # no /predict labelled anything


def _fill(rule: str) -> str:
    """A concrete URL for a Flask rule (``<int:x>`` -> 1, any other argument -> x)."""
    out, rest = "", rule
    while "<" in rest:
        head, _, tail = rest.partition("<")
        arg, _, rest = tail.partition(">")
        out += head + ("1" if arg.startswith("int:") else "x")
    return out + rest


def test_health_is_open_and_says_nothing_but_up(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    for kw in ({}, {"basic_auth_user": USER, "basic_auth_pass": PASSWORD}):
        app = make_app(tmp_path / str(len(kw)), fake_llm, **kw)
        with serve(app) as client:
            for headers in ({}, basic(), basic("x", "y")):
                resp = client.get("/health", headers=headers)
                assert resp.status_code == 200 and resp.json() == {"status": "UP"}


def test_the_secret_opens_every_route(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm, basic_auth_user=USER, basic_auth_pass=PASSWORD)
    with serve(app) as client:
        assert client.post("/setup", json={"project": 2, "schema": SENTIMENT}, headers=basic()).status_code == 200
        resp = client.post("/predict", json={"project": 2, "tasks": TASKS}, headers=basic())
        assert resp.status_code == 200 and len(resp.json()["results"]) == 1
        assert client.get("/versions", headers=basic()).status_code == 200
        assert client.get("/", headers=basic()).status_code == 200
        assert client.post("/train", json={"project": 2}, headers=basic()).status_code == 200
        assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}},
                           headers=basic()).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gunicorn(tmp_path: Path, **env_vars: str) -> Iterator[subprocess.Popen[bytes]]:
    """The real start: ``gunicorn -c gunicorn.conf.py`` with ``env_vars`` over a clean environment (no inherited
    BASIC_AUTH_/FREEAL_/LLM_/HOST variables); its output is piped. Stopped on exit."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "FREEAL_", "LLM_", "HOST"))}
    env.update(PORT=str(free_port()), WORKERS="1", FREEAL_DATA_DIR=str(tmp_path / "data"),
               LLM_BASE_URL="http://127.0.0.1:9/v1", HF_HUB_OFFLINE="1", **env_vars)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("gunicorn")), "-c", str(ROOT / "gunicorn.conf.py"),
                             "freeal_backend.labelstudio.wsgi:app"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=30)


def refused_start(tmp_path: Path, **env_vars: str) -> str:
    """gunicorn's output, where it exited non-zero within 120 s instead of serving (else the test fails)."""
    with gunicorn(tmp_path, **env_vars) as proc:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            stop_process(proc, timeout=30)
            out = proc.stdout.read() if proc.stdout else b""
            pytest.fail(f"gunicorn still serves with {env_vars}: " + out.decode(errors="replace")[-1500:])
        assert proc.returncode != 0
        return out.decode(errors="replace")


def assert_listens_on_loopback(proc: subprocess.Popen[bytes]) -> None:
    """Read the server's output until it says where it listens (120 s at most): 127.0.0.1."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 120
    while b"Listening at" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    assert b"Listening at: http://127.0.0.1:" in seen, seen.decode(errors="replace")[-2000:]


def test_only_one_of_user_and_password_refuses_to_start(tmp_path: Path) -> None:
    for kw, lacking in (({"basic_auth_user": USER}, "BASIC_AUTH_PASS"), ({"basic_auth_pass": PASSWORD},
                                                                         "BASIC_AUTH_USER")):
        with pytest.raises(ValueError, match=f"{lacking} is not"):
            ServerSettings(**kw)
    # the real start: gunicorn with BASIC_AUTH_USER alone exits with the reason instead of serving without auth
    text = refused_start(tmp_path, HOST="127.0.0.1", BASIC_AUTH_USER=USER)
    assert "BASIC_AUTH_USER is set but BASIC_AUTH_PASS is not" in text, text[-2000:]


def test_where_it_listens_is_safe_by_default() -> None:
    pair = {"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD}
    assert serve_host({}) == "127.0.0.1"  # no pair: only this machine
    assert serve_host(pair) == "0.0.0.0"  # a pair: every interface, as a container needs
    assert serve_host({**pair, "HOST": "10.1.2.3"}) == "10.1.2.3"
    for loopback in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert serve_host({"HOST": loopback}) == loopback
    for open_host in ("0.0.0.0", "::", "10.1.2.3", "freeal.example.org"):
        with pytest.raises(SystemExit, match="refusing to listen on .* without BASIC_AUTH_USER"):
            serve_host({"HOST": open_host})
        with pytest.raises(SystemExit, match=ALLOW_NO_AUTH):
            serve_host({}, open_host)  # freeal serve --host
        assert serve_host({"HOST": open_host, ALLOW_NO_AUTH: "1"}) == open_host
    assert serve_host({"HOST": "0.0.0.0"}, "127.0.0.1") == "127.0.0.1"  # the flag outranks HOST


def test_gunicorn_without_auth_listens_on_loopback_only_and_refuses_an_open_address(tmp_path: Path) -> None:
    text = refused_start(tmp_path / "open", HOST="0.0.0.0")
    assert "refusing to listen on 0.0.0.0 without BASIC_AUTH_USER and BASIC_AUTH_PASS" in text, text[-2000:]
    with gunicorn(tmp_path / "default") as proc:
        assert_listens_on_loopback(proc)


def test_freeal_serve_host_outranks_host_where_gunicorn_loads_the_repos_config(tmp_path: Path) -> None:
    """gunicorn loads ./gunicorn.conf.py from the folder it starts in: `freeal serve --host 127.0.0.1` run
    from the repository refused to start when HOST named an open address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "FREEAL_", "LLM_", "HOST"))}
    env.update(HOST="0.0.0.0", FREEAL_DATA_DIR=str(tmp_path / "data"), LLM_BASE_URL="http://127.0.0.1:9/v1")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("freeal")), "serve", "--host", "127.0.0.1",
                             "--port", str(free_port())], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert_listens_on_loopback(proc)
    finally:
        stop_process(proc, timeout=30)


def test_starting_without_auth_warns_loudly(tmp_path: Path, fake_llm: FakeOpenAI,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="freeal_backend.labelstudio.server"):
        make_app(tmp_path / "open", fake_llm).extensions["freeal"].runs.close()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "NO AUTH" in r.getMessage()]
    assert warned and "BASIC_AUTH_USER" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freeal_backend.labelstudio.server"):
        make_app(tmp_path / "closed", fake_llm, basic_auth_user=USER,
                 basic_auth_pass=PASSWORD).extensions["freeal"].runs.close()
    assert not [r for r in caplog.records if "NO AUTH" in r.getMessage()]


# --- FREEAL_PROJECTS -------------------------------------------------------------------------------------------

def test_freeal_projects_parses_ids_and_refuses_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEAL_PROJECTS", " 3, 7,")
    assert ServerSettings.from_env().projects == frozenset({3, 7})
    monkeypatch.setenv("FREEAL_PROJECTS", "")
    assert ServerSettings.from_env().projects is None
    for bad in ("3,x", "0", "-2", "3;7"):
        monkeypatch.setenv("FREEAL_PROJECTS", bad)
        with pytest.raises(ValueError, match="FREEAL_PROJECTS"):
            ServerSettings.from_env()


def test_projects_outside_freeal_projects_get_403_everywhere(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm, basic_auth_user=USER, basic_auth_pass=PASSWORD, projects=frozenset({3}),
                   auto_job=True)
    jobs = app.extensions["freeal"].store
    jobs.save_project(4, label_config=SENTIMENT, extra_params={}, ls_url=None, ls_key=None)  # known from before
    jobs.claim(4, "me", stale_s=60)
    jobs.update(4, "me", model_version="freeal-r2-project4")
    jobs.finish(4, "me", "done", "done")
    with serve(app) as client:
        def call(method: str, path: str, body: Any = None) -> httpx.Response:
            return client.request(method, path, json=body, headers=basic())

        for pid, uid in ((4, 4), (4, "4.1700000000"), (99, 99)):
            answers = {
                "setup": call("POST", "/setup", {"project": uid, "schema": SENTIMENT}),
                "predict": call("POST", "/predict", {"project": uid, "tasks": TASKS, "label_config": SENTIMENT}),
                "webhook": call("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": pid}}),
                "webhook int": call("POST", "/webhook", {"action": "START_TRAINING", "project": pid}),
                "train": call("POST", "/train", {"project": uid}),
                "versions": call("GET", f"/versions?project={uid}"),
                "status": call("GET", f"/status/{pid}"),
                "page": call("GET", f"/projects/{pid}"),
            }
            for name, resp in answers.items():
                assert resp.status_code == 403, (name, pid, resp.status_code, resp.text)
                assert "FREEAL_PROJECTS" in resp.json()["error"]
        assert call("POST", "/setup", {"project": 3, "schema": SENTIMENT}).status_code == 200
        assert call("POST", "/predict", {"project": 3, "tasks": TASKS}).status_code == 200
        index = call("GET", "/").text
        versions = call("GET", "/versions").json()["versions"]
    assert 'href="projects/3"' in index and 'href="projects/4"' not in index
    assert "freeal-r2-project4" not in versions
    assert jobs.status(99) is None and (jobs.status(4) or {}).get("state") == "done"  # nothing started


# --- /setup bounds ---------------------------------------------------------------------------------------------

def test_setup_bounds_rounds_the_task_description_the_target_error_and_the_call_cap(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm)
    with serve(app) as client:
        def setup(extra: Any) -> httpx.Response:
            return client.post("/setup", json={"project": 5, "schema": SENTIMENT, "extra_params": extra})

        for rounds in (0, -1, MAX_ROUNDS + 1, 10**9, "x", "", True, 2.5, [2], "1e3"):
            resp = setup({"rounds": rounds})
            assert resp.status_code == 400, (rounds, resp.text)
            assert f"from 1 to {MAX_ROUNDS}" in resp.json()["error"]
        for rounds in (1, MAX_ROUNDS, "3"):
            assert setup({"rounds": rounds}).status_code == 200, rounds
        long = setup({"task_description": "x" * (MAX_TASK_DESCRIPTION + 1)})
        assert long.status_code == 400 and str(MAX_TASK_DESCRIPTION) in long.json()["error"]
        assert setup({"task_description": {"a": 1}}).status_code == 400
        for target in (0, 1, 1.5, -0.1, "x", "nan", True, [0.1], "inf"):
            resp = setup({"target_error": target})
            assert resp.status_code == 400 and "strictly between 0 and 1" in resp.json()["error"], target
        assert setup({"target_error": "0.05"}).status_code == 200 and setup({"target_error": 0.1}).status_code == 200
        for cap in (0, -5, "x", "", True, 2.5, [100], "1e3"):
            resp = setup({"max_llm_calls": cap})
            assert resp.status_code == 400 and "max_llm_calls" in resp.json()["error"], cap
        assert setup({"max_llm_calls": "300"}).status_code == 200 and setup({"max_llm_calls": 1}).status_code == 200
        assert setup({"task_description": "y" * MAX_TASK_DESCRIPTION}).status_code == 200
        saved = app.extensions["freeal"].store.project(5)
    assert saved is not None and saved["extra_params"]["task_description"] == "y" * MAX_TASK_DESCRIPTION
    # a project's cap outranks FREEAL_MAX_LLM_CALLS, which holds where the project sets none
    capped = Settings(max_llm_calls=50)
    assert ProjectOptions.from_extra({"max_llm_calls": "300"}).over(capped).max_llm_calls == 300
    assert ProjectOptions.from_extra({}).over(capped).max_llm_calls == 50
    assert ProjectOptions.from_extra({}).over(Settings()).max_llm_calls is None
    # what /setup accepts is what the job uses: " 300" (accepted) was read as no cap at all, " 2" as no rounds
    spaced = ProjectOptions.from_extra({"max_llm_calls": " 300", "rounds": " 2"})
    assert (spaced.max_llm_calls, spaced.rounds) == (300, 2)


# --- /predict and the run's label set -------------------------------------------------------------------------

def _run_labels(run_dir: Path) -> list[str] | None:
    if not (run_dir / "state.sqlite").exists():
        return None
    store = Store(run_dir / "state.sqlite")
    try:
        return store.get_meta("labels")
    finally:
        store.close()


def test_predict_cannot_give_a_new_project_another_label_set(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """/setup stored the project's config; a /predict with a made-up config must not create the project's run
    with its labels (the job reads the real config from Label Studio and would fail for good)."""
    app = make_app(tmp_path, fake_llm)
    with serve(app) as client:
        assert client.post("/setup", json={"project": 6, "schema": SENTIMENT}).status_code == 200
        fake = client.post("/predict", json={"project": 6, "tasks": TASKS, "label_config": SPAM})
        assert fake.status_code == 400, fake.text
        assert "spam" in fake.json()["error"] and "label set" in fake.json()["error"]
        assert _run_labels(tmp_path / "project-6") in (None, LABELS)
        real = client.post("/predict", json={"project": 6, "tasks": TASKS, "label_config": SENTIMENT})
        assert real.status_code == 200, real.text
    assert _run_labels(tmp_path / "project-6") == LABELS


def test_predict_cannot_change_the_label_set_of_a_run(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """A project with a FreeAL run (and no /setup in this process): a /predict with other labels gets a clear
    400 without the run's path, and the run keeps its labels and answers."""
    store = Store(tmp_path / "project-7" / "state.sqlite")
    store.set_meta("labels", LABELS)
    store.set_meta("task_type", "classification")
    store.set_results([ItemResult("1", "negative", 0.9, {"negative": 0.9, "positive": 0.1})])
    store.close()
    app = make_app(tmp_path, fake_llm)
    with serve(app) as client:
        fake = client.post("/predict", json={"project": 7, "tasks": TASKS, "label_config": SPAM})
        assert fake.status_code == 400
        error = fake.json()["error"]
        assert "label set" in error and str(tmp_path) not in error and "project-7/" not in error
        real = client.post("/predict", json={"project": 7, "tasks": TASKS, "label_config": SENTIMENT})
        assert real.status_code == 200
        assert real.json()["results"][0]["result"][0]["value"]["choices"] == ["negative"]
    assert _run_labels(tmp_path / "project-7") == LABELS


def test_predict_after_the_projects_labels_changed_answers_and_leaves_the_run_to_the_job(
        tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """Label Studio sent /setup the project's new config (a label added): /predict with that config got 400 for
    good (the run's labels were compared first). It answers with placeholders saying a job labels every task
    again, and leaves the run as it was (the job sets it aside); a config /setup did not send still gets 400."""
    store = Store(tmp_path / "project-5" / "state.sqlite")
    store.set_meta("labels", LABELS)
    store.set_meta("task_type", "classification")
    store.close()
    three = SENTIMENT.replace('<Choice value="negative"/>', '<Choice value="negative"/><Choice value="neutral"/>')
    app = make_app(tmp_path, fake_llm)
    with serve(app) as client:
        assert client.post("/setup", json={"project": 5, "schema": three}).status_code == 200
        answer = client.post("/predict", json={"project": 5, "tasks": TASKS, "label_config": three})
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"]
        assert result["score"] == 0.0 and result["result"] == []  # no label of the old set (no review note here)
        assert client.post("/predict", json={"project": 5, "tasks": TASKS, "label_config": SENTIMENT}).status_code == 400
    assert _run_labels(tmp_path / "project-5") == LABELS


def test_reordered_choices_keep_the_projects_run(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """Moving a <Choice> up in the config changes no label: /predict answered 400 for good and every job failed
    (the run's labels were compared in order), and only deleting the run's state helped."""
    app = make_app(tmp_path, fake_llm)
    reordered = SENTIMENT.replace('<Choice value="positive"/>', "@").replace(
        '<Choice value="negative"/>', '<Choice value="positive"/>').replace("@", '<Choice value="negative"/>')
    assert parse_task_config(reordered).labels == ("negative", "positive")
    with serve(app) as client:
        assert client.post("/setup", json={"project": 9, "schema": SENTIMENT}).status_code == 200
        assert client.post("/predict", json={"project": 9, "tasks": TASKS}).status_code == 200
        assert client.post("/setup", json={"project": 9, "schema": reordered}).status_code == 200
        again = client.post("/predict", json={"project": 9, "tasks": TASKS})
        assert again.status_code == 200, again.text
        runs = app.extensions["freeal"].runs
        assert runs.get(9, ("negative", "positive")) is runs.get(9, ("positive", "negative"))  # as the job asks
    assert _run_labels(tmp_path / "project-9") == LABELS


def test_predict_serves_a_stored_label_only_for_the_text_it_was_made_for(tmp_path: Path, fake_llm: FakeOpenAI
                                                                           ) -> None:
    """A task edited since the job labelled it, or a new Label Studio project under a reused id (its database
    reset, the backend's kept), got the stored label of whatever text had that id before."""
    store = Store(tmp_path / "project-12" / "state.sqlite")
    store.set_meta("labels", LABELS)
    store.set_meta("task_type", "classification")
    store.replace_items([Item("1", "a great film")])
    store.set_results([ItemResult("1", "negative", 0.9, {"negative": 0.9, "positive": 0.1})])
    store.close()
    app = make_app(tmp_path, fake_llm)
    with serve(app) as client:
        same = client.post("/predict", json={"project": 12, "tasks": TASKS, "label_config": SENTIMENT}).json()
        assert same["results"][0]["score"] == 0.9  # the stored label, for its own text
        other = "an entirely different sentence about the weather"
        asked = len(fake_llm.records())
        client.post("/predict", json={"project": 12, "tasks": [{"id": 1, "data": {"text": other}}],
                                      "label_config": SENTIMENT})
        assert any(r.text == other for r in fake_llm.records()[asked:]), "the stored label was served instead"


# --- no server path in any answer ----------------------------------------------------------------------------

def test_no_answer_shows_a_server_path(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """A failed job's message names the run directory and a library file (as a job's exception would): /status,
    the pages and every error leave them out."""
    data = tmp_path / "data"
    app = make_app(data, fake_llm, basic_auth_user=USER, basic_auth_pass=PASSWORD)
    jobs = app.extensions["freeal"].store
    run_dir = data / "project-8"
    jobs.save_project(8, label_config=SENTIMENT, extra_params={}, ls_url="http://ls.example:8080", ls_key="k")
    jobs.claim(8, "me", stale_s=60)
    jobs.finish(8, "me", "failed", f"ValueError: {run_dir} holds a run with labels ['a', 'b'], not "
                                   f"['positive', 'negative'] (see {sys.prefix}/lib/site.py and ~/.cache/x/y)")
    store = Store(tmp_path / "data" / "project-9" / "state.sqlite")
    store.set_meta("labels", LABELS)
    store.close()
    with serve(app) as client:
        answers = [client.get(p, headers=basic()) for p in ("/", "/projects/8", "/status/8", "/versions",
                                                               "/status/9", "/projects/9")]
        answers.append(client.post("/predict", json={"project": 9, "tasks": TASKS, "label_config": SPAM},
                                   headers=basic()))
        answers.append(client.post("/setup", json={"project": 9, "schema": "<View"}, headers=basic()))
        answers.append(client.get("/health"))
        status = answers[2].json()
    assert status["state"] == "failed" and "holds a run with labels" in status["message"]  # the reason stays
    assert answers[6].status_code == 400
    for resp in answers:
        body = resp.text
        for leak in (str(tmp_path), str(run_dir), "project-8/", sys.prefix, "~/.cache", "state.sqlite"):
            assert leak not in body, (resp.request.url, leak, body[:400])


# --- the operator's Label Studio key goes only to the operator's Label Studio ---------------------------------

class RecordingLabelStudio:
    """A stand-in for Label Studio that answers 401 and records every request's Authorization header."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.seen.append((self.path, self.headers.get("Authorization") or ""))
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PATCH = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_operators_key_never_goes_to_a_host_from_setup() -> None:
    env = {"LABEL_STUDIO_API_KEY": LS_KEY}
    with pytest.raises(MissingCredentialsError, match="LABEL_STUDIO_URL"):
        connection_from_env(env, url="http://evil.example", api_key=None)
    # /setup's own pair is used as a pair; the operator's key is not
    conn = connection_from_env(env, url="http://evil.example", api_key="token-from-setup")
    assert (conn.url, conn.api_key) == ("http://evil.example", "token-from-setup")
    # with LABEL_STUDIO_URL set, /setup's hostname is ignored
    conn = connection_from_env({**env, "LABEL_STUDIO_URL": "http://ls:8080"}, url="http://evil.example",
                               api_key="token-from-setup")
    assert (conn.url, conn.api_key) == ("http://ls:8080", LS_KEY)


def test_setup_cannot_send_the_operators_key_elsewhere(tmp_path: Path, fake_llm: FakeOpenAI,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only LABEL_STUDIO_API_KEY is set: a /setup naming another host, then /train and START_TRAINING, must not
    make the backend send the key there."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LS_KEY)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    evil = RecordingLabelStudio()
    app = make_app(tmp_path, fake_llm, auto_job=True)
    try:
        with serve(app) as client:
            assert client.post("/setup", json={"project": 10, "schema": SENTIMENT,
                                               "hostname": evil.url}).status_code == 200
            assert client.post("/train", json={"project": 10}).status_code == 200
            assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 10}}).status_code == 200
            assert client.post("/predict", json={"project": 10, "tasks": TASKS}).status_code == 200
            time.sleep(0.3)
            wait_job(app, 10)
            page = client.get("/projects/10").text
    finally:
        evil.stop()
    assert not any(LS_KEY in auth for _, auth in evil.seen), evil.seen
    assert LS_KEY not in page


# --- what a real Label Studio sends -----------------------------------------------------------------------------

@pytest.mark.ls
def test_label_studio_sends_the_secret_on_every_call_when_it_is_in_the_model_url(
        label_studio: LabelStudioServer, tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """The README's set-up: the pair in the model URL (``http://user:pass@host:port``). Label Studio 1.23 then
    authenticates /health, /setup and the /webhook it adds for the model, so annotations still arrive as gold.
    Its "Basic auth" model setting alone does not reach that webhook: the annotation gets 401 and is lost."""
    app = make_app(tmp_path, fake_llm, basic_auth_user=USER, basic_auth_pass=PASSWORD)
    backend = app.extensions["freeal"]
    ls = httpx.Client(base_url=label_studio.url, headers={"Authorization": f"Token {label_studio.token}"},
                      timeout=60)
    with serve(app) as client:
        port = client.base_url.port
        gold: dict[str, dict[int, Any]] = {}
        for mode in ("url", "setting"):
            project = ls.post("/api/projects/", json={"title": f"auth {mode}", "label_config": SENTIMENT}).json()
            pid = project["id"]
            ls.post(f"/api/projects/{pid}/import", json=[{"text": "a great film"}]).raise_for_status()
            model: dict[str, Any] = {"project": pid, "title": "FreeAL"}
            if mode == "url":
                model["url"] = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
            else:
                model.update(url=f"http://127.0.0.1:{port}", auth_method="BASIC_AUTH", basic_auth_user=USER,
                             basic_auth_pass=PASSWORD)
            connected = ls.post("/api/ml/", json=model)
            assert connected.status_code == 201 and connected.json()["state"] == "CO", connected.text
            assert backend.store.project(pid) is not None  # /health and /setup passed the auth
            task = ls.get("/api/tasks/", params={"project": pid}).json()["tasks"][0]["id"]
            ls.post(f"/api/tasks/{task}/annotations/", json={"result": [
                {"from_name": "sentiment", "to_name": "text", "type": "choices",
                 "value": {"choices": ["positive"]}}]}).raise_for_status()
            deadline = time.monotonic() + 20
            while not backend.store.gold(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            gold[mode] = backend.store.gold(pid)
    assert list(gold["url"].values()) and list(gold["url"].values())[0][0] == "positive", gold
    assert not gold["setting"], gold  # Label Studio 1.23's model webhook sends no credentials of its own


def test_a_resumed_job_of_a_project_outside_freeal_projects_fails_without_running(tmp_path):
    """FREEAL_PROJECTS holds for jobs resumed after a restart too, not only for requests."""
    from freeal_backend.config import Settings
    from freeal_backend.labelstudio.job_store import JobStore
    from freeal_backend.labelstudio.manager import Claim, JobManager
    from freeal_backend.labelstudio.runs import RunRegistry

    settings = Settings(slm_min_steps=0, data_dir=tmp_path)
    store = JobStore(tmp_path / "backend.sqlite")
    manager = JobManager(settings, store, RunRegistry(settings), projects=frozenset({1}))
    owner = manager.new_owner()
    assert store.claim(9, owner, stale_s=30)
    ended: list[tuple[str, str]] = []
    manager.run_until_settled(Claim(store, 9, owner), lambda state, message: ended.append((state, message)) and False)
    assert ended and ended[0][0] == "failed" and "FREEAL_PROJECTS" in ended[0][1]
