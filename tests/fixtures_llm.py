"""LLM fixtures: the embedded offline LLM behind its real OpenAI-compatible HTTP server (per session), and a
fake OpenAI-compatible server on a real socket (per test module, ``tests/fake_openai.py``)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from freeal_backend.llm.embedded import TEST_MODEL, EmbeddedLLMServer
from tests.fake_openai import FakeOpenAI

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_rows(name: str, split: str = "train", n: int | None = None, *, stride: int = 1) -> list[dict]:
    """Rows of ../shared/data/<name>/<split>.jsonl (read in place, never copied)."""
    path = DATA / name / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"shared data set {path} is not available")
    rows = [json.loads(line) for line in path.open(encoding="utf-8")][::stride]
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedLLMServer]:
    """SmolLM2-135M (the fast, near-chance embedded model: the tests need an LLM that speaks, not one that
    labels well) served by llama-cpp-python on 127.0.0.1 for the whole session."""
    log = tmp_path_factory.mktemp("llm") / "server.log"
    with EmbeddedLLMServer(TEST_MODEL, threads=2, log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def llm_base_url(llm_server: EmbeddedLLMServer) -> str:
    return llm_server.base_url


@pytest.fixture(scope="session")
def llm_model() -> str:
    return TEST_MODEL


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    """A fake OpenAI-compatible chat server on 127.0.0.1 (its request log shows every call), one per module."""
    with FakeOpenAI() as server:
        yield server
