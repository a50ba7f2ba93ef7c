"""Persistent LLM response cache in SQLite, keyed by endpoint + model + messages + parameters."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from freeal_backend.storage import Transactional

SCHEMA = "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, value TEXT NOT NULL, created REAL);"


def cache_key(model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
              endpoint: str | None = None) -> str:
    """A stable hash of everything that determines an answer.

    ``endpoint`` is the server's base URL (one model name behind two URLs is two models); None for the
    bundled embedded server, whose name alone fixes its weights (its key keeps the format of old caches).
    """
    key: dict[str, Any] = {"model": model, "messages": messages, "params": params}
    if endpoint is not None:
        key["endpoint"] = endpoint.rstrip("/")
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache(Transactional):
    """Thread-safe key/value store of LLM responses; each answer is committed as it arrives (WAL)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._read("SELECT value FROM responses WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def put(self, key: str, model: str, value: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                       (key, model, json.dumps(value, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM responses")[0][0])
