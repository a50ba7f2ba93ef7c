"""Reading input files (JSONL or CSV) and writing results."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from freeal_backend.records import Item, ItemResult


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


def rows_to_items(rows: Sequence[dict[str, Any]], *, gold_field: str = "label") -> list[Item]:
    """Items from rows: ``id`` (else the row number), ``text``, gold ``label`` for evaluation,
    ``human_label`` (trusted), ``augmented``/``backtranslation`` (an augmented view)."""
    return [Item(item_id=str(row.get("id", n)), text=clean_text(str(row["text"])),
                 human_label=row.get("human_label") or None, gold=row.get(gold_field) or None,
                 augmented=row.get("augmented") or row.get("backtranslation") or None)
            for n, row in enumerate(rows)]


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
