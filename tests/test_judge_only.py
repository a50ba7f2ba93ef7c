"""Judge-only: labels a user already has get the verdict, score, flag and run health without one LLM call."""
import json
import socket

from freeal_backend.cli import main
from tests.fixtures_llm import shared_rows


def _dead_endpoint() -> str:
    """An LLM endpoint where nothing listens: any LLM call would fail the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_rounds_0_with_imported_labels_judges_them_without_the_llm(tmp_path, monkeypatch, capsys):
    rows = shared_rows("mr_freeal", n=160, stride=50)  # the FreeAL authors' real gpt-3.5 labels
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({k: r[k] for k in ("text", "label", "llm_label")}) + "\n" for r in rows))
    monkeypatch.setenv("LLM_BASE_URL", _dead_endpoint())
    monkeypatch.setenv("LLM_MODEL", "none")
    monkeypatch.setenv("LLM_MAX_RETRIES", "0")
    monkeypatch.setenv("FREEAL_SLM_MIN_STEPS", "50")  # the product's default (conftest lowers it for speed):
    # with 160 texts, 2 epochs alone leave the judge near chance and every text flagged
    out = tmp_path / "out.jsonl"
    code = main(["run", str(src), "--rounds", "0", "--llm-labels", "input", "--data-dir", str(tmp_path / "d"),
                 "--out", str(out)])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    # judged: the small model's verdict is there for every text, and the LLM was never asked
    assert all(x["slm_label"] in ("negative", "positive") and 0 <= x["confidence"] <= 1 for x in lines)
    assert all(x["llm_label"] == r["llm_label"] for x, r in zip(lines, rows))
    printed = capsys.readouterr().out
    assert "LLM: not used" in printed
    assert "label health: not estimated" not in printed and "label health:" in printed
    assert "SLM round 1" in printed and "review flag" in printed
    # the flag is the verdict's, not "everything": it flags some texts but not all
    flagged = sum(x["suspicious"] for x in lines)
    assert 0 < flagged < len(lines)
