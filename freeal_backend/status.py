"""What the status page, ``/status`` and ``freeal report`` show: plain dicts aggregated in SQL from a run's state.

Aggregates of a finished round never change (until the run's data changes, which changes ``data_hash``),
so they are computed once per process and reused: a page refresh while a job runs only counts the stage
in progress. Nothing here returns a filesystem path.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from freeal_backend.llm.client import LLMClient, LLMStats
from freeal_backend.labelstudio.client import review_view_title
from freeal_backend.slm.budget import budget_summary
from freeal_backend.storage import Store

HISTOGRAM_BINS = 10
LLM_COUNTS = ("calls", "cache_hits", "prompt_tokens", "completion_tokens")
NO_LABEL = "(none)"
_STAGE_ROUND = re.compile(r"llm_r(\d+)$")
_MEMO: dict[tuple[Any, ...], Any] = {}
_MEMO_LOCK = threading.Lock()
_MEMO_MAX = 512


def stage_title(stage: str) -> str:
    """A stage name for people: ``llm_r0`` -> "LLM + self-generated demos", ``slm_r2`` -> "SLM round 2"."""
    names = {"zero_shot": "LLM zero-shot", "llm_r0": "LLM + self-generated demos", "final": "final",
             "demos": "demonstrations"}
    if stage in names:
        return names[stage]
    if stage.startswith("slm_r"):
        return f"SLM round {stage[5:]}"
    if stage.startswith("llm_r"):
        return f"refined LLM round {stage[5:]}"
    return stage


# job row ------------------------------------------------------------------------------------------------
def job_summary(row: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """State, stage, round x of y, done/total, percent, measured rate and ETA of a job row (or an empty job)."""
    row = row or {}
    now = time.time() if now is None else now
    done, total = int(row.get("done") or 0), int(row.get("total") or 0)
    state = row.get("state") or "none"
    rate = eta = None
    started, done0 = row.get("stage_started"), row.get("stage_done0")
    if state == "running" and started is not None and done0 is not None and now > started and done > done0:
        rate = (done - int(done0)) / (now - float(started))
        eta = max(0.0, (total - done) / rate) if total >= done else None
    end = row.get("finished") if state not in ("queued", "running") else None
    return {
        "state": state, "stage": row.get("stage"), "round": row.get("round"), "rounds": row.get("rounds"),
        "done": done, "total": total, "percent": round(100.0 * done / total, 1) if total else None,
        "rate_per_s": rate, "eta_s": eta,
        "elapsed_s": (float(end or now) - float(row["started"])) if row.get("started") else None,
        "error": row.get("message") if state == "failed" else None,
        "message": row.get("message") or None, "flagged": row.get("flagged"), "tasks": row.get("tasks"),
        "model_version": row.get("model_version"), "rerun": bool(row.get("rerun")),
        "started": row.get("started"), "finished": row.get("finished"),
    }


def live_title_state(job: dict[str, Any]) -> str | None:
    """``round 2/2, 43%`` for a running job, ``failed`` for a failed one, None when done."""
    if job["state"] in ("queued", "running"):
        rnd = f"round {job['round'] or 0}/{job['rounds']}" if job.get("rounds") is not None else job["state"]
        return f"{rnd}, {job['percent']:.0f}%" if job.get("percent") is not None else rnd
    return "failed" if job["state"] == "failed" else None


def review_tab_url(ls_url: str | None, project_id: int, view_id: int | None) -> str | None:
    """The Data Manager URL of the project's review tab, as a browser reaches it: under LABEL_STUDIO_PUBLIC_URL
    when set (the backend may reach Label Studio at an address browsers cannot resolve, e.g.
    http://label-studio:8080 in compose), else under ``ls_url``; None when unknown."""
    ls_url = os.environ.get("LABEL_STUDIO_PUBLIC_URL", "").strip() or ls_url
    if not ls_url or not ls_url.startswith(("http://", "https://")):
        return None
    return f"{ls_url.rstrip('/')}/projects/{int(project_id)}/data" + (f"?tab={int(view_id)}" if view_id else "")


def project_status(project_id: int, row: dict[str, Any] | None, store: Store | None, ls_url: str | None,
                   now: float | None = None, target_error: float | None = None,
                   target_confidence: float | None = None) -> dict[str, Any]:
    """What ``/status/<id>`` answers and ``/projects/<id>`` shows: the job, the run's numbers, the review tab."""
    job = job_summary(row, now)
    view_id = (row or {}).get("view_id")
    return {"project": project_id, "job": job,
            "run": run_summary(store, target_error, target_confidence) if store is not None else None,
            "review_tab": {"title": review_view_title(job["flagged"], live_title_state(job)), "view_id": view_id,
                           "url": review_tab_url(ls_url, project_id, view_id)}}


# LLM cost per round ---------------------------------------------------------------------------------------
def llm_counts(stats: LLMStats | None) -> dict[str, int]:
    """The counters of an LLM client's stats that the round history shows."""
    return {k: getattr(stats, k) if stats is not None else 0 for k in LLM_COUNTS}


class RoundLLMStats:
    """Books what the LLM cost to the round that spent it, in the run's meta ``round_stats_r<r>``.

    Call it as the loop's progress callback (an ``llm_r<N>`` stage switches to round N) or call
    :meth:`switch` per round; :meth:`finish` books the rest. ``client()`` gives the LLM client once it exists.
    Counts add up over runs of the same state (a resumed round keeps what it cost before).
    """

    def __init__(self, store: Store, client: Callable[[], LLMClient | None], rnd: int = 0) -> None:
        self.store, self.client, self.round = store, client, rnd
        self._base = self._now()

    def _now(self) -> dict[str, int]:
        llm = self.client()
        return llm_counts(llm.stats if llm is not None else None)

    def __call__(self, stage: str, done: int, total: int) -> None:
        match = _STAGE_ROUND.match(stage)
        if match and int(match.group(1)) != self.round:
            self.switch(int(match.group(1)))

    def switch(self, rnd: int) -> None:
        self.finish()
        self.round = rnd

    def finish(self) -> None:
        now = self._now()
        spent = {k: now[k] - self._base[k] for k in LLM_COUNTS}
        self._base = now
        if any(spent.values()):
            key = f"round_stats_r{self.round}"
            saved = self.store.get_meta(key) or {}
            llm = saved.get("llm") or {}
            self.store.set_meta(key, {**saved, "llm": {k: int(llm.get(k, 0)) + spent[k] for k in LLM_COUNTS}})


def save_round_flagged(store: Store, rnd: int, flagged: int) -> None:
    """Record how many texts round ``rnd`` flagged for review (the job pushes every round)."""
    key = f"round_stats_r{rnd}"
    store.set_meta(key, {**(store.get_meta(key) or {}), "flagged": flagged})


# run state --------------------------------------------------------------------------------------------
def _memo(key: tuple[Any, ...] | None, compute: Callable[[], Any]) -> Any:
    """``compute()``, cached under ``key`` (None: not cacheable, e.g. a stage still running)."""
    if key is None:
        return compute()
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
    value = compute()
    with _MEMO_LOCK:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = value
    return value


def _add(counts: dict[tuple[str | None, str | None], int], rows: list[tuple[Any, ...]], sign: int) -> None:
    for label, gold, n in rows:
        counts[(label, gold)] = counts.get((label, gold), 0) + sign * n


def _round0(store: Store, with_gold: bool) -> dict[tuple[str | None, str | None], int]:
    """Items by (current label after round 0, gold): the human label, else the round-0 LLM label."""
    if with_gold:
        rows = store.query("SELECT COALESCE(i.human_label, a.label), i.gold, COUNT(*) FROM items i "
                           "LEFT JOIN annotations a ON a.stage = 'llm_r0' AND a.item_id = i.item_id GROUP BY 1, 2")
        return {(label, gold): n for label, gold, n in rows}
    # no gold (a Label Studio project): count LLM labels without joining every item
    counts: dict[tuple[str | None, str | None], int] = {}
    _add(counts, [(lab, None, n) for lab, n in store.query(
        "SELECT human_label, COUNT(*) FROM items WHERE human_label IS NOT NULL GROUP BY 1")], 1)
    _add(counts, [(lab, None, n) for lab, n in store.query(
        "SELECT label, COUNT(*) FROM annotations WHERE stage = 'llm_r0' AND label IS NOT NULL GROUP BY 1")], 1)
    _add(counts, [(lab, None, n) for lab, n in store.query(  # answers for texts a person labelled since
        "SELECT a.label, COUNT(*) FROM items i CROSS JOIN annotations a ON a.stage = 'llm_r0' AND a.item_id = "
        "i.item_id WHERE i.human_label IS NOT NULL AND a.label IS NOT NULL GROUP BY 1")], -1)
    tasks = store.query("SELECT COUNT(*) FROM items")[0][0]
    counts[(None, None)] = tasks - sum(counts.values())
    return counts


def _changes(store: Store, rnd: int) -> list[tuple[str, str | None, str | None, int]]:
    """(new label, previous label, gold, count) of the texts refinement round ``rnd`` relabelled."""
    joins = "".join(f" LEFT JOIN annotations a{k} ON a{k}.stage = 'llm_r{k}' AND a{k}.item_id = a.item_id"
                    f" AND a{k}.label IS NOT NULL" for k in range(rnd))
    previous = ", ".join(f"a{k}.label" for k in reversed(range(rnd)))
    previous = f"COALESCE({previous}, NULL)"  # COALESCE takes two or more arguments
    return store.query(f"SELECT a.label, {previous}, i.gold, COUNT(*) FROM annotations a{joins} "
                       "JOIN items i ON i.item_id = a.item_id AND i.human_label IS NULL "
                       "WHERE a.stage = ? AND a.label IS NOT NULL GROUP BY 1, 2, 3", (f"llm_r{rnd}",))


def _label_name(label: str | None, spans: bool) -> str:
    """How a label is counted on the page; for span runs, the entity types a sentence has (bounded)."""
    if label is None:
        return NO_LABEL
    if not spans:
        return label
    types = sorted({str(t) for _, _, t in json.loads(label)})
    return " + ".join(types) if types else "no entity"


def _label_rounds(store: Store, rounds: int, memo_key: Callable[[str, int], tuple[Any, ...] | None],
                  with_gold: bool, spans: bool = False) -> list[dict[str, Any]]:
    """Per round 0..rounds: texts per current label, labels changed, accuracy against gold (if any)."""
    out = []
    counts = _memo(memo_key("round", 0), lambda: _round0(store, with_gold))
    for rnd in range(rounds + 1):
        changed = None
        if rnd:
            rows = _memo(memo_key("round", rnd), lambda: _changes(store, rnd))
            counts = dict(counts)
            _add(counts, [(new, gold, n) for new, _, gold, n in rows], 1)
            _add(counts, [(old, gold, n) for _, old, gold, n in rows], -1)
            changed = sum(n for new, old, _, n in rows if new != old)
        per_label: dict[str, int] = {}
        for (label, _), n in counts.items():
            name = _label_name(label, spans)
            per_label[name] = per_label.get(name, 0) + n
        n_gold = sum(n for (_, gold), n in counts.items() if gold is not None)
        correct = sum(n for (label, gold), n in counts.items() if gold is not None and label == gold)
        out.append({"round": rnd, "label_counts": {k: v for k, v in per_label.items() if v},
                    "labels_changed": changed, "accuracy": correct / n_gold if n_gold else None})
    return out


def _final(store: Store, with_gold: bool, spans: bool = False) -> dict[str, Any]:
    """The stored final results: flagged count, texts per label, score histogram (flagged vs not), accuracy."""
    hist = {"flagged": [0] * HISTOGRAM_BINS, "not_flagged": [0] * HISTOGRAM_BINS}
    labels: dict[str, int] = {}
    total = flagged = human = no_score = 0
    # one pass over the results, grouped; the few groups are folded here
    for source, suspicious, label, b, n in store.query(
            f"SELECT source, suspicious, label, MIN(CAST(confidence * {HISTOGRAM_BINS} AS INTEGER), "
            f"{HISTOGRAM_BINS - 1}), COUNT(*) FROM results GROUP BY 1, 2, 3, 4"):
        total += n
        name = _label_name(label, spans)
        labels[name] = labels.get(name, 0) + n
        if source == "human":
            human += n
            continue
        flagged += n if suspicious else 0
        if b is None:
            no_score += n
        else:
            hist["flagged" if suspicious else "not_flagged"][max(0, int(b))] += n
    accuracy = None
    if with_gold:
        gold_n, correct = store.query("SELECT COUNT(*), COALESCE(SUM(r.label = i.gold), 0) FROM items i "
                                      "CROSS JOIN results r ON r.item_id = i.item_id WHERE i.gold IS NOT NULL")[0]
        accuracy = correct / gold_n if gold_n else None
    return {"results": total, "flagged": flagged if total else None, "human": human, "no_score": no_score,
            "label_counts": labels, "histogram": hist, "accuracy": accuracy}


def latest_health(store: Store) -> dict[str, Any] | None:
    """The run health stored by the latest SLM round, or None before any."""
    rnd = 1
    while store.get_meta(f"health_r{rnd + 1}") is not None:
        rnd += 1
    return store.get_meta(f"health_r{rnd}")


def _budget(store: Store, target_error: float | None, confidence: float | None) -> dict[str, Any] | None:
    """The review budget of the stored final results (slm/budget.py): people's labels are right and not
    reviewable; a result without a score counts as surely wrong. None before any result."""
    rows = store.query("SELECT CASE WHEN source = 'human' THEN 1 ELSE COALESCE(confidence, 0) END, "
                       "source IS NOT 'human' FROM results")
    if not rows:
        return None
    scores, reviewable = np.array(rows, dtype=np.float64).T
    return budget_summary(scores, reviewable.astype(bool), target_error, confidence=confidence)


def _slm_accuracy(store: Store, rnd: int, labels: list[str]) -> float | None:
    """Accuracy of SLM round ``rnd``'s argmax (for spans: its exact span list) against gold (only for runs
    with gold, e.g. CLI evaluation)."""
    rows = store.query("SELECT s.probs, i.gold FROM slm s JOIN items i ON i.item_id = s.item_id "
                       "WHERE s.round = ? AND i.gold IS NOT NULL", (rnd,))
    hits = [(p["predicted"] if isinstance(p, dict) else labels[max(range(len(p)), key=p.__getitem__)]) == gold
            for p, gold in ((json.loads(probs), gold) for probs, gold in rows)]
    return sum(hits) / len(hits) if hits else None


def run_summary(store: Store, target_error: float | None = None,
                target_confidence: float | None = None) -> dict[str, Any]:
    """Everything the page shows about one run's state: counts, round history, final results, accuracy, and
    the review budget (with ``target_error``: the review set that meets it, with ``target_confidence`` if set)."""
    labels = store.get_meta("labels") or []
    data_hash = store.get_meta("data_hash") or ""
    stages = store.stages()
    done_at = dict(store.query("SELECT name, done_at FROM stages"))
    tasks, human, gold = store.query("SELECT COUNT(*), COUNT(human_label), COUNT(gold) FROM items")[0]
    last = max([int(n[5:]) for n in stages if n.startswith("slm_r")], default=0)
    rounds_done = store.get_meta("rounds_done") or 0
    path = store.path.resolve()

    def memo_key(what: str, rnd: int) -> tuple[Any, ...] | None:
        """A cache key for an aggregate of round ``rnd`` once the round's LLM labels are final, else None."""
        end = f"slm_r{rnd + 1}" if f"slm_r{rnd + 1}" in done_at else ("final" if rnd == 0 else f"llm_r{rnd}")
        return (path, data_hash, what, rnd, done_at[end]) if end in done_at else None

    spans = store.get_meta("task_type") == "ner"
    history = _label_rounds(store, last, memo_key, gold > 0, spans) if tasks else []
    final = _memo((path, data_hash, "final", done_at["final"]) if "final" in done_at else None,
                  lambda: _final(store, gold > 0, spans))
    budget = _memo((path, data_hash, "budget", done_at["final"], target_error, target_confidence)
                   if "final" in done_at else None, lambda: _budget(store, target_error, target_confidence))

    def answered(stage: str, rnd: int) -> int:
        return _memo(memo_key(f"answered {stage}", rnd),
                     lambda: store.query("SELECT COUNT(*) FROM annotations WHERE stage = ?", (stage,))[0][0])

    for row in history:
        rnd = row["round"]
        slm = stages.get(f"slm_r{rnd}") or {}
        llm = stages.get(f"llm_r{rnd}") or {}
        health = store.get_meta(f"health_r{rnd}") or {}
        saved = store.get_meta(f"round_stats_r{rnd}") or {}
        flagged = saved.get("flagged")
        if flagged is None and final["results"] and rnd == last:  # the last SLM round judged the final labels
            flagged = final["flagged"]
        row.update({
            "reannotated": llm.get("reannotated", answered(f"llm_r{rnd}", rnd)),
            "demo_pool": llm.get("demo_pool"), "clean": slm.get("clean"), "trained_on": slm.get("labelled"),
            "flagged": flagged, "estimated_accuracy": health.get("estimated_accuracy"),
            "verdict": health.get("verdict"), "health_message": health.get("message"),
            "llm": {k: (saved.get("llm") or {}).get(k) for k in LLM_COUNTS},
        })
    accuracy = []
    if gold:
        if "zero_shot" in stages or answered("zero_shot", 0):
            zs = store.query("SELECT COUNT(*), COALESCE(SUM(COALESCE(i.human_label, a.label) = i.gold), 0) "
                             "FROM items i LEFT JOIN annotations a ON a.stage = 'zero_shot' AND a.item_id = i.item_id"
                             " WHERE i.gold IS NOT NULL")[0]
            accuracy.append({"stage": "zero_shot", "accuracy": zs[1] / zs[0] if zs[0] else None})
        for row in history:
            rnd = row["round"]
            if rnd:
                slm_acc = _memo((path, data_hash, "slm_acc", done_at[f"slm_r{rnd}"]) if f"slm_r{rnd}" in done_at
                                else None, lambda: _slm_accuracy(store, rnd, labels))
                accuracy.append({"stage": f"slm_r{rnd}", "accuracy": slm_acc})
            accuracy.append({"stage": f"llm_r{rnd}", "accuracy": row["accuracy"]})
        if final["accuracy"] is not None:
            accuracy.append({"stage": "final", "accuracy": final["accuracy"]})
        for row in accuracy:
            row["title"] = stage_title(row["stage"])
    return {"labels": labels, "tasks": tasks, "human_labelled": human, "with_gold": gold,
            "rounds_done": rounds_done, "version": (stages.get("final") or {}).get("version"),
            "stages": [{"name": n, "title": stage_title(n)} for n in stages], "rounds": history,
            "final": final, "accuracy": accuracy, "budget": budget}


def flagged_items(store: Store, limit: int = 1000) -> list[dict[str, Any]]:
    """The flagged texts, least confident first, with their label, suggestion and reasons."""
    rows = store.query("SELECT r.item_id, i.text, r.record FROM results r JOIN items i ON i.item_id = r.item_id "
                       "WHERE r.suspicious = 1 AND r.source != 'human' ORDER BY r.confidence, r.item_id LIMIT ?",
                       (limit,))
    out = []
    for item_id, text, record in rows:
        rec = json.loads(record)
        label, suggested = rec.get("label"), rec.get("suggested_label")
        if rec.get("spans") is not None:  # a span run: the spans in words
            label = _spans_text(rec["spans"])
            suggested = _spans_text(rec["suggested_spans"]) if rec.get("suggested_spans") is not None else None
        out.append({"id": item_id, "text": text, "label": label, "confidence": rec.get("confidence"),
                    "suggested": suggested, "reasons": rec.get("reasons") or []})
    return out


def _spans_text(spans: list[dict[str, Any]]) -> str:
    """``"lidocaine" Chemical; "hepatitis" Disease`` (or ``no entity``)."""
    return "; ".join(f'"{s["text"]}" {s["label"]}' for s in spans) or "no entity"
