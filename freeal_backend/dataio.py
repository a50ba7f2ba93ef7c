"""Reading input files (JSONL or CSV) and writing results."""
from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from freeal_backend.records import Item, ItemResult
from freeal_backend.spans import encode_spans, spans_from_dicts


def clean_text(text: str) -> str:
    """``text`` made encodable: lone surrogates (from a JSON ``"\\ud800"`` escape) become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.csv`` file; each needs a non-empty ``text``.

    Anything malformed (not UTF-8, not JSON, a broken CSV, a row without a text) is a ``ValueError``
    that names the file.
    """
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long texts are truncated later
            with path.open(newline="", encoding="utf-8") as f:
                rows: list[dict[str, Any]] = list(csv.DictReader(f))
        else:
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from exc
    except csv.Error as exc:
        raise ValueError(f"{path}: not a valid CSV file ({exc})") from exc
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("text") or "").strip():
            raise ValueError(f"{path}: row {n} has no 'text'")
        if isinstance(row["text"], (dict, list)):
            raise ValueError(f"{path}: row {n}: 'text' is a JSON {type(row['text']).__name__}, not a string")
    return rows


def sample_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The rows ``freeal run --limit`` labels: each row's ``id`` set to its row number where it has none (ids
    stay the original row numbers after sampling), then a ``seed``-shuffled ``limit`` of them (all without)."""
    for n, row in enumerate(rows):
        row.setdefault("id", n)
    if limit:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
        rows = rows[:limit]
    return rows


def rows_to_items(rows: Sequence[dict[str, Any]], *, gold_field: str = "label", task_type: str = "classification"
                  ) -> list[Item]:
    """Items from rows: ``id`` (else the row number), ``text``, gold ``label`` for evaluation,
    ``human_label`` (trusted), ``augmented``/``backtranslation`` (an augmented view).

    For ``ner``: gold ``spans`` and trusted ``human_spans``, each a list of ``{"start", "end", "label"}``
    (code points, end exclusive), become encoded span labels.
    """
    if task_type == "ner":
        return [Item(item_id=str(row.get("id", n)), text=clean_text(str(row["text"])),
                     human_label=_span_label(row, "human_spans", n), gold=_span_label(row, "spans", n))
                for n, row in enumerate(rows)]
    return [Item(item_id=str(row.get("id", n)), text=clean_text(str(row["text"])),
                 human_label=row.get("human_label") or None, gold=row.get(gold_field) or None,
                 augmented=row.get("augmented") or row.get("backtranslation") or None)
            for n, row in enumerate(rows)]


def infer_task_type(rows: Sequence[dict[str, Any]]) -> str:
    """``ner`` when the rows carry ``spans`` or ``human_spans`` lists, else ``classification``."""
    return "ner" if any(isinstance(r.get("spans") or r.get("human_spans"), list) for r in rows) else "classification"


def _span_label(row: dict[str, Any], key: str, n: int) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    text = str(row["text"])
    try:
        spans = spans_from_dicts(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"row {n}: '{key}' must be a list of {{start, end, label}} objects ({exc})") from exc
    bad = [s for s in spans if not 0 <= s.start < s.end <= len(text)]
    if bad:
        raise ValueError(f"row {n}: '{key}' has spans outside the text: {[(s.start, s.end) for s in bad[:3]]}")
    return encode_spans(spans)


def write_results(path: Path, items: Sequence[Item], results: Sequence[ItemResult]) -> None:
    """JSONL, one line per item, written to a temporary file then renamed (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item, result in zip(items, results):
            record = {"id": item.item_id, "text": item.text, **asdict(result)}
            record.pop("item_id")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
