"""The embedded LLMs: chunked GGUFs are joined and checked before use; the default model serves and labels."""
import dataclasses
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LLMClient
from freeal_backend.config import Settings
from freeal_backend.llm.embedded import (DEFAULT_EMBEDDED, EMBEDDED_MODELS, EmbeddedLLMServer, EmbeddedModel,
                                         TEST_MODEL, confidence_calibrated, embedded_model, join_chunks, model_path)
from freeal_backend.llm.prompts import label_messages
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.label_config import parse_task_config
from freeal_backend.labelstudio.server import create_app
from freeal_backend.loop import FreeALRun


def _chunk_packages(root: Path, parts: list[bytes]) -> list[str]:
    names = []
    for n, data in enumerate(parts, 1):
        pkg = root / f"fake_gguf_part{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(data)
        names.append(pkg.name)
    return names


def test_chunks_are_joined_in_part_order_and_refused_unless_size_magic_and_sha256_match(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]
    monkeypatch.syspath_prepend(str(tmp_path))
    names = _chunk_packages(tmp_path, parts)
    whole = b"".join(parts)
    good = EmbeddedModel("fake", "fake", tuple(names), ("fake==1",), hashlib.sha256(whole).hexdigest(), len(whole))
    target = join_chunks(good, tmp_path / "out" / "fake.gguf")
    assert target.read_bytes() == whole

    wrong_hash = EmbeddedModel("fake", "fake", tuple(names), ("fake==1",), "0" * 64, len(whole))
    with pytest.raises(RuntimeError, match="sha256"):
        join_chunks(wrong_hash, tmp_path / "bad" / "fake.gguf")
    assert not any((tmp_path / "bad").iterdir())  # nothing half-checked is left to be loaded later

    swapped = EmbeddedModel("fake", "fake", tuple(reversed(names)), ("fake==1",), good.sha256, len(whole))
    with pytest.raises(RuntimeError, match="not a GGUF"):
        join_chunks(swapped, tmp_path / "swapped" / "fake.gguf")


def test_unknown_embedded_model_names_the_choices():
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b-instruct"):
        embedded_model("gpt-4o")


def test_default_model_is_verified_qwen_and_labels_plain_sentiment(tmp_path):
    """The default LLM is the checked Qwen2.5-Coder-1.5B file, served through the real openai client."""
    model = EMBEDDED_MODELS[DEFAULT_EMBEDDED]
    path = model_path(DEFAULT_EMBEDDED)
    assert path.stat().st_size == model.size and path.open("rb").read(4) == b"GGUF"
    texts = {"a gorgeous , witty , seductive movie .": "positive",
             "an absolute masterpiece , moving and funny .": "positive",
             "the film is a dull , lifeless mess .": "negative",
             "boring , badly acted and far too long .": "negative"}
    labels = ["negative", "positive"]
    with EmbeddedLLMServer(DEFAULT_EMBEDDED, threads=2, log_path=tmp_path / "server.log") as server:
        client = LLMClient(server.base_url, DEFAULT_EMBEDDED, ResponseCache(tmp_path / "cache.sqlite"),
                           concurrency=1, embedded=True)
        answers = client.label_many([label_messages(t, labels, task_description="Classify the sentiment of the "
                                                    "movie review.") for t in texts], labels)
    assert [a.label for a in answers] == list(texts.values())
    assert all(a.confidence is not None and a.confidence > 0.5 for a in answers)


def test_only_an_embedded_model_measured_calibrated_sets_the_level_by_default(monkeypatch):
    assert confidence_calibrated("qwen2.5-coder-1.5b-instruct", endpoint=False)
    assert not confidence_calibrated("qwen2.5-coder-1.5b-instruct", endpoint=True)  # a name on an endpoint: unknown
    assert not confidence_calibrated("qwen2.5-coder-0.5b-instruct", endpoint=False)  # measured underconfident
    assert not confidence_calibrated("gpt-4o-mini", endpoint=True)
    assert confidence_calibrated("gpt-4o-mini", endpoint=True, setting=True)
    assert not confidence_calibrated("qwen2.5-coder-1.5b-instruct", endpoint=False, setting=False)
    monkeypatch.setenv("FREEAL_LLM_CALIBRATED", "1")
    assert Settings.from_env().llm_calibrated is True
    monkeypatch.setenv("FREEAL_LLM_CALIBRATED", "")
    assert Settings.from_env().llm_calibrated is None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no one has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_run_leaves_no_llm_server_behind(tmp_path):
    """``kill -9`` of a run (or the OOM killer) runs no cleanup: the llama.cpp server it started served on,
    holding its weights and every core, until the server was started so that it ends with its parent."""
    script = (
        "import sys, time\n"
        "from freeal_backend.llm.embedded import EmbeddedLLMServer\n"
        "server = EmbeddedLLMServer('smollm2-135m-instruct', threads=1).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(run.stdout.readline())
        assert _alive(pid)
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    still = _alive(pid)
    if still:
        os.kill(pid, signal.SIGKILL)
    assert not still, "the LLM server outlived the run that started it"



def test_concurrent_first_uses_start_one_embedded_server(tmp_path, caplog):
    """A job and ``/predict`` that reach a run's LLM at once after a restart started one llama.cpp server each
    (1.1 GB and every core per copy with the default model); now one starts it and the other waits."""
    settings = Settings(data_dir=tmp_path, llm_model=TEST_MODEL, llm_threads=1)
    run = FreeALRun(settings, ["positive", "negative"], tmp_path / "run")
    got: list[LLMClient] = []
    try:
        with caplog.at_level(logging.INFO, logger="freeal_backend.llm.embedded"):
            threads = [threading.Thread(target=lambda: got.append(run.llm)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=180)
        starts = [r for r in caplog.records if r.getMessage().startswith("starting embedded LLM")]
        assert len(got) == 3 and all(c is got[0] for c in got) and len(starts) == 1, (got, len(starts))
    finally:
        run.close()


def test_predict_never_waits_past_its_budget_for_the_llm_to_start(tmp_path):
    """The first ``/predict`` after a restart started the embedded server inside the call, outside its time
    budget, so a slow start (a cold disk, a busy machine: up to two minutes) could run past Label Studio's 100 s
    and lose the batch. Now the start runs beside the call, which answers "queued" once its budget is spent;
    a later call finds the server up and labels."""
    from tests.test_auth import SENTIMENT, serve

    settings = Settings(slm_min_steps=0, data_dir=tmp_path, llm_model=TEST_MODEL, llm_threads=1, llm_max_retries=1)
    app = create_app(settings, ServerSettings(auto_job=False, predict_budget_s=0.05))
    backend = app.extensions["freeal"]
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(["a great film, moving and funny",
                                                                    "a dull, lifeless mess"], 1)]
    with serve(app) as client:
        assert client.post("/setup", json={"project": 1, "schema": SENTIMENT}).status_code == 200
        first = client.post("/predict", json={"project": 1, "tasks": tasks})
        run = backend.runs.get(1, tuple(parse_task_config(SENTIMENT).labels))
        assert first.status_code == 200 and run.llm_started is None, "/predict waited for the LLM to start"
        assert [p["score"] for p in first.json()["results"]] == [0.0, 0.0]  # left to the job, not made up
        deadline = time.monotonic() + 180
        while run.llm_started is None and time.monotonic() < deadline:  # the start went on after the call
            time.sleep(0.2)
        assert run.llm_started is not None
        backend.server = dataclasses.replace(backend.server, predict_budget_s=60.0)
        later = client.post("/predict", json={"project": 1, "tasks": tasks}).json()["results"]
        assert any(r["type"] == "choices" for p in later for r in p["result"]), later
