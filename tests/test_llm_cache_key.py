"""The LLM response cache tells endpoints apart: one model name behind another URL is another model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from freeal_backend.llm.cache import ResponseCache, cache_key
from freeal_backend.llm.client import LLMClient
from freeal_backend.llm.prompts import label_messages
from tests.fake_openai import MODEL, FakeOpenAI

LABELS = ["negative", "positive"]
MSGS = label_messages("a great and moving film", LABELS)


def _client(fake: FakeOpenAI, cache: Path, **kw: object) -> LLMClient:
    return LLMClient(fake.base_url, MODEL, ResponseCache(cache), concurrency=1, timeout=5.0, max_retries=0, **kw)


def test_same_model_name_behind_another_url_is_asked_again(tmp_path: Path) -> None:
    cache = tmp_path / "llm_cache.sqlite"
    with FakeOpenAI() as old, FakeOpenAI() as new:
        old.inject("content", content="negative")  # the old model's answer
        assert _client(old, cache).label(MSGS, LABELS).label == "negative"
        client = _client(new, cache)
        assert client.label(MSGS, LABELS).label == "positive"
        assert len(new.records()) == 1 and client.stats.cache_hits == 0
        again = _client(new, cache)  # the same endpoint again: answered from the cache
        assert again.label(MSGS, LABELS).label == "positive" and again.stats.cache_hits == 1
        assert len(new.records()) == 1


def test_embedded_server_answers_are_keyed_by_model_alone_across_ports(tmp_path: Path) -> None:
    cache = tmp_path / "llm_cache.sqlite"
    with FakeOpenAI() as first, FakeOpenAI() as second:  # the embedded server gets a new port on each start
        first.inject("content", content="negative")
        assert _client(first, cache, embedded=True).label(MSGS, LABELS).label == "negative"
        again = _client(second, cache, embedded=True)
        assert again.label(MSGS, LABELS).label == "negative" and again.stats.cache_hits == 1
        assert not second.records()


def test_cache_key_includes_the_endpoint_and_keeps_the_embedded_key_format() -> None:
    params = {"temperature": 0.0}
    keys = {cache_key("local", MSGS, params, endpoint=url)
            for url in ("http://a:8000/v1", "http://b:8000/v1", None)}
    assert len(keys) == 3
    assert cache_key("local", MSGS, params, endpoint="http://a:8000/v1/") == cache_key(
        "local", MSGS, params, endpoint="http://a:8000/v1")
    legacy = hashlib.sha256(json.dumps({"model": "local", "messages": MSGS, "params": params}, sort_keys=True,
                                       ensure_ascii=False).encode("utf-8")).hexdigest()
    assert cache_key("local", MSGS, params, endpoint=None) == legacy  # caches of the embedded model stay readable
