"""The HTTP endpoints under bad input, concurrency and auth (Flask's test client over ``create_app``).

Bad input must get a clear 4xx JSON error, never a 500 or a stack trace; concurrent ``/predict`` and
``/webhook`` calls must not corrupt state nor start two jobs of one project (the job is single-flight,
checked against a real local stand-in for Label Studio that counts requests in flight); basic auth is
enforced when configured; API keys never appear in responses or logs.

The LLM is the fake OpenAI-compatible server (real HTTP), so ``/predict`` on unseen tasks runs the real
client path quickly.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from freeal_backend.config import Settings
from freeal_backend.llm.embedded import stop_process
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.label_config import parse_label_config
from freeal_backend.labelstudio.label_results import render_prediction
from freeal_backend.labelstudio.runs import with_people_labels
from freeal_backend.labelstudio.server import create_app
from freeal_backend.records import ItemResult
from tests.fake_openai import MODEL, FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = (ROOT / "label_config" / "sentiment.xml").read_text(encoding="utf-8")
LABELS = ["positive", "negative"]
LLM_KEY = "sk-SECRET-llm-key-0123456789"
LS_KEY = "lsk-SECRET-label-studio-9876543210"

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ANY_CHAR = st.characters(codec=None, categories=None)
TEXTS = st.one_of(st.text(ANY_CHAR, max_size=80), st.sampled_from([
    "\u05e9\u05dc\u05d5\u05dd", "zero\u200bwidth", "\U0001F600\U0001F44D\U0001F3FD", "\ud800 lone surrogate",
    "nul\x00byte", "\u202eRTL override", "a great film", "a boring film", " ", ""]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) | TEXTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["project", "tasks", "id", "data", "text", "label_config", "action", "annotation", "result", "schema",
         "extra_params", "task", "choices", "value", "from_name", "x"]) | TEXTS, inner, max_size=4),
    max_leaves=10)
SCHEMAS = st.one_of(st.just(SENTIMENT), TEXTS, st.sampled_from([
    "<View><Text name='t' value='$text'/></View>",  # no Choices
    "<View><Text name='t' value='$text'/><Choices name='a' toName='t'><Choice value='x'/><Choice value='y'/>"
    "</Choices><Choices name='b' toName='t'><Choice value='p'/><Choice value='q'/></Choices></View>",  # two
    "<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='PER'/></Labels></View>",
    "<View><Text name='t' value='$text'/><Choices name='a' toName='t'></Choices></View>",  # no choices
    "<View><Text", "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><View>&a;</View>", "<View>" * 500,
]))


class FakeLabelStudio:
    """A stand-in for Label Studio's API that answers slowly with 401 and counts requests in flight."""

    def __init__(self, delay: float = 0.6) -> None:
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with owner.lock:
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    owner.requests.append((self.command, self.path))
                try:
                    time.sleep(owner.delay)
                    data = b'{"detail": "Invalid token."}'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            do_GET = do_POST = do_PATCH = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_app(data_dir: Path, fake_llm: FakeOpenAI, **server_kw: Any) -> Flask:
    settings_ = Settings(slm_min_steps=0, data_dir=data_dir, llm_base_url=fake_llm.base_url, llm_model=MODEL, llm_api_key=LLM_KEY,
                         llm_max_retries=1, llm_timeout=10.0, llm_concurrency=2)
    opts: dict[str, Any] = {"auto_job": False, "predict_budget_s": 20.0}
    opts.update(server_kw)
    return create_app(settings_, ServerSettings(**opts))


def wait_job(app: Flask, pid: int, timeout: float = 30.0) -> None:
    """Wait (bounded) until the project's job, if any, has ended."""
    store = app.extensions["freeal"].store
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.status(pid)
        if row is None or row["state"] not in ("queued", "running"):
            return
        time.sleep(0.05)
    pytest.fail(f"the job of project {pid} did not end within {timeout} s")


def close_app(app: Flask) -> None:
    backend = app.extensions["freeal"]
    with backend.store._lock:
        pids = [r[0] for r in backend.store._db.execute("SELECT project_id FROM jobs")]
    for pid in pids:
        wait_job(app, pid)
    backend.runs.close()


def run_in_threads(worker: Any, n: int, timeout: float = 120.0) -> None:
    """Run ``worker(i)`` for i in range(n) on n threads at once; fail if any is still running after ``timeout``."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeOpenAI) -> Iterator[Flask]:
    application = make_app(tmp_path_factory.mktemp("backend"), fake_llm)
    client = application.test_client()
    assert client.post("/setup", json={"project": "1.1700000000", "schema": SENTIMENT}).status_code == 200
    yield application
    close_app(application)


def assert_clean(resp: Any) -> dict[str, Any]:
    """No 500, a JSON body, an 'error' message on 4xx, and never a stack trace."""
    assert resp.status_code < 500, resp.get_data(as_text=True)[:500]
    body = resp.get_json(silent=True)
    assert isinstance(body, dict), resp.get_data(as_text=True)[:200]
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    if resp.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"]
    return body


# --- fuzz ---------------------------------------------------------------------------------------------------

@FUZZ
@given(path=st.sampled_from(["/setup", "/predict", "/webhook", "/train", "/versions"]), body=JSON_VALUES)
def test_any_json_body_gets_a_clean_answer(app: Flask, path: str, body: Any) -> None:
    client = app.test_client()
    resp = client.get(path, json=body) if path == "/versions" else client.post(path, json=body)
    assert_clean(resp)


@FUZZ
@given(path=st.sampled_from(["/setup", "/predict", "/webhook", "/train"]), raw=st.binary(max_size=300),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_malformed_bodies_get_a_clean_400(app: Flask, path: str, raw: bytes, ctype: str) -> None:
    resp = app.test_client().post(path, data=raw, headers={"Content-Type": ctype} if ctype else {})
    assert_clean(resp)


TEXT_VALUES = st.one_of(TEXTS, st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.booleans())
TASKS = st.lists(st.fixed_dictionaries(
    {"id": st.one_of(st.integers(1, 40), st.integers(1, 40), st.text(max_size=3), st.booleans(), st.none())},
    optional={"data": st.one_of(
        st.fixed_dictionaries({"text": TEXT_VALUES}),
        st.fixed_dictionaries({"html": TEXTS}),  # non-text data: no 'text' key at all
        st.fixed_dictionaries({"text": st.sampled_from(["/etc/passwd", "file:///etc/passwd",
                                                        "s3://bucket/key.txt", "../../../etc/shadow"])}),
        st.just("not an object"))}), max_size=5)


VALID_TASKS = st.lists(st.tuples(st.integers(1, 10_000), TEXTS.filter(lambda t: t.strip())), max_size=4,
                       unique_by=lambda t: t[0]).map(lambda ts: [{"id": i, "data": {"text": t}} for i, t in ts])


@FUZZ
@given(tasks=st.one_of(TASKS, VALID_TASKS), with_config=st.booleans())
def test_predict_answers_one_prediction_per_task_or_a_clear_400(app: Flask, tasks: list[dict[str, Any]],
                                                                with_config: bool) -> None:
    body: dict[str, Any] = {"project": "1.1700000000", "tasks": tasks}
    if with_config:
        body["label_config"] = SENTIMENT
    resp = app.test_client().post("/predict", json=body)
    out = assert_clean(resp)
    ids = [t.get("id") for t in tasks]
    valid = (all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(set(ids)) == len(ids)
             and all(isinstance(t.get("data"), dict) for t in tasks))
    event("valid" if valid else "invalid")
    if valid:  # a task without text gets a note, the others their labels (not a 400 for the whole batch)
        assert resp.status_code == 200, out
        assert len(out["results"]) == len(tasks)
        for task, pred in zip(tasks, out["results"]):
            assert 0.0 <= float(pred["score"]) <= 1.0 and isinstance(pred["result"], list) and pred["model_version"]
            text = task["data"].get("text")
            if not (isinstance(text, str) and text.strip()):
                assert pred["score"] == 0.0 and not pred["result"]  # this config has no review controls
    else:
        assert resp.status_code == 400, out


def test_a_task_without_text_does_not_blank_the_batch(app: Flask) -> None:
    """Label Studio stores nothing for any task of a batch /predict refuses: one task without text (an empty
    cell in an imported CSV) left every other selected task without a prediction, and the user with no word."""
    tasks = [{"id": 301, "data": {"text": "a gripping, beautifully made film"}}, {"id": 302, "data": {"text": " "}},
             {"id": 303, "data": {"other": "x"}}, {"id": 304, "data": {"text": "dull and far too long"}}]
    review = (ROOT / "label_config" / "review.xml").read_text(encoding="utf-8")  # its TextArea shows the note
    resp = app.test_client().post("/predict", json={"project": "1.1700000000", "tasks": tasks, "label_config": review})
    out = assert_clean(resp)
    assert resp.status_code == 200, out
    notes = [json.dumps(p["result"]) for p in out["results"]]
    assert [("no text in data['text']" in n) for n in notes] == [False, True, True, False]
    labelled = [[r["value"]["choices"] for r in p["result"] if r["from_name"] == "sentiment"] for p in out["results"]]
    assert [bool(x) for x in labelled] == [True, False, False, True]
    assert all(out["results"][i]["score"] == 0.0 for i in (1, 2))


def test_file_paths_in_task_data_are_text_never_opened(app: Flask, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT", encoding="utf-8")
    tasks = [{"id": 101, "data": {"text": str(secret)}}, {"id": 102, "data": {"text": f"file://{secret}"}}]
    resp = app.test_client().post("/predict", json={"project": 1, "tasks": tasks})
    assert resp.status_code == 200 and "TOP-SECRET-CONTENT" not in resp.get_data(as_text=True)


@FEW
@given(schema=SCHEMAS, extra=st.one_of(st.none(), st.just({"from_name": "a"}), st.just({"from_name": "nope"}),
                                       st.just({"rounds": "x"}), JSON_VALUES))
def test_setup_with_any_label_config_is_accepted_or_refused_clearly(app: Flask, schema: str, extra: Any) -> None:
    resp = app.test_client().post("/setup", json={"project": 7, "schema": schema, "extra_params": extra})
    assert_clean(resp)


def test_several_choices_controls_are_picked_by_name_or_refused_clearly(app: Flask) -> None:
    two = ("<View><Text name='t' value='$text'/><Choices name='a' toName='t'><Choice value='x'/><Choice value='y'/>"
           "</Choices><Choices name='b' toName='t'><Choice value='p'/><Choice value='q'/></Choices></View>")
    client = app.test_client()
    refused = client.post("/setup", json={"project": 8, "schema": two})
    assert refused.status_code == 400 and "from_name" in refused.get_json()["error"]
    picked = client.post("/setup", json={"project": 8, "schema": two, "extra_params": {"from_name": "b"}})
    assert picked.status_code == 200
    none = client.post("/setup", json={"project": 8, "schema": "<View><Text name='t' value='$text'/></View>"})
    assert none.status_code == 400 and "Choices" in none.get_json()["error"]


def test_files_are_written_only_under_the_data_dir(tmp_path: Path, fake_llm: FakeOpenAI,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    app = make_app(data, fake_llm)
    try:
        client = app.test_client()
        assert client.post("/setup", json={"project": 2, "schema": SENTIMENT}).status_code == 200
        tasks = [{"id": 1, "data": {"text": "../../outside.txt"}}, {"id": 2, "data": {"text": "/tmp/x"}}]
        assert client.post("/predict", json={"project": 2, "tasks": tasks}).status_code == 200
        assert client.post("/webhook", json=_annotation_event(9, 1, ["positive"], project=2)).status_code == 200
    finally:
        close_app(app)
    assert not any(cwd.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "data"]
    assert (data / "backend.sqlite").exists()


def test_request_size_limit_gives_413(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm, max_request_mb=0.05)
    try:
        client = app.test_client()
        big = {"project": 1, "tasks": [{"id": 1, "data": {"text": "x" * 100_000}}], "label_config": SENTIMENT}
        for path in ("/predict", "/webhook", "/setup"):
            resp = client.post(path, json=big)
            assert resp.status_code == 413
            assert_clean(resp)
        ok = client.post("/predict", json={"project": 1, "label_config": SENTIMENT,
                                           "tasks": [{"id": 1, "data": {"text": "a great film"}}]})
        assert ok.status_code == 200
    finally:
        close_app(app)


def test_huge_text_within_the_size_limit_is_truncated_not_refused(app: Flask, fake_llm: FakeOpenAI) -> None:
    text = "a great film " * 50_000  # 650 kB
    resp = app.test_client().post("/predict", json={"project": 1, "tasks": [{"id": 300, "data": {"text": text}}]})
    out = assert_clean(resp)
    assert resp.status_code == 200 and len(out["results"]) == 1
    asked = [r for r in fake_llm.records() if r.text and r.text.startswith("a great film a great film")]
    assert asked and all(len(r.text) <= Settings().max_chars for r in asked)


def _annotation_event(ann_id: int, task_id: int, choices: Any, project: int = 1, **extra: Any) -> dict[str, Any]:
    return {"action": "ANNOTATION_CREATED", "project": {"id": project},
            "task": {"id": task_id}, "annotation": {"id": ann_id, "task": task_id, **extra, "result": [
                {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": choices}}]}}


def test_unknown_labels_in_webhook_annotations_are_ignored(app: Flask) -> None:
    client = app.test_client()
    backend = app.extensions["freeal"]
    for ann_id, choices in [(501, ["bogus"]), (502, ["positive", "bogus"]), (503, "positive"), (504, [None, 3]),
                            (505, [{"x": 1}])]:
        assert_clean(client.post("/webhook", json=_annotation_event(ann_id, 900 + ann_id, choices)))
    gold = backend.store.gold(1)
    assert gold.get(1402) == ["positive"]  # the known label of a mixed annotation is kept
    assert all(set(v) <= set(LABELS) for v in gold.values())
    assert not {1401, 1403, 1404, 1405} & set(gold)
    # a prediction for a task whose human label is unknown is FreeAL's own, never the bogus label
    resp = client.post("/predict", json={"project": 1, "tasks": [{"id": 1401, "data": {"text": "a boring film"}}]})
    assert "bogus" not in resp.get_data(as_text=True)


def test_a_persons_multi_label_annotation_shows_every_label(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """An annotation naming two aspects came back from /predict, and from the job's push, with only the first."""
    app = make_app(tmp_path, fake_llm)
    multi = (ROOT / "label_config" / "multilabel.xml").read_text()
    try:
        client = app.test_client()
        assert client.post("/setup", json={"project": 4, "schema": multi}).status_code == 200
        both = _annotation_event(701, 31, ["acting", "music"], project=4)
        both["annotation"]["result"][0]["from_name"] = "aspects"
        assert client.post("/webhook", json=both).status_code == 200
        out = assert_clean(client.post("/predict", json={"project": 4, "tasks": [{"id": 31, "data": {"text": "x"}}]}))
        assert out["results"][0]["result"][0]["value"]["choices"] == ["acting", "music"]
    finally:
        close_app(app)
    # the job: the run keeps the first label as the text's; what it pushes shows both
    run_result = ItemResult("31", "acting", 1.0, {"acting": 1.0, "plot": 0.0, "visuals": 0.0, "music": 0.0},
                            source="human")
    shown = with_people_labels([run_result, ItemResult("32", "plot", 0.8, {"plot": 0.8})], {31: ["acting", "music"]})
    cfg = parse_label_config(multi)
    assert render_prediction(cfg, shown[0], "v")["result"][0]["value"]["choices"] == ["acting", "music"]
    assert shown[1].probs == {"plot": 0.8}


@FEW
@given(event=st.fixed_dictionaries({"action": st.sampled_from(
    ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED", "x"]),
    "project": st.one_of(st.just({"id": 1}), st.just(1), JSON_VALUES)},
    optional={"annotation": JSON_VALUES, "annotations": JSON_VALUES, "task": JSON_VALUES}))
def test_webhook_events_of_any_shape_get_a_clean_answer(app: Flask, event: dict[str, Any]) -> None:
    assert_clean(app.test_client().post("/webhook", json=event))


@pytest.mark.parametrize("event", [
    {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": False}, "task": [None]},
    {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 7}, "task": [None]},
    {"action": "ANNOTATION_UPDATED", "project": {"id": 1}, "annotation": {"id": 7, "task": True}, "task": "x"},
])
def test_annotation_events_whose_task_is_not_an_object_get_a_400(app: Flask, event: dict[str, Any]) -> None:
    """Found by the property test above: a 'task' that is a list made the webhook answer 500."""
    resp = app.test_client().post("/webhook", json=event)
    assert resp.status_code == 400 and "error" in assert_clean(resp)


# --- auth and secrets ----------------------------------------------------------------------------------------

def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_when_configured(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    app = make_app(tmp_path, fake_llm, basic_auth_user="ls", basic_auth_pass="s3cret:pass")
    try:
        client = app.test_client()
        for path in ("/predict", "/setup", "/webhook", "/versions", "/status/1"):
            resp = client.get(path) if path in ("/versions", "/status/1") else client.post(path, json={})
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
            assert "s3cret" not in resp.get_data(as_text=True)
        assert client.get("/health").status_code == 200  # open for the container healthcheck (tests/test_auth.py)
        for user, pw in [("ls", "wrong"), ("LS", "s3cret:pass"), ("", ""), ("ls", "s3cret:pas"), ("ls", "")]:
            assert client.get("/versions", headers=_basic(user, pw)).status_code == 401
        assert client.get("/versions", headers={"Authorization": "Bearer s3cret:pass"}).status_code == 401
        assert client.get("/versions", headers={"Authorization": "Basic !!!notbase64"}).status_code == 401
        good = _basic("ls", "s3cret:pass")
        assert client.get("/versions", headers=good).status_code == 200
        assert client.post("/setup", json={"project": 1, "schema": SENTIMENT}, headers=good).status_code == 200
    finally:
        close_app(app)


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeOpenAI) -> Iterator[Flask]:
    application = make_app(tmp_path_factory.mktemp("auth"), fake_llm, basic_auth_user="ls", basic_auth_pass="pw")
    yield application
    close_app(application)


@FEW
@given(user=st.text(max_size=10), password=st.text(max_size=10))
def test_basic_auth_refuses_any_other_credentials(auth_app: Flask, user: str, password: str) -> None:
    expected = 200 if (user, password) == ("ls", "pw") else 401
    assert auth_app.test_client().get("/versions", headers=_basic(user, password)).status_code == expected


def test_api_keys_never_appear_in_responses_or_logs(tmp_path: Path, fake_llm: FakeOpenAI,
                                                   caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    ls = FakeLabelStudio(delay=0.05)
    app = make_app(tmp_path, fake_llm, auto_job=True)
    bodies: list[str] = []
    try:
        client = app.test_client()
        with caplog.at_level(logging.DEBUG):
            calls = [
                client.post("/setup", json={"project": 3, "schema": SENTIMENT, "hostname": ls.url,
                                            "access_token": LS_KEY}),
                client.post("/predict", json={"project": 3, "tasks": [{"id": 1, "data": {"text": "a great film"}}]}),
                client.post("/webhook", json=_annotation_event(1, 1, ["positive"], project=3)),
                client.post("/train", json={"project": 3}),
            ]
            time.sleep(0.2)
            wait_job(app, 3)
            calls += [client.get("/status/3"), client.get("/health"), client.get("/versions?project=3"),
                      client.post("/setup", json={"project": 3, "schema": "<View", "access_token": LS_KEY})]
        bodies = [r.get_data(as_text=True) for r in calls]
        status = calls[4].get_json()
        assert status["state"] == "failed" and status["message"]  # the job met the 401 and says so
        assert ls.requests, "the job never reached the stand-in Label Studio"
    finally:
        close_app(app)
        ls.stop()
    logged = "\n".join(caplog.text.splitlines()) + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in (LS_KEY, LLM_KEY):
        assert not any(secret in b for b in bodies), "a response echoes an API key"
        assert secret not in logged, "an API key was logged"


def test_retrieve_predictions_retries_a_failed_job(tmp_path: Path, fake_llm: FakeOpenAI,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Label Studio sends /predict only the tasks without a prediction of the version /setup names, and
    /predict's placeholders carry that version: after a failed job (Label Studio or the LLM down for a
    while), *Retrieve Predictions* sent nothing, and nothing started the job again. Label Studio calls
    /setup before every retrieval: a failed job is retried there."""
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.setattr("freeal_backend.labelstudio.server.FAILED_JOB_RETRY_AFTER_S", 0.5)
    ls = FakeLabelStudio(delay=0.01)  # answers 401: each job fails
    app = make_app(tmp_path, fake_llm, auto_job=True)
    setup = {"project": 4, "schema": SENTIMENT, "hostname": ls.url, "access_token": LS_KEY}
    try:
        client = app.test_client()
        assert client.post("/setup", json=setup).status_code == 200
        assert client.post("/predict", json={"project": 4, "tasks": [{"id": 1, "data": {"text": "fine"}}]}
                           ).status_code == 200
        time.sleep(0.2)
        wait_job(app, 4)
        failed = client.get("/status/4").get_json()
        assert failed["state"] == "failed" and "set LABEL_STUDIO_API_KEY" in failed["message"]  # what to check
        reached = len(ls.requests)
        assert client.post("/setup", json=setup).status_code == 200  # at once: someone opens the settings
        wait_job(app, 4)
        assert len(ls.requests) == reached
        time.sleep(0.5)
        assert client.post("/setup", json=setup).status_code == 200  # the next Retrieve Predictions
        time.sleep(0.2)
        wait_job(app, 4)
        assert len(ls.requests) > reached, "the failed job was not started again"
        assert client.get("/status/4").get_json()["state"] == "failed"
        reached = len(ls.requests)
        time.sleep(0.5)
        client.post("/setup", json={**setup, "schema": "<View"})  # a config it refuses starts nothing
        time.sleep(0.2)
        wait_job(app, 4)
        assert len(ls.requests) == reached
    finally:
        close_app(app)
        ls.stop()


def test_a_placeholder_says_why_no_job_will_label_its_task(tmp_path: Path, fake_llm: FakeOpenAI,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A task /predict could not label in time said "queued; the background job will label this task" even
    where no job can run (Label Studio's URL or key not set): it names what is missing instead."""
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    review = (ROOT / "label_config" / "review.xml").read_text(encoding="utf-8")
    app = make_app(tmp_path, fake_llm, auto_job=True, predict_budget_s=0.0)  # no time to ask the LLM
    try:
        client = app.test_client()
        assert client.post("/setup", json={"project": 6, "schema": review}).status_code == 200
        out = client.post("/predict", json={"project": 6, "tasks": [{"id": 1, "data": {"text": "fine"}}]}).get_json()
        note = json.dumps(out["results"][0]["result"])
        assert "no background job runs" in note and "LABEL_STUDIO_URL" in note and "queued" not in note
        assert app.extensions["freeal"].store.status(6) is None  # and none was started
    finally:
        close_app(app)


# --- concurrency and single-flight ---------------------------------------------------------------------------

def test_concurrent_predict_and_webhook_calls_start_one_job_at_a_time(tmp_path: Path, fake_llm: FakeOpenAI,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two app instances (as two gunicorn workers) on one data dir, 8 threads of /predict + /webhook."""
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    ls = FakeLabelStudio(delay=0.6)
    apps = [make_app(tmp_path, fake_llm, auto_job=True), make_app(tmp_path, fake_llm, auto_job=True)]
    errors: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    try:
        setup = apps[0].test_client().post("/setup", json={"project": 5, "schema": SENTIMENT, "hostname": ls.url,
                                                           "access_token": LS_KEY})
        assert setup.status_code == 200

        def worker(n: int) -> None:
            client = apps[n % 2].test_client()
            for k in range(5):
                try:
                    if k % 2:
                        tid = 100 * n + k
                        resp = client.post("/webhook", json=_annotation_event(tid, tid, ["negative"], project=5))
                    else:
                        tasks = [{"id": 1000 + j, "data": {"text": f"text {j}: a great film"}} for j in range(3)]
                        resp = client.post("/predict", json={"project": 5, "tasks": tasks})
                        if resp.status_code == 200:
                            assert len(resp.get_json()["results"]) == 3
                    with lock:
                        statuses.append(resp.status_code)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        run_in_threads(worker, 8)
        wait_job(apps[0], 5)
    finally:
        for app in apps:
            close_app(app)
        ls.stop()
    assert not errors, errors
    assert statuses and all(s == 200 for s in statuses), statuses
    assert ls.requests, "no job ever ran"
    assert ls.max_in_flight == 1, f"{ls.max_in_flight} jobs of one project ran at once"
    db = sqlite3.connect(str(tmp_path / "backend.sqlite"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    gold = {row[0] for row in db.execute("SELECT task_id FROM gold WHERE project_id = 5")}
    assert gold == {100 * n + k for n in range(8) for k in (1, 3)}  # no webhook write was lost
    state = db.execute("SELECT state FROM jobs WHERE project_id = 5").fetchone()[0]
    assert state in ("failed", "done", "queued", "running")
    db.close()


def test_json_bodies_with_lone_surrogates_are_handled(app: Flask) -> None:
    raw = '{"project": 1, "tasks": [{"id": 77, "data": {"text": "bad \\ud800 surrogate, great film"}}]}'
    resp = app.test_client().post("/predict", data=raw, content_type="application/json")
    out = assert_clean(resp)
    assert resp.status_code == 200 and len(out["results"]) == 1
    json.dumps(out)


@pytest.mark.parametrize("fault", ["503", "dead", "garbage"])
def test_predict_answers_every_task_when_the_llm_fails(tmp_path: Path, fault: str) -> None:
    """The LLM endpoint is down or broken: /predict still answers one prediction per task, never a 500."""
    with FakeOpenAI() as llm:
        app = make_app(tmp_path, llm)
        try:
            if fault == "503":
                llm.inject("status", times=1000, status=503)
            elif fault == "garbage":
                llm.inject("garbage", times=1000, body="<html>proxy error</html>")
            else:
                llm.stop()
            tasks = [{"id": i, "data": {"text": f"text {i}, a great film"}} for i in range(1, 9)]
            resp = app.test_client().post("/predict", json={"project": 1, "label_config": SENTIMENT, "tasks": tasks})
            out = assert_clean(resp)
            assert resp.status_code == 200 and len(out["results"]) == len(tasks)
            assert all(p["score"] == 0.0 for p in out["results"])  # queued for the job, not a made-up label
        finally:
            close_app(app)


def test_predict_keeps_its_budget_when_the_llm_hangs(tmp_path: Path) -> None:
    """An endpoint that answers a few tasks and then hangs must not hold /predict past its budget, even
    with a 30 s client timeout and 5 retries (Label Studio gives up after 100 s)."""
    with FakeOpenAI() as llm:
        settings_ = Settings(slm_min_steps=0, data_dir=tmp_path, llm_base_url=llm.base_url, llm_model=MODEL, llm_api_key=LLM_KEY,
                             llm_max_retries=5, llm_timeout=30.0, llm_concurrency=2)
        app = create_app(settings_, ServerSettings(auto_job=False, predict_budget_s=3.0))
        try:
            llm.hold_after(3)
            tasks = [{"id": i, "data": {"text": f"text {i}, a great film"}} for i in range(1, 13)]
            start = time.monotonic()
            resp = app.test_client().post("/predict", json={"project": 1, "label_config": SENTIMENT, "tasks": tasks})
            took = time.monotonic() - start
            out = assert_clean(resp)
            assert resp.status_code == 200 and len(out["results"]) == len(tasks)
            assert took < 3.0 + 5.0, f"/predict took {took:.1f} s with a 3 s budget"
            labelled = [p for p in out["results"] if p["score"] > 0]
            assert len(labelled) == 3  # what was answered before the hang is kept; the rest is queued
        finally:
            llm.release()
            close_app(app)


def test_opening_one_task_waits_for_the_llm_only_briefly(tmp_path: Path) -> None:
    """Label Studio asks /predict for one task when a person opens a task without predictions, and shows the
    task only after the answer: with a hanging endpoint that person waited the whole 60 s budget. One task
    gets FREEAL_OPEN_TASK_BUDGET_S (here 2 s) and a placeholder; a page of tasks keeps the full budget."""
    with FakeOpenAI() as llm:
        settings_ = Settings(slm_min_steps=0, data_dir=tmp_path, llm_base_url=llm.base_url, llm_model=MODEL,
                             llm_api_key=LLM_KEY, llm_max_retries=5, llm_timeout=30.0, llm_concurrency=2)
        app = create_app(settings_, ServerSettings(auto_job=False, predict_budget_s=30.0, open_task_budget_s=2.0))
        try:
            llm.hold_after(0)
            start = time.monotonic()
            resp = app.test_client().post("/predict", json={"project": 1, "label_config": SENTIMENT, "tasks": [
                {"id": 1, "data": {"text": "a great film"}}]})
            took = time.monotonic() - start
            out = assert_clean(resp)
            assert resp.status_code == 200 and len(out["results"]) == 1 and out["results"][0]["score"] == 0
            assert took < 2.0 + 4.0, f"/predict of one task took {took:.1f} s with a 2 s open-task budget"
        finally:
            llm.release()
            close_app(app)
    assert ServerSettings.from_env().open_task_budget_s == 10.0


def test_gunicorn_two_workers_run_one_job_per_project_and_log_no_keys(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    """The real server: gunicorn, 2 worker processes x 4 threads, concurrent /predict + /webhook over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ls = FakeLabelStudio(delay=0.5)
    log_path = tmp_path / "gunicorn.log"
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), WORKERS="2", THREADS="4", LOG_LEVEL="DEBUG",
               FREEAL_DATA_DIR=str(tmp_path / "data"), FREEAL_AUTO_JOB="1", LLM_BASE_URL=fake_llm.base_url,
               LLM_MODEL=MODEL, LLM_API_KEY=LLM_KEY, LLM_MAX_RETRIES="1", HF_HUB_OFFLINE="1")
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(var, None)
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen([str(gunicorn), "-c", str(ROOT / "gunicorn.conf.py"), "freeal_backend.labelstudio.wsgi:app"],
                            cwd=tmp_path, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)

    def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.3)
        assert call("POST", "/setup", {"project": 5, "schema": SENTIMENT, "hostname": ls.url,
                                       "access_token": LS_KEY})[0] == 200

        def worker(n: int) -> None:
            for k in range(4):
                try:
                    if k % 2:
                        tid = 100 * n + k
                        status, _ = call("POST", "/webhook", _annotation_event(tid, tid, ["negative"], project=5))
                    else:
                        tasks = [{"id": 1000 + j, "data": {"text": f"text {j}: a great film"}} for j in range(3)]
                        status, body = call("POST", "/predict", {"project": 5, "tasks": tasks})
                        assert status != 200 or len(body["results"]) == 3
                    with lock:
                        statuses.append(status)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        run_in_threads(worker, 8)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # let the job (and any rerun it was asked for) end
            status, row = call("GET", "/status/5")
            if status == 200 and row["state"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        final = call("GET", "/status/5")[1]
    finally:
        stop_process(proc, timeout=30)
        ls.stop()
    log_text = log_path.read_text(errors="replace")
    assert not errors, errors
    assert len(statuses) == 32 and all(s == 200 for s in statuses), statuses
    assert ls.requests and ls.max_in_flight == 1, f"{ls.max_in_flight} jobs of one project ran at once"
    assert final["state"] == "failed" and final["message"]  # the stand-in refused the token: a visible state
    db = sqlite3.connect(str(tmp_path / "data" / "backend.sqlite"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert {r[0] for r in db.execute("SELECT task_id FROM gold WHERE project_id = 5")} == {
        100 * n + k for n in range(8) for k in (1, 3)}
    db.close()
    assert "Traceback" not in log_text or "FreeAL job failed" in log_text  # only the job's own visible failure
    assert LS_KEY not in log_text and LLM_KEY not in log_text


def test_predict_answers_from_stored_results_in_task_order_without_llm_calls(tmp_path: Path,
                                                                             fake_llm: FakeOpenAI) -> None:
    """A finished run's results answer /predict directly (600 tasks: more than one SQLite IN-chunk)."""
    from freeal_backend.records import ItemResult
    from freeal_backend.storage import Store

    store = Store(tmp_path / "project-4" / "state.sqlite")
    store.set_meta("labels", LABELS)
    store.set_results([ItemResult(str(t), LABELS[t % 2], 0.9, {LABELS[t % 2]: 0.9, LABELS[1 - t % 2]: 0.1})
                       for t in range(1, 1001)])
    store.close()
    app = make_app(tmp_path, fake_llm)
    try:
        before = len(fake_llm.records())
        ids = list(range(1000, 400, -1))  # 600 tasks, reversed order
        tasks = [{"id": t, "data": {"text": f"task {t}"}} for t in ids]
        resp = app.test_client().post("/predict", json={"project": 4, "label_config": SENTIMENT, "tasks": tasks})
        out = assert_clean(resp)
        assert resp.status_code == 200 and len(out["results"]) == 600
        got = [p["result"][0]["value"]["choices"][0] for p in out["results"] if p["result"]]
        assert got == [LABELS[t % 2] for t in ids]
        assert len(fake_llm.records()) == before  # nothing was asked of the LLM
    finally:
        close_app(app)


def test_load_predict_benchmark_runs_on_a_tiny_load(tmp_path: Path) -> None:
    """benchmarks/load_predict.py end to end on a tiny load (so it cannot rot); numbers are not checked."""
    out = tmp_path / "load.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_predict.py"), "--requests", "20",
                           "--concurrency", "2", "--tasks-per-request", "3", "--cached-tasks", "50", "--warmup", "2",
                           "--time-cap-s", "30", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = out.read_text(encoding="utf-8")
    assert "| 3 | 20 | 0 |" in table and "p99 ms" in table
