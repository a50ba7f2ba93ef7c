"""Plain records that flow between the FreeAL steps (no I/O here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    """One text to label.

    ``human_label`` is a trusted (gold) label given by a person; it is never re-labelled. For span tasks
    labels are encoded span lists (``spans.encode_spans``).
    ``gold`` is only for evaluation (a held-out true label) and is never shown to the LLM or SLM.
    """

    item_id: str
    text: str
    human_label: str | None = None
    gold: str | None = None
    augmented: str | None = None


@dataclass
class ItemResult:
    """What FreeAL concluded about one item after the last stage that ran."""

    item_id: str
    label: str | None
    confidence: float | None
    probs: dict[str, float] = field(default_factory=dict)
    suspicious: bool = False
    reasons: list[str] = field(default_factory=list)
    suggested_label: str | None = None
    llm_label: str | None = None
    llm_confidence: float | None = None
    slm_label: str | None = None
    slm_prob: float | None = None
    round: int = 0
    source: str = "llm"  # llm | slm | human
    # span tasks: ``label`` is the encoded span list (spans.encode_spans); these give it in full
    spans: list[dict[str, Any]] | None = None  # {"start", "end", "label", "text", "score"}
    suggested_spans: list[dict[str, Any]] | None = None  # the small model's spans, when it disagrees
    note: str | None = None  # what the small model doubts, in words
    audit: bool = False  # one of the random audit tasks (FREEAL_AUDIT): label it blind to measure the run
