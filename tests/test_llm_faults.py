"""LLM faults injected for real: a local HTTP server misbehaves, the real ``openai`` client meets it.

Each test asserts what the user cares about: retries happen and succeed, off-format answers become
"no label" and are counted, a dead server ends the run with a clear status, nothing already answered is
lost, and a re-run after the server comes back asks nothing twice and completes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freeal_backend.llm.annotate import annotate_items
from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LazyRequests, LLMClient, LLMUnavailable, label_parser
from freeal_backend.llm.prompts import label_messages
from freeal_backend.records import Item
from freeal_backend.storage import Store
from tests.fake_openai import MODEL, FakeOpenAI, choose_label

LABELS = ["positive", "negative"]
LLM_KEY = "sk-SECRET-cli-key-55555"
ROOT = Path(__file__).resolve().parents[1]
FREEAL = [sys.executable, "-m", "freeal_backend.cli"]  # the `freeal` console script, same interpreter


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_client(fake: FakeOpenAI, tmp_path: Path, **kw: Any) -> LLMClient:
    opts: dict[str, Any] = {"concurrency": 2, "timeout": 5.0, "max_retries": 3}
    opts.update(kw)
    return LLMClient(fake.base_url, MODEL, ResponseCache(tmp_path / "llm_cache.sqlite"), **opts)


def msgs(text: str) -> list[dict[str, str]]:
    return label_messages(text, LABELS)


TEXTS = [f"review {i}: a {'great' if i % 2 else 'boring'} film" for i in range(30)]


def test_normal_answer_has_logprob_confidence_and_is_cached(fake: FakeOpenAI, tmp_path: Path) -> None:
    client = make_client(fake, tmp_path)
    first = client.label(msgs("a great and moving film"), LABELS)
    assert first.label == "positive"
    assert first.confidence is not None and 0.5 < first.confidence <= 1.0
    assert abs(sum(first.probs.values()) - 1.0) < 1e-6
    again = client.label(msgs("a great and moving film"), LABELS)
    assert again.label == "positive"
    assert len(fake.records()) == 1  # the second ask came from the cache
    stats = client.stats
    assert (stats.calls, stats.cache_hits, stats.failures, stats.unparsed) == (1, 1, 0, 0)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0


def test_429_with_retry_after_is_retried_after_the_asked_wait(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.inject("status", times=2, status=429, retry_after=1)
    client = make_client(fake, tmp_path)
    answer = client.label(msgs("a great film"), LABELS)
    assert answer.label == "positive"
    records = fake.records()
    assert [r.outcome for r in records] == ["status", "status", "ok"]
    assert [r.retry_count for r in records] == [0, 1, 2]  # the client itself retried
    # Retry-After: 1 was honoured (a lower bound on the wait, never an upper bound on speed)
    assert all(b.at - a.at >= 0.9 for a, b in zip(records, records[1:]))
    assert client.stats.calls == 1 and client.stats.failures == 0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_are_retried_with_backoff_and_succeed(fake: FakeOpenAI, tmp_path: Path, status: int) -> None:
    fake.inject("status", times=2, status=status)
    client = make_client(fake, tmp_path)
    assert client.label(msgs("a boring film"), LABELS).label == "negative"
    assert [r.outcome for r in fake.records()] == ["status", "status", "ok"]
    assert client.stats.failures == 0


def test_timeout_is_retried(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.inject("slow", seconds=4.0)
    client = make_client(fake, tmp_path, timeout=0.5)
    assert client.label(msgs("a great film"), LABELS).label == "positive"
    records = fake.records()
    assert [r.outcome for r in records] == ["slow", "ok"]
    assert records[1].retry_count == 1


@pytest.mark.parametrize("kind", ["drop", "truncated"])
def test_dropped_connection_and_cut_off_body_are_retried(fake: FakeOpenAI, tmp_path: Path, kind: str) -> None:
    fake.inject(kind, times=2)
    client = make_client(fake, tmp_path)
    assert client.label(msgs("a boring film"), LABELS).label == "negative"
    assert [r.outcome for r in fake.records()] == [kind, kind, "ok"]


def test_connection_refused_is_retried_until_the_server_is_back(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.stop()
    client = make_client(fake, tmp_path, max_retries=6)
    import threading
    timer = threading.Timer(0.4, fake.start)
    timer.start()
    try:
        answer = client.label(msgs("a great film"), LABELS)
    finally:
        timer.join()
    assert answer.label == "positive"
    assert fake.records()[-1].retry_count >= 1  # earlier attempts were refused before reaching the server


@pytest.mark.parametrize("content", ["I think maybe", "", "   ", "positive or negative", '{"label": 42}',
                                     "Label:", "neutral", "\u200b\u200f", "n", "The sentiment of this re"])
def test_off_format_answers_become_no_label_and_are_counted(fake: FakeOpenAI, tmp_path: Path,
                                                            content: str) -> None:
    fake.inject("content", content=content, text_contains="odd one")
    client = make_client(fake, tmp_path)
    texts = ["a great film", "the odd one", "a boring film"]
    answers = client.label_many([msgs(t) for t in texts], LABELS)
    by_text = dict(zip(texts, answers))
    assert by_text["the odd one"] is not None
    assert by_text["the odd one"].label is None and by_text["the odd one"].confidence is None
    assert by_text["the odd one"].error is None and by_text["the odd one"].raw == content
    assert by_text["a great film"].label == "positive" and by_text["a boring film"].label == "negative"
    assert client.stats.unparsed == 1 and client.stats.failures == 0


@pytest.mark.parametrize(("content", "expected"), [("Answer: Positive.", "positive"), ("'negative'", "negative"),
                                                   ("The label is: NEGATIVE!", "negative"),
                                                   ("positive\nBecause the review praises it.", "positive"),
                                                   ("posi", "positive")])  # cut off by max_tokens
def test_decorated_answers_still_parse(fake: FakeOpenAI, tmp_path: Path, content: str, expected: str) -> None:
    fake.inject("content", content=content)
    client = make_client(fake, tmp_path)
    assert client.label(msgs("whatever"), LABELS).label == expected
    assert client.stats.unparsed == 0


@pytest.mark.parametrize("body", ["{\"choices\": [ this is not json", "<html>502 Bad Gateway</html>", "{}",
                                  "{\"choices\": []}", "{\"choices\": [{}]}"])
def test_malformed_200_body_is_a_counted_failure_not_a_crash(fake: FakeOpenAI, tmp_path: Path, body: str) -> None:
    fake.inject("garbage", body=body, text_contains="odd one")
    client = make_client(fake, tmp_path)
    texts = ["a great film", "the odd one", "a boring film"]
    answers = client.label_many([msgs(t) for t in texts], LABELS)
    odd = answers[1]
    assert odd is not None and odd.label is None and odd.error
    assert "malformed" in odd.error.lower()
    assert answers[0] is not None and answers[0].label == "positive"
    assert answers[2] is not None and answers[2].label == "negative"
    assert client.stats.failures == 1
    # a failed answer is not cached: asking again reaches the (now well-behaved) server
    assert client.label(msgs("the odd one"), LABELS).label == choose_label("the odd one", LABELS)


def items_for(texts: list[str]) -> list[Item]:
    return [Item(f"t{i}", t) for i, t in enumerate(texts)]


def test_server_dying_mid_stage_loses_nothing_and_resume_asks_nothing_twice(fake: FakeOpenAI,
                                                                             tmp_path: Path) -> None:
    items = items_for(TEXTS)
    store = Store(tmp_path / "state.sqlite")
    fake.die_after(12)
    client = make_client(fake, tmp_path, max_retries=1)
    with pytest.raises(LLMUnavailable) as info:
        annotate_items(client, store, "llm_r0", items, lambda i: msgs(items[i].text),
                       lambda i: label_parser(LABELS))
    message = str(info.value)
    assert "failed 3 requests in a row" in message and "re-run to resume" in message
    assert "Connection error" in message or "APIConnectionError" in message
    first_answers = fake.answered_texts()
    assert sum(first_answers.values()) == 12
    stored = store.annotations("llm_r0")
    good = {k for k, v in stored.items() if not v["error"]}
    # every answer the server delivered is stored, and cached
    assert {items[int(k[1:])].text for k in good} == set(first_answers)
    assert len(client.cache) == 12
    assert all(v["error"] for k, v in stored.items() if k not in good)  # failures are recorded, not hidden
    client.cache.close()
    store.close()

    fake.start()  # the endpoint comes back on the same port
    fake.reset_log()
    store = Store(tmp_path / "state.sqlite")
    client = make_client(fake, tmp_path, max_retries=1)
    annotate_items(client, store, "llm_r0", items, lambda i: msgs(items[i].text), lambda i: label_parser(LABELS))
    second = fake.label_requests()
    assert not set(second) & set(first_answers), "finished items were requested again"
    assert sum(second.values()) == len(items) - 12
    final = store.annotations("llm_r0")
    assert len(final) == len(items) and not any(v["error"] for v in final.values())
    assert all(final[it.item_id]["label"] == choose_label(it.text, LABELS) for it in items)
    store.close()


def test_all_retries_exhausted_gives_llm_unavailable_with_the_cause(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.inject("status", times=50, status=503)
    client = make_client(fake, tmp_path, max_retries=1, concurrency=1)
    with pytest.raises(LLMUnavailable, match=r"failed 3 requests in a row \(InternalServerError: Error code: 503"):
        client.label_many([msgs(t) for t in TEXTS[:6]], LABELS)
    assert client.stats.failures == 3
    # 3 requests x (1 try + 1 retry), plus at most the one already running when it gave up; then it stops
    assert 6 <= len(fake.records()) <= 8


# --- the whole CLI against a server process that is SIGKILLed mid-run ----------------------------------------

def _start_server_process(port: int = 0, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--port", str(port), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, int(line.split()[1])


def _stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as resp:
        return json.load(resp)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def _rows(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "reviews.jsonl"
    words = ["great", "boring", "moving", "dull", "fun", "awful"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "text": f"review number {i}, a {words[i % 6]} film"}) + "\n")
    return path


def _cli_env(port: int, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LLM_BASE_URL=f"http://127.0.0.1:{port}/v1", LLM_MODEL=MODEL, LLM_MAX_RETRIES="1", LLM_API_KEY=LLM_KEY,
               LLM_TIMEOUT="5", LLM_CONCURRENCY="4", FREEAL_DATA_DIR=str(data_dir), FREEAL_DEMOS_PER_LABEL="3",
               FREEAL_SHOTS="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_cli_server_process_killed_mid_run_then_resume(tmp_path: Path) -> None:
    """SIGKILL the LLM server process mid-stage: clear status, exit 3, state kept; resume asks nothing twice."""
    data = _rows(tmp_path, 40)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    server, port = _start_server_process(0, "--hold-after", "20")  # 6 demo requests + 14 labels, then hangs
    cmd = [*FREEAL, "run", str(data), "--labels", "positive,negative", "--rounds", "0",
           "--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_cli_env(port, data_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(r["outcome"] == "held" for r in _stats(port)["log"]) >= 2:
                break
            time.sleep(0.1)
        first = _stats(port)
        _kill(server)  # the endpoint dies with requests in flight
        out, err = proc.communicate(timeout=120)
    finally:
        _kill(server)
        if proc.poll() is None:
            _kill(proc)  # type: ignore[arg-type]
    assert proc.returncode == 3, err[-2000:]
    assert "failed 3 requests in a row" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    answered_first = {r["key"] for r in first["log"] if r["answered"]}
    assert len(answered_first) == 20

    server, port2 = _start_server_process(port)  # back on the same port
    try:
        done = subprocess.run(cmd, cwd=tmp_path, env=_cli_env(port, data_dir), capture_output=True, text=True,
                              timeout=180)
        second = _stats(port2)
    finally:
        _kill(server)
    assert done.returncode == 0, done.stderr[-2000:]
    asked_again = {r["key"] for r in second["log"]} & answered_first
    assert not asked_again, f"{len(asked_again)} answered requests were asked again"
    assert second["demo_requests"] == 0
    lines = [json.loads(x) for x in (run_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(f"r{i}" for i in range(40))
    assert all(x["label"] in ("positive", "negative") for x in lines)


def test_cli_lists_items_left_without_a_label(tmp_path: Path) -> None:
    """Off-format answers leave items unanswered by the LLM: they are in the output, flagged, and listed by id."""
    data = _rows(tmp_path, 12)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    with FakeOpenAI() as fake:
        fake.inject("content", content="I think maybe", text_contains="number 3,")
        fake.inject("content", content="", text_contains="number 7,")
        done = subprocess.run([*FREEAL, "run", str(data), "--labels", "positive,negative", "--rounds", "0",
                               "--run-dir", str(run_dir), "--data-dir", str(data_dir)],
                              cwd=tmp_path, env=_cli_env(fake.port, data_dir), capture_output=True, text=True,
                              timeout=180)
        assert all(r.authorization == f"Bearer {LLM_KEY}" for r in fake.records())  # the key was used...
    assert done.returncode == 0, done.stderr[-2000:]
    assert LLM_KEY not in done.stdout + done.stderr  # ...and never printed
    assert "2 the LLM left unanswered (ids: " in done.stdout
    listed = done.stdout.split("left unanswered (ids: ")[1].split(")")[0].split(", ")
    assert sorted(listed) == ["r3", "r7"]
    assert '"unparsed": 2' in done.stdout
    lines = [json.loads(x) for x in (run_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12
    # judged even with --rounds 0: the unanswered texts carry the small model's label, flagged for review
    unanswered = [x for x in lines if x["llm_label"] is None]
    assert sorted(x["id"] for x in unanswered) == ["r3", "r7"]
    assert all(x["suspicious"] and x["label"] == x["slm_label"] for x in unanswered)
    # state, caches and outputs are written only where configured (data dir, run dir), nothing in the cwd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "reviews.jsonl", "run"]


def test_cli_server_dead_during_demo_generation_reports_clearly(tmp_path: Path) -> None:
    """The endpoint dies while round 0 writes its demonstrations: a clear status and exit 3, no traceback."""
    data = _rows(tmp_path, 8)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    with FakeOpenAI() as fake:
        fake.die_after(1)
        done = subprocess.run([*FREEAL, "run", str(data), "--labels", "positive,negative", "--rounds", "0",
                               "--run-dir", str(run_dir), "--data-dir", str(data_dir)],
                              cwd=tmp_path, env=_cli_env(fake.port, data_dir), capture_output=True, text=True,
                              timeout=180)
        assert fake.answered() == 1
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and LLM_KEY not in done.stdout + done.stderr
    assert "LLM endpoint" in done.stderr and "run the same command again to resume" in done.stderr
    assert (data_dir / "llm_cache.sqlite").exists()  # the one demo answer received is kept


@pytest.mark.parametrize("labels", [["very negative", "very positive", "neutral"], ["positive", "negative"]])
def test_confidence_from_labels_split_into_several_tokens(fake: FakeOpenAI, tmp_path: Path, labels: list[str]) -> None:
    """The fake splits each label into 3-character tokens and is as sure as its text says: the client
    must recover that certainty from the per-token logprobs, shared leading tokens included."""
    from tests.fake_openai import certainty

    client = make_client(fake, tmp_path)
    texts = [f"item {i}: a {'great' if i % 2 else 'boring'} story" for i in range(12)]
    for text in texts:
        answer = client.label(label_messages(text, labels), labels)
        assert answer.label == choose_label(text, labels)
        assert answer.confidence == pytest.approx(certainty(text), abs=1e-6)
    assert len({round(client.label(label_messages(t, labels), labels).confidence, 3) for t in texts}) > 6


def test_repeated_identical_rejections_stop_the_run_with_a_hint(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.inject("status", times=40, status=400)
    client = make_client(fake, tmp_path)
    with pytest.raises(LLMUnavailable, match="rejected 5 requests in a row"):
        client.label_many([msgs(t) for t in TEXTS], LABELS)


def test_an_endpoint_that_refuses_logprobs_is_asked_on_without_them(tmp_path: Path) -> None:
    """An endpoint that answers 400 to ``logprobs`` (OpenAI's reasoning models) stopped the run after five
    rejections with a hint to set LLM_LOGPROBS=0: every user of such an endpoint hit a failed run first. The
    client now asks on without logprobs, once, and says so; the answers carry no confidence."""
    with FakeOpenAI(refuse_logprobs=True) as fake:
        client = make_client(fake, tmp_path)
        answers = client.label_many([msgs(t) for t in TEXTS], LABELS)
        assert [a.label for a in answers] == [choose_label(t, LABELS) for t in TEXTS]
        assert all(a.confidence is None and a.error is None for a in answers)
        assert client.logprobs is False and client.stats.logprobs_refused == 1
        refused = [r for r in fake.log if r.text is not None]
        assert len(TEXTS) < len(refused) <= len(TEXTS) + client.concurrency  # only those in flight were refused


def test_mostly_unparseable_answers_stop_the_run(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.inject("content", times=60, content="<think>Let me consider the review carefully")
    client = make_client(fake, tmp_path, min_answers_judged=20)
    with pytest.raises(LLMUnavailable, match="LLM_MAX_TOKENS or set LLM_NO_THINK"):
        client.label_many([msgs(f"text {i}") for i in range(60)], LABELS)
    assert client.stats.thinking_cut >= 20


def test_prompts_are_built_only_as_requests_go_out(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A lazy request list is read a bounded window ahead of the answers, whatever its length."""
    client = make_client(fake, tmp_path, concurrency=3)
    built: list[int] = []
    answered: list[int] = []
    ahead: list[int] = []

    def build(i: int) -> tuple[list[dict[str, str]], Any]:
        built.append(i)
        ahead.append(len(built) - len(answered))
        return msgs(f"text number {i}"), label_parser(LABELS)

    out = client.answer_many(LazyRequests(300, build), on_answer=lambda i, a: answered.append(i), collect=False)
    assert out == [] and sorted(answered) == list(range(300)) and sorted(built) == list(range(300))
    assert max(ahead) <= 4 * 3 + 1 < 300  # the window, not the whole list


def test_the_embedded_servers_queue_does_not_time_requests_out(tmp_path: Path) -> None:
    """The embedded llama.cpp server answers one request at a time, so with ``concurrency`` in flight a
    request waits behind the others before its own answer starts. Seen on a busy 2-core machine: the 1.5B
    writing entity lists (~15 s each) behind 3 queued requests hit the 60 s timeout, and the run stopped
    with "failed 3 requests in a row (APITimeoutError)". For the embedded server the timeout covers the
    queue: ``timeout`` x ``concurrency``; an endpoint's stays ``timeout`` (it answers in parallel)."""
    with FakeOpenAI(delay=0.4, serial=True) as server:
        client = LLMClient(server.base_url, MODEL, ResponseCache(tmp_path / "cache.sqlite"), concurrency=4,
                           timeout=1.0, max_retries=0, embedded=True)
        answers = client.label_many([msgs(t) for t in TEXTS[:8]], LABELS)
    assert all(a is not None and a.error is None for a in answers), [a.error for a in answers if a]
    assert client.stats.failures == 0
    with FakeOpenAI(delay=0.4, serial=True) as server:
        endpoint = LLMClient(server.base_url, MODEL, ResponseCache(tmp_path / "cache2.sqlite"), concurrency=4,
                             timeout=1.0, max_retries=0, max_consecutive_failures=100)
        endpoint.label_many([msgs(t) for t in TEXTS[:8]], LABELS)
    assert endpoint.stats.failures > 0  # the same queue times an ordinary endpoint's requests out


def test_the_embedded_server_answers_requests_in_the_order_they_were_given(tmp_path: Path) -> None:
    """Requests come in shared-prefix order (``shared_prefix_order``), so that llama.cpp's prompt cache, which
    holds the last prompt only, evaluates what differs from the one before. The embedded server answers one
    request at a time; with 4 in flight, 3 wait for its lock and are answered in any order (a replay of round
    0 of a main job, the demo order of then: 1.46 s a request with 4 in flight, 1.28 s with 1). For the
    embedded server at most 2 are in flight: one answered, the next waiting (the first two are sent at once
    and may arrive in either order)."""
    texts = [f"text number {i} is great" for i in range(24)]
    with FakeOpenAI(delay=0.02, serial=True) as server:
        client = LLMClient(server.base_url, MODEL, ResponseCache(tmp_path / "cache.sqlite"), concurrency=4,
                           max_retries=0, embedded=True)
        client.label_many([msgs(t) for t in texts], LABELS)
    assert sorted(server.served[:2]) == texts[:2] and server.served[2:] == texts[2:]
